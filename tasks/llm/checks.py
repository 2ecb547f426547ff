"""Checks and records shared by every stage that keeps LLM output: the JSON field of a completion,
loops, the language of the text, and the reject / provenance rows."""

from __future__ import annotations

import json
from typing import Any

from schemas.config import GenerationConfig
from tasks.llm.base import Attempted, ChatEngine, Completion
from tasks.text import dominant_script, language_odds, repeated_trigram_share, same_script


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


def repetitive(text: str, cfg: GenerationConfig) -> str | None:
    share = repeated_trigram_share(text)
    if share > cfg.max_repeated_trigrams:
        return f"{share:.0%} of word 3-grams repeat (> {cfg.max_repeated_trigrams:.0%})"
    return None


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


def reject_row(stage: str, source: str, kind: str, o: Attempted) -> dict[str, Any]:
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


def provenance(o: Attempted, engine: ChatEngine, prompt_version: str) -> dict[str, Any]:
    return {
        "model": engine.model_name,
        "backend": engine.backend,
        "prompt_version": prompt_version,
        "sampling": json.dumps(o.sampling.as_dict(), sort_keys=True),
        "seed": o.seed,
        "attempt": o.attempt,
        "output_tokens": o.completion.output_tokens,
    }
