"""Hard-negative mining: this project against sentence-transformers' `mine_hard_negatives`,
with the same corpus, queries, model and parameters, side by side in one process.

Corpus: standard-library docstring paragraphs (real prose, see benchmarks/dedup.py); each
query is the first 12 words of its positive passage. Parameters: 4 negatives, ranks [0, 30),
relative margin 0.05 (ours: max_positive_ratio 0.95), top sampling, batch size 32 (both sides'
default), MiniLM on CPU. Both sides embed the corpus and the queries themselves: embedding is
~99.9% of either run, so what decides the ratio is how each embeds.

- this project: its Embedder at `embedding.precision: auto` (bfloat16 autocast where the CPU
  multiplies bf16 natively, float32 elsewhere) and the default `pad_to_multiple_of` (32);
- sentence-transformers as users call it (the model in float32);
- sentence-transformers with the very same autocast, to show where the difference comes from
  (search and filters are not it).
The overlap of the chosen negatives and the cosine between the two precisions' vectors say
whether the faster embedding changes the data.

Last line: `mining speedup_vs_st=R peak_rss_mb=M` (R: against sentence-transformers as users
call it; M: this process after our run).
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
os.environ.setdefault("TQDM_DISABLE", "1")  # sentence-transformers shows bars even with verbose off

import contextlib  # noqa: E402

import pyarrow as pa  # noqa: E402
from dedup import base_corpus  # noqa: E402

from schemas.config import EmbeddingConfig, MiningConfig  # noqa: E402
from schemas.tables import CLUSTERS  # noqa: E402
from tasks.embedder import Embedder, resolve_precision  # noqa: E402
from tasks.mine import mine_negatives  # noqa: E402
from tasks.models import minilm_path  # noqa: E402

NEGATIVES, MAX_RANK, BATCH = 4, 30, 32
PAD = EmbeddingConfig().pad_to_multiple_of  # the pipeline's default token padding


def ours(model: Embedder, passages: list[str], queries: list[str], positives: list[int]):
    start = time.perf_counter()
    corpus = model.encode(passages, batch_size=BATCH, pad_to_multiple_of=PAD)
    q = model.encode(queries, batch_size=BATCH, pad_to_multiple_of=PAD)
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


def st(model, passages: list[str], queries: list[str], positives: list[int], autocast=None):
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    data = Dataset.from_dict({"query": queries, "positive": [passages[p] for p in positives]})
    start = time.perf_counter()
    with autocast or contextlib.nullcontext():
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


def overlap(a: dict[int, set[str]], b: dict[int, set[str]]) -> tuple[float, int]:
    """Share of b's negatives that a chose too, over the queries both kept."""
    both = [q for q in a if q in b]
    shared = sum(len(a[q] & b[q]) for q in both)
    return shared / max(1, sum(len(b[q]) for q in both)), len(both)


def main() -> None:
    n_passages = int(sys.argv[1]) if len(sys.argv) > 1 else 1400
    n_queries = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    passages = base_corpus(n_passages)
    positives = list(range(0, len(passages), max(1, len(passages) // n_queries)))[:n_queries]
    queries = [" ".join(passages[p].split()[:12]) for p in positives]
    precision = resolve_precision("auto", "cpu")
    print(
        f"{len(passages)} passages, {len(queries)} queries, MiniLM on CPU, {os.cpu_count()} "
        f"cores; this project embeds in {precision}"
    )
    threads = os.cpu_count() or 1
    path = str(minilm_path())
    embedder = Embedder(path, "all-MiniLM-L6-v2", threads=threads, precision=precision)
    ours(embedder, passages[:50], queries[:5], [0] * 5)  # warm-up: first batches are slow
    chosen_ours, t_ours, t_mine = ours(embedder, passages, queries, positives)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = embedder.model  # the same loaded weights for every run
    chosen_st, t_st = st(model, passages, queries, positives)
    chosen_st_ac, t_st_ac = st(model, passages, queries, positives, embedder._autocast())

    fp32 = Embedder(path, "all-MiniLM-L6-v2", threads=threads)
    sample = passages[:200]
    cosine = (
        embedder.encode(sample, BATCH, pad_to_multiple_of=PAD) * fp32.encode(sample, BATCH)
    ).sum(axis=1)
    ov, n_both = overlap(chosen_ours, chosen_st)
    ov_ac, _ = overlap(chosen_ours, chosen_st_ac)
    print(
        f"tripletforge ({precision}): {t_ours:6.1f} s (search + filters {t_mine:.2f} s), "
        f"{len(chosen_ours)} queries with negatives"
    )
    print(
        f"sentence-transformers mine_hard_negatives (float32): {t_st:6.1f} s, "
        f"{len(chosen_st)} queries"
    )
    print(
        f"sentence-transformers mine_hard_negatives under the same autocast: {t_st_ac:6.1f} s "
        f"(ratio {t_st_ac / t_ours:.2f}: embedding is the whole difference)"
    )
    print(
        f"overlap of chosen negatives on {n_both} shared queries: {ov:.3f} vs float32 "
        f"sentence-transformers, {ov_ac:.3f} vs the same precision; cosine of {precision} to "
        f"float32 vectors: min {cosine.min():.5f}, mean {cosine.mean():.5f}"
    )
    print(f"mining speedup_vs_st={t_st / t_ours:.2f} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
