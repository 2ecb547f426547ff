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

- **Semantic** duplicates (optional, after embedding): `semantic_clusters` joins passages whose
  embedding cosine is >= a threshold (paraphrases that share few words) into the clusters, as
  kind `semantic` with the cosine as similarity. They too stay in the corpus; mining never
  uses one as a negative of a positive it paraphrases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
from rensa import RMinHash

from schemas.config import DedupConfig
from schemas.tables import CLUSTERS, PASSAGES
from tasks.io import Source, iter_batches, row_count


@dataclass
class DedupResult:
    passages: pa.Table  # what stays in the corpus
    clusters: pa.Table  # every member of every cluster of size > 1
    deduplicated: int  # exact copies removed


def folded_text(col: str = "text") -> pl.Expr:
    """Case-, width- and punctuation-insensitive form of a text column (the exact-dedup key)."""
    return (
        pl.col(col)
        .str.normalize("NFKC")
        .str.to_lowercase()
        .str.replace_all(r"[\W_]+", " ")
        .str.strip_chars()
    )


def fold_many(texts: list[str]) -> list[str]:
    """`folded_text` for a list of strings (one Polars call: the same folding everywhere)."""
    return (
        pl.DataFrame({"text": texts}, schema={"text": pl.String})
        .select(folded_text())["text"]
        .to_list()
    )


def shingles_of(folded: str, size: int) -> frozenset[str]:
    """Word n-grams of an already folded text; a text shorter than n words is one shingle."""
    words = folded.split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def shingle_sets(texts: list[str], size: int) -> list[frozenset[str]]:
    return [shingles_of(f, size) for f in fold_many(texts)]


def shingle_set(text: str, size: int) -> frozenset[str]:
    return shingle_sets([text], size)[0]


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# Rows read, folded and signed at once: one batch of texts and their shingles is alive at a
# time; what is kept per passage is its id, place, exact key and one 64-bit hash per LSH band
# (num_bands x 8 bytes).
SIGNATURE_BATCH = 8192
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio)


def shingle_hashes(folded: pl.Series, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, offsets): 64-bit hashes of the word shingles of each folded, non-empty text,
    flat, text k's in hashes[offsets[k]:offsets[k + 1]]. The same shingles as `shingles_of`
    (a text shorter than `size` words is one shingle), made in Polars rather than Python."""
    words = pl.DataFrame({"text": folded}).with_row_index("doc")
    words = words.with_columns(pl.col("text").str.split(" ").alias("word"))
    words = words.with_columns(pl.col("word").list.len().alias("n")).explode("word")
    doc = pl.col("doc")
    shingle = (
        pl.when(pl.col("n") < size)
        .then(pl.when(doc != doc.shift(1).fill_null(-1)).then(pl.col("text")))
        .when(doc.shift(-(size - 1)) == doc)
        .then(pl.concat_str([pl.col("word").shift(-k) for k in range(size)], separator=" "))
    )
    flat = words.select(doc, shingle.alias("shingle")).drop_nulls("shingle")
    hashes = flat["shingle"].hash(seed=3).to_numpy()
    counts = flat.group_by("doc", maintain_order=True).len()["len"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
    return hashes, offsets


def band_hashes(folded: pl.Series, cfg: DedupConfig) -> np.ndarray:
    """(len(folded), num_bands) uint64 for non-empty folded texts: each band of a text's MinHash
    signature (rensa, over its word shingles) hashed to one number. Two texts are an LSH
    candidate pair when any band's hash is equal; a collision of different bands only adds a
    candidate that verification rejects."""
    if folded.len() == 0:
        return np.empty((0, cfg.num_bands), dtype=np.uint64)
    hashes, offsets = shingle_hashes(folded, cfg.shingle_size)
    digests = RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, cfg.num_perm, cfg.seed)
    signatures = np.asarray(digests.to_rows(), dtype=np.uint64).reshape(
        folded.len(), cfg.num_bands, cfg.num_perm // cfg.num_bands
    )
    hashed = np.zeros(signatures.shape[:2], dtype=np.uint64)
    for k in range(signatures.shape[2]):  # polynomial hash of the band's values, mod 2**64
        hashed = hashed * _MIX + signatures[:, :, k] + np.uint64(1)
    return hashed


def lsh_candidates(bands: np.ndarray) -> np.ndarray:
    """(m, 2) int64 row pairs (i < j, unique) whose hashes are equal in at least one band.

    One band at a time: sort its hashes, take runs of equal ones. Runs of two (the common case)
    are paired in one vectorized step; longer runs give all their pairs."""
    n = bands.shape[0]
    found: list[np.ndarray] = []
    for b in range(bands.shape[1]):
        order = np.argsort(bands[:, b], kind="stable")
        hashes = bands[order, b]
        starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
        lengths = np.diff(np.r_[starts, n])
        two = starts[lengths == 2]
        found.append(np.stack([order[two], order[two + 1]], axis=1))
        for start, length in zip(starts[lengths > 2], lengths[lengths > 2], strict=True):
            members = order[start : start + length]
            i, j = np.triu_indices(length, 1)
            found.append(np.stack([members[i], members[j]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def verified_pairs(
    candidates: np.ndarray, shingles: dict[int, frozenset[str]], threshold: float
) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) of the candidate pairs whose exact shingle Jaccard is >= threshold."""
    pairs = []
    for i, j in candidates.tolist():
        sim = jaccard(shingles[i], shingles[j])
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs


def near_duplicate_pairs(
    folded: list[str], cfg: DedupConfig, batch_size: int = SIGNATURE_BATCH
) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with i < j for every pair of folded texts whose verified shingle Jaccard
    >= cfg.near_threshold (texts in memory: queries, benchmarks; `plan_dedup` streams)."""
    rows = np.array([i for i, text in enumerate(folded) if text.strip()], dtype=np.int64)
    if len(rows) < 2:
        return []
    bands = np.concatenate(
        [
            band_hashes(pl.Series([folded[i] for i in rows[start : start + batch_size]]), cfg)
            for start in range(0, len(rows), batch_size)
        ]
    )
    candidates = rows[lsh_candidates(bands)]
    involved = np.unique(candidates).tolist()
    shingles = {i: shingles_of(folded[i], cfg.shingle_size) for i in involved}
    return verified_pairs(candidates, shingles, cfg.near_threshold)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """For each of n nodes, the smallest node of its connected component ((m, 2) edges)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.empty(0, dtype=np.int64)
    edges = edges.reshape(-1, 2)
    graph = coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n)
    )
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return smallest[labels]


@dataclass
class DedupPlan:
    """What dedup decided, without any passage text: which rows stay and the clusters."""

    keep: pa.Table  # (shard, position) of each row that stays (one per exact group)
    clusters: pa.Table  # every member of every cluster of size > 1
    rows_in: int

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
    return DedupPlan(keep, _cluster_members(meta, root, shingles), n)


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
    from tasks.mine import exact_topk

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
