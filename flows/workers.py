"""Model workers on Ray: one named, long-lived actor per model and settings.

`RayModels` starts an actor the first time a stage with work to do needs it, or reuses one that
is already running under the same name (a second run, a test session); only the host that
started an actor stops it, shutting the model down inside it first (a killed vLLM actor leaves
its shared memory behind). On CPU an actor reserves no logical CPU: it is long-lived and the
stage jobs that feed it must stay schedulable on a 2-core machine. On CUDA the LLM holds most
of one GPU and leaves a share for the embedder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from flows import runtime
from flows.models import METHODS, HTTPLLMHandle, ModelHost, _load
from schemas.config import PipelineConfig
from tasks.llm.engine import engine_env
from tasks.models import cache_dir

log = logging.getLogger(__name__)
EMBED_GPU_SHARE = 0.1


@dataclass
class ActorHandle:
    """A named Ray actor holding a model (see flows/workers.py)."""

    name: str
    kind: str
    timeout_s: float
    model_name: str = ""

    def client(self) -> Any:
        return actor_client(self)


class ModelWorker:
    """The Ray actor: one model, loaded once; its method is called with the job's arguments."""

    def __init__(self, cfg: PipelineConfig, name: str, device: str, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model = _load(cfg, name, device, threads)
        self.load_seconds = time.perf_counter() - start

    def info(self) -> dict[str, Any]:
        return {"load_seconds": self.load_seconds, "pid": os.getpid()}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)

    def shutdown(self) -> None:
        shutdown = getattr(self.model, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.model = None


class _ActorClient:
    """Forwards one method to the actor and waits (bounded) for the answer."""

    def __init__(self, handle: ActorHandle, method: str):
        self.actor = ray.get_actor(handle.name, namespace=runtime.NAMESPACE)
        self.method, self.timeout_s = method, handle.timeout_s
        self.model_name = handle.model_name
        self.backend = "vllm"

    def __getattr__(self, attr: str) -> Any:
        if attr != self.method:
            raise AttributeError(attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            ref = self.actor.call.remote(self.method, *args, **kwargs)
            return ray.get(ref, timeout=self.timeout_s)

        return call


def actor_client(handle: ActorHandle) -> Any:
    return _ActorClient(handle, METHODS[handle.kind])


def _actor_name(kind: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"tripletforge-{kind}-{digest}"


class RayModels(ModelHost):
    """Models in named Ray actors (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__(cfg)
        self.created: dict[str, Any] = {}  # name -> actor this host started

    def gpus(self) -> float:
        return float(ray.cluster_resources().get("GPU", 0))

    def _options(self, name: str, device: str) -> tuple[dict[str, Any], int]:
        cpus = runtime.cluster_cpus()
        env = {"OMP_NUM_THREADS": str(cpus), "HF_HUB_OFFLINE": "1"}
        if name == "llm":
            env.update(engine_env(self.cfg.llm, str(cache_dir()), cpus if device == "cpu" else 0))
        options: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
        if device == "cuda":
            options["num_gpus"] = 1 - EMBED_GPU_SHARE if name == "llm" else EMBED_GPU_SHARE
        return options, cpus if device == "cpu" else 0

    def _start(self, name: str) -> Any:
        if name == "llm" and self.cfg.llm.backend == "openai":
            from tasks.llm.openai_http import OpenAIEngine

            OpenAIEngine(self.cfg.llm, check=True).close()  # fail early, with the server's words
            return HTTPLLMHandle(self.cfg.llm)
        device = self.device(name)
        actor_name = _actor_name(
            name, {"identity": self.identity(name), "seed": self.cfg.generation.seed}
        )
        handle = ActorHandle(
            actor_name,
            name,
            self.cfg.runtime.task_timeout_s,
            self.cfg.llm.model_name if name == "llm" else "",
        )
        with contextlib.suppress(ValueError):
            ray.get_actor(actor_name, namespace=runtime.NAMESPACE)
            return handle  # already running (another run or test in this Ray session)
        options, threads = self._options(name, device)
        actor = (
            ray.remote(ModelWorker)
            .options(
                name=actor_name,
                namespace=runtime.NAMESPACE,
                get_if_exists=True,
                max_concurrency=1,
                **options,
            )
            .remote(self.cfg, name, device, threads)
        )
        # surface load errors here, not mid-stage
        info = ray.get(actor.info.remote(), timeout=self.cfg.runtime.task_timeout_s)
        self.load_seconds[name] = info["load_seconds"]
        self.created[name] = actor
        return handle

    def _stop(self, name: str, handle: Any) -> None:
        actor = self.created.pop(name, None)
        if actor is not None:
            shutdown_actor(actor, name)


def shutdown_actor(actor: Any, name: str, timeout_s: float = 120) -> None:
    """Shut the model down inside the actor (frees vLLM's shared memory), then end the actor."""
    try:
        ray.get(actor.shutdown.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the actor is killed below whatever happened
        log.warning("worker %s did not shut down cleanly; killing it", name, exc_info=True)
    ray.kill(actor, no_restart=True)
