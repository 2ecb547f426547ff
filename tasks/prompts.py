"""Versioned few-shot prompts for synthetic queries, one per style.

Bump a prompt's `version` whenever its text changes: the version is recorded on every generated
row and is part of the shard fingerprint, so old outputs are never mixed with new ones.
Small models (SmolLM2-135M) copy the passage unless the examples show short, abstract queries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from schemas.llm import QUERY_STYLES


@dataclass(frozen=True)
class QueryPrompt:
    style: str
    version: str
    system: str
    instruction: str
    examples: tuple[tuple[str, str], ...]  # (passage, query)

    def messages(self, passage: str) -> list[dict[str, str]]:
        """Chat messages: system, then each example as a user/assistant turn, then the passage."""
        msgs = [{"role": "system", "content": self.system}]
        for example_passage, example_query in self.examples:
            msgs.append({"role": "user", "content": self._user(example_passage)})
            msgs.append({"role": "assistant", "content": json.dumps({"query": example_query})})
        msgs.append({"role": "user", "content": self._user(passage)})
        return msgs

    def _user(self, passage: str) -> str:
        return f"Passage:\n{passage}\n\n{self.instruction}"


_SYSTEM = (
    "You write search queries for a retrieval dataset. A query is what a user types before they "
    'have seen the passage. Reply with JSON only: {"query": "..."}.'
)

_EXAMPLES = (
    (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was "
        "designed by Gustave Eiffel's company and completed in 1889 for the World's Fair.",
        "when was the eiffel tower built",
        "eiffel tower completion year designer",
    ),
    (
        "Photosynthesis converts light energy into chemical energy. Plants use carbon dioxide and "
        "water to make glucose, releasing oxygen as a by-product.",
        "what gas do plants release during photosynthesis",
        "photosynthesis oxygen by-product glucose",
    ),
)

PROMPTS: dict[str, QueryPrompt] = {
    "question": QueryPrompt(
        style="question",
        version="question-v1",
        system=_SYSTEM,
        instruction="Write one short natural question (under 15 words) that this passage answers. "
        "Do not copy sentences from the passage.",
        examples=tuple((p, q) for p, q, _ in _EXAMPLES),
    ),
    "keywords": QueryPrompt(
        style="keywords",
        version="keywords-v1",
        system=_SYSTEM,
        instruction="Write one keyword search query (3 to 6 words, no sentence) that should find "
        "this passage.",
        examples=tuple((p, k) for p, _, k in _EXAMPLES),
    ),
}

assert set(PROMPTS) == set(QUERY_STYLES), "every style in schemas.llm needs a prompt"
