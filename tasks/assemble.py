"""Assemble triplets from queries, passages and kept negatives; split; export for trainers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from schemas.config import SplitConfig
from schemas.tables import TRIPLETS
from tasks.io import write_bytes_atomic
from tasks.mine import RELABELED


def split_of(group: str, cfg: SplitConfig) -> str:
    """Deterministic train/eval assignment of a group (a positive's duplicate cluster)."""
    digest = hashlib.blake2b(f"{cfg.seed}|{group}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") / 2**64 < cfg.eval_fraction else "train"


def _passage_list(df: pl.DataFrame, name: str) -> pl.DataFrame:
    """Per query: a list of NEGATIVE structs, mined ones by rank, then written ones by grade."""
    return (
        df.sort(
            ["query_id", pl.col("origin") != "mined", "rank", "grade"],
            descending=[False, False, False, True],
            nulls_last=True,
        )
        .group_by("query_id", maintain_order=True)
        .agg(
            pl.struct(
                pl.col("passage_id").alias("id"),
                "text",
                "grade",
                "score",
                "origin",
                "cluster_similarity",
                "verdict",
            ).alias(name)
        )
    )


def assemble_triplets(
    queries: pa.Table,
    passages: pa.Table,
    candidates: pa.Table,
    clusters: pa.Table,
    cfg: SplitConfig,
    generated: pa.Table | None = None,
) -> pa.Table:
    """One row per query that kept negatives: the query, its positive, its negatives (mined by
    rank, then passages the LLM wrote, by grade) and the mined passages the judge relabelled as
    positives.

    The split is decided by the positive's duplicate cluster, so copies of one passage never
    land in both train and eval.
    """
    text = pl.from_arrow(passages.select(["passage_id", "text"]))
    if generated is not None and generated.num_rows:
        text = pl.concat([text, pl.from_arrow(generated.select(["passage_id", "text"]))])
    cands = (
        pl.from_arrow(candidates)
        .filter(pl.col("kept") | (pl.col("reason") == RELABELED))
        .join(text, on="passage_id", how="left")
    )
    kept = _passage_list(cands.filter(pl.col("kept")), "negatives").join(
        cands.filter(pl.col("kept"))
        .group_by("query_id")
        .agg(pl.col("positive_score").first(), pl.col("positive_rank").first()),
        on="query_id",
    )
    extra = _passage_list(cands.filter(pl.col("reason") == RELABELED), "extra_positives")
    cluster_of = pl.from_arrow(clusters.select(["passage_id", "cluster_id"])).unique("passage_id")
    df = (
        pl.from_arrow(queries.select(["query_id", "query", "style", "passage_id"]))
        .join(kept, on="query_id", how="inner")
        .join(extra, on="query_id", how="left")
        .with_columns(
            pl.col("extra_positives").fill_null(pl.lit([], dtype=extra["extra_positives"].dtype))
        )
        .join(text.rename({"text": "positive"}), on="passage_id", how="left")
        .join(cluster_of, on="passage_id", how="left")
        .with_columns(pl.col("cluster_id").fill_null(pl.col("passage_id")))
        .rename({"passage_id": "positive_id"})
    )
    groups = df["cluster_id"].unique().to_list()
    split_map = pl.DataFrame(
        {"cluster_id": groups, "split": [split_of(g, cfg) for g in groups]},
        schema={"cluster_id": pl.String, "split": pl.String},
    )
    df = df.join(split_map, on="cluster_id", how="left").sort("query_id")
    return df.select(TRIPLETS.names).to_arrow().cast(TRIPLETS)


def to_sentence_transformers(triplets: pa.Table, num_negatives: int) -> tuple[pa.Table, int]:
    """(anchor, positive, negative_1..n) rows for sentence-transformers; rows with fewer than
    `num_negatives` negatives cannot fill the columns and are counted, not silently dropped."""
    df = pl.from_arrow(triplets)
    full = df.filter(pl.col("negatives").list.len() >= num_negatives)
    out = full.select(
        "split",
        pl.col("query").alias("anchor"),
        "positive",
        *[
            pl.col("negatives").list.get(i).struct.field("text").alias(f"negative_{i + 1}")
            for i in range(num_negatives)
        ],
    )
    return out.to_arrow(), df.height - full.height


def to_flagembedding_lines(triplets: pa.Table) -> dict[str, list[str]]:
    """FlagEmbedding fine-tuning JSONL lines per split: query, pos, neg, pos_scores, neg_scores."""
    lines: dict[str, list[str]] = {}
    for row in triplets.to_pylist():
        extra = row["extra_positives"]
        record = {
            "query": row["query"],
            "pos": [row["positive"]] + [p["text"] for p in extra],
            "neg": [n["text"] for n in row["negatives"]],
            "pos_scores": [row["positive_score"]] + [p["score"] for p in extra],
            "neg_scores": [n["score"] for n in row["negatives"]],
            # not read by FlagEmbedding; kept for graded (list-wise) losses
            "neg_grades": [n["grade"] for n in row["negatives"]],
            "prompt": "",
            "type": "normal",
        }
        lines.setdefault(row["split"], []).append(json.dumps(record, ensure_ascii=False))
    return lines


def to_listwise(triplets: pa.Table, top_grade: int) -> pa.Table:
    """One row per query for graded / list-wise losses: the passages (positive first, then
    extra positives, then negatives), their grades and embedder scores. The positive and the
    relabelled positives get `top_grade`; an ungraded mined negative gets null."""
    df = pl.from_arrow(triplets)
    if df.is_empty():
        return pa.table(
            {
                "split": pa.array([], pa.string()),
                "query": pa.array([], pa.string()),
                "passages": pa.array([], pa.list_(pa.string())),
                "grades": pa.array([], pa.list_(pa.int8())),
                "scores": pa.array([], pa.list_(pa.float32())),
            }
        )
    top = pl.lit(top_grade, dtype=pl.Int8)
    out = df.select(
        "split",
        "query",
        pl.concat_list(
            pl.concat_list("positive"),
            pl.col("extra_positives").list.eval(pl.element().struct.field("text")),
            pl.col("negatives").list.eval(pl.element().struct.field("text")),
        ).alias("passages"),
        pl.concat_list(
            pl.concat_list(top),
            pl.col("extra_positives").list.eval(
                pl.element().struct.field("grade").fill_null(top_grade)
            ),
            pl.col("negatives").list.eval(pl.element().struct.field("grade")),
        ).alias("grades"),
        pl.concat_list(
            pl.concat_list("positive_score"),
            pl.col("extra_positives").list.eval(pl.element().struct.field("score")),
            pl.col("negatives").list.eval(pl.element().struct.field("score")),
        ).alias("scores"),
    )
    return out.to_arrow()


def write_flagembedding(triplets: pa.Table, folder: Path) -> dict[str, int]:
    counts = {}
    for split, lines in to_flagembedding_lines(triplets).items():
        write_bytes_atomic(folder / f"{split}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
        counts[split] = len(lines)
    return counts


def leakage_report(
    triplets: pa.Table, clusters: pa.Table, query_similarity: float = 0.9, shingle_size: int = 3
) -> dict[str, int]:
    """What of eval can be seen in train. Splits are made by the positive's duplicate cluster, so
    the first count should be 0; the others are reported for the user to judge:

    - positive_clusters_in_both: clusters with a positive in train and one in eval;
    - eval_positives_as_train_negatives: train negatives in the duplicate cluster of an eval
      positive (the model sees that text, as a negative, in training);
    - near_identical_queries_across_splits: eval queries whose word-shingle Jaccard with some
      train query is >= query_similarity (MinHash + LSH, verified).
    """
    from schemas.config import DedupConfig
    from tasks.dedup import fold_many, near_duplicate_pairs

    cluster_of = pl.from_arrow(clusters.select(["passage_id", "cluster_id"])).unique("passage_id")
    df = (
        pl.from_arrow(triplets.select(["query", "positive_id", "negatives", "split"]))
        .join(cluster_of, left_on="positive_id", right_on="passage_id", how="left")
        .with_columns(pl.col("cluster_id").fill_null(pl.col("positive_id")))
    )
    splits_per_cluster = df.group_by("cluster_id").agg(pl.col("split").n_unique().alias("n"))
    eval_clusters = df.filter(pl.col("split") == "eval")["cluster_id"].unique()
    train_negs = (
        df.filter(pl.col("split") == "train")
        .select(pl.col("negatives").list.eval(pl.element().struct.field("id")).alias("id"))
        .explode("id")
        .join(cluster_of, left_on="id", right_on="passage_id", how="left")
        .with_columns(pl.col("cluster_id").fill_null(pl.col("id")))
    )
    queries = df["query"].to_list()
    split = df["split"].to_list()
    cfg = DedupConfig(near_threshold=query_similarity, shingle_size=shingle_size)
    pairs = near_duplicate_pairs(fold_many(queries), cfg)
    crossing = {j if split[j] == "eval" else i for i, j, _ in pairs if split[i] != split[j]}
    return {
        "positive_clusters_in_both": int((splits_per_cluster["n"] > 1).sum()),
        "eval_positives_as_train_negatives": int(
            train_negs["cluster_id"].is_in(eval_clusters.implode()).sum()
        ),
        "near_identical_queries_across_splits": len(crossing),
    }
