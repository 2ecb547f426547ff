"""The executor: runs a list of stages (tasks/) for one config and owns everything around them.

For each stage, in order: resolve its inputs (the datasets earlier stages made), cut it into
jobs (one per shard of its first sharded input, or one), compute each job's fingerprint (stage
name and version, config slice, library versions, model identities, the checksums of the input
shards it reads), reuse every job whose entry is in the content-addressed cache
(flows/cache.py), start the models the remaining jobs need, run them (fanned out on Ray through
Prefect, or in this process), check each job's accounting, and stop models no later stage
declares. Then it builds the run folder as a view over the cache and writes the manifest.

Two ways to run jobs share all of that: `LocalDispatch` (in this process, in order: unit
tests, notebooks, `benchmarks/orchestration.py`) and `RayDispatch` (Prefect tasks on the flow's
RayTaskRunner, in lanes).
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.cache import CachedFile, Entry, StageCache
from flows.models import JobModels, ModelHost
from schemas.config import PipelineConfig
from schemas.manifest import ShardInfo
from tasks.io import fingerprint, read_tables, sha256_file
from tasks.memory import return_free_heap
from tasks.stage import InputError, Stage, merge_stats, reason_counts

log = logging.getLogger(__name__)
# Stage and shard progress for whoever listens (the CLI shows it live).
progress = logging.getLogger("tripletforge.progress")


class AccountingError(RuntimeError):
    """A job's rows do not balance: rows_in != rows_out + rejected + deduplicated."""


class StageError(RuntimeError):
    """A stage's job failed; the message names the stage and the shard."""


# --- one job ------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """Everything one job needs, picklable (it travels to a Ray worker)."""

    stage: Stage
    cfg: PipelineConfig
    index: int
    count: int
    fingerprint: str
    recipe: Any
    inputs: dict[str, list[ShardInfo]]  # dataset -> every shard
    sharded: tuple[str, ...]  # datasets this job reads one shard of (shard `index`)
    cache_root: str
    models: dict[str, Any]  # name -> handle

    @property
    def label(self) -> str:
        return f"{self.stage.name}-{self.index:05d}"


class JobContext:
    """What a stage's `run` sees as `job` (tasks.stage.Job)."""

    def __init__(self, spec: JobSpec, folder: Path):
        self.spec, self.folder = spec, folder
        self.cfg, self.index, self.count = spec.cfg, spec.index, spec.count
        self.models = JobModels(spec.models, spec.index)
        self.outputs: dict[str, list[CachedFile]] = {}
        self.files: dict[str, CachedFile] = {}
        self.reasons: dict[str, int] = {}  # of every rejects table written

    def model_identity(self, name: str) -> Any:
        return self.spec.recipe["models"][name]

    def shared_folder(self, name: str) -> Path:
        return Path(self.spec.cache_root) / f".{name}"

    def has(self, dataset: str) -> bool:
        return dataset in self.spec.inputs

    def _refs(self, dataset: str, whole: bool) -> list[ShardInfo]:
        if dataset not in self.spec.inputs:
            raise KeyError(f"stage {self.spec.stage.name} has no input {dataset!r} in this run")
        refs = self.spec.inputs[dataset]
        if dataset in self.spec.sharded and not whole:
            return refs[self.index : self.index + 1]
        return refs

    def paths(self, dataset: str, whole: bool = False) -> list[str]:
        return [r.path for r in self._refs(dataset, whole)]

    def rows(self, dataset: str) -> list[int]:
        return [r.rows for r in self._refs(dataset, True)]

    def read(
        self,
        dataset: str,
        columns: list[str] | None = None,
        where: pc.Expression | None = None,
        whole: bool = False,
    ) -> pa.Table:
        paths = self.paths(dataset, whole)
        if not paths:
            raise ValueError(f"{dataset} has no shards")
        return read_tables(paths, columns=columns, where=where)

    def write(self, dataset: str, table: pa.Table) -> None:
        if dataset not in self.spec.stage.outputs:
            raise KeyError(f"stage {self.spec.stage.name} does not declare output {dataset!r}")
        files = self.outputs.setdefault(dataset, [])
        name = f"{dataset}-{len(files):05d}.parquet"
        if dataset == "rejects":
            self.reasons = merge_stats([self.reasons, reason_counts(table)])
        meta = dict(table.schema.metadata or {})
        meta[b"tripletforge.fingerprint"] = self.spec.fingerprint.encode()
        pq.write_table(table.replace_schema_metadata(meta), self.folder / name, compression="zstd")
        files.append(CachedFile(name=name, rows=table.num_rows, sha256="", bytes=0))

    def write_file(self, relpath: str, data: bytes) -> None:
        name = f"files/{relpath}"
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[relpath] = CachedFile(name=name, sha256="", bytes=0)


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a node id is a nice-to-have
        pass
    return "local"


