"""Ingest: read corpus or pairs files (tasks/readers.py) into the `passages` (and `pairs`) tables.

Every input record ends up in exactly one place: `ingested` or `rejects` (with a reason and its
row number); the count of records per file comes from a second reader (`count_records`), so a
reader that loses records fails the run naming the file. A problem with the *file or the config*
(missing file, missing column, truncated or fake Parquet, an encoding that cannot be read) is a
clear error naming the file (`check_inputs` finds it before anything starts), unless
`input.on_unreadable: reject`: then the file is one `unreadable_file` reject that stands for
the records it declared (Parquet: its footer; else 1).

Reject reasons: ragged_row, invalid_utf8, invalid_json, not_an_object, null_text,
text_not_string, nested_value, empty_text, too_short, too_long, unreadable_file; in pairs mode
also null_query, query_not_string, empty_query and positive_<reason> for a bad positive.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.config import InputConfig, PipelineConfig
from schemas.tables import PAIRS, PASSAGES, REJECTS
from tasks.readers import (
    Bad,
    Good,
    SourceError,
    columns_of,
    count_records,
    detect_format,
    parquet_file,
    read_records,
    sniff_encoding,
)
from tasks.stage import InputError, Job, Outcome, Stage
from tasks.text import normalize_text, passage_id

STAGE = "ingest"
OUTPUT_ROWS = 65_536  # rows per ingested shard: a large file is read and written in pieces
__all__ = ["normalize_text", "passage_id", "ingest_file", "IngestStage", "count_records"]


class IngestError(InputError):
    """The file or the config is wrong (as opposed to a bad record, which is rejected)."""


class MissingInputError(IngestError):
    """A file or a column the config names is not there (an error whatever on_unreadable says)."""


@dataclass
class IngestResult:
    passages: pa.Table  # pairs mode: the positives
    rejects: pa.Table
    rows_in: int
    pairs: pa.Table | None = None  # pairs mode only


def _preview(value: Any, n: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = json.dumps(value, default=str, ensure_ascii=False)
    return value[:n]


def wanted_columns(cfg: InputConfig) -> list[str]:
    texts = [cfg.query_column, cfg.positive_column] if cfg.mode == "pairs" else [cfg.text_column]
    cols = [*texts, cfg.title_column, cfg.id_column, cfg.document_column, *cfg.metadata_columns]
    return [c for c in dict.fromkeys(cols) if c]


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


# Control characters other than whitespace: dropped by `clean_text` (a NUL or a bell in a
# passage is damage, not content); tabs and newlines are whitespace and collapse to a space.
_CONTROL = {c: None for c in range(0x20) if chr(c) not in "\t\n\r\x0b\x0c"} | {0x7F: None}


def clean_text(text: str) -> str:
    """NFC, control characters dropped (also C1: U+0080..U+009F), whitespace collapsed."""
    text = text.translate(_CONTROL)
    if any("\x80" <= ch <= "\x9f" for ch in text):
        text = "".join(ch for ch in text if not ("\x80" <= ch <= "\x9f"))
    return normalize_text(text)


def _classify(value: Any, cfg: InputConfig) -> tuple[str | None, str | None, str]:
    """(reason, detail, normalized text) for one passage text; reason None means accepted."""
    if value is None:
        return "null_text", None, ""
    if isinstance(value, dict | list):
        return "nested_value", type(value).__name__, ""
    if not isinstance(value, str):
        return "text_not_string", type(value).__name__, ""
    text = clean_text(value)
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
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def _passage_row(rec: Good, text: str, source: str, cfg: InputConfig) -> dict[str, Any]:
    title = rec.values.get(cfg.title_column) if cfg.title_column else None
    meta = {c: rec.values.get(c) for c in cfg.metadata_columns}
    return {
        "passage_id": passage_id(text),
        "text": text,
        "title": clean_text(title) if isinstance(title, str) else _optional_str(title),
        "source": source,
        "row": rec.row,
        "source_id": _optional_str(rec.values.get(cfg.id_column)) if cfg.id_column else None,
        "metadata": json.dumps(meta, default=str, ensure_ascii=False) if meta else None,
        "document_id": _optional_str(rec.values.get(cfg.document_column))
        if cfg.document_column
        else None,
    }


def _classify_query(value: Any) -> tuple[str | None, str | None, str]:
    if value is None:
        return "null_query", None, ""
    if not isinstance(value, str):
        return "query_not_string", type(value).__name__, ""
    query = clean_text(value)
    return (None, None, query) if query else ("empty_query", None, "")


@dataclass
class Batch:
    passages: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    rejects: list[dict[str, Any]]

    def tables(self, pairs_mode: bool) -> tuple[pa.Table, pa.Table | None, pa.Table]:
        return (
            pa.Table.from_pylist(self.passages, schema=PASSAGES),
            pa.Table.from_pylist(self.pairs, schema=PAIRS) if pairs_mode else None,
            pa.Table.from_pylist(self.rejects, schema=REJECTS),
        )


def ingest_batches(path: str | Path, cfg: InputConfig, rows: int = OUTPUT_ROWS) -> Iterator[Batch]:
    """The file's records, classified, about `rows` records at a time."""
    path = Path(path)
    source = str(path)
    check_file(path, cfg)
    batch = Batch([], [], [])
    pairs_mode = cfg.mode == "pairs"
    for rec in read_records(path, cfg.format, wanted_columns(cfg)):
        if isinstance(rec, Bad):
            batch.rejects.append(_reject(source, rec.row, rec.reason, rec.detail, rec.raw, cfg))
        elif pairs_mode:
            reason, detail, query = _classify_query(rec.values.get(cfg.query_column))
            raw = rec.values.get(cfg.query_column)
            if reason is None:
                reason, detail, text = _classify(rec.values.get(cfg.positive_column), cfg)
                reason = f"positive_{reason}" if reason else None
                raw = rec.values.get(cfg.positive_column)
            if reason is not None:
                batch.rejects.append(_reject(source, rec.row, reason, detail, raw, cfg))
            else:
                passage = _passage_row(rec, text, source, cfg)
                batch.passages.append(passage)
                batch.pairs.append(
                    {
                        "query": query,
                        "passage_id": passage["passage_id"],
                        "source": source,
                        "row": rec.row,
                    }
                )
        else:
            reason, detail, text = _classify(rec.values.get(cfg.text_column), cfg)
            if reason is not None:
                raw = rec.values.get(cfg.text_column)
                batch.rejects.append(_reject(source, rec.row, reason, detail, raw, cfg))
            else:
                batch.passages.append(_passage_row(rec, text, source, cfg))
        if len(batch.passages) + len(batch.rejects) >= rows:
            yield batch
            batch = Batch([], [], [])
    yield batch


