"""The reason vocabulary: why a row was rejected or a candidate was not kept.

Every reject row and every candidate that is not a negative carries exactly one of these, so the
same word means the same thing in the manifest, the report and a DuckDB query.
"""

from __future__ import annotations

# Candidates (tasks.mine): the first rule that removed each one, in the order they apply.
IS_POSITIVE = "is_positive"
OTHER_POSITIVE = "other_positive"  # another known positive of the same (or a near-identical) query
DUPLICATE_OF_POSITIVE = "duplicate_of_positive"
SEMANTIC_DUPLICATE = "semantic_duplicate_of_positive"
SAME_DOCUMENT = "same_document"  # cut from the positive's own document (input.document_column)
OUTSIDE_RANK_RANGE = "outside_rank_range"
ABOVE_POSITIVE_RATIO = "above_positive_ratio"
WITHIN_MARGIN = "within_margin"
ABOVE_MAX_SCORE = "above_max_score"
COPIES_QUERY = "copies_query"
RELABELED = "relabeled_positive"  # a mined candidate the judge found to answer its query
ANSWERS_QUERY = "answers_query"  # the judge found it answers the query: dropped
JUDGED_UNSURE = "judged_unsure"
BEYOND_NUM_NEGATIVES = "beyond_num_negatives"
EVAL_POSITIVE = "eval_positive"  # a train negative in the cluster of an eval positive

CANDIDATE_REASONS = (
    IS_POSITIVE,
    OTHER_POSITIVE,
    DUPLICATE_OF_POSITIVE,
    SEMANTIC_DUPLICATE,
    SAME_DOCUMENT,
    OUTSIDE_RANK_RANGE,
    ABOVE_POSITIVE_RATIO,
    WITHIN_MARGIN,
    ABOVE_MAX_SCORE,
    COPIES_QUERY,
    RELABELED,
    ANSWERS_QUERY,
    JUDGED_UNSURE,
    BEYOND_NUM_NEGATIVES,
)

# Queries rejected by mining (a candidate of a rejected query carries the query's reason).
FAILED_CONSISTENCY = "failed_consistency"
TOO_EASY = "too_easy"
TOO_GENERIC = "too_generic"
TOO_FEW_NEGATIVES = "too_few_negatives"
DUPLICATE_QUERY = "duplicate_query"  # query dedup (tasks.query_dedup)
EVAL_NEGATIVES_ONLY = "eval_negatives_only"  # assemble: a train query whose negatives all leaked

QUERY_REASONS = (FAILED_CONSISTENCY, TOO_EASY, TOO_GENERIC, TOO_FEW_NEGATIVES)
