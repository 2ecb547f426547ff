"""Near-duplicate search over word shingles: MinHash signatures (rensa), LSH bands hashed and
matched in NumPy, candidate pairs verified by exact Jaccard, connected components (scipy).

Shared by dedup (passages), query dedup, and the leakage report (queries across splits)."""

from __future__ import annotations

import numpy as np
import polars as pl
from rensa import RMinHash

from schemas.config import DedupConfig
from tasks.text import jaccard, shingles_of

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
