"""Whole-pipeline memory as the corpus grows: 10k vs 100k passages, side by side.

Each size is one `tripletforge run` in pairs mode (no LLM: generation is the one stage that does
not depend on corpus size), in its own process tree: ingest, exact + near-duplicate dedup,
embedding every passage and query with MiniLM, mining with every filter, assembly, exports.
Corpus: the distinct standard-library docstring paragraphs, then passages from a word-bigram
model trained on them (benchmarks/dedup.py) up to the size; 2,000 (query, positive) pairs, each
query the first 12 words of its positive. Shards of 4,096 rows.

Peak memory is the whole machine's (driver, Ray's processes, the embedder actor, the Prefect
API) over its baseline before the run, sampled every 0.25 s (benchmarks/pipeline.py). The
question it answers: does memory grow with the corpus by more than the data held in it (the
passage embeddings, 1.5 KB a passage, read by each of the concurrent mine tasks)?

Last line: `pipeline_scale peak_mb_10k=A peak_mb_100k=B growth_mb=C embeddings_mb_100k=D`
Usage: .venv/bin/python benchmarks/pipeline_scale.py [SMALL] [LARGE]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from dedup import base_corpus, expand  # noqa: E402
from pipeline import run_measured  # noqa: E402

QUERIES, DIM, SHARD = 2000, 384, 4096


def write_inputs(folder: Path, n: int, embedding: dict | None = None) -> Path:
    """corpus.jsonl, pairs.jsonl and a config for n passages (embedding: settings of that
    section, e.g. the backend); returns the config's path."""
    passages = expand(base_corpus(n), n, random.Random(0))
    step = max(1, len(passages) // QUERIES)
    pairs = [
        {"query": " ".join(passages[i].split()[:12]), "positive": passages[i]}
        for i in range(0, len(passages), step)
    ][:QUERIES]
    for name, rows in (("corpus", [{"text": t} for t in passages]), ("pairs", pairs)):
        with (folder / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    config = {
        "name": f"scale{n}",
        "input": {
            "mode": "pairs",
            "paths": ["pairs.jsonl"],
            "corpus_paths": ["corpus.jsonl"],
            "max_chars": 100_000,
        },
        "mining": {"num_negatives": 4, "max_rank": 30},
        "output": {"dir": "runs", "shard_size": SHARD},
    }
    if embedding:
        config["embedding"] = embedding
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(n: int, embedding: dict | None = None) -> dict:
    cli = str(Path(sys.executable).with_name("tripletforge"))
    with tempfile.TemporaryDirectory() as tmp:
        config = write_inputs(Path(tmp), n, embedding)
        seconds, peak, by_name = run_measured([cli, "run", "--config", str(config)])
        doc = json.loads(next(Path(tmp, "runs").glob("*/manifest.json")).read_text())
    stages = {k: round(v, 1) for k, v in doc["timings"].items()}
    counts = {k: (v["rows_in"], v["rows_out"]) for k, v in doc["stages"].items()}
    every = dict(sorted(((k, round(v)) for k, v in by_name.items()), key=lambda x: -x[1]))
    return {
        "seconds": seconds,
        "peak": peak,
        "stages": stages,
        "counts": counts,
        "rss": dict(list(every.items())[:6]),
        "rss_all": every,
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:3]] or [10_000, 100_000]
    results = {}
    for n in sizes:
        r = results[n] = measure(n)
        emb = n * DIM * 4 / 2**20
        print(
            f"{n:>7} passages: {r['seconds']:7.1f} s wall, peak +{r['peak']:6.0f} MB "
            f"(passage embeddings {emb:.0f} MB); stage seconds {r['stages']}; "
            f"(in, out) per stage {r['counts']}; largest processes (peak RSS MB) {r['rss']}",
            flush=True,
        )
    small, large = sizes[0], sizes[-1]
    growth = results[large]["peak"] - results[small]["peak"]
    emb_large = large * DIM * 4 / 2**20
    print(
        f"pipeline_scale peak_mb_{small // 1000}k={results[small]['peak']:.0f} "
        f"peak_mb_{large // 1000}k={results[large]['peak']:.0f} growth_mb={growth:.0f} "
        f"embeddings_mb_{large // 1000}k={emb_large:.0f}"
    )


if __name__ == "__main__":
    main()
