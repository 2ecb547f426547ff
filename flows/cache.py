"""The content-addressed stage cache: every job's outputs, keyed by its fingerprint, shared by
every run under one output root.

    <output.dir>/.stages/<stage>/<fingerprint>/
        entry.json                 what the job counted, its files and checksums, its run facts
        <dataset>-00000.parquet    the tables it wrote (deterministic bytes)
        files/exports/...          files beside the tables

A job writes into `.tmp-<host>-<pid>-<random>` beside its entry and renames the folder into
place when it is complete (atomic on POSIX), so an entry either exists whole or not at all. A
run is a view over entries: its folder holds hard links to their files (see flows/view.py).
`gc` removes entries that no run's manifest references, and temporary folders of processes
that are gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.io import sha256_file

ENTRY = "entry.json"
TMP_PREFIX = ".tmp-"


class CachedFile(BaseModel):
    name: str  # file name inside the entry folder (or files/<relpath>)
    rows: int | None = None  # Parquet tables only
    sha256: str
    bytes: int


class Entry(BaseModel):
    """One job's outputs and accounting."""

    stage: str
    fingerprint: str
    index: int  # the job's shard
    outputs: dict[str, list[CachedFile]] = Field(default_factory=dict)
    files: dict[str, CachedFile] = Field(default_factory=dict)  # relpath under the run -> file
    rows_in: int
    rows_out: int
    rejected: int = 0
    deduplicated: int = 0
    stats: dict[str, Any] = Field(default_factory=dict)
    # run-time facts of the job that made the entry (never part of any shard's bytes)
    seconds: float = 0.0
    node: str | None = None
    created_at: str = ""
    recipe: Any = None  # what was hashed into the fingerprint, for people debugging a cache miss

    @property
    def balanced(self) -> bool:
        counts = (self.rows_in, self.rows_out, self.rejected, self.deduplicated)
        return (
            min(counts) >= 0 and self.rows_in == self.rows_out + self.rejected + self.deduplicated
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def path(self, stage: str, fingerprint: str, name: str) -> Path:
        return self.folder(stage, fingerprint) / name

    def lookup(self, stage: str, fingerprint: str) -> Entry | None:
        """The complete entry, or None (missing, or a file of it lost or truncated)."""
        folder = self.folder(stage, fingerprint)
        try:
            entry = Entry.model_validate_json((folder / ENTRY).read_text())
        except (FileNotFoundError, ValueError):
            return None
        for f in [*(f for fs in entry.outputs.values() for f in fs), *entry.files.values()]:
            try:
                if (folder / f.name).stat().st_size != f.bytes:
                    return None
            except FileNotFoundError:
                return None
        return entry

    def begin(self, stage: str) -> Path:
        """A fresh temporary folder for one job of `stage`."""
        host = socket.gethostname().replace("-", "_")
        tmp = self.root / stage / f"{TMP_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, entry: Entry) -> Entry:
        """Checksum the files, write entry.json and move the folder into place. If another
        process committed the same fingerprint first, its entry wins (same inputs, same bytes)."""
        for files in entry.outputs.values():
            for f in files:
                _fill(tmp, f)
        for f in entry.files.values():
            _fill(tmp, f)
        entry.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        (tmp / ENTRY).write_text(entry.model_dump_json(indent=1))
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        final = self.folder(entry.stage, entry.fingerprint)
        try:
            os.rename(tmp, final)
        except OSError:  # already there (a concurrent run) or not empty
            shutil.rmtree(tmp, ignore_errors=True)
            existing = self.lookup(entry.stage, entry.fingerprint)
            if existing is None:
                raise
            return existing
        _fsync_dir(final.parent)
        return entry

    @staticmethod
    def abort(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def stale_temporaries(self) -> list[Path]:
        """Temporary folders of jobs whose process (on this host) no longer runs."""
        host = socket.gethostname().replace("-", "_")
        out = []
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            parts = tmp.name[len(TMP_PREFIX) :].split("-")
            ours = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
            if ours and not _pid_alive(int(parts[1])):
                out.append(tmp)
        return sorted(out)

    def remove_stale_temporaries(self) -> list[Path]:
        removed = self.stale_temporaries()
        for tmp in removed:
            shutil.rmtree(tmp, ignore_errors=True)
        return removed

    def entries(self) -> Iterable[tuple[str, str, Path]]:
        """(stage, fingerprint, folder) of every committed entry."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(self.root.iterdir()):
            if not stage_dir.is_dir() or stage_dir.name.startswith("."):
                continue  # .embeddings etc.: shared folders, not stage entries
            for folder in sorted(stage_dir.iterdir()):
                if folder.is_dir() and not folder.name.startswith(TMP_PREFIX):
                    yield stage_dir.name, folder.name, folder

    def gc(self, referenced: set[tuple[str, str]], dry_run: bool = False) -> tuple[int, int]:
        """Remove entries not in `referenced` ((stage, fingerprint) pairs); returns (entries,
        bytes) removed. A run folder keeps its own hard links, so a run still reads whole."""
        count = size = 0
        for stage, fingerprint, folder in list(self.entries()):
            if (stage, fingerprint) in referenced:
                continue
            count += 1
            size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        if not dry_run:
            self.remove_stale_temporaries()
        return count, size


def _fill(folder: Path, f: CachedFile) -> None:
    path = folder / f.name
    f.sha256 = sha256_file(path)
    f.bytes = path.stat().st_size


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
