"""Exports of the triplets for trainers, and what each one is for.

A negative's grade decides where it may go: a passage graded above `max_negative_grade`
(default: the level below "partially answers") partly answers its query, so it is never a plain
negative — a contrastive loss would push a partial answer away. The list-wise export keeps every
passage with its grade and score, for graded or list-wise losses.

- `sentence_transformers`: (anchor, positive, negative_1..n) with plain negatives, for
  MultipleNegativesRankingLoss (and its cached variants) or TripletLoss;
- `flagembedding`: JSON lines `query, pos, neg, pos_scores, neg_scores` for FlagEmbedding's
  fine-tuning (InfoNCE over pos + neg; the scores serve distillation);
- `listwise`: query, passages, grades, scores (positive first) for list-wise or graded losses
  (ListNet / LambdaLoss style, or a grade-weighted InfoNCE).
"""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa


def plain_negatives(triplets: pl.DataFrame, max_grade: int) -> pl.DataFrame:
    """The triplets with only the negatives that may be plain negatives: ungraded (mined,
    unjudged) or graded at most `max_grade`."""
    ok = pl.element().struct.field("grade").is_null() | (
        pl.element().struct.field("grade") <= max_grade
    )
    return triplets.with_columns(pl.col("negatives").list.filter(ok))


def to_sentence_transformers(
    triplets: pa.Table, num_negatives: int, max_grade: int | None = None
) -> tuple[pa.Table, int]:
    """(anchor, positive, negative_1..n) rows for sentence-transformers, plain negatives only
    (see `plain_negatives`); rows with fewer than `num_negatives` of them cannot fill the
    columns and are counted, not silently dropped."""
    df = pl.from_arrow(triplets)
    if max_grade is not None:
        df = plain_negatives(df, max_grade)
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


def to_flagembedding_lines(
    triplets: pa.Table, max_grade: int | None = None
) -> dict[str, list[str]]:
    """FlagEmbedding fine-tuning JSONL lines per split: query, pos (the positive and relabelled
    extra positives), neg (plain negatives only), pos_scores, neg_scores."""
    df = pl.from_arrow(triplets)
    if max_grade is not None:
        df = plain_negatives(df, max_grade)
    lines: dict[str, list[str]] = {}
    for row in df.to_dicts():
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
