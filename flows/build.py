"""The pipeline: the stages of each mode, in order, and the Prefect flow that runs them.

    ingest -> dedup -> embed passages -> generate (or pairs) -> embed queries -> query dedup
      -> write graded passages -> embed them -> semantic dedup -> mine -> assemble

Each stage is one module in tasks/ (what it reads, writes and fingerprints, and its `run`);
the executor (flows/executor.py) does the rest: resume from the stage cache, fan-out on Ray,
model workers, accounting, the run folder and its manifest. To add a stage, write its module
and put it in the lists below (README: "Add a stage").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger
from prefect_ray import RayTaskRunner

from flows import runtime
from flows.executor import Executor
from flows.manifest import finish_run, publish_artifacts
from flows.preflight import preflight
from flows.ray_executor import RayDispatch
from flows.workers import RayModels
from schemas.config import PipelineConfig
from tasks.assemble import AssembleStage
from tasks.dedup import DedupStage
from tasks.embed import EmbedStage
from tasks.generate import GenerateStage
from tasks.ingest import IngestStage
from tasks.mine import MineStage
from tasks.pairs import PairsStage
from tasks.query_dedup import QueryDedupStage
from tasks.semantic import SemanticDedupStage
from tasks.stage import Stage
from tasks.write_passages import WritePassagesStage


def stages_for(cfg: PipelineConfig) -> list[Stage]:
    """The stage list of the config's mode (a stage that is off for it skips itself)."""
    queries: Stage = PairsStage() if cfg.input.mode == "pairs" else GenerateStage()
    return [
        IngestStage(),
        DedupStage(),
        EmbedStage("passages"),
        queries,
        EmbedStage("queries"),
        QueryDedupStage(),
        WritePassagesStage(),
        EmbedStage("generated"),
        SemanticDedupStage(),
        MineStage(),
        AssembleStage(),
    ]


def overlaps(cfg: PipelineConfig, models: Any) -> bool:
    """Stages run side by side unless the LLM shares this machine's CPUs with the embedder:
    there, embedding beside vLLM's spin-waiting OpenMP threads cut generation from 330 to 33
    tokens/s on 2 cores."""
    return cfg.llm.backend == "openai" or models.device("llm") != "cpu"


@flow(name="build_dataset")
def build_dataset(cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    """Run every stage for `cfg` into `run_dir` and write manifest.json; returns the manifest."""
    started = time.time()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    get_run_logger().info("run %s -> %s", cfg.run_id, run_dir)
    models = RayModels(cfg)
    executor = Executor(
        cfg, run_dir, models, RayDispatch(cfg.runtime.cpus_per_task), cfg.output.cache_dir
    )
    executor.run(stages_for(cfg), overlap=overlaps(cfg, models))
    doc = finish_run(executor, started)
    publish_artifacts(doc, run_dir)
    get_run_logger().info("run %s complete in %.1f s", cfg.run_id, time.time() - started)
    return doc


def run_pipeline(cfg: PipelineConfig, output_dir: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Entry point for the CLI and `ray job submit`: Ray + Prefect set up, the flow run.

    Ray is started here (local, num_cpus from the machine or config) while the temporary Prefect
    server starts, and stopped at the end; or reused when already initialised (tests,
    notebooks), or joined at RAY_ADDRESS (ray job submit).
    """
    preflight(cfg, output_dir)  # a user error ends here, in seconds, before Ray or Prefect
    run_dir = Path(output_dir or cfg.output.dir) / cfg.run_id
    kwargs = runtime.ray_init_kwargs(cfg)
    address = kwargs.pop("address")
    if address != "local":  # a cluster: join it, check every node sees the output and models
        if not ray.is_initialized():
            ray.init(address=address, **kwargs)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        runtime.check_cluster(cfg, str(run_dir.resolve()))
    runner = RayTaskRunner(address=address, init_kwargs=kwargs)  # reuses an initialised Ray
    with runtime.ray_and_prefect_api(address, kwargs):
        result = build_dataset.with_options(task_runner=runner)(cfg, str(run_dir.resolve()))
    return run_dir, result


@flow(name="build_from_config")
def build_from_config(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Deployment entry point (deploy/prefect.yaml): load a YAML config, run the pipeline.

    Parameters stay JSON-friendly (a path and override strings) so a schedule or the UI can
    set them; the real work runs in the `build_dataset` subflow on Ray.
    """
    from schemas.config import load_config
    from tasks.report import build_report

    cfg = load_config(config_path, overrides or [])
    run_dir, doc = run_pipeline(cfg)
    report = build_report(run_dir)
    publish_artifacts(doc, str(run_dir.resolve()))
    get_run_logger().info("wrote %s (report %s)", run_dir, report)
    return {"run_dir": str(run_dir), "run_id": doc["run_id"], "stages": doc["stages"]}


def run_local(
    cfg: PipelineConfig,
    output_dir: str | None = None,
    stages: list[Stage] | None = None,
    **models: Any,
) -> tuple[Path, dict[str, Any]]:
    """The same stages (or `stages`) in this process, no Ray, no Prefect (unit tests, notebooks).
    `models`: objects to use instead of loading them (`embedder=`, `llm=`, `rescorer=`)."""
    from flows.models import LocalModels

    started = time.time()
    preflight(cfg, output_dir)
    run_dir = (Path(output_dir or cfg.output.dir) / cfg.run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    executor = Executor(cfg, run_dir, LocalModels(cfg, **models), None, cfg.output.cache_dir)
    executor.run(stages or stages_for(cfg))
    return run_dir, finish_run(executor, started)
