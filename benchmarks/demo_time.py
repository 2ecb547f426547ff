"""How long `make demo` takes from a clean clone, by phase: install (venv + packages), models
(SmolLM2 converted from its GGUF), the pipeline run. Nothing warm: a fresh clone of HEAD in a
temporary folder, empty package caches (pip's and uv's) and an empty model cache.

Last line: `demo install_s=I models_s=M run_s=R total_s=T` (goal: T < 360, R < 180 on 2 cores).
Usage: python3 benchmarks/demo_time.py [--keep] [--like-avx2]   (needs only git, make, python3)

--like-avx2 approximates, on a CPU with AVX-512 or native bf16, a CPU without them: the LLM in
float32 (what `llm.dtype: auto` picks there) and torch, oneDNN and MKL capped at AVX2. ONNX
Runtime and vLLM's own kernels still use what the CPU has, and the cores stay as fast as they
are: a lower bound for a real AVX2-only CPU, printed as `like_avx2=1`, never a measurement of one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phase(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("ab") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed after {seconds:.0f} s; see {log}")
    return seconds


def main() -> None:
    from tasks.hardware import cpu_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    ap.add_argument("--like-avx2", action="store_true", help="see the module docstring")
    ap.add_argument("--rev", default="HEAD", help="the commit to time (before/after a change)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tf-demo-"))
    clone = tmp / "tripletforge"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.rev], check=True)
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(
        TRIPLETFORGE_CACHE=str(tmp / "model-cache"),
        UV_CACHE_DIR=str(tmp / "uv-cache"),
        PIP_NO_CACHE_DIR="1",
        COLUMNS="200",
    )
    if args.like_avx2:
        env.update(
            ATEN_CPU_CAPABILITY="avx2",
            ONEDNN_MAX_CPU_ISA="AVX2",
            MKL_ENABLE_INSTRUCTIONS="AVX2",
            RUN_ARGS="--set llm.dtype=float32",
        )
    log = tmp / "make.log"
    print(f"{os.cpu_count()} cores, {cpu_description()}; {args.rev} at {clone}", flush=True)
    install = phase(["make", "install"], clone, env, log)
    print(f"  install {install:.0f} s", flush=True)
    models = phase(["make", "models"], clone, env, log)
    print(f"  models  {models:.0f} s", flush=True)
    run = phase(["make", "demo"], clone, env, log)
    print(f"  run     {run:.0f} s", flush=True)
    text = log.read_text(errors="replace")
    found = re.findall(r"output:\s*(\S+)", text)
    if found:
        doc = json.loads((Path(found[-1]) / "manifest.json").read_text())
        for name, c in doc["stages"].items():
            print(f"    {name:18s} {c['rows_in']:5d} -> {c['rows_out']:5d}  {c['seconds']:6.1f} s")
        gen = doc["stages"].get("generate", {}).get("extra", {})
        print(f"    generation: {gen.get('tokens_per_second')} tokens/s")
    total = install + models + run
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    like = " like_avx2=1" if args.like_avx2 else ""
    print(
        f"demo install_s={install:.0f} models_s={models:.0f} run_s={run:.0f} total_s={total:.0f}"
        + like
    )


if __name__ == "__main__":
    main()
