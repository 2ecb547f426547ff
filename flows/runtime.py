"""Ray and Prefect plumbing: where the run executes, and the long-lived model workers.

Model workers are *named* Ray actors (one per model and settings). `get_or_create_*` returns the
running one if it exists, so an engine is loaded once per Ray session and reused by every shard,
every flow run and every test in a session; only the code that created a worker shuts it down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from schemas.config import PipelineConfig
from tasks.embed import Embedder, resolve_precision
from tasks.generate import (
    Completion,
    SamplingSettings,
    VLLMEngine,
    engine_env,
    resolve_llm_dtype,
)
from tasks.memory import return_free_heap
from tasks.models import cache_dir, resolve_embedding_path, resolve_llm_path

log = logging.getLogger(__name__)
NAMESPACE = "tripletforge"
EMBED_GPU_SHARE = 0.1


class ResourceError(RuntimeError):
    """The config asks for hardware the Ray cluster does not have."""


def worker_env(cpus: int) -> dict[str, str]:
    """Keep every library in a Ray worker to the cores Ray gave the job (no oversubscription)."""
    return {
        "POLARS_MAX_THREADS": str(cpus),
        "OMP_NUM_THREADS": str(cpus),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "1",
        "TRIPLETFORGE_CACHE": str(cache_dir()),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }


def ray_init_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """Arguments for ray.init: a local instance unless an address is configured or in RAY_ADDRESS.

    Inside `ray job submit` (RAY_ADDRESS set) num_cpus/object store must not be passed.
    """
    address = cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    cpus = cfg.runtime.num_cpus or os.cpu_count() or 1
    kwargs: dict[str, Any] = {
        "namespace": NAMESPACE,
        "runtime_env": {"env_vars": worker_env(cpus)},
        "log_to_driver": cfg.runtime.worker_logs,
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=cfg.runtime.object_store_mb * 1024 * 1024,
        )
    return kwargs


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def pick_device(requested: str) -> str:
    """'cuda' only if the Ray cluster has a GPU: asking Ray for a missing GPU hangs forever."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "cuda" and gpus < 1:
        raise ResourceError("device 'cuda' was requested but the Ray cluster has no GPU")
    if requested == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    return requested


def _actor_name(kind: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"tripletforge-{kind}-{digest}"


class LLMWorker:
    """Ray actor holding one vLLM engine."""

    def __init__(self, model_path: str, model_name: str, llm_cfg: dict[str, Any], seed: int):
        from schemas.config import LLMConfig

        self.engine = VLLMEngine(model_path, model_name, LLMConfig(**llm_cfg), seed=seed)

    def info(self) -> dict[str, Any]:
        return {"load_seconds": self.engine.load_seconds, "pid": os.getpid()}

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
        retry: bool = False,
    ) -> list[Completion]:
        return self.engine.chat_json(conversations, schema, sampling, seeds, retry)

    def shutdown(self) -> None:
        self.engine.shutdown()


class EmbedWorker:
    """Ray actor holding one embedding model."""

    def __init__(self, model_path: str, model_name: str, device: str, threads: int, precision: str):
        self.embedder = Embedder(model_path, model_name, device, threads, precision)

    def info(self) -> dict[str, Any]:
        return {"load_seconds": self.embedder.load_seconds, "dim": self.embedder.dim}

    def encode(
        self, texts: list[str], batch_size: int, prefix: str, pad_to_multiple_of: int | None
    ) -> np.ndarray:
        return self.embedder.encode(texts, batch_size, prefix, pad_to_multiple_of)

    def shutdown(self) -> None:
        self.embedder = None  # type: ignore[assignment]


