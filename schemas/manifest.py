"""The manifest written next to every run: what was run, with what, and what came out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ShardInfo(BaseModel):
    path: str  # relative to the run folder (in the manifest)
    rows: int
    sha256: str
    fingerprint: str  # of the job that produced it (its cache entry)
    stats: dict[str, Any] = Field(default_factory=dict)
    stage: str | None = None  # the stage that produced it
    index: int | None = None  # that stage's job


class StageCounts(BaseModel):
    """Per-stage accounting. Invariant: rows_in == rows_out + rejected + deduplicated."""

    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    deduplicated: int = 0
    seconds: float = 0.0
    skipped_shards: int = 0  # shards found complete on disk (resume)
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        counts = (self.rows_in, self.rows_out, self.rejected, self.deduplicated)
        return (
            min(counts) >= 0 and self.rows_in == self.rows_out + self.rejected + self.deduplicated
        )


class Manifest(BaseModel):
    run_id: str
    config_hash: str
    config: dict[str, Any]
    created_at: str
    tripletforge_version: str
    versions: dict[str, str | None]
    models: dict[str, dict[str, Any] | None]  # llm is None in pairs mode
    stages: dict[str, StageCounts]
    shards: dict[str, list[ShardInfo]]
    reject_reasons: dict[str, dict[str, int]]
    timings: dict[str, float]
    # per stage, its jobs: fingerprint (the cache entry), reused or computed, node, seconds
    jobs: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    # per input file: its record count (counted apart from the parser), kept and rejected rows
    sources: list[dict[str, Any]] = Field(default_factory=list)
    # model calls this run made, per stage and model: {"calls": batches, "items": requests/texts}
    model_calls: dict[str, dict[str, dict[str, int]]] = Field(default_factory=dict)

    def unbalanced_stages(self) -> list[str]:
        return [name for name, c in self.stages.items() if not c.balanced]
