"""Hard negatives: retrieve candidates for each query, pass every candidate — mined from the
corpus or written by the LLM — through one false-negative gate, keep the best survivors.

`retrieve_candidates` finds the most similar corpus passages (inner product over L2-normalized
embeddings, `tasks.search`). Passages the LLM wrote for a query (`generated`) join as candidates
scored the same way. `mine_negatives` then decides, for every candidate, whether it is kept and,
if not, the first rule that removed it (`schemas.reasons`). Each rule is its own small function;
they apply in this order, to both origins unless said otherwise:

    is_positive, other_positive (a known positive of the same query text, or of a near-identical
      query), duplicate_of_positive (in the positive's duplicate cluster with shingle Jaccard
      >= duplicate_similarity; a written passage measured against the positive directly),
      semantic_duplicate_of_positive (embedding cosine to the positive, with semantic dedup),
      same_document (cut from the positive's own document, with `input.document_column`)
    -> rank among the mined rest -> outside_rank_range (mined only)
    -> above_positive_ratio, within_margin, above_max_score
    -> on what is left, text rules: duplicate_of_positive (the positive's words in any order:
      a reordered copy), copies_query (the query's words make up most of the passage)
    -> query rules: failed_consistency, too_easy, too_generic (the query is rejected)
    -> the LLM judge (optional): relabeled_positive | answers_query | judged_unsure
    -> beyond_num_negatives (mined: `num_negatives` by `sampling_strategy`; written: each kept)
    -> too_few_negatives (the query is rejected)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas import reasons as R
from schemas.config import JudgeConfig, MiningConfig, PipelineConfig, QueryFilterConfig
from schemas.tables import CANDIDATES, REJECTS
from tasks.embedder import table_to_matrix
from tasks.io import ids_in
from tasks.search import topk
from tasks.stage import Job, Outcome, Stage, reason_counts
from tasks.text import jaccard, query_word_share, shingle_sets, stable_hash64, word_overlap

STAGE = "mine"
RELABELED = R.RELABELED
TextLookup = Callable[[list[str]], dict[str, str]]


@dataclass
class MiningResult:
    candidates: pa.Table  # every candidate with kept/reason
    rejects: pa.Table  # queries rejected (failed_consistency, too_easy, ..., too_few_negatives)
    queries_kept: int
    judge_stats: dict[str, Any] = field(default_factory=dict)


def use_ann(cfg: MiningConfig, corpus_size: int) -> bool:
    return cfg.search == "ann" or (cfg.search == "auto" and corpus_size >= cfg.ann_min_corpus)


def retrieve_candidates(
    query_ids: list[str],
    positive_ids: list[str],
    query_vectors: np.ndarray,
    corpus_ids: list[str],
    corpus_vectors: np.ndarray,
    k: int,
    ann: bool = False,
    ef_search: int = 128,
    positive_similarity: bool = False,
) -> pl.DataFrame:
    """Long table (query_id, positive_id, passage_id, score, positive_score), best first.

    The positive's own score is computed directly, so it is known even when the positive is not
    among the top k. With `positive_similarity`, each candidate's cosine to the positive is
    added too (for the semantic-duplicate rule).
    """
    row_of = {pid: i for i, pid in enumerate(corpus_ids)}
    missing = [p for p in positive_ids if p not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} positives are not in the corpus, e.g. {missing[0]}")
    idx, scores = topk(query_vectors, corpus_vectors, k, ann, ef_search)
    valid = idx >= 0  # HNSW pads with -1 when it finds fewer than k
    idx = np.where(valid, idx, 0)
    pos_rows = np.array([row_of[p] for p in positive_ids], dtype=np.int64)
    pos_scores = np.einsum("ij,ij->i", query_vectors, corpus_vectors[pos_rows]).astype(np.float32)
    kk = idx.shape[1]
    corpus_arr = np.asarray(corpus_ids, dtype=object)
    frame = pl.DataFrame(
        {
            "query_id": np.repeat(np.asarray(query_ids, dtype=object), kk),
            "positive_id": np.repeat(np.asarray(positive_ids, dtype=object), kk),
            "passage_id": corpus_arr[idx.reshape(-1)],
            "score": scores.reshape(-1),
            "positive_score": np.repeat(pos_scores, kk),
        },
        schema={
            "query_id": pl.String,
            "positive_id": pl.String,
            "passage_id": pl.String,
            "score": pl.Float32,
            "positive_score": pl.Float32,
        },
    )
    if positive_similarity:
        cand_vecs = corpus_vectors[idx.reshape(-1)]
        pos_vecs = np.repeat(corpus_vectors[pos_rows], kk, axis=0)
        sims = np.einsum("ij,ij->i", cand_vecs, pos_vecs).astype(np.float32)
        frame = frame.with_columns(pl.Series("positive_similarity", sims, dtype=pl.Float32))
    return frame.filter(pl.Series(valid.reshape(-1)))


def generated_candidates(
    generated: pa.Table,
    generated_vectors: np.ndarray,
    query_ids: list[str],
    query_vectors: np.ndarray,
    positive_ids: list[str],
    corpus_ids: list[str],
    corpus_vectors: np.ndarray,
) -> pl.DataFrame:
    """Passages the LLM wrote for these queries, scored against their query like mined ones,
    with the query's positive and its score, the cosine to the positive and the written grade."""
    row_of = {q: i for i, q in enumerate(query_ids)}
    gen = pl.from_arrow(generated.select(["query_id", "passage_id", "grade"])).filter(
        pl.col("query_id").is_in(pl.Series(query_ids, dtype=pl.String).implode())
    )
    if gen.is_empty():
        return gen
    gen_row = {p: i for i, p in enumerate(generated.column("passage_id").to_pylist())}
    corpus_row = {p: i for i, p in enumerate(corpus_ids)}
    q_rows = np.array([row_of[q] for q in gen["query_id"]], dtype=np.int64)
    g_rows = np.array([gen_row[p] for p in gen["passage_id"]], dtype=np.int64)
    p_rows = np.array([corpus_row[positive_ids[r]] for r in q_rows], dtype=np.int64)
    qv, gv, pv = query_vectors[q_rows], generated_vectors[g_rows], corpus_vectors[p_rows]
    return gen.with_columns(
        pl.Series("positive_id", [positive_ids[r] for r in q_rows], dtype=pl.String),
        pl.Series("score", np.einsum("ij,ij->i", qv, gv).astype(np.float32)),
        pl.Series("positive_score", np.einsum("ij,ij->i", qv, pv).astype(np.float32)),
        pl.Series("positive_similarity", np.einsum("ij,ij->i", gv, pv).astype(np.float32)),
    )


