"""The three ways users run the pipeline, for real: `ray job submit` to a Ray cluster, a flow on
a cluster of two nodes, and a scheduled Prefect deployment served by a Prefect server and a
worker; every server and node is started and stopped by the test."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT, sample_rows, write_jsonl
from tests.orchestration import BIN, prefect_server, quiet_env, ray_cluster

pytestmark = pytest.mark.slow
EXCLUDES = [".venv", ".cache", "runs", ".git", ".pytest_cache", ".ruff_cache", "benchmarks"]


def pairs_config(tmp: Path, name: str, files: int = 1, **sections) -> Path:
    """A small pairs-mode config (no LLM): `files` input files of 6 pairs each."""
    rows = sample_rows(6 * files + 20)
    paths = []
    for f in range(files):
        pairs = [
            {"query": f"what does {r['title']} do", "positive": r["text"]}
            for r in rows[6 * f : 6 * (f + 1)]
        ]
        paths.append(str(write_jsonl(tmp / f"pairs-{f}.jsonl", pairs)))
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"text": r["text"]} for r in rows[6 * files :]])
    cfg = {
        "name": name,
        "input": {"mode": "pairs", "paths": paths, "corpus_paths": [str(corpus)]},
        "mining": {"num_negatives": 2, "max_rank": 10},
        "output": {"dir": str(tmp / "runs"), "shard_size": 4},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def manifest(out: Path, name: str) -> dict:
    (run_dir,) = list(out.glob(f"{name}-*"))
    return json.loads((run_dir / "manifest.json").read_text())


def test_ray_job_submit_runs_the_pipeline_on_a_cluster(tmp_path):
    config = pairs_config(tmp_path, "job")
    out = tmp_path / "shared-out"
    with ray_cluster(tmp_path, cpus=2) as cluster:
        runtime_env = {"excludes": EXCLUDES, "env_vars": {"RAY_AUTH_MODE": "disabled"}}
        cmd = [
            str(BIN / "ray"), "job", "submit", f"--address={cluster['dashboard']}",
            f"--working-dir={ROOT}", f"--runtime-env-json={json.dumps(runtime_env)}", "--",
            "python", "-m", "flows.cli", "run", "--config", str(config), "--output", str(out),
        ]  # fmt: skip
        for _ in range(30):  # the head's job agent comes up a little after `ray status` says ok
            done = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in done.stderr:
                break
            time.sleep(2)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    doc = manifest(out, "job")
    assert doc["stages"]["mine"]["rows_out"] >= 4
    (run_dir,) = list(out.glob("job-*"))
    assert pq.read_table(run_dir / "triplets").num_rows == doc["stages"]["assemble"]["rows_out"]


def test_a_flow_on_two_nodes_runs_shards_on_both(tmp_path):
    config = pairs_config(tmp_path, "two", files=4)
    with ray_cluster(tmp_path, workers=1, cpus=1) as cluster:
        cli = str(BIN / "tripletforge")
        done = subprocess.run(
            [cli, "run", "--config", str(config)],
            env=quiet_env(RAY_ADDRESS=cluster["address"], PREFECT_HOME=str(tmp_path / "ph")),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    doc = manifest(tmp_path / "runs", "two")
    nodes = {job["node"] for jobs in doc["jobs"].values() for job in jobs}
    assert len(nodes) == 2, doc["jobs"]  # shards ran on the head and on the worker node
    assert all(len(n) > 20 for n in nodes)  # Ray node ids, recorded per shard


def test_a_node_that_cannot_see_the_output_fails_the_job_early(tmp_path):
    hidden = tmp_path / "not-shared"
    hidden.mkdir()
    config = pairs_config(tmp_path, "hidden", output={"dir": str(hidden / "runs")})
    with ray_cluster(tmp_path, workers=1, cpus=1, hide_in_workers=hidden) as cluster:
        done = subprocess.run(
            [str(BIN / "tripletforge"), "run", "--config", str(config)],
            env=quiet_env(RAY_ADDRESS=cluster["address"], PREFECT_HOME=str(tmp_path / "ph")),
            capture_output=True,
            text=True,
            timeout=600,
        )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "is not visible from Ray node" in out and "shared file system" in out, out[-3000:]
    assert "Traceback" not in out
    assert not list((hidden / "runs").glob("hidden-*/manifest.json"))  # nothing was run


def test_a_scheduled_deployment_runs_on_a_worker_and_publishes_artifacts(tmp_path):
    config = pairs_config(tmp_path, "deployed")

    def prefect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
        return done

    with prefect_server(tmp_path) as env:
        prefect("work-pool", "create", "local", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        run = prefect(
            "deployment", "run", "build_from_config/nightly-demo",
            "--param", f"config_path={config}", "--param", "overrides=[]",
        )  # fmt: skip
        flow_run_id = next(w for w in run.stdout.split() if w.count("-") == 4 and len(w) == 36)
        prefect("worker", "start", "--pool", "local", "--run-once", timeout=600)
        state = subprocess.run(
            [str(BIN / "python"), "-c", INSPECT, flow_run_id],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert state.returncode == 0, state.stderr[-3000:]
    result = json.loads(state.stdout.strip().splitlines()[-1])
    assert result["state"] == "COMPLETED", result
    counts = {row["stage"]: row for row in result["stage_counts"]}
    assert counts["ingest"]["rows_in"] == 6 + 20  # the pairs and the corpus
    assert counts["mine"]["rows_out"] >= 4
    assert "manifest.json" in result["run_output"] and "report.html" in result["run_output"]
    doc = manifest(tmp_path / "runs", "deployed")
    assert doc["stages"]["assemble"]["rows_out"] == counts["assemble"]["rows_out"]
    assert (next((tmp_path / "runs").glob("deployed-*")) / "report" / "report.html").exists()


INSPECT = r"""
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

async def main(flow_run_id):
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        artifacts = {}
        for key in ("stage-counts", "run-output"):
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            artifacts[key] = found[-1].data if found else None
    table = artifacts["stage-counts"]
    table = json.loads(table) if isinstance(table, str) else table
    print(json.dumps({"state": run.state.type.value, "stage_counts": table,
                      "run_output": artifacts["run-output"]}))

asyncio.run(main(sys.argv[1]))
"""
