"""Ingest: read a corpus file (Parquet, JSONL, CSV) into the `passages` table.

Every input row ends up in exactly one place: `passages` or `rejects` (with a reason).
A problem with the *file or the config* (missing file, missing text column) is a clear error;
a problem with a *row* is a reject.

Reject reasons: unreadable_file, invalid_utf8, invalid_json, not_an_object, null_text,
text_not_string, empty_text, too_short, too_long; in pairs mode also null_query,
query_not_string, empty_query and positive_<reason> for a bad positive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from schemas.config import InputConfig, PipelineConfig
from schemas.tables import PAIRS, PASSAGES, REJECTS
from tasks.stage import Job, Outcome, Stage
from tasks.text import normalize_text, passage_id

STAGE = "ingest"
__all__ = ["normalize_text", "passage_id", "ingest_file", "IngestStage"]


class IngestError(ValueError):
    """The file or the config is wrong (as opposed to a bad row, which is rejected)."""


@dataclass
class IngestResult:
    passages: pa.Table  # pairs mode: the positives
    rejects: pa.Table
    rows_in: int
    pairs: pa.Table | None = None  # pairs mode only


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".jsonl" in suffixes or ".ndjson" in suffixes or ".json" in suffixes:
        return "jsonl"
    if ".csv" in suffixes or ".tsv" in suffixes:
        return "csv"
    raise IngestError(f"cannot tell the format of {path}; set input.format")


def _preview(value: Any, n: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = json.dumps(value, default=str)
    return value[:n]


def _wanted_columns(cfg: InputConfig) -> list[str]:
    texts = [cfg.query_column, cfg.positive_column] if cfg.mode == "pairs" else [cfg.text_column]
    cols = [*texts, cfg.title_column, cfg.id_column, *cfg.metadata_columns]
    return [c for c in dict.fromkeys(cols) if c]


def _check_columns(path: Path, present: list[str], cfg: InputConfig) -> None:
    missing = [c for c in _wanted_columns(cfg) if c not in present]
    if missing:
        raise IngestError(
            f"{path}: column(s) {missing} not found; the file has {sorted(present)}. "
            "Set input.text_column (pairs mode: query_column, positive_column) and the "
            "title/id/metadata columns to match."
        )


def _read_jsonl(path: Path, cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse line by line so one bad line costs one reject, with its line number."""
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    keys: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rejects.append(_reject(path, lineno, "invalid_utf8", str(e), raw, cfg))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.append(_reject(path, lineno, "invalid_json", str(e), line, cfg))
                continue
            if not isinstance(obj, dict):
                rejects.append(
                    _reject(path, lineno, "not_an_object", type(obj).__name__, line, cfg)
                )
                continue
            keys.update(obj)
            obj["__row"] = lineno
            records.append(obj)
    if records:
        _check_columns(path, sorted(keys), cfg)
    return records, rejects


def _read_csv(path: Path, cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # Read every wanted column as binary so one row of bad UTF-8 does not sink the file.
    try:
        header = pacsv.open_csv(path).schema.names
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return [], []
        raise
    _check_columns(path, header, cfg)
    wanted = _wanted_columns(cfg)
    opts = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in wanted},
        include_columns=wanted,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    table = pacsv.read_csv(path, convert_options=opts)
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    # Data rows start after the header line; rows are numbered from 0 like the other readers.
    for i, row in enumerate(table.to_pylist()):
        decoded: dict[str, Any] = {"__row": i}
        bad = None
        for key, value in row.items():
            if value is None:
                decoded[key] = None
                continue
            try:
                decoded[key] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = e
                break
        if bad is not None:
            rejects.append(_reject(path, i, "invalid_utf8", str(bad), row[cfg.text_column], cfg))
            continue
        records.append(decoded)
    return records, rejects


