"""Hard-negative mining: this project against sentence-transformers' `mine_hard_negatives`,
with the same corpus, queries, model and parameters, side by side in one process.

Corpus: standard-library docstring paragraphs (real prose, see benchmarks/dedup.py); each
query is the first 12 words of its positive passage. Parameters: 4 negatives, ranks [0, 30),
relative margin 0.05 (ours: max_positive_ratio 0.95), top sampling, batch size 64, MiniLM on CPU.
Both sides embed the corpus and the queries themselves (embedding dominates on CPU).

Last line: `mining speedup_vs_st=R peak_rss_mb=M` (M: this process after our run).
Usage: .venv/bin/python benchmarks/mining.py [N_PASSAGES] [N_QUERIES]
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
from dedup import base_corpus  # noqa: E402

from schemas.config import MiningConfig  # noqa: E402
from schemas.tables import CLUSTERS  # noqa: E402
from tasks.embed import Embedder  # noqa: E402
from tasks.mine import mine_negatives  # noqa: E402
from tasks.models import minilm_path  # noqa: E402

NEGATIVES, MAX_RANK, BATCH = 4, 30, 64


def ours(model: Embedder, passages: list[str], queries: list[str], positives: list[int]):
    start = time.perf_counter()
    corpus = model.encode(passages, batch_size=BATCH)
    q = model.encode(queries, batch_size=BATCH)
    embedded = time.perf_counter()
    ids = [str(i) for i in range(len(passages))]
    table = pa.table(
        {
            "query_id": [str(i) for i in range(len(queries))],
            "passage_id": [ids[p] for p in positives],
        }
    )
    cfg = MiningConfig(num_negatives=NEGATIVES, max_rank=MAX_RANK, max_positive_ratio=0.95)
    result = mine_negatives(table, q, ids, corpus, CLUSTERS.empty_table(), cfg)
    end = time.perf_counter()
    kept = result.candidates.filter(result.candidates["kept"]).to_pylist()
    chosen: dict[int, set[str]] = {}
    for row in kept:
        chosen.setdefault(int(row["query_id"]), set()).add(passages[int(row["passage_id"])])
    return chosen, end - start, end - embedded


def st(model, passages: list[str], queries: list[str], positives: list[int]):
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    data = Dataset.from_dict({"query": queries, "positive": [passages[p] for p in positives]})
    start = time.perf_counter()
    out = mine_hard_negatives(
        data,
        model,
        corpus=passages,
        range_max=MAX_RANK,
        relative_margin=0.05,
        num_negatives=NEGATIVES,
        sampling_strategy="top",
        batch_size=BATCH,
        output_format="n-tuple",
        verbose=False,
    )
    seconds = time.perf_counter() - start
    chosen = {}
    index = {q: i for i, q in enumerate(queries)}
    for row in out:
        chosen[index[row["query"]]] = {row[f"negative_{k}"] for k in range(1, NEGATIVES + 1)}
    return chosen, seconds


def main() -> None:
    n_passages = int(sys.argv[1]) if len(sys.argv) > 1 else 1400
    n_queries = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    passages = base_corpus(n_passages)
    positives = list(range(0, len(passages), max(1, len(passages) // n_queries)))[:n_queries]
    queries = [" ".join(passages[p].split()[:12]) for p in positives]
    print(
        f"{len(passages)} passages, {len(queries)} queries, MiniLM on CPU, {os.cpu_count()} cores"
    )

    embedder = Embedder(str(minilm_path()), "all-MiniLM-L6-v2", threads=os.cpu_count() or 1)
    ours(embedder, passages[:50], queries[:5], [0] * 5)  # warm-up: first batches are slow
    chosen_ours, t_ours, t_mine = ours(embedder, passages, queries, positives)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chosen_st, t_st = st(embedder.model, passages, queries, positives)

    both = [q for q in chosen_ours if q in chosen_st]
    overlap = sum(len(chosen_ours[q] & chosen_st[q]) for q in both) / max(
        1, sum(len(chosen_st[q]) for q in both)
    )
    print(
        f"tripletforge: {t_ours:6.1f} s (search + filters {t_mine:.2f} s), "
        f"{len(chosen_ours)} queries with negatives"
    )
    print(f"sentence-transformers mine_hard_negatives: {t_st:6.1f} s, {len(chosen_st)} queries")
    print(f"overlap of chosen negatives on {len(both)} shared queries: {overlap:.3f}")
    print(f"mining speedup_vs_st={t_st / t_ours:.2f} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
