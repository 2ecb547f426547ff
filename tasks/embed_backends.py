"""Embedding backends behind one interface, and the batching the local ones share.

Every backend is a `TextEncoder`: `encode(texts, batch_size, prefix, pad_to_multiple_of,
max_batch_tokens)` returns L2-normalized float32 vectors `[len(texts), dim]` in input order, and
it says `backend`, `model_name`, `precision` and `dim`. `embedding.backend` chooses:

- `torch`: sentence-transformers (`Embedder`, also importable from tasks.embedder), CPU or CUDA,
  bf16 autocast where the CPU multiplies bf16 natively;
- `onnx`: the same model exported once to ONNX (`tasks.models.prepare_onnx`, cached under the
  weights digest) on ONNX Runtime, optionally with int8 weights (`embedding.quantize`);
- `openvino`: that ONNX file on OpenVINO (Intel's runtime: bf16 on AMX / AVX512-BF16);
- `openai`: a running OpenAI-compatible `/v1/embeddings` server (e.g. vLLM `--runner pooling`);
- `auto`: the fastest local backend whose vectors stay within cosine `AUTO_MIN_COSINE` of float32
  torch on a check sample, measured once per model and CPU, cached and logged (`choose_backend`).

Local backends batch alike (`LocalEncoder.encode`): texts are tokenized once, sorted by token
length (longest first, so a batch pads little and an out-of-memory shows at once), cut into
batches of `batch_size` texts or of at most `max_batch_tokens` padded tokens, padded to a multiple
of `pad_to_multiple_of`, run, and put back in input order. Padding is masked out of attention and
pooling, so how texts are batched changes vectors only by rounding.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tasks.hardware import cpu_description, cpu_flags, native_bf16
from tasks.llm.openai_http import OpenAIEndpoint
from tasks.memory import return_free_heap
from tasks.quantize import INT8_RECIPE

if TYPE_CHECKING:
    from schemas.config import EmbeddingConfig

log = logging.getLogger(__name__)

LOCAL_BACKENDS = ("torch", "onnx", "openvino")
BACKENDS = (*LOCAL_BACKENDS, "openai")
# `auto` keeps a backend only if every check vector is at least this close to float32 torch's.
AUTO_MIN_COSINE = 0.999
AUTO_CHOICE_FILE = "embedding-backend-choice.json"
AUTO_SAMPLE_SIZE = 64


class TextEncoder(Protocol):
    backend: str
    model_name: str
    precision: str
    dim: int

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        prefix: str = "",
        pad_to_multiple_of: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray: ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit rows in float32 (a backend's output may be half precision)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


# --- batching -----------------------------------------------------------------------------------


def padded_length(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    pad_to_multiple_of: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[np.ndarray]:
    """Batches as arrays of text indices, longest texts first (a stable sort: equal lengths keep
    their input order). With `max_batch_tokens` a batch holds as many texts as fit that many
    padded tokens (its first text is its longest, so its width is that text's padded length),
    at least one; without it, `batch_size` texts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, not {max_batch_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        if max_batch_tokens is None:
            count = batch_size
        else:
            width = padded_length(int(lengths[order[start]]), pad_to_multiple_of)
            count = max(1, max_batch_tokens // max(1, width))
        batches.append(order[start : start + count])
        start += count
    return batches


@dataclass
class TokenizedTexts:
    """Token ids of many texts in one flat int64 array (`offsets[i]:offsets[i+1]` is text i):
    100k passages cost ~8 bytes a token here, not ~36 as lists of Python ints."""

    flat: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) `[len(rows), width]`, padded on the right."""
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            start, stop = self.offsets[i], self.offsets[i + 1]
            ids[r, : stop - start] = self.flat[start:stop]
            mask[r, : stop - start] = 1
        return ids, mask


class TextTokenizer:
    """Token ids as sentence-transformers feeds them to the model: special tokens added, cut at
    `max_length` (its `max_seq_length`). From the folder's `tokenizer.json` with the `tokenizers`
    library when there is one (it keeps transformers and torch out of an ONNX worker: ~85 MB
    resident instead of ~560), else with a transformers tokenizer (`hf`)."""

    def __init__(self, model_path: str | None = None, *, hf: Any = None, max_length: int = 0):
        self._hf, self._fast = hf, None
        if model_path is not None:
            max_length = max_length or _max_seq_length(model_path)
            file = Path(model_path) / "tokenizer.json"
            if file.exists():
                from tokenizers import Tokenizer

                self._fast = Tokenizer.from_file(str(file))
                self._fast.enable_truncation(max_length=max_length)
                self._fast.no_padding()
            else:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if self._fast is None and self._hf is None:
            raise ValueError("a TextTokenizer needs a model folder or a transformers tokenizer")
        self.max_length = max_length
        if self._fast is not None:
            pad = _pad_token(model_path or "")
            self.pad_token_id = (self._fast.token_to_id(pad) if pad else None) or 0
        else:
            self.pad_token_id = self._hf.pad_token_id or 0

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=True)]
        return self._hf(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]


def _max_seq_length(model_path: str) -> int:
    """Where sentence-transformers cuts a folder's texts: its `max_seq_length`, else the
    tokenizer's `model_max_length`, at most 512."""
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        path = Path(model_path) / name
        if path.exists():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, int | float) and value > 0:
                return int(min(value, 512)) if key == "model_max_length" else int(value)
    return 512


def _pad_token(model_path: str) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(model_path) / name
        if path.exists():
            pad = json.loads(path.read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return str(pad)
    return None


def tokenize(tokenizer: TextTokenizer, texts: list[str], chunk: int = 4096) -> TokenizedTexts:
    """All texts' token ids, tokenized in chunks so that the Python lists of one chunk are all
    that exist at a time."""
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        ids = tokenizer.ids(texts[start : start + chunk])
        sizes = [len(x) for x in ids]
        lengths.extend(sizes)
        parts.append(np.fromiter((t for x in ids for t in x), dtype=np.int64, count=sum(sizes)))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenizedTexts(flat, offsets)


class LocalEncoder(TextEncoder):
    """What the local backends share: tokenize, plan batches, run `_forward`, restore order.

    A subclass sets `tokenizer`, `input_names` and TextEncoder's attributes and implements
    `_forward(features) -> [batch, dim]` on int64 numpy inputs."""

    backend = ""
    tokenizer: TextTokenizer
    input_names: tuple[str, ...]

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        prefix: str = "",
        pad_to_multiple_of: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """`pad_to_multiple_of` bounds the number of distinct input shapes the model ever sees
        (see EmbeddingConfig.pad_to_multiple_of); `max_batch_tokens` sizes batches by padded
        tokens instead of `batch_size` texts (see the module docstring)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = tokenize(self.tokenizer, [prefix + t for t in texts] if prefix else texts)
        pad_id = self.tokenizer.pad_token_id
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        lengths = tokens.lengths
        for rows in plan_batches(lengths, batch_size, pad_to_multiple_of, max_batch_tokens):
            width = padded_length(int(lengths[rows[0]]), pad_to_multiple_of)
            ids, mask = tokens.batch(rows, width, pad_id)
            features = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                features["token_type_ids"] = np.zeros_like(ids)
            out[rows] = self._forward(features)
        return_free_heap()  # this worker lives long: see tasks/memory.py
        return normalize(out)

    def _forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_name!r}, {self.precision}, dim {self.dim})"


# --- torch (sentence-transformers) --------------------------------------------------------------


def resolve_precision(requested: str, device: str, flags: frozenset[str] | None = None) -> str:
    """The compute precision `auto` stands for on `device` (the torch backend).

    CPU: bfloat16 autocast where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), which
    embedded 1.8x faster than float32 on a 2-core EPYC at cosine >= 0.99997 to the float32
    vectors (benchmarks/mining.py); float32 elsewhere (emulated bf16 is slower). CUDA: float16,
    which every CUDA GPU runs fast (bf16 needs Ampere or newer). The flow resolves it once, in
    the driver, from the driver's CPU: on a cluster whose nodes differ, set it explicitly.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "float16"
    return "bfloat16" if native_bf16(flags) else "float32"


class Embedder(LocalEncoder):
    """The `torch` embedding backend: a sentence-transformers model, loaded once; returns
    L2-normalized float32 vectors, batched as every local backend is (`LocalEncoder`).

    `precision` other than float32 runs the forward pass under torch autocast: matrix products
    in that precision, layer norms, softmax and pooling in float32, weights kept in float32.
    """

    backend = "torch"

    def __init__(
        self,
        model_path: str,
        model_name: str,
        device: str = "cpu",
        threads: int = 0,
        precision: str = "float32",
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            torch.set_num_threads(threads)
        self.precision = precision
        self._autocast_dtype = None if precision == "float32" else getattr(torch, precision)
        self._device_type = "cuda" if device.startswith("cuda") else "cpu"
        start = time.perf_counter()
        self.model: Any = SentenceTransformer(model_path, device=device, local_files_only=True)
        self.load_seconds = time.perf_counter() - start
        self.model_name = model_name
        hf = self.model.tokenizer
        self.tokenizer = TextTokenizer(hf=hf, max_length=int(self.model.max_seq_length))
        self.input_names = tuple(hf.model_input_names)
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension.
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        self.dim = int(get_dim() if get_dim else self.model.get_sentence_embedding_dimension())
        log.info(
            "embedder %s (dim %d, %s) loaded in %.1f s",
            model_name,
            self.dim,
            precision,
            self.load_seconds,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self._device_type, dtype=self._autocast_dtype)

    def _forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """One batch through every module of the model (transformer, pooling, normalization),
        as sentence-transformers' own `encode` runs it."""
        import torch

        device = self.model.device
        inputs = {k: torch.from_numpy(v).to(device) for k, v in features.items()}
        with torch.inference_mode(), self._autocast():
            out = self.model(inputs)["sentence_embedding"]
        return out.float().cpu().numpy()


# --- ONNX Runtime and OpenVINO --------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class OnnxEncoder(LocalEncoder):
    """The model's ONNX export on ONNX Runtime's CPU provider: float32, or int8 weights."""

    backend = "onnx"

    def __init__(
        self, model_path: str, model_name: str, threads: int = 0, quantize: str | None = None
    ):
        import onnxruntime as ort

        from tasks.models import onnx_export_info, prepare_onnx

        start = time.perf_counter()
        onnx_file = prepare_onnx(model_path, quantize)
        info = onnx_export_info(onnx_file)
        self.tokenizer = TextTokenizer(model_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: the embedder shares its cores with the
        # shard jobs (and on small machines with the LLM) between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.dim = int(info["dim"])  # type: ignore[call-overload]
        self.model_name = model_name
        self.quantize = quantize
        self.precision = "int8" if quantize else "float32"
        self.load_seconds = time.perf_counter() - start
        log.info(
            "embedder %s on ONNX Runtime %s (%s, %d threads) loaded in %.1f s",
            model_name,
            ort.__version__,
            self.precision,
            threads,
            self.load_seconds,
        )

    def _forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: features[n] for n in self.input_names}
        return self.session.run(None, feed)[0]


OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


class OpenVINOEncoder(LocalEncoder):
    """The model's ONNX export on OpenVINO's CPU plugin, in float32 or bfloat16 (which the
    plugin runs on AMX / AVX512-BF16; it is its own default there)."""

    backend = "openvino"

    def __init__(
        self, model_path: str, model_name: str, threads: int = 0, precision: str = "float32"
    ):
        import openvino as ov

        from tasks.models import onnx_export_info, prepare_onnx

        if precision not in OPENVINO_PRECISION:
            raise ValueError(f"openvino runs {sorted(OPENVINO_PRECISION)}, not {precision!r}")
        start = time.perf_counter()
        onnx_file = prepare_onnx(model_path)
        info = onnx_export_info(onnx_file)
        self.tokenizer = TextTokenizer(model_path)
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(onnx_file)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        self.dim = int(info["dim"])  # type: ignore[call-overload]
        self.model_name = model_name
        self.precision = precision
        self.load_seconds = time.perf_counter() - start
        log.info(
            "embedder %s on OpenVINO %s (%s, %d threads) loaded in %.1f s",
            model_name,
            ov.__version__,
            precision,
            threads,
            self.load_seconds,
        )

    def _forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        result = self.request.infer({n: features[n] for n in self.input_names})
        return np.array(result[self.compiled.outputs[0]], dtype=np.float32)  # a copy


# --- an OpenAI-compatible embeddings server -------------------------------------------------------


class EmbeddingServerError(RuntimeError):
    """The embedding server could not be used; the message says why (never with the key)."""


class OpenAIEmbeddings(OpenAIEndpoint):
    """A TextEncoder over an OpenAI-compatible `/embeddings` endpoint.

    Batches of `batch_size` texts go `embedding.concurrency` at a time over one httpx client;
    5xx, 408, 429, timeouts and connection errors are retried with exponential backoff and
    jitter (honouring `Retry-After`), any other 4xx fails at once with the server's message:
    what tasks/llm/openai_http.py's OpenAIEndpoint does for both HTTP clients. `check=True`
    asks `GET /models` (unreachable server, refused key, unknown model fail at construction,
    clearly) and embeds one text to learn `dim`.

    The key is read from the environment variable `embedding.api_key_env` and only ever placed
    in the Authorization header: never logged, never in a message (server text quoting it is
    scrubbed), never in repr.
    """

    backend = "openai"
    precision = "server"  # the server decides; only the model name is known here
    what = "the embedding server"
    section = "embedding"
    error = EmbeddingServerError
    example_url = "http://127.0.0.1:8001/v1"
    refuse_statuses = (401, 403)

    def __init__(self, cfg: EmbeddingConfig, *, check: bool = True, backoff_s: float = 0.5):
        super().__init__(cfg, backoff_s)
        self.dim = 0
        served = self._checked(check, self._probe_dim)
        if check:
            log.info(
                "embedding server %s serves %s; %s has dim %d",
                self.shown_url,
                served,
                self.model_name,
                self.dim,
            )

    def _probe_dim(self) -> None:
        self.dim = int(self._embed_batch(["dimension probe"]).shape[1])

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        prefix: str = "",
        pad_to_multiple_of: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """Vectors in input order; the server pads and batches on its side (the two padding
        arguments are the local backends' and are ignored here)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        chunks = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        parts = self._fan_out(self._embed_batch, chunks, "embed-http")
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1 or (self.dim and dims != {self.dim}):
            raise EmbeddingServerError(
                f"the embedding server at {self.shown_url} answered vectors of dimensions "
                f"{sorted(dims)} (expected {self.dim or 'one dimension'})"
            )
        self.dim = self.dim or dims.pop()
        return normalize(np.concatenate(parts))

    shutdown = OpenAIEndpoint.close  # what model hosts call when they stop a model

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        body: dict[str, Any] = {
            "model": self.model_name,
            "input": texts,
            "encoding_format": "float",
        }
        if self.cfg.truncate_prompt_tokens is not None:
            body["truncate_prompt_tokens"] = self.cfg.truncate_prompt_tokens
        out = self._send("POST", "/embeddings", body)
        try:
            rows = sorted(out["data"], key=lambda d: d["index"])
            vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise EmbeddingServerError(
                f"unexpected reply from {self.shown_url}/embeddings: {self._clip(out)}"
            ) from e
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise EmbeddingServerError(
                f"the embedding server at {self.shown_url} answered {len(vectors)} vectors for "
                f"{len(texts)} texts"
            )
        return vectors


# --- choosing and loading -------------------------------------------------------------------------


def backend_precision(
    backend: str,
    requested: str,
    device: str,
    quantize: str | None = None,
    flags: frozenset[str] | None = None,
) -> str:
    """The precision `backend` computes in for `embedding.precision: requested` on `device`."""
    if backend == "torch":
        return resolve_precision(requested, device, flags)
    if backend == "onnx":
        return "int8" if quantize else "float32"
    if backend == "openvino":
        if requested == "auto":
            return "bfloat16" if native_bf16(flags) else "float32"
        return requested
    if backend == "openai":
        return "server"
    raise ValueError(f"unknown embedding backend {backend!r}; known: {BACKENDS} or auto")


@dataclass(frozen=True)
class BackendChoice:
    """A concrete backend and what it computes in (what `auto` resolves to)."""

    backend: str
    precision: str
    quantize: str | None = None


def requested_choice(cfg: EmbeddingConfig, device: str) -> BackendChoice:
    """The config's backend with its precision resolved (`auto` is not resolved here)."""
    quantize = cfg.quantize if cfg.backend == "onnx" else None
    precision = backend_precision(cfg.backend, cfg.precision, device, quantize)
    return BackendChoice(cfg.backend, precision, quantize)


def available(backend: str) -> bool:
    module = {"torch": "sentence_transformers", "onnx": "onnxruntime", "openvino": "openvino"}
    import importlib.util

    return importlib.util.find_spec(module[backend]) is not None


def auto_candidates(cfg: EmbeddingConfig, device: str = "cpu") -> list[BackendChoice]:
    """What `auto` measures: each installed local backend at the precision `embedding.precision`
    means for it (onnx in float32, and int8 too if `embedding.quantize` asks for it)."""
    out = [BackendChoice("torch", backend_precision("torch", cfg.precision, device))]
    if available("onnx"):
        out.append(BackendChoice("onnx", "float32"))
        if cfg.quantize == "int8":
            out.append(BackendChoice("onnx", "int8", "int8"))
    if available("openvino") and cfg.precision != "float16":
        out.append(BackendChoice("openvino", backend_precision("openvino", cfg.precision, device)))
    return out


def check_sample(n: int = AUTO_SAMPLE_SIZE) -> list[str]:
    """Real prose of varied length for `auto`'s check: docstring passages of the standard
    library (tasks/sample_corpus.py; installed wherever Python is), plus a few short texts."""
    from tasks.sample_corpus import build

    texts = [row["text"] for row in build(limit=n - 4, per_module=2)]
    return texts + ["how do I parse json", "sort a list in place", "x", "file modes"]


def _choice_key(cfg: EmbeddingConfig, digest: str) -> str:
    """Model + CPU (+ what the candidates are and the libraries that run them)."""
    flags = ",".join(sorted(cpu_flags()))
    parts = {
        "weights": digest,
        "cpu": cpu_description(),
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "cores": os.cpu_count(),
        "precision": cfg.precision,
        "quantize": cfg.quantize and f"{cfg.quantize}:{INT8_RECIPE}",
        "libraries": {p: _version(p) for p in ("torch", "onnxruntime", "openvino")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Measurement:
    backend: str
    precision: str
    quantize: str | None
    texts_per_s: float
    cosine_min: float
    cosine_mean: float
    ok: bool
    error: str | None = None


def measure_backends(
    cfg: EmbeddingConfig,
    model_path: str,
    candidates: list[BackendChoice],
    texts: list[str],
    threads: int = 0,
    repeats: int = 2,
) -> list[Measurement]:
    """Speed and agreement with float32 torch of each candidate, one loaded at a time: a warm-up
    call, then the best of `repeats` timed calls over `texts` with the config's batching."""
    batching = (cfg.batch_size, "", cfg.pad_to_multiple_of, cfg.max_batch_tokens)
    reference_model = Embedder(model_path, cfg.model_name, "cpu", threads, "float32")
    reference = reference_model.encode(texts, *batching)
    out = []
    for choice in candidates:
        try:
            if choice == BackendChoice("torch", "float32"):
                encoder: Any = reference_model
            else:
                encoder = load_local(choice, model_path, cfg.model_name, "cpu", threads)
            vectors = encoder.encode(texts, *batching)  # warm-up (first calls build kernels)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                vectors = encoder.encode(texts, *batching)
                best = min(best, time.perf_counter() - start)
            cosine = (vectors * reference).sum(axis=1)
            m = Measurement(
                choice.backend,
                choice.precision,
                choice.quantize,
                round(len(texts) / best, 2),
                round(float(cosine.min()), 6),
                round(float(cosine.mean()), 6),
                bool(cosine.min() >= AUTO_MIN_COSINE),
            )
        except Exception as e:  # noqa: BLE001 - a backend that fails here is not chosen
            log.warning("embedding backend %s could not be measured: %s", choice, e)
            m = Measurement(
                choice.backend, choice.precision, choice.quantize, 0.0, 0.0, 0.0, False, str(e)
            )
        finally:
            encoder = None
            gc.collect()
        out.append(m)
        log.info(
            "embedding backend %s (%s): %.1f texts/s, cosine to float32 torch min %.5f mean %.5f%s",
            m.backend,
            m.precision,
            m.texts_per_s,
            m.cosine_min,
            m.cosine_mean,
            "" if m.ok else " (not eligible)",
        )
    return out


def choose_backend(
    cfg: EmbeddingConfig,
    device: str = "cpu",
    *,
    texts: list[str] | None = None,
    force: bool = False,
) -> BackendChoice:
    """What `embedding.backend: auto` stands for here: torch on CUDA; on CPU the fastest local
    backend whose check vectors all reach cosine AUTO_MIN_COSINE to float32 torch's. Measured
    once per model and CPU and kept in the cache (`AUTO_CHOICE_FILE`; delete its entry, or pass
    `force`, to measure again)."""
    from tasks.models import cache_dir, file_lock, resolve_embedding_path, weights_digest

    if device != "cpu":
        return BackendChoice("torch", backend_precision("torch", cfg.precision, device))
    path = str(resolve_embedding_path(cfg.model_path))
    key = _choice_key(cfg, weights_digest(path))
    store = cache_dir() / AUTO_CHOICE_FILE
    store.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(store.with_suffix(".lock")):
        known = _read_json(store)
        entry = known.get(key)
        if entry and not force:
            choice = BackendChoice(**entry["choice"])
            log.info(
                "embedding backend auto: %s (%s) for %s on %s, as measured %s",
                choice.backend,
                choice.precision,
                cfg.model_name,
                entry["cpu"],
                entry["measured_at"],
            )
            return choice
        candidates = auto_candidates(cfg, device)
        log.info(
            "embedding backend auto: measuring %s on %s",
            ", ".join(f"{c.backend} ({c.precision})" for c in candidates),
            cpu_description(),
        )
        results = measure_backends(cfg, path, candidates, texts or check_sample())
        eligible = [m for m in results if m.ok]
        best = max(eligible, key=lambda m: m.texts_per_s) if eligible else None
        choice = (
            BackendChoice(best.backend, best.precision, best.quantize)
            if best
            else BackendChoice("torch", "float32")
        )
        known[key] = {
            "choice": asdict(choice),
            "model": cfg.model_name,
            "cpu": cpu_description(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "measurements": [asdict(m) for m in results],
        }
        _write_json(store, known)
    log.info(
        "embedding backend auto: chose %s (%s) for %s on %s",
        choice.backend,
        choice.precision,
        cfg.model_name,
        cpu_description(),
    )
    return choice


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        log.warning("could not write %s: the next run measures again", path)


def resolve_choice(cfg: EmbeddingConfig, device: str) -> BackendChoice:
    """The concrete backend a config runs on `device`, `auto` included."""
    if cfg.backend == "auto":
        return choose_backend(cfg, device)
    return requested_choice(cfg, device)


def load_local(
    choice: BackendChoice, model_path: str, model_name: str, device: str, threads: int
) -> TextEncoder:
    if choice.backend == "torch":
        return Embedder(model_path, model_name, device, threads, choice.precision)
    if choice.backend == "onnx":
        return OnnxEncoder(model_path, model_name, threads, choice.quantize)
    if choice.backend == "openvino":
        return OpenVINOEncoder(model_path, model_name, threads, choice.precision)
    raise ValueError(f"{choice.backend!r} is not a local embedding backend: {LOCAL_BACKENDS}")


def load_encoder(cfg: EmbeddingConfig, device: str = "cpu", threads: int = 0) -> TextEncoder:
    """The embedder `cfg` asks for, loaded (`device`: resolved; `threads`: CPU threads, 0 =
    the library's default)."""
    from tasks.models import resolve_embedding_path

    if cfg.backend == "openai":
        return OpenAIEmbeddings(cfg)
    choice = resolve_choice(cfg, device)
    path = str(resolve_embedding_path(cfg.model_path))
    return load_local(choice, path, cfg.model_name, device, threads)


def encoder_identity(cfg: EmbeddingConfig, device: str) -> dict[str, Any]:
    """The embedder as fingerprints see it: weights (their hash, not their path), backend,
    precision and quantization as resolved here, and the runtime that computes the vectors.
    Over HTTP the server decides: only the backend and the model name count."""
    from tasks.models import ONNX_EXPORT_VERSION, resolve_embedding_path, weights_digest

    if cfg.backend == "openai":
        return {"backend": "openai", "model": cfg.model_name}
    choice = resolve_choice(cfg, device)
    ident: dict[str, Any] = {
        "weights": weights_digest(resolve_embedding_path(cfg.model_path)),
        "backend": choice.backend,
        "device": device if choice.backend == "torch" else "cpu",
        "precision": choice.precision,
    }
    if choice.backend == "onnx":
        ident.update(quantize=choice.quantize, runtime={"onnxruntime": _version("onnxruntime")})
        if choice.quantize:
            ident["int8_recipe"] = INT8_RECIPE
    if choice.backend in ("onnx", "openvino"):
        ident["export"] = ONNX_EXPORT_VERSION
    if choice.backend == "openvino":
        ident["runtime"] = {"openvino": _version("openvino")}
    return ident