def ingest_file(path: str | Path, cfg: InputConfig) -> IngestResult:
    """One file at once, in memory (tests and notebooks; the stage writes batch by batch)."""
    parts = [b.tables(cfg.mode == "pairs") for b in ingest_batches(path, cfg)]
    passages = pa.concat_tables([p for p, _, _ in parts])
    rejects = pa.concat_tables([r for _, _, r in parts])
    pairs = (
        pa.concat_tables([q for _, q, _ in parts if q is not None]) if cfg.mode == "pairs" else None
    )
    return IngestResult(passages, rejects, passages.num_rows + rejects.num_rows, pairs)


# --- checks before anything starts -------------------------------------------------------------


def check_file(path: Path, cfg: InputConfig) -> None:
    """Raise IngestError when the file cannot be ingested at all (see module docstring)."""
    if not path.exists():
        raise MissingInputError(f"input file not found: {path}")
    if path.is_dir():
        raise IngestError(
            f"{path} is a folder; name files or a glob (or the folder in input.paths)"
        )
    try:
        kind = detect_format(path, cfg.format)
        if kind == "parquet":
            parquet_file(path)
        else:
            sniff_encoding(path)
        present = columns_of(path, cfg.format)
    except SourceError as e:
        raise IngestError(str(e)) from None
    if present is None:  # no records (an empty file): nothing to check
        return
    missing = [c for c in wanted_columns(cfg) if c not in present]
    required = {cfg.query_column, cfg.positive_column} if cfg.mode == "pairs" else {cfg.text_column}
    if missing and (kind in ("parquet", "csv", "tsv") or required & set(missing)):
        raise MissingInputError(
            f"{path}: column(s) {missing} not found; the file has {sorted(present)}. "
            "Set input.text_column (pairs mode: query_column, positive_column) and the "
            "title/id/metadata columns to match."
        )


def input_files(cfg: InputConfig) -> list[tuple[Path, InputConfig]]:
    """Every input file with the settings it is read with (corpus files of pairs mode are read
    as passages)."""
    files = [(p, cfg) for p in expand_paths(cfg.paths)]
    corpus = cfg.model_copy(update={"mode": "passages"})
    files += [(p, corpus) for p in expand_paths(cfg.corpus_paths)]
    return files


