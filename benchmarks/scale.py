"""Mining memory and time as the corpus grows: 10k vs 100k passages, side by side.

Each size runs in a fresh process: synthetic unit-norm 384-d embeddings (MiniLM's size; the
embedding model is not what is measured here), 2,000 queries, the mining stage with its filters,
exact search and faiss HNSW. Reported: peak RSS, RSS before mining (imports + embeddings), and
what mining adds on top, which should stay flat as the corpus grows (exact search) or grow by
the index itself (HNSW).

Last line: `scale peak_rss_mb_10k=A peak_rss_mb_100k=B overhead_mb_10k=C overhead_mb_100k=D`

`pairs` mode: the whole pipeline instead, one `tripletforge run` in pairs mode per size
(benchmarks/pipeline_scale.py: ingest, dedup, embedding every passage and query with MiniLM on
the given backend, mining, assembly, exports), each size in its own process tree, sizes one
after the other. Reported per size: wall time, the manifest's stage seconds, the machine's peak
memory over its baseline and the peak RSS of every process of the run.
Last line: `scale_pairs backend=B seconds_<N>k=S peak_mb_<N>k=P largest_rss_mb_<N>k=R ...`

Usage: .venv/bin/python benchmarks/scale.py
       .venv/bin/python benchmarks/scale.py pairs [N ...] [--backend B] [--precision P]
       (default: 100000 1000000, backend openvino, precision auto)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM, QUERIES = 384, 2000

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np, pyarrow as pa
from schemas.config import MiningConfig
from schemas.tables import CLUSTERS
from tasks.mine import mine_negatives
n, dim, nq, search = {n}, {dim}, {nq}, {search!r}
rng = np.random.default_rng(0)


def unit_rows(rows):
    out = np.empty((rows, dim), dtype=np.float32)
    for i in range(0, rows, 10_000):  # in chunks: no n x dim temporaries
        chunk = rng.standard_normal((min(10_000, rows - i), dim), dtype=np.float32)
        out[i : i + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


corpus = unit_rows(n)
pos = rng.choice(n, nq, replace=False)
queries = corpus[pos] + unit_rows(nq) * 0.5  # positive score ~0.89
queries /= np.linalg.norm(queries, axis=1, keepdims=True)
ids = [f"p{{i}}" for i in range(n)]
qids = [f"q{{i}}" for i in range(nq)]
table = pa.table({{"query_id": qids, "passage_id": [ids[p] for p in pos]}})
cfg = MiningConfig(num_negatives=4, max_rank=30, search=search)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # data made: embeddings in
start = time.perf_counter()
result = mine_negatives(table, queries, ids, corpus, CLUSTERS.empty_table(), cfg)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
emb = (corpus.nbytes + queries.nbytes) / 2**20
print("RESULT", json.dumps({{"peak": peak, "base": base, "emb": emb, "seconds": seconds,
      "kept": result.queries_kept}}))
"""


def measure(n: int, search: str) -> dict:
    code = CHILD.format(root=str(ROOT), n=n, dim=DIM, nq=QUERIES, search=search)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(line[0][7:])


def pairs(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pipeline_scale import measure as measure_run

    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "openvino"
    precision = argv[argv.index("--precision") + 1] if "--precision" in argv else "auto"
    flags = {"--backend", backend, "--precision", precision}
    sizes = [int(a) for a in argv if a not in flags] or [100_000, 1_000_000]
    fields = [f"backend={backend}"]
    for n in sizes:
        r = measure_run(n, {"backend": backend, "precision": precision})
        largest = max(r["rss_all"].values())
        print(
            f"{n:>8} passages, pairs mode, {backend}/{precision}: {r['seconds']:7.1f} s wall, "
            f"machine peak +{r['peak']:.0f} MB; stage seconds {r['stages']}; "
            f"(in, out) per stage {r['counts']}; peak RSS per process (MB) {r['rss_all']}",
            flush=True,
        )
        k = f"{n // 1000}k"
        fields += [
            f"seconds_{k}={r['seconds']:.0f}",
            f"peak_mb_{k}={r['peak']:.0f}",
            f"largest_rss_mb_{k}={largest:.0f}",
        ]
    print("scale_pairs " + " ".join(fields))


def main() -> None:
    if sys.argv[1:2] == ["pairs"]:
        pairs(sys.argv[2:])
        return
    rows = {}
    for n in (10_000, 100_000):
        for search in ("exact", "ann"):
            r = measure(n, search)
            r["overhead"] = r["peak"] - r["base"]
            rows[(n, search)] = r
            print(
                f"{n:>7} passages, {search:5}: {r['seconds']:6.1f} s, peak RSS {r['peak']:6.0f} MB "
                f"(before mining {r['base']:.0f}, of which embeddings {r['emb']:.0f}; "
                f"mining adds {r['overhead']:.0f}), "
                f"{r['kept']} queries kept"
            )
    a, b = rows[(10_000, "exact")], rows[(100_000, "exact")]
    print(
        f"scale peak_rss_mb_10k={a['peak']:.0f} peak_rss_mb_100k={b['peak']:.0f} "
        f"overhead_mb_10k={a['overhead']:.0f} overhead_mb_100k={b['overhead']:.0f}"
    )


if __name__ == "__main__":
    main()
