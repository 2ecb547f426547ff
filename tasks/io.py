"""Shard I/O: atomic Parquet writes that carry the fingerprint of what produced them.

A shard is complete exactly when its file exists (writes go to a temporary name, are fsynced and
renamed). A shard is *current* when the fingerprint stored in its Parquet metadata equals the one
the run expects now: then it is reused instead of recomputed (resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
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

    `stats` (JSON-able) travel in the file's metadata, so a resumed run can account for a shard
    it did not recompute.
    """
    path = Path(path)
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    meta = dict(table.schema.metadata or {})
    meta[FINGERPRINT_KEY] = fp.encode()
    meta[STATS_KEY] = json.dumps(stats or {}, sort_keys=True, default=str).encode()
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


def read_tables(paths: Iterable[str | Path], schema: pa.Schema | None = None) -> pa.Table:
    """Concatenate Parquet files; an empty list gives an empty table of `schema`."""
    tables = [pq.read_table(p) for p in paths]
    if not tables:
        if schema is None:
            raise ValueError("no shards to read and no schema to build an empty table")
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    meta_free = table.replace_schema_metadata(None)
    return meta_free.cast(schema) if schema is not None else meta_free


def slice_table(table: pa.Table, shard_size: int) -> list[pa.Table]:
    """Cut a table into consecutive shards of at most `shard_size` rows (at least one shard)."""
    if table.num_rows == 0:
        return [table]
    return [table.slice(i, shard_size) for i in range(0, table.num_rows, shard_size)]
