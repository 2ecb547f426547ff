"""Query dedup on crafted vectors: near-identical queries for one positive (cluster) collapse;
near-identical queries for different positives, and one text with several positives, stay."""

import numpy as np
import pyarrow as pa
import pytest

from tasks.query_dedup import near_duplicate_queries


def unit_rows(*cosines_to_first: float) -> np.ndarray:
    """Row 0 = e0; row i has the given cosine to row 0 (and rows differ from each other)."""
    rows = [[1.0, 0.0, 0.0, 0.0]]
    for i, c in enumerate(cosines_to_first):
        s = np.sqrt(1 - c * c)
        v = [c, 0.0, 0.0, 0.0]
        v[1 + i % 3] = s
        rows.append(v)
    return np.asarray(rows, dtype=np.float32)


def queries(ids, positives, texts):
    return pa.table({"query_id": ids, "passage_id": positives, "query": texts})


@pytest.mark.parametrize("threshold,removed", [(0.95, True), (0.9501, False)])
def test_a_near_identical_query_for_the_same_positive_is_removed_at_the_threshold(
    threshold, removed
):
    table = queries(["a", "b"], ["p1", "p1"], ["how to copy a string", "how do I copy a string"])
    dups = near_duplicate_queries(table, unit_rows(0.95), threshold)
    assert (dups.column("query_id").to_pylist() == ["b"]) is removed
    if removed:
        assert dups.column("duplicate_of").to_pylist() == ["a"]
        assert dups.column("positive_id").to_pylist() == ["p1"]
        assert dups.column("similarity")[0].as_py() == pytest.approx(0.95, abs=1e-4)


def test_different_positives_and_one_text_with_several_positives_stay():
    table = queries(
        ["a", "b", "c", "d"],
        ["p1", "p2", "p3", "p1"],
        ["compress lz4 files", "compress xz files", "compress lz4 files", "Compress LZ4 files!"],
    )
    # b: near-identical text, another positive; c: the same text, another positive (pairs mode);
    # d: the same folded text and positive as a (a duplicate pair of rows would be one query)
    dups = near_duplicate_queries(table, unit_rows(0.97, 0.99, 0.999), 0.9)
    assert dups.num_rows == 0


def test_copies_of_the_positive_count_as_the_same_positive():
    table = queries(["a", "b"], ["p1", "p1-copy"], ["copy a string", "copy a string please"])
    assert near_duplicate_queries(table, unit_rows(0.96), 0.9).num_rows == 0
    dups = near_duplicate_queries(table, unit_rows(0.96), 0.9, cluster_of={"p1-copy": "p1"})
    assert dups.column("query_id").to_pylist() == ["b"]
