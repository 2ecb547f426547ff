"""Model workers: what a stage's job asks for by name (`llm`, `embedder`, `rescorer`), where it
runs, when it starts and stops, and its identity in fingerprints.

- `identity(cfg, name)`: what decides the model's outputs: a hash of its weights (not its path),
  the precision `auto` resolves to on this hardware, the settings that change what it writes;
  for the embedder also its backend (`auto` resolved: tasks/embed_backends.py) and quantization.
- A *host* starts a model the first time a stage with work to do needs it and stops it when
  the last stage that declares it is done (`acquire` / `release`, and `close` at the end).
  `RayModels` keeps each model in a named Ray actor, loaded once per Ray session; `LocalModels`
  keeps it in this process (unit tests, notebooks) or uses objects handed to it.
- A *handle* is what travels to a job: picklable, it becomes a client inside the job (Ray
  actors' handles are in flows/workers.py). Clients
  count their calls, so a run can show (and a test assert) how much model work it did.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from schemas.config import LLM_TRANSPORT_FIELDS, PipelineConfig
from tasks.embed_backends import encoder_identity, resolve_choice
from tasks.llm.engine import resolve_llm_dtype
from tasks.models import resolve_embedding_path, resolve_llm_path, weights_digest
from tasks.prompts import prompt_versions

log = logging.getLogger(__name__)
MODEL_NAMES = ("llm", "embedder", "rescorer")


# --- identity -----------------------------------------------------------------------------------


def llm_settings(cfg: PipelineConfig, device: str) -> dict[str, Any]:
    """The LLM settings that decide what it writes (not where it is reached), `auto` resolved."""
    llm = cfg.llm.model_dump(mode="json", exclude=LLM_TRANSPORT_FIELDS)
    if cfg.llm.backend == "vllm":
        llm.update(device=device, dtype=resolve_llm_dtype(cfg.llm.dtype, device))
    return llm


def identity(cfg: PipelineConfig, name: str, device: str) -> dict[str, Any]:
    """Model `name` as fingerprints see it (`device`: where it runs, resolved)."""
    if name == "llm":
        ident: dict[str, Any] = {
            "settings": llm_settings(cfg, device),
            "prompts": prompt_versions(),
        }
        if cfg.llm.backend == "vllm":  # over HTTP the server decides; only its model name counts
            ident["weights"] = weights_digest(resolve_llm_path(cfg.llm.model_path))
        return ident
    if name == "embedder":
        return encoder_identity(cfg.embedding, device)
    if name == "rescorer":
        return {"weights": weights_digest(cfg.mining.rescore_model_path or ""), "device": device}
    raise KeyError(f"unknown model {name!r}; known: {MODEL_NAMES}")


def requested_device(cfg: PipelineConfig, name: str) -> str:
    if name == "llm":
        return cfg.llm.device
    if name == "embedder" and cfg.embedding.backend in ("onnx", "openvino", "openai"):
        return "cpu"  # these run on CPU (or elsewhere): a GPU reserved for them would idle
    return cfg.embedding.device


def resolve_auto_embedder(cfg: PipelineConfig, device: str) -> PipelineConfig:
    """`cfg` with `embedding.backend: auto` replaced by what it resolves to here, so that the
    worker loads exactly what the fingerprints were computed for (a worker on another node must
    not measure again and perhaps decide otherwise)."""
    if cfg.embedding.backend != "auto":
        return cfg
    choice = resolve_choice(cfg.embedding, device)
    precision = "float32" if choice.precision == "int8" else choice.precision
    embedding = cfg.embedding.model_copy(
        update={"backend": choice.backend, "precision": precision, "quantize": choice.quantize}
    )
    return cfg.model_copy(update={"embedding": embedding})


def resolve_device(requested: str, gpus: float) -> str:
    """'cuda' only if there is a GPU: asking Ray for a missing GPU hangs forever."""
    if requested == "cuda" and gpus < 1:
        from flows.placement import ResourceError

        raise ResourceError(
            "device 'cuda' was requested but no GPU is available (set llm.device / "
            "embedding.device to auto or cpu)"
        )
    if requested == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    return requested


# --- clients ------------------------------------------------------------------------------------


class Counted:
    """Counts calls and items sent to a model client (`calls`, `items`)."""

    def __init__(self, client: Any, method: str, counter: dict[str, int]):
        self._client, self._method, self._counter = client, method, counter

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._client, attr)
        if attr != self._method:
            return value

        def call(items: list[Any], *args: Any, **kwargs: Any) -> Any:
            self._counter["calls"] = self._counter.get("calls", 0) + 1
            self._counter["items"] = self._counter.get("items", 0) + len(items)
            return value(items, *args, **kwargs)

        return call


METHODS = {"llm": "chat_json", "embedder": "encode", "rescorer": "predict"}


@dataclass
class LocalHandle:
    """An in-process model object (the local executor; not for Ray jobs)."""

    obj: Any

    def client(self, index: int = 0) -> Any:
        return self.obj


@dataclass
class HTTPLLMHandle:
    """The OpenAI-compatible server of `llm.backend: openai` (the key stays in the environment)."""

    llm_cfg: Any

    def client(self, index: int = 0) -> Any:
        from tasks.llm.openai_http import OpenAIEngine

        return OpenAIEngine(self.llm_cfg, check=False)


@dataclass
class JobModels:
    """`job.models` inside a job: clients built from handles on first use, calls counted."""

    handles: dict[str, Any]
    index: int = 0  # the job's shard: which of several engines it talks to
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    _clients: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("handles", "calls", "index"):
            raise AttributeError(name)
        if name not in self.handles:
            raise AttributeError(f"this stage did not declare the model {name!r}")
        if name not in self._clients:
            counter = self.calls.setdefault(name, {})
            client = self.handles[name].client(self.index)
            self._clients[name] = Counted(client, METHODS[name], counter)
        return self._clients[name]

    def close(self) -> None:
        """Close the clients this job made (HTTP connections); shared models stay up."""
        for name, client in self._clients.items():
            if isinstance(self.handles[name], HTTPLLMHandle):
                client._client.close()


# --- hosts --------------------------------------------------------------------------------------


class ModelHost:
    """Starts models lazily and stops them when released (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.started: dict[str, Any] = {}  # name -> handle
        self.load_seconds: dict[str, float] = {}
        self.used: set[str] = set()  # models some job of this run needed
        self.prefetched: set[str] = set()  # models asked for ahead (see prefetch)
        self._identity: dict[str, dict[str, Any]] = {}
        self.requested_embedding_backend = cfg.embedding.backend

    def gpus(self) -> float:
        return 0.0

    def device(self, name: str) -> str:
        return resolve_device(requested_device(self.cfg, name), self.gpus())

    def identity(self, name: str) -> dict[str, Any]:
        if name not in self._identity:
            self._identity[name] = identity(self.cfg, name, self.device(name))
            if name == "embedder":  # from here on, load what the identity says
                self.cfg = resolve_auto_embedder(self.cfg, self.device(name))
        return self._identity[name]

    def acquire(self, name: str) -> Any:
        self.used.add(name)
        if name == "embedder":
            self.identity(name)  # resolves `auto` before any worker loads
        if name not in self.started:
            self.started[name] = self._start(name)
        return self.started[name]

    def prefetch(self, name: str) -> None:
        """Start loading a model a later stage will need, without waiting for it, so that its
        load overlaps the stages before (once per model; `acquire` then waits for it)."""
        if name not in self.started and name not in self.prefetched:
            self.prefetched.add(name)
            self._prefetch(name)

    def _prefetch(self, name: str) -> None:
        """A no-op here: local models load on `acquire`."""

    def release(self, name: str) -> None:
        self.prefetched.discard(name)
        handle = self.started.pop(name, None)
        if handle is not None:
            self._stop(name, handle)

    def close(self) -> None:
        for name in list(self.started):
            self.release(name)

    def __enter__(self) -> ModelHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, dict[str, Any] | None]:
        """The models as the manifest records them (never a URL's credentials or the key)."""
        out: dict[str, dict[str, Any] | None] = {}
        for name in MODEL_NAMES:
            if name not in self._identity:
                continue
            ident = self._identity[name]
            if name == "llm":
                record = {"name": self.cfg.llm.model_name, "backend": self.cfg.llm.backend}
                if self.cfg.llm.backend == "vllm":
                    record.update(
                        path=str(resolve_llm_path(self.cfg.llm.model_path)),
                        device=ident["settings"]["device"],
                        dtype=ident["settings"]["dtype"],
                        weights=ident["weights"],
                    )
            elif name == "embedder":
                record = {"name": self.cfg.embedding.model_name, "backend": ident["backend"]}
                if self.requested_embedding_backend == "auto":
                    record["chosen_by"] = "auto"
                if ident["backend"] == "openai":  # over HTTP: no path, weights, URL or key
                    record.update(device="remote", precision="server")
                else:
                    record.update(
                        path=str(resolve_embedding_path(self.cfg.embedding.model_path)),
                        device=ident["device"],
                        precision=ident["precision"],
                        weights=ident["weights"],
                    )
                    if ident.get("quantize"):
                        record["quantize"] = ident["quantize"]
            else:
                record = {"path": self.cfg.mining.rescore_model_path, **ident}
            record["used"] = name in self.used  # False: every job that needs it was reused
            if name in self.load_seconds:
                record["load_seconds"] = round(self.load_seconds[name], 3)
            out[name] = record
        return out

    def _start(self, name: str) -> Any:
        raise NotImplementedError

    def _stop(self, name: str, handle: Any) -> None:
        pass


