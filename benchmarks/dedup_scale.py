"""Dedup-stage memory as the corpus grows: streaming vs whole table in memory, side by side.

For each corpus size, the same Parquet shards (10,000 passages each, as ingest writes them) go
through the dedup stage two ways, each in a fresh process:

- **streaming** (what the flow runs): `plan_dedup` over the shards, a batch at a time, then the
  kept rows sorted by passage_id and written in shards by DuckDB (`write_sorted_shards`);
- **in memory**: every shard read into one table, `deduplicate` on it, sorted, sliced, written
  (what the flow did before, with the same dedup algorithm).

Corpus: the distinct standard-library docstring paragraphs, then word-bigram passages (40-160
words, benchmarks/dedup.py) up to the size, with 1% planted near duplicates and 1% exact copies.
Peak = the process's peak RSS minus its RSS once the libraries are imported. Both ways must find
the same clusters and keep the same passages (checked).

Last line: `dedup_scale streaming_mb_10k=A streaming_mb_100k=B in_memory_mb_10k=C
in_memory_mb_100k=D growth_streaming_mb=E growth_in_memory_mb=F`
Usage: .venv/bin/python benchmarks/dedup_scale.py [SMALL] [LARGE]
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHARD = 10_000


def write_corpus(folder: Path, n: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dedup import base_corpus, expand, plant

    from schemas.tables import PASSAGES

    rng = random.Random(0)
    texts = expand(base_corpus(n), n, rng)
    for i in range(0, n - 2, 100):
        texts[i + 1] = plant(texts[i], rng)  # near duplicates
        texts[i + 2] = texts[i]  # and an exact copy
    paths = []
    for s, start in enumerate(range(0, n, SHARD)):
        rows = [
            {
                "passage_id": hashlib.blake2b(t.encode(), digest_size=16).hexdigest(),
                "text": t,
                "title": None,
                "source": f"corpus-{s}.jsonl",
                "row": i,
                "source_id": None,
                "metadata": None,
            }
            for i, t in enumerate(texts[start : start + SHARD])
        ]
        path = folder / f"ingest-{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=PASSAGES), path)
        paths.append(str(path))
    return paths


def child(mode: str, paths: list[str], out: str) -> None:
    """One way, in this process; prints peak MB over the post-import baseline and a digest."""
    import duckdb  # noqa: F401 - imported before the baseline: libraries are not data
    import psutil
    import scipy.sparse.csgraph  # noqa: F401

    from schemas.config import DedupConfig
    from schemas.tables import PASSAGES
    from tasks import dedup
    from tasks.io import read_tables, slice_table, write_parquet_atomic, write_sorted_shards

    cfg = DedupConfig()
    base = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    if mode == "streaming":
        plan = dedup.plan_dedup(paths, cfg)
        shards = []

        def write(table):
            path = Path(out) / f"part-{len(shards):05d}.parquet"
            shards.append(write_parquet_atomic(table, path, "fp", PASSAGES))

        write_sorted_shards(paths, plan.keep, "passage_id", SHARD, PASSAGES, write)
        clusters = plan.clusters
    else:
        result = dedup.deduplicate(read_tables(paths, PASSAGES), cfg)
        kept = result.passages.sort_by("passage_id")
        shards = [
            write_parquet_atomic(t, Path(out) / f"part-{i:05d}.parquet", "fp", PASSAGES)
            for i, t in enumerate(slice_table(kept, SHARD))
        ]
        clusters = result.clusters
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = read_tables([s.path for s in shards], PASSAGES)["passage_id"].to_pylist()
    members = sorted(
        zip(
            clusters["passage_id"].to_pylist(),
            clusters["cluster_id"].to_pylist(),
            clusters["kind"].to_pylist(),
            strict=True,
        )
    )
    digest = hashlib.sha256(json.dumps([ids, members]).encode()).hexdigest()[:16]
    print(
        json.dumps(
            {
                "peak_mb": round(peak - base),
                "seconds": round(seconds, 2),
                "kept": len(ids),
                "members": len(members),
                "digest": digest,
            }
        )
    )


def run(mode: str, paths: list[str], folder: Path) -> dict:
    out = folder / f"out-{mode}"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(out), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:3]] or [10_000, 100_000]
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_corpus(Path(tmp), n)
            results[n] = {m: run(m, paths, Path(tmp)) for m in ("streaming", "in_memory")}
        s, m = results[n]["streaming"], results[n]["in_memory"]
        if s["digest"] != m["digest"]:
            raise SystemExit(f"{n}: the two ways disagree: {s} vs {m}")
        print(
            f"{n:>9,} passages: kept {s['kept']:,}, cluster members {s['members']:,}; "
            f"streaming +{s['peak_mb']} MB in {s['seconds']} s, "
            f"in memory +{m['peak_mb']} MB in {m['seconds']} s"
        )
    small, large = sizes
    tag = {small: f"{small // 1000}k", large: f"{large // 1000}k"}
    parts = [f"streaming_mb_{tag[n]}={results[n]['streaming']['peak_mb']}" for n in sizes]
    parts += [f"in_memory_mb_{tag[n]}={results[n]['in_memory']['peak_mb']}" for n in sizes]
    for mode in ("streaming", "in_memory"):
        growth = results[large][mode]["peak_mb"] - results[small][mode]["peak_mb"]
        parts.append(f"growth_{mode}_mb={growth}")
    print("dedup_scale " + " ".join(parts))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:], sys.argv[3])
    else:
        main()
