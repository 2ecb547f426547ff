"""Prompt rendering and output parsing: unit tests with crafted completions (no LLM here;
the real engine is exercised in test_pipeline.py)."""

import json

import pyarrow.compute as pc
import pytest

from schemas.config import GenerationConfig
from schemas.llm import QUERY_STYLES, query_json_schema
from schemas.tables import QUERIES, REJECTS
from tasks.generate import build_query_requests, check_query, generate_queries
from tasks.llm.base import Completion
from tasks.llm.engine import resolve_llm_dtype
from tasks.prompts import PROMPTS
from tasks.text import copy_ratio, dominant_script, language_odds, repeated_trigram_share
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
        (done({"query": "why " * 30}), "too_long"),  # a server that ignores the schema
        # the grammar closes the string at maxLength (80 here): the query ends mid-word
        (
            done({"query": ("how does the heap queue algorithm keep the smallest item " * 2)[:80]}),
            "truncated",
        ),
        (done({"query": "what is the operator of the operator of the operator of"}), "repetitive"),
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


class ScriptedEngine:
    """Returns canned outputs, one list per call, and records every call. For testing the
    stage's request/retry/parse logic only; the real engines are tested with the real model."""

    backend, model_name = "scripted", "scripted-model"

    def __init__(self, *calls):
        self.script = list(calls)
        self.calls = []

    def chat_json(self, conversations, schema, sampling, seeds, retry=False):
        self.calls.append(
            {
                "n": len(conversations),
                "sampling": sampling,
                "seeds": seeds,
                "conversations": conversations,
                "retry": retry,
            }
        )
        outs = self.script.pop(0)
        assert len(outs) == len(conversations)
        return outs


def test_stage_keeps_valid_rejects_the_rest_with_provenance():
    table = passages([PASSAGE])
    engine = ScriptedEngine(
        [
            done({"query": "how is a heap ordered"}),
            done("{oops"),
            done({"query": "heap queue algorithm python"}),
        ],
        [done("{still broken")],
    )
    queries, rejects, stats = generate_queries(table, CFG, engine)
    assert queries.schema.equals(QUERIES) and rejects.schema.equals(REJECTS)
    assert queries.column("query").to_pylist() == [
        "how is a heap ordered",
        "heap queue algorithm python",
    ]
    assert queries.column("style").to_pylist() == ["question", "keywords"]
    assert set(queries.column("prompt_version").to_pylist()) == {"question-v1", "keywords-v1"}
    assert set(queries.column("backend").to_pylist()) == {"scripted"}
    assert set(queries.column("model").to_pylist()) == {"scripted-model"}
    assert json.loads(queries.column("sampling")[0].as_py())["max_tokens"] == CFG.max_tokens
    assert queries.column("attempt").to_pylist() == [1, 1]
    assert rejects.column("reason").to_pylist() == ["invalid_json"]
    assert "after 2 attempts" in rejects.column("detail")[0].as_py()
    assert rejects.column("source").to_pylist() == [table["passage_id"][0].as_py()]
    assert stats["requests"] == 3 and stats["retried"] == 1 and stats["recovered"] == 0
    assert stats["first_attempt_reasons"] == {"invalid_json": 1}
    assert stats["output_tokens"] == 4 * 12


def test_a_rejected_output_is_retried_once_with_a_new_seed_and_temperature():
    table = passages([PASSAGE])
    cfg = CFG.model_copy(update={"retry_temperature": 0.9})
    engine = ScriptedEngine(
        [done({"query": "heap"}), done({"query": "how is a heap ordered"}), done("{x")],
        [done({"query": "what keeps a heap ordered"}), done({"query": "heapq module python"})],
    )
    queries, rejects, stats = generate_queries(table, cfg, engine)
    assert rejects.num_rows == 0 and queries.num_rows == 3
    assert engine.calls[1]["n"] == 2  # only the two rejected requests are asked again
    assert engine.calls[1]["sampling"].temperature == 0.9
    assert set(engine.calls[1]["seeds"]).isdisjoint(engine.calls[0]["seeds"])
    assert [c["retry"] for c in engine.calls] == [False, True]  # the engine may keep its cache
    retried = queries.filter(pc.equal(queries["attempt"], 2))
    assert sorted(retried["query"].to_pylist()) == [
        "heapq module python",
        "what keeps a heap ordered",
    ]
    assert all(json.loads(s)["temperature"] == 0.9 for s in retried["sampling"].to_pylist())
    assert stats["recovered"] == 2 and stats["first_attempt_reasons"] == {
        "too_short": 1,
        "invalid_json": 1,
    }


