"""Never embed the same text twice: vectors keyed by (model identity, text), shared by every run
and stage that uses the same stage cache.

Layout: `<stage cache>/.embeddings/<model key>/<hh>/<file>.parquet`, where the model key is a
digest of everything that decides a vector (weights, backend, precision, device, prefix, padding;
the embed stage's fingerprint inputs) and `hh` the first two hex digits of the text's key, so a
lookup reads only the partitions its texts fall in. A job adds what it embedded as one new file
per partition, written to a temporary name and renamed: jobs on many workers (or nodes, on a
shared file system) add side by side without locks; a killed job leaves at most a temporary
file. A text's vector is the one computed first (vectors of one text computed in other batches
differ only in rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def model_key(identity: Any) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def text_keys(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest()[:32] for t in texts]


class EmbeddingCache:
    def __init__(self, root: str | Path, key: str):
        self.folder = Path(root) / key

    def lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `keys`."""
        wanted: dict[str, list[str]] = {}
        for k in set(keys):
            wanted.setdefault(k[:2], []).append(k)
        found: dict[str, np.ndarray] = {}
        for part, ks in wanted.items():
            folder = self.folder / part
            if not folder.is_dir():
                continue
            files = sorted(str(p) for p in folder.glob("*.parquet"))
            if not files:
                continue
            # oldest file first: a key computed twice keeps its first vector
            for path in files:
                table = pq.read_table(path, filters=pc.field("key").isin(ks))
                if table.num_rows == 0:
                    continue
                dim = table.column("embedding").type.list_size
                values = table.column("embedding").combine_chunks().values.to_numpy()
                matrix = values.astype(np.float32, copy=False).reshape(-1, dim)
                for k, vec in zip(table.column("key").to_pylist(), matrix, strict=True):
                    found.setdefault(k, vec)
        return found

    def add(self, keys: list[str], vectors: np.ndarray) -> int:
        """Store vectors (one row per key, keys unique); returns the files written."""
        if not keys:
            return 0
        by_part: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by_part.setdefault(k[:2], []).append(i)
        dim = vectors.shape[1]
        name = f"{os.getpid()}-{secrets.token_hex(6)}.parquet"
        for part, rows in by_part.items():
            folder = self.folder / part
            folder.mkdir(parents=True, exist_ok=True)
            flat = pa.array(vectors[rows].reshape(-1), type=pa.float32())
            table = pa.table(
                {
                    "key": pa.array([keys[i] for i in rows], pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                }
            )
            tmp = folder / f"{TMP_PREFIX}{name}"
            pq.write_table(table, tmp)
            os.replace(tmp, folder / name)
        return len(by_part)


def encode_cached(
    encode: Any, texts: list[str], cache: EmbeddingCache | None
) -> tuple[np.ndarray, dict[str, int]]:
    """Vectors for `texts` (in order): each distinct text embedded at most once, and not at all
    when the cache has it. `encode(list_of_texts) -> matrix`. Returns (vectors, counts)."""
    if not texts:
        return encode([]), {"texts": 0, "embedded": 0, "cache_hits": 0, "duplicates_in_shard": 0}
    keys = text_keys(texts)
    unique: dict[str, int] = {}
    for i, k in enumerate(keys):
        unique.setdefault(k, i)
    found = cache.lookup(list(unique)) if cache is not None else {}
    missing = [k for k in unique if k not in found]
    if missing:
        fresh = encode([texts[unique[k]] for k in missing])
        if cache is not None:
            cache.add(missing, fresh)
        found.update(zip(missing, fresh, strict=True))
    counts = {
        "texts": len(texts),
        "embedded": len(missing),
        "cache_hits": len(unique) - len(missing),
        "duplicates_in_shard": len(texts) - len(unique),
    }
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False), counts