def execute(spec: JobSpec) -> Entry:
    """Run one job and commit its entry (or return the entry another process committed)."""
    cache = StageCache(spec.cache_root)
    done = cache.lookup(spec.stage.name, spec.fingerprint)
    if done is not None:
        return done
    folder = cache.begin(spec.stage.name)
    job = JobContext(spec, folder)
    start = time.perf_counter()
    try:
        rows_in = spec.stage.rows_in(job)
        outcome = spec.stage.run(job)
        stats = dict(outcome.stats)
        if "rejects" in spec.stage.outputs:
            stats["reasons"] = job.reasons
        if job.models.calls:
            stats["model_calls"] = job.models.calls
        entry = Entry(
            stage=spec.stage.name,
            fingerprint=spec.fingerprint,
            index=spec.index,
            outputs=job.outputs,
            files=job.files,
            rows_in=rows_in,
            rows_out=outcome.rows_out,
            rejected=outcome.rejected,
            deduplicated=outcome.deduplicated,
            stats=stats,
            seconds=time.perf_counter() - start,
            node=_node(),
            recipe=spec.recipe,
        )
        if not entry.balanced:
            where = spec.inputs["sources"][spec.index].path if "sources" in spec.sharded else ""
            raise AccountingError(
                f"stage {spec.stage.name}, shard {spec.index}{f' ({where})' if where else ''}: "
                f"rows in {entry.rows_in} != out {entry.rows_out} + rejected {entry.rejected} + "
                f"deduplicated {entry.deduplicated}"
            )
        return cache.commit(folder, entry)
    except BaseException:
        cache.abort(folder)
        raise
    finally:
        job.models.close()
        return_free_heap()  # a long-lived Ray worker: see tasks/memory.py


# --- dispatch -----------------------------------------------------------------------------------


