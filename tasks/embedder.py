"""The embedding model (loaded once per worker) and the conversions of vectors to and from Arrow."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.tables import embeddings_schema
from tasks.hardware import native_bf16
from tasks.memory import return_free_heap

log = logging.getLogger(__name__)


def resolve_precision(requested: str, device: str, flags: frozenset[str] | None = None) -> str:
    """The compute precision `auto` stands for on `device`.

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


class Embedder:
    """A sentence-transformers model, loaded once; returns L2-normalized float32 vectors.

    `precision` other than float32 runs the forward pass under torch autocast: matrix products
    in that precision, layer norms, softmax and pooling in float32, weights kept in float32.
    """

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

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        prefix: str = "",
        pad_to_multiple_of: int | None = None,
    ) -> np.ndarray:
        """`pad_to_multiple_of` bounds the number of distinct input shapes the model ever sees
        (see EmbeddingConfig.pad_to_multiple_of); padded tokens are masked out of attention and
        pooling, so vectors agree with unpadded ones to rounding."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        padding = (
            {"processing_kwargs": {"text": {"pad_to_multiple_of": pad_to_multiple_of}}}
            if pad_to_multiple_of
            else {}
        )
        with self._autocast():
            vectors = self.model.encode(
                [prefix + t for t in texts] if prefix else texts,
                batch_size=batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
                **padding,
            )
        return_free_heap()  # this worker lives long: see tasks/memory.py
        # Normalized here, in float32: under autocast the model's output may be half precision.
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def embeddings_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.table({"id": pa.array(ids, pa.string()), "embedding": column}).cast(
        embeddings_schema(dim)
    )


def table_to_matrix(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """(ids, float32 matrix) from an embeddings table, without a Python loop over rows."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return table.column("id").to_pylist(), values.reshape(-1, dim)
