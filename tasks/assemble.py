"""Assemble: triplets from queries, passages and kept negatives; the train/eval split; the
cross-split leakage report; the exports (`tasks.exports`)."""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import DedupConfig, PipelineConfig, SplitConfig
from schemas.reasons import EVAL_NEGATIVES_ONLY, RELABELED
from schemas.tables import CANDIDATES, GENERATED, REJECTS, TRIPLETS
from tasks import exports
from tasks.io import ids_in, parquet_bytes, slice_table
from tasks.minhash import components, near_duplicate_pairs
from tasks.stage import Job, Outcome, Stage
from tasks.text import fold_many


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

    The split is decided by `split_units`: query texts and positive clusters that touch are on
    the same side.
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
    units = split_units(df, cluster_of)
    split_map = units.select(
        "query_id",
        pl.col("unit")
        .map_elements(lambda u: split_of(u, cfg), return_dtype=pl.String)
        .alias("split"),
    )
    df = df.join(split_map, on="query_id", how="left").sort("query_id")
    return df.select(TRIPLETS.names).to_arrow().cast(TRIPLETS)


def split_units(triplets: pl.DataFrame, cluster_of: pl.DataFrame) -> pl.DataFrame:
    """(query_id, unit): the unit a triplet is split by, the connected component of query texts
    (folded) and the duplicate clusters of their positives and relabelled extra positives. One
    query text with positives in two clusters, or one cluster reached by two query texts, is
    one unit, so no query text and no positive cluster can be on both sides."""
    extra = (
        triplets.select(
            "query_id",
            pl.col("extra_positives").list.eval(pl.element().struct.field("id")).alias("pid"),
        )
        .explode("pid")
        .drop_nulls("pid")
        .join(cluster_of.rename({"passage_id": "pid"}), on="pid", how="left")
        .with_columns(pl.col("cluster_id").fill_null(pl.col("pid")))
        .select("query_id", "cluster_id")
    )
    folded = pl.Series(fold_many(triplets["query"].to_list()))
    edges = (
        pl.concat([triplets.select("query_id", "cluster_id"), extra])
        .join(triplets.select("query_id", ("q:" + folded).alias("text")), on="query_id")
        .with_columns(("c:" + pl.col("cluster_id")).alias("cluster"))
    )
    nodes = pl.concat([edges["text"], edges["cluster"]]).unique().sort()
    index = {n: i for i, n in enumerate(nodes.to_list())}
    pairs = np.array([(index[a], index[b]) for a, b in edges.select("text", "cluster").iter_rows()])
    root = components(len(index), pairs.reshape(-1, 2).astype(np.int64))
    # a unit is named by its smallest cluster (stable under new, unrelated data)
    names = nodes.to_list()
    smallest: dict[int, str] = {}
    for i, name in enumerate(names):
        if name.startswith("c:") and root[i] not in smallest:
            smallest[root[i]] = name[2:]
    unit = {name: smallest[root[i]] for i, name in enumerate(names) if name.startswith("q:")}
    return triplets.select("query_id", ("q:" + folded).alias("text")).select(
        "query_id", pl.col("text").replace_strict(unit, return_dtype=pl.String).alias("unit")
    )


def remove_eval_negatives(
    triplets: pa.Table, clusters: pa.Table
) -> tuple[pa.Table, int, list[str]]:
    """Train negatives in the duplicate cluster of an eval positive (or extra positive) would show
    the model an eval answer: removed. Returns (triplets, negatives removed, query_ids of train
    triplets left with no negative, which are dropped)."""
    cluster_of = pl.from_arrow(clusters.select(["passage_id", "cluster_id"])).unique("passage_id")
    df = pl.from_arrow(triplets)
    positives = pl.concat(
        [
            df.filter(pl.col("split") == "eval").select(pl.col("positive_id").alias("id")),
            df.filter(pl.col("split") == "eval")
            .select(
                pl.col("extra_positives").list.eval(pl.element().struct.field("id")).alias("id")
            )
            .explode("id")
            .drop_nulls(),
        ]
    )
    eval_clusters = (
        positives.join(cluster_of.rename({"passage_id": "id"}), on="id", how="left")
        .select(pl.coalesce("cluster_id", "id"))
        .to_series()
        .unique()
    )
    eval_ids = cluster_of.filter(pl.col("cluster_id").is_in(eval_clusters.implode()))["passage_id"]
    banned = pl.concat([eval_ids, eval_clusters]).unique().implode()
    before = df["negatives"].list.len().sum()
    train = pl.col("split") == "train"
    df = df.with_columns(
        pl.when(train)
        .then(pl.col("negatives").list.filter(~pl.element().struct.field("id").is_in(banned)))
        .otherwise(pl.col("negatives"))
        .alias("negatives")
    )
    removed = int(before - df["negatives"].list.len().sum())
    empty = df.filter(train & (pl.col("negatives").list.len() == 0))["query_id"].to_list()
    df = df.filter(~pl.col("query_id").is_in(pl.Series(empty, dtype=pl.String).implode()))
    return df.to_arrow().cast(TRIPLETS), removed, empty


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


