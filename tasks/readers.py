"""Reading the files users have, a bounded batch at a time, one record at a time when a record
is bad; and counting their records with a second, independent reader.

Formats: JSON lines (plain, .gz, .zst, .bz2), a .json array (streamed with ijson), CSV and TSV
(Python's csv module: BOM, CRLF, quoted newlines, ragged rows), Parquet (string, large_string,
dictionary and binary columns), text in UTF-8, or UTF-16/UTF-32 with a byte-order mark.

A problem with a *record* (a line that is not JSON, a ragged CSV row, bytes that are not UTF-8)
is a `Bad` record with its row number and a reason: the rest of the file is kept. A problem with
the *file* (not the format it claims, truncated, encoding it cannot be read in) is a
`SourceError` naming the file and the cause.

The record counts (`count_records`) come from other code than the readers: non-blank lines for
JSON lines, pyarrow's CSV parser for CSV, the standard library's JSON decoder for arrays, the
footer for Parquet. A reader that loses records therefore shows up as an unbalanced ingest.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.stage import InputError

BATCH = 8192  # records handed on at a time
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class SourceError(InputError):
    """The file itself cannot be read (as opposed to a bad record, which is rejected)."""


@dataclass
class Good:
    row: int  # 0-based record number in the file (JSON lines: the line number)
    values: dict[str, Any]


@dataclass
class Bad:
    row: int | None
    reason: str
    detail: str | None
    raw: Any


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def detect_format(path: Path, fmt: str = "auto") -> str:
    """jsonl | json | csv | tsv | parquet, from `fmt` or the file's suffixes (compression
    suffixes skipped: `c.jsonl.gz` is JSON lines)."""
    if fmt != "auto":
        return {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}.get(fmt, fmt)
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    for suffix in reversed(suffixes):
        if suffix in FORMATS:
            return FORMATS[suffix]
    raise SourceError(f"{path}: cannot tell its format from the name; set input.format")


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed by its suffix."""
    compression = compression_of(path)
    try:
        if compression is None:
            return open(path, "rb")
        return pa.input_stream(str(path), compression=compression)  # type: ignore[return-value]
    except (OSError, pa.ArrowInvalid) as e:
        raise SourceError(f"{path}: cannot open ({e})") from e


def sniff_encoding(path: Path) -> str:
    """utf-8, or the encoding a byte-order mark names; a text file that looks like UTF-16 without
    a mark (NUL bytes in every other place) cannot be read reliably and is an error."""
    try:
        with open_binary(path) as f:
            head = f.read(4096)
    except (OSError, pa.ArrowInvalid, EOFError) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding
    if len(head) >= 8 and head.count(0) >= len(head) // 4:
        raise SourceError(
            f"{path}: looks like UTF-16 or UTF-32 text without a byte-order mark; "
            "convert it to UTF-8 (or add the mark)"
        )
    return "utf-8"


def _text_stream(path: Path, encoding: str) -> IO[str]:
    """Decoded text; bytes that are not valid in `encoding` become lone surrogates, so a bad
    record is found (and rejected) without losing the others."""
    return io.TextIOWrapper(
        open_binary(path), encoding=encoding, errors="surrogateescape", newline=""
    )


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _undo_surrogates(text: str) -> str:
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


# --- JSON lines and arrays ----------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[Good | Bad]:
    encoding = sniff_encoding(path)
    try:
        with _text_stream(path, encoding) as f:
            for lineno, line in enumerate(_lines(f)):
                if not line.strip():
                    continue
                if _has_surrogates(line):
                    yield Bad(
                        lineno,
                        "invalid_utf8",
                        f"bytes that are not {encoding}",
                        _undo_surrogates(line),
                    )
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Bad(lineno, "invalid_json", str(e), line)
                    continue
                if not isinstance(obj, dict):
                    yield Bad(lineno, "not_an_object", type(obj).__name__, line)
                    continue
                yield Good(lineno, obj)
    except (OSError, EOFError, pa.ArrowInvalid) as e:  # a truncated .gz, say
        raise SourceError(f"{path}: cannot read to the end ({e})") from e


