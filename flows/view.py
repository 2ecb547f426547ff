"""A run folder is a view over the stage cache: hard links to the entries' files at the paths
users and DuckDB expect, and manifest.json.

    passages/part-00000.parquet      embeddings/queries-00000.parquet   rejects/mine-00000.parquet
    clusters/part-00000.parquet      (clusters before semantic dedup: clusters/dedup/part-00000)
    exports/sentence_transformers/train.parquet ...

Hard links cost no space and keep a run readable after `tripletforge gc` drops its entries from
the cache; where a link cannot be made (another file system) the file is copied.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from flows.executor import StageRun
from schemas.manifest import ShardInfo

# dataset -> (folder, file name pattern); {i}: the shard's place in the dataset, {stage}: its maker
LAYOUT = {
    "ingested": ("ingest", "part-{i:05d}.parquet"),
    "pairs": ("pairs", "part-{i:05d}.parquet"),
    "passages": ("passages", "part-{i:05d}.parquet"),
    "clusters": ("clusters", "part-{i:05d}.parquet"),
    "queries": ("queries", "part-{i:05d}.parquet"),
    "query_duplicates": ("query_duplicates", "part-{i:05d}.parquet"),
    "generated": ("generated", "part-{i:05d}.parquet"),
    "embeddings.passages": ("embeddings", "passages-{i:05d}.parquet"),
    "embeddings.queries": ("embeddings", "queries-{i:05d}.parquet"),
    "embeddings.generated": ("embeddings", "generated-{i:05d}.parquet"),
    "candidates": ("candidates", "part-{i:05d}.parquet"),
    "triplets": ("triplets", "part-{i:05d}.parquet"),
    "rejects": ("rejects", "{stage}-{i:05d}.parquet"),
}
# Folders whose files are all listed in the manifest (anything else there is stale).
DATA_FOLDERS = sorted({folder for folder, _ in LAYOUT.values()} | {"exports"})


def _place(src: str | Path, dst: Path) -> None:
    """Hard-link (else copy) `src` to `dst`, replacing what is there atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def build_view(run_dir: Path, runs: list[StageRun]) -> tuple[dict[str, list[ShardInfo]], list[str]]:
    """Link every stage's outputs into `run_dir`; returns (dataset -> shards with paths relative
    to the run, files linked) and removes files of earlier runs the view no longer holds."""
    final = {}
    for run in runs:  # the last stage to write a dataset owns its folder
        for dataset in run.outputs:
            if dataset != "rejects":
                final[dataset] = run.stage.name
    shards: dict[str, list[ShardInfo]] = {}
    keep: set[Path] = set()
    for run in runs:
        for dataset, refs in run.outputs.items():
            folder, pattern = LAYOUT[dataset]
            if dataset != "rejects" and final[dataset] != run.stage.name:
                folder = f"{folder}/{run.stage.name}"
            key = dataset if folder == LAYOUT[dataset][0] else f"{dataset}.{run.stage.name}"
            for i, ref in enumerate(refs):
                rel = f"{folder}/{pattern.format(i=i, stage=run.stage.name)}"
                _place(ref.path, run_dir / rel)
                keep.add((run_dir / rel).resolve())
                shards.setdefault(key, []).append(ref.model_copy(update={"path": rel}))
        for entry in run.entries:
            for relpath, f in entry.files.items():
                src = run.cache_root / run.stage.name / entry.fingerprint / f.name
                _place(src, run_dir / relpath)
                keep.add((run_dir / relpath).resolve())
    removed = []
    for folder in DATA_FOLDERS:
        for path in sorted((run_dir / folder).rglob("*")):
            if path.is_file() and path.resolve() not in keep:
                path.unlink()
                removed.append(path.relative_to(run_dir).as_posix())
        for sub in sorted((run_dir / folder).rglob("*"), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only empty folders go
    return shards, removed


def point_latest(run_dir: Path) -> Path:
    """`<output root>/latest`, a relative symlink to the run folder just finished, so the
    commands in the README (`tripletforge query runs/latest ...`) work as printed. Replaced
    atomically; a real folder of that name is left alone."""
    link = run_dir.parent / "latest"
    if link.exists() and not link.is_symlink():
        return link
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link
