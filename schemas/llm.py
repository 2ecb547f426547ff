"""Contracts of what the LLM is asked to write: JSON schemas for structured output."""

from __future__ import annotations

from typing import Any

# Query styles the generator knows; each has a versioned prompt in tasks/prompts.py.
QUERY_STYLES: tuple[str, ...] = ("question", "keywords")


def query_json_schema(max_chars: int) -> dict[str, Any]:
    """Schema of one synthetic query: {"query": "..."}."""
    return {
        "type": "object",
        "properties": {"query": {"type": "string", "minLength": 1, "maxLength": max_chars}},
        "required": ["query"],
        "additionalProperties": False,
    }