class RescoreWorker:
    """Ray actor holding one sentence-transformers CrossEncoder (the mining rescoring hook)."""

    def __init__(self, model_path: str, device: str, threads: int):
        import time

        import torch
        from sentence_transformers import CrossEncoder

        if threads > 0:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model = CrossEncoder(model_path, device=device, local_files_only=True)
        self.load_seconds = time.perf_counter() - start

    def info(self) -> dict[str, Any]:
        return {"load_seconds": self.load_seconds}

    def predict(self, queries: list[str], passages: list[str], batch_size: int) -> np.ndarray:
        if not queries:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict(
            list(zip(queries, passages, strict=True)),
            batch_size=batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return_free_heap()  # a long-lived worker: see tasks/memory.py
        return np.asarray(scores, dtype=np.float32).reshape(len(queries), -1)[:, 0]

    def shutdown(self) -> None:
        self.model = None


@dataclass
class WorkerHandle:
    name: str
    actor: Any
    created: bool  # True when this call started it (and so must shut it down)
    model_name: str
    model_path: str
    device: str
    precision: str | None = None


def _get_or_create(
    cls: type,
    name: str,
    options: dict[str, Any],
    args: tuple[Any, ...],
    timeout_s: float,
    start: bool,
) -> tuple[Any, bool]:
    """(actor or None, created). With start=False a missing worker is not started."""
    with contextlib.suppress(ValueError):
        return ray.get_actor(name, namespace=NAMESPACE), False
    if not start:
        return None, False
    actor = (
        ray.remote(cls)
        .options(name=name, namespace=NAMESPACE, get_if_exists=True, max_concurrency=1, **options)
        .remote(*args)
    )
    ray.get(actor.info.remote(), timeout=timeout_s)  # surface load errors here, not mid-stage
    return actor, True


def llm_settings(cfg: PipelineConfig) -> tuple[str, str]:
    """(device, dtype) the in-process LLM runs with, `auto` resolved from this node's hardware
    (on a cluster whose nodes differ, set llm.dtype explicitly)."""
    device = pick_device(cfg.llm.device)
    return device, resolve_llm_dtype(cfg.llm.dtype, device)


def llm_worker(cfg: PipelineConfig, start: bool = True) -> WorkerHandle:
    device, dtype = llm_settings(cfg)
    path = str(resolve_llm_path(cfg.llm.model_path))
    llm = cfg.llm.model_dump(mode="json")
    llm.update(device=device, dtype=dtype)
    name = _actor_name("llm", {"path": path, "llm": llm, "seed": cfg.generation.seed})
    cpus = cluster_cpus()
    env = engine_env(cfg.llm, str(cache_dir()), cpus if device == "cpu" else 0)
    env["OMP_NUM_THREADS"] = str(cpus)
    # On CPU the actor reserves no logical CPU: it is long-lived and the stage tasks that feed
    # it must still be schedulable on a 2-core machine. On CUDA it holds most of one GPU and
    # leaves a share for the embedder (vLLM's gpu_memory_utilization leaves it the memory).
    options: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    if device == "cuda":
        options["num_gpus"] = 1 - EMBED_GPU_SHARE
    actor, created = _get_or_create(
        LLMWorker,
        name,
        options,
        (path, cfg.llm.model_name, llm, cfg.generation.seed),
        cfg.runtime.task_timeout_s,
        start,
    )
    return WorkerHandle(name, actor, created, cfg.llm.model_name, path, device, dtype)


def _small_model_options(device: str) -> tuple[dict[str, Any], int]:
    """Actor options and torch threads for a small model worker (embedder, cross-encoder): on
    CPU no logical CPU reserved (it is long-lived), on CUDA a share of the GPU."""
    cpus = cluster_cpus()
    options: dict[str, Any] = {
        "num_cpus": 0,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cpus), "HF_HUB_OFFLINE": "1"}},
    }
    if device == "cuda":
        options["num_gpus"] = EMBED_GPU_SHARE
    return options, cpus if device == "cpu" else 0


def embedding_settings(cfg: PipelineConfig) -> tuple[str, str]:
    """(device, precision) the embedder runs with, `auto` resolved once, in the driver, so that
    every embedding shard's fingerprint and the worker agree."""
    device = pick_device(cfg.embedding.device)
    return device, resolve_precision(cfg.embedding.precision, device)


def embed_worker(cfg: PipelineConfig, start: bool = True) -> WorkerHandle:
    device, precision = embedding_settings(cfg)
    path = str(resolve_embedding_path(cfg.embedding.model_path))
    name = _actor_name("embed", {"path": path, "device": device, "precision": precision})
    options, threads = _small_model_options(device)
    actor, created = _get_or_create(
        EmbedWorker,
        name,
        options,
        (path, cfg.embedding.model_name, device, threads, precision),
        cfg.runtime.task_timeout_s,
        start,
    )
    return WorkerHandle(name, actor, created, cfg.embedding.model_name, path, device, precision)


def rescore_worker(cfg: PipelineConfig, start: bool = True) -> WorkerHandle:
    """The cross-encoder of `mining.rescore_model_path`, loaded once for every mine shard."""
    path = cfg.mining.rescore_model_path
    if path is None:
        raise ValueError("mining.rescore_model_path is not set")
    device = pick_device(cfg.embedding.device)
    name = _actor_name("rescore", {"path": path, "device": device})
    options, threads = _small_model_options(device)
    actor, created = _get_or_create(
        RescoreWorker, name, options, (path, device, threads), cfg.runtime.task_timeout_s, start
    )
    return WorkerHandle(name, actor, created, os.path.basename(path.rstrip("/")), path, device)


def shutdown_worker(handle: WorkerHandle, timeout_s: float = 120) -> None:
    """Shut the model down inside the actor (frees vLLM's shared memory), then end the actor."""
    try:
        ray.get(handle.actor.shutdown.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the actor is killed below whatever happened
        log.warning("worker %s did not shut down cleanly; killing it", handle.name, exc_info=True)
    ray.kill(handle.actor, no_restart=True)


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Use the configured Prefect API, else one temporary server for the whole run.

    Without this every Ray worker would start its own ephemeral Prefect server (~8 s each).
    The server is left for Prefect to stop at interpreter exit: stopping it here hung ~70 s.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url