def check_inputs(cfg: InputConfig) -> list[Path]:
    """Every input file checked (existence, format, encoding, columns): an IngestError for the
    first that cannot be read, unless `on_unreadable: reject` (then only missing files and
    missing columns are errors). Cheap: footers, headers, the first records."""
    files = input_files(cfg)
    for path, file_cfg in files:
        try:
            check_file(path, file_cfg)
        except MissingInputError:
            raise
        except IngestError:
            if cfg.on_unreadable == "error":
                raise
    return [p for p, _ in files]


SUFFIXES = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".tsv")


def expand_paths(patterns: list[str]) -> list[Path]:
    """Globs (`**` recursive), folders (every data file under them) and plain paths, sorted and
    de-duplicated; a pattern or folder with no file is an error."""
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if any(ch in pattern for ch in "*?["):
            anchor = Path(p.anchor or ".")
            matches = sorted(m for m in anchor.glob(str(p.relative_to(anchor))) if m.is_file())
            if not matches:
                raise IngestError(f"input pattern matched no file: {pattern}")
            out.extend(matches)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _data_file(f))
            if not found:
                raise IngestError(f"input folder holds no data file ({', '.join(SUFFIXES)}): {p}")
            out.extend(found)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _data_file(path: Path) -> bool:
    try:
        detect_format(path)
    except SourceError:
        return False
    return not path.name.startswith(".")


# --- the stage ----------------------------------------------------------------------------------


def declared_rows(path: Path) -> int:
    """What an unreadable file counts as: the rows its Parquet footer declares, else 1."""
    try:
        return max(1, parquet_file(path).metadata.num_rows)
    except (SourceError, OSError):
        return 1


class IngestStage(Stage):
    """One job per input file: passages (pairs mode: pairs and their positives) and rejects."""

    name = STAGE
    version = "2"
    sharded = ("sources",)
    outputs = ("ingested", "pairs", "rejects")
    libraries = ("pyarrow", "ijson")

    def settings(self, cfg: PipelineConfig) -> Any:
        return cfg.input.model_dump(mode="json", exclude={"paths", "corpus_paths"})

    def _input_cfg(self, job: Job) -> InputConfig:
        """A file of `input.corpus_paths` is read as plain passages."""
        path = Path(job.paths("sources")[0]).resolve()
        corpus = {p.resolve() for p in expand_paths(job.cfg.input.corpus_paths)}
        if path in corpus:
            return job.cfg.input.model_copy(update={"mode": "passages"})
        return job.cfg.input

    def _count(self, job: Job) -> int | None:
        """Records in the file (None: unreadable, and `on_unreadable: reject`); counted once
        per job although `rows_in` and `run` both ask."""
        path = Path(job.paths("sources")[0])
        memo = self.__dict__.setdefault("_counts", {})
        if path not in memo:
            try:
                check_file(path, self._input_cfg(job))
                memo[path] = count_records(path, job.cfg.input.format)
            except MissingInputError:
                raise
            except (IngestError, SourceError) as e:
                if job.cfg.input.on_unreadable == "error":
                    raise IngestError(str(e)) from None
                memo[path] = None
        return memo[path]

    def rows_in(self, job: Job) -> int:
        count = self._count(job)
        return declared_rows(Path(job.paths("sources")[0])) if count is None else count

    def run(self, job: Job) -> Outcome:
        path = Path(job.paths("sources")[0])
        cfg = self._input_cfg(job)
        if self._count(job) is None:
            return self._unreadable(job, path, cfg)
        kept = rejected = 0
        for batch in ingest_batches(path, cfg):
            passages, pairs, rejects = batch.tables(cfg.mode == "pairs")
            if passages.num_rows or not kept:
                job.write("ingested", passages)
                if pairs is not None:
                    job.write("pairs", pairs)
            if rejects.num_rows or not rejected:
                job.write("rejects", rejects)
            kept += passages.num_rows
            rejected += rejects.num_rows
        return Outcome(rows_out=kept, rejected=rejected, stats={"files": 1})

    def _unreadable(self, job: Job, path: Path, cfg: InputConfig) -> Outcome:
        """The whole file as one reject (on_unreadable: reject), standing for its declared rows."""
        try:
            check_file(path, cfg)
            why = "unreadable"
        except IngestError as e:
            why = str(e)
        rows = declared_rows(path)
        detail = f"{why} ({rows} declared row(s) not read)"
        job.write("ingested", PASSAGES.empty_table())
        if cfg.mode == "pairs":
            job.write("pairs", PAIRS.empty_table())
        job.write(
            "rejects",
            pa.Table.from_pylist(
                [_reject(path, None, "unreadable_file", detail, None, cfg)], REJECTS
            ),
        )
        return Outcome(rows_out=0, rejected=rows, stats={"files": 1, "unreadable_files": 1})
