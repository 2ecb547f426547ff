"""Query dedup: near-identical queries (embedding cosine >= `queries.dedup_threshold`) for the
same positive (or a near-copy of it: the same duplicate cluster) teach the same thing twice, as
the five query styles of one passage often do. One of each group is kept; the others are
`duplicate_query`.

Near-identical queries for *different* positives are kept: "compress or decompress lz4 files"
and "... xz files" are different questions, and each one's answer is the other's best hard
negative (on the man-page benchmark, removing them and treating the other positive as a known
positive cost nDCG; benchmarks/RESULTS.md). Queries with the same (folded) text are one query
with several positives (pairs mode), not duplicates: they are kept together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.config import PipelineConfig
from schemas.tables import QUERY_DUPLICATES
from tasks.embedder import table_to_matrix
from tasks.minhash import components
from tasks.search import topk
from tasks.stage import Job, Outcome, Stage
from tasks.text import fold_many

NEIGHBOURS = 10


def near_duplicate_queries(
    queries: pa.Table,
    vectors: np.ndarray,
    threshold: float,
    ann: bool = False,
    cluster_of: dict[str, str] | None = None,
) -> pa.Table:
    """(query_id, duplicate_of, positive_id, similarity) of every query removed as a
    near-duplicate: in a group of queries for one positive cluster joined by cosine >=
    threshold, the first by query_id is kept with every query of the same folded text; the
    others point at it."""
    ids = queries.column("query_id").to_pylist()
    if len(ids) < 2:
        return QUERY_DUPLICATES.empty_table()
    positives = queries.column("passage_id").to_pylist()
    cluster = np.array([(cluster_of or {}).get(p, p) for p in positives], dtype=object)
    idx, scores = topk(vectors, vectors, min(NEIGHBOURS + 1, len(ids)), ann)
    rows = np.repeat(np.arange(len(ids)), idx.shape[1])
    cols, sims = idx.reshape(-1), scores.reshape(-1)
    hit = (sims >= threshold) & (cols != rows) & (cols >= 0)
    hit &= cluster[rows] == cluster[np.where(cols >= 0, cols, 0)]  # one positive (cluster)
    edges = np.stack([rows[hit], cols[hit]], axis=1)
    df = pl.DataFrame(
        {
            "query_id": ids,
            "positive_id": queries.column("passage_id").to_pylist(),
            "text": fold_many(queries.column("query").to_pylist()),
        }
    ).with_row_index("i")
    # Queries of the same folded text are one query: join them first.
    same = df.group_by("text").agg(pl.col("i").min().alias("first"))
    same_edges = df.join(same, on="text").select("i", "first").to_numpy()
    root = components(len(ids), np.concatenate([edges, same_edges]).astype(np.int64))
    df = df.with_columns(pl.Series("root", root))
    keeper = (
        df.sort("query_id")
        .group_by("root", maintain_order=True)
        .agg(pl.col("query_id").first().alias("duplicate_of"), pl.col("text").first().alias("kept"))
    )
    best = (
        pl.DataFrame(
            {"i": rows[hit].astype(np.uint32), "similarity": sims[hit]},
            schema={"i": pl.UInt32, "similarity": pl.Float32},
        )
        .group_by("i")
        .agg(pl.col("similarity").max())
    )
    out = (
        df.join(keeper, on="root")
        .filter(pl.col("text") != pl.col("kept"))
        .join(best, on="i", how="left")
        .sort("query_id")
        .select("query_id", "duplicate_of", "positive_id", pl.col("similarity").fill_null(1.0))
    )
    return out.to_arrow().cast(QUERY_DUPLICATES)


class QueryDedupStage(Stage):
    name = "query_dedup"
    version = "2"
    whole = ("queries", "embeddings.queries", "clusters")
    outputs = ("query_duplicates",)
    libraries = ("faiss-cpu", "polars", "numpy", "scipy")

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.queries.dedup_threshold is not None

    def settings(self, cfg: PipelineConfig) -> Any:
        return [cfg.queries.dedup_threshold, cfg.mining.search, cfg.mining.ann_min_corpus]

    def run(self, job: Job) -> Outcome:
        queries = job.read("queries", columns=["query_id", "passage_id", "query"])
        ids, vectors = table_to_matrix(job.read("embeddings.queries"))
        order = {q: i for i, q in enumerate(ids)}
        vectors = vectors[[order[q] for q in queries.column("query_id").to_pylist()]]
        cfg = job.cfg
        ann = cfg.mining.search == "ann" or (
            cfg.mining.search == "auto" and len(ids) >= cfg.mining.ann_min_corpus
        )
        clusters = job.read("clusters", columns=["passage_id", "cluster_id"])
        cluster_of = dict(
            zip(clusters["passage_id"].to_pylist(), clusters["cluster_id"].to_pylist(), strict=True)
        )
        duplicates = near_duplicate_queries(
            queries, vectors, cfg.queries.dedup_threshold, ann, cluster_of
        )
        job.write("query_duplicates", duplicates)
        return Outcome(
            rows_out=queries.num_rows - duplicates.num_rows, deduplicated=duplicates.num_rows
        )
