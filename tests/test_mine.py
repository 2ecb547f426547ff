"""Semantics of every mining rule, on crafted embeddings whose scores are known exactly."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from schemas.config import MiningConfig, QueryFilterConfig
from schemas.tables import CANDIDATES, CLUSTERS
from tasks.mine import label_candidates, mine_negatives
from tasks.search import exact_topk


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def corpus_with_scores(scores: list[float]) -> np.ndarray:
    """Unit vectors whose inner product with the query e0 equals each given score."""
    rows = []
    for s in scores:
        rows.append([s, np.sqrt(max(0.0, 1 - s * s)), 0.0])
    return np.asarray(rows, dtype=np.float32)


QUERY = np.asarray([[1.0, 0.0, 0.0]], dtype=np.float32)


def clusters_table(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "passage_id": p,
                "cluster_id": c,
                "kind": "exact",
                "similarity": 1.0,
                "is_canonical": p == c,
                "source": "f",
                "row": i,
            }
            for i, (p, c) in enumerate(rows)
        ],
        schema=CLUSTERS,
    )


def mine(scores, cfg, clusters=None, positive="pos", texts=None, **kw):
    ids = ["pos"] + [f"n{i}" for i in range(len(scores) - 1)]
    queries = pa.table({"query_id": ["q"], "passage_id": [positive]})
    result = mine_negatives(
        queries,
        QUERY,
        ids,
        corpus_with_scores(scores),
        clusters if clusters is not None else CLUSTERS.empty_table(),
        cfg,
        texts,
        **kw,
    )
    assert result.candidates.schema.equals(CANDIDATES)
    df = pl.from_arrow(result.candidates)
    return df, result


def kept_ids(df: pl.DataFrame) -> list[str]:
    return df.filter(pl.col("kept")).sort("rank")["passage_id"].to_list()


def reason_of(df: pl.DataFrame, pid: str) -> str | None:
    return df.filter(pl.col("passage_id") == pid)["reason"].item()


def test_positive_aware_ratio_boundary():
    # positive score 0.8; threshold 0.95 * 0.8 = 0.76: a negative at exactly 0.76 is removed.
    df, _ = mine(
        [0.8, 0.9, 0.76, 0.7599, 0.5], MiningConfig(num_negatives=5, max_positive_ratio=0.95)
    )
    assert reason_of(df, "pos") == "is_positive"
    assert (
        reason_of(df, "n0") == "above_positive_ratio"
    )  # scores above the positive: false negative
    assert reason_of(df, "n1") == "above_positive_ratio"  # exactly at the threshold
    assert kept_ids(df) == ["n2", "n3"]


def test_ratio_disabled_keeps_candidates_scoring_above_positive():
    df, _ = mine([0.8, 0.9, 0.5], MiningConfig(num_negatives=5, max_positive_ratio=None))
    assert kept_ids(df) == ["n0", "n1"]


def test_margin_and_max_score():
    cfg = MiningConfig(num_negatives=5, max_positive_ratio=None, margin=0.1)
    df, _ = mine([0.8, 0.75, 0.7, 0.69], cfg)
    assert reason_of(df, "n0") == "within_margin"
    assert kept_ids(df) == ["n1", "n2"]  # 0.7 is exactly positive - margin: kept
    cfg = MiningConfig(num_negatives=5, max_positive_ratio=None, max_score=0.6)
    df, _ = mine([0.8, 0.7, 0.6, 0.5], cfg)
    assert reason_of(df, "n0") == "above_max_score"
    assert kept_ids(df) == ["n1", "n2"]


def test_rank_range_counts_after_excluding_positive_and_duplicates():
    cfg = MiningConfig(num_negatives=5, min_rank=1, max_rank=3, max_positive_ratio=None)
    df, _ = mine([0.99, 0.9, 0.8, 0.7, 0.6], cfg)
    ranks = dict(zip(df["passage_id"], df["rank"], strict=True))
    assert ranks["pos"] is None and ranks["n0"] == 0 and ranks["n3"] == 3
    assert reason_of(df, "n0") == "outside_rank_range"
    assert reason_of(df, "n3") == "outside_rank_range"
    assert kept_ids(df) == ["n1", "n2"]


WORDS = [f"w{i}" for i in range(40)]
POSITIVE = " ".join(WORDS)
COPY = " ".join(WORDS[:-1] + ["changed"])  # one word at the end: Jaccard 37/39 = 0.95
SIBLING = " ".join(
    w if i not in (8, 20, 32) else "other" for i, w in enumerate(WORDS)
)  # three words in the middle: Jaccard 29/47 = 0.62
TEXTS = {"pos": POSITIVE, "n1": COPY, "n2": SIBLING}


def test_copy_of_positive_is_excluded_but_a_looser_sibling_is_kept():
    clusters = clusters_table([("pos", "pos"), ("n1", "pos"), ("n2", "pos")])
    cfg = MiningConfig(num_negatives=5, max_positive_ratio=None, duplicate_similarity=0.9)
    df, _ = mine([0.9, 0.8, 0.85, 0.7, 0.5], cfg, clusters, texts=TEXTS)
    sims = dict(zip(df["passage_id"], df["cluster_similarity"], strict=True))
    assert sims["n1"] == pytest.approx(37 / 39) and sims["n2"] == pytest.approx(29 / 47)
    assert sims["n0"] is None and sims["n3"] is None  # not siblings of the positive
    assert reason_of(df, "n1") == "duplicate_of_positive"
    assert kept_ids(df) == ["n0", "n2", "n3"]
    # the boundary is inclusive: similarity == duplicate_similarity is a copy
    cfg = MiningConfig(num_negatives=5, max_positive_ratio=None, duplicate_similarity=29 / 47)
    df, _ = mine([0.9, 0.8, 0.85, 0.7, 0.5], cfg, clusters, texts=TEXTS)
    assert reason_of(df, "n2") == "duplicate_of_positive"
    # with the exclusion switched off the copy comes back
    cfg = MiningConfig(num_negatives=5, max_positive_ratio=None, exclude_duplicate_clusters=False)
    df, _ = mine([0.9, 0.8, 0.85, 0.7, 0.5], cfg, clusters, texts=TEXTS)
    assert kept_ids(df) == ["n1", "n0", "n2", "n3"]


def test_clustered_passages_need_their_texts():
    clusters = clusters_table([("pos", "pos"), ("n1", "pos")])
    with pytest.raises(ValueError, match="no text for clustered passages"):
        mine([0.9, 0.8, 0.5], MiningConfig(), clusters)


def test_num_negatives_keeps_the_hardest_and_too_few_is_rejected():
    df, result = mine([0.9, 0.5, 0.6, 0.4], MiningConfig(num_negatives=2))
    assert kept_ids(df) == ["n1", "n0"]
    assert reason_of(df, "n2") == "beyond_num_negatives"
    assert result.queries_kept == 1 and result.rejects.num_rows == 0
    df, result = mine([0.5, 0.9, 0.8], MiningConfig(num_negatives=2, min_negatives=1))
    assert kept_ids(df) == []
    assert result.queries_kept == 0
    assert result.rejects.column("reason").to_pylist() == ["too_few_negatives"]


def test_positive_missing_from_corpus_is_an_error():
    with pytest.raises(ValueError, match="not in the corpus"):
        mine([0.9, 0.5], MiningConfig(), positive="elsewhere")


@settings(max_examples=40, deadline=None)
@given(
    arrays(
        np.float32, st.tuples(st.integers(1, 6), st.just(4)), elements=st.floats(-1, 1, width=32)
    ),
    arrays(
        np.float32, st.tuples(st.integers(1, 30), st.just(4)), elements=st.floats(-1, 1, width=32)
    ),
    st.integers(1, 40),
)
def test_exact_topk_matches_brute_force(queries, corpus, k):
    idx, scores = exact_topk(queries, corpus, k)
    sims = queries @ corpus.T
    kk = min(k, corpus.shape[0])
    expected = -np.sort(-sims, axis=1)[:, :kk]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, idx, axis=1), scores, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=2, max_size=25),
    st.floats(0.5, 1.2),
    st.integers(1, 6),
)
def test_property_kept_negatives_respect_every_filter(scores, ratio, n):
    cfg = MiningConfig(num_negatives=n, max_positive_ratio=ratio, max_rank=20)
    cands = pl.DataFrame(
        {
            "query_id": ["q"] * len(scores),
            "positive_id": ["p0"] * len(scores),
            "passage_id": [f"p{i}" for i in range(len(scores))],
            "score": scores,
            "positive_score": [scores[0]] * len(scores),
        },
        schema_overrides={"score": pl.Float32, "positive_score": pl.Float32},
    )
    clusters = pl.DataFrame(schema={"passage_id": pl.String, "cluster_id": pl.String})
    df = label_candidates(cands, clusters, cfg)
    kept = df.filter(pl.col("kept"))
    assert kept.height <= n
    assert "p0" not in kept["passage_id"].to_list()
    assert (kept["score"] < ratio * kept["positive_score"]).all()
    assert (kept["rank"] < cfg.max_rank).all()
    # every removed candidate says why; every kept one has no reason
    assert df.filter(~pl.col("kept"))["reason"].null_count() == 0
    assert kept["reason"].null_count() == kept.height
    # the kept ones are the highest-scoring of those that passed every filter
    passed_over = df.filter(pl.col("reason") == "beyond_num_negatives")
    if passed_over.height:
        assert kept.height == n
        assert kept["score"].min() >= passed_over["score"].max()


def test_random_sampling_draws_from_survivors_reproducibly():
    scores = [0.95] + [0.9 - 0.02 * i for i in range(20)]
    top, _ = mine(scores, MiningConfig(num_negatives=4, max_positive_ratio=None))
    cfg = MiningConfig(num_negatives=4, max_positive_ratio=None, sampling_strategy="random", seed=1)
    drawn, _ = mine(scores, cfg)
    again, _ = mine(scores, cfg)
    other, _ = mine(scores, cfg.model_copy(update={"seed": 2}))
    assert len(kept_ids(drawn)) == 4 and kept_ids(drawn) == kept_ids(again)
    assert kept_ids(drawn) != kept_ids(top) or kept_ids(other) != kept_ids(top)
    assert kept_ids(drawn) != kept_ids(other)
    # a random draw still respects every filter
    cfg = MiningConfig(num_negatives=4, max_rank=6, sampling_strategy="random")
    drawn, _ = mine(scores, cfg)
    assert (drawn.filter(pl.col("kept"))["rank"] < 6).all()


# SimANS: positive at 0.6, candidates evenly from 0.95 down to 0.15 (the ratio rule off, so
# candidates above the positive compete too)
SPREAD = [0.6] + [round(0.95 - 0.02 * i, 2) for i in range(41)]


def _kept_scores(cfg: MiningConfig, seeds=range(20)) -> np.ndarray:
    out = []
    for seed in seeds:
        df, _ = mine(SPREAD, cfg.model_copy(update={"seed": seed}))
        out.extend(df.filter(pl.col("kept"))["score"].to_list())
    return np.asarray(out)


def test_simans_draws_negatives_scoring_about_the_positive():
    base = dict(num_negatives=4, max_rank=60, max_positive_ratio=None)
    simans = _kept_scores(MiningConfig(sampling_strategy="simans", simans_a=100.0, **base))
    random_ = _kept_scores(MiningConfig(sampling_strategy="random", **base))
    top = _kept_scores(MiningConfig(sampling_strategy="top", **base))
    gap = {
        name: float(np.abs(s - 0.6).mean())
        for name, s in {"simans": simans, "random": random_, "top": top}.items()
    }
    assert len(simans) == 80
    # top takes the 4 highest (0.95 .. 0.89), random spreads over all 41, SimANS centres on 0.6
    assert gap["top"] == pytest.approx(0.32, abs=0.01)
    assert gap["simans"] < 0.1 and gap["simans"] < gap["random"] / 2, gap
    # far easier and suspiciously higher candidates alike are rare
    assert (np.abs(simans - 0.6) > 0.25).mean() < 0.05
    assert (simans > 0.6).mean() == pytest.approx(0.5, abs=0.2)


def test_simans_b_moves_the_centre_and_a_sharpens_it():
    base = dict(num_negatives=4, max_rank=60, max_positive_ratio=None, sampling_strategy="simans")
    lower = _kept_scores(MiningConfig(simans_b=-0.3, simans_a=100.0, **base))
    assert float(np.median(lower)) == pytest.approx(0.3, abs=0.06)
    sharp = _kept_scores(MiningConfig(simans_a=300.0, **base))
    loose = _kept_scores(MiningConfig(simans_a=3.0, **base))
    assert np.abs(sharp - 0.6).mean() < np.abs(loose - 0.6).mean() / 2


def test_simans_is_seeded_and_respects_every_filter():
    cfg = MiningConfig(num_negatives=4, max_rank=60, sampling_strategy="simans", seed=3)
    drawn, _ = mine(SPREAD, cfg)
    again, _ = mine(SPREAD, cfg)
    other, _ = mine(SPREAD, cfg.model_copy(update={"seed": 4}))
    assert kept_ids(drawn) == kept_ids(again) and kept_ids(drawn) != kept_ids(other)
    kept = drawn.filter(pl.col("kept"))
    assert kept.height == 4
    # the default ratio rule (1.3 x 0.6 = 0.78) still applies before the draw
    assert kept["score"].max() < 0.78
    above = drawn.filter(pl.col("score") >= 0.78 + 1e-6)
    assert set(above["reason"]) == {"above_positive_ratio"}


@pytest.mark.parametrize("margin,rejected", [(0.35, True), (0.45, False)])
def test_too_easy_query_boundary(margin, rejected):
    """The positive (0.9) wins by 0.4 over the best candidate (0.5)."""
    cfg = MiningConfig(num_negatives=2, max_positive_ratio=None)
    df, result = mine(
        [0.9, 0.5, 0.4, 0.3], cfg, query_filters=QueryFilterConfig(too_easy_margin=margin)
    )
    rejects = result.rejects.to_pylist()
    if rejected:
        assert [(r["source"], r["reason"]) for r in rejects] == [("q", "too_easy")]
        assert "above the best candidate 0.5" in rejects[0]["detail"]
        assert not df["kept"].any() and result.queries_kept == 0
        assert set(df.filter(pl.col("origin") == "mined")["reason"].drop_nulls()) >= {"too_easy"}
    else:
        assert rejects == [] and kept_ids(df) == ["n0", "n1"]


@pytest.mark.parametrize("count,rejected", [(3, True), (4, False)])
def test_too_generic_query_boundary(count, rejected):
    """Three candidates score >= 0.95 x the positive (0.8 -> 0.76); the fourth does not."""
    cfg = MiningConfig(num_negatives=2, max_positive_ratio=None)
    filters = QueryFilterConfig(too_generic_count=count, too_generic_ratio=0.95)
    df, result = mine([0.8, 0.79, 0.78, 0.77, 0.75, 0.3], cfg, query_filters=filters)
    rejects = result.rejects.to_pylist()
    if rejected:
        assert [r["reason"] for r in rejects] == ["too_generic"]
        assert rejects[0]["detail"].startswith("3 passages score >= 0.95")
        assert not df["kept"].any()
    else:
        assert rejects == [] and len(kept_ids(df)) == 2


def test_ann_search_agrees_with_exact_search():
    from tasks.search import ann_topk

    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(2000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_idx, exact_scores = exact_topk(queries, corpus, 10)
    ann_idx, ann_scores = ann_topk(queries, corpus, 10, ef_search=256)
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann_idx, exact_idx, strict=True)])
    assert overlap >= 0.95
    assert (ann_idx[:, 0] == exact_idx[:, 0]).all()
    np.testing.assert_allclose(ann_scores[:, 0], exact_scores[:, 0], rtol=1e-5)


def test_search_mode_switches_at_the_corpus_size_threshold():
    from tasks.mine import use_ann

    cfg = MiningConfig(ann_min_corpus=100)
    assert not use_ann(cfg, 99) and use_ann(cfg, 100)
    assert use_ann(MiningConfig(search="ann"), 5) and not use_ann(
        MiningConfig(search="exact"), 10**9
    )
    # the whole stage through the ANN path gives the same negatives on a small input
    exact, _ = mine([0.8, 0.7, 0.6, 0.5, 0.4], MiningConfig(num_negatives=3, search="exact"))
    ann, _ = mine([0.8, 0.7, 0.6, 0.5, 0.4], MiningConfig(num_negatives=3, search="ann"))
    assert kept_ids(exact) == kept_ids(ann)


def test_a_rejected_query_keeps_no_negatives():
    # one survivor but min_negatives=2: the query is rejected and nothing of it is kept
    cfg = MiningConfig(num_negatives=3, min_negatives=2, max_rank=1, max_positive_ratio=None)
    df, result = mine([0.9, 0.5, 0.4], cfg)
    assert result.queries_kept == 0 and result.rejects.num_rows == 1
    assert not df["kept"].any()
    assert reason_of(df, "n0") == "too_few_negatives"


def test_removed_copies_do_not_widen_the_search():
    # a cluster of 50 copies that dedup removed (not in the corpus) must not raise k
    clusters = clusters_table([("pos", "pos")] + [(f"gone{i}", "pos") for i in range(50)])
    df, _ = mine(
        [0.9] + [0.5 - 0.01 * i for i in range(30)],
        MiningConfig(max_rank=5),
        clusters,
        texts={"pos": "x"},
    )
    assert df.height <= 5 + 1 + 1


def test_other_known_positives_of_the_query_text_are_never_negatives():
    ids = ["pos"] + [f"n{i}" for i in range(4)]
    queries = pa.table({"query_id": ["q"], "passage_id": ["pos"], "query": ["what is x"]})
    known = pl.DataFrame(
        {"query": ["what is x", "what is x", "other"], "passage_id": ["pos", "n1", "n2"]}
    )
    result = mine_negatives(
        queries,
        QUERY,
        ids,
        corpus_with_scores([0.9, 0.5, 0.45, 0.4, 0.3]),
        CLUSTERS.empty_table(),
        MiningConfig(max_positive_ratio=None),
        known_positives=known,
    )
    df = pl.from_arrow(result.candidates)
    assert reason_of(df, "n1") == "other_positive"  # a positive of the same query text
    assert reason_of(df, "n2") is None  # a positive of another query is a fine negative
    assert kept_ids(df) == ["n0", "n2", "n3"]


@pytest.mark.parametrize("threshold,removed", [(0.95, True), (0.9968, True), (0.9969, False)])
def test_semantic_duplicate_of_positive_boundary(threshold, removed):
    # positive [0.8, 0.6, 0]; n0 = [0.75, 0.6614, 0] has cosine 0.99686 to it, n1 0.92
    ids = ["pos", "n0", "n1"]
    corpus = np.asarray(
        [[0.8, 0.6, 0], [0.75, np.sqrt(1 - 0.75**2), 0], [0.5, np.sqrt(0.75), 0]], np.float32
    )
    result = mine_negatives(
        pa.table({"query_id": ["q"], "passage_id": ["pos"]}),
        QUERY,
        ids,
        corpus,
        CLUSTERS.empty_table(),
        MiningConfig(max_positive_ratio=None),
        semantic_threshold=threshold,
    )
    df = pl.from_arrow(result.candidates)
    assert (reason_of(df, "n0") == "semantic_duplicate_of_positive") is removed
    assert reason_of(df, "n1") is None


def test_a_rescorer_replaces_scores_and_the_filters_use_them():
    # embedder order: n0 (0.7) > n1 (0.6) > n2 (0.5); the rescorer reverses it and scores
    # the positive 1.0, so with ratio 0.95 only n2's rescored 0.96 is above 0.95 * 1.0
    texts = {"pos": "P", "n0": "a", "n1": "bb", "n2": "ccc"}
    rescored = {"P": 1.0, "a": 0.2, "bb": 0.5, "ccc": 0.96}
    calls = []

    def rescore(queries, passages):
        calls.append((queries, passages))
        return np.asarray([rescored[p] for p in passages], dtype=np.float32)

    result = mine_negatives(
        pa.table({"query_id": ["q"], "passage_id": ["pos"], "query": ["what"]}),
        QUERY,
        ["pos", "n0", "n1", "n2"],
        corpus_with_scores([0.8, 0.7, 0.6, 0.5]),
        CLUSTERS.empty_table(),
        MiningConfig(num_negatives=3, max_positive_ratio=0.95),
        rescore=(rescore, lambda ids: {i: texts[i] for i in ids}),
    )
    df = pl.from_arrow(result.candidates)
    assert set(calls[0][0]) == {"what"} and sorted(calls[0][1]) == ["P", "a", "bb", "ccc"]
    assert df["positive_score"].unique().to_list() == [1.0]
    assert reason_of(df, "n2") == "above_positive_ratio"
    assert kept_ids(df) == ["n1", "n0"]  # ranked by the rescored score
    row = df.filter(pl.col("passage_id") == "n0")
    assert row["score"].item() == pytest.approx(0.2) and row[
        "retrieval_score"
    ].item() == pytest.approx(0.7)


def test_passages_of_the_positives_own_document_are_never_its_negatives():
    # n0 and n1 were cut from the positive's page, n2 from another page, n3 from none; the
    # rank window (max_rank 2) is counted after them, so two negatives from other pages remain
    ids = ["pos"] + [f"n{i}" for i in range(5)]
    documents = pl.DataFrame(
        {
            "passage_id": ["pos", "n0", "n1", "n2", "n3", "n4"],
            "document_id": ["page-a", "page-a", "page-a", "page-b", None, "page-b"],
        }
    )
    cfg = MiningConfig(max_positive_ratio=None, max_rank=2, num_negatives=2)
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    queries = pa.table({"query_id": ["q"], "passage_id": ["pos"]})
    args = (queries, QUERY, ids, corpus_with_scores(scores), CLUSTERS.empty_table(), cfg)
    df = pl.from_arrow(mine_negatives(*args, documents=documents).candidates)
    assert reason_of(df, "n0") == reason_of(df, "n1") == "same_document"
    assert kept_ids(df) == ["n2", "n3"]
    assert df.filter(pl.col("passage_id") == "n2")["rank"].item() == 0
    # without documents the same corpus gives the positive's own page as its hardest negatives
    plain = pl.from_arrow(mine_negatives(*args).candidates)
    assert kept_ids(plain) == ["n0", "n1"]
