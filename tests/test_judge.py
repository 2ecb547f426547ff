"""The judge cascade, the round-trip consistency filter and graded passages, as units: crafted
embeddings with known scores and scripted LLM outputs (the real model runs these stages in
test_pipeline.py)."""

import polars as pl
import pyarrow as pa
import pytest

from schemas.config import GenerationConfig, GradingConfig, JudgeConfig, MiningConfig
from schemas.llm import judge_json_schema
from schemas.tables import CLUSTERS, GENERATED
from tasks.llm.base import Completion
from tasks.llm.judge import check_judgement, judge_pairs, verdict_of
from tasks.mine import JudgeStep, mine_negatives
from tasks.write_passages import check_passage, generate_passages
from tests.test_generate_parse import ScriptedEngine, done
from tests.test_mine import QUERY, corpus_with_scores, kept_ids, reason_of

LEVELS = GradingConfig().levels  # 3 fully .. 0 unrelated
POSITIVE = (
    "The heapq module provides an implementation of the heap queue algorithm, also known as "
    "the priority queue algorithm."
)


def mine(scores, cfg, query="what is a heap", **kwargs):
    ids = ["pos"] + [f"n{i}" for i in range(len(scores) - 1)]
    queries = pa.table({"query_id": ["q"], "passage_id": ["pos"], "query": [query]})
    kwargs.setdefault("texts", {"pos": POSITIVE})  # written passages are measured against it
    result = mine_negatives(
        queries, QUERY, ids, corpus_with_scores(scores), CLUSTERS.empty_table(), cfg, **kwargs
    )
    return pl.from_arrow(result.candidates), result


# --- verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grade,verdict",
    [
        (3, "false_negative"),
        (2, "unsure"),
        (1, "true_negative"),
        (0, "true_negative"),
        (None, "unsure"),
    ],
)
def test_verdict_boundaries(grade, verdict):
    assert verdict_of(grade, 3, 2) == verdict


@pytest.mark.parametrize(
    "completion,reason",
    [
        (Completion('{"reason": "x", "gra', 96, "length"), "truncated"),
        (done("nope"), "invalid_json"),
        (done({"reason": "x", "grade": 7}), "schema_mismatch"),
        (done({"reason": "x", "grade": "3"}), "schema_mismatch"),
        (done({"reason": "x", "grade": True}), "schema_mismatch"),
        (done({"reason": "answers it", "grade": 3}), None),
    ],
)
def test_judge_output_checks(completion, reason):
    assert check_judgement(completion, LEVELS)[0] == reason


def test_judge_schema_enumerates_the_levels():
    schema = judge_json_schema(list(LEVELS))
    assert schema["properties"]["grade"]["enum"] == [0, 1, 2, 3]
    assert list(schema["properties"]) == ["reason", "grade"]


def test_judge_pairs_grades_and_marks_invalid_output_unsure():
    pairs = pl.DataFrame(
        {
            "query_id": ["q", "q", "q"],
            "passage_id": ["a", "b", "c"],
            "query": ["what is a heap"] * 3,
            "text": ["A heap is a tree.", "Sockets.", "Heaps and stacks."],
        }
    )
    engine = ScriptedEngine(
        [
            done({"reason": "defines a heap", "grade": 3}),
            done({"reason": "unrelated", "grade": 0}),
            done("garbage"),
        ],
        [done("still garbage")],
    )
    out, stats = judge_pairs(pairs, engine, GradingConfig(), JudgeConfig(enabled=True), (3, 2))
    assert out["verdict"].to_list() == ["false_negative", "true_negative", "unsure"]
    assert out["grade"].to_list() == [3, 0, None]
    assert out["judge_reason"][0] == "defines a heap"
    assert out["judge_reason"][2].startswith("invalid judge output (invalid_json)")
    assert stats["verdicts"] == {"false_negative": 1, "true_negative": 1, "unsure": 1}
    assert engine.calls[0]["sampling"].temperature == 0.0


# --- the cascade inside mining -------------------------------------------------------------------


