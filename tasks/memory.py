"""Give freed heap memory back to the operating system.

glibc keeps memory that a process frees for its own later use. A long-lived worker that
allocates differently sized buffers call after call (an embedder's activations: every batch has
its own sequence length) therefore only grows: MiniLM's worker went from 0.7 to 2.2 GB over
100k passages, although it never held more than one batch. `malloc_trim` hands the free pages
back (30 ms after a 3,000-passage call, 1.18 -> 0.87 GB). Called once per model call or per
corpus-wide task, never per batch: trimming on every free (MALLOC_TRIM_THRESHOLD_=0) made
embedding 45% slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (macOS, musl, Windows). The C library already loaded in
    the process first (CDLL(None)); find_library needs ldconfig, which slim images lack."""
    for name in (None, ctypes.util.find_library("c")):
        try:
            trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        except (OSError, TypeError):
            continue
        if trim is not None:
            return trim
    return None


def return_free_heap() -> bool:
    """Release free heap pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def releases_heap(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: `return_free_heap()` once `fn` has returned (its locals are gone by then), for
    tasks that hold a whole corpus in a worker process that Ray keeps for the next task."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            return_free_heap()

    return wrapper
