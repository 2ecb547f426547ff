"""Parquet I/O: atomic writes, deterministic bytes, filtered and batched reads, an external sort.

A file is complete exactly when it exists (writes go to a temporary name, are fsynced and
renamed). A shard file holds rows and deterministic metadata only (the fingerprint of the job
that made it): the same rows written by the same library versions are the same bytes, so a
checksum of a shard is a checksum of its content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.manifest import ShardInfo

FINGERPRINT_KEY = b"tripletforge.fingerprint"
STATS_KEY = b"tripletforge.stats"


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (settings, input checksums, prompt versions)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside `path`; when the block succeeds, fsync that file and
    rename it over `path` (readers see the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        Path(tmp).write_bytes(data)


def write_parquet_atomic(
    table: pa.Table,
    path: str | Path,
    fp: str,
    schema: pa.Schema | None = None,
    stats: dict[str, Any] | None = None,
) -> ShardInfo:
    """Write `table` (cast to `schema` if given) to `path` atomically; return its ShardInfo.

    `stats` (JSON-able, deterministic: never timings) travel in the file's metadata.
    """
    path = Path(path)
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    meta = dict(table.schema.metadata or {})
    meta[FINGERPRINT_KEY] = fp.encode()
    if stats:
        meta[STATS_KEY] = json.dumps(stats, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return ShardInfo(
        path=str(path),
        rows=table.num_rows,
        sha256=sha256_file(path),
        fingerprint=fp,
        stats=stats or {},
    )


def _stored_meta(path: str | Path) -> dict[bytes, bytes]:
    try:
        return pq.read_schema(path).metadata or {}
    except (FileNotFoundError, pa.ArrowInvalid, OSError):
        return {}


def stored_fingerprint(path: str | Path) -> str | None:
    value = _stored_meta(path).get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def shard_is_current(path: str | Path, fp: str) -> bool:
    return stored_fingerprint(path) == fp


def existing_shard(path: str | Path, fp: str) -> ShardInfo | None:
    """ShardInfo of a complete shard written with the same fingerprint, else None."""
    path = Path(path)
    meta = _stored_meta(path)
    if meta.get(FINGERPRINT_KEY, b"").decode() != fp:
        return None
    return ShardInfo(
        path=str(path),
        rows=pq.read_metadata(path).num_rows,
        sha256=sha256_file(path),
        fingerprint=fp,
        stats=json.loads(meta.get(STATS_KEY, b"{}")),
    )


def read_tables(
    paths: Iterable[str | Path],
    schema: pa.Schema | None = None,
    *,
    columns: list[str] | None = None,
    where: pc.Expression | None = None,
) -> pa.Table:
    """Concatenate Parquet files; an empty list gives an empty table of `schema`.

    `columns` and `where` are applied while each file is read (batch by batch), so a filtered
    read of a large corpus holds the rows that match, never the whole files."""
    tables = [pq.read_table(p, columns=columns, filters=where) for p in paths]
    if schema is not None and columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    if not tables:
        if schema is None:
            raise ValueError("no shards to read and no schema to build an empty table")
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    meta_free = table.replace_schema_metadata(None)
    return meta_free.cast(schema) if schema is not None else meta_free


def ids_in(column: str, ids: Iterable[str]) -> pc.Expression:
    """A `where` for `read_tables`: rows whose `column` is one of `ids`."""
    return pc.field(column).isin(pa.array(sorted(set(ids)), pa.string()))


def slice_table(table: pa.Table, shard_size: int) -> list[pa.Table]:
    """Cut a table into consecutive shards of at most `shard_size` rows (at least one shard)."""
    if table.num_rows == 0:
        return [table]
    return [table.slice(i, shard_size) for i in range(0, table.num_rows, shard_size)]


# A table in memory or a Parquet file: what a corpus-wide stage reads batch by batch.
Source: TypeAlias = pa.Table | str | Path


def iter_batches(
    sources: Sequence[Source], columns: list[str], batch_rows: int
) -> Iterator[tuple[int, int, pa.RecordBatch]]:
    """(source index, position of the batch's first row in that source, batch) over every
    source in order; at most `batch_rows` rows of `columns` are read at a time."""
    for index, source in enumerate(sources):
        if isinstance(source, pa.Table):
            batches = source.select(columns).to_batches(max_chunksize=batch_rows)
        else:
            batches = pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=columns)
        offset = 0
        for batch in batches:
            if batch.num_rows:
                yield index, offset, batch
                offset += batch.num_rows


def row_count(sources: Sequence[Source]) -> int:
    """Rows of every source (Parquet files: from their footers)."""
    return sum(
        s.num_rows if isinstance(s, pa.Table) else pq.read_metadata(s).num_rows for s in sources
    )


def write_sorted_shards(
    files: Sequence[str | Path],
    keep: pa.Table,
    order_by: str,
    shard_size: int,
    schema: pa.Schema,
    write: Callable[[pa.Table], Any],
    budget_bytes: int = 128 << 20,
) -> int:
    """The rows of Parquet `files` named by `keep` (shard = index into `files`, position = row
    in that file), sorted by `order_by` (ties: file, row), handed to `write` as consecutive
    shards of `shard_size` rows (at least one, maybe empty); returns how many.

    An external sort that never holds more than about `budget_bytes` of rows: the sort keys are
    read and sorted first (one column), which fixes each row's output shard; then as many
    output shards as fit in the budget are filled per pass over the files. A corpus of B bytes
    takes about B / budget passes of sequential reading."""
    keys = pl.concat(
        [
            pl.DataFrame(
                {
                    order_by: batch.column(0),
                    "shard": pl.Series([index] * batch.num_rows, dtype=pl.Int32),
                    "position": pl.int_range(offset, offset + batch.num_rows, eager=True),
                }
            )
            for index, offset, batch in iter_batches(files, [order_by], 65_536)
        ]
        or [pl.DataFrame(schema={order_by: pl.String, "shard": pl.Int32, "position": pl.Int64})]
    )
    keys = (
        keys.join(pl.from_arrow(keep.select(["shard", "position"])), on=["shard", "position"])
        .sort(order_by, "shard", "position")
        .with_columns((pl.int_range(pl.len()) // shard_size).cast(pl.Int32).alias("out"))
    )
    n_out = max(1, -(-keys.height // shard_size))
    # Each file's rows -> the output shard they go to (-1: not kept).
    dest = {}
    for index, path in enumerate(files):
        rows = keys.filter(pl.col("shard") == index)
        dest[index] = np.full(pq.read_metadata(path).num_rows, -1, dtype=np.int32)
        dest[index][rows["position"].to_numpy()] = rows["out"].to_numpy()
    # Rows are held twice at the peak of a pass (taken from the batches, then sorted).
    per_pass = max(1, budget_bytes // max(1, 2 * _row_bytes(files) * shard_size))
    for first in range(0, n_out, per_pass):
        last = min(first + per_pass, n_out)
        parts = []
        for index, offset, batch in iter_batches(files, schema.names, 16_384):
            out = dest[index][offset : offset + batch.num_rows]
            hit = np.flatnonzero((out >= first) & (out < last))
            if len(hit):
                parts.append(
                    pa.Table.from_batches([batch])
                    .take(pa.array(hit))
                    .append_column("_shard", pa.array(np.full(len(hit), index, dtype=np.int32)))
                    .append_column("_position", pa.array(offset + hit))
                )
        span = pa.concat_tables(parts) if parts else schema.empty_table()
        del parts
        # Sorted by key, the span is its output shards one after another.
        order = [(order_by, "ascending"), ("_shard", "ascending"), ("_position", "ascending")]
        span = span.sort_by(order).select(schema.names) if span.num_rows else span
        for out_index in range(first, last):
            write(span.slice((out_index - first) * shard_size, shard_size).cast(schema))
    return n_out


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet file bytes (for files written beside the shards, such as exports)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _row_bytes(files: Sequence[str | Path]) -> int:
    """Mean uncompressed bytes of a row of these Parquet files (from their footers)."""
    rows = size = 0
    for path in files:
        meta = pq.read_metadata(path)
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return -(-size // rows) if rows else 1
