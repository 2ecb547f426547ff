"""GPU fan-out planned and checked without a GPU: the placement function on its own, then real
Ray clusters that declare GPUs they do not have, where each engine's actor reports the
CUDA_VISIBLE_DEVICES Ray gave it (a probe stands in for the model)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import pytest

from flows.placement import ResourceError, plan_placement
from schemas.config import PipelineConfig
from tests.helpers import ROOT, SAMPLE


def cfg(**sections) -> PipelineConfig:
    raw = {"input": {"paths": [str(SAMPLE)]}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return PipelineConfig.model_validate(raw)


def test_cpu_gets_one_engine_and_no_gpu_asks():
    plan = plan_placement(cfg(), gpus=0)
    assert plan.device == "cpu" and plan.engine_count == 1 and plan.engines[0].num_gpus == 0


def test_engines_per_gpu_share_what_the_small_models_leave():
    plan = plan_placement(cfg(runtime={"llm_engines_per_gpu": 2}), gpus=4)
    assert plan.engine_count == 8
    assert {e.num_gpus for e in plan.engines} == {0.45} and plan.small_model_gpus == 0.1
    assert collections.Counter(e.gpus[0] for e in plan.engines) == {0: 2, 1: 2, 2: 2, 3: 2}
    capped = plan_placement(cfg(runtime={"llm_engines": 3}), gpus=4)
    assert capped.engine_count == 3 and "caps" in capped.notes[0]


def test_tensor_parallel_engines_hold_whole_gpus():
    plan = plan_placement(cfg(llm={"tensor_parallel_size": 2}), gpus=4)
    assert [e.gpus for e in plan.engines] == [(0, 1), (2, 3)]
    assert {e.num_gpus for e in plan.engines} == {2.0}
    assert plan.small_model_gpus == 0 and "embedder runs on CPU" in plan.notes[0]
    spare = plan_placement(cfg(llm={"tensor_parallel_size": 2}), gpus=5)
    assert spare.engine_count == 2 and spare.small_model_gpus == 0.1


def test_asking_for_gpus_that_are_not_there_fails_at_once():
    with pytest.raises(ResourceError, match="tensor_parallel_size 4 needs 4 GPUs.*has 2"):
        plan_placement(cfg(llm={"tensor_parallel_size": 4}), gpus=2)
    with pytest.raises(ResourceError, match="cuda was asked for but the Ray cluster has no GPU"):
        plan_placement(cfg(llm={"device": "cuda"}), gpus=0)


PROBE = r"""
import json, os, sys
import ray
sys.path.insert(0, {root!r})
from flows.workers import RayModels
from schemas.config import PipelineConfig

class Probe:
    def __init__(self, cfg, name, device, threads):
        self.env = os.environ.get("CUDA_VISIBLE_DEVICES"), device, ray.get_gpu_ids()
    def info(self):
        return {{"load_seconds": 0.0, "cuda": self.env[0], "device": self.env[1],
                 "gpu_ids": [str(g) for g in self.env[2]]}}
    def shutdown(self):
        pass

# "local": never join another Ray on this machine (a test cluster, a `ray start`)
ray.init(address="local", num_cpus=4, num_gpus={gpus}, include_dashboard=False,
         namespace="tripletforge")
cfg = PipelineConfig.model_validate({cfg})
host = RayModels(cfg)
host.worker_class = Probe
out = {{}}
for name in ("embedder", "llm"):
    handle = host.acquire(name)
    actors = [ray.get_actor(n, namespace="tripletforge") for n in handle.names]
    out[name] = ray.get([a.info.remote() for a in actors])
