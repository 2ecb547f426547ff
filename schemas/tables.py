"""Arrow schemas of every table the pipeline writes. These are the data contracts."""

from __future__ import annotations

import pyarrow as pa

PASSAGES = pa.schema(
    [
        pa.field("passage_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("source_id", pa.string()),
        pa.field("metadata", pa.string()),  # JSON object of the user's extra columns
        # `input.document_column`: passages cut from one document (never each other's negatives)
        pa.field("document_id", pa.string()),
    ]
)

# pairs mode: one row per valid (query, positive) input row; the positive is also a passage
PAIRS = pa.schema(
    [
        pa.field("query", pa.string(), nullable=False),
        pa.field("passage_id", pa.string(), nullable=False),  # the positive's passage_id
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # file, or passage_id/query_id
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("raw", pa.string()),  # truncated
    ]
)

CLUSTERS = pa.schema(
    [
        pa.field("passage_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),  # passage_id of the canonical member
        pa.field("kind", pa.string(), nullable=False),  # exact | near | semantic
        pa.field("similarity", pa.float32(), nullable=False),
        pa.field("is_canonical", pa.bool_(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)

QUERIES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("passage_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("style", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),  # JSON of the sampling parameters
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("attempt", pa.int8(), nullable=False),  # 1 = first try, 2 = after one retry
        pa.field("output_tokens", pa.int32(), nullable=False),
    ]
)

# Passages the LLM wrote for a query at a relevance level (graded negatives), with provenance.
GENERATED = pa.schema(
    [
        pa.field("passage_id", pa.string(), nullable=False),  # "gen-" + hash
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("grade", pa.int8(), nullable=False),  # the level it was written at
        pa.field("model", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("attempt", pa.int8(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
    ]
)


# Queries removed as near-duplicates of another (tasks.query_dedup).
QUERY_DUPLICATES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("duplicate_of", pa.string(), nullable=False),  # the query kept in its place
        pa.field("positive_id", pa.string(), nullable=False),  # the removed query's positive
        pa.field("similarity", pa.float32(), nullable=False),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


CANDIDATES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("passage_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("positive_score", pa.float32(), nullable=False),
        # the embedder's score when a cross-encoder rescored the candidate, else null
        pa.field("retrieval_score", pa.float32()),
        # 1-based rank of the query's positive among the corpus, its copies not counted
        pa.field("positive_rank", pa.int32()),
        # rank among eligible candidates; null when excluded before ranking
        pa.field("rank", pa.int32()),
        # shingle Jaccard to the positive when in its duplicate cluster, else null
        pa.field("cluster_similarity", pa.float32()),
        pa.field("origin", pa.string(), nullable=False),  # mined | generated | given
        pa.field("grade", pa.int8()),  # 0 = irrelevant .. 3 = fully relevant; null = ungraded
        pa.field("verdict", pa.string()),  # LLM judge: true_negative | false_negative | unsure
        pa.field("judge_reason", pa.string()),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),  # why it was not kept; null when kept
    ]
)

NEGATIVE = pa.struct(
    [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("grade", pa.int8()),
        pa.field("score", pa.float32()),
        pa.field("origin", pa.string()),
        pa.field("cluster_similarity", pa.float32()),  # null: not a sibling of the positive
        pa.field("verdict", pa.string()),  # null: not judged
    ]
)

TRIPLETS = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("style", pa.string(), nullable=False),
        pa.field("positive_id", pa.string(), nullable=False),
        pa.field("positive", pa.string(), nullable=False),
        pa.field("positive_score", pa.float32(), nullable=False),
        pa.field("positive_rank", pa.int32()),  # round-trip rank of the positive (1 = first)
        pa.field("negatives", pa.list_(NEGATIVE), nullable=False),
        # mined passages the LLM judge found to answer the query (judge.on_false_negative relabel)
        pa.field("extra_positives", pa.list_(NEGATIVE), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | eval
    ]
)
