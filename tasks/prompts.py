"""Versioned few-shot prompts: one per query style, one for writing graded passages, one for
the judge.

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

_EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was "
    "designed by Gustave Eiffel's company and completed in 1889 for the World's Fair."
)
_PHOTO = (
    "Photosynthesis converts light energy into chemical energy. Plants use carbon dioxide and "
    "water to make glucose, releasing oxygen as a by-product."
)


def _prompt(style: str, version: int, instruction: str, queries: tuple[str, str]) -> QueryPrompt:
    return QueryPrompt(
        style=style,
        version=f"{style}-v{version}",
        system=_SYSTEM,
        instruction=instruction,
        examples=((_EIFFEL, queries[0]), (_PHOTO, queries[1])),
    )


PROMPTS: dict[str, QueryPrompt] = {
    p.style: p
    for p in (
        _prompt(
            "question",
            1,
            "Write one short natural question (under 15 words) that this passage answers. "
            "Do not copy sentences from the passage.",
            ("when was the eiffel tower built", "what gas do plants release during photosynthesis"),
        ),
        _prompt(
            "keywords",
            1,
            "Write one keyword search query (3 to 6 words, no sentence) that should find "
            "this passage.",
            ("eiffel tower completion year designer", "photosynthesis oxygen by-product glucose"),
        ),
        _prompt(
            "claim",
            1,
            "Write one short factual claim (a statement, not a question, under 15 words) that "
            "this passage supports. Use your own words.",
            (
                "The Eiffel Tower was finished in 1889 for a world's fair",
                "Plants give off oxygen when they make glucose from light",
            ),
        ),
        _prompt(
            "paraphrase",
            1,
            "Pick the most important sentence of this passage and rewrite it in different "
            "words, as a search query of under 20 words.",
            (
                "iron tower in paris built by eiffel's firm for the 1889 fair",
                "how plants turn sunlight into chemical energy",
            ),
        ),
        _prompt(
            "hard",
            1,
            "Write one specific question (under 20 words) that only this passage answers: it "
            "must depend on a detail of the passage (a number, name or condition), not on its "
            "topic alone.",
            (
                "which company designed the tower completed for the 1889 world's fair in paris",
                "what two inputs do plants combine into glucose during photosynthesis",
            ),
        ),
    )
}

assert set(PROMPTS) == set(QUERY_STYLES), "every style in schemas.llm needs a prompt"


@dataclass(frozen=True)
class PassagePrompt:
    """Writes a passage at a given relevance level to a query (graded negatives)."""

    version: str = "graded-passage-v2"

    def messages(
        self, query: str, level: int, definition: str, positive: str
    ) -> list[dict[str, str]]:
        system = (
            "You write short passages for a search relevance dataset. Each passage is written "
            "to have an exact relevance level to the query. Reply with JSON only: "
            '{"passage": "..."}.'
        )
        user = (
            f"Query: {query}\n\n"
            f"A passage that fully answers it:\n{positive}\n\n"
            f"Write a new passage of 2 or 3 short sentences (under 60 words) that {definition} "
            f"(relevance level {level}). Write it like a documentation paragraph; do not copy "
            "the passage above."
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class JudgePrompt:
    """Grades how well a passage answers a query on the configured levels."""

    version: str = "judge-v1"

    def messages(self, query: str, passage: str, levels: dict[int, str]) -> list[dict[str, str]]:
        scale = "\n".join(f"{grade}: the passage {text}" for grade, text in levels.items())
        system = (
            "You judge search results. Given a query and a passage, say in a few words what the "
            "passage gives the user, then grade it on this scale:\n"
            f"{scale}\n"
            'Reply with JSON only: {"reason": "...", "grade": <number>}.'
        )
        user = f"Query: {query}\n\nPassage:\n{passage}"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


PASSAGE_PROMPT = PassagePrompt()
JUDGE_PROMPT = JudgePrompt()


def prompt_versions() -> list[str]:
    """Every prompt version: part of the fingerprint of what an LLM wrote."""
    versions = [p.version for p in PROMPTS.values()]
    return sorted([*versions, PASSAGE_PROMPT.version, JUDGE_PROMPT.version])
