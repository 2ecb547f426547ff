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
from rensa import RMinHash, RMinHashLSH

from schemas.config import DedupConfig
from schemas.tables import CLUSTERS, PASSAGES


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


# Passages shingled at once while computing signatures: only one batch of shingle sets (~10 KB a
# passage as Python strings) is ever alive, the signatures (num_perm x 4 bytes) are kept.
SIGNATURE_BATCH = 8192


def near_duplicate_pairs(
    folded: list[str], cfg: DedupConfig, batch_size: int = SIGNATURE_BATCH
) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with i < j for every pair of folded texts whose verified shingle Jaccard
    >= cfg.near_threshold.

    Memory follows the signatures, not the shingles: signatures are computed batch by batch,
    and shingle sets are made again only for the texts of LSH candidate pairs, to verify them.
    """
    size = cfg.shingle_size
    rows = [i for i, text in enumerate(folded) if text.strip()]  # a text with no words has none
    if len(rows) < 2:
        return []
    minhashes = []
    for start in range(0, len(rows), batch_size):
        chunk = [list(shingles_of(folded[i], size)) for i in rows[start : start + batch_size]]
        minhashes += RMinHash.from_token_sets(chunk, cfg.num_perm, cfg.seed)
    lsh = RMinHashLSH(cfg.near_threshold, cfg.num_perm, cfg.num_bands)
    lsh.insert_many(minhashes)
    candidates = [
        (rows[a], rows[b])
        for a, found in enumerate(lsh.query_all(minhashes))
        for b in found
        if b > a
    ]
    del minhashes, lsh
    involved = sorted({i for pair in candidates for i in pair})
    shingles = {i: shingles_of(folded[i], size) for i in involved}
    pairs = []
    for i, j in candidates:
        sim = jaccard(shingles[i], shingles[j])
        if sim >= cfg.near_threshold:
            pairs.append((i, j, sim))
    return pairs


def _components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Union-find: the smallest index of each node's connected component."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


def deduplicate(passages: pa.Table, cfg: DedupConfig) -> DedupResult:
    """Exact copies removed, exact and near clusters recorded (see module docstring)."""
    if passages.num_rows == 0:
        return DedupResult(passages, CLUSTERS.empty_table(), 0)
    df = (
        pl.from_arrow(passages)
        .sort("source", "row")
        .with_columns(folded_text().alias("_key"))
        .with_row_index("_i")
    )
    n = df.height
    # Exact edges: every member to the first member of its folded-text group.
    edges: list[tuple[int, int]] = []
    if cfg.exact:
        first = df.group_by("_key", maintain_order=True).agg(pl.col("_i").first().alias("_f"))
        pairs = df.join(first, on="_key").filter(pl.col("_i") != pl.col("_f"))
        edges += list(zip(pairs["_f"].to_list(), pairs["_i"].to_list(), strict=True))
    # Without exact dedup, passages with the same id (same normalized text) still collapse:
    # the id is the passage's identity.
    group = "_key" if cfg.exact else "passage_id"
    exact_first = df.group_by(group, maintain_order=True).agg(pl.col("_i").first())["_i"].to_list()
    # Near edges among one representative per exact group.
    keys = df["_key"].to_list()  # folded texts
    if cfg.near:
        reps = exact_first
        pairs = near_duplicate_pairs([keys[i] for i in reps], cfg)
        edges += [(reps[a], reps[b]) for a, b, _ in pairs]
    root = _components(n, edges)
    kept_rows = sorted(set(exact_first))
    kept = df[kept_rows].select(PASSAGES.names).to_arrow().cast(PASSAGES)

    sizes: dict[int, int] = {}
    for r in root:
        sizes[r] = sizes.get(r, 0) + 1
    ids, sources, rows = df["passage_id"].to_list(), df["source"].to_list(), df["row"].to_list()
    # A member is "exact" when it has an exact twin (same folded text) in its cluster.
    twins: dict[tuple[int, str], int] = {}
    for i, r in enumerate(root):
        twins[(r, keys[i])] = twins.get((r, keys[i]), 0) + 1
    shingles: dict[int, frozenset[str]] = {}  # of cluster members only, made when needed

    def shingles_at(i: int) -> frozenset[str]:
        if i not in shingles:
            shingles[i] = shingles_of(keys[i], cfg.shingle_size)
        return shingles[i]

    members = []
    for i, r in enumerate(root):
        if sizes[r] < 2:
            continue
        exact = twins[(r, keys[i])] > 1
        sim = 1.0 if keys[i] == keys[r] else jaccard(shingles_at(i), shingles_at(r))
        members.append(
            {
                "passage_id": ids[i],
                "cluster_id": ids[r],
                "kind": "exact" if exact else "near",
                "similarity": sim,
                "is_canonical": i == r,
                "source": sources[i],
                "row": rows[i],
            }
        )
    clusters = pa.Table.from_pylist(members, schema=CLUSTERS)
    return DedupResult(kept, clusters, n - kept.num_rows)


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
    index = dict(zip(nodes["passage_id"].to_list(), nodes["i"].to_list(), strict=True))
    edges = [(index[a], index[b]) for a, b in sem.select("a", "b").iter_rows()]
    edges += [(index[p], index[c]) for p, c in old.select("passage_id", "cluster_id").iter_rows()]
    root = _components(nodes.height, edges)
    node_ids = nodes["passage_id"].to_list()
    best = sem.group_by("a").agg(pl.col("cos").max()).rename({"a": "passage_id"})
    out = (
        nodes.with_columns(pl.Series("cluster_id", [node_ids[r] for r in root], dtype=pl.String))
        .join(old.select("passage_id", "kind", "similarity"), on="passage_id", how="left")
        .join(best, on="passage_id", how="left")
        .with_columns(
            pl.col("kind").fill_null(pl.lit("semantic")),
            pl.col("similarity").fill_null(pl.col("cos")).cast(pl.Float32),
            (pl.col("passage_id") == pl.col("cluster_id")).alias("is_canonical"),
        )
    )
    return out.select(CLUSTERS.names).to_arrow().cast(CLUSTERS)
