"""The executor with the local (in-process) dispatch and the real MiniLM, pairs mode: the stage
cache shared across runs, byte-identical outputs, model lifetimes, accounting, gc."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.build import run_local, stages_for
from flows.cache import StageCache
from flows.executor import AccountingError, Executor
from flows.models import LocalModels
from schemas.tables import REJECTS
from tasks.io import sha256_file
from tasks.stage import Outcome, Stage
from tests.conftest import pairs_mode_config
from tests.helpers import sample_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder():
    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    return Embedder(
        str(minilm_path()), "all-MiniLM-L6-v2", "cpu", 2, resolve_precision("auto", "cpu")
    )


def pairs_config(tmp_path, **sections):
    rows = sample_rows(40)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:12]]
    corpus = [{"text": r["text"]} for r in rows[12:]]
    return pairs_mode_config(
        tmp_path,
        pairs,
        corpus,
        **sections,
    )


def checksums(run_dir, folder):
    return {p.name: sha256_file(p) for p in sorted((run_dir / folder).glob("*.parquet"))}


class Recording(LocalModels):
    """Records when each model starts and stops, between the stages that run."""

    def __init__(self, cfg, events, **given):
        super().__init__(cfg, **given)
        self.events = events

    def _prefetch(self, name):
        self.events.append(f"prefetch {name}")

    def _start(self, name):
        self.events.append(f"start {name}")
        return super()._start(name)

    def _stop(self, name, handle):
        self.events.append(f"stop {name}")


def test_two_complete_runs_make_byte_identical_outputs(tmp_path, embedder):
    """The same config run twice from scratch (two output roots, so two empty caches)."""
    cfg = pairs_config(tmp_path)
    a, _ = run_local(cfg, str(tmp_path / "a"), embedder=embedder)
    b, _ = run_local(cfg, str(tmp_path / "b"), embedder=embedder)
    assert a != b
    for folder in ("passages", "queries", "embeddings", "candidates", "triplets"):
        assert checksums(a, folder) == checksums(b, folder) != {}, folder


def test_a_mining_change_reuses_everything_before_mining(tmp_path, embedder):
    cfg = pairs_config(tmp_path)
    first, doc1 = run_local(cfg, embedder=embedder)
    assert doc1["model_calls"]["embed_passages"]["embedder"]["items"] == 40 - 12 + 12
    changed = cfg.model_copy(update={"mining": cfg.mining.model_copy(update={"num_negatives": 2})})
    second, doc2 = run_local(changed, embedder=embedder)
    assert second != first  # a new run (its own folder), over the same cache
    for stage in ("ingest", "dedup", "embed_passages", "pairs", "embed_queries", "query_dedup"):
        counts = doc2["stages"][stage]
        assert counts["skipped_shards"] == len(doc2["jobs"][stage]), stage
    assert doc2["stages"]["mine"]["skipped_shards"] == 0
    assert doc2["model_calls"] == {}  # nothing embedded again
    # the first run is intact beside it
    assert checksums(first, "passages") == checksums(second, "passages")


def test_a_redone_upstream_job_with_the_same_rows_redoes_nothing_downstream(tmp_path, embedder):
    cfg = pairs_config(tmp_path)
    run_dir, doc = run_local(cfg, embedder=embedder)
    cache = StageCache(run_dir.parent / ".stages")
    shutil.rmtree(cache.folder("pairs", doc["jobs"]["pairs"][0]["fingerprint"]))
    _, again = run_local(cfg, embedder=embedder)
    assert again["stages"]["pairs"]["skipped_shards"] == 0  # redone ...
    for stage in ("embed_queries", "query_dedup", "mine", "assemble"):  # ... nothing after it
        assert again["stages"][stage]["skipped_shards"] == len(again["jobs"][stage]), stage


def test_models_start_when_needed_and_stop_after_their_last_stage(tmp_path, embedder):
    cfg = pairs_config(tmp_path, mining={"rescore_model_path": None})
    events: list[str] = []
    host = Recording(cfg, events, embedder=embedder)
    executor = Executor(cfg, tmp_path / "runs" / cfg.run_id, host)
    stages = stages_for(cfg)
    names = [s.name for s in stages]
    executor.run(stages)
    assert events == ["start embedder", "stop embedder"]  # nothing ahead without overlap
    ran = [r.stage.name for r in executor.runs]
    assert ran == [n for n in names if n in ran]  # in the list's order
    assert "mine" in ran and "embed_queries" in ran
    # a second run over the same cache starts no model at all
    events.clear()
    Executor(cfg, tmp_path / "runs" / cfg.run_id, Recording(cfg, events, embedder=embedder)).run(
        stages
    )
    assert events == []


class NeedsTheLLM(Stage):
    """A stage whose jobs need the LLM (passes the passages' rows on; asks the model nothing)."""

    name = "needs_llm"
    version = "1"
    sharded = ("passages",)
    outputs = ("rejects",)

    def models(self, cfg):
        return ("llm",)

    def run(self, job):
        job.write("rejects", REJECTS.empty_table())
        return Outcome(rows_out=job.read("passages").num_rows)


def test_a_later_stages_model_loads_ahead_only_when_that_stage_has_work(tmp_path, embedder):
    """Where stages overlap (the LLM on a GPU or a server), the LLM of a stage after
    embed_passages is asked for before the embedder loads (the two load side by side), and a
    resumed run, whose LLM stage is all in the cache, asks for none."""
    cfg = pairs_config(tmp_path)
    stages = stages_for(cfg)
    stages.insert([s.name for s in stages].index("embed_passages") + 1, NeedsTheLLM())
    events: list[str] = []
    given = {"embedder": embedder, "llm": object()}
    Executor(cfg, tmp_path / "runs" / cfg.run_id, Recording(cfg, events, **given)).run(
        stages, overlap=True
    )
    assert events[:3] == ["prefetch embedder", "prefetch llm", "start embedder"], events
    assert events.index("start llm") > events.index("start embedder")
    assert events.count("prefetch llm") == 1
    events.clear()
    Executor(cfg, tmp_path / "runs" / cfg.run_id, Recording(cfg, events, **given)).run(
        stages, overlap=True
    )
    assert events == []


class Lossy(Stage):
    """Claims fewer rows out than it was given, and says of none that they were rejected."""

    name = "lossy"
    version = "1"
    sharded = ("queries",)
    outputs = ("queries",)

    def run(self, job):
        table = job.read("queries")
        job.write("queries", table.slice(1))
        return Outcome(rows_out=table.num_rows - 1)


def test_rows_that_do_not_balance_fail_the_run_naming_stage_and_shard(tmp_path, embedder):
    cfg = pairs_config(tmp_path)
    stages = stages_for(cfg)
    stages.insert([s.name for s in stages].index("pairs") + 1, Lossy())
    with pytest.raises(AccountingError, match=r"stage lossy, shard 0: rows in 8 != out 7"):
        run_local(cfg, stages=stages, embedder=embedder)
    # nothing of the failed job is left behind, in the cache or as a temporary folder
    cache = StageCache(tmp_path / "runs" / ".stages")
    assert not list(cache.root.glob("lossy/*"))


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path, embedder):
    cfg = pairs_config(tmp_path)
    cache = StageCache(tmp_path / "runs" / ".stages")
    dead = 2**22 + 12345  # beyond pid_max on Linux: no such process
    leftover = cache.root / "mine" / f".tmp-{os.uname().nodename.replace('-', '_')}-{dead}-ab12"
    leftover.mkdir(parents=True)
    (leftover / "candidates-00000.parquet").write_bytes(b"half a file")
    alive = cache.begin("mine")  # a job of a process that still runs (this one): kept
    run_local(cfg, embedder=embedder)
    assert not leftover.exists() and alive.exists()
    StageCache.abort(alive)


