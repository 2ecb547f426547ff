"""The real vLLM engine (SmolLM2 on CPU) behind the session's LLM worker."""

import json
import os
import subprocess
import sys

import pytest

from schemas.llm import query_json_schema
from tasks.llm.base import SamplingSettings
from tasks.prompts import PROMPTS
from tests.helpers import sample_rows

pytestmark = pytest.mark.slow


def test_structured_output_is_always_schema_valid_json(model_workers):
    llm, _ = model_workers
    rows = sample_rows(16)
    convs = [PROMPTS["keywords"].messages(r["text"]) for r in rows]
    outs = llm.client().chat_json(
        convs, query_json_schema(120), SamplingSettings(96, 0.0, 1.0), list(range(16))
    )
    assert len(outs) == 16
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 14
    for o in finished:
        obj = json.loads(o.text)
        assert set(obj) == {"query"} and 1 <= len(obj["query"]) <= 120
        assert o.output_tokens > 0


def test_same_seed_same_output(model_workers):
    llm, _ = model_workers
    conv = [PROMPTS["question"].messages(sample_rows(1)[0]["text"])]
    sampling = SamplingSettings(48, 0.8, 0.95)

    def sample(seed: int) -> str:
        outs = llm.client().chat_json(conv, query_json_schema(120), sampling, [seed])
        return outs[0].text

    # No warm-up: the first call computes the prompt's prefix, the second could read it from
    # vLLM's prefix cache; the engine empties the cache before each batch so both agree.
    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1  # the seed is used


def test_a_batch_repeats_whatever_ran_before(model_workers):
    """A redone shard must give the same LLM output as the first time, although other batches
    sharing its few-shot prefix ran in between (before the fix, 15 of 48 outputs differed)."""
    llm, _ = model_workers
    rows = sample_rows(24)
    schema = query_json_schema(120)

    def batch(chunk, temperature: float) -> list[str]:
        convs = [
            PROMPTS[style].messages(r["text"]) for r in chunk for style in ("question", "hard")
        ]
        seeds = list(range(len(convs)))
        outs = llm.client().chat_json(convs, schema, SamplingSettings(48, temperature, 0.95), seeds)
        return [o.text for o in outs]

    for temperature in (0.0, 0.8):
        first = batch(rows[:12], temperature)
        batch(rows[12:], temperature)  # other passages, the same prompt prefixes
        assert batch(rows[:12], temperature) == first


def test_a_retry_batch_repeats_when_another_shards_batch_ran_before_it(model_workers):
    """Shards share the engine: another shard's batch can run between a shard's first batch and
    its retry batch (separate calls). The retry's outputs must not depend on that."""
    llm, _ = model_workers
    rows = sample_rows(24)
    schema = query_json_schema(120)

    def convs(chunk) -> list:
        return [PROMPTS[style].messages(r["text"]) for r in chunk for style in ("question", "hard")]

    def ask(chunk, retry: bool, temperature: float = 0.8) -> list[str]:
        c = convs(chunk)
        sampling = SamplingSettings(48, temperature, 0.95)
        return [
            o.text
            for o in llm.client().chat_json(c, schema, sampling, list(range(len(c))), retry=retry)
        ]

    ask(rows[:12], retry=False)
    alone = ask(rows[:6], retry=True)
    ask(rows[:12], retry=False)
    ask(rows[12:], retry=False)  # another shard's first batch, in between
    assert ask(rows[:6], retry=True) == alone


def test_embedder_vectors_are_normalized_and_semantic(model_workers):
    import numpy as np

    _, emb = model_workers
    vecs = emb.client().encode(
        [
            "how to parse json",
            "decode a JSON document into Python objects",
            "bake sourdough bread",
        ],
        8,
        "",
        32,
    )
    assert vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_prepare_models_leaves_what_a_run_would_wait_for(tmp_path):
    """`make models` (tripletforge prepare-models) leaves the embedder's ONNX export and vLLM's
    answer about the LLM's architecture in the cache, and vLLM reads that answer instead of
    inspecting the model in a subprocess (~21 s of a first LLM load on 2 cores). SmolLM2 is
    linked in prepared, so nothing is converted again."""
    from tasks.models import minilm_path, onnx_export_dir, smollm2_hf_path

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    smollm2_hf_path(cache).symlink_to(smollm2_hf_path())
    env = {**os.environ, "TRIPLETFORGE_CACHE": str(cache)}
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    done = subprocess.run(
        [cli, "prepare-models"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (onnx_export_dir(minilm_path(), cache) / "model.onnx").exists()
    assert "model info: LlamaForCausalLM" in done.stdout, done.stdout
    # vLLM asked in a fresh process, with its inspection subprocess made to fail: it answers,
    # so it read the cached answer
    ask = (
        "from vllm.model_executor.models import registry\n"
        "def no_subprocess(fn):\n"
        "    raise SystemExit('vLLM inspected the model again')\n"
        "registry._run_in_subprocess = no_subprocess\n"
        "info = registry.ModelRegistry._try_inspect_model_cls('LlamaForCausalLM')\n"
        "assert info is not None and info.is_text_generation_model\n"
    )
    env["VLLM_CACHE_ROOT"] = str(cache / "vllm")
    asked = subprocess.run(
        [sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=300
    )
    assert asked.returncode == 0, asked.stderr[-2000:]