print("PLACED " + json.dumps(out))
host.close()
"""


def place(gpus: int, **sections) -> dict:
    raw = {
        "input": {"paths": [str(SAMPLE)]},
        "llm": {"device": "cuda"},
        "embedding": {"device": "cuda"},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    script = PROBE.format(root=str(ROOT), gpus=gpus, cfg=repr(raw))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("PLACED ")]
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(line[0][len("PLACED ") :])


@pytest.mark.slow
def test_ray_gives_each_engine_the_gpus_the_plan_says():
    placed = place(4, runtime={"llm_engines_per_gpu": 2})
    engines = placed["llm"]
    assert len(engines) == 8 and {e["device"] for e in engines} == {"cuda"}
    # every declared GPU holds two engines, and each engine sees exactly its GPU
    assert collections.Counter(e["cuda"] for e in engines) == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert all(e["cuda"] == ",".join(e["gpu_ids"]) for e in engines)
    (embedder,) = placed["embedder"]
    assert embedder["cuda"] in {"0", "1", "2", "3"} and embedder["device"] == "cuda"


@pytest.mark.slow
def test_tensor_parallel_engines_see_their_gpus_and_the_embedder_falls_back_to_cpu():
    placed = place(4, llm={"tensor_parallel_size": 2})
    engines = placed["llm"]
    assert sorted(len(e["cuda"].split(",")) for e in engines) == [2, 2]
    assert sorted(g for e in engines for g in e["cuda"].split(",")) == ["0", "1", "2", "3"]
    assert placed["embedder"][0]["device"] == "cpu" and not placed["embedder"][0]["gpu_ids"]


@pytest.mark.slow
def test_a_run_asking_for_a_gpu_on_a_cpu_cluster_fails_at_once(tmp_path, ray_session, prefect_api):
    from flows.build import run_pipeline
    from tests.conftest import tiny_config
    from tests.helpers import sample_rows, write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(4))
    config = tiny_config(tmp_path, corpus, llm={"device": "cuda"})
    start = time.perf_counter()
    with pytest.raises(ResourceError, match="no GPU"):
        run_pipeline(config)
    assert time.perf_counter() - start < 60  # never waits for a GPU that will not come


PREFETCH = r"""
import json, sys, time
import ray
sys.path.insert(0, {root!r})
from flows.workers import RayModels
from schemas.config import PipelineConfig

class SlowProbe:
    def __init__(self, cfg, name, device, threads):
        self.began = time.time()
        time.sleep(3)  # a model loading
        self.loaded = time.time()
    def info(self):
        return {{"load_seconds": self.loaded - self.began, "began": self.began,
                 "loaded": self.loaded}}
    def shutdown(self):
        pass

ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="tripletforge")
cfg = PipelineConfig.model_validate({cfg})
host = RayModels(cfg)
host.worker_class = SlowProbe
host.prefetch("llm")  # returns at once: the LLM loads while the embedder is acquired
asked = time.time()
handle = host.acquire("embedder")
embedder = ray.get(ray.get_actor(handle.names[0], namespace="tripletforge").info.remote())
llm_handle = host.acquire("llm")
llm = ray.get(ray.get_actor(llm_handle.names[0], namespace="tripletforge").info.remote())
host.release("llm")
host.prefetch("llm")  # asked ahead again but never used: close() must stop it
names = host.loading["llm"][0].names
host.close()
left = []
for n in names:
    try:
        ray.get_actor(n, namespace="tripletforge")
        left.append(n)
    except ValueError:
        pass
print("PREFETCH " + json.dumps({{"embedder": embedder, "llm": llm, "asked": asked,
                                "left": left}}))
"""


@pytest.mark.slow
def test_a_prefetched_model_loads_while_another_one_does_and_is_stopped_if_unused():
    raw = {"input": {"paths": [str(SAMPLE)]}}
    script = PREFETCH.format(root=str(ROOT), cfg=repr(raw))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("PREFETCH ")]
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(line[0][len("PREFETCH ") :])
    llm, embedder = out["llm"], out["embedder"]
    assert llm["began"] < embedder["loaded"]  # the two loads overlapped
    assert out["left"] == []  # the unused prefetched worker was stopped
