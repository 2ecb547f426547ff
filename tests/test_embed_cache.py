"""Never embed the same text twice: duplicates in a shard, a second dataset over the same corpus
(other shards, so the stage cache cannot help) and a re-run with new mining settings cost no
model time; counted by the model calls the manifest records."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.build import run_local
from tasks.embed_cache import EmbeddingCache, encode_cached, text_keys
from tasks.embedder import table_to_matrix
from tests.conftest import pairs_mode_config
from tests.helpers import sample_rows


class CountingEncoder:
    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen += texts
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], np.float32).reshape(-1, 3)


def test_each_distinct_text_is_embedded_once_and_then_never_again(tmp_path):
    texts = ["alpha", "beta", "alpha", "gamma", "beta", "delta"]
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path, "model-a")
    vectors, counts = encode_cached(enc, texts, cache)
    assert sorted(enc.seen) == ["alpha", "beta", "delta", "gamma"]
    assert counts == {"texts": 6, "embedded": 4, "cache_hits": 0, "duplicates_in_shard": 2}
    np.testing.assert_array_equal(vectors, enc(texts))  # in order, duplicates filled in
    again = CountingEncoder()
    vectors2, counts2 = encode_cached(again, ["delta", "alpha", "epsilon"], cache)
    assert again.seen == ["epsilon"] and counts2["cache_hits"] == 2
    np.testing.assert_array_equal(vectors2, enc(["delta", "alpha", "epsilon"]))
    # another model (or prefix) has its own vectors
    other = CountingEncoder()
    encode_cached(other, ["alpha"], EmbeddingCache(tmp_path, "model-b"))
    assert other.seen == ["alpha"]
    # files are spread over partitions by the text's key, none left temporary
    parts = {p.parent.name for p in (tmp_path / "model-a").rglob("*.parquet")}
    assert parts == {k[:2] for k in text_keys(["alpha", "beta", "gamma", "delta", "epsilon"])}
    assert not list(tmp_path.rglob(".tmp-*"))


def test_no_texts_and_no_cache(tmp_path):
    enc = CountingEncoder()
    vectors, counts = encode_cached(enc, [], EmbeddingCache(tmp_path, "m"))
    assert vectors.shape == (0, 3) and counts["embedded"] == 0
    vectors, counts = encode_cached(enc, ["x", "x"], None)
    assert enc.seen == ["x"] and counts["cache_hits"] == 0 and vectors.shape == (2, 3)


@pytest.fixture(scope="module")
def embedder():
    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    return Embedder(
        str(minilm_path()), "all-MiniLM-L6-v2", "cpu", 2, resolve_precision("auto", "cpu")
    )


def items(doc: dict, stage: str) -> int:
    return doc.get("model_calls", {}).get(stage, {}).get("embedder", {}).get("items", 0)


def vectors_by_id(run_dir, prefix):
    out = {}
    for path in sorted((run_dir / "embeddings").glob(f"{prefix}-*.parquet")):
        ids, matrix = table_to_matrix(pq.read_table(path))
        out.update(zip(ids, matrix, strict=True))
    return out


@pytest.mark.slow
def test_a_second_dataset_over_the_same_corpus_costs_no_model_time(tmp_path, embedder):
    rows = sample_rows(50)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:10]]
    pairs.append({"query": pairs[0]["query"], "positive": rows[10]["text"]})  # a repeated query
    corpus = [{"text": r["text"]} for r in rows[10:]]

    def config(shard_size, **sections):
        return pairs_mode_config(
            tmp_path,
            pairs,
            corpus,
            output={"dir": str(tmp_path / "runs"), "shard_size": shard_size},
            **sections,
        )

    first_dir, first = run_local(config(8), embedder=embedder)
    passages = first["stages"]["embed_passages"]["rows_in"]
    assert items(first, "embed_passages") == passages  # every passage once
    # 11 queries, one text twice (in one shard or two): embedded once
    queries = first["stages"]["embed_queries"]
    assert queries["rows_in"] == 11 and items(first, "embed_queries") == 10
    assert queries["extra"]["duplicates_in_shard"] + queries["extra"]["cache_hits"] == 1
    # other shards (shard size 16): the stage cache has none of them, the embedding cache all
    second_dir, second = run_local(config(16, mining={"num_negatives": 2}), embedder=embedder)
    assert second["stages"]["embed_passages"]["skipped_shards"] == 0
    assert items(second, "embed_passages") == 0 and items(second, "embed_queries") == 0
    assert second["stages"]["embed_passages"]["extra"]["cache_hits"] == passages
    a, b = vectors_by_id(first_dir, "passages"), vectors_by_id(second_dir, "passages")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # turned off, the model embeds everything again
    _, third = run_local(config(12, embedding={"cache": False}), embedder=embedder)
    assert items(third, "embed_passages") == passages