def scripted_judge(verdicts: dict[str, tuple[int, str]], seen: list):
    def judge(todo: pl.DataFrame) -> pl.DataFrame:
        seen.extend(todo["passage_id"].to_list())
        return pl.DataFrame(
            {
                "query_id": todo["query_id"],
                "passage_id": todo["passage_id"],
                "grade": [verdicts[p][0] for p in todo["passage_id"]],
                "verdict": [verdicts[p][1] for p in todo["passage_id"]],
                "judge_reason": ["r"] * todo.height,
            },
            schema={
                "query_id": pl.String,
                "passage_id": pl.String,
                "grade": pl.Int8,
                "verdict": pl.String,
                "judge_reason": pl.String,
            },
        )

    return judge


def test_only_the_uncertain_band_is_judged_and_verdicts_apply():
    # positive 0.8: ratio filter drops >= 0.76; band 0.85 * 0.8 = 0.68: n0 (0.75), n1 (0.68)
    # are judged, n2 (0.6799) and n3 (0.5) are not.
    seen: list[str] = []
    verdicts = {"n0": (3, "false_negative"), "n1": (1, "true_negative")}
    cfg = MiningConfig(num_negatives=3, max_positive_ratio=0.95)
    step = JudgeStep(scripted_judge(verdicts, seen), JudgeConfig(enabled=True, band_min_ratio=0.85))
    df, result = mine([0.8, 0.75, 0.68, 0.6799, 0.5], cfg, judge=step)
    assert seen == ["n0", "n1"]
    assert reason_of(df, "n0") == "relabeled_positive"
    assert kept_ids(df) == ["n1", "n2", "n3"]  # the judged-out n0 is replaced by the next one
    assert df.filter(pl.col("passage_id") == "n1")["grade"].item() == 1
    assert df.filter(pl.col("passage_id") == "n2")["verdict"].item() is None
    assert result.judge_stats == {
        "judged": 2,
        "verdicts": {"false_negative": 1, "true_negative": 1},
    }


def test_unsure_and_drop_mode_and_scope_all():
    seen: list[str] = []
    verdicts = {f"n{i}": (2, "unsure") for i in range(4)} | {"n1": (3, "false_negative")}
    step = JudgeStep(
        scripted_judge(verdicts, seen),
        JudgeConfig(enabled=True, scope="all", max_per_query=2),
        on_false_negative="drop",
    )
    df, _ = mine([0.8, 0.7, 0.6, 0.5, 0.4], MiningConfig(num_negatives=4), judge=step)
    assert seen == ["n0", "n1"]  # all survivors qualify; the two hardest are judged
    assert reason_of(df, "n0") == "judged_unsure"
    assert reason_of(df, "n1") == "answers_query"
    assert kept_ids(df) == ["n2", "n3"]


# --- round-trip consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("top_k,kept", [(1, False), (2, False), (3, True)])
def test_consistency_filter_boundary(top_k, kept):
    # two passages score above the positive (0.8): it ranks 3rd
    df, result = mine(
        [0.8, 0.9, 0.85, 0.5, 0.4], MiningConfig(max_positive_ratio=None), consistency_top_k=top_k
    )
    assert df["positive_rank"].unique().to_list() == [3]
    assert (result.queries_kept == 1) is kept
    if not kept:
        assert result.rejects["reason"].to_pylist() == ["failed_consistency"]
        assert "ranked 3 > top" in result.rejects["detail"][0].as_py()
        assert not df["kept"].any()


def test_a_rejected_query_keeps_none_of_its_written_passages():
    # every mined candidate of the query is removed by a cheap rule before it fails the filter
    generated = pa.Table.from_pylist([written_row("gen-a", "q", 1)], schema=GENERATED)
    df, result = mine(
        [0.5, 0.9],
        MiningConfig(max_positive_ratio=0.95),
        consistency_top_k=1,
        generated=generated,
        generated_vectors=corpus_with_scores([0.3]),
    )
    assert result.queries_kept == 0 and not df["kept"].any()
    assert reason_of(df, "gen-a") == "failed_consistency"


def test_consistency_rejected_query_is_not_judged():
    seen: list[str] = []
    step = JudgeStep(scripted_judge({}, seen), JudgeConfig(enabled=True, scope="all"))
    _, result = mine(
        [0.5, 0.9, 0.4], MiningConfig(max_positive_ratio=None), consistency_top_k=1, judge=step
    )
    assert seen == [] and result.queries_kept == 0


# --- graded passages -----------------------------------------------------------------------------


