"""vLLM generation speed in bfloat16 vs float32 on this CPU: what `llm.dtype: auto` decides.

`auto` picks bfloat16 on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX) and float32
on other CPUs. This benchmark measures both on the machine it runs on, so the rule is checked
where it is applied rather than assumed: each dtype gets its own child process (one vLLM engine
per process, never two in memory at once), loads the prepared SmolLM2 with `VLLMEngine`, warms
up, and generates the same requests `--repeats` times: `--passages` passages of the bundled
corpus x two query styles (question, keywords), the pipeline's few-shot prompts, JSON-schema
structured output, greedy, max_tokens from the generation defaults. The best round of each
dtype is reported (noise on a shared machine only ever slows a run down).

Last line: `llm_dtype bf16_vs_float32=R cpu_bf16=native|emulated auto=DTYPE`
(R > 1: bfloat16 is faster here).
Usage: .venv/bin/python benchmarks/llm_dtype.py [--passages 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import GenerationConfig, InputConfig, LLMConfig  # noqa: E402
from tasks.hardware import BF16_CPU_FLAGS, cpu_flags  # noqa: E402
from tasks.llm.engine import resolve_llm_dtype  # noqa: E402

STYLES = {"question": 1, "keywords": 1}


def child(dtype: str, n_passages: int, repeats: int) -> None:
    """Runs in its own process: one engine in `dtype`, warm-up, then the timed rounds."""
    from tasks import ingest
    from tasks.generate import generate_queries
    from tasks.llm.engine import VLLMEngine, engine_env
    from tasks.models import cache_dir, resolve_llm_path

    llm_cfg = LLMConfig(dtype=dtype)
    os.environ.update(engine_env(llm_cfg, str(cache_dir()), os.cpu_count() or 1))
    gen_cfg = GenerationConfig(styles=STYLES, temperature=0.0)
    sample = ROOT / "data" / "sample" / "passages.jsonl"
    table = ingest.ingest_file(sample, InputConfig(paths=["unused"], title_column="title"))
    passages = table.passages.sort_by("passage_id")
    engine = VLLMEngine(str(resolve_llm_path(None)), llm_cfg.model_name, llm_cfg)
    generate_queries(passages.slice(n_passages, 16), gen_cfg, engine)  # warm-up, other passages
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, _, stats = generate_queries(passages.slice(0, n_passages), gen_cfg, engine)
        rounds.append((stats["output_tokens"], time.perf_counter() - start))
    engine.shutdown()
    print("RESULT", json.dumps({"requests": stats["requests"], "rounds": rounds}))


def measure(dtype: str, n_passages: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", dtype, "--passages", str(n_passages)]
    cmd += ["--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"{dtype} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.passages, args.repeats)
        return

    native = bool(BF16_CPU_FLAGS & cpu_flags())
    best = {}
    print(f"SmolLM2-135M, {args.passages} passages x {len(STYLES)} styles, greedy, warm engine")
    print(f"{'dtype':<10}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}   all rounds")
    for dtype in ("bfloat16", "float32"):
        result = measure(dtype, args.passages, args.repeats)
        tokens, seconds = max(result["rounds"], key=lambda r: r[0] / r[1])
        best[dtype] = tokens / seconds
        rounds = ", ".join(f"{t / s:.1f}" for t, s in result["rounds"])
        print(
            f"{dtype:<10}{result['requests']:>9}{tokens:>8}{seconds:>9.1f}"
            f"{tokens / seconds:>10.1f}   {rounds}"
        )
    print(
        f"llm_dtype bf16_vs_float32={best['bfloat16'] / best['float32']:.2f} "
        f"cpu_bf16={'native' if native else 'emulated'} "
        f"auto={resolve_llm_dtype('auto', 'cpu')}"
    )


if __name__ == "__main__":
    main()
