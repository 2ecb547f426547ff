"""pairs mode: turn ingested (query, positive) rows into the queries table the miner reads."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from schemas.config import PipelineConfig
from schemas.tables import QUERIES
from tasks.io import Source, ids_in, iter_batches, slice_table
from tasks.stage import Job, Outcome, Stage
from tasks.text import folded_text

BATCH = 65_536  # corpus rows read at a time
GIVEN = "given"  # style / model / backend / prompt_version of a query the user supplied


def given_query_id(query: str, passage_id: str) -> str:
    return hashlib.blake2b(f"{query}|{passage_id}".encode(), digest_size=16).hexdigest()


def queries_from_pairs(
    pairs: pa.Table, positives: pa.Table, kept: Sequence[Source]
) -> tuple[pa.Table, int]:
    """One query row per distinct (query, positive); returns (queries, duplicates collapsed).

    `kept`: the deduplicated corpus (tables or Parquet shards), read in batches. A positive that
    dedup removed as an exact copy is replaced by the copy that was kept (same folded text), so
    every query points at a passage of the corpus.
    """
    kept_ids = pl.concat(
        [pl.from_arrow(b.column(0)) for _, _, b in iter_batches(kept, ["passage_id"], BATCH)]
        or [pl.Series("passage_id", [], dtype=pl.String)]
    )
    removed = (
        pl.from_arrow(positives.select(["passage_id", "text"]))
        .unique("passage_id")
        .filter(~pl.col("passage_id").is_in(kept_ids.implode()))
        .with_columns(folded_text().alias("key"))
    )
    canonical = [removed.select("passage_id", pl.lit(None, dtype=pl.String).alias("kept_id"))]
    if removed.height:  # only then are the corpus's texts read, a batch at a time
        wanted = removed.select("passage_id", "key")
        for _, _, batch in iter_batches(kept, ["passage_id", "text"], BATCH):
            found = pl.from_arrow(batch).select(
                pl.col("passage_id").alias("kept_id"), folded_text().alias("key")
            )
            canonical.append(wanted.join(found, on="key").select("passage_id", "kept_id"))
    mapping = (
        pl.concat(canonical)
        .sort("kept_id", nulls_last=True)
        .unique("passage_id", keep="first", maintain_order=True)
    )
    df = (
        pl.from_arrow(pairs.select(["query", "passage_id"]))
        .join(mapping, on="passage_id", how="left")
        .with_columns(
            pl.when(pl.col("passage_id").is_in(kept_ids.implode()))
            .then(pl.col("passage_id"))
            .otherwise(pl.col("kept_id"))
            .alias("passage_id")
        )
    )
    if df["passage_id"].null_count():
        raise ValueError("a positive is neither in the corpus nor an exact copy of a passage in it")
    ids = [given_query_id(q, p) for q, p in df.select("query", "passage_id").iter_rows()]
    queries = (
        df.with_columns(pl.Series("query_id", ids, dtype=pl.String))
        .unique("query_id", keep="first", maintain_order=True)
        .select(
            "query_id",
            "passage_id",
            "query",
            pl.lit(GIVEN).alias("style"),
            pl.lit(GIVEN).alias("model"),
            pl.lit(GIVEN).alias("backend"),
            pl.lit(GIVEN).alias("prompt_version"),
            pl.lit("{}").alias("sampling"),
            pl.lit(0, dtype=pl.Int64).alias("seed"),
            pl.lit(0, dtype=pl.Int8).alias("attempt"),
            pl.lit(0, dtype=pl.Int32).alias("output_tokens"),
        )
    )
    return queries.to_arrow().cast(QUERIES), df.height - queries.height


def positives_by_query(queries: pa.Table) -> pl.DataFrame:
    """(query, passage_id): every known positive of every query text. A candidate whose
    (query text, passage) is in here is another known positive of its query and must never be
    its negative. Mining joins candidates against it, which stays linear even when many
    passages share one generic query text (a pairwise table would be quadratic)."""
    return pl.from_arrow(queries.select(["query", "passage_id"])).unique()


class PairsStage(Stage):
    """pairs mode, instead of generation: the queries table from the user's pairs, in shards."""

    name = "pairs"
    version = "1"
    whole = ("pairs", "ingested", "passages")
    outputs = ("queries",)
    libraries = ("polars", "pyarrow")

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.input.mode == "pairs"

    def settings(self, cfg: PipelineConfig) -> Any:
        return cfg.output.shard_size

    def run(self, job: Job) -> Outcome:
        pairs = job.read("pairs")
        positives = job.read(
            "ingested",
            columns=["passage_id", "text"],
            where=ids_in("passage_id", pairs.column("passage_id").to_pylist()),
        )
        queries, duplicates = queries_from_pairs(pairs, positives, job.paths("passages"))
        for part in slice_table(queries.sort_by("query_id"), job.cfg.output.shard_size):
            job.write("queries", part)
        return Outcome(rows_out=queries.num_rows, deduplicated=duplicates)