def written_row(pid, qid, grade):
    return {
        "passage_id": pid,
        "query_id": qid,
        "text": "t",
        "grade": grade,
        "model": "m",
        "backend": "b",
        "prompt_version": "p",
        "sampling": "{}",
        "seed": 1,
        "attempt": 1,
        "output_tokens": 3,
    }


def test_generated_passages_become_graded_candidates_with_scores():
    generated = pa.Table.from_pylist(
        [
            {
                "passage_id": "gen-a",
                "query_id": "q",
                "text": "t",
                "grade": 2,
                "model": "m",
                "backend": "b",
                "prompt_version": "p",
                "sampling": "{}",
                "seed": 1,
                "attempt": 1,
                "output_tokens": 3,
            },
            {
                "passage_id": "gen-b",
                "query_id": "other",
                "text": "t",
                "grade": 1,
                "model": "m",
                "backend": "b",
                "prompt_version": "p",
                "sampling": "{}",
                "seed": 1,
                "attempt": 1,
                "output_tokens": 3,
            },
        ],
        schema=GENERATED,
    )
    vectors = corpus_with_scores([0.7, 0.1])
    df, _ = mine([0.8, 0.5, 0.4], MiningConfig(), generated=generated, generated_vectors=vectors)
    gen = df.filter(pl.col("origin") == "generated")
    assert gen["passage_id"].to_list() == ["gen-a"]  # only this shard's queries
    assert gen["grade"].item() == 2 and gen["kept"].item()
    assert gen["score"].item() == pytest.approx(0.7, abs=1e-6)
    assert gen["positive_score"].item() == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize(
    "completion,reason",
    [
        (done({"passage": "Too short."}), "too_short"),
        (done({"passage": POSITIVE}), "copies_positive"),
        (done({"text": "x"}), "schema_mismatch"),
        (done({"passage": "  "}), "empty_passage"),
        (
            done({"passage": "Куча — это дерево, в котором каждый родитель не больше детей."}),
            "wrong_language",
        ),
        (done({"passage": "A stack is a last-in first-out structure with push and pop."}), None),
        (
            done({"passage": "Une pile est une structure où le dernier entré sort le premier."}),
            "wrong_language",
        ),
        (
            done({"passage": "The stack is the stack of the stack of the stack of the stack."}),
            "repetitive",
        ),
        (done({"passage": ("A stack holds items. " * 80)[:1200]}), "truncated"),  # maxLength cut
    ],
)
def test_written_passage_checks(completion, reason):
    assert check_passage(completion, POSITIVE, GenerationConfig())[0] == reason


def test_generate_passages_one_per_query_and_level_with_provenance():
    queries = pa.table(
        {"query_id": ["q1", "q2"], "passage_id": ["p", "p"], "query": ["what is a heap", "heapq"]}
    )
    cfg = GenerationConfig(negative_levels=[2, 1], retries=0)
    good = "A stack is a last-in first-out structure with push and pop operations."
    engine = ScriptedEngine(
        [
            done({"passage": good}),
            done({"passage": good + " Two."}),
            done("{x"),
            done({"passage": good}),
        ]
    )
    rows, rejects, stats = generate_passages(queries, {"p": POSITIVE}, cfg, GradingConfig(), engine)
    assert rows.schema.equals(GENERATED)
    assert rows["grade"].to_pylist() == [2, 1, 1]
    assert rows["query_id"].to_pylist() == ["q1", "q1", "q2"]
    assert all(p.startswith("gen-") for p in rows["passage_id"].to_pylist())
    assert len(set(rows["passage_id"].to_pylist())) == 3
    assert rejects["reason"].to_pylist() == ["invalid_json"]
    assert rejects["stage"].to_pylist() == ["generate_passages"]
    assert stats["requests"] == 4 == rows.num_rows + rejects.num_rows
    first = engine.calls[0]["conversations"][0][-1]["content"]
    assert "what is a heap" in first and LEVELS[2] in first and POSITIVE in first
    assert engine.calls[0]["sampling"].temperature == 0.7  # passage_temperature, not greedy


