"""Lanes bound how many shard tasks wait on one model worker at a time, with the real Prefect
RayTaskRunner on the session's Ray (2 CPUs).

A task blocked in `ray.get` lends its CPU back to Ray, which then starts the next queued task
in another worker process; that is what filled the machine with blocked embed tasks at 100k
passages. The model here is an actor that takes 0.4 s per call, one call at a time.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray
from prefect import flow, task
from prefect_ray import RayTaskRunner

from flows.ray_executor import Lanes

pytestmark = pytest.mark.slow
SHARDS = 8


class Model:
    """One call at a time, like the embedder and LLM workers."""

    def work(self) -> None:
        time.sleep(0.4)


class Gauge:
    """How many shard tasks are inside their body at once, and the most ever."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1

    def peak(self) -> int:
        return self.most


@task
def shard_task(index: int, model: Any, gauge: Any, after: Any = None) -> int:
    ray.get(gauge.enter.remote())
    ray.get(model.work.remote())  # blocked here, the task's CPU goes back to Ray
    ray.get(gauge.leave.remote())
    return index


@flow(task_runner=RayTaskRunner())
def fan_out(width: int | None) -> tuple[list[int], int]:
    model = ray.remote(Model).options(num_cpus=0).remote()
    gauge = ray.remote(Gauge).options(num_cpus=0).remote()
    if width is None:
        futures = [shard_task.submit(i, model, gauge) for i in range(SHARDS)]
    else:
        lanes = Lanes(width)
        futures = [lanes.submit(shard_task, i, model, gauge) for i in range(SHARDS)]
    results = [f.result(timeout=120) for f in futures]
    return results, ray.get(gauge.peak.remote())


def test_lanes_bound_the_tasks_waiting_on_a_model(ray_session, prefect_api):
    results, most = fan_out(2)
    assert results == list(range(SHARDS))  # every shard, in order
    assert most <= 2


def test_without_lanes_ray_starts_more_tasks_than_cpus(ray_session, prefect_api):
    """The problem lanes solve, shown on the same setup (2 CPUs)."""
    results, most = fan_out(None)
    assert results == list(range(SHARDS))
    assert most > 2
