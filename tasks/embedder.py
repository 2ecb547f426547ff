"""The conversions of vectors to and from Arrow, and the embedding model's long-standing names:
the torch `Embedder` and `resolve_precision` live in tasks/embed_backends.py with the other
backends and are importable from here as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas.tables import embeddings_schema
from tasks.embed_backends import Embedder, resolve_precision

__all__ = ["Embedder", "embeddings_table", "resolve_precision", "table_to_matrix"]


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
