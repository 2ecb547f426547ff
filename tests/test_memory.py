"""Freed heap goes back to the OS; tasks wrapped for it behave as before; lanes bound the
tasks scheduled per model worker."""

from __future__ import annotations

import inspect

import psutil
import pytest
from prefect import allow_failure

from flows.ray_executor import Lanes
from tasks.memory import _malloc_trim, releases_heap, return_free_heap


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_is_returned_to_the_os():
    proc = psutil.Process()
    blocks = [bytearray(100_000) for _ in range(3000)]  # 300 MB below glibc's mmap threshold
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])  # touch every page
    sentinel = bytearray(100_000)  # keeps the top of the heap in use: no automatic trim
    del blocks
    before = proc.memory_info().rss
    assert return_free_heap() is True
    released = before - proc.memory_info().rss
    assert released > 150 * 2**20, released / 2**20
    del sentinel


def test_releases_heap_keeps_signature_result_and_errors():
    def stage(a: int, b: str = "x") -> str:
        """doc"""
        if a < 0:
            raise ValueError("negative")
        return b * a

    wrapped = releases_heap(stage)
    assert inspect.signature(wrapped) == inspect.signature(stage)
    assert wrapped.__doc__ == "doc" and wrapped(3, b="y") == "yyy"
    with pytest.raises(ValueError, match="negative"):
        wrapped(-1)


class _FakeTask:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple, object]] = []

    def submit(self, *args, after=None):
        self.calls.append((args, after))
        return f"future-{len(self.calls) - 1}"


@pytest.mark.parametrize("width", [1, 2, 3])
def test_lanes_make_each_task_wait_for_the_one_width_places_before(width):
    task, lanes = _FakeTask(), Lanes(width)
    futures = [lanes.submit(task, i, "shard") for i in range(7)]
    assert futures == [f"future-{i}" for i in range(7)]
    assert [args for args, _ in task.calls] == [(i, "shard") for i in range(7)]
    afters = [after for _, after in task.calls]
    assert afters[:width] == [None] * width
    # ordering only: wrapped so that a failed earlier shard does not stop this one
    assert [a.unwrap() for a in afters[width:]] == [f"future-{i}" for i in range(7 - width)]
    assert all(isinstance(a, allow_failure) for a in afters[width:])
