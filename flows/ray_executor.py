"""Jobs as Prefect tasks on the flow's RayTaskRunner, submitted in lanes.

Each job is one Prefect task run (named `<stage>-<shard>`), so the Prefect UI shows every shard
with its state and logs, and Ray places it on any node of the cluster.
"""

from __future__ import annotations

from typing import Any

from prefect import allow_failure, task
from prefect.cache_policies import NO_CACHE

from flows import runtime
from flows.cache import Entry
from flows.executor import JobSpec, collect_in_order, execute
from flows.models import ModelHost
from flows.workers import ActorHandle
from schemas.config import PipelineConfig
from tasks.stage import Stage

MODEL_LANES = 2


@task(name="job", cache_policy=NO_CACHE)
def run_job(spec: JobSpec, after: Any = None) -> Entry:
    """One job of a stage. `after`: unused, see `Lanes`."""
    return execute(spec)


class Lanes:
    """Submits tasks so that at most `width` of them are scheduled at a time.

    Each task gets, as its `after` argument, the future of the task `width` places before it;
    prefect-ray hands futures in arguments to Ray as object refs, and Ray gives a task a worker
    only once those exist. This matters for tasks that wait on a model worker: a task blocked in
    `ray.get` lends its CPU back to Ray, which starts another worker process (~300 MB each) for
    the next queued task. Without lanes, 25 passage shards queued on the embedder held 7 such
    processes (2.1 GB) at 100k passages (benchmarks/pipeline_scale.py).
    """

    def __init__(self, width: int):
        self.width = max(1, width)
        self._futures: list[Any] = []

    def submit(self, task: Any, *args: Any) -> Any:
        n = len(self._futures)
        # Ordering only: a failed earlier shard must not stop this one (its error is raised
        # when the flow collects the results, in order).
        after = allow_failure(self._futures[n - self.width]) if n >= self.width else None
        future = task.submit(*args, after=after)
        self._futures.append(future)
        return future


class RayDispatch:
    def width(self, stage: Stage, cfg: PipelineConfig, host: ModelHost) -> int:
        """Jobs that wait on model actors go two per actor; others as wide as the cluster."""
        actors = [h for n in stage.models(cfg) if isinstance(h := host.started.get(n), ActorHandle)]
        if actors:
            return MODEL_LANES * min(len(h.names) for h in actors)
        return max(1, int(runtime.cluster_cpus() // cfg.runtime.cpus_per_task))

    def __init__(self, cpus_per_task: float = 1.0):
        self.cpus_per_task = cpus_per_task

    def submit(self, specs: list[JobSpec], width: int) -> list[tuple[JobSpec, Any]]:
        from prefect_ray.context import remote_options

        lanes = Lanes(width)
        out = []
        with remote_options(num_cpus=self.cpus_per_task):
            for spec in specs:
                out.append(
                    (spec, lanes.submit(run_job.with_options(task_run_name=spec.label), spec))
                )
        return out

    def collect(
        self,
        pending: list[tuple[JobSpec, Any]],
        stage: str,
        timeout_s: float,
        started: float | None = None,
    ) -> list[Entry]:
        """Every result, in order; a failed job fails the run naming its stage and shard
        (Prefect does not fail a flow for a failed mapped task by itself)."""
        jobs = [(spec, lambda f=future: f.result(timeout=timeout_s)) for spec, future in pending]
        return collect_in_order(jobs, stage, started)
