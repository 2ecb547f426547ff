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
from flows.placement import Placement, plan_placement
from schemas.config import PipelineConfig
from tasks.llm.engine import engine_env
from tasks.models import cache_dir

log = logging.getLogger(__name__)
progress = logging.getLogger("tripletforge.progress")


@dataclass
class ActorHandle:
    """Named Ray actors holding one model (several for LLM engines): a job talks to engine
    `job index % len(names)`, so the shards of a stage spread over the engines."""

    names: tuple[str, ...]
    kind: str
    timeout_s: float
    model_name: str = ""

    def client(self, index: int = 0) -> Any:
        return actor_client(self, index)


def worker_threads(requested: int) -> int:
    """CPU threads for the model in this actor: what the host asked for (the cluster's CPUs),
    capped at the CPUs Ray gives the node the actor runs on and the cores this process may run
    on (a container's or taskset's limit): on a cluster the cluster's count would oversubscribe
    every node. 0 (not a CPU model) stays 0."""
    if requested <= 0:
        return requested
    affinity = getattr(os, "sched_getaffinity", None)
    limit = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    try:
        if ray.is_initialized():  # (asking outside Ray would start one)
            node_id = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node.get("NodeID") == node_id:
                    limit = min(limit, int(node.get("Resources", {}).get("CPU", limit)))
    except Exception:  # noqa: BLE001 - an older API: the process's limit stands
        pass
    return max(1, min(requested, limit))


class ModelWorker:
    """The Ray actor: one model, loaded once; its method is called with the job's arguments."""

    def __init__(self, cfg: PipelineConfig, name: str, device: str, threads: int):
        threads = worker_threads(threads)
        if threads > 0 and name != "embedder":  # every embedding backend sets its own threads
            import torch

            torch.set_num_threads(threads)
        self.threads = threads
        start = time.perf_counter()
        self.model = _load(cfg, name, device, threads)
        self.load_seconds = time.perf_counter() - start

    def info(self) -> dict[str, Any]:
        return {"load_seconds": self.load_seconds, "pid": os.getpid(), "threads": self.threads}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)

    def shutdown(self) -> None:
        shutdown = getattr(self.model, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.model = None


class _ActorClient:
    """Forwards one method to the actor and waits (bounded) for the answer."""

    def __init__(self, handle: ActorHandle, method: str, index: int):
        name = handle.names[index % len(handle.names)]
        self.actor = ray.get_actor(name, namespace=runtime.NAMESPACE)
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


def actor_client(handle: ActorHandle, index: int = 0) -> Any:
    return _ActorClient(handle, METHODS[handle.kind], index)


def _actor_name(kind: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"tripletforge-{kind}-{digest}"


class RayModels(ModelHost):
    """Models in named Ray actors, placed by `flows.placement.plan_placement` (see the module
    docstring). `worker_class` is what each actor runs (tests put a probe there)."""

    worker_class: Any = None

    def __init__(self, cfg: PipelineConfig):
        super().__init__(cfg)
        self.created: dict[str, list[Any]] = {}  # name -> actors this host started
        self.loading: dict[str, tuple[ActorHandle, list[Any]]] = {}  # prefetched, not yet used
        self._placement: Placement | None = None

    def gpus(self) -> float:
        return float(ray.cluster_resources().get("GPU", 0))

    def placement(self) -> Placement:
        if self._placement is None:
            small = 1 + (1 if self.cfg.mining.rescore_model_path else 0)
            self._placement = plan_placement(self.cfg, int(self.gpus()), small)
        return self._placement

    def device(self, name: str) -> str:
        device = super().device(name)
        if name != "llm" and device == "cuda" and self.placement().small_model_gpus == 0:
            return "cpu"  # every GPU holds the LLM (see flows/placement.py)
        return device

    def _options(self, name: str, device: str, num_gpus: float) -> tuple[dict[str, Any], int]:
        cpus = runtime.cluster_cpus()
        env = {"OMP_NUM_THREADS": str(cpus), "HF_HUB_OFFLINE": "1"}
        if name == "llm":
            env.update(engine_env(self.cfg.llm, str(cache_dir()), cpus if device == "cpu" else 0))
        restarts = self.cfg.runtime.model_restarts
        options: dict[str, Any] = {
            "num_cpus": 0,
            "runtime_env": {"env_vars": env},
            # a worker that dies is started again (the model reloaded) and its call retried
            "max_restarts": restarts,
            "max_task_retries": restarts,
        }
        if device == "cuda" and num_gpus:
            options["num_gpus"] = num_gpus
        return options, cpus if device == "cpu" else 0

    def _prefetch(self, name: str) -> None:
        if name == "llm" and self.cfg.llm.backend == "openai":
            return  # nothing to load
        if name == "embedder":
            self.identity(name)  # resolves `auto` before the worker loads
        progress.info("loading the %s in the background", name)
        self.loading[name] = self._launch(name)

    def close(self) -> None:
        super().close()
        for name, (_, actors) in list(self.loading.items()):  # prefetched, never used
            for actor in actors:
                shutdown_actor(actor, name)
        self.loading.clear()

    def _start(self, name: str) -> Any:
        if name == "llm" and self.cfg.llm.backend == "openai":
            from tasks.llm.openai_http import OpenAIEngine

            OpenAIEngine(self.cfg.llm, check=True).close()  # fail early, with the server's words
            return HTTPLLMHandle(self.cfg.llm)
        handle, pending = self.loading.pop(name, None) or self._launch(name)
        # surface load errors here, not mid-stage; engines load side by side
        infos = ray.get([a.info.remote() for a in pending], timeout=self.cfg.runtime.task_timeout_s)
        if infos:
            self.load_seconds[name] = max(i["load_seconds"] for i in infos)
        self.created.setdefault(name, []).extend(pending)
        return handle

    def _launch(self, name: str) -> tuple[ActorHandle, list[Any]]:
        """Create the model's actors (their constructors load the model in the background)."""
        device = self.device(name)
        plan = self.placement()
        if name == "llm":
            shares = [slot.num_gpus for slot in plan.engines]
        else:
            shares = [plan.small_model_gpus]
        base = _actor_name(
            name, {"identity": self.identity(name), "seed": self.cfg.generation.seed}
        )
        names = tuple(base if len(shares) == 1 else f"{base}-{i}" for i in range(len(shares)))
        model_name = self.cfg.llm.model_name if name == "llm" else ""
        handle = ActorHandle(names, name, self.cfg.runtime.task_timeout_s, model_name)
        pending = []
        for actor_name, share in zip(names, shares, strict=True):
            with contextlib.suppress(ValueError):
                ray.get_actor(actor_name, namespace=runtime.NAMESPACE)
                continue  # already running (another run or test in this Ray session)
            options, threads = self._options(name, device, share)
            actor = (
                ray.remote(self.worker_class or ModelWorker)
                .options(
                    name=actor_name,
                    namespace=runtime.NAMESPACE,
                    get_if_exists=True,
                    max_concurrency=1,
                    **options,
                )
                .remote(self.cfg, name, device, threads)
            )
            pending.append(actor)
        return handle, pending

    def _stop(self, name: str, handle: Any) -> None:
        for actor in self.created.pop(name, []):
            shutdown_actor(actor, name)


def shutdown_actor(actor: Any, name: str, timeout_s: float = 120) -> None:
    """Shut the model down inside the actor (frees vLLM's shared memory), then end the actor."""
    try:
        ray.get(actor.shutdown.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the actor is killed below whatever happened
        log.warning("worker %s did not shut down cleanly; killing it", name, exc_info=True)
    ray.kill(actor, no_restart=True)
