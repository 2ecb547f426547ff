"""What Prefect + Ray cost over plain in-process stage calls, measured side by side in one run.

The same small job (pairs mode over the bundled sample corpus: ingest, dedup, embed passages and
queries, query dedup, mine, assemble; no LLM) runs as
  1. `run_local`: every stage called in this process, the embedder loaded in it, no Ray/Prefect;
  2. `run_pipeline`: the Prefect flow, its stage jobs as Ray tasks, the embedder in a Ray actor,
     a temporary Prefect API server (what `tripletforge run` does);
each in a fresh interpreter (nothing warm), alternating, `--rounds` times, at two sizes (the
second 4x the rows) to show the overhead is a fixed start-up cost, not per row. Where the
difference goes: Ray start, the Prefect API server, the embedder's actor (process + model load),
the stages, and Prefect's flow bookkeeping.

Last line: `orchestration overhead_s=X ratio=R` (medians at the first size; goal X < 15 s).
Usage: .venv/bin/python benchmarks/orchestration.py [--rounds 2] [--pairs 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "data" / "sample" / "passages.jsonl"


def write_job(tmp: Path, pairs: int, copies: int) -> Path:
    """A pairs-mode config: `pairs` (query, positive) pairs, the sample corpus `copies` times."""
    import yaml

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    pair_rows = [
        {"query": f"what does {r['title']} do", "positive": r["text"]}
        for r in (rows * copies)[:pairs]
    ]
    corpus = [{"text": f"{r['text']} [{k}]"} for k in range(copies) for r in rows]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    (tmp / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    cfg = {
        "name": "overhead",
        "input": {
            "mode": "pairs",
            "paths": [str(tmp / "pairs.jsonl")],
            "corpus_paths": [str(tmp / "corpus.jsonl")],
        },
        "dedup": {"near": False},
        "mining": {"num_negatives": 3, "max_rank": 20},
        "output": {"dir": str(tmp / "runs"), "shard_size": 256},
        "runtime": {"num_cpus": os.cpu_count() or 1},
    }
    path = tmp / f"job-{pairs}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child(mode: str, config: str, out: str) -> dict:
    """One run in this (fresh) interpreter; the parts of its wall time."""
    t_import = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from flows import build, runtime
    from schemas.config import load_config

    parts: dict[str, float] = {"imports": time.perf_counter() - t_import}
    cfg = load_config(config, [])
    if mode == "local":
        start = time.perf_counter()
        _, doc = build.run_local(cfg, out)
        parts["run"] = time.perf_counter() - start
    else:
        import ray

        start = time.perf_counter()
        ray.init(**runtime.ray_init_kwargs(cfg))
        parts["ray_start"] = time.perf_counter() - start
        start = time.perf_counter()
        with runtime.prefect_api():
            parts["prefect_api"] = time.perf_counter() - start
            start = time.perf_counter()
            _, doc = build.run_pipeline(cfg, out)
            parts["run"] = time.perf_counter() - start
        start = time.perf_counter()
        ray.shutdown()
        parts["ray_stop"] = time.perf_counter() - start
    stages = {k: v for k, v in doc["timings"].items() if k != "total"}
    parts["stages"] = sum(stages.values())
    parts["embedder_load"] = (doc["models"].get("embedder") or {}).get("load_seconds", 0.0)
    parts["bookkeeping"] = parts["run"] - parts["stages"]
    return {"parts": parts, "stages": stages, "triplets": doc["stages"]["assemble"]["rows_out"]}


def measure(mode: str, config: Path, out: Path) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PREFECT_API_URL="", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(config), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["parts"]["wall"] = wall
    timed = ("imports", "ray_start", "prefect_api", "run", "ray_stop")
    result["parts"]["interpreter"] = wall - sum(result["parts"].get(k, 0.0) for k in timed)
    return result


def median(results: list[dict], key: str) -> float:
    return statistics.median(r["parts"].get(key, 0.0) for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=60, help="pairs at size 1 (x4 at size 2)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from tasks.hardware import cpu_description

    print(f"{os.cpu_count()} cores, {cpu_description()}")
    by_size: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="tf-orch-") as tmp:
        for size, copies in ((args.pairs, 1), (4 * args.pairs, 4)):
            job_dir = Path(tmp) / f"size-{size}"
            job_dir.mkdir()
            config = write_job(job_dir, size, copies)
            runs: dict[str, list[dict]] = {"local": [], "pipeline": []}
            for r in range(args.rounds):
                for mode in ("local", "pipeline"):
                    res = measure(mode, config, job_dir / f"out-{mode}-{r}")
                    runs[mode].append(res)
                    print(
                        f"  {size} pairs, {mode:8s} round {r}: wall {res['parts']['wall']:.1f} s, "
                        f"{res['triplets']} triplets",
                        flush=True,
                    )
            by_size[size] = runs

    first = by_size[args.pairs]
    rows = [
        ("interpreter start + exit", "interpreter"),
        ("imports (flows, Prefect, Ray, torch)", "imports"),
        ("Ray start (ray.init, local)", "ray_start"),
        ("Prefect API server start", "prefect_api"),
        ("stages (sum of stage wall times)", "stages"),
        ("  of which: embedder load (in its actor / in process)", "embedder_load"),
        ("flow bookkeeping (run minus stages: Prefect flow, view, manifest)", "bookkeeping"),
        ("Ray shutdown", "ray_stop"),
        ("**wall**", "wall"),
    ]
    print(f"\n{args.pairs} pairs, {len(first['local'])} rounds, medians (seconds):")
    print("| part | in-process | Prefect + Ray | difference |")
    print("| --- | --- | --- | --- |")
    for label, key in rows:
        a, b = median(first["local"], key), median(first["pipeline"], key)
        print(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    stage_names = list(first["local"][0]["stages"])
    print("\nper stage (median seconds, in-process / Prefect + Ray):")
    for name in stage_names:
        a = statistics.median(r["stages"].get(name, 0.0) for r in first["local"])
        b = statistics.median(r["stages"].get(name, 0.0) for r in first["pipeline"])
        print(f"  {name:18s} {a:6.2f} / {b:6.2f}")
    overheads = {}
    for size, runs in by_size.items():
        local, pipe = median(runs["local"], "wall"), median(runs["pipeline"], "wall")
        overheads[size] = (pipe - local, pipe / local)
        print(
            f"{size:5d} pairs: in-process {local:.1f} s, Prefect + Ray {pipe:.1f} s, "
            f"overhead {pipe - local:.1f} s, ratio {pipe / local:.2f}"
        )
    small, big = overheads[args.pairs][0], overheads[4 * args.pairs][0]
    print(f"overhead at 4x the rows minus overhead at 1x: {big - small:+.1f} s")
    x, r = overheads[args.pairs]
    print(f"orchestration overhead_s={x:.1f} ratio={r:.2f}")


if __name__ == "__main__":
    main()
