"""Embedding precision: what `auto` resolves to, that it reaches every shard's fingerprint, and
that the faster precision gives the same vectors (the real MiniLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.executor import Executor
from flows.models import LocalModels
from schemas.config import PipelineConfig
from schemas.manifest import ShardInfo
from tasks.embedder import Embedder, resolve_precision
from tasks.hardware import cpu_flags
from tasks.models import minilm_path
from tests.helpers import SAMPLE, sample_rows


@pytest.mark.parametrize(
    ("requested", "device", "flags", "expected"),
    [
        ("auto", "cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ("auto", "cpu", {"amx_bf16", "amx_tile"}, "bfloat16"),
        ("auto", "cpu", {"avx2", "avx512f"}, "float32"),  # bf16 would be emulated: slower
        ("auto", "cpu", set(), "float32"),  # no /proc/cpuinfo (macOS)
        ("auto", "cuda", set(), "float16"),
        ("float32", "cpu", {"avx512_bf16"}, "float32"),  # an explicit choice is kept
        ("bfloat16", "cpu", set(), "bfloat16"),
        ("bfloat16", "cuda", set(), "bfloat16"),
    ],
)
def test_auto_precision_follows_the_hardware(requested, device, flags, expected):
    assert resolve_precision(requested, device, frozenset(flags)) == expected


def test_cpu_flags_reads_the_flags_line(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_resolved_precision_is_part_of_every_embedding_fingerprint(tmp_path: Path):
    """Two machines that resolve `auto` differently never reuse each other's shards; `auto` and
    what it resolves to here are the same shard."""
    from tasks.embed import EmbedStage

    shard = ShardInfo(path="passages/part-00000.parquet", rows=3, sha256="ab" * 32, fingerprint="x")

    def fingerprint(precision: str) -> str:
        cfg = PipelineConfig.model_validate(
            {"input": {"paths": [str(SAMPLE)]}, "embedding": {"precision": precision}}
        )
        executor = Executor(cfg, tmp_path / "run", LocalModels(cfg))
        return executor._jobs(EmbedStage("passages"), {"passages": [shard]})[0].fingerprint

    assert fingerprint("float32") != fingerprint("bfloat16")
    assert fingerprint("auto") == fingerprint(resolve_precision("auto", "cpu"))


@pytest.mark.slow
def test_bfloat16_vectors_match_float32_and_stay_unit_length():
    texts = [r["text"] for r in sample_rows(64)] + ["how do I parse json", "x"]
    path = str(minilm_path())
    full = Embedder(path, "all-MiniLM-L6-v2", precision="float32").encode(texts)
    half = Embedder(path, "all-MiniLM-L6-v2", precision="bfloat16").encode(texts)
    assert half.dtype == np.float32 and half.shape == full.shape == (66, 384)
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, rtol=1e-5)
    cosine = (half * full).sum(axis=1)
    assert cosine.min() > 0.999, cosine.min()
    # nearest neighbours (what mining ranks) agree; a near-tie may flip under bf16 rounding
    same = (half @ half.T).argsort(axis=1)[:, -2] == (full @ full.T).argsort(axis=1)[:, -2]
    assert same.mean() >= 0.95, same.mean()


@pytest.mark.slow
def test_padding_bounds_the_shapes_the_model_sees_and_keeps_the_vectors():
    """Padded batches reach the model at multiples of 32 tokens (a bounded set of shapes, so a
    bounded kernel cache) and give the same vectors as unpadded ones."""
    texts = [r["text"] for r in sample_rows(48)] + ["how do I parse json", "x"]
    embedder = Embedder(str(minilm_path()), "all-MiniLM-L6-v2", precision="float32")
    lengths: list[int] = []
    hook = embedder.model[0].auto_model.embeddings.register_forward_pre_hook(
        lambda _module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    try:
        plain = embedder.encode(texts, batch_size=8)
        plain_lengths, lengths[:] = list(lengths), []
        padded = embedder.encode(texts, batch_size=8, pad_to_multiple_of=32)
    finally:
        hook.remove()
    assert len(lengths) == len(plain_lengths) == 7  # 50 texts in batches of 8
    assert all(n % 32 == 0 for n in lengths), lengths
    assert any(n % 32 for n in plain_lengths), plain_lengths
    assert ((padded * plain).sum(axis=1)).min() > 0.99999
