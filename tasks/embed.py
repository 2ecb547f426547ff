"""Embedding: a model worker (loaded once) and the conversions to and from Arrow."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.tables import embeddings_schema

log = logging.getLogger(__name__)


class Embedder:
    """A sentence-transformers model, loaded once; returns L2-normalized float32 vectors."""

    def __init__(self, model_path: str, model_name: str, device: str = "cpu", threads: int = 0):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model: Any = SentenceTransformer(model_path, device=device, local_files_only=True)
        self.load_seconds = time.perf_counter() - start
        self.model_name = model_name
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension.
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        self.dim = int(get_dim() if get_dim else self.model.get_sentence_embedding_dimension())
        log.info("embedder %s (dim %d) loaded in %.1f s", model_name, self.dim, self.load_seconds)

    def encode(self, texts: list[str], batch_size: int = 64, prefix: str = "") -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            [prefix + t for t in texts] if prefix else texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


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
