"""Query quality and SimANS sampling in a real pairs-mode run (real MiniLM, the real stages):
a planted near-duplicate query is removed, a query that copies its positive is `too_easy`, a
query many passages answer as well as its positive is `too_generic`, each with a reason and a
count in the manifest, and SimANS draws the mined negatives scoring about the positive.
The rules' boundaries are tested on crafted scores in test_mine.py and test_query_dedup.py."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.mine import select_negatives
from tests.conftest import pairs_mode_config
from tests.helpers import sample_rows

pytestmark = pytest.mark.slow

DUPLICATE = "what does the json.dump function do"  # cosine 0.97 to "what does json.dump do"
TOO_EASY_MARGIN = 0.45
TOO_GENERIC_COUNT = 15
SIMANS_A = 100.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from flows.build import run_local
    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    tmp = tmp_path_factory.mktemp("query_quality")
    rows = sample_rows(80)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:16]]
    pairs += [
        {"query": DUPLICATE, "positive": rows[1]["text"]},
        # the first 100 characters of its own positive: it scores 0.84, the best other 0.25
        {"query": rows[6]["text"][:100], "positive": rows[6]["text"]},
        # a phrase that fits most of the corpus better than its positive (os)
        {"query": "a module of Python", "positive": rows[5]["text"]},
    ]
    corpus = [{"text": r["text"]} for r in rows[16:]]
    cfg = pairs_mode_config(
        tmp,
        pairs,
        corpus,
        mining={
            "num_negatives": 3,
            "max_rank": 20,
            "sampling_strategy": "simans",
            "simans_a": SIMANS_A,
        },
        queries={"too_easy_margin": TOO_EASY_MARGIN, "too_generic_count": TOO_GENERIC_COUNT},
        output={"shard_size": 64},
    )
    embedder = Embedder(
        str(minilm_path()), "all-MiniLM-L6-v2", "cpu", 2, resolve_precision("auto", "cpu")
    )
    run_dir, doc = run_local(cfg, embedder=embedder)
    tables = {
        name: pl.read_parquet(run_dir / name / "*.parquet")
        for name in ("queries", "query_duplicates", "candidates", "rejects")
    }
    return cfg, doc, tables, rows


def _text(tables, ids) -> set[str]:
    q = tables["queries"]
    return set(q.filter(pl.col("query_id").is_in(list(ids)))["query"])


def test_a_near_duplicate_query_is_removed_and_counted(run):
    cfg, doc, tables, _ = run
    dups = tables["query_duplicates"]
    removed = dups.select("query_id", "duplicate_of").rows()
    pairs = [(_text(tables, [a]).pop(), _text(tables, [b]).pop()) for a, b in removed]
    # one of the two json.dump questions goes, the other stays (which one is a stable choice)
    assert any({a, b} == {DUPLICATE, "what does json.dump do"} for a, b in pairs), pairs
    assert (dups["similarity"] >= cfg.queries.dedup_threshold).all()
    # near-identical questions about different functions (cosine 0.94) are both kept
    kept = _text(tables, tables["candidates"].filter(pl.col("kept"))["query_id"].unique())
    assert {"what does shutil.copy do", "what does shutil.copy2 do"} <= kept
    counts = doc["stages"]["query_dedup"]
    assert counts["deduplicated"] == dups.height and counts["rows_in"] == 19
    assert doc["stages"]["mine"]["rows_in"] == 19 - dups.height
    assert not set(dups["query_id"]) & set(tables["candidates"]["query_id"])


def test_too_easy_and_too_generic_queries_are_rejected_with_reasons(run):
    cfg, doc, tables, rows = run
    rejects = tables["rejects"].filter(pl.col("stage") == "mine")
    by_reason = {
        reason: _text(tables, group["source"]) for (reason,), group in rejects.group_by("reason")
    }
    assert by_reason.get("too_easy") == {rows[6]["text"][:100]}, rejects
    assert "a module of Python" in by_reason.get("too_generic", set()), rejects
    assert set(by_reason) <= {"too_easy", "too_generic"}, rejects
    # what the rules read, checked on the run's own candidates
    cands = tables["candidates"].filter(pl.col("origin") == "mined", pl.col("rank").is_not_null())
    per_query = cands.group_by("query_id").agg(
        (pl.col("positive_score").first() - pl.col("score").max()).alias("margin"),
        (pl.col("score") >= cfg.queries.too_generic_ratio * pl.col("positive_score"))
        .sum()
        .alias("similar"),
    )
    rejected = dict(rejects.select("source", "reason").iter_rows())
    for qid, margin, similar in per_query.iter_rows():
        expected = (
            "too_easy"
            if margin > TOO_EASY_MARGIN
            else "too_generic"
            if similar >= TOO_GENERIC_COUNT
            else None
        )
        assert rejected.get(qid) == expected, (qid, margin, similar)
    # a rejected query keeps no negative and reaches no triplet; the manifest counts each reason
    assert not tables["candidates"].filter(pl.col("query_id").is_in(list(rejected)))["kept"].any()
    assert doc["reject_reasons"]["mine"] == {r: len(ids) for r, ids in by_reason.items()}
    mine = doc["stages"]["mine"]
    assert mine["rows_in"] == mine["rows_out"] + mine["rejected"] + mine["deduplicated"]


def test_simans_keeps_mined_negatives_scoring_about_the_positive(run):
    cfg, _, tables, _ = run
    cands = tables["candidates"].filter(pl.col("origin") == "mined")
    # survivors: every candidate no rule removed, before the draw took num_negatives of them
    pool = cands.filter(
        pl.col("reason").is_null() | (pl.col("reason") == "beyond_num_negatives")
    ).with_columns((pl.col("score") - pl.col("positive_score")).abs().alias("gap"))
    kept = pool.filter(pl.col("kept"))
    per_query = kept.group_by("query_id").len()["len"]
    assert kept.height > 30 and (per_query == cfg.mining.num_negatives).all()
    unset = pool.with_columns(pl.lit(None, dtype=pl.String).alias("reason"))

    def drawn(strategy: str) -> set[tuple[str, str]]:
        other = cfg.mining.model_copy(update={"sampling_strategy": strategy})
        picked = select_negatives(unset, other).filter(pl.col("kept"))
        return set(picked.select("query_id", "passage_id").iter_rows())

    def mean_gap(pairs: set[tuple[str, str]]) -> float:
        keys = pl.DataFrame(list(pairs), schema=["query_id", "passage_id"], orient="row")
        return float(pool.join(keys, on=["query_id", "passage_id"])["gap"].mean())

    # the draw is SimANS's, seeded: the stage's choice is select_negatives' on its survivors
    simans = set(kept.select("query_id", "passage_id").iter_rows())
    assert drawn("simans") == simans
    # it prefers candidates scoring about the positive: a uniform draw from the same survivors
    # lands farther from the positive's score (0.19 vs 0.12 here); the hardest are another set
    assert mean_gap(simans) < 0.75 * mean_gap(drawn("random"))
    assert drawn("top") != simans