# --- rules: each returns a boolean expression, True where the candidate is removed ---------------

MINED = pl.col("origin") == "mined"


def rule_is_positive() -> pl.Expr:
    return pl.col("passage_id") == pl.col("positive_id")


def rule_duplicate_of_positive(min_similarity: float) -> pl.Expr:
    """A copy of the positive: in its duplicate cluster (or written for it) with shingle Jaccard
    >= min_similarity. Looser siblings in the same cluster are not copies and stay eligible."""
    return pl.col("cluster_similarity") >= min_similarity


def rule_outside_rank_range(min_rank: int, max_rank: int) -> pl.Expr:
    return MINED & ((pl.col("rank") < min_rank) | (pl.col("rank") >= max_rank))


def rule_above_positive_ratio(ratio: float | None) -> pl.Expr | None:
    """NV-Retriever's TopK-PercPos: keep only score < ratio * positive_score."""
    if ratio is None:
        return None
    return pl.col("score") >= ratio * pl.col("positive_score")


def rule_within_margin(margin: float | None) -> pl.Expr | None:
    """Absolute margin: keep only score <= positive_score - margin."""
    if margin is None:
        return None
    return pl.col("score") > pl.col("positive_score") - margin


def rule_above_max_score(max_score: float | None) -> pl.Expr | None:
    if max_score is None:
        return None
    return pl.col("score") > max_score


def rule_reordered_copy(min_overlap: float) -> pl.Expr:
    """The positive's words in any order (multiset Jaccard), e.g. its sentences shuffled."""
    return pl.col("_word_overlap") >= min_overlap


def rule_copies_query(max_share: float | None) -> pl.Expr | None:
    """The query's words make up at least `max_share` of the passage: it restates the query
    rather than answering or missing it ("How to create a new text section ... Summary: 2 min")."""
    if max_share is None:
        return None
    return pl.col("_query_share") >= max_share


def _first_reason(rules: list[tuple[str, pl.Expr | None]]) -> pl.Expr:
    """The name of the first rule that fires, else null. A null comparison never fires."""
    expr = pl.lit(None, dtype=pl.String)
    for name, rule in reversed(rules):
        if rule is not None:
            expr = pl.when(rule.fill_null(False)).then(pl.lit(name)).otherwise(expr)
    return expr


def _set_reason(df: pl.DataFrame, reason: pl.Expr) -> pl.DataFrame:
    """Survivors (null reason) take `reason` where it is not null."""
    return df.with_columns(pl.coalesce("reason", reason).alias("reason"))


def with_clusters(cands: pl.DataFrame, clusters: pl.DataFrame) -> pl.DataFrame:
    """Add `cluster` (candidate's) and `positive_cluster`; a passage with no cluster is its own."""
    mapping = clusters.select("passage_id", pl.col("cluster_id").alias("cluster")).unique(
        "passage_id"
    )
    out = cands.join(mapping, on="passage_id", how="left").join(
        mapping.rename({"passage_id": "positive_id", "cluster": "positive_cluster"}),
        on="positive_id",
        how="left",
    )
    return out.with_columns(
        pl.col("cluster").fill_null(pl.col("passage_id")),
        pl.col("positive_cluster").fill_null(pl.col("positive_id")),
    )


def with_sibling_similarity(
    cands: pl.DataFrame, text_of: TextLookup, shingle_size: int
) -> pl.DataFrame:
    """Add `cluster_similarity`: shingle Jaccard between a candidate and its positive when both
    are in one duplicate cluster, or when the LLM wrote the candidate for that positive
    (computed only for those few pairs); else null."""
    sibling = (pl.col("cluster") == pl.col("positive_cluster")) & (
        pl.col("passage_id") != pl.col("positive_id")
    )
    pairs = (
        cands.filter(sibling | ~MINED)
        .select("passage_id", "positive_id")
        .unique(maintain_order=True)
    )
    needed = sorted({p for pair in pairs.iter_rows() for p in pair})
    texts = text_of(needed)
    missing = [p for p in needed if p not in texts]
    if missing:
        raise ValueError(f"no text for clustered passages {missing[:3]}")
    shingles = dict(
        zip(needed, shingle_sets([texts[p] for p in needed], shingle_size), strict=True)
    )
    sims = [jaccard(shingles[a], shingles[b]) for a, b in pairs.iter_rows()]
    pairs = pairs.with_columns(pl.Series("cluster_similarity", sims, dtype=pl.Float32))
    return cands.join(pairs, on=["passage_id", "positive_id"], how="left")


