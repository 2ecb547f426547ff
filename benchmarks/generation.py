"""Generation throughput: raw vLLM vs the pipeline's generation stage vs transformers.

The same prompts (default 256: the first passages of the bundled corpus x the five query
styles, rendered by the pipeline's own prompt builder) go through

(a) raw vLLM: `LLM.generate` on the chat-template-rendered prompt strings with the same
    SamplingParams the pipeline uses (max_tokens, temperature, top_p, per-request seed, the
    same JSON-schema structured output), so the ratio isolates the pipeline's own overhead;
(b) the pipeline's stage, `tasks.generate.generate_queries` with a `VLLMEngine` around the same
    loaded engine (request building, chat rendering, parsing, checks and its retry batch all
    counted; the retry's tokens too). This is the code the Ray LLM worker runs;
(c) Hugging Face transformers `generate`, batched with left padding, greedy, same rendered
    prompts and max_new_tokens, unconstrained (transformers has no JSON-schema decoding), in a
    child process after the vLLM engine is shut down so the two never share the 2 cores.

vLLM is warmed up first (its first big batch runs at about half speed), then (a) and (b)
alternate for --repeats rounds; the best round of each is reported, since on a shared machine
noise only ever slows a run down. Every round starts with vLLM's prefix cache empty, as a real
run's batch does (its prompts are new): the pipeline's engine empties it before each batch
(that is what makes a batch repeat) and warms the few-shot prefixes; raw vLLM would otherwise
read the previous round's identical prompts, passages included, from the cache.

Last line: `generation pipeline_vs_raw=R1 vllm_vs_transformers=R2`.
Usage: .venv/bin/python benchmarks/generation.py [--prompts 256] [--repeats 2]
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

from schemas.config import GenerationConfig, LLMConfig  # noqa: E402
from tasks.llm.engine import engine_env  # noqa: E402
from tasks.models import cache_dir, resolve_llm_path  # noqa: E402

STYLES = {"question": 1, "keywords": 1, "claim": 1, "paraphrase": 1, "hard": 1}

TRANSFORMERS_CHILD = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts_file, max_new, batch, cores = sys.argv[1:6]
prompts = json.load(open(prompts_file))
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
batch = int(batch)
def run(model, items, max_new):
    tokens = 0
    for i in range(0, len(items), batch):
        enc = tok(items[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return tokens
# Give transformers its best setting on this machine: dtype x threads, timed on 4 prompts.
# (On this 2-vCPU VM some torch matmuls run several times slower on 2 threads than on 1.)
timings = []
for dtype in (torch.float32, torch.bfloat16):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    for threads in sorted({1, int(cores)}):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        run(model, prompts[:4], 8)
        timings.append((time.perf_counter() - start, str(dtype).split(".")[-1], threads))
_, dtype, threads = min(timings)
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                             local_files_only=True).eval()
start = time.perf_counter()
tokens = run(model, prompts, int(max_new))
print("RESULT", json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start,
                            "dtype": dtype, "threads": threads,
                            "calibration": [[round(t, 1), d, n] for t, d, n in timings]}))
"""


def passages_for(n_prompts: int):
    from tasks import ingest

    sample = ROOT / "data" / "sample" / "passages.jsonl"  # the bundled corpus
    table = ingest.ingest_file(sample, ingest_cfg()).passages.sort_by("passage_id")
    per_passage = sum(STYLES.values())
    return table.slice(0, -(-n_prompts // per_passage))


def ingest_cfg():
    from schemas.config import InputConfig

    return InputConfig(paths=["unused"], title_column="title")


def transformers_tokens_per_s(
    prompts: list[str], max_new: int, batch: int
) -> tuple[int, float, dict]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [
        sys.executable,
        "-c",
        TRANSFORMERS_CHILD,
        str(resolve_llm_path(None)),
        f.name,
        str(max_new),
        str(batch),
        str(os.cpu_count() or 1),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    os.unlink(f.name)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"transformers run failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[0][len("RESULT ") :])
    return result["tokens"], result["seconds"], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf-batch", type=int, default=16)
    args = parser.parse_args()

    llm_cfg = LLMConfig()
    os.environ.update(engine_env(llm_cfg, str(cache_dir()), os.cpu_count() or 1))
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from schemas.llm import query_json_schema
    from tasks.generate import build_query_requests, generate_queries
    from tasks.llm.engine import VLLMEngine

    gen_cfg = GenerationConfig(styles=STYLES)
    passages = passages_for(args.prompts)
    requests = build_query_requests(passages, gen_cfg)  # --prompts rounded up to whole passages
    engine = VLLMEngine(str(resolve_llm_path(None)), llm_cfg.model_name, llm_cfg)
    llm = engine._llm
    tokenizer = llm.get_tokenizer()
    rendered = [
        tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        for r in requests
    ]
    schema = query_json_schema(gen_cfg.max_query_chars)
    params = [
        SamplingParams(
            max_tokens=gen_cfg.max_tokens,
            temperature=gen_cfg.temperature,
            top_p=gen_cfg.top_p,
            seed=r["seed"],
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for r in requests
    ]

    def raw() -> tuple[int, float]:
        llm.reset_prefix_cache()  # as for the pipeline's batch: these prompts are new to it
        start = time.perf_counter()
        outs = llm.generate(rendered, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start

    def pipeline() -> tuple[int, float]:
        start = time.perf_counter()
        queries, rejects, stats = generate_queries(passages, gen_cfg, engine)
        assert stats["requests"] == queries.num_rows + rejects.num_rows
        return stats["output_tokens"], time.perf_counter() - start

    llm.generate(rendered[:32], params[:32], use_tqdm=False)  # warm-up
    results: dict[str, list[tuple[int, float]]] = {"raw vLLM": [], "pipeline stage": []}
    for _ in range(args.repeats):
        results["raw vLLM"].append(raw())
        results["pipeline stage"].append(pipeline())
    engine.shutdown()
    hf_tokens, hf_seconds, hf = transformers_tokens_per_s(
        rendered, gen_cfg.max_tokens, args.hf_batch
    )
    results["transformers"] = [(hf_tokens, hf_seconds)]

    best = {name: max(runs, key=lambda r: r[0] / r[1]) for name, runs in results.items()}
    print(f"{len(requests)} prompts, {len(passages)} passages x {len(STYLES)} styles, SmolLM2-135M")
    print(f"{'engine':<16}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}   all rounds (tokens/s)")
    for name, (tokens, seconds) in best.items():
        rounds = ", ".join(f"{t / s:.0f}" for t, s in results[name])
        print(f"{name:<16}{tokens:>8}{seconds:>10.1f}{tokens / seconds:>10.1f}   {rounds}")
    print(
        f"(transformers: unconstrained greedy decoding, batches of {args.hf_batch} with left "
        f"padding, {hf['dtype']} on {hf['threads']} thread(s), the fastest of "
        f"[seconds, dtype, threads] {hf['calibration']})"
    )
    tps = {name: tokens / seconds for name, (tokens, seconds) in best.items()}
    print(
        f"generation pipeline_vs_raw={tps['pipeline stage'] / tps['raw vLLM']:.2f} "
        f"vllm_vs_transformers={tps['raw vLLM'] / tps['transformers']:.2f}"
    )


if __name__ == "__main__":
    main()
