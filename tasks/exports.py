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
  (ListNet / LambdaLoss style, or a grade-weighted InfoNCE);
- `beir`: corpus.jsonl, queries.jsonl and graded qrels/{train,eval}.tsv, for evaluation rather
  than training (BEIR / MTEB-style retrieval, sentence-transformers'
  InformationRetrievalEvaluator).
"""

from __future__ import annotations

import json
from typing import NamedTuple

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
    extra positives), neg (plain negatives only), pos_scores, neg_scores. A row left with no
    plain negative has no line: FlagEmbedding's dataset draws its group from `neg` and fails
    on an empty list (the caller counts them: triplets minus lines)."""
    df = pl.from_arrow(triplets)
    if max_grade is not None:
        df = plain_negatives(df, max_grade)
    df = df.filter(pl.col("negatives").list.len() > 0)
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


class Beir(NamedTuple):
    """The BEIR tables: corpus (`_id, title, text`), queries (`_id, text`) and qrels
    (`split, query-id, corpus-id, score`)."""

    corpus: pa.Table
    queries: pa.Table
    qrels: pa.Table


def _judged_passages(df: pl.DataFrame, column: str) -> pl.DataFrame:
    """split, query_id, id, text, grade: one row per passage of a list column."""
    return (
        df.select("split", "query_id", column)
        .explode(column)
        .filter(pl.col(column).is_not_null())
        .unnest(column)
        .select("split", "query_id", "id", "text", pl.col("grade").cast(pl.Int32))
    )


def corpus_ids(triplets: pa.Table) -> list[str]:
    """The id of every passage a BEIR corpus of these triplets holds (with repeats)."""
    ids = pl.from_arrow(triplets).select(
        pl.concat_list(
            pl.concat_list("positive_id"),
            pl.col("extra_positives").list.eval(pl.element().struct.field("id")),
            pl.col("negatives").list.eval(pl.element().struct.field("id")),
        ).explode()
    )
    return ids.to_series().drop_nulls().to_list()


def to_beir(triplets: pa.Table, top_grade: int, titles: pa.Table | None = None) -> Beir:
    """The triplets as a BEIR retrieval dataset, for evaluation: with BEIR's GenericDataLoader
    and EvaluateRetrieval, MTEB-style retrieval tasks, or sentence-transformers'
    InformationRetrievalEvaluator (queries, corpus, relevant_docs from the qrels of a split).

    The corpus is every passage that is a positive, a relabelled positive or a negative of any
    query (its title from `titles`, `passage_id, title`, else ""). The qrels are graded: the
    positive gets `top_grade`, a relabelled positive its grade (else `top_grade`), a written or
    judged negative its grade when above 0; ungraded mined negatives are not listed (relevance
    0 is implicit), so they only stand in the corpus as distractors. One qrel per (query,
    passage), the highest grade.

    Rows with the same query text in a split (pairs mode: one row per given positive) are one
    BEIR query, with the smallest of their query ids: each of its positives is relevant to it.
    Every table is sorted by id, so the files are deterministic."""
    df = pl.from_arrow(triplets).with_columns(
        pl.col("query_id").min().over("split", "query").alias("query_id")
    )
    top = pl.lit(top_grade, dtype=pl.Int32)
    positives = df.select(
        "split",
        "query_id",
        pl.col("positive_id").alias("id"),
        pl.col("positive").alias("text"),
        top.alias("grade"),
    )
    extra = _judged_passages(df, "extra_positives").with_columns(pl.col("grade").fill_null(top))
    passages = pl.concat([positives, extra, _judged_passages(df, "negatives")])
    corpus = passages.select("id", "text").unique("id")
    if titles is not None:
        title = pl.from_arrow(titles.select(["passage_id", "title"])).unique("passage_id")
        corpus = corpus.join(title, left_on="id", right_on="passage_id", how="left")
    else:
        corpus = corpus.with_columns(pl.lit(None, dtype=pl.String).alias("title"))
    corpus = corpus.select(pl.col("id").alias("_id"), pl.col("title").fill_null(""), "text")
    queries = df.select(pl.col("query_id").alias("_id"), pl.col("query").alias("text")).unique(
        "_id"
    )
    qrels = (
        passages.filter(pl.col("grade") > 0)
        .group_by("split", "query_id", "id")
        .agg(pl.col("grade").max().alias("score"))
        .sort("split", "query_id", "id")
        .select(
            "split",
            pl.col("query_id").alias("query-id"),
            pl.col("id").alias("corpus-id"),
            "score",
        )
    )
    return Beir(corpus.sort("_id").to_arrow(), queries.sort("_id").to_arrow(), qrels.to_arrow())


def beir_files(beir: Beir) -> dict[str, bytes]:
    """The BEIR files by path under the export folder: corpus.jsonl, queries.jsonl and
    qrels/<split>.tsv (header `query-id, corpus-id, score`) for each split that has qrels."""

    def jsonl(table: pa.Table) -> bytes:
        rows = table.to_pylist()
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")

    files = {"corpus.jsonl": jsonl(beir.corpus), "queries.jsonl": jsonl(beir.queries)}
    qrels = pl.from_arrow(beir.qrels)
    for split in ("train", "eval"):
        part = qrels.filter(pl.col("split") == split).drop("split")
        if part.height:
            files[f"qrels/{split}.tsv"] = part.write_csv(separator="\t").encode("utf-8")
    return files
