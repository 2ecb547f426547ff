"""pairs mode: (query, positive) input rows, several positives per query, a separate corpus."""

import json

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from schemas.config import DedupConfig, InputConfig
from schemas.tables import PAIRS, QUERIES
from tasks.dedup import deduplicate
from tasks.ingest import IngestError, ingest_file
from tasks.pairs import positives_by_query, queries_from_pairs

P1 = "The json module encodes Python objects as JSON text and decodes it back."
P2 = "json.dumps serializes an object to a JSON formatted string with options."
P3 = "The csv module reads and writes tabular data in comma separated files."


def pairs_cfg(**kw) -> InputConfig:
    return InputConfig(paths=["x"], mode="pairs", min_chars=10, **kw)


def write(tmp_path, rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_ingest_keeps_good_rows_and_rejects_bad_ones(tmp_path):
    path = write(
        tmp_path,
        [
            {"query": "how to encode json", "positive": P1},
            {"query": "how to encode json", "positive": P2},  # a second positive
            {"query": None, "positive": P3},
            {"query": "  ", "positive": P3},
            {"query": "csv?", "positive": "short"},
            {"query": "csv?", "positive": 12},
        ],
    )
    result = ingest_file(path, pairs_cfg())
    assert result.pairs.schema.equals(PAIRS)
    assert result.pairs.column("query").to_pylist() == ["how to encode json"] * 2
    assert result.passages.column("text").to_pylist() == [P1, P2]
    assert (
        result.pairs.column("passage_id").to_pylist() == result.passages["passage_id"].to_pylist()
    )
    assert sorted(result.rejects.column("reason").to_pylist()) == [
        "empty_query",
        "null_query",
        "positive_text_not_string",
        "positive_too_short",
    ]
    assert result.rows_in == 6 == result.passages.num_rows + result.rejects.num_rows


def test_pairs_columns_are_checked(tmp_path):
    path = write(tmp_path, [{"question": "q", "answer": P1}])
    with pytest.raises(IngestError, match="query_column"):
        ingest_file(path, pairs_cfg())
    result = ingest_file(path, pairs_cfg(query_column="question", positive_column="answer"))
    assert result.pairs.num_rows == 1


def test_queries_point_at_kept_passages_and_duplicates_collapse(tmp_path):
    path = write(
        tmp_path,
        [
            {"query": "how to encode json", "positive": P1},
            {"query": "how to encode json", "positive": P1},  # the same pair twice
            {"query": "how to encode json", "positive": P2},
            {"query": "read a csv file", "positive": P3.upper()},  # exact copy of a corpus passage
        ],
    )
    result = ingest_file(path, pairs_cfg())
    corpus = ingest_file(write(tmp_path, [{"text": P3}]), InputConfig(paths=["x"], min_chars=10))
    union = pa.concat_tables([corpus.passages, result.passages])  # the corpus file comes first
    kept = deduplicate(union, DedupConfig(near=False)).passages
    queries, duplicates = queries_from_pairs(result.pairs, result.passages, [kept])
    assert queries.schema.equals(QUERIES) and duplicates == 1
    assert queries.num_rows == 3
    assert set(queries.column("passage_id").to_pylist()) <= set(kept["passage_id"].to_pylist())
    csv_query = queries.filter(pc.equal(queries["query"], "read a csv file"))
    assert csv_query["passage_id"][0].as_py() == corpus.passages["passage_id"][0].as_py()
    assert set(queries.column("style").to_pylist()) == {"given"}
    known = positives_by_query(queries)
    assert sorted(known.filter(pl.col("query") == "how to encode json")["passage_id"]) == sorted(
        queries.filter(pc.equal(queries["query"], "how to encode json"))["passage_id"].to_pylist()
    )
    assert known.height == 3
    assert isinstance(known, pl.DataFrame)
