import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.config import DedupConfig
from schemas.tables import CLUSTERS, PASSAGES
from tasks.dedup import deduplicate, exact_dedup
from tasks.text import jaccard, shingle_set
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


WORDS = [f"word{i}" for i in range(60)]


def variant(changes: dict[int, str]) -> str:
    return " ".join(changes.get(i, w) for i, w in enumerate(WORDS))


def test_near_duplicates_are_clustered_verified_and_kept():
    base = " ".join(WORDS)
    near = variant({59: "end"})  # Jaccard 57/59
    sibling = variant({10: "x", 30: "y"})  # Jaccard 52/64 = 0.81
    far = variant({i: f"z{i}" for i in range(0, 60, 4)})  # every 4th word: far below 0.7
    table = passages([base, "unrelated text about sockets and ports", near, sibling, far])
    result = deduplicate(table, DedupConfig(near_threshold=0.7))
    assert result.deduplicated == 0 and result.passages.num_rows == 5  # near copies stay
    rows = {c["row"]: c for c in result.clusters.to_pylist()}
    assert set(rows) == {0, 2, 3}
    assert rows[0]["is_canonical"] and rows[0]["similarity"] == 1.0
    assert {rows[2]["kind"], rows[3]["kind"]} == {"near"}
    assert rows[2]["similarity"] == pytest.approx(57 / 59, abs=1e-6)
    assert rows[3]["similarity"] == pytest.approx(52 / 64, abs=1e-6)
    assert len({c["cluster_id"] for c in rows.values()}) == 1


def test_exact_and_near_members_share_one_cluster():
    base = " ".join(WORDS)
    table = passages([base, base.upper() + "!", variant({59: "end"})])
    result = deduplicate(table, DedupConfig())
    assert result.deduplicated == 1
    kinds = sorted((c["row"], c["kind"]) for c in result.clusters.to_pylist())
    assert kinds == [(0, "exact"), (1, "exact"), (2, "near")]
    assert len(set(result.clusters.column("cluster_id").to_pylist())) == 1


def test_shingles_and_jaccard():
    assert shingle_set("A b, C d!", 3) == frozenset({"a b c", "b c d"})
    assert shingle_set("two words", 3) == frozenset({"two words"})
    assert shingle_set("...", 3) == frozenset()
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)


def test_bad_band_count_is_a_config_error():
    with pytest.raises(ValueError, match="num_bands"):
        DedupConfig(num_perm=128, num_bands=30)


def test_identical_ids_collapse_even_with_both_modes_off():
    table = passages(["same text here", "other text here", "same text here"])
    result = deduplicate(table, DedupConfig(exact=False, near=False))
    assert result.passages.column("row").to_pylist() == [0, 1]
    assert result.deduplicated == 1


def test_kind_is_exact_only_for_members_with_an_exact_twin():
    base = " ".join(WORDS)
    sibling = variant({59: "end"})
    table = passages([base, sibling, sibling.upper() + "!"])
    result = deduplicate(table, DedupConfig())
    kinds = sorted((c["row"], c["kind"]) for c in result.clusters.to_pylist())
    assert kinds == [(0, "near"), (1, "exact"), (2, "exact")]
    assert result.deduplicated == 1


def test_folding_keeps_words_with_combining_marks_whole():
    # Python's \\W splits on combining marks; Polars' does not: one folding is used everywhere
    assert shingle_set("हिन्दी भाषा", 3) == frozenset({"हिन्दी भाषा"})


def test_semantic_clusters_join_paraphrases_and_merge_existing_clusters():
    import numpy as np

    from tasks.semantic import semantic_clusters

    def unit(v):
        v = np.asarray(v, dtype=np.float32)
        return v / np.linalg.norm(v)

    table = passages(["alpha text one", "alpha text two", "beta", "gamma one", "gamma two"])
    ids = table["passage_id"].to_pylist()
    # 0 ~ 1 (cosine 0.97); 2 apart; 3, 4 already an exact-kind cluster; 4 ~ 2? no.
    vecs = np.stack(
        [
            unit([1, 0, 0]),
            unit([0.97, np.sqrt(1 - 0.97**2), 0]),
            unit([0, 0, 1]),
            unit([0, 1, 0]),
            unit([0, 1, 0.01]),
        ]
    )
    old = pa.Table.from_pylist(
        [
            {
                "passage_id": ids[3],
                "cluster_id": ids[3],
                "kind": "exact",
                "similarity": 1.0,
                "is_canonical": True,
                "source": "f",
                "row": 3,
            },
            {
                "passage_id": ids[4],
                "cluster_id": ids[3],
                "kind": "exact",
                "similarity": 1.0,
                "is_canonical": False,
                "source": "f",
                "row": 4,
            },
        ],
        schema=CLUSTERS,
    )
    out = pl.from_arrow(semantic_clusters(old, table, ids, vecs, threshold=0.95))
    by_id = {r["passage_id"]: r for r in out.iter_rows(named=True)}
    assert ids[2] not in by_id  # nothing is within 0.95 of it
    assert by_id[ids[0]]["cluster_id"] == by_id[ids[1]]["cluster_id"] == ids[0]
    assert by_id[ids[1]]["kind"] == "semantic"
    assert by_id[ids[1]]["similarity"] == pytest.approx(0.97, abs=1e-4)
    assert by_id[ids[0]]["is_canonical"] and not by_id[ids[1]]["is_canonical"]
    assert by_id[ids[4]]["kind"] == "exact" and by_id[ids[4]]["cluster_id"] == ids[3]
    # a threshold just above the pair's cosine joins nothing new
    same = semantic_clusters(old, table, ids, vecs, threshold=0.971)
    assert pl.from_arrow(same)["passage_id"].to_list() == [ids[3], ids[4]]