def _lines(f: IO[str]) -> Iterator[str]:
    """Lines split on \\n only (a lone \\r or U+2028 inside a JSON string is not a line break)."""
    rest = ""
    while chunk := f.read(1 << 20):
        parts = (rest + chunk).split("\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def read_json_array(path: Path) -> Iterator[Good | Bad]:
    """A file holding one JSON array of objects, streamed element by element."""
    import ijson

    encoding = sniff_encoding(path)
    row = 0
    try:
        with _text_stream(path, encoding) as f:
            head = f.read(1).lstrip() or f.read(64).lstrip()
            if head and head[0] != "[":  # not an array: JSON lines named .json
                yield from read_jsonl(path)
                return
        with open_binary(path) as raw:
            stream = raw if encoding in ("utf-8", "utf-8-sig") else _reencoded(path, encoding)
            for row, obj in enumerate(ijson.items(stream, "item", use_float=True)):
                if isinstance(obj, dict):
                    yield Good(row, obj)
                else:
                    yield Bad(
                        row, "not_an_object", type(obj).__name__, json.dumps(obj, default=str)
                    )
    except ijson.JSONError as e:
        yield Bad(
            row + 1, "invalid_json", f"the array cannot be read past element {row}: {e}", None
        )
    except (OSError, EOFError, pa.ArrowInvalid) as e:
        raise SourceError(f"{path}: cannot read to the end ({e})") from e


def _reencoded(path: Path, encoding: str) -> IO[bytes]:
    """UTF-16/32 text as UTF-8 bytes (ijson reads bytes)."""
    with _text_stream(path, encoding) as f:
        return io.BytesIO(f.read().encode("utf-8", errors="surrogateescape"))


# --- CSV ----------------------------------------------------------------------------------------


def read_csv(path: Path, delimiter: str = ",") -> Iterator[Good | Bad]:
    """Records of a CSV/TSV file with a header line; row = the record's 0-based number (the
    header not counted). A row with more or fewer fields than the header is `ragged_row`."""
    encoding = sniff_encoding(path)
    csv.field_size_limit(sys.maxsize)  # a 10 MB field is a too_long reject, not a parse error
    try:
        with _text_stream(path, encoding) as f:
            reader = csv.reader(f, delimiter=delimiter, strict=False)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            row = -1
            for fields in reader:
                if not fields:  # a blank line is no record
                    continue
                row += 1
                line = ",".join(fields)
                if len(fields) != len(header):
                    yield Bad(
                        row,
                        "ragged_row",
                        f"{len(fields)} fields, the header has {len(header)} "
                        f"(line {reader.line_num})",
                        _undo_surrogates(line),
                    )
                    continue
                if _has_surrogates(line):
                    yield Bad(
                        row,
                        "invalid_utf8",
                        f"bytes that are not {encoding}",
                        _undo_surrogates(line),
                    )
                    continue
                yield Good(row, dict(zip(header, fields, strict=True)))
    except csv.Error as e:
        raise SourceError(f"{path}: not readable as CSV ({e})") from e
    except (OSError, EOFError, pa.ArrowInvalid) as e:
        raise SourceError(f"{path}: cannot read to the end ({e})") from e


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    encoding = sniff_encoding(path)
    with _text_stream(path, encoding) as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    return [h.strip() for h in header or []]


# --- Parquet ------------------------------------------------------------------------------------


def parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from e


def read_parquet(path: Path, columns: list[str]) -> Iterator[Good | Bad]:
    """Rows of the wanted columns; a binary value is read as UTF-8 (a bad one is rejected)."""
    parquet = parquet_file(path)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=BATCH, columns=columns):
            names = batch.schema.names
            binary = {n for n, t in zip(names, batch.schema.types, strict=True) if _is_binary(t)}
            values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for k in range(batch.num_rows):
                rec = {n: values[i][k] for i, n in enumerate(names)}
                bad = None
                for n in binary:
                    if isinstance(rec[n], bytes):
                        try:
                            rec[n] = rec[n].decode("utf-8")
                        except UnicodeDecodeError as e:
                            bad = Bad(row, "invalid_utf8", f"column {n}: {e}", rec[n])
                            break
                yield bad or Good(row, rec)
                row += 1
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: Parquet data cannot be read after row {row} ({e})") from e


def _is_binary(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


# --- one entry point ----------------------------------------------------------------------------


def read_records(path: Path, fmt: str, columns: list[str]) -> Iterator[Good | Bad]:
    kind = detect_format(path, fmt)
    if kind == "parquet":
        return read_parquet(path, columns)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json_array(path)
    return read_csv(path, "\t" if kind == "tsv" else ",")


def columns_of(path: Path, fmt: str, sample: int = 1000) -> list[str] | None:
    """The columns a file has (JSON: the keys of its first `sample` objects); None when it has
    no records to tell."""
    kind = detect_format(path, fmt)
    if kind == "parquet":
        return parquet_file(path).schema_arrow.names
    if kind in ("csv", "tsv"):
        return csv_header(path, "\t" if kind == "tsv" else ",") or None
    keys: set[str] = set()
    seen = 0
    for record in read_records(path, fmt, []):
        if isinstance(record, Good):
            keys.update(record.values)
            seen += 1
            if seen >= sample:
                break
    return sorted(keys) if seen else None


def count_records(path: Path, fmt: str = "auto") -> int:
    """How many records the file holds, by other code than the readers (see module docstring)."""
    kind = detect_format(path, fmt)
    if kind == "parquet":
        return parquet_file(path).metadata.num_rows
    encoding = sniff_encoding(path)
    if kind in ("csv", "tsv"):
        return _count_csv(path, encoding, "\t" if kind == "tsv" else ",")
    with _text_stream(path, encoding) as f:
        if kind == "json":
            text = f.read()
            if text.lstrip().startswith("["):
                return _count_json_array(text)
            return sum(1 for line in text.split("\n") if line.strip())
        return sum(1 for line in _lines(f) if line.strip())


def _count_json_array(text: str) -> int:
    """Elements of a JSON array by the standard library's decoder, one element at a time (an
    element that does not parse counts as one, and the rest as one more)."""
    decoder = json.JSONDecoder()
    pos, count = text.index("[") + 1, 0
    length = len(text)
    while pos < length:
        while pos < length and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= length or text[pos] == "]":
            return count
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return count + 1
        count += 1
    return count


def _count_csv(path: Path, encoding: str, delimiter: str) -> int:
    """Records by pyarrow's CSV parser (ragged rows counted, not dropped), header excluded."""
    import pyarrow.csv as pacsv

    ragged = 0

    def count_ragged(_row: Any) -> str:
        nonlocal ragged
        ragged += 1
        return "skip"

    pa_encoding = {"utf-8-sig": "utf8", "utf-8": "utf8"}.get(encoding, encoding)
    try:
        with open_binary(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(encoding=pa_encoding, block_size=1 << 22),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter, newlines_in_values=True, invalid_row_handler=count_ragged
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={}, strings_can_be_null=False, auto_dict_encode=False
                ),
            )
            rows = sum(batch.num_rows for batch in reader)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return 0
        raise SourceError(f"{path}: not readable as CSV ({e})") from e
    return rows + ragged