class ShardProgress:
    """Progress of one stage's jobs as they finish: shards done / total, rows per second and an
    ETA, as a log line (`tripletforge.progress`) with the numbers in `record.event` (for
    `--log-format json`)."""

    def __init__(self, stage: str, total: int, started: float | None = None):
        self.stage, self.total = stage, total
        self.started = time.perf_counter() if started is None else started
        self.done = self.rows = 0

    def shard_done(self, entry: Entry) -> None:
        self.done += 1
        self.rows += entry.rows_in
        elapsed = max(time.perf_counter() - self.started, 1e-6)
        rate = self.rows / elapsed
        eta = elapsed / self.done * (self.total - self.done)
        event = {
            "event": "shard_done",
            "stage": self.stage,
            "shards_done": self.done,
            "shards_total": self.total,
            "rows": self.rows,
            "rows_per_s": round(rate, 1),
            "elapsed_s": round(elapsed, 1),
            "eta_s": round(eta, 1),
        }
        tail = f", ETA {_clock(eta)}" if self.done < self.total else f" in {_clock(elapsed)}"
        progress.info(
            "%s: %d/%d shards, %.0f rows/s%s",
            self.stage,
            self.done,
            self.total,
            rate,
            tail,
            extra={"event": event},
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


def collect_in_order(
    jobs: list[tuple[JobSpec, Callable[[], Entry]]], stage: str, started: float | None = None
) -> list[Entry]:
    """Each job's entry, in order, with progress; a failed job fails the run naming its stage
    and shard (user errors and accounting errors pass through as they are)."""
    out = []
    shown = ShardProgress(stage, len(jobs), started)
    for spec, result in jobs:
        try:
            out.append(result())
        except (AccountingError, InputError):
            raise
        except Exception as e:
            raise StageError(f"stage {stage}, shard {spec.index}: {e}") from e
        shown.shard_done(out[-1])
    return out


class LocalDispatch:
    """Jobs in this process, one after another."""

    def submit(self, specs: list[JobSpec], width: int) -> list[Any]:
        return specs

    def collect(
        self, pending: list[Any], stage: str, timeout_s: float, started: float | None = None
    ) -> list[Entry]:
        return collect_in_order(
            [(spec, lambda s=spec: execute(s)) for spec in pending], stage, started
        )

    def width(self, stage: Stage, cfg: PipelineConfig, host: ModelHost) -> int:
        return 1


# --- the executor -------------------------------------------------------------------------------


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class StageRun:
    """One stage of one run: its jobs' entries (in shard order) and what it made."""

    stage: Stage
    entries: list[Entry]
    reused: list[bool]
    seconds: float
    cache_root: Path
    outputs: dict[str, list[ShardInfo]] = field(default_factory=dict)


class Executor:
    def __init__(
        self,
        cfg: PipelineConfig,
        run_dir: str | Path,
        models: ModelHost,
        dispatch: Any | None = None,
        cache_root: str | Path | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.cache = StageCache(cache_root or self.run_dir.parent / ".stages")
        self.models = models
        self.dispatch = dispatch or LocalDispatch()
        self.datasets: dict[str, list[ShardInfo]] = {}
        self.runs: list[StageRun] = []

    # inputs
    def sources(self) -> list[ShardInfo]:
        from tasks.ingest import expand_paths

        files = expand_paths(self.cfg.input.paths) + expand_paths(self.cfg.input.corpus_paths)
        files = list(dict.fromkeys(Path(f).resolve() for f in files))
        return [
            ShardInfo(path=str(f), rows=0, sha256=sha256_file(f), fingerprint="", stage="sources")
            for f in files
        ]

    def _inputs(self, stage: Stage) -> dict[str, list[ShardInfo]]:
        out = {}
        for name in dict.fromkeys(stage.sharded + stage.whole):
            if name in self.datasets:
                out[name] = self.datasets[name]
            elif name not in stage.optional:
                raise RuntimeError(
                    f"stage {stage.name} needs {name!r}, which no earlier stage made"
                )
        return out

    def _jobs(self, stage: Stage, inputs: dict[str, list[ShardInfo]]) -> list[JobSpec]:
        sharded = tuple(d for d in stage.sharded if d in inputs)
        count = len(inputs[sharded[0]]) if sharded else 1
        for name in sharded[1:]:
            if len(inputs[name]) != count:
                raise RuntimeError(
                    f"stage {stage.name}: {name} has {len(inputs[name])} shards, "
                    f"{sharded[0]} has {count}"
                )
        base = {
            "stage": stage.name,
            "version": stage.version,
            "settings": stage.settings(self.cfg),
            "libraries": library_versions(stage.libraries),
            "models": {m: self.models.identity(m) for m in stage.models(self.cfg)},
            "whole": {d: [r.sha256 for r in inputs[d]] for d in stage.whole if d in inputs},
            "rows": {d: [r.rows for r in inputs[d]] for d in sharded},
            "count": count,
        }
        specs = []
        for i in range(count):
            recipe = {**base, "index": i, "sharded": {d: inputs[d][i].sha256 for d in sharded}}
            specs.append(
                JobSpec(
                    stage=stage,
                    cfg=self.cfg,
                    index=i,
                    count=count,
                    fingerprint=fingerprint(recipe),
                    recipe=recipe,
                    inputs=inputs,
                    sharded=sharded,
                    cache_root=str(self.cache.root),
                    models={},
                )
            )
        return specs

    def run(self, stages: Sequence[Stage], overlap: bool = False) -> list[StageRun]:
        """Run `stages` in order. With `overlap`, a stage is collected only when a later stage
        needs what it makes, so independent stages run at once (embedding beside an LLM on a
        GPU or behind an HTTP server); on a CPU they share the cores, and run in turn."""
        enabled = [s for s in stages if s.enabled(self.cfg)]
        removed = self.cache.remove_stale_temporaries()
        if removed:
            log.info("removed %d temporary folder(s) of an interrupted run", len(removed))
        self.datasets = {"sources": self.sources()}
        pending: list[_Pending] = []
        with self.models:
            for position, stage in enumerate(enabled):
                needs = set(stage.sharded + stage.whole)
                for p in list(pending):
                    if not overlap or needs & set(p.stage.outputs):
                        self._finish(p, pending, enabled[position:])
                if overlap:  # else a loading vLLM's spinning threads slow the stage beside it
                    self._prefetch(enabled[position:], pending)
                pending.append(self._submit(stage))
            for p in list(pending):
                self._finish(p, pending, [])
        return sorted(self.runs, key=lambda r: enabled.index(r.stage))

    def _prefetch(self, coming: Sequence[Stage], pending: list[_Pending]) -> None:
        """Start loading, in the background, the models of coming stages that are sure to have
        work: their inputs are all made (no stage before them will write them again) and some
        of their shards are not in the cache. So a model's load (a minute for vLLM on 2 cores)
        overlaps the stages before it, and a resumed run loads nothing it will not use. Only
        where stages overlap: on a CPU-only machine the loading engine's threads slowed the
        stages beside it (the demo on 2 AVX2 cores: 447 s with it against 290 s without)."""
        made_later = {d for p in pending for d in p.stage.outputs}
        for stage in coming:
            asked = {*self.models.started, *self.models.prefetched}
            wanted = [m for m in stage.models(self.cfg) if m not in asked]
            needs = set(stage.sharded + stage.whole)
            known = not needs & made_later and needs - set(stage.optional) <= set(self.datasets)
            if wanted and known:
                specs = self._jobs(stage, self._inputs(stage))
                if any(self.cache.lookup(stage.name, s.fingerprint) is None for s in specs):
                    for name in wanted:
                        self.models.prefetch(name)
            made_later |= set(stage.outputs)

    def _submit(self, stage: Stage) -> _Pending:
        start = time.perf_counter()
        specs = self._jobs(stage, self._inputs(stage))
        found = [self.cache.lookup(stage.name, s.fingerprint) for s in specs]
        todo = [s for s, e in zip(specs, found, strict=True) if e is None]
        handle = None
        if todo:
            for name in stage.models(self.cfg):
                if name not in self.models.started:
                    progress.info("loading the %s", name)
                model = self.models.acquire(name)
                for spec in todo:
                    spec.models[name] = model
            progress.info("%s: %d of %d shards to do", stage.name, len(todo), len(specs))
            width = self.dispatch.width(stage, self.cfg, self.models)
            handle = self.dispatch.submit(todo, width)
        else:
            progress.info("%s: %d/%d shards reused", stage.name, len(specs), len(specs))
        return _Pending(stage, specs, found, handle, start)

    def _finish(self, p: _Pending, pending: list[_Pending], later: Sequence[Stage]) -> None:
        pending.remove(p)
        entries = list(p.found)
        if p.handle is not None:
            done = self.dispatch.collect(
                p.handle, p.stage.name, self.cfg.runtime.task_timeout_s, p.start
            )
            by_index = {e.index: e for e in done}
            entries = [
                e if e is not None else by_index[s.index]
                for s, e in zip(p.specs, entries, strict=True)
            ]
        run = StageRun(
            p.stage,
            [e for e in entries if e is not None],
            [e is not None for e in p.found],
            0.0,
            self.cache.root,
        )
        for dataset in p.stage.outputs:
            refs = [
                ShardInfo(
                    path=str(self.cache.path(p.stage.name, e.fingerprint, f.name)),
                    rows=f.rows or 0,
                    sha256=f.sha256,
                    fingerprint=e.fingerprint,
                    stage=p.stage.name,
                    index=e.index,
                )
                for e in run.entries
                for f in e.outputs.get(dataset, [])
            ]
            if refs or dataset != "rejects":
                run.outputs[dataset] = refs
            if dataset != "rejects" and refs:
                self.datasets[dataset] = refs
        run.seconds = time.perf_counter() - p.start
        self.runs.append(run)
        still = {m for s in [*(q.stage for q in pending), *later] for m in s.models(self.cfg)}
        for name in list(self.models.started):
            if name not in still:
                progress.info("stopping the %s", name)
                self.models.release(name)


@dataclass
class _Pending:
    stage: Stage
    specs: list[JobSpec]
    found: list[Entry | None]
    handle: Any
    start: float
