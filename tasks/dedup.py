"""Deduplication: remove exact copies, cluster near duplicates, and keep every cluster.

- **Exact** duplicates are passages whose *folded* text (NFKC, lower-cased, punctuation and
  whitespace collapsed) is equal. The first member by (source, row) stays in the corpus; the
  others are counted as deduplicated.
- **Near** duplicates: MinHash signatures of word shingles (rensa, a Rust MinHash), LSH banding
  for candidate pairs, and each candidate pair *verified* by its exact shingle Jaccard, so an LSH
  false positive never joins a cluster. Near duplicates stay in the corpus: a near-identical copy
  of a positive must not become its negative (mining checks its Jaccard to the positive), but a
  looser sibling — the same text with one decisive sentence changed — is often the best hard
  negative.

Clusters are the connected components over exact and near edges; the canonical member is the
first by (source, row), and each member records its kind and Jaccard similarity to it.

`plan_dedup` streams: it reads the corpus (tables or Parquet shards) a batch at a time and keeps,
per passage, only its id, place, a 128-bit key of its folded text and one 64-bit hash per LSH
band; texts are read a second time only for the rows of LSH candidate pairs, to verify them.
The flow then writes the kept rows sorted by passage_id with a bounded external sort
(`tasks.io.write_sorted_shards`), so no step holds the corpus's texts at once.

Semantic duplicates (embedding cosine) are added after embedding by `tasks.semantic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.config import DedupConfig, PipelineConfig
from schemas.tables import CLUSTERS, PASSAGES
from tasks.io import Source, iter_batches, row_count, write_sorted_shards
from tasks.minhash import SIGNATURE_BATCH, band_hashes, components, lsh_candidates, verified_pairs
from tasks.stage import Job, Outcome, Stage
from tasks.text import fold_many, folded_text, jaccard, shingles_of


@dataclass
class DedupResult:
    passages: pa.Table  # what stays in the corpus
    clusters: pa.Table  # every member of every cluster of size > 1
    deduplicated: int  # exact copies removed


@dataclass
class DedupPlan:
    """What dedup decided, without any passage text: which rows stay and the clusters."""

    keep: pa.Table  # (shard, position) of each row that stays (one per exact group)
    clusters: pa.Table  # every member of every cluster of size > 1
    rows_in: int
    exact_copies: int = 0  # rows joined to an earlier one by an exact edge (not kept)

    @property
    def deduplicated(self) -> int:
        return self.rows_in - self.keep.num_rows


def _scan(sources: list[Source], cfg: DedupConfig) -> tuple[pl.DataFrame, np.ndarray | None]:
    """One pass over the corpus: per row its identity, exact key and LSH band hashes (rows
    in scan order; a row with no words gets no bands)."""
    columns = ["passage_id", "text", "source", "row"]
    frames, start = [], 0
    bands = np.zeros((row_count(sources), cfg.num_bands), dtype=np.uint64) if cfg.near else None
    for shard, offset, batch in iter_batches(sources, columns, SIGNATURE_BATCH):
        df = pl.from_arrow(batch).with_columns(folded_text().alias("_folded"))
        has_words = pl.col("_folded").str.len_bytes() > 0
        frames.append(
            df.select(
                "passage_id",
                "source",
                "row",
                pl.lit(shard, dtype=pl.Int32).alias("shard"),
                pl.int_range(offset, offset + df.height, dtype=pl.Int64).alias("position"),
                # 128 bits of the folded text: equal keys are equal texts
                pl.col("_folded").hash(seed=1).alias("k1"),
                pl.col("_folded").hash(seed=2).alias("k2"),
                has_words.alias("has_words"),
            )
        )
        if bands is not None:
            rows = start + np.flatnonzero(frames[-1]["has_words"].to_numpy())
            bands[rows] = band_hashes(df.filter(has_words)["_folded"], cfg)
        start += df.height
    meta = pl.concat(frames) if frames else pl.DataFrame()
    return meta, bands


def _texts_at(
    sources: list[Source], wanted: pl.DataFrame, cfg: DedupConfig
) -> dict[int, frozenset[str]]:
    """Shingle sets of the rows in `wanted` (i, shard, position), read in a second pass."""
    out: dict[int, frozenset[str]] = {}
    if wanted.is_empty():
        return out
    for shard, offset, batch in iter_batches(sources, ["text"], SIGNATURE_BATCH):
        hit = wanted.filter(
            (pl.col("shard") == shard)
            & (pl.col("position") >= offset)
            & (pl.col("position") < offset + batch.num_rows)
        )
        if hit.is_empty():
            continue
        texts = batch.column(0).take(pa.array(hit["position"] - offset)).to_pylist()
        for i, folded in zip(hit["i"].to_list(), fold_many(texts), strict=True):
            out[i] = shingles_of(folded, cfg.shingle_size)
    return out


def plan_dedup(sources: list[Source], cfg: DedupConfig) -> DedupPlan:
    """Exact and near-duplicate clusters of a corpus given as tables or Parquet files, read in
    batches (see module docstring). Memory: per passage its id, source, exact key and band
    hashes; texts only one batch at a time, and again for the rows of LSH candidate pairs."""
    meta, bands = _scan(sources, cfg)
    n = meta.height
    if n == 0:
        keep = pa.table({"shard": pa.array([], pa.int32()), "position": pa.array([], pa.int64())})
        return DedupPlan(keep, CLUSTERS.empty_table(), 0)
    # i: the row's place in (source, row) order; the first member of a group is its smallest i.
    meta = (
        meta.with_row_index("scan")
        .sort("source", "row", "scan")
        .with_row_index("i")
        .with_columns(
            pl.col("i").min().over(["k1", "k2"] if cfg.exact else ["passage_id"]).alias("rep")
        )
    )
    exact_edges = meta.filter(pl.col("i") != pl.col("rep")).select("rep", "i").to_numpy()
    edges = [exact_edges.astype(np.int64)]
    shingles: dict[int, frozenset[str]] = {}
    if cfg.near and bands is not None:
        reps = meta.filter((pl.col("i") == pl.col("rep")) & pl.col("has_words"))
        candidates = reps["i"].to_numpy()[lsh_candidates(bands[reps["scan"].to_numpy()])]
        del bands
        involved = meta[np.unique(candidates)].select("i", "shard", "position")
        shingles = _texts_at(sources, involved, cfg)
        near = verified_pairs(candidates, shingles, cfg.near_threshold)
        edges.append(np.array([(i, j) for i, j, _ in near], dtype=np.int64).reshape(-1, 2))
    root = components(n, np.concatenate(edges))
    keep = meta.filter(pl.col("i") == pl.col("rep")).select("shard", "position").to_arrow()
    return DedupPlan(keep, _cluster_members(meta, root, shingles), n, len(exact_edges))


def _cluster_members(
    meta: pl.DataFrame, root: np.ndarray, shingles: dict[int, frozenset[str]]
) -> pa.Table:
    """The clusters table: every member of a component of size > 1, its kind (exact when it
    has an exact twin in the cluster) and its Jaccard to the canonical (first) member."""
    df = meta.with_columns(pl.Series("root", root))
    df = df.filter(pl.len().over("root") > 1)
    if df.is_empty():
        return CLUSTERS.empty_table()
    roots = meta.select(
        pl.col("i").alias("root"),
        pl.col("passage_id").alias("cluster_id"),
        pl.col("k1").alias("rk1"),
        pl.col("k2").alias("rk2"),
    )
    df = df.join(roots, on="root", how="left").sort("i")
    same_text = (pl.col("k1") == pl.col("rk1")) & (pl.col("k2") == pl.col("rk2"))
    # Exact twins have the same folded text, so their representative's shingles stand for them.
    sims = [
        1.0 if same else jaccard(shingles[rep], shingles[r])
        for same, rep, r in df.select(same_text, "rep", "root").iter_rows()
    ]
    members = df.with_columns(
        pl.Series("similarity", sims, dtype=pl.Float32),
        pl.when(pl.len().over("root", "k1", "k2") > 1)
        .then(pl.lit("exact"))
        .otherwise(pl.lit("near"))
        .alias("kind"),
        (pl.col("i") == pl.col("root")).alias("is_canonical"),
    )
    return members.select(CLUSTERS.names).to_arrow().cast(CLUSTERS)


def deduplicate(passages: pa.Table, cfg: DedupConfig) -> DedupResult:
    """Exact copies removed, exact and near clusters recorded (see module docstring); the
    kept passages in (source, row) order."""
    plan = plan_dedup([passages], cfg)
    if plan.rows_in == 0:
        return DedupResult(passages, plan.clusters, 0)
    kept = passages.take(plan.keep.column("position")).select(PASSAGES.names).cast(PASSAGES)
    return DedupResult(kept, plan.clusters, plan.deduplicated)


def exact_dedup(passages: pa.Table) -> DedupResult:
    """Exact duplicates only (no near-duplicate clustering)."""
    return deduplicate(passages, DedupConfig(near=False))


class DedupStage(Stage):
    """The whole corpus at once: kept passages in shards sorted by passage_id, and clusters."""

    name = "dedup"
    version = "1"
    whole = ("ingested",)
    outputs = ("passages", "clusters")
    # Polars' string hash makes the exact keys and shingle hashes; rensa the signatures.
    libraries = ("polars", "rensa", "numpy", "scipy", "pyarrow")

    def settings(self, cfg: PipelineConfig) -> Any:
        return [cfg.dedup.model_dump(mode="json"), cfg.output.shard_size]

    def run(self, job: Job) -> Outcome:
        files = job.paths("ingested")
        plan = plan_dedup(files, job.cfg.dedup)
        # The kept rows sorted by passage_id (an external sort: no job holds every text).
        written = 0

        def write(table: pa.Table) -> None:
            nonlocal written
            job.write("passages", table)
            written += table.num_rows

        shards = write_sorted_shards(
            files, plan.keep, "passage_id", job.cfg.output.shard_size, PASSAGES, write
        )
        job.write("clusters", plan.clusters)
        kinds = plan.clusters.column("kind").to_pylist()
        return Outcome(
            rows_out=written,  # counted as written: a lost row unbalances the job
            deduplicated=plan.exact_copies,
            stats={
                "clusters": len(set(plan.clusters.column("cluster_id").to_pylist())),
                "cluster_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
                "cluster_members": plan.clusters.num_rows,
                "shards": shards,
            },
        )