def _read_parquet(
    path: Path, cfg: InputConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    schema = pq.read_schema(path)
    _check_columns(path, schema.names, cfg)
    table = pq.read_table(path, columns=_wanted_columns(cfg))
    records = table.to_pylist()
    for i, rec in enumerate(records):
        rec["__row"] = i
    return records, []


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def _reject(
    source: Path | str, row: int | None, reason: str, detail: str | None, raw: Any, cfg: InputConfig
) -> dict[str, Any]:
    return {
        "stage": STAGE,
        "source": str(source),
        "row": row,
        "reason": reason,
        "detail": detail,
        "raw": _preview(raw, cfg.raw_preview_chars),
    }


def _classify(value: Any, cfg: InputConfig) -> tuple[str | None, str | None, str]:
    """(reason, detail, normalized text) for one passage text; reason None means accepted."""
    if value is None:
        return "null_text", None, ""
    if not isinstance(value, str):
        return "text_not_string", type(value).__name__, ""
    text = normalize_text(value)
    if not text:
        return "empty_text", None, ""
    if len(text) < cfg.min_chars:
        return "too_short", f"{len(text)} < {cfg.min_chars} chars", text
    if len(text) > cfg.max_chars:
        return "too_long", f"{len(text)} > {cfg.max_chars} chars", text
    return None, None, text


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def records_to_passages(
    records: list[dict[str, Any]], source: str, cfg: InputConfig
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Validate and normalize parsed records; returns (passages, reject rows)."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for rec in records:
        reason, detail, text = _classify(rec.get(cfg.text_column), cfg)
        if reason is not None:
            rejects.append(
                _reject(source, rec["__row"], reason, detail, rec.get(cfg.text_column), cfg)
            )
            continue
        rows.append(_passage_row(rec, text, source, cfg))
    return pa.Table.from_pylist(rows, schema=PASSAGES), rejects


def _passage_row(rec: dict[str, Any], text: str, source: str, cfg: InputConfig) -> dict[str, Any]:
    title = rec.get(cfg.title_column) if cfg.title_column else None
    meta = {c: rec.get(c) for c in cfg.metadata_columns}
    return {
        "passage_id": passage_id(text),
        "text": text,
        "title": normalize_text(title) if isinstance(title, str) else _optional_str(title),
        "source": source,
        "row": rec["__row"],
        "source_id": _optional_str(rec.get(cfg.id_column)) if cfg.id_column else None,
        "metadata": json.dumps(meta, default=str, ensure_ascii=False) if meta else None,
    }


def _classify_query(value: Any) -> tuple[str | None, str | None, str]:
    if value is None:
        return "null_query", None, ""
    if not isinstance(value, str):
        return "query_not_string", type(value).__name__, ""
    query = normalize_text(value)
    return (None, None, query) if query else ("empty_query", None, "")


def records_to_pairs(
    records: list[dict[str, Any]], source: str, cfg: InputConfig
) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
    """pairs mode: (pairs, positives as passages, reject rows). A row whose query or positive is
    bad is rejected whole, with the reason of the first bad field (positive reasons are
    prefixed `positive_`)."""
    pairs: list[dict[str, Any]] = []
    passages: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for rec in records:
        reason, detail, query = _classify_query(rec.get(cfg.query_column))
        raw = rec.get(cfg.query_column)
        if reason is None:
            reason, detail, text = _classify(rec.get(cfg.positive_column), cfg)
            reason = f"positive_{reason}" if reason else None
            raw = rec.get(cfg.positive_column)
        if reason is not None:
            rejects.append(_reject(source, rec["__row"], reason, detail, raw, cfg))
            continue
        passage = _passage_row(rec, text, source, cfg)
        passages.append(passage)
        pairs.append(
            {
                "query": query,
                "passage_id": passage["passage_id"],
                "source": source,
                "row": rec["__row"],
            }
        )
    return (
        pa.Table.from_pylist(pairs, schema=PAIRS),
        pa.Table.from_pylist(passages, schema=PASSAGES),
        rejects,
    )


def ingest_file(path: str | Path, cfg: InputConfig) -> IngestResult:
    """Read one corpus file into passages + rejects. Raises IngestError for file/config errors."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"input file not found: {path}")
    fmt = detect_format(path, cfg.format)
    try:
        records, rejects = _READERS[fmt](path, cfg)
    except IngestError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        # The file itself cannot be parsed (truncated Parquet, malformed CSV): one reject row
        # stands for the whole file, so the loss is visible and counted.
        reject = _reject(path, None, "unreadable_file", f"{fmt}: {e}", None, cfg)
        pairs = PAIRS.empty_table() if cfg.mode == "pairs" else None
        rejects_table = pa.Table.from_pylist([reject], REJECTS)
        return IngestResult(PASSAGES.empty_table(), rejects_table, 1, pairs)
    pairs = None
    if cfg.mode == "pairs":
        pairs, passages, row_rejects = records_to_pairs(records, str(path), cfg)
    else:
        passages, row_rejects = records_to_passages(records, str(path), cfg)
    all_rejects = pa.Table.from_pylist(rejects + row_rejects, schema=REJECTS)
    return IngestResult(passages, all_rejects, passages.num_rows + all_rejects.num_rows, pairs)


def expand_paths(patterns: list[str]) -> list[Path]:
    """Globs and plain paths, sorted and de-duplicated; a pattern matching nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p.anchor or ".").glob(str(p.relative_to(p.anchor or "."))))
            if not matches:
                raise IngestError(f"input pattern matched no file: {pattern}")
            out.extend(matches)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def count_records(path: str | Path, fmt: str = "auto") -> int:
    """How many records a file holds, counted without the parser that keeps rows, so the
    balance `rows_in = rows_out + rejected` can catch a reader that loses rows: JSON lines:
    non-blank lines; CSV: records by Python's tolerant csv reader, header excluded; Parquet:
    its footer."""
    import csv
    import io

    path = Path(path)
    kind = detect_format(path, fmt)
    if kind == "parquet":
        try:
            return pq.read_metadata(path).num_rows
        except (pa.ArrowInvalid, OSError):
            return 1  # unreadable: accounted as one unreadable_file reject
    if kind == "jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    with path.open("rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        records = sum(1 for row in csv.reader(text) if row)
    return max(0, records - 1)


class IngestStage(Stage):
    """One job per input file: passages (pairs mode: pairs and their positives) and rejects."""

    name = STAGE
    version = "1"
    sharded = ("sources",)
    outputs = ("ingested", "pairs", "rejects")
    libraries = ("pyarrow",)

    def settings(self, cfg: PipelineConfig) -> Any:
        return cfg.input.model_dump(mode="json", exclude={"paths", "corpus_paths"})

    def _input_cfg(self, job: Job) -> InputConfig:
        """A file of `input.corpus_paths` is read as plain passages."""
        path = Path(job.paths("sources")[0])
        corpus = {p.resolve() for p in expand_paths(job.cfg.input.corpus_paths)}
        if path.resolve() in corpus:
            return job.cfg.input.model_copy(update={"mode": "passages"})
        return job.cfg.input

    def rows_in(self, job: Job) -> int:
        return count_records(job.paths("sources")[0], job.cfg.input.format)

    def run(self, job: Job) -> Outcome:
        path = job.paths("sources")[0]
        result = ingest_file(path, self._input_cfg(job))
        job.write("ingested", result.passages)
        if result.pairs is not None:
            job.write("pairs", result.pairs)
        job.write("rejects", result.rejects)
        return Outcome(
            rows_out=result.passages.num_rows,
            rejected=result.rejects.num_rows,
            stats={"files": 1},
        )
