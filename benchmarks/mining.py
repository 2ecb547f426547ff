"""Hard-negative mining: this project on each embedding backend against sentence-transformers'
`mine_hard_negatives`, with the same corpus, queries, model and parameters, side by side in one
run (each side in a fresh process of its own, one after the other, so that one runtime's thread
pools and heap do not slow or bloat the next, and each peak RSS is that side's).

Corpus: standard-library docstring paragraphs (real prose, see benchmarks/dedup.py); each
query is the first 12 words of its positive passage. Parameters: 4 negatives, ranks [0, 30),
relative margin 0.05 (ours: max_positive_ratio 0.95), top sampling, batch size 32 (both sides'
default), MiniLM on CPU with every core (or THREADS). Our `copies_query` rule is off here: the
queries are their positives' first words, so it would drop candidates that sentence-transformers
keeps and the overlap would measure that rule, not the embedding. Both sides embed the corpus
and the queries themselves: embedding is ~99.9% of either run, so what decides the ratio is how
each embeds.

- this project on each local backend of tasks/embed_backends.py: torch (float32, and bf16
  autocast where the CPU multiplies bf16 natively), ONNX Runtime (float32, int8 weights) and
  OpenVINO (float32, and bf16 where native), at the default `pad_to_multiple_of` (32);
- sentence-transformers as users call it (the model in float32), and under bf16 autocast where
  native, to show where a difference comes from (search and filters are not it).

Per backend: texts/s while embedding, the cosine of its vectors to float32 torch's (min, mean),
and the overlap of its chosen negatives with float32 torch mining (and with sentence-
transformers'). A backend is eligible when its cosine min is >= 0.999 (the rule of
`embedding.backend: auto`, whose decision here is printed too).

Last line: `mining speedup_vs_st=R overlap=O peak_rss_mb=M` for the fastest eligible backend:
R against sentence-transformers as users call it, O its overlap with float32 torch mining, M the
peak RSS of its process.
Usage: .venv/bin/python benchmarks/mining.py [N_PASSAGES] [N_QUERIES] [THREADS]
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
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from dedup import base_corpus  # noqa: E402

from schemas.config import EmbeddingConfig, MiningConfig  # noqa: E402
from schemas.tables import CLUSTERS  # noqa: E402
from tasks.embed_backends import AUTO_MIN_COSINE, BackendChoice  # noqa: E402
from tasks.hardware import cpu_description, native_bf16  # noqa: E402
from tasks.mine import mine_negatives  # noqa: E402
from tasks.models import minilm_path, prepare_onnx  # noqa: E402

NEGATIVES, MAX_RANK, BATCH = 4, 30, 32
PAD = EmbeddingConfig().pad_to_multiple_of  # the pipeline's default token padding
MODEL = "all-MiniLM-L6-v2"


def corpus(n_passages: int, n_queries: int) -> tuple[list[str], list[str], list[int]]:
    passages = base_corpus(n_passages)
    positives = list(range(0, len(passages), max(1, len(passages) // n_queries)))[:n_queries]
    queries = [" ".join(passages[p].split()[:12]) for p in positives]
    return passages, queries, positives


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(model: Any, passages: list[str], queries: list[str], positives: list[int]):
    start = time.perf_counter()
    corpus_vectors = model.encode(passages, batch_size=BATCH, pad_to_multiple_of=PAD)
    q = model.encode(queries, batch_size=BATCH, pad_to_multiple_of=PAD)
    embedded = time.perf_counter()
    ids = [str(i) for i in range(len(passages))]
    table = pa.table(
        {
            "query_id": [str(i) for i in range(len(queries))],
            "passage_id": [ids[p] for p in positives],
        }
    )
    cfg = MiningConfig(
        num_negatives=NEGATIVES,
        max_rank=MAX_RANK,
        max_positive_ratio=0.95,
        copies_query_share=None,  # sentence-transformers has no such rule (see the docstring)
    )
    result = mine_negatives(table, q, ids, corpus_vectors, CLUSTERS.empty_table(), cfg)
    end = time.perf_counter()
    kept = result.candidates.filter(result.candidates["kept"]).to_pylist()
    chosen: dict[int, set[str]] = {}
    for row in kept:
        chosen.setdefault(int(row["query_id"]), set()).add(passages[int(row["passage_id"])])
    vectors = np.concatenate([corpus_vectors, q])
    return chosen, end - start, embedded - start, vectors


def run_backend(choice: BackendChoice, data: tuple, threads: int) -> dict[str, Any]:
    """One backend in this (fresh) process: load, warm up, mine; what it chose and how fast."""
    from tasks.embed_backends import load_local

    passages, queries, positives = data
    start = time.perf_counter()
    model = load_local(choice, str(minilm_path()), MODEL, "cpu", threads)
    load_s = time.perf_counter() - start
    ours(model, passages[:50], queries[:5], [0] * 5)  # warm-up: first batches are slow
    chosen, seconds, embed_s, vectors = ours(model, passages, queries, positives)
    return {
        "chosen": chosen,
        "seconds": seconds,
        "embed_seconds": embed_s,
        "texts_per_s": (len(passages) + len(queries)) / embed_s,
        "vectors": vectors,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_st(data: tuple, precision: str, threads: int) -> dict[str, Any]:
    """sentence-transformers' `mine_hard_negatives`, in float32 (as users call it) or under
    the autocast our torch backend uses."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    torch.set_num_threads(threads)
    passages, queries, positives = data
    model = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    model.encode(passages[:50], batch_size=BATCH)  # warm-up, as on our side
    autocast = (
        torch.autocast("cpu", dtype=getattr(torch, precision))
        if precision != "float32"
        else contextlib.nullcontext()
    )
    data = Dataset.from_dict({"query": queries, "positive": [passages[p] for p in positives]})
    start = time.perf_counter()
    with autocast:
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
    return {"chosen": chosen, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def run_auto() -> tuple[BackendChoice, list[dict[str, Any]]]:
    """What `embedding.backend: auto` chose here (measured now if not cached yet)."""
    import json

    from tasks.embed_backends import AUTO_CHOICE_FILE, choose_backend
    from tasks.models import cache_dir

    choice = choose_backend(EmbeddingConfig(backend="auto"))
    stored = json.loads((cache_dir() / AUTO_CHOICE_FILE).read_text())
    entry = next(e for e in stored.values() if e["choice"] == choice.__dict__)
    return choice, entry["measurements"]


def in_fresh_process(fn: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def overlap(a: dict[int, set[str]], b: dict[int, set[str]]) -> tuple[float, int]:
    """Share of b's negatives that a chose too, over the queries both kept."""
    both = [q for q in a if q in b]
    shared = sum(len(a[q] & b[q]) for q in both)
    return shared / max(1, sum(len(b[q]) for q in both)), len(both)


def label(choice: BackendChoice) -> str:
    return f"{choice.backend} {choice.precision}"


def main() -> None:
    n_passages = int(sys.argv[1]) if len(sys.argv) > 1 else 1400
    n_queries = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else (os.cpu_count() or 1)
    # made here once and handed to every process: which standard-library modules import, and
    # so the corpus, depends on what a process imported before
    data = corpus(n_passages, n_queries)
    passages, queries, _ = data
    bf16 = native_bf16()
    print(
        f"{len(passages)} passages, {len(queries)} queries, MiniLM on CPU: {cpu_description()}, "
        f"{os.cpu_count()} cores, {threads} threads; native bf16: {'yes' if bf16 else 'no'}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    prepare_onnx(minilm_path())  # the exports are made once and cached; not timed here
    prepare_onnx(minilm_path(), "int8")

    choices = [BackendChoice("torch", "float32")]
    if bf16:
        choices.append(BackendChoice("torch", "bfloat16"))
    choices += [BackendChoice("onnx", "float32"), BackendChoice("onnx", "int8", "int8")]
    choices.append(BackendChoice("openvino", "float32"))
    if bf16:
        choices.append(BackendChoice("openvino", "bfloat16"))
    results = {}
    for choice in choices:
        results[choice] = in_fresh_process(run_backend, choice, data, threads)
        r = results[choice]
        print(
            f"  {label(choice)}: {r['seconds']:.1f} s ({r['texts_per_s']:.1f} texts/s, "
            f"load {r['load_s']:.1f} s)",
            flush=True,
        )
    st = in_fresh_process(run_st, data, "float32", threads)
    st_ac = in_fresh_process(run_st, data, "bfloat16", threads) if bf16 else None
    auto, _ = in_fresh_process(run_auto)

    reference = results[BackendChoice("torch", "float32")]
    rows = []
    for choice, r in results.items():
        cosine = (r["vectors"] * reference["vectors"]).sum(axis=1)
        ov, _ = overlap(r["chosen"], reference["chosen"])
        ov_st, n_both = overlap(r["chosen"], st["chosen"])
        rows.append(
            {
                "choice": choice,
                "seconds": r["seconds"],
                "texts_per_s": r["texts_per_s"],
                "cos_min": float(cosine.min()),
                "cos_mean": float(cosine.mean()),
                "overlap": ov,
                "overlap_st": ov_st,
                "eligible": float(cosine.min()) >= AUTO_MIN_COSINE,
                "peak_rss_mb": r["peak_rss_mb"],
                "speedup": st["seconds"] / r["seconds"],
            }
        )
    print()
    print(
        "| backend | mining wall | embedding texts/s | cosine to float32 torch (min / mean) "
        "| overlap vs float32 torch mining | overlap vs ST float32 | speedup vs ST | peak RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        mark = "" if row["eligible"] else " (below 0.999)"
        print(
            f"| {label(row['choice'])}{mark} | {row['seconds']:.1f} s | {row['texts_per_s']:.1f} "
            f"| {row['cos_min']:.5f} / {row['cos_mean']:.5f} | {row['overlap']:.3f} "
            f"| {row['overlap_st']:.3f} | {row['speedup']:.2f} | {row['peak_rss_mb']:.0f} MB |"
        )
    print(
        f"| sentence-transformers mine_hard_negatives (float32, as users call it) "
        f"| {st['seconds']:.1f} s | | | | | 1.00 | {st['peak_rss_mb']:.0f} MB |"
    )
    if st_ac is not None:
        ov_ac, _ = overlap(st_ac["chosen"], st["chosen"])
        print(
            f"| sentence-transformers under bf16 autocast | {st_ac['seconds']:.1f} s | | | | "
            f"{ov_ac:.3f} | {st['seconds'] / st_ac['seconds']:.2f} "
            f"| {st_ac['peak_rss_mb']:.0f} MB |"
        )
    print()
    print(f"shared queries with sentence-transformers: {n_both} of {len(queries)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes slow every row)")
    print(f"embedding.backend auto here: {label(auto)}")
    best = min((r for r in rows if r["eligible"]), key=lambda r: r["seconds"])
    print(
        f"fastest within cosine {AUTO_MIN_COSINE}: {label(best['choice'])} "
        f"({best['seconds']:.1f} s vs {st['seconds']:.1f} s for sentence-transformers float32)"
    )
    print(
        f"mining speedup_vs_st={best['speedup']:.2f} overlap={best['overlap']:.3f} "
        f"peak_rss_mb={best['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
