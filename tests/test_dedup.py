from schemas.tables import CLUSTERS, PASSAGES
from tasks.dedup import exact_dedup
from tests.helpers import passages


def test_exact_duplicates_collapse_to_first_member_with_clusters():
    table = passages(
        [
            "The json module encodes objects.",
            "Unrelated text about sockets.",
            "the JSON module encodes objects!",  # case + punctuation variant
            "The json module encodes objects.",  # identical text, same passage_id
            "The json module decodes objects.",  # one word differs: not an exact duplicate
        ]
    )
    result = exact_dedup(table)
    assert result.deduplicated == 2
    assert result.passages.column("row").to_pylist() == [0, 1, 4]
    assert result.clusters.schema.equals(CLUSTERS)
    clusters = result.clusters.to_pylist()
    assert sorted(c["row"] for c in clusters) == [0, 2, 3]
    assert {c["cluster_id"] for c in clusters} == {table["passage_id"][0].as_py()}
    assert [c["row"] for c in clusters if c["is_canonical"]] == [0]
    assert all(c["kind"] == "exact" and c["similarity"] == 1.0 for c in clusters)
    assert table.num_rows == result.passages.num_rows + result.deduplicated


def test_no_duplicates_and_empty_input():
    result = exact_dedup(passages(["one passage here", "two passage here"]))
    assert result.deduplicated == 0 and result.clusters.num_rows == 0
    empty = exact_dedup(PASSAGES.empty_table())
    assert empty.passages.num_rows == 0 and empty.deduplicated == 0
