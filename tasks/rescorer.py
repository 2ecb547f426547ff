"""The cross-encoder of the mining rescoring hook (`mining.rescore_model_path`)."""

from __future__ import annotations

import numpy as np

from tasks.memory import return_free_heap


class CrossEncoderModel:
    """A sentence-transformers CrossEncoder (the mining rescoring hook)."""

    def __init__(self, model_path: str, device: str, threads: int):
        import torch
        from sentence_transformers import CrossEncoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = CrossEncoder(model_path, device=device, local_files_only=True)

    def predict(self, queries: list[str], passages: list[str], batch_size: int) -> np.ndarray:
        if not queries:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict(
            list(zip(queries, passages, strict=True)),
            batch_size=batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return_free_heap()  # a long-lived worker: see tasks/memory.py
        return np.asarray(scores, dtype=np.float32).reshape(len(queries), -1)[:, 0]