class AssembleStage(Stage):
    """The triplets of every query mining kept, split, with the leakage report and exports."""

    name = "assemble"
    version = "4"  # 4: beir export; no FlagEmbedding line without a negative
    whole = ("queries", "candidates", "passages", "clusters", "generated")
    optional = frozenset({"generated"})
    outputs = ("triplets", "rejects")
    libraries = ("polars", "pyarrow")

    def settings(self, cfg: PipelineConfig) -> Any:
        return [
            cfg.grading.top,
            cfg.max_negative_grade(),
            cfg.split.model_dump(mode="json"),
            cfg.output.model_dump(mode="json", exclude={"dir"}),
            cfg.mining.num_negatives,
        ]

    def _used(self, job: Job) -> pa.Table:
        """The candidates that reach a triplet: kept negatives and relabelled positives."""
        return job.read("candidates", where=pc.field("kept") | (pc.field("reason") == RELABELED))

    def rows_in(self, job: Job) -> int:
        """Queries mining kept: those with at least one kept negative."""
        kept = job.read("candidates", columns=["query_id"], where=pc.field("kept"))
        return len(set(kept.column("query_id").to_pylist()))

    def run(self, job: Job) -> Outcome:
        cfg = job.cfg
        queries = job.read("queries")
        used = self._used(job).cast(CANDIDATES)
        ids = queries["passage_id"].to_pylist() + used["passage_id"].to_pylist()
        clusters = job.read("clusters")
        triplets = assemble_triplets(
            queries,
            job.read("passages", columns=["passage_id", "text"], where=ids_in("passage_id", ids)),
            used,
            clusters,
            cfg.split,
            job.read("generated").cast(GENERATED) if job.has("generated") else None,
        )
        removed, dropped = 0, []
        if not cfg.split.allow_eval_negatives:
            triplets, removed, dropped = remove_eval_negatives(triplets, clusters)
        job.write("rejects", _rejects(dropped))
        for part in slice_table(triplets, cfg.output.shard_size):
            job.write("triplets", part)
        written = write_exports(job, triplets)
        splits = dict(collections.Counter(triplets.column("split").to_pylist()))
        grades = collections.Counter(
            f"{n['origin']}:{'ungraded' if n['grade'] is None else n['grade']}"
            for negs in triplets.column("negatives").to_pylist()
            for n in negs
        )
        extra = sum(len(x) for x in triplets.column("extra_positives").to_pylist())
        return Outcome(
            rows_out=triplets.num_rows,
            rejected=len(dropped),
            stats={
                "splits": splits,
                "grades": dict(sorted(grades.items())),
                "extra_positives": extra,
                "eval_positives_removed_from_train_negatives": removed,
                "leakage": leakage_report(triplets, clusters),
                "exports": written,
            },
        )


def _rejects(query_ids: list[str]) -> pa.Table:
    n = len(query_ids)
    return pa.table(
        {
            "stage": ["assemble"] * n,
            "source": query_ids,
            "row": pa.nulls(n, pa.int64()),
            "reason": [EVAL_NEGATIVES_ONLY] * n,
            "detail": ["every negative was in the cluster of an eval positive"] * n,
            "raw": pa.nulls(n, pa.string()),
        },
        schema=REJECTS,
    )


def write_exports(job: Job, triplets: pa.Table) -> dict[str, Any]:
    """The configured exports under exports/, per split; returns their row counts."""
    cfg = job.cfg
    max_grade = cfg.max_negative_grade()
    out: dict[str, Any] = {}

    def by_split(table: pa.Table, name: str) -> dict[str, int]:
        rows = {}
        for split in ("train", "eval"):
            part = table.filter(pc.equal(table["split"], split)).drop(["split"])
            if part.num_rows:
                job.write_file(f"exports/{name}/{split}.parquet", parquet_bytes(part))
                rows[split] = part.num_rows
        return rows

    if "sentence_transformers" in cfg.output.exports:
        table, skipped = exports.to_sentence_transformers(
            triplets, cfg.mining.num_negatives, max_grade
        )
        out["sentence_transformers"] = {
            "rows": by_split(table, "sentence_transformers"),
            "skipped_too_few_negatives": skipped,
        }
    if "flagembedding" in cfg.output.exports:
        counts = {}
        for split, lines in exports.to_flagembedding_lines(triplets, max_grade).items():
            data = ("\n".join(lines) + "\n").encode("utf-8")
            job.write_file(f"exports/flagembedding/{split}.jsonl", data)
            counts[split] = len(lines)
        out["flagembedding"] = {
            "rows": counts,
            "skipped_no_negatives": triplets.num_rows - sum(counts.values()),
        }
    if "listwise" in cfg.output.exports:
        listwise = exports.to_listwise(triplets, cfg.grading.top)
        out["listwise"] = {"rows": by_split(listwise, "listwise")}
    if "beir" in cfg.output.exports:
        ids = ids_in("passage_id", exports.corpus_ids(triplets))
        titles = job.read("passages", columns=["passage_id", "title"], where=ids)
        beir = exports.to_beir(triplets, cfg.grading.top, titles)
        for relpath, data in exports.beir_files(beir).items():
            job.write_file(f"exports/beir/{relpath}", data)
        per_split = (
            pl.from_arrow(beir.qrels)
            .group_by("split")
            .agg(pl.col("query-id").n_unique().alias("queries"), pl.len().alias("qrels"))
        )
        splits = {row["split"]: row for row in per_split.to_dicts()}
        out["beir"] = {  # rows: BEIR queries per split
            "rows": {s: splits[s]["queries"] for s in ("train", "eval") if s in splits},
            "qrels": {s: splits[s]["qrels"] for s in ("train", "eval") if s in splits},
            "corpus": beir.corpus.num_rows,
        }
    return out
