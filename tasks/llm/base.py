"""What every LLM backend offers the stages: JSON-schema-constrained chat completions, one seed
per request, and re-asking rejected requests (`run_with_retries`)."""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


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


def token_rates(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats of an LLM stage with tokens/s from its engine time."""
    seconds = stats.get("generate_seconds", 0.0)
    tokens = stats.get("output_tokens", 0)
    return {
        **stats,
        "engine_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
    }
