"""Semantic dedup (optional, after embedding): passages whose embedding cosine is >= a threshold
(paraphrases that share few words) join the duplicate clusters as kind `semantic`, with the
cosine as similarity. They stay in the corpus; mining never uses one as a negative of a
positive it paraphrases."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.config import PipelineConfig
from schemas.tables import CLUSTERS
from tasks.embedder import table_to_matrix
from tasks.minhash import components
from tasks.search import exact_topk
from tasks.stage import Job, Outcome, Stage


def semantic_clusters(
    clusters: pa.Table,
    passages: pa.Table,
    ids: list[str],
    vectors: np.ndarray,
    threshold: float,
    neighbours: int = 10,
) -> pa.Table:
    """The clusters table with semantic edges added: every pair of corpus passages whose
    embedding cosine is >= `threshold` (among each one's `neighbours` nearest, exact faiss
    k-NN) is joined; clusters that a semantic edge connects merge. Members already in a cluster
    keep their kind and similarity; members joined only by a semantic edge get kind `semantic`
    and their best cosine. The canonical member stays the first by (source, row)."""
    if len(ids) < 2:
        return clusters
    idx, scores = exact_topk(vectors, vectors, min(neighbours + 1, len(ids)))
    rows_i = np.repeat(np.arange(len(ids)), idx.shape[1])
    flat_j, flat_s = idx.reshape(-1), scores.reshape(-1)
    hit = (flat_s >= threshold) & (flat_j != rows_i) & (flat_j >= 0)
    sem = pl.DataFrame(
        {
            "a": np.asarray(ids, dtype=object)[rows_i[hit]],
            "b": np.asarray(ids, dtype=object)[flat_j[hit]],
            "cos": flat_s[hit],
        },
        schema={"a": pl.String, "b": pl.String, "cos": pl.Float32},
    )
    if sem.is_empty():
        return clusters
    old = pl.from_arrow(clusters)
    where = pl.concat(
        [
            old.select("passage_id", "source", "row"),
            pl.from_arrow(passages.select(["passage_id", "source", "row"])),
        ]
    ).unique("passage_id", keep="first")
    nodes = (
        pl.concat([old["passage_id"], sem["a"], sem["b"]])
        .unique()
        .to_frame("passage_id")
        .join(where, on="passage_id", how="left")
        .sort("source", "row", "passage_id")
        .with_row_index("i")
    )
    index = nodes.select("passage_id", "i")
    edges = pl.concat(
        [
            sem.select(pl.col("a").alias("x"), pl.col("b").alias("y")),
            old.select(pl.col("passage_id").alias("x"), pl.col("cluster_id").alias("y")),
        ]
    )
    for col in ("x", "y"):
        edges = edges.join(index.rename({"passage_id": col, "i": f"{col}_i"}), on=col)
    root = components(nodes.height, edges.select("x_i", "y_i").to_numpy().astype(np.int64))
    best = sem.group_by("a").agg(pl.col("cos").max()).rename({"a": "passage_id"})
    out = (
        nodes.with_columns(nodes["passage_id"].gather(root).alias("cluster_id"))
        .join(old.select("passage_id", "kind", "similarity"), on="passage_id", how="left")
        .join(best, on="passage_id", how="left")
        .with_columns(
            pl.col("kind").fill_null(pl.lit("semantic")),
            pl.col("similarity").fill_null(pl.col("cos")).cast(pl.Float32),
            (pl.col("passage_id") == pl.col("cluster_id")).alias("is_canonical"),
        )
    )
    return out.select(CLUSTERS.names).to_arrow().cast(CLUSTERS)


class SemanticDedupStage(Stage):
    name = "semantic_dedup"
    version = "1"
    whole = ("clusters", "passages", "embeddings.passages")
    outputs = ("clusters",)
    libraries = ("faiss-cpu", "polars", "numpy", "scipy", "pyarrow")

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.dedup.semantic

    def settings(self, cfg: PipelineConfig) -> Any:
        return [cfg.dedup.semantic_threshold, cfg.dedup.semantic_neighbours]

    def rows_in(self, job: Job) -> int:
        return sum(job.rows("passages"))

    def run(self, job: Job) -> Outcome:
        ids, vectors = table_to_matrix(job.read("embeddings.passages"))
        table = semantic_clusters(
            job.read("clusters"),
            job.read("passages", columns=["passage_id", "source", "row"]),
            ids,
            vectors,
            job.cfg.dedup.semantic_threshold,
            job.cfg.dedup.semantic_neighbours,
        )
        job.write("clusters", table)
        kinds = table.column("kind").to_pylist()
        return Outcome(
            rows_out=self.rows_in(job),
            stats={
                "clusters": len(set(table.column("cluster_id").to_pylist())),
                "cluster_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
                "cluster_members": table.num_rows,
            },
        )