def test_gc_drops_unreferenced_entries_and_every_run_stays_readable(tmp_path, embedder):
    from flows.cli import app

    cfg = pairs_config(tmp_path)
    first, doc1 = run_local(cfg, embedder=embedder)
    changed = cfg.model_copy(update={"mining": cfg.mining.model_copy(update={"num_negatives": 2})})
    second, doc2 = run_local(changed, embedder=embedder)
    shutil.rmtree(first)  # the first run is deleted: its mine and assemble entries are orphans
    root = tmp_path / "runs"
    orphans = len(doc1["jobs"]["mine"]) + len(doc1["jobs"]["assemble"])
    result = CliRunner().invoke(app, ["gc", str(root), "--dry-run"])
    assert result.exit_code == 0 and f"would remove {orphans} unreferenced" in result.output
    result = CliRunner().invoke(app, ["gc", str(root)])
    assert result.exit_code == 0 and f"removed {orphans} unreferenced" in result.output
    cache = StageCache(root / ".stages")
    for stage in ("mine", "assemble"):
        assert cache.lookup(stage, doc1["jobs"][stage][0]["fingerprint"]) is None
        assert cache.lookup(stage, doc2["jobs"][stage][0]["fingerprint"]) is not None
    # a run reads whole even when gc drops what it links to: its folder holds hard links
    shutil.rmtree(root / ".stages")
    assert pq.read_table(second / "triplets" / "part-00000.parquet").num_rows > 0
