"""Embed: vectors for one shard of passages, queries or written passages, by the embedder worker.

One stage class serves the three datasets (`EmbedStage("passages")`, ...): the same model and
settings, each shard embedded once, its vectors in `embeddings.<dataset>`. Which backend runs the
model (torch, ONNX Runtime, OpenVINO, a server) is the embedder's identity, in the fingerprint
through `models()`; how texts are batched is in `settings()`.
"""

from __future__ import annotations

from typing import Any

from schemas.config import PipelineConfig
from tasks.embed_cache import EmbeddingCache, encode_cached, model_key
from tasks.embedder import embeddings_table
from tasks.stage import Job, Outcome, Stage

# dataset -> (id column, text column, which prefix of EmbeddingConfig)
KINDS = {
    "passages": ("passage_id", "text", "passage_prefix"),
    "queries": ("query_id", "query", "query_prefix"),
    "generated": ("passage_id", "text", "passage_prefix"),
}


class EmbedStage(Stage):
    # 2: batches of texts sorted by token length (sentence-transformers sorted by characters),
    # optionally by padded-token budget: the same vectors to rounding, not to the bit.
    version = "2"
    libraries = ("torch", "sentence-transformers", "transformers", "tokenizers")

    def __init__(self, dataset: str):
        if dataset not in KINDS:
            raise ValueError(f"nothing to embed in {dataset!r}; known: {sorted(KINDS)}")
        self.dataset = dataset
        self.name = f"embed_{dataset}"  # type: ignore[misc]
        self.sharded = (dataset,)  # type: ignore[misc]
        self.outputs = (f"embeddings.{dataset}",)  # type: ignore[misc]

    def enabled(self, cfg: PipelineConfig) -> bool:
        return self.dataset != "generated" or bool(cfg.generation.negative_levels)

    def settings(self, cfg: PipelineConfig) -> Any:
        emb = cfg.embedding
        return {
            "batch_size": emb.batch_size,
            "pad_to_multiple_of": emb.pad_to_multiple_of,
            "max_batch_tokens": emb.max_batch_tokens,
            "prefix": getattr(emb, KINDS[self.dataset][2]),
        }

    def models(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return ("embedder",)

    def run(self, job: Job) -> Outcome:
        id_col, text_col, prefix_field = KINDS[self.dataset]
        table = job.read(self.dataset, columns=[id_col, text_col])
        emb = job.cfg.embedding
        # passed only when set: an embedder object handed in may predate the argument
        budget = {"max_batch_tokens": emb.max_batch_tokens} if emb.max_batch_tokens else {}
        prefix = getattr(emb, prefix_field)

        def encode(texts: list[str]) -> Any:
            return job.models.embedder.encode(
                texts, emb.batch_size, prefix, emb.pad_to_multiple_of, **budget
            )

        cache = None
        if emb.cache:  # keyed by what decides a vector: the model as fingerprinted, the prefix
            key = model_key({"model": job.model_identity("embedder"), "prefix": prefix})
            cache = EmbeddingCache(job.shared_folder("embeddings"), key)
        vectors, counts = encode_cached(encode, table.column(text_col).to_pylist(), cache)
        job.write(
            f"embeddings.{self.dataset}", embeddings_table(table[id_col].to_pylist(), vectors)
        )
        return Outcome(rows_out=table.num_rows, stats=counts)
