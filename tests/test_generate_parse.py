"""Prompt rendering and output parsing: unit tests with crafted completions (no LLM here;
the real engine is exercised in test_pipeline.py)."""

import json

import pytest

from schemas.config import GenerationConfig
from schemas.llm import QUERY_STYLES, query_json_schema
from schemas.tables import QUERIES, REJECTS
from tasks.generate import (
    Completion,
    build_query_requests,
    check_query,
    copy_ratio,
    parse_query_outputs,
)
from tasks.prompts import PROMPTS
from tests.helpers import passages

PASSAGE = (
    "The heapq module provides an implementation of the heap queue algorithm, also known as the "
    "priority queue algorithm. Heaps are binary trees for which every parent node has a value "
    "less than or equal to any of its children."
)
CFG = GenerationConfig(styles={"question": 2, "keywords": 1}, min_query_chars=8, max_query_chars=80)


def done(obj) -> Completion:
    return Completion(json.dumps(obj) if not isinstance(obj, str) else obj, 12, "stop")


def test_every_style_has_a_versioned_prompt_with_examples():
    assert set(PROMPTS) == set(QUERY_STYLES)
    for style, prompt in PROMPTS.items():
        msgs = prompt.messages("PASSAGE TEXT")
        assert msgs[0]["role"] == "system" and "JSON" in msgs[0]["content"]
        assert msgs[-1]["role"] == "user" and "PASSAGE TEXT" in msgs[-1]["content"]
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(prompt.examples)
        for m in msgs[2:-1:2]:
            assert set(json.loads(m["content"])) == {"query"}
        assert prompt.version.startswith(style)


def test_requests_per_style_with_stable_seeds_and_truncated_passage():
    table = passages([PASSAGE, "A second passage about sockets and ports."])
    cfg = GenerationConfig(styles={"question": 2, "keywords": 1}, max_passage_chars=100)
    reqs = build_query_requests(table, cfg)
    assert len(reqs) == 6
    assert [r["style"] for r in reqs[:3]] == ["question", "question", "keywords"]
    assert len({r["seed"] for r in reqs}) == 6
    assert reqs == build_query_requests(table, cfg)  # deterministic
    assert PASSAGE[:100] in reqs[0]["messages"][-1]["content"]
    assert PASSAGE[100:] not in reqs[0]["messages"][-1]["content"]


@pytest.mark.parametrize(
    "completion,reason",
    [
        (Completion('{"query": "what is a hea', 96, "length"), "truncated"),
        (done("not json at all"), "invalid_json"),
        (done({"q": "what is a heap"}), "schema_mismatch"),
        (done({"query": 5}), "schema_mismatch"),
        (done(["what is a heap"]), "schema_mismatch"),
        (done({"query": "   "}), "empty_query"),
        (done({"query": "heap"}), "too_short"),
        (done({"query": "why " * 30}), "too_long"),
        (
            done({"query": "The heapq module provides an implementation of the heap queue"}),
            "copies_passage",
        ),
        (done({"query": "how does a priority queue order its items"}), None),
    ],
)
def test_each_rejection_reason(completion, reason):
    got, _, _ = check_query(completion, PASSAGE, CFG)
    assert got == reason


def test_copy_ratio():
    assert copy_ratio("the heap queue algorithm", PASSAGE) == 1.0
    assert copy_ratio("what orders a priority queue", PASSAGE) == pytest.approx(2 / 5)
    assert copy_ratio("", PASSAGE) == 0.0


def test_parse_outputs_keeps_valid_and_rejects_the_rest_with_provenance():
    table = passages([PASSAGE])
    reqs = build_query_requests(table, CFG)
    outs = [
        done({"query": "how is a heap ordered"}),
        done("{oops"),
        done({"query": "heap queue algorithm python"}),
    ]
    queries, rejects = parse_query_outputs(reqs, outs, CFG, "vllm", "SmolLM2")
    assert queries.schema.equals(QUERIES) and rejects.schema.equals(REJECTS)
    assert queries.column("query").to_pylist() == [
        "how is a heap ordered",
        "heap queue algorithm python",
    ]
    assert queries.column("style").to_pylist() == ["question", "keywords"]
    assert set(queries.column("prompt_version").to_pylist()) == {"question-v1", "keywords-v1"}
    assert json.loads(queries.column("sampling")[0].as_py())["max_tokens"] == CFG.max_tokens
    assert rejects.column("reason").to_pylist() == ["invalid_json"]
    assert rejects.column("source").to_pylist() == [table["passage_id"][0].as_py()]
    with pytest.raises(ValueError, match="requests"):
        parse_query_outputs(reqs, outs[:1], CFG, "vllm", "m")


def test_query_schema_is_a_closed_object():
    schema = query_json_schema(50)
    assert schema["required"] == ["query"] and schema["additionalProperties"] is False
    assert schema["properties"]["query"]["maxLength"] == 50
