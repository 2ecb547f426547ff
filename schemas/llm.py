"""Contracts of what the LLM is asked to write: JSON schemas for structured output."""

from __future__ import annotations

from typing import Any

# Query styles the generator knows; each has a versioned prompt in tasks/prompts.py.
QUERY_STYLES: tuple[str, ...] = ("question", "keywords", "claim", "paraphrase", "hard")

# Judge verdicts on a mined negative (tasks/judge.py).
VERDICTS: tuple[str, ...] = ("true_negative", "false_negative", "unsure")


def query_json_schema(max_chars: int) -> dict[str, Any]:
    """Schema of one synthetic query: {"query": "..."}."""
    return {
        "type": "object",
        "properties": {"query": {"type": "string", "minLength": 1, "maxLength": max_chars}},
        "required": ["query"],
        "additionalProperties": False,
    }


def passage_json_schema(max_chars: int) -> dict[str, Any]:
    """Schema of one written passage: {"passage": "..."}."""
    return {
        "type": "object",
        "properties": {"passage": {"type": "string", "minLength": 1, "maxLength": max_chars}},
        "required": ["passage"],
        "additionalProperties": False,
    }


def judge_json_schema(levels: list[int], reason_chars: int = 160) -> dict[str, Any]:
    """Schema of one judgement: the grade (one of the configured levels) and a short reason."""
    return {
        "type": "object",
        # The reason first: the model states it before it commits to a grade.
        "properties": {
            "reason": {"type": "string", "maxLength": reason_chars},
            "grade": {"type": "integer", "enum": sorted(levels)},
        },
        "required": ["reason", "grade"],
        "additionalProperties": False,
    }
