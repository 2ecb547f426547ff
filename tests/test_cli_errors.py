"""User errors end `tripletforge run` in seconds, with one clear sentence, exit status 2 and no
traceback, before Ray, Prefect or a model starts (`--debug` shows the traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.preflight import OutputError, check_output
from tests.helpers import sample_rows, write_jsonl


def run_cli(tmp_path: Path, cfg: dict, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    start = time.perf_counter()
    done = subprocess.run(
        [cli, "run", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return done, time.perf_counter() - start


def base(tmp_path: Path, path: Path, **sections) -> dict:
    cfg = {
        "name": "err",
        "input": {"paths": [str(path)]},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def assert_clear(done: subprocess.CompletedProcess, seconds: float, *words: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out and "ray" not in out.lower().split("error:")[0], out
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, out
    for word in words:
        assert word in out, out
    assert seconds < 60, seconds  # no Ray, no Prefect API, no model was started


def test_a_missing_column_ends_the_run_with_one_sentence(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["some passage text here that is long enough"]}), path)
    done, seconds = run_cli(tmp_path, base(tmp_path, path))
    assert_clear(done, seconds, "corpus.parquet", "column(s) ['text'] not found", "body")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("err-*"))
    debug, _ = run_cli(tmp_path, base(tmp_path, path), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_truncated_parquet_file_names_the_file_and_the_cause(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": ["a passage long enough to keep " * 3] * 50}), path)
    path.write_bytes(path.read_bytes()[:-30])
    done, seconds = run_cli(tmp_path, base(tmp_path, path))
    assert_clear(done, seconds, "cut.parquet", "not a readable Parquet file")


def test_a_missing_model_and_a_bad_setting_are_clear_errors(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(3))
    done, seconds = run_cli(
        tmp_path, base(tmp_path, corpus, embedding={"model_path": str(tmp_path / "no-model")})
    )
    assert_clear(done, seconds, "embedding.model_path does not exist", "no-model")
    done, seconds = run_cli(tmp_path, base(tmp_path, corpus, mining={"num_negatives": 0}))
    assert_clear(done, seconds, "invalid config", "mining.num_negatives")


def test_an_unwritable_output_folder_fails_before_anything_starts(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(3))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done, seconds = run_cli(tmp_path, base(tmp_path, corpus, output={"dir": str(blocker / "runs")}))
    assert_clear(done, seconds, "output folder", "cannot be written")
    # a read-only file system: not writable even for root
    done, seconds = run_cli(tmp_path, base(tmp_path, corpus, output={"dir": "/proc/tripletforge"}))
    assert_clear(done, seconds, "/proc/tripletforge", "cannot be written")


def test_a_full_output_folder_is_refused(tmp_path):
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    with pytest.raises(OutputError, match=rf"has {free_mb // 10}\d* MB free"):
        check_output(tmp_path, min_free_mb=free_mb + 1024)
    check_output(tmp_path)  # the real threshold passes here


def test_a_really_full_file_system_fails_before_any_model_loads(tmp_path):
    """A tmpfs of 8 MB, filled to the last byte, mounted (in the run's own mount namespace)
    where the output goes: the run ends in seconds with the free space named."""
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(3))
    disk = tmp_path / "disk"
    disk.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base(tmp_path, corpus, output={"dir": str(disk / "runs")})))
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    script = (
        f"mount -t tmpfs -o size=8m tmpfs {disk} && "
        f"(dd if=/dev/zero of={disk}/fill bs=1M count=16 2>/dev/null; true) && "
        f"exec {cli} run --config {config}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    start = time.perf_counter()
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert_clear(done, time.perf_counter() - start, str(disk / "runs"), "has 0 MB free")
