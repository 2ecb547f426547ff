"""Where the models go on a cluster: how many LLM engines, which GPUs each one gets, what the
small models (embedder, cross-encoder) take, and what has to wait. One function decides it,
from the config and the GPUs Ray sees, so it can be tested without a GPU (Ray lets a node
declare GPUs it does not have).

- On CPU: one engine, using every core of its node (two engines on the same cores only slow
  each other down); the small models share the machine and run in turn with it.
- On CUDA, `llm.tensor_parallel_size` 1: `runtime.llm_engines_per_gpu` engines on every GPU
  (small models fit several to a GPU), each asking Ray for an equal share of what the small
  models leave; the small models take `SMALL_MODEL_GPU_SHARE` of GPU 0 each.
- On CUDA with tensor parallelism t: each engine holds t whole GPUs; the small models take a
  share of a GPU left over, else they run on CPU (every GPU holds the LLM).
- `runtime.llm_engines` caps the engines; asking for GPUs the cluster does not have fails at
  once with a clear message (Ray itself would wait forever for them).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.config import PipelineConfig
from tasks.stage import InputError

SMALL_MODEL_GPU_SHARE = 0.1


class ResourceError(InputError):
    """The config asks for hardware the cluster does not have."""


@dataclass(frozen=True)
class EngineSlot:
    index: int
    num_gpus: float  # what the engine's actor asks Ray for
    gpus: tuple[int, ...]  # the GPUs it lands on (Ray packs fractional requests in this order)


@dataclass(frozen=True)
class Placement:
    device: str  # cpu | cuda
    engines: tuple[EngineSlot, ...]
    small_model_gpus: float  # what the embedder and the cross-encoder each ask for
    tensor_parallel_size: int
    notes: tuple[str, ...] = ()  # what was capped, what waits

    @property
    def engine_count(self) -> int:
        return len(self.engines)


def plan_placement(cfg: PipelineConfig, gpus: int, small_models: int = 1) -> Placement:
    """The placement for `gpus` GPUs in the cluster and `small_models` GPU models besides the
    LLM (the embedder, and the cross-encoder when rescoring is on)."""
    requested = cfg.llm.device
    t = cfg.llm.tensor_parallel_size
    cap = cfg.runtime.llm_engines
    if requested == "cuda" and gpus < 1:
        raise ResourceError(
            "llm.device cuda was asked for but the Ray cluster has no GPU (ray status shows what "
            "it has); use device auto or cpu, or start the nodes with their GPUs"
        )
    if requested == "cpu" or gpus < 1:
        notes = ("cpu: one engine on every core; the embedder runs between the LLM's stages",)
        return Placement("cpu", (EngineSlot(0, 0.0, ()),), 0.0, 1, notes)
    if t > gpus:
        raise ResourceError(
            f"llm.tensor_parallel_size {t} needs {t} GPUs for one engine; the cluster has {gpus}"
        )
    notes: list[str] = []
    small = SMALL_MODEL_GPU_SHARE * small_models
    if t == 1:
        per_gpu = cfg.runtime.llm_engines_per_gpu
        share = round((1.0 - small) / per_gpu, 6)
        slots = [
            EngineSlot(g * per_gpu + k, share, (g,)) for g in range(gpus) for k in range(per_gpu)
        ]
        small_gpus = SMALL_MODEL_GPU_SHARE
    else:
        engines = gpus // t
        slots = [EngineSlot(i, float(t), tuple(range(i * t, (i + 1) * t))) for i in range(engines)]
        spare = gpus - engines * t
        small_gpus = SMALL_MODEL_GPU_SHARE if spare else 0.0
        if small_models and not spare:
            notes.append("every GPU holds the LLM: the embedder runs on CPU")
    if cap is not None and cap < len(slots):
        notes.append(f"runtime.llm_engines caps {len(slots)} engines at {cap}")
        slots = slots[:cap]
    return Placement("cuda", tuple(slots), small_gpus, t, tuple(notes))
