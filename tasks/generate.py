"""Synthetic query generation: requests in, validated queries (and rejects) out.

Three pieces, kept apart so each can be tested alone:
- `build_query_requests`: passages -> one request per (passage, style, index), with its prompt
  and a per-request seed (so results do not depend on batching or sharding);
- an engine (`VLLMEngine`) that turns chat conversations into JSON-schema-constrained completions;
- `parse_query_outputs`: completions -> queries table + rejects with a reason.

Reject reasons: truncated, invalid_json, schema_mismatch, empty_query, too_short, too_long,
copies_passage.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from schemas.config import GenerationConfig, LLMConfig
from schemas.llm import query_json_schema
from schemas.tables import QUERIES, REJECTS
from tasks.prompts import PROMPTS

log = logging.getLogger(__name__)
STAGE = "generate"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Completion:
    text: str
    output_tokens: int
    finish_reason: str | None


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float
    top_p: float

    def as_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


class ChatEngine(Protocol):
    """What the generation stage needs from an LLM backend."""

    backend: str
    model_name: str

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
    ) -> list[Completion]: ...


def request_seed(base_seed: int, *parts: str) -> int:
    digest = hashlib.blake2b("|".join((str(base_seed), *parts)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & 0x7FFF_FFFF


def query_id(passage_id: str, style: str, index: int, query: str) -> str:
    key = f"{passage_id}|{style}|{index}|{query}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def sampling_from(cfg: GenerationConfig) -> SamplingSettings:
    return SamplingSettings(cfg.max_tokens, cfg.temperature, cfg.top_p)


def build_query_requests(passages: pa.Table, cfg: GenerationConfig) -> list[dict[str, Any]]:
    """One request per (passage, style, index) with its chat messages and seed."""
    requests: list[dict[str, Any]] = []
    ids = passages.column("passage_id").to_pylist()
    texts = passages.column("text").to_pylist()
    for pid, text in zip(ids, texts, strict=True):
        shown = text[: cfg.max_passage_chars]
        for style, count in cfg.styles.items():
            prompt = PROMPTS[style]
            for index in range(count):
                requests.append(
                    {
                        "passage_id": pid,
                        "passage": text,
                        "style": style,
                        "index": index,
                        "prompt_version": prompt.version,
                        "messages": prompt.messages(shown),
                        "seed": request_seed(cfg.seed, pid, style, str(index)),
                    }
                )
    return requests


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def copy_ratio(query: str, passage: str) -> float:
    """Share of the query's words that form one verbatim run of the passage's words."""
    q, p = _words(query), _words(passage)
    if not q:
        return 0.0
    match = difflib.SequenceMatcher(None, q, p, autojunk=False).find_longest_match(
        0, len(q), 0, len(p)
    )
    return match.size / len(q)


def check_query(
    completion: Completion, passage: str, cfg: GenerationConfig
) -> tuple[str | None, str | None, str]:
    """(reason, detail, query) for one completion; reason None means the query is kept."""
    if completion.finish_reason == "length":
        return "truncated", f"hit max_tokens={cfg.max_tokens}", ""
    try:
        obj = json.loads(completion.text)
    except json.JSONDecodeError as e:
        return "invalid_json", str(e), ""
    if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
        return "schema_mismatch", 'expected {"query": string}', ""
    query = " ".join(obj["query"].split())
    if not query:
        return "empty_query", None, ""
    if len(query) < cfg.min_query_chars:
        return "too_short", f"{len(query)} < {cfg.min_query_chars} chars", query
    if len(query) > cfg.max_query_chars:
        return "too_long", f"{len(query)} > {cfg.max_query_chars} chars", query
    ratio = copy_ratio(query, passage)
    if len(_words(query)) >= 4 and ratio >= cfg.max_copy_ratio:
        return "copies_passage", f"copy ratio {ratio:.2f} >= {cfg.max_copy_ratio}", query
    return None, None, query


def parse_query_outputs(
    requests: list[dict[str, Any]],
    completions: list[Completion],
    cfg: GenerationConfig,
    engine_backend: str,
    model_name: str,
) -> tuple[pa.Table, pa.Table]:
    """Validate completions against their requests; returns (queries, rejects)."""
    if len(requests) != len(completions):
        raise ValueError(f"{len(requests)} requests but {len(completions)} completions")
    sampling = json.dumps(sampling_from(cfg).as_dict(), sort_keys=True)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for req, comp in zip(requests, completions, strict=True):
        reason, detail, query = check_query(comp, req["passage"], cfg)
        if reason is not None:
            rejects.append(
                {
                    "stage": STAGE,
                    "source": req["passage_id"],
                    "row": None,
                    "reason": reason,
                    "detail": f"style={req['style']}: {detail}"
                    if detail
                    else f"style={req['style']}",
                    "raw": comp.text[:200],
                }
            )
            continue
        rows.append(
            {
                "query_id": query_id(req["passage_id"], req["style"], req["index"], query),
                "passage_id": req["passage_id"],
                "query": query,
                "style": req["style"],
                "model": model_name,
                "backend": engine_backend,
                "prompt_version": req["prompt_version"],
                "sampling": sampling,
                "seed": req["seed"],
                "output_tokens": comp.output_tokens,
            }
        )
    return pa.Table.from_pylist(rows, schema=QUERIES), pa.Table.from_pylist(rejects, schema=REJECTS)


def generate_queries(
    passages: pa.Table, cfg: GenerationConfig, engine: ChatEngine
) -> tuple[pa.Table, pa.Table, dict[str, float]]:
    """The whole stage for one shard: (queries, rejects, stats with tokens and seconds)."""
    requests = build_query_requests(passages, cfg)
    if not requests:
        return QUERIES.empty_table(), REJECTS.empty_table(), {"requests": 0}
    start = time.perf_counter()
    completions = engine.chat_json(
        [r["messages"] for r in requests],
        query_json_schema(cfg.max_query_chars),
        sampling_from(cfg),
        [r["seed"] for r in requests],
    )
    seconds = time.perf_counter() - start
    queries, rejects = parse_query_outputs(
        requests, completions, cfg, engine.backend, engine.model_name
    )
    tokens = sum(c.output_tokens for c in completions)
    return (
        queries,
        rejects,
        {
            "requests": len(requests),
            "output_tokens": tokens,
            "generate_seconds": seconds,
        },
    )


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
    return env


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

        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": self.llm_cfg.dtype,
            "max_model_len": self.llm_cfg.max_model_len,
            "enforce_eager": self.llm_cfg.enforce_eager,
            "seed": self.seed,
        }
        if self.llm_cfg.device != "cpu":
            kwargs["gpu_memory_utilization"] = self.llm_cfg.gpu_memory_utilization
        start = time.perf_counter()
        self._llm = LLM(**kwargs)
        self.load_seconds = time.perf_counter() - start
        log.info("vLLM engine for %s loaded in %.1f s", self.model_name, self.load_seconds)

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
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