def test_no_retry_when_retries_is_zero():
    table = passages([PASSAGE])
    cfg = CFG.model_copy(update={"retries": 0, "styles": {"question": 1}})
    engine = ScriptedEngine([done("{x")])
    queries, rejects, _ = generate_queries(table, cfg, engine)
    assert len(engine.calls) == 1 and queries.num_rows == 0
    assert rejects["reason"].to_pylist() == ["invalid_json"]


@pytest.mark.parametrize(
    "text,reason",
    [
        ("как упорядочена куча в питоне", "wrong_language"),
        ("ヒープはどのように並べられますか", "wrong_language"),
        ("how is a heap ordered in python", None),
        ("heapq 模块 how does it order items", None),  # mostly Latin letters
        ("12345 678 90", None),  # no letters: nothing to compare
    ],
)
def test_wrong_language_by_writing_system(text, reason):
    got, _, _ = check_query(done({"query": text}), PASSAGE, CFG)
    assert got == reason
    off = CFG.model_copy(update={"same_script": False, "language_min_odds": None})
    assert check_query(done({"query": text}), PASSAGE, off)[0] is None


@pytest.mark.parametrize(
    "text,reason",
    [
        ("Quelle fonction ordonne les éléments d'un tas ?", "wrong_language"),
        ("Wie ordnet das Modul die Elemente eines Heaps?", "wrong_language"),
        ("¿Cómo se ordena un montón en Python?", "wrong_language"),
        ("Hoe sorteer ik een heap in Python?", "wrong_language"),
        ("fonction copie fichier métadonnées", "wrong_language"),  # French keywords
        ("how is a heap ordered in python", None),
        ("heapq priority queue parent child", None),  # English keywords, mostly names
        ("heapq.heappush(heap, item)", None),  # code: no language is much likelier
    ],
)
def test_wrong_language_by_language_identifier(text, reason):
    got, detail, _ = check_query(done({"query": text}), PASSAGE, CFG)
    assert got == reason, detail
    off = CFG.model_copy(update={"language_min_odds": None})
    assert check_query(done({"query": text}), PASSAGE, off)[0] is None  # same (Latin) script


def test_language_odds_threshold_and_unclear_reference():
    french = "Quelle fonction ordonne les éléments d'un tas ?"
    top, ref, odds = language_odds(french, PASSAGE)
    assert (top, ref) == ("fr", "en") and odds > 100
    at = CFG.model_copy(update={"language_min_odds": odds})  # boundary: odds >= threshold
    assert check_query(done({"query": french}), PASSAGE, at)[0] == "wrong_language"
    above = CFG.model_copy(update={"language_min_odds": odds * 1.01})
    assert check_query(done({"query": french}), PASSAGE, above)[0] is None
    # A passage that is code has no clear language: nothing to compare a query with.
    code = "x = heapq.heappop(h); y = heapq.heappush(h, (p, i)); del h[0]"
    assert language_odds(french, code) is None
    assert language_odds("heap", PASSAGE) is None  # one word says nothing


def test_dominant_script():
    assert dominant_script("hello мир world") == "LATIN"
    assert dominant_script("привет world") == "CYRILLIC"
    assert dominant_script("...") is None


def test_query_schema_is_a_closed_object():
    schema = query_json_schema(50)
    assert schema["required"] == ["query"] and schema["additionalProperties"] is False
    assert schema["properties"]["query"]["maxLength"] == 50


def test_repeated_trigram_share_tells_a_loop_from_prose():
    assert repeated_trigram_share("a b c a b c a b c") == 0.0  # under 10 words: not judged
    assert repeated_trigram_share(PASSAGE) < 0.05
    loop = "the most recent version of the log record format is " * 4
    assert repeated_trigram_share(loop) > 0.6
    assert GenerationConfig().max_repeated_trigrams == 0.2
    off = GenerationConfig(max_repeated_trigrams=1.0)
    assert (
        check_query(
            done({"query": loop[:79]}), PASSAGE, off.model_copy(update={"max_query_chars": 80})
        )[0]
        is None
    )


@pytest.mark.parametrize(
    ("requested", "device", "flags", "expected"),
    [
        ("auto", "cpu", {"avx512f", "avx512_bf16"}, "bfloat16"),
        ("auto", "cpu", {"amx_bf16"}, "bfloat16"),
        ("auto", "cpu", {"avx2", "avx512f"}, "float32"),  # emulated bf16: 2.4x slower
        ("auto", "cpu", set(), "float32"),
        ("auto", "cuda", set(), "auto"),  # vLLM's own choice from the checkpoint
        ("bfloat16", "cpu", set(), "bfloat16"),  # an explicit choice is kept
        ("float16", "cuda", set(), "float16"),
    ],
)
def test_auto_llm_dtype_follows_the_hardware(requested, device, flags, expected):
    assert resolve_llm_dtype(requested, device, frozenset(flags)) == expected
