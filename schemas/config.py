"""The one typed configuration object of a run, loaded from YAML.

Everything that changes the produced data is part of the config hash (and so of the run id);
`runtime` (where and how fast it runs) is not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Section):
    """Where the passage corpus comes from and which columns hold what."""

    paths: list[str] = Field(min_length=1, description="Files or glob patterns.")
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    text_column: str = "text"
    title_column: str | None = None
    id_column: str | None = Field(
        default=None, description="User id column; kept as `source_id`, never used as passage_id."
    )
    metadata_columns: list[str] = Field(
        default_factory=list, description="Extra columns kept as-is in a JSON `metadata` column."
    )
    min_chars: int = Field(default=20, ge=1)
    max_chars: int = Field(default=20_000, ge=1)
    raw_preview_chars: int = Field(default=200, ge=0, description="Raw text kept in a reject row.")

    @model_validator(mode="after")
    def _bounds(self) -> InputConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class DedupConfig(_Section):
    """Exact duplicates are removed (one member kept); near duplicates are clustered and kept.

    Near duplicates: MinHash over word shingles of the folded text, LSH for candidate pairs, and
    every candidate pair verified by its exact shingle Jaccard (so LSH false positives never
    make a cluster). Clusters are connected components over exact and near edges.
    """

    exact: bool = Field(
        default=True,
        description="Collapse passages whose case-, punctuation- and space-folded text is equal.",
    )
    near: bool = True
    shingle_size: int = Field(default=3, ge=1, description="Words per shingle.")
    num_perm: int = Field(default=128, ge=16)
    num_bands: int = Field(default=32, ge=1, description="LSH bands; num_perm must divide evenly.")
    near_threshold: float = Field(
        default=0.7, gt=0, le=1, description="Verified Jaccard that makes two passages siblings."
    )
    seed: int = 42

    @model_validator(mode="after")
    def _bands(self) -> DedupConfig:
        if self.num_perm % self.num_bands:
            raise ValueError(f"num_bands ({self.num_bands}) must divide num_perm ({self.num_perm})")
        return self


class LLMConfig(_Section):
    """The generation engine. `model_path: null` means the prepared embedded default (SmolLM2)."""

    model_path: str | None = None
    model_name: str = "SmolLM2-135M-Instruct"
    dtype: str = "bfloat16"
    max_model_len: int = Field(default=2048, ge=128)
    enforce_eager: bool = True
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class GenerationConfig(_Section):
    """Synthetic query generation (the positives of the triplets)."""

    styles: dict[str, int] = Field(
        default_factory=lambda: {"question": 1},
        description="Query style -> queries per passage. Styles live in tasks/prompts.",
    )
    max_passages: int | None = Field(
        default=None, ge=1, description="Generate for the first N passages only (by passage_id)."
    )
    max_tokens: int = Field(default=96, ge=8)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    max_passage_chars: int = Field(default=1200, ge=100, description="Passage cut in the prompt.")
    min_query_chars: int = Field(default=8, ge=1)
    max_query_chars: int = Field(default=200, ge=8)
    max_copy_ratio: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Reject a query when this share of its words is a verbatim run of the passage.",
    )

    @field_validator("styles")
    @classmethod
    def _styles(cls, v: dict[str, int]) -> dict[str, int]:
        from schemas.llm import QUERY_STYLES

        unknown = sorted(set(v) - set(QUERY_STYLES))
        if unknown:
            raise ValueError(f"unknown query styles {unknown}; known: {sorted(QUERY_STYLES)}")
        if any(n < 0 for n in v.values()):
            raise ValueError("queries per style must be >= 0")
        if sum(v.values()) == 0:
            raise ValueError("at least one query per passage is needed")
        return v


class EmbeddingConfig(_Section):
    """The embedding model. `model_path: null` means the bundled all-MiniLM-L6-v2."""

    model_path: str | None = None
    model_name: str = "all-MiniLM-L6-v2"
    batch_size: int = Field(default=64, ge=1)
    query_prefix: str = ""
    passage_prefix: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MiningConfig(_Section):
    """Hard-negative mining and the false-negative filters, applied in this order:

    1. the positive itself, and members of its duplicate cluster whose shingle Jaccard with it is
       >= duplicate_similarity (exact and near-identical copies), are excluded;
    2. remaining candidates are ranked by score (0 = most similar); only ranks in
       [min_rank, max_rank) are considered;
    3. score filters: `score < max_positive_ratio * positive_score` (NV-Retriever's
       TopK-PercPos), `score <= positive_score - margin`, `score <= max_score`;
    4. `num_negatives` survivors are kept: the hardest (`top`) or a seeded random draw.
    """

    num_negatives: int = Field(default=4, ge=1)
    min_negatives: int = Field(
        default=1, ge=1, description="A query with fewer surviving negatives is rejected."
    )
    min_rank: int = Field(default=0, ge=0)
    max_rank: int = Field(default=50, ge=1)
    max_positive_ratio: float | None = Field(default=0.95, gt=0)
    margin: float | None = None
    max_score: float | None = None
    sampling_strategy: Literal["top", "random"] = Field(
        default="top",
        description="top: the hardest survivors; random: a seeded random draw among survivors.",
    )
    seed: int = 0
    search: Literal["auto", "exact", "ann"] = Field(
        default="auto", description="auto: exact below ann_min_corpus passages, faiss HNSW above."
    )
    ann_min_corpus: int = Field(default=50_000, ge=1)
    ann_ef_search: int = Field(default=128, ge=16)
    exclude_duplicate_clusters: bool = True
    duplicate_similarity: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="A candidate in the positive's duplicate cluster with shingle Jaccard to the "
        "positive >= this is a copy (excluded); looser siblings stay as hard negatives.",
    )

    @model_validator(mode="after")
    def _ranks(self) -> MiningConfig:
        if self.min_rank >= self.max_rank:
            raise ValueError(f"min_rank ({self.min_rank}) must be < max_rank ({self.max_rank})")
        if self.min_negatives > self.num_negatives:
            raise ValueError("min_negatives must be <= num_negatives")
        return self


class SplitConfig(_Section):
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0


class OutputConfig(_Section):
    dir: str = "runs"
    shard_size: int = Field(default=256, ge=1, description="Rows per Parquet shard.")
    exports: list[Literal["sentence_transformers", "flagembedding"]] = Field(
        default_factory=lambda: ["sentence_transformers", "flagembedding"]
    )


class RuntimeConfig(_Section):
    """How the run executes; not part of the config hash."""

    ray_address: str | None = Field(
        default=None, description="Connect to this Ray cluster; default: RAY_ADDRESS or local."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="Local Ray CPUs; default: all.")
    object_store_mb: int = Field(default=1024, ge=100)
    task_timeout_s: float = Field(default=3600, gt=0)
    worker_logs: bool = Field(
        default=False, description="Stream Ray worker logs (vLLM, model loading) to the console."
    )


class PipelineConfig(_Section):
    name: str = "tripletforge"
    input: InputConfig
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("name must be non-empty and use letters, digits, '-', '_', '.'")
        return v

    def content_dict(self) -> dict[str, Any]:
        """The part of the config that determines the data (hashed into the run id)."""
        return self.model_dump(mode="json", exclude={"runtime": True, "output": {"dir"}})

    def config_hash(self) -> str:
        blob = json.dumps(self.content_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return f"{self.name}-{self.config_hash()[:12]}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load YAML; relative input paths and output.dir resolve against the config file's folder.

    `overrides` are `dotted.key=value` strings whose value is parsed as YAML
    (`mining.num_negatives=8`, `generation.styles={question: 2}`).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a YAML mapping")
    for item in overrides or []:
        apply_override(raw, item)
    base = path.resolve().parent
    out_dir = raw.get("output", {}).get("dir") if isinstance(raw.get("output"), dict) else None
    if isinstance(out_dir, str) and not Path(out_dir).is_absolute():
        raw["output"]["dir"] = str(base / out_dir)
    paths = raw.get("input", {}).get("paths")
    if isinstance(paths, list):
        raw["input"]["paths"] = [
            p if Path(p).is_absolute() else str(base / p) for p in paths if isinstance(p, str)
        ] + [p for p in paths if not isinstance(p, str)]
    return PipelineConfig.model_validate(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override must look like section.key=value, got {item!r}")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)
