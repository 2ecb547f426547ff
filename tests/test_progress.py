"""Progress a person (and a scheduler) can follow: shards done / total, rows per second and an
ETA per stage; `--log-format json` gives one JSON object per line on stderr and the result as one
JSON object on stdout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cache import Entry
from flows.executor import ShardProgress
from tests.helpers import sample_rows, write_jsonl

CLI = os.path.join(os.path.dirname(sys.executable), "tripletforge")


def test_eta_and_rate_come_from_the_shards_done(caplog):
    shown = ShardProgress("embed_passages", total=4, started=time.perf_counter() - 10.0)
    with caplog.at_level(logging.INFO, logger="tripletforge.progress"):
        shown.shard_done(
            Entry(stage="embed_passages", fingerprint="a", index=0, rows_in=100, rows_out=100)
        )
    (record,) = caplog.records
    event = record.event
    assert (event["shards_done"], event["shards_total"], event["rows"]) == (1, 4, 100)
    assert event["rows_per_s"] == pytest.approx(10.0, rel=0.05)  # 100 rows in ~10 s
    assert event["eta_s"] == pytest.approx(30.0, rel=0.05)  # 3 more shards at ~10 s each
    assert "1/4 shards, 10 rows/s, ETA 0:30" in record.getMessage()


def write_config(tmp: Path, **sections) -> Path:
    rows = sample_rows(80)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:30]]
    cfg = {
        "name": "progress",
        "input": {
            "mode": "pairs",
            "paths": [str(write_jsonl(tmp / "pairs.jsonl", pairs))],
            "corpus_paths": [str(write_jsonl(tmp / "corpus.jsonl", rows[30:]))],
        },
        "mining": {"num_negatives": 2, "max_rank": 10},
        "output": {"dir": str(tmp / "runs"), "shard_size": 16},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / "progress.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_json(tmp: Path, config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PREFECT_HOME"] = str(tmp / "prefect")
    return subprocess.run(
        [CLI, "run", "--config", str(config), "--log-format", "json"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_json_logs_are_one_object_per_line_with_progress_and_the_result(tmp_path):
    done = run_json(tmp_path, write_config(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    shards = [e for e in events if e["event"] == "shard_done"]
    by_stage: dict[str, list[dict]] = {}
    for e in shards:
        by_stage.setdefault(e["stage"], []).append(e)
    (result,) = [json.loads(line) for line in done.stdout.splitlines()]
    doc = json.loads(Path(result["manifest"]).read_text())
    # every stage that ran shards reported each of them, in order, ending at total
    ran = {n for n, c in doc["stages"].items() if c["skipped_shards"] < len(doc["jobs"][n])}
    assert set(by_stage) == ran
    for stage, seen in by_stage.items():
        total = len(doc["jobs"][stage])
        assert [e["shards_done"] for e in seen] == list(range(1, total + 1)), stage
        assert all(e["shards_total"] == total and e["eta_s"] >= 0 for e in seen)
        assert seen[-1]["eta_s"] == 0 and seen[-1]["rows"] == doc["stages"][stage]["rows_in"]
    assert len(by_stage["embed_passages"]) > 1  # several shards, each reported
    assert result["run_dir"] == str(Path(result["manifest"]).parent)
    for name, counts in result["stages"].items():
        assert counts["rows_out"] == doc["stages"][name]["rows_out"]


def test_a_user_error_in_json_mode_is_one_json_line(tmp_path):
    config = write_config(tmp_path, mining={"num_negatives": 0})
    done = run_json(tmp_path, config)
    assert done.returncode == 2
    (error,) = [json.loads(line) for line in done.stderr.splitlines()]
    assert error["event"] == "error" and "mining.num_negatives" in error["message"]
    assert done.stdout == ""
