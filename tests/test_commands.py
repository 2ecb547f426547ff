"""Every command the README and the run summary print works as printed, in the environment
`make demo` creates and in a shell where it is not activated: the README's tested blocks run from
a project folder whose `.venv` is this one and whose `runs/latest` is a real run; the summary's
lines run from anywhere."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, sample_rows, write_jsonl

pytestmark = pytest.mark.slow
VENV_BIN = ROOT / ".venv" / "bin"


def plain_env(tmp: Path) -> dict[str, str]:
    """A shell without the environment on PATH (as a new terminal would be)."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=os.pathsep.join(path), PREFECT_HOME=str(tmp / "prefect"))
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder as after `make demo`: .venv, and runs/latest from a real CLI run."""
    root = tmp_path_factory.mktemp("project")
    (root / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    rows = sample_rows(60)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:20]]
    cfg = {
        "name": "cmds",
        "input": {
            "mode": "pairs",
            "paths": [str(write_jsonl(root / "pairs.jsonl", pairs))],
            "corpus_paths": [str(write_jsonl(root / "corpus.jsonl", rows[20:]))],
        },
        "mining": {"num_negatives": 2, "max_rank": 10},
        "split": {"eval_fraction": 0.2},
        "output": {"dir": str(root / "runs")},
    }
    config = root / "cmds.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [str(VENV_BIN / "tripletforge"), "run", "--config", str(config)],
        env=plain_env(root) | {"COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


def summary_commands(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "query it:")
    return [line.strip() for line in lines[start + 1 :] if line.startswith("  ")]


def test_runs_latest_points_at_the_run(project):
    root, _ = project
    latest = root / "runs" / "latest"
    assert latest.is_symlink() and (latest / "manifest.json").exists()
    (run_dir,) = list((root / "runs").glob("cmds-*"))
    assert latest.resolve() == run_dir.resolve()


def test_every_command_the_summary_prints_works_pasted_anywhere(project, tmp_path):
    root, stdout = project
    commands = summary_commands(stdout)
    assert len(commands) >= 4, stdout[-2000:]
    assert any(c.startswith("# or: source ") for c in commands)  # the venv is not active here
    for cmd in commands:
        done = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=plain_env(tmp_path), capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if not cmd.startswith("#"):
            assert done.stdout.strip(), cmd


def readme_blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    lang = "bash" if kind == "commands" else "python"
    pattern = rf"<!-- tested: {kind} -->\n```{lang}\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def test_every_tested_readme_block_runs_as_printed(project):
    root, _ = project
    blocks = readme_blocks("commands")
    assert len(blocks) >= 2
    for block in blocks:
        for line in block.strip().splitlines():
            assert line.split()[0] in ("source", "tripletforge", ".venv/bin/duckdb"), line
        # one shell per block, as a user types it: `source` first, then the commands
        done = subprocess.run(
            ["bash", "-e", "-c", block], cwd=root, env=plain_env(root), capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{block}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        assert done.stdout.count("\n") >= len(block.strip().splitlines()) - 1
    assert (root / "runs" / "latest" / "report" / "report.html").exists()  # `report` ran
    (python,) = readme_blocks("python")
    done = subprocess.run(
        [str(root / ".venv" / "bin" / "python"), "-c", python + "\nprint(ds['train'].num_rows)"],
        cwd=root, env=plain_env(root) | {"HF_DATASETS_OFFLINE": "1"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0
