"""LLM judge for false negatives (the expensive end of a cascade; see `JudgeConfig`).

The cheap filters in `tasks.mine` run first; only the candidates they leave in the uncertain
band (and, optionally, looser siblings of the positive) reach the judge. The judge grades each
(query, passage) on the configured relevance scale and a verdict follows from the grade:

    grade >= false_negative_grade -> false_negative (relabelled as a positive, or dropped)
    grade >= unsure_grade         -> unsure (dropped)
    lower                         -> true_negative (kept, with its grade)

An output that stays invalid after the retries is `unsure`: a negative that may answer the
query is worse training data than one negative fewer.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from schemas.config import GradingConfig, JudgeConfig
from schemas.llm import judge_json_schema
from tasks.llm.base import (
    ChatEngine,
    Completion,
    SamplingSettings,
    request_seed,
    run_with_retries,
)
from tasks.prompts import JUDGE_PROMPT

REASON_CHARS = 160
JUDGED = {
    "query_id": pl.String,
    "passage_id": pl.String,
    "grade": pl.Int8,
    "verdict": pl.String,
    "judge_reason": pl.String,
}


def verdict_of(grade: int | None, false_negative_grade: int, unsure_grade: int) -> str:
    if grade is None:
        return "unsure"
    if grade >= false_negative_grade:
        return "false_negative"
    if grade >= unsure_grade:
        return "unsure"
    return "true_negative"


def check_judgement(
    completion: Completion, levels: dict[int, str]
) -> tuple[str | None, str | None, str]:
    """(reason, detail, json of {grade, reason}) of one judge output."""
    if completion.finish_reason == "length":
        return "truncated", "judge output hit max_tokens", ""
    try:
        obj = json.loads(completion.text)
    except json.JSONDecodeError as e:
        return "invalid_json", str(e), ""
    grade = obj.get("grade") if isinstance(obj, dict) else None
    if not isinstance(grade, int) or isinstance(grade, bool) or grade not in levels:
        return "schema_mismatch", f"grade must be one of {sorted(levels)}", ""
    reason = obj.get("reason")
    text = " ".join(reason.split())[:REASON_CHARS] if isinstance(reason, str) else ""
    return None, None, json.dumps({"grade": grade, "reason": text})


def judge_pairs(
    pairs: pl.DataFrame,
    engine: ChatEngine,
    grading: GradingConfig,
    cfg: JudgeConfig,
    grades: tuple[int, int],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Judge (query_id, passage_id, query, text) rows: returns (query_id, passage_id, grade,
    verdict, judge_reason) and stats (requests, tokens, seconds, verdict counts)."""
    if pairs.is_empty():
        return pl.DataFrame(schema=JUDGED), {"requests": 0}
    requests = [
        {
            "messages": JUDGE_PROMPT.messages(
                row["query"], row["text"][: cfg.max_passage_chars], grading.levels
            ),
            "seed": request_seed(cfg.seed, row["query_id"], row["passage_id"], "judge"),
        }
        for row in pairs.iter_rows(named=True)
    ]
    outcomes, stats = run_with_retries(
        requests,
        engine,
        judge_json_schema(list(grading.levels), REASON_CHARS),
        SamplingSettings(cfg.max_tokens, 0.0, 1.0),
        lambda comp, _req: check_judgement(comp, grading.levels),
        retries=1,
        retry_temperature=0.7,
    )
    fn_grade, unsure_grade = grades
    grade_col, verdicts, reasons = [], [], []
    for o in outcomes:
        if o.reason is None:
            obj = json.loads(o.value)
            grade_col.append(obj["grade"])
            reasons.append(obj["reason"])
        else:
            grade_col.append(None)
            reasons.append(f"invalid judge output ({o.reason}): {o.completion.text[:80]}")
        verdicts.append(verdict_of(grade_col[-1], fn_grade, unsure_grade))
    out = pl.DataFrame(
        {
            "query_id": pairs["query_id"],
            "passage_id": pairs["passage_id"],
            "grade": grade_col,
            "verdict": verdicts,
            "judge_reason": reasons,
        },
        schema=JUDGED,
    )
    stats["verdicts"] = {k: verdicts.count(k) for k in sorted(set(verdicts))}
    stats["model"] = engine.model_name
    stats["prompt_version"] = JUDGE_PROMPT.version
    return out, stats
