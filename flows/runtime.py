"""Ray and Prefect plumbing: where a run executes (a local Ray, or the cluster at RAY_ADDRESS),
what every Ray worker's environment holds, and one Prefect API for the whole run."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from schemas.config import PipelineConfig
from tasks.models import cache_dir

log = logging.getLogger(__name__)
NAMESPACE = "tripletforge"


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
            # a new local Ray, even when a `ray start` cluster left its address behind
            # (/tmp/ray/ray_current_cluster), which a bare ray.init() would join
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=cfg.runtime.object_store_mb * 1024 * 1024,
        )
    return kwargs


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def prefect_api(while_starting: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Use the configured Prefect API, else one temporary server for the whole run.

    Without this every Ray worker would start its own ephemeral Prefect server (~8 s each).
    `while_starting` (starting local Ray) runs in this thread while the server starts in
    another: the two took ~15 s and ~25 s one after the other on 2 cores.
    The server is left for Prefect to stop at interpreter exit: stopping it here hung ~70 s.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        if while_starting is not None:
            while_starting()
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    with ThreadPoolExecutor(1, thread_name_prefix="prefect-server") as pool:
        started = pool.submit(server.start, timeout=120)
        if while_starting is not None:
            while_starting()
        started.result()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


@contextlib.contextmanager
def ray_and_prefect_api(address: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """A local Ray (unless Ray is initialised, or `address` is a cluster's) started while the
    run's Prefect API starts; the Ray started here is stopped at the end."""
    owns = address == "local" and not ray.is_initialized()
    start = functools.partial(ray.init, address=address, **kwargs) if owns else None
    try:
        with prefect_api(while_starting=start):
            yield
    finally:
        if owns and ray.is_initialized():
            ray.shutdown()


def check_cluster(cfg: PipelineConfig, output_dir: str) -> int:
    """On a Ray cluster (Ray initialised here): every alive node must see the output folder (a
    file with a random token the driver writes there) and have the models the run loads, or
    the run fails now, naming the node. Returns the number of nodes checked."""
    import secrets
    from pathlib import Path

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from flows.preflight import OutputError, llm_needed
    from tasks.models import ModelNotAvailable

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    token = secrets.token_hex(8)
    marker = Path(output_dir) / f".tripletforge-shared-{token}"
    marker.write_text(token)
    wants_llm = llm_needed(cfg) and cfg.llm.backend == "vllm"

    def probe(path: str, token: str) -> dict[str, Any]:
        from tasks.models import resolve_embedding_path, resolve_llm_path

        seen = Path(path).read_text() if Path(path).exists() else None
        problems = []
        try:
            resolve_embedding_path(cfg.embedding.model_path)
            if wants_llm:
                resolve_llm_path(cfg.llm.model_path)
        except ModelNotAvailable as e:
            problems.append(str(e))
        return {"shared": seen == token, "models": problems}

    remote = ray.remote(num_cpus=0)(probe)
    try:
        refs = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), token)
            for n in nodes
        }
        results = {node: ray.get(ref, timeout=120) for node, ref in refs.items()}
    finally:
        marker.unlink(missing_ok=True)
    for node, result in results.items():
        if not result["shared"]:
            raise OutputError(
                f"the output folder {output_dir} is not visible from Ray node {node}: every node "
                "must reach the output path (a shared file system, e.g. NFS), or set --output to "
                "one that is"
            )
        if result["models"]:
            raise ModelNotAvailable(f"on Ray node {node}: {result['models'][0]}")
    return len(results)