def mark_known_positives(
    df: pl.DataFrame, known_positives: pl.DataFrame | None, query_text: pl.DataFrame | None
) -> pl.DataFrame:
    """Add `other_positive`: the candidate is a known positive of the query's text
    (`known_positives`: (query, passage_id)) or of the query itself (a (query_id, passage_id)
    table given as `known_positives` with a query_id column)."""
    flags = pl.lit(False).alias("other_positive")
    if known_positives is None:
        return df.with_columns(flags)
    if "query_id" in known_positives.columns:
        on = ["query_id", "passage_id"]
        joined = df
    else:
        if query_text is None:
            return df.with_columns(flags)
        on = ["query", "passage_id"]
        joined = df.join(query_text, on="query_id", how="left")
    marks = known_positives.select(on).unique().with_columns(pl.lit(True).alias("other_positive"))
    out = joined.join(marks, on=on, how="left")
    if "query" in on:
        out = out.drop("query")
    return out.with_columns(pl.col("other_positive").fill_null(False))


def mark_same_document(df: pl.DataFrame, documents: pl.DataFrame | None) -> pl.DataFrame:
    """`same_document`: the candidate and its positive were cut from one document
    (`documents`: passage_id -> document_id; passages without one belong to none)."""
    if documents is None or documents.is_empty():
        return df.with_columns(pl.lit(False).alias("same_document"))
    doc = documents.select("passage_id", "document_id").drop_nulls().unique("passage_id")
    of_positive = doc.rename({"passage_id": "positive_id", "document_id": "positive_document"})
    return (
        df.join(doc, on="passage_id", how="left", maintain_order="left")
        .join(of_positive, on="positive_id", how="left", maintain_order="left")
        .with_columns(
            (pl.col("document_id") == pl.col("positive_document"))
            .fill_null(False)
            .alias("same_document")
        )
        .drop("document_id", "positive_document")
    )


def largest_document(documents: pl.DataFrame | None, corpus_ids: list[str]) -> int:
    """Passages of the corpus in its largest document (1 without documents)."""
    if documents is None or documents.is_empty():
        return 1
    inside = documents.drop_nulls("document_id").filter(
        pl.col("passage_id").is_in(pl.Series(corpus_ids).implode())
    )
    return int(inside.group_by("document_id").len()["len"].max() or 1)


