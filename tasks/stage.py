"""What a stage is: one findable unit that declares what it reads, what it writes, what goes into
its fingerprint, and a `run` that is plain Python over Arrow/Polars tables.

A stage knows nothing of Prefect, Ray, caches or manifests; an executor (`flows/executor.py`)
gives it a `Job`: the shard to work on (or the whole of its inputs), the config, the model
clients it declared, and somewhere to write. Everything else (resume by fingerprint, fan-out,
model workers, timings, progress, the manifest) is the executor's.

    class MyFilter(Stage):
        name = "my_filter"
        version = "1"                   # bump when the same inputs give other outputs
        sharded = ("queries",)          # one job per shard of `queries`
        outputs = ("queries", "rejects")

        def settings(self, cfg):        # the config slice in the fingerprint
            return cfg.my_filter.model_dump(mode="json")

        def run(self, job):
            table = job.read("queries")
            ...
            job.write("queries", kept)
            job.write("rejects", rejects)
            return Outcome(rows_out=kept.num_rows, rejected=rejects.num_rows)

Rows are accounted per job: `rows_in` (from the inputs, before `run`) must equal `rows_out +
rejected + deduplicated` (what `run` reports), or the run fails naming the stage and shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from schemas.config import PipelineConfig


class InputError(ValueError):
    """A problem with the user's input or config (a file, a column, a setting): its message says
    what and where, and is shown as it is, without a traceback."""


@dataclass
class Outcome:
    """What one job of a stage produced, besides the tables it wrote."""

    rows_out: int
    rejected: int = 0
    deduplicated: int = 0
    # Counts and facts for the manifest (JSON-able). Numbers and nested counters are summed over
    # a stage's jobs by the executor; keys ending in `_seconds` are run-time facts: they go to
    # the manifest, never into a shard file.
    stats: dict[str, Any] = field(default_factory=dict)


class Models(Protocol):
    """The model clients a job asked for (`Stage.models`); any other attribute raises."""

    llm: Any  # tasks.llm.base.ChatEngine
    embedder: Any  # .encode(texts, batch_size, prefix, pad_to_multiple_of) -> float32 matrix
    rescorer: Any  # .predict(queries, passages, batch_size) -> scores


class Job(Protocol):
    """One unit of a stage's work, as the stage sees it."""

    cfg: PipelineConfig
    index: int  # this job's shard (0 for a stage that is one job)
    count: int  # how many jobs the stage has
    models: Models

    def has(self, dataset: str) -> bool:
        """Whether this run has the dataset (optional inputs may be absent)."""
        ...

    def paths(self, dataset: str) -> list[str]:
        """The input's Parquet files: this job's shard of a sharded input, every shard else."""
        ...

    def rows(self, dataset: str) -> list[int]:
        """Rows of every shard of a dataset (from the Parquet footers)."""
        ...

    def read(
        self,
        dataset: str,
        columns: list[str] | None = None,
        where: pc.Expression | None = None,
    ) -> pa.Table:
        """The input's rows (see `paths`), `columns` and `where` applied while reading."""
        ...

    def write(self, dataset: str, table: pa.Table) -> None:
        """Append one shard to an output dataset (written atomically with the job)."""
        ...

    def write_file(self, relpath: str, data: bytes) -> None:
        """A file beside the tables (exports), at `relpath` under the run folder."""
        ...

    def model_identity(self, name: str) -> Any:
        """What the fingerprint knows of model `name` (weights, settings, device)."""
        ...

    def shared_folder(self, name: str) -> Path:
        """A folder shared by every run and job over the same stage cache (e.g. the embedding
        cache); what goes there must be safe to write from many jobs at once."""
        ...


class Stage:
    """Base of every stage; subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    version: ClassVar[str]
    # Inputs read shard by shard: one job per shard of the first; the others must have as many
    # shards (they were made from the same shards) and job i reads shard i of each.
    sharded: ClassVar[tuple[str, ...]] = ()
    # Inputs read whole by every job.
    whole: ClassVar[tuple[str, ...]] = ()
    # Inputs a run may not have (a stage that makes them is off): `job.has` says.
    optional: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[tuple[str, ...]] = ()
    # Libraries whose versions decide this stage's output: part of its fingerprint.
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow",)

    def enabled(self, cfg: PipelineConfig) -> bool:
        return True

    def settings(self, cfg: PipelineConfig) -> Any:
        """The config this stage's output depends on (hashed into its fingerprint)."""
        return None

    def models(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """Model workers a job needs (`llm`, `embedder`, `rescorer`); their identities (weights
        hash, resolved precision) join the fingerprint."""
        return ()

    def rows_in(self, job: Job) -> int:
        """Rows this job is accountable for, counted from its inputs before `run`. Default:
        the rows of its shard of the first sharded input (or of the first whole input)."""
        first = self.sharded[0] if self.sharded else self.whole[0]
        return sum(job.rows(first)[job.index : job.index + 1] if self.sharded else job.rows(first))

    def run(self, job: Job) -> Outcome:
        raise NotImplementedError

    def summarize(self, stats: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
        """The manifest's `extra` for this stage from its jobs' summed stats."""
        return stats

    def __repr__(self) -> str:
        return f"<stage {self.name} v{self.version}>"


def reason_counts(table: pa.Table) -> dict[str, int]:
    """Rows per `reason` of a rejects or candidates table."""
    if table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column("reason").combine_chunks()).to_pylist()
    return {c["values"]: c["counts"] for c in counts if c["values"] is not None}


def merge_stats(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum numbers and nested counters over jobs; other values: the first one seen."""
    out: dict[str, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, bool) or value is None:
                out.setdefault(key, value)
            elif isinstance(value, int | float):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, dict):
                out[key] = merge_stats([out.get(key) or {}, value])
            else:
                out.setdefault(key, value)
    return out
