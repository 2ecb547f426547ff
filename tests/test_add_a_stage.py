"""The README's "Add a stage" walkthrough, run: a filter stage in a few lines, put in the stage
list, run by the local executor with the real embedder (pairs mode)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flows.build import run_local, stages_for
from schemas.tables import REJECTS
from tasks.stage import Job, Outcome, Stage
from tests.conftest import tiny_config
from tests.helpers import sample_rows, write_jsonl

pytestmark = pytest.mark.slow


# --- the walkthrough's stage (README "Add a stage") ---------------------------------------------
class ShortQueryFilter(Stage):
    """Drop queries of fewer than `min_words` words, each with the reason `short_query`."""

    name = "short_queries"
    version = "1"  # bump when the same input gives another output
    sharded = ("queries",)  # one job per shard of queries
    outputs = ("queries", "rejects")  # later stages read the filtered queries

    def __init__(self, min_words: int = 3):
        self.min_words = min_words

    def settings(self, cfg):  # what goes into the fingerprint besides the input's checksum
        return {"min_words": self.min_words}

    def run(self, job: Job) -> Outcome:
        queries = job.read("queries")
        words = pc.list_value_length(pc.utf8_split_whitespace(queries["query"]))
        keep = pc.greater_equal(words, self.min_words)
        kept, dropped = queries.filter(keep), queries.filter(pc.invert(keep))
        job.write("queries", kept)
        job.write("rejects", short_query_rejects(dropped, self.min_words))
        return Outcome(rows_out=kept.num_rows, rejected=dropped.num_rows)


def short_query_rejects(dropped: pa.Table, min_words: int) -> pa.Table:
    n = dropped.num_rows
    return pa.table(
        {
            "stage": ["short_queries"] * n,
            "source": dropped["query_id"],
            "row": pa.nulls(n, pa.int64()),
            "reason": ["short_query"] * n,
            "detail": [f"fewer than {min_words} words"] * n,
            "raw": dropped["query"],
        },
        schema=REJECTS,
    )


# ------------------------------------------------------------------------------------------------


def test_a_new_filter_stage_runs_in_the_pipeline_and_resumes(tmp_path):
    rows = sample_rows(30)
    pairs = [{"query": "json", "positive": rows[1]["text"]}]  # one word: dropped
    pairs += [{"query": f"how do I use {r['title']}", "positive": r["text"]} for r in rows[2:8]]
    cfg = tiny_config(
        tmp_path,
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        input={"mode": "pairs", "title_column": None},
        mining={"num_negatives": 2, "max_rank": 10},
    )
    stages = stages_for(cfg)
    stages.insert([s.name for s in stages].index("pairs") + 1, ShortQueryFilter())
    run_dir, doc = run_local(cfg, stages=stages)
    counts = doc["stages"]["short_queries"]
    assert (counts["rows_in"], counts["rows_out"], counts["rejected"]) == (7, 6, 1)
    assert doc["reject_reasons"]["short_queries"] == {"short_query": 1}
    # later stages read the filtered queries
    assert doc["stages"]["query_dedup"]["rows_in"] == 6
    assert doc["stages"]["mine"]["rows_in"] == 6 - doc["stages"]["query_dedup"]["deduplicated"]
    assert (run_dir / "rejects" / "short_queries-00000.parquet").exists()
    _, again = run_local(cfg, stages=stages)
    assert all(s["skipped_shards"] >= 1 for s in again["stages"].values())
    assert again["model_calls"] == {}  # nothing embedded twice
