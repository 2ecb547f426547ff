"""Shared fixtures. Heavy things (Ray, a Prefect API, the vLLM engine) start once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SAMPLE, sample_rows, write_jsonl

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session (the flow's RayTaskRunner reuses it)."""
    import ray

    from flows.runtime import ray_init_kwargs
    from schemas.config import PipelineConfig

    cfg = PipelineConfig.model_validate({"input": {"paths": [str(SAMPLE)]}})
    kwargs = ray_init_kwargs(cfg)  # address "local": never a cluster another test left behind
    kwargs["num_cpus"] = 2
    ray.init(**kwargs)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(tmp_path: Path, corpus: Path, **sections) -> PipelineConfig:  # noqa: F821
    from schemas.config import PipelineConfig

    raw = {
        "name": "test",
        "input": {"paths": [str(corpus)], "title_column": "title", "min_chars": 20},
        "generation": {"styles": {"question": 1}},
        "mining": {"num_negatives": 3, "max_rank": 10},
        "output": {"dir": str(tmp_path / "runs"), "shard_size": 8},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return PipelineConfig.model_validate(raw)


def pairs_mode_config(
    tmp_path: Path, pairs: list[dict], corpus: list[dict], **sections
) -> PipelineConfig:  # noqa: F821
    """`tiny_config` for a pairs-mode run: the pairs and the extra corpus written as JSONL under
    tmp_path; `input=` adds to the pairs-mode input section."""
    given = sections.pop("input", {})
    return tiny_config(
        tmp_path,
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        input={
            "mode": "pairs",
            "title_column": None,
            "corpus_paths": [str(write_jsonl(tmp_path / "corpus.jsonl", corpus))],
            **given,
        },
        **sections,
    )


@pytest.fixture(scope="session")
def model_workers(ray_session, tmp_path_factory):
    """The vLLM engine and the embedder, loaded once and shared by every test that needs them:
    runs find the named actors and reuse them (and leave them running)."""
    from flows.workers import RayModels

    corpus = write_jsonl(tmp_path_factory.mktemp("w") / "c.jsonl", sample_rows(3))
    cfg = tiny_config(tmp_path_factory.mktemp("w"), corpus)
    with RayModels(cfg) as host:
        yield host.acquire("llm"), host.acquire("embedder")