def filter_candidates(
    cands: pl.DataFrame,
    clusters: pl.DataFrame,
    cfg: MiningConfig,
    text_of: TextLookup | dict[str, str] | None = None,
    shingle_size: int = 3,
    known_positives: pl.DataFrame | None = None,
    query_text: pl.DataFrame | None = None,
    semantic_threshold: float | None = None,
    documents: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Add rank, `cluster_similarity` and the first exclusion or score rule that removes each
    candidate (`reason`, null for a survivor); see the module docstring for the order."""
    if "origin" not in cands.columns:
        cands = cands.with_columns(pl.lit("mined").alias("origin"))
    lookup = _as_lookup(text_of)
    df = with_sibling_similarity(with_clusters(cands, clusters), lookup, shingle_size)
    df = mark_known_positives(df, known_positives, query_text)
    df = mark_same_document(df, documents)
    df = df.sort(
        ["query_id", pl.col("origin") != "mined", "score", "passage_id"],
        descending=[False, False, True, False],
    )
    exclusion = _first_reason(
        [
            (R.IS_POSITIVE, rule_is_positive()),
            (R.OTHER_POSITIVE, pl.col("other_positive")),
            (
                R.DUPLICATE_OF_POSITIVE,
                rule_duplicate_of_positive(cfg.duplicate_similarity)
                if cfg.exclude_duplicate_clusters
                else None,
            ),
            (
                R.SEMANTIC_DUPLICATE,
                pl.col("positive_similarity") >= semantic_threshold
                if semantic_threshold is not None and "positive_similarity" in df.columns
                else None,
            ),
            (R.SAME_DOCUMENT, pl.col("same_document")),
        ]
    )
    df = df.with_columns(exclusion.alias("reason"))
    eligible = pl.col("reason").is_null() & MINED
    df = df.with_columns(
        pl.when(eligible)
        .then(eligible.cast(pl.Int32).cum_sum().over("query_id") - 1)
        .otherwise(None)
        .cast(pl.Int32)
        .alias("rank")
    )
    df = _set_reason(
        df,
        _first_reason(
            [
                (R.OUTSIDE_RANK_RANGE, rule_outside_rank_range(cfg.min_rank, cfg.max_rank)),
                (R.ABOVE_POSITIVE_RATIO, rule_above_positive_ratio(cfg.max_positive_ratio)),
                (R.WITHIN_MARGIN, rule_within_margin(cfg.margin)),
                (R.ABOVE_MAX_SCORE, rule_above_max_score(cfg.max_score)),
            ]
        ),
    )
    # The round-trip rank of the positive: 1 + eligible mined passages scoring above it (its
    # copies and other known positives are not eligible, so they do not push it down).
    above = (pl.col("rank").is_not_null() & (pl.col("score") > pl.col("positive_score"))).cast(
        pl.Int32
    )
    return df.with_columns((above.sum().over("query_id") + 1).alias("positive_rank"))


def apply_text_rules(
    df: pl.DataFrame, cfg: MiningConfig, text_of: TextLookup, query_text: pl.DataFrame | None
) -> pl.DataFrame:
    """Reordered copies of the positive and passages that restate the query, among the
    survivors so far (their texts are read for these rows only)."""
    survivors = df.filter(pl.col("reason").is_null()).select(
        "query_id", "passage_id", "positive_id"
    )
    if survivors.is_empty():
        return df
    ids = sorted(set(survivors["passage_id"]) | set(survivors["positive_id"]))
    texts = text_of(ids)
    queries = dict(query_text.iter_rows()) if query_text is not None else {}
    rows = survivors.iter_rows()
    overlap, share = [], []
    for qid, pid, pos in rows:
        overlap.append(word_overlap(texts[pid], texts[pos]) if pid in texts else None)
        query = queries.get(qid)
        share.append(query_word_share(query, texts[pid]) if query and pid in texts else None)
    measured = survivors.select("query_id", "passage_id").with_columns(
        pl.Series("_word_overlap", overlap, dtype=pl.Float32),
        pl.Series("_query_share", share, dtype=pl.Float32),
    )
    df = df.join(measured, on=["query_id", "passage_id"], how="left")
    df = _set_reason(
        df,
        _first_reason(
            [
                (
                    R.DUPLICATE_OF_POSITIVE,
                    rule_reordered_copy(cfg.duplicate_similarity)
                    if cfg.exclude_duplicate_clusters
                    else None,
                ),
                (R.COPIES_QUERY, rule_copies_query(cfg.copies_query_share)),
            ]
        ),
    )
    return df.drop("_word_overlap", "_query_share")


def query_rejects(
    df: pl.DataFrame, cfg: QueryFilterConfig, consistency_top_k: int | None
) -> pl.DataFrame:
    """(query_id, reason, detail) of queries the candidates show to be bad training data:
    the positive ranked below `consistency_top_k` (a generated query that does not lead back to
    its passage), the positive far above every mined candidate (`too_easy_margin`: nothing to
    learn), or many passages scoring like the positive (`too_generic_count`: the query does not
    single it out)."""
    mined = df.filter(MINED & pl.col("rank").is_not_null())
    per_query = df.group_by("query_id").agg(
        pl.col("positive_rank").first(), pl.col("positive_score").first()
    )
    stats = mined.group_by("query_id").agg(
        pl.col("score").max().alias("best"),
        (pl.col("score") >= cfg.too_generic_ratio * pl.col("positive_score"))
        .sum()
        .alias("similar"),
    )
    per_query = per_query.join(stats, on="query_id", how="left").with_columns(
        pl.col("similar").fill_null(0)
    )
    rules: list[tuple[str, pl.Expr | None, pl.Expr]] = [
        (
            R.FAILED_CONSISTENCY,
            pl.col("positive_rank") > consistency_top_k if consistency_top_k else None,
            pl.format(
                "source passage ranked {} > top {}",
                pl.col("positive_rank"),
                pl.lit(consistency_top_k),
            ),
        ),
        (
            R.TOO_EASY,
            pl.col("positive_score") - pl.col("best") > cfg.too_easy_margin
            if cfg.too_easy_margin is not None
            else None,
            pl.format(
                "positive {} is more than {} above the best candidate {}",
                pl.col("positive_score").round(3),
                pl.lit(cfg.too_easy_margin),
                pl.col("best").round(3),
            ),
        ),
        (
            R.TOO_GENERIC,
            pl.col("similar") >= cfg.too_generic_count if cfg.too_generic_count else None,
            pl.format(
                "{} passages score >= {} x the positive",
                pl.col("similar"),
                pl.lit(cfg.too_generic_ratio),
            ),
        ),
    ]
    reason = _first_reason([(name, rule) for name, rule, _ in rules])
    detail = pl.lit(None, dtype=pl.String)
    for name, rule, text in reversed(rules):
        if rule is not None:
            detail = pl.when(reason == name).then(text).otherwise(detail)
    return (
        per_query.with_columns(reason.alias("reason"), detail.alias("detail"))
        .filter(pl.col("reason").is_not_null())
        .select("query_id", "reason", "detail")
    )


def _survivor_keys(df: pl.DataFrame, cfg: MiningConfig) -> pl.Expr:
    """What orders the mined survivors of a query for selection (smallest first)."""
    if cfg.sampling_strategy == "top":
        return pl.col("rank").cast(pl.Float64)
    uniform = pl.concat_str(
        [pl.lit(str(cfg.seed)), pl.col("query_id"), pl.col("passage_id")], separator="|"
    ).map_batches(_uniform, return_dtype=pl.Float64)
    if cfg.sampling_strategy == "random":
        return uniform
    # SimANS (Zhou et al., 2022): sample with probability exp(-a (s - s_pos - b)^2), highest for
    # negatives scoring about the positive's score (+ b), lower for the far easier and for the
    # suspiciously higher. Gumbel-top-k draws without replacement: the k smallest of
    # a (s - s_pos - b)^2 - Gumbel(u).
    gap = pl.col("score") - pl.col("positive_score") - cfg.simans_b
    return cfg.simans_a * gap * gap + (-(-uniform.log()).log())


def _uniform(keys: pl.Series) -> pl.Series:
    """A uniform (0, 1) number per key, stable across processes and sharding."""
    return pl.Series([(stable_hash64(k) + 0.5) / 2**64 for k in keys], dtype=pl.Float64)


def select_negatives(df: pl.DataFrame, cfg: MiningConfig) -> pl.DataFrame:
    """Keep `num_negatives` of the mined candidates no rule removed, by `sampling_strategy`:
    the hardest (`top`), a seeded random draw (`random`) or SimANS (`simans`), each draw seeded
    by (seed, query, passage) so it does not depend on sharding. Written survivors are all kept."""
    survivor = pl.col("reason").is_null() & MINED
    position = (
        pl.when(survivor)
        .then(_survivor_keys(df, cfg))
        .otherwise(None)
        .rank("ordinal")
        .over("query_id")
    )
    df = df.with_columns(
        pl.when(survivor & (position > cfg.num_negatives))
        .then(pl.lit(R.BEYOND_NUM_NEGATIVES))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )
    return df.with_columns(pl.col("reason").is_null().alias("kept"))


def label_candidates(
    cands: pl.DataFrame,
    clusters: pl.DataFrame,
    cfg: MiningConfig,
    texts: TextLookup | dict[str, str] | None = None,
    shingle_size: int = 3,
    known_positives: pl.DataFrame | None = None,
    query_text: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """`filter_candidates`, then `select_negatives`: every candidate gets rank, kept, reason."""
    return select_negatives(
        filter_candidates(cands, clusters, cfg, texts, shingle_size, known_positives, query_text),
        cfg,
    )


Judge = Callable[[pl.DataFrame], pl.DataFrame]
# (query texts, passage texts) -> one relevance score per pair, e.g. a cross-encoder
Rescorer = Callable[[list[str], list[str]], np.ndarray]


def rescore_candidates(
    cands: pl.DataFrame, rescore: Rescorer, query_text: dict[str, str], text_of: TextLookup
) -> pl.DataFrame:
    """Replace `score` and `positive_score` by the rescorer's scores of (query, passage) and
    (query, positive); the embedder's score is kept as `retrieval_score`."""
    pairs = pl.concat(
        [
            cands.select("query_id", "passage_id"),
            cands.select("query_id", pl.col("positive_id").alias("passage_id")),
        ]
    ).unique(maintain_order=True)
    texts = text_of(pairs["passage_id"].unique().to_list())
    scores = rescore(
        [query_text[q] for q in pairs["query_id"]], [texts[p] for p in pairs["passage_id"]]
    )
    scored = pairs.with_columns(pl.Series("new", np.asarray(scores, dtype=np.float32)))
    return (
        cands.rename({"score": "retrieval_score"})
        .drop("positive_score")
        .join(scored.rename({"new": "score"}), on=["query_id", "passage_id"], how="left")
        .join(
            scored.rename({"passage_id": "positive_id", "new": "positive_score"}),
            on=["query_id", "positive_id"],
            how="left",
        )
    )


@dataclass
class JudgeStep:
    """The optional LLM judge: `judge` maps (query_id, passage_id) rows to `tasks.llm.judge.JUDGED`
    rows; which candidates reach it is decided here from `cfg`."""

    judge: Judge
    cfg: JudgeConfig
    on_false_negative: str = "relabel"


def judge_selection(df: pl.DataFrame, cfg: JudgeConfig) -> pl.DataFrame:
    """(query_id, passage_id) of the survivors to judge: in the uncertain band, looser siblings
    of the positive and passages written for it, or all (`scope`), hardest first, at most
    `max_per_query` per query."""
    survivor = pl.col("reason").is_null()
    if cfg.scope == "all":
        wanted = survivor
    else:
        wanted = survivor & (pl.col("score") >= cfg.band_min_ratio * pl.col("positive_score"))
        if cfg.siblings:
            wanted = wanted | (survivor & pl.col("cluster_similarity").is_not_null())
    return (
        df.filter(wanted)
        .sort(["query_id", "score", "passage_id"], descending=[False, True, False])
        .group_by("query_id", maintain_order=True)
        .head(cfg.max_per_query)
        .select("query_id", "passage_id")
    )


def apply_verdicts(df: pl.DataFrame, judged: pl.DataFrame, on_false_negative: str) -> pl.DataFrame:
    """Join the judge's grade/verdict/reason. A false negative answers the query: a mined one is
    relabelled as a positive (or dropped), a written one dropped (`answers_query`); an unsure one
    is dropped; a true negative stays a survivor, a mined one with the judge's grade, a written
    one with the grade it was written at."""
    df = df.drop("verdict", "judge_reason", strict=False).join(
        judged.rename({"grade": "_judged_grade"}), on=["query_id", "passage_id"], how="left"
    )
    relabel = MINED & (on_false_negative == "relabel")
    survivor = pl.col("reason").is_null()
    return df.with_columns(
        pl.coalesce("grade", "_judged_grade").cast(pl.Int8).alias("grade"),
        pl.when(survivor & (pl.col("verdict") == "false_negative") & relabel)
        .then(pl.lit(R.RELABELED))
        .when(survivor & (pl.col("verdict") == "false_negative"))
        .then(pl.lit(R.ANSWERS_QUERY))
        .when(survivor & (pl.col("verdict") == "unsure"))
        .then(pl.lit(R.JUDGED_UNSURE))
        .otherwise(pl.col("reason"))
        .alias("reason"),
    ).drop("_judged_grade")


def _query_reject_rows(rejected: pl.DataFrame) -> pl.DataFrame:
    return rejected.select(
        pl.lit(STAGE).alias("stage"),
        pl.col("query_id").alias("source"),
        pl.lit(None, dtype=pl.Int64).alias("row"),
        "reason",
        "detail",
        pl.lit(None, dtype=pl.String).alias("raw"),
    )


def _drop_queries(df: pl.DataFrame, rejected: pl.DataFrame) -> pl.DataFrame:
    """Candidates of rejected queries lose every survivor (the query reaches no triplet)."""
    if rejected.is_empty():
        return df
    why = rejected.select("query_id", pl.col("reason").alias("_query_reason"))
    return (
        df.join(why, on="query_id", how="left")
        .with_columns(pl.coalesce("reason", "_query_reason").alias("reason"))
        .drop("_query_reason")
    )


def _with_written(lookup: TextLookup, generated: pa.Table | None) -> TextLookup:
    """`lookup`, answering for the passages the LLM wrote from their own table."""
    if generated is None or not generated.num_rows:
        return lookup
    written = dict(
        zip(generated["passage_id"].to_pylist(), generated["text"].to_pylist(), strict=True)
    )

    def both(ids: list[str]) -> dict[str, str]:
        found = {i: written[i] for i in ids if i in written}
        return found | lookup([i for i in ids if i not in written])

    return both


def _as_lookup(texts: TextLookup | dict[str, str] | None) -> TextLookup:
    if callable(texts):
        return texts
    known = texts or {}
    return lambda ids: {i: known[i] for i in ids if i in known}


def mine_negatives(
    queries: pa.Table,
    query_vectors: np.ndarray,
    corpus_ids: list[str],
    corpus_vectors: np.ndarray,
    clusters: pa.Table,
    cfg: MiningConfig,
    texts: TextLookup | dict[str, str] | None = None,
    shingle_size: int = 3,
    known_positives: pl.DataFrame | None = None,
    *,
    semantic_threshold: float | None = None,
    consistency_top_k: int | None = None,
    query_filters: QueryFilterConfig | None = None,
    rescore: tuple[Rescorer, TextLookup] | None = None,
    judge: JudgeStep | None = None,
    generated: pa.Table | None = None,
    generated_vectors: np.ndarray | None = None,
    documents: pl.DataFrame | None = None,
) -> MiningResult:
    """The whole stage for one shard of queries (query_id, passage_id = positive[, query]).

    `texts`: passage_id -> text for the passages the rules read (clustered ones, survivors,
    written ones), as a dict or a lookup function; `known_positives`: (query, passage_id) of
    every known positive of every query text (`tasks.pairs.positives_by_query`), or
    (query_id, passage_id) pairs; `generated` (with `generated_vectors`): passages the LLM wrote
    for these queries; `documents`: (passage_id, document_id) of passages cut from one document.
    See the module docstring for the order of the rules."""
    qids = queries.column("query_id").to_pylist()
    pids = queries.column("passage_id").to_pylist()
    lookup = _with_written(_as_lookup(texts), generated)

    cluster_df = pl.from_arrow(clusters.select(["passage_id", "cluster_id"]))
    in_corpus = cluster_df.filter(pl.col("passage_id").is_in(pl.Series(corpus_ids).implode()))
    largest_cluster = int(in_corpus.group_by("cluster_id").len()["len"].max() or 1)
    query_text = (
        pl.from_arrow(queries.select(["query_id", "query"]))
        if "query" in queries.column_names
        else None
    )
    most_known = 0
    if known_positives is not None and known_positives.height:
        if "query_id" in known_positives.columns:
            sizes = known_positives.filter(pl.col("query_id").is_in(pl.Series(qids).implode()))
            most_known = int(sizes.group_by("query_id").len()["len"].max() or 0)
        elif query_text is not None:
            sizes = known_positives.join(query_text.select("query").unique(), on="query")
            most_known = int(sizes.group_by("query").len()["len"].max() or 1) - 1
    # A generic query text shared by many passages must not widen every query's search:
    # beyond max_rank, its extra known positives may shrink its own rank window instead.
    most_known = min(most_known, cfg.max_rank)
    # Room for the positive, its whole duplicate cluster, its other known positives and the rest
    # of its document on top of the rank window (each extra bounded like most_known).
    same_doc = min(largest_document(documents, corpus_ids) - 1, cfg.max_rank)
    k = min(len(corpus_ids), cfg.max_rank + largest_cluster + most_known + same_doc + 1)
    cands = retrieve_candidates(
        qids,
        pids,
        query_vectors,
        corpus_ids,
        corpus_vectors,
        k,
        ann=use_ann(cfg, len(corpus_ids)),
        ef_search=cfg.ann_ef_search,
        positive_similarity=True,
    ).with_columns(pl.lit("mined").alias("origin"), pl.lit(None, dtype=pl.Int8).alias("grade"))
    if generated is not None and generated.num_rows:
        if generated_vectors is None:
            raise ValueError("generated passages need their embeddings")
        gen = generated_candidates(
            generated, generated_vectors, qids, query_vectors, pids, corpus_ids, corpus_vectors
        )
        if not gen.is_empty():
            cands = pl.concat(
                [cands, gen.with_columns(pl.lit("generated").alias("origin")).select(cands.columns)]
            )
    if rescore is not None:
        if query_text is None:
            raise ValueError("rescoring needs the queries' text")
        qt = dict(zip(query_text["query_id"], query_text["query"], strict=True))
        cands = rescore_candidates(cands, rescore[0], qt, _with_written(rescore[1], generated))
    else:
        cands = cands.with_columns(pl.lit(None, dtype=pl.Float32).alias("retrieval_score"))
    df = filter_candidates(
        cands,
        cluster_df,
        cfg,
        lookup,
        shingle_size,
        known_positives,
        query_text,
        semantic_threshold,
        documents,
    )
    df = apply_text_rules(df, cfg, lookup, query_text)
    df = df.with_columns(
        pl.lit(None, dtype=pl.String).alias("verdict"),
        pl.lit(None, dtype=pl.String).alias("judge_reason"),
    )
    rejected = query_rejects(df, query_filters or QueryFilterConfig(), consistency_top_k)
    df = _drop_queries(df, rejected)
    judge_stats: dict[str, Any] = {}
    if judge is not None:
        judged = judge.judge(judge_selection(df, judge.cfg))
        judge_stats = {
            "judged": judged.height,
            "verdicts": dict(judged.group_by("verdict").len().iter_rows()),
        }
        df = apply_verdicts(df, judged, judge.on_false_negative)
    df = select_negatives(df, cfg)
    kept_per_query = df.group_by("query_id").agg(pl.col("kept").sum().alias("n"))
    short = (
        pl.DataFrame({"query_id": qids}, schema={"query_id": pl.String})
        .filter(~pl.col("query_id").is_in(rejected["query_id"].implode()))
        .join(kept_per_query, on="query_id", how="left")
        .with_columns(pl.col("n").fill_null(0))
        .filter(pl.col("n") < cfg.min_negatives)
        .select(
            "query_id",
            pl.lit(R.TOO_FEW_NEGATIVES).alias("reason"),
            pl.format("{} kept < min_negatives {}", pl.col("n"), pl.lit(cfg.min_negatives)).alias(
                "detail"
            ),
        )
    )
    # A rejected query keeps none of its candidates: it must not reach the triplets.
    df = _drop_queries(df.drop("kept"), short).with_columns(
        pl.col("reason").is_null().alias("kept")
    )
    all_rejected = pl.concat([rejected, short])
    return MiningResult(
        df.select(CANDIDATES.names).to_arrow().cast(CANDIDATES),
        _query_reject_rows(all_rejected).to_arrow().cast(REJECTS),
        df.filter(pl.col("kept"))["query_id"].n_unique(),  # measured, not len(qids) - rejects
        judge_stats,
    )


# --- the stage ----------------------------------------------------------------------------------


class MineStage(Stage):
    """Negatives for one shard of queries, against the whole corpus."""

    name = STAGE
    version = "2"
    sharded = ("queries", "embeddings.queries", "generated", "embeddings.generated")
    whole = ("queries", "passages", "embeddings.passages", "clusters", "query_duplicates")
    optional = frozenset({"generated", "embeddings.generated", "query_duplicates"})
    outputs = ("candidates", "rejects")
    libraries = ("faiss-cpu", "polars", "numpy", "pyarrow")

    def settings(self, cfg: PipelineConfig) -> Any:
        return [
            cfg.mining.model_dump(mode="json", exclude={"rescore_batch_size"}),
            cfg.queries.model_dump(mode="json", exclude={"dedup_threshold"}),
            cfg.dedup.shingle_size,
            cfg.dedup.semantic_threshold if cfg.dedup.semantic else None,
            consistency_top_k(cfg),
            cfg.judge.model_dump(mode="json") if cfg.judge.enabled else None,
            cfg.grading.model_dump(mode="json") if cfg.judge.enabled else None,
            cfg.input.document_column is not None,
        ]

    def models(self, cfg: PipelineConfig) -> tuple[str, ...]:
        wanted = ("llm",) if cfg.judge.enabled else ()
        return wanted + (("rescorer",) if cfg.mining.rescore_model_path else ())

    def _duplicates(self, job: Job) -> pl.DataFrame | None:
        return (
            pl.from_arrow(job.read("query_duplicates", whole=True))
            if job.has("query_duplicates")
            else None
        )

    def rows_in(self, job: Job) -> int:
        """The shard's queries, less the near-duplicates query dedup removed."""
        queries = job.read("queries", columns=["query_id"])
        dups = self._duplicates(job)
        if dups is None:
            return queries.num_rows
        return int((~pl.Series(queries["query_id"]).is_in(dups["query_id"].implode())).sum())

    def run(self, job: Job) -> Outcome:
        cfg = job.cfg
        qtable = job.read("queries", columns=["query_id", "passage_id", "query"])
        q_ids, q_vecs = table_to_matrix(job.read("embeddings.queries"))
        if q_ids != qtable.column("query_id").to_pylist():
            raise RuntimeError("query embeddings do not match their queries shard")
        known = pl.from_arrow(
            job.read("queries", columns=["query", "passage_id"], whole=True)
        ).unique()
        dups = self._duplicates(job)
        if dups is not None and dups.height:
            # a near-identical query's positive is a known positive of the query it duplicates
            keep = ~pl.Series(qtable["query_id"]).is_in(dups["query_id"].implode())
            qtable = qtable.filter(pa.array(keep.to_numpy()))
            q_vecs = q_vecs[keep.to_numpy()]
            text = dict(
                zip(qtable["query_id"].to_pylist(), qtable["query"].to_pylist(), strict=True)
            )
            extra = dups.filter(pl.col("duplicate_of").is_in(list(text))).select(
                pl.col("duplicate_of").replace_strict(text, return_dtype=pl.String).alias("query"),
                pl.col("positive_id").alias("passage_id"),
            )
            known = pl.concat([known, extra]).unique()
        corpus_ids, corpus = table_to_matrix(job.read("embeddings.passages"))
        clusters = job.read("clusters")
        documents = (
            pl.from_arrow(job.read("passages", columns=["passage_id", "document_id"]))
            if cfg.input.document_column
            else None
        )

        def passage_text(ids: list[str]) -> dict[str, str]:
            if not ids:
                return {}
            table = job.read(
                "passages", columns=["passage_id", "text"], where=ids_in("passage_id", ids)
            )
            return dict(
                zip(table["passage_id"].to_pylist(), table["text"].to_pylist(), strict=True)
            )

        gen_table, gen_vecs = None, None
        if job.has("generated"):
            gen_table = job.read("generated")
            gen_ids, gen_vecs = table_to_matrix(job.read("embeddings.generated"))
            if gen_ids != gen_table["passage_id"].to_pylist():
                raise RuntimeError("written passages' embeddings do not match their shard")
        judge_stats: dict[str, Any] = {}
        judge = (
            _judge_step(job, qtable, passage_text, gen_table, judge_stats)
            if cfg.judge.enabled
            else None
        )
        rescore = None
        if cfg.mining.rescore_model_path:
            rescorer = job.models.rescorer

            def score(queries: list[str], texts: list[str]) -> np.ndarray:
                return rescorer.predict(queries, texts, cfg.mining.rescore_batch_size)

            rescore = (score, passage_text)
        result = mine_negatives(
            qtable,
            q_vecs,
            corpus_ids,
            corpus,
            clusters,
            cfg.mining,
            passage_text,
            cfg.dedup.shingle_size,
            known,
            semantic_threshold=cfg.dedup.semantic_threshold if cfg.dedup.semantic else None,
            consistency_top_k=consistency_top_k(cfg),
            query_filters=cfg.queries,
            rescore=rescore,
            judge=judge,
            generated=gen_table,
            generated_vectors=gen_vecs,
            documents=documents,
        )
        cands = result.candidates
        job.write("candidates", cands)
        job.write("rejects", result.rejects)
        kept = pl.from_arrow(cands.select(["kept", "origin"]))
        stats = {
            "candidates": cands.num_rows,
            "negatives_kept": int(kept["kept"].sum()),
            "mined_kept": int((kept["kept"] & (kept["origin"] == "mined")).sum()),
            "generated_kept": int((kept["kept"] & (kept["origin"] == "generated")).sum()),
            "filtered": reason_counts(cands.filter(pa.compute.invert(cands["kept"]))),
            "filtered_generated": reason_counts(
                cands.filter(
                    pa.compute.and_(
                        pa.compute.invert(cands["kept"]),
                        pa.compute.equal(cands["origin"], "generated"),
                    )
                )
            ),
            "judge": {**result.judge_stats, **judge_stats},
        }
        return Outcome(rows_out=result.queries_kept, rejected=result.rejects.num_rows, stats=stats)

    def summarize(self, stats: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
        judge = stats.get("judge") or {}
        if judge:
            judge = {
                "judged": judge.get("judged", 0),
                "verdicts": judge.get("verdicts", {}),
                "output_tokens": judge.get("output_tokens", 0),
                "engine_seconds": round(judge.get("generate_seconds", 0.0), 3),
            }
        return {**stats, "judge": judge}


def consistency_top_k(cfg: PipelineConfig) -> int | None:
    """The round-trip filter applies to generated queries only, never to the user's pairs."""
    return None if cfg.input.mode == "pairs" else cfg.generation.consistency_top_k


def _judge_step(
    job: Job,
    qtable: pa.Table,
    passage_text: TextLookup,
    generated: pa.Table | None,
    collected: dict[str, Any],
) -> JudgeStep:
    """The LLM judge as mining calls it; its engine stats are added to `collected`."""
    from tasks.llm.judge import judge_pairs

    cfg = job.cfg
    query_of = dict(zip(qtable["query_id"].to_pylist(), qtable["query"].to_pylist(), strict=True))
    written = (
        dict(zip(generated["passage_id"].to_pylist(), generated["text"].to_pylist(), strict=True))
        if generated is not None
        else {}
    )

    def run(todo: pl.DataFrame) -> pl.DataFrame:
        ids = todo["passage_id"].to_list()
        texts = {i: written[i] for i in ids if i in written}
        texts |= passage_text([i for i in ids if i not in written])
        rows = todo.with_columns(
            todo["query_id"].replace_strict(query_of, return_dtype=pl.String).alias("query"),
            todo["passage_id"].replace_strict(texts, return_dtype=pl.String).alias("text"),
        )
        judged, stats = judge_pairs(
            rows, job.models.llm, cfg.grading, cfg.judge, cfg.judge_grades()
        )
        for key in ("output_tokens", "generate_seconds", "retried"):
            collected[key] = collected.get(key, 0) + stats.get(key, 0)
        return judged

    return JudgeStep(run, cfg.judge, cfg.judge.on_false_negative)
