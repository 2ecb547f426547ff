"""Checks that end a run with one clear sentence before Ray, Prefect or any model start: every
input file and column (tasks.ingest.check_inputs), every model the stages will need is there,
and the output folder can be written and has room."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from schemas.config import PipelineConfig
from tasks.ingest import check_inputs
from tasks.models import resolve_embedding_path, resolve_llm_path
from tasks.stage import InputError

MIN_FREE_MB = 200


class OutputError(InputError):
    """The output folder cannot take the run."""


def llm_needed(cfg: PipelineConfig) -> bool:
    return cfg.input.mode == "passages" or bool(cfg.generation.negative_levels) or cfg.judge.enabled


def check_models(cfg: PipelineConfig) -> None:
    """The local models the run will load exist (with `llm.backend: openai` no local LLM is
    looked for: the server is asked when the LLM is first needed)."""
    resolve_embedding_path(cfg.embedding.model_path)
    if llm_needed(cfg) and cfg.llm.backend == "vllm":
        resolve_llm_path(cfg.llm.model_path)
    if cfg.mining.rescore_model_path and not Path(cfg.mining.rescore_model_path).exists():
        raise InputError(
            f"mining.rescore_model_path does not exist: {cfg.mining.rescore_model_path}"
        )


def check_output(folder: str | Path, min_free_mb: int = MIN_FREE_MB) -> None:
    """The folder exists or can be made, a file can be written in it, and it has room."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tripletforge-write-test-"):
            pass
    except OSError as e:
        raise OutputError(
            f"the output folder {folder} cannot be written: {e.strerror or e}"
        ) from None
    free = shutil.disk_usage(folder).free // 2**20
    if free < min_free_mb:
        raise OutputError(
            f"the output folder {folder} has {free} MB free; a run needs at least {min_free_mb} MB"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {folder} is not writable")


def preflight(cfg: PipelineConfig, output_dir: str | Path | None = None) -> None:
    check_inputs(cfg.input)
    check_models(cfg)
    check_output(output_dir or cfg.output.dir)
    if cfg.output.cache_dir:
        check_output(cfg.output.cache_dir)