def test_written_passages_follow_the_query_temperature_when_asked():
    queries = pa.table({"query_id": ["q1"], "passage_id": ["p"], "query": ["what is a heap"]})
    cfg = GenerationConfig(negative_levels=[1], retries=0, passage_temperature=None)
    engine = ScriptedEngine([done({"passage": "A stack is last in, first out, with push."})])
    generate_passages(queries, {"p": POSITIVE}, cfg, GradingConfig(), engine)
    assert engine.calls[0]["sampling"].temperature == cfg.temperature == 0.0


# --- one gate: the demo's false negatives, planted as mined and as written passages -------------

CRC_QUERY = "the function to compute a CRC-32 checksum"
CRC_POSITIVE = (
    "zlib.crc32(data[, value]) computes a CRC (Cyclic Redundancy Check) checksum of data. The "
    "result is an unsigned 32-bit integer. If value is present, it is used as the starting value "
    "of the checksum."
)
# the demo kept this grade-2 passage as a hard negative: 0.88 against the positive's 0.38
CRC_WRITTEN = "The function to compute a CRC-32 checksum is: crc32(string[, start]);"
# the positive's sentences in another order: a contiguous-run measure sees no copy
CRC_REORDERED = " ".join(reversed([s.strip() + "." for s in CRC_POSITIVE.split(".") if s.strip()]))
TRUE_NEGATIVE = "hashlib.sha256() returns a SHA-256 hash object; update() feeds it bytes."
SECTION_QUERY = "How to create a new text section in a paragraph"
# the demo's other case: the query word for word plus "Summary: 2 min"
SECTION_COPY = "How to create a new text section in a paragraph? Summary: 2 min"
SECTION_POSITIVE = "To start a new section, insert a section break: Layout, Breaks, Next Page."


def gate(query, positive, positive_score, planted, cfg=None):
    """Each planted (name, text, score) as a mined passage and as a passage the LLM wrote at
    grade 2 for the query; every rule of the one gate applies to both. Returns
    {name: (reason as mined, reason as written)}."""
    written = pa.Table.from_pylist(
        [written_row(f"w-{n}", "q", 2) | {"text": t} for n, t, _ in planted], schema=GENERATED
    )
    df, _ = mine(
        [positive_score] + [s for _, _, s in planted],
        cfg or MiningConfig(num_negatives=10),
        query=query,
        texts={"pos": positive} | {f"n{i}": t for i, (_, t, _) in enumerate(planted)},
        generated=written,
        generated_vectors=corpus_with_scores([s for _, _, s in planted]),
    )
    return {
        n: (reason_of(df, f"n{i}"), reason_of(df, f"w-{n}")) for i, (n, _, _) in enumerate(planted)
    }


def test_one_gate_removes_the_demos_false_negatives_mined_or_written():
    planted = [
        ("copy", CRC_WRITTEN, 0.88),
        ("reordered", CRC_REORDERED, 0.36),
        ("true", TRUE_NEGATIVE, 0.30),
    ]
    reasons = gate(CRC_QUERY, CRC_POSITIVE, 0.38, planted)
    assert reasons == {
        "copy": ("above_positive_ratio", "above_positive_ratio"),
        "reordered": ("duplicate_of_positive", "duplicate_of_positive"),
        "true": (None, None),
    }
    # without the score rule the text rules still catch the copy of the query
    no_ratio = MiningConfig(num_negatives=10, max_positive_ratio=None)
    reasons = gate(CRC_QUERY, CRC_POSITIVE, 0.38, planted, no_ratio)
    assert reasons["copy"] == ("copies_query", "copies_query")
    assert reasons["reordered"] == ("duplicate_of_positive", "duplicate_of_positive")
    assert reasons["true"] == (None, None)


@pytest.mark.parametrize("score", [0.97, 0.45])
def test_a_passage_that_restates_the_query_is_removed_whatever_it_scores(score):
    """At 0.97 (the demo's score, positive 0.47) the ratio rule removes it first; at 0.45, as
    if the embedder missed it, copies_query does."""
    planted = [("copy", SECTION_COPY, score), ("true", TRUE_NEGATIVE, 0.2)]
    reasons = gate(SECTION_QUERY, SECTION_POSITIVE, 0.47, planted)
    expected = "above_positive_ratio" if score > 0.47 * 1.3 else "copies_query"
    assert reasons == {"copy": (expected, expected), "true": (None, None)}
