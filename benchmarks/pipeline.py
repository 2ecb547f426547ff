"""End-to-end benchmark on the demo config, measured side by side in one run.

1. raw vLLM: the exact prompts the pipeline builds for the demo, one `LLM.chat` call on a fresh
   engine (same model, dtype, schema, sampling) -> output tokens/s;
2. the pipeline: `tripletforge run` on the demo config into a temporary folder -> the generation
   stage's output tokens/s (from the manifest), wall time, peak memory of the whole machine;
3. the same command again: every shard is resumed from disk -> wall time.

Last line: `pipeline generation_vs_raw=R resume_speedup=S peak_mb=M`.
Usage: .venv/bin/python benchmarks/pipeline.py  (after `make models`)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "demo.yaml"


def used_mb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def _process_name(proc: psutil.Process) -> str:
    """Ray names its workers after what they run (ray::EmbedWorker, ray::mine ...)."""
    name = proc.name()
    if name.startswith("ray::"):
        return name
    cmd = proc.cmdline()
    return " ".join(Path(c).name for c in cmd[:3])[:60] if cmd else name


def run_measured(cmd: list[str]) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, peak extra MB over the machine's baseline, {process: peak RSS MB} over the
    command's process tree) of a command. A process is named by what it ran at its peak."""
    base, peak = used_mb(), 0.0
    by_pid: dict[int, tuple[float, str]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        peak = max(peak, used_mb() - base)
        with contextlib.suppress(psutil.Error):
            for child in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss = child.memory_info().rss / 2**20
                    if rss > by_pid.get(child.pid, (0.0, ""))[0]:
                        by_pid[child.pid] = (rss, f"{_process_name(child)} [{child.pid}]")
        time.sleep(0.25)
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{err[0][-3000:]}")
    return time.perf_counter() - start, peak, {name: rss for rss, name in by_pid.values()}


def raw_vllm_tokens_per_s() -> tuple[float, int]:
    """A fresh engine, the demo's own requests, one batched call (in a child process)."""
    code = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-{(os.cpu_count() or 1) - 1}")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
import pyarrow as pa
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from schemas.config import load_config
from schemas.llm import query_json_schema
from tasks import dedup, ingest
from tasks.generate import build_query_requests
from tasks.models import resolve_llm_path
if __name__ == "__main__":
    cfg = load_config({str(CONFIG)!r})
    files = ingest.expand_paths(cfg.input.paths)
    tables = [ingest.ingest_file(p, cfg.input).passages for p in files]
    passages = dedup.exact_dedup(pa.concat_tables(tables)).passages.sort_by("passage_id")
    passages = passages.slice(0, cfg.generation.max_passages)
    reqs = build_query_requests(passages, cfg.generation)
    g, l = cfg.generation, cfg.llm
    llm = LLM(model=str(resolve_llm_path(l.model_path)), dtype=l.dtype,
              max_model_len=l.max_model_len, enforce_eager=l.enforce_eager, seed=g.seed)
    params = [SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p,
              seed=r["seed"], structured_outputs=StructuredOutputsParams(
              json=query_json_schema(g.max_query_chars))) for r in reqs]
    start = time.perf_counter()
    outs = llm.chat([r["messages"] for r in reqs], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    print("RESULT", json.dumps({{"tokens": tokens, "seconds": seconds}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"raw vLLM run failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[0][len("RESULT ") :])
    return result["tokens"] / result["seconds"], result["tokens"]


def main() -> None:
    raw_tps, raw_tokens = raw_vllm_tokens_per_s()
    print(f"raw vLLM (fresh engine, one batch): {raw_tokens} tokens, {raw_tps:.1f} tokens/s")
    cli = str(Path(sys.executable).with_name("tripletforge"))
    with tempfile.TemporaryDirectory() as out:
        cmd = [cli, "run", "--config", str(CONFIG), "--output", out]
        cold_s, peak, _ = run_measured(cmd)
        manifest = json.loads(next(Path(out).glob("*/manifest.json")).read_text())
        gen = manifest["stages"]["generate"]["extra"]
        warm_s, _, _ = run_measured(cmd)
    stages = {k: round(v, 1) for k, v in manifest["timings"].items()}
    tps = gen["tokens_per_second"]
    print(f"pipeline generation stage: {gen['output_tokens']} tokens, {tps} tokens/s")
    print(f"pipeline cold run: {cold_s:.1f} s wall, peak +{peak:.0f} MB; stage seconds {stages}")
    print(f"pipeline resumed run: {warm_s:.1f} s wall")
    print(
        f"pipeline generation_vs_raw={gen['tokens_per_second'] / raw_tps:.2f} "
        f"resume_speedup={cold_s / warm_s:.1f} peak_mb={peak:.0f}"
    )


if __name__ == "__main__":
    main()
