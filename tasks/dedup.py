"""Deduplication: collapse passages that are the same text, and keep the clusters.

Exact duplicates are passages whose *folded* text (case-folded, punctuation and whitespace removed)
is equal. One member per cluster (the first by source and row) stays in the corpus; the others are
counted as deduplicated. The clusters table keeps every member, so downstream stages know that a
copy of a positive is never a valid negative for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from schemas.tables import CLUSTERS, PASSAGES


@dataclass
class DedupResult:
    passages: pa.Table  # canonical members only
    clusters: pa.Table  # every member of every cluster of size > 1
    deduplicated: int


def folded_text(col: str = "text") -> pl.Expr:
    """Case-, width- and punctuation-insensitive form of a text column (the exact-dedup key)."""
    return (
        pl.col(col)
        .str.normalize("NFKC")
        .str.to_lowercase()
        .str.replace_all(r"[\W_]+", " ")
        .str.strip_chars()
    )


def exact_dedup(passages: pa.Table) -> DedupResult:
    """Keep the first member (by source, row) of each exact-duplicate group."""
    if passages.num_rows == 0:
        return DedupResult(passages, CLUSTERS.empty_table(), 0)
    df = (
        pl.from_arrow(passages)
        .with_columns(folded_text().alias("_key"))
        .sort("source", "row")
        .with_columns(
            pl.col("passage_id").first().over("_key").alias("cluster_id"),
            pl.len().over("_key").alias("_size"),
        )
    )
    canonical = df.filter(pl.col("passage_id") == pl.col("cluster_id")).unique(
        "cluster_id", keep="first", maintain_order=True
    )
    # Identical normalized texts share a passage_id: only the first row is canonical.
    canonical_rows = canonical.select("source", "row").with_columns(pl.lit(True).alias("_canon"))
    members = (
        df.filter(pl.col("_size") > 1)
        .join(canonical_rows, on=["source", "row"], how="left")
        .select(
            "passage_id",
            "cluster_id",
            pl.lit("exact").alias("kind"),
            pl.lit(1.0, dtype=pl.Float32).alias("similarity"),
            pl.col("_canon").fill_null(False).alias("is_canonical"),
            "source",
            "row",
        )
    )
    kept = canonical.select(PASSAGES.names).to_arrow().cast(PASSAGES)
    clusters = members.to_arrow().cast(CLUSTERS)
    return DedupResult(kept, clusters, passages.num_rows - kept.num_rows)
