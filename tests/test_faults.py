"""Real kills, each while a run is in a stage: a Ray worker running a shard, the embedder's actor,
and the whole CLI mid-generation. Each run is `tripletforge run` in its own process group (its
own Ray), watched through the stage cache: a job at work is a `.tmp-<host>-<pid>-*` folder
there, named by the process that runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cache import ENTRY, StageCache
from tests.helpers import sample_rows, write_jsonl
from tests.orchestration import BIN, quiet_env, stop, wait_for

pytestmark = pytest.mark.slow


def write_config(tmp: Path, name: str, **sections) -> Path:
    """Pairs mode over the whole sample corpus, in small shards: many embedding jobs."""
    rows = sample_rows(265)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:40]]
    corpus = [{"text": f"{r['text']} (copy {k}: {r['title']})"} for k in range(3) for r in rows]
    cfg = {
        "name": name,
        "input": {
            "mode": "pairs",
            "paths": [str(write_jsonl(tmp / "pairs.jsonl", pairs))],
            "corpus_paths": [str(write_jsonl(tmp / "corpus.jsonl", corpus))],
        },
        "dedup": {"near": False},
        "mining": {"num_negatives": 2, "max_rank": 10},
        "output": {"dir": str(tmp / "runs"), "shard_size": 48},
        "runtime": {"num_cpus": 2},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_run(tmp: Path, config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "tripletforge"), "run", "--config", str(config)],
        env=quiet_env(PREFECT_HOME=str(tmp / "prefect")),
        stdout=(tmp / "run.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def working_jobs(cache: Path, stage: str) -> list[int]:
    """Pids of the processes running a job of `stage` now (from their temporary folders)."""
    pids = []
    for tmp in (cache / stage).glob(".tmp-*"):
        pid = int(tmp.name.split("-")[2])
        if psutil.pid_exists(pid):
            pids.append(pid)
    return pids


def committed(cache: Path, stage: str) -> int:
    """Committed entries of `stage`: not a job's temporary folder, which holds its entry.json
    from just before the rename that commits it (a run killed in between commits nothing)."""
    return sum(
        (folder / ENTRY).is_file() for s, _, folder in StageCache(cache).entries() if s == stage
    )


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and every process it started, and wait until all are gone. Ray puts each
    worker in a process group of its own, so killing the CLI's group leaves workers that exit only
    when they notice their raylet is gone; one of them may still commit a shard meanwhile. What the
    killed run left is counted after that."""
    started = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"


def manifest(tmp: Path, name: str) -> dict:
    (run_dir,) = list((tmp / "runs").glob(f"{name}-*"))
    return json.loads((run_dir / "manifest.json").read_text())


def test_a_killed_worker_mid_shard_is_retried_and_nothing_is_lost_or_doubled(tmp_path):
    config = write_config(tmp_path, "worker")
    cache = tmp_path / "runs" / ".stages"
    proc = start_run(tmp_path, config)
    try:
        (victim,) = wait_for(lambda: working_jobs(cache, "embed_passages")[:1], 240, "an embed job")
        os.kill(victim, signal.SIGKILL)  # the Ray worker process running that shard
        assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        stop(proc)
    doc = manifest(tmp_path, "worker")
    jobs = doc["jobs"]["embed_passages"]
    assert sorted(j["index"] for j in jobs) == list(range(len(jobs)))  # every shard, once
    assert doc["stages"]["embed_passages"]["rows_out"] == doc["stages"]["dedup"]["rows_out"]
    (run_dir,) = list((tmp_path / "runs").glob("worker-*"))
    files = sorted(run_dir.glob("embeddings/passages-*.parquet"))
    embedded = pa.concat_tables([pq.read_table(f, columns=["id"]) for f in files])["id"].to_pylist()
    passages = pq.read_table(run_dir / "passages", columns=["passage_id"])["passage_id"].to_pylist()
    assert sorted(embedded) == sorted(set(embedded)) == sorted(passages)  # none lost or doubled
    # the killed job's temporary folder is left behind ... and removed by the next start
    stale = [p for p in (cache / "embed_passages").glob(".tmp-*") if f"-{victim}-" in p.name]
    assert stale
    again = start_run(tmp_path, config)
    assert again.wait(timeout=600) == 0
    assert not list(cache.glob("*/.tmp-*"))


def actor_pids() -> list[int]:
    """Model actors: Ray titles them `ray::ModelWorker`, `ray::ModelWorker.call`, or
    `ray::<actor name>:ModelWorker.__init__` while loading."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        title = (p.info["cmdline"] or [""])[0]
        if title.startswith("ray::") and "ModelWorker" in title:
            found.append(p.pid)
    return found


@pytest.mark.parametrize("restarts", [2, 0])
def test_a_killed_embedder_is_restarted_or_the_run_names_the_stage_and_shard(tmp_path, restarts):
    config = write_config(tmp_path, "actor", runtime={"model_restarts": restarts})
    cache = tmp_path / "runs" / ".stages"
    before = set(actor_pids())
    proc = start_run(tmp_path, config)
    try:
        (actor,) = wait_for(lambda: list(set(actor_pids()) - before), 240, "the embedder actor")
        wait_for(lambda: working_jobs(cache, "embed_passages"), 240, "an embed job", poll=0.1)
        os.kill(actor, signal.SIGKILL)  # while it embeds that shard
        code = proc.wait(timeout=600)
    finally:
        stop(proc)
    log = (tmp_path / "run.log").read_text()
    if restarts:
        assert code == 0, log[-4000:]  # Ray started the embedder again and retried its call
        doc = manifest(tmp_path, "actor")
        assert doc["stages"]["embed_passages"]["rows_out"] == doc["stages"]["dedup"]["rows_out"]
    else:
        assert code != 0
        assert "stage embed_passages, shard" in log, log[-4000:]


def test_a_killed_cli_mid_generation_resumes_with_only_the_missing_shards(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(40))
    config = tmp_path / "gen.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "gen",
                "input": {"paths": [str(corpus)], "title_column": "title"},
                "generation": {"styles": {"question": 1}, "max_passages": 12},
                "mining": {"num_negatives": 2, "max_rank": 8},
                "output": {"dir": str(tmp_path / "runs"), "shard_size": 4},
                "runtime": {"num_cpus": 2},
            }
        )
    )
    cache = tmp_path / "runs" / ".stages"
    proc = start_run(tmp_path, config)
    try:
        wait_for(lambda: committed(cache, "generate") >= 1, 600, "a generate shard", poll=0.2)
        kill_everything(proc)
    finally:
        stop(proc)
    done_before = committed(cache, "generate")
    assert done_before < 3  # killed mid-generation: some shards done, not all
    time.sleep(2)
    again = start_run(tmp_path, config)
    assert again.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
    doc = manifest(tmp_path, "gen")
    gen = doc["stages"]["generate"]
    assert gen["skipped_shards"] == done_before
    # the LLM was asked only for the missing shards' requests (and their retries, one each)
    missing = sum(j["rows_in"] for j in doc["jobs"]["generate"] if not j["reused"])
    asked = doc["model_calls"]["generate"]["llm"]["items"]
    assert 0 < missing < 12 and missing <= asked <= 2 * missing
    assert not list(cache.glob("*/.tmp-*"))  # what the killed run left was removed