def _corpus_with_duplicates(n: int) -> list[str]:
    """Distinct 40-word texts, with near copies, case/punctuation copies and identical copies
    of some of them spread through the list, and one text with no words."""
    import random

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(n)]
    for i in range(0, n - 3, 10):
        words = texts[i].split()
        words[rng.randrange(40)] = "changed"
        texts[i + 1] = " ".join(words)  # near copy (Jaccard ~0.9)
        texts[i + 2] = texts[i].upper() + "!"  # exact copy after folding
    texts[n - 1] = texts[0]  # identical copy, far from its original
    texts[n // 2 + 5] = "... !!! ..."  # no words at all (not one of the copied texts)
    return texts


def test_streaming_plan_over_shards_equals_the_whole_table(tmp_path):
    """plan_dedup over Parquet shards read in small batches decides exactly what dedup over
    the whole table decides: the same kept rows and the same clusters."""
    import pyarrow.parquet as pq

    from tasks import dedup

    table = passages(_corpus_with_duplicates(120))
    whole = deduplicate(table, DedupConfig())
    files = []
    for k, start in enumerate(range(0, table.num_rows, 50)):
        files.append(str(tmp_path / f"s{k}.parquet"))
        pq.write_table(table.slice(start, 50), files[-1])
    old_batch = dedup.SIGNATURE_BATCH
    dedup.SIGNATURE_BATCH = 16  # several batches per shard
    try:
        plan = dedup.plan_dedup(files, DedupConfig())
    finally:
        dedup.SIGNATURE_BATCH = old_batch
    kept_rows = [r["shard"] * 50 + r["position"] for r in plan.keep.to_pylist()]
    assert sorted(kept_rows) == whole.passages["row"].to_pylist()
    assert plan.deduplicated == whole.deduplicated == 12 + 1
    assert plan.clusters.sort_by("row").equals(whole.clusters.sort_by("row"))
    rows, kinds = whole.clusters["row"].to_pylist(), whole.clusters["kind"].to_pylist()
    kinds = dict(zip(rows, kinds, strict=True))
    assert kinds[0] == "exact" and kinds[1] == "near" and kinds[2] == "exact"
    assert 65 not in kinds  # the text with no words joins no cluster


def test_lsh_candidates_are_exactly_the_pairs_sharing_a_band():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    from tasks.minhash import lsh_candidates

    @settings(max_examples=60, deadline=None)
    @given(
        arrays(
            np.uint64, st.tuples(st.integers(0, 30), st.integers(1, 4)), elements=st.integers(0, 5)
        )
    )
    def check(bands):
        n = bands.shape[0]
        expected = {
            (i, j) for i in range(n) for j in range(i + 1, n) if (bands[i] == bands[j]).any()
        }
        got = lsh_candidates(bands)
        assert got.dtype == np.int64
        assert [tuple(p) for p in got.tolist()] == sorted(expected)

    check()


def test_polars_shingles_are_the_python_shingles():
    """The signatures' shingles (made in Polars) are the verification's (made in Python)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tasks.minhash import shingle_hashes
    from tasks.text import fold_many, shingles_of

    words = st.sampled_from(["a", "b", "c", "dé", "x-y", "Z", "42"])

    @settings(max_examples=80, deadline=None)
    @given(
        st.lists(st.lists(words, min_size=1, max_size=8).map(" ".join), min_size=1, max_size=6),
        st.integers(1, 4),
    )
    def check(texts, size):
        folded = [f for f in fold_many(texts) if f]
        if not folded:
            return
        hashes, offsets = shingle_hashes(pl.Series(folded), size)
        assert len(offsets) == len(folded) + 1
        for k, text in enumerate(folded):
            mine = set(hashes[offsets[k] : offsets[k + 1]].tolist())
            python = pl.Series(sorted(shingles_of(text, size))).hash(seed=3).to_list()
            assert mine == set(python)

    check()
