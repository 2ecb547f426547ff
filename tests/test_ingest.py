import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from schemas.config import InputConfig
from schemas.tables import PASSAGES, REJECTS
from tasks.ingest import IngestError, expand_paths, ingest_file, normalize_text, passage_id


def cfg(**kw) -> InputConfig:
    return InputConfig(paths=["x"], **{"min_chars": 5, "max_chars": 100, **kw})


def reasons(result) -> list[str]:
    return result.rejects.column("reason").to_pylist()


def test_jsonl_good_and_bad_rows_are_all_accounted_for(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"text": "  A passage   about\tparsing JSON.  ", "title": "t1"}).encode(),
        b'{"text": "broken json',
        json.dumps([1, 2]).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "tiny"}).encode(),
        json.dumps({"text": "x" * 101}).encode(),
        b'{"text": "bad \xff\xfe utf8 here"}',
        b"",
        json.dumps({"text": "Another fine passage."}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = ingest_file(path, cfg(title_column="title"))
    assert result.passages.schema.equals(PASSAGES)
    assert result.rejects.schema.equals(REJECTS)
    assert result.passages.column("text").to_pylist() == [
        "A passage about parsing JSON.",
        "Another fine passage.",
    ]
    assert sorted(reasons(result)) == sorted(
        [
            "invalid_json",
            "not_an_object",
            "null_text",
            "text_not_string",
            "empty_text",
            "too_short",
            "too_long",
            "invalid_utf8",
        ]
    )
    # rows in = rows out + rejected (the blank line is not a row)
    assert result.rows_in == 10 == result.passages.num_rows + result.rejects.num_rows
    bad_utf8 = result.rejects.filter(pc.equal(result.rejects["reason"], "invalid_utf8"))
    assert bad_utf8.column("row").to_pylist() == [8]
    assert result.passages.column("title").to_pylist()[0] == "t1"


def test_missing_text_column_is_a_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "some text here"}) + "\n")
    with pytest.raises(IngestError, match="column.*'text'.*not found.*body"):
        ingest_file(path, cfg())
    csv = tmp_path / "c.csv"
    csv.write_text("body\nsome text here\n")
    with pytest.raises(IngestError, match="not found"):
        ingest_file(csv, cfg())
    pq.write_table(pa.table({"body": ["some text here"]}), tmp_path / "c.parquet")
    with pytest.raises(IngestError, match="not found"):
        ingest_file(tmp_path / "c.parquet", cfg())


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("e.csv", b""), ("h.csv", b"text\n")])
def test_empty_files_give_empty_tables(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    result = ingest_file(path, cfg())
    assert result.passages.num_rows == 0 and result.rejects.num_rows == 0 and result.rows_in == 0


def test_csv_with_bad_utf8_row_and_quoted_newlines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(
        b'text,title\n"first passage, with comma",a\n"bad \xff bytes here",b\n'
        b'"multi\nline passage",c\n,d\n'
    )
    result = ingest_file(path, cfg(title_column="title"))
    assert result.passages.column("text").to_pylist() == [
        "first passage, with comma",
        "multi line passage",
    ]
    assert sorted(reasons(result)) == ["empty_text", "invalid_utf8"]
    assert result.rows_in == 4


def test_parquet_types_nulls_and_metadata(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(
        pa.table(
            {
                "body": ["a real passage text", None, "another real passage", "x" * 500],
                "doc": ["d1", "d2", "d3", "d4"],
                "lang": ["en", "en", "de", "en"],
            }
        ),
        path,
    )
    result = ingest_file(path, cfg(text_column="body", id_column="doc", metadata_columns=["lang"]))
    assert result.passages.column("source_id").to_pylist() == ["d1", "d3"]
    assert [json.loads(m) for m in result.passages.column("metadata").to_pylist()] == [
        {"lang": "en"},
        {"lang": "de"},
    ]
    assert sorted(reasons(result)) == ["null_text", "too_long"]
    # A too-long reject keeps only a preview of the raw text.
    raw = result.rejects.filter(pc.equal(result.rejects["reason"], "too_long"))["raw"]
    assert len(raw[0].as_py()) == 200


def test_parquet_non_string_text_column_is_rejected_row_by_row(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    result = ingest_file(path, cfg())
    assert reasons(result) == ["text_not_string", "text_not_string"]


def test_unreadable_file_is_a_clear_error_naming_it(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match=r"broken.parquet: not a readable Parquet file"):
        ingest_file(path, cfg())


def test_missing_file_and_pattern_errors(tmp_path):
    with pytest.raises(IngestError, match="not found"):
        ingest_file(tmp_path / "nope.jsonl", cfg())
    with pytest.raises(IngestError, match="matched no file"):
        expand_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(IngestError, match="format"):
        ingest_file(tmp_path / "x.txt", cfg())


def test_passage_id_is_stable_and_normalization_defined():
    assert normalize_text("  a\u0301  b\n\tc ") == "\u00e1 b c"  # NFC + whitespace
    assert passage_id("hello world") == passage_id(normalize_text(" hello \n world "))
    assert passage_id("hello world") != passage_id("hello world!")
    assert len(passage_id("x")) == 32