class LocalModels(ModelHost):
    """Models in this process, or the objects given (`LocalModels(cfg, embedder=my_model)`)."""

    def __init__(self, cfg: PipelineConfig, **given: Any):
        super().__init__(cfg)
        self.given = given

    def gpus(self) -> float:
        try:
            import torch

            return float(torch.cuda.device_count())
        except ImportError:
            return 0.0

    def _start(self, name: str) -> Any:
        if name in self.given:
            return LocalHandle(self.given[name])
        if name == "llm" and self.cfg.llm.backend == "openai":
            from tasks.llm.openai_http import OpenAIEngine

            OpenAIEngine(self.cfg.llm, check=True).close()  # fail early, with the server's words
            return HTTPLLMHandle(self.cfg.llm)
        import time

        start = time.perf_counter()
        obj = _load(self.cfg, name, self.device(name), os.cpu_count() or 1)
        self.load_seconds[name] = time.perf_counter() - start
        return LocalHandle(obj)

    def _stop(self, name: str, handle: Any) -> None:
        if name in self.given:
            return
        shutdown = getattr(handle.obj, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _load(cfg: PipelineConfig, name: str, device: str, threads: int) -> Any:
    """The model object itself (in a local host or inside a Ray actor)."""
    if name == "embedder":
        from tasks.embed_backends import load_encoder

        return load_encoder(cfg.embedding, device, threads)
    if name == "llm":
        from tasks.llm.engine import VLLMEngine

        llm = cfg.llm.model_copy(update={"device": device})
        path = str(resolve_llm_path(cfg.llm.model_path))
        return VLLMEngine(path, cfg.llm.model_name, llm, seed=cfg.generation.seed)
    if name == "rescorer":
        from tasks.rescorer import CrossEncoderModel

        return CrossEncoderModel(cfg.mining.rescore_model_path or "", device, threads)
    raise KeyError(name)
