import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from schemas.config import SplitConfig
from schemas.tables import CANDIDATES, CLUSTERS, QUERIES, TRIPLETS
from tasks.assemble import assemble_triplets, split_of
from tasks.exports import to_flagembedding_lines, to_sentence_transformers
from tests.helpers import passages


def build(eval_fraction=0.0):
    ps = passages(
        ["positive passage one", "negative passage a", "negative passage b", "other positive"]
    )
    pid = ps["passage_id"].to_pylist()
    queries = pa.Table.from_pylist(
        [
            {
                "query_id": "q1",
                "passage_id": pid[0],
                "query": "first?",
                "style": "question",
                "model": "m",
                "backend": "vllm",
                "prompt_version": "v",
                "sampling": "{}",
                "seed": 1,
                "output_tokens": 3,
            },
            {
                "query_id": "q2",
                "passage_id": pid[3],
                "query": "second?",
                "style": "question",
                "model": "m",
                "backend": "vllm",
                "prompt_version": "v",
                "sampling": "{}",
                "seed": 2,
                "output_tokens": 3,
            },
        ],
        schema=QUERIES,
    )

    def cand(q, p, score, rank, kept):
        return {
            "query_id": q,
            "passage_id": p,
            "score": score,
            "positive_score": 0.9,
            "rank": rank,
            "origin": "mined",
            "grade": None,
            "kept": kept,
            "reason": None if kept else "x",
        }

    cands = pa.Table.from_pylist(
        [
            cand("q1", pid[2], 0.5, 1, True),
            cand("q1", pid[1], 0.6, 0, True),
            cand("q1", pid[3], 0.4, 2, False),
            cand("q2", pid[1], 0.3, 0, True),
        ],
        schema=CANDIDATES,
    )
    return assemble_triplets(
        queries, ps, cands, CLUSTERS.empty_table(), SplitConfig(eval_fraction=eval_fraction)
    ), pid


def test_triplets_carry_negatives_best_first_with_texts():
    triplets, pid = build()
    assert triplets.schema.equals(TRIPLETS)
    rows = {r["query_id"]: r for r in triplets.to_pylist()}
    assert [n["id"] for n in rows["q1"]["negatives"]] == [pid[1], pid[2]]
    assert rows["q1"]["negatives"][0]["text"] == "negative passage a"
    assert rows["q1"]["positive"] == "positive passage one" and rows["q1"][
        "positive_score"
    ] == pytest.approx(0.9)
    assert len(rows["q2"]["negatives"]) == 1
    assert {r["split"] for r in rows.values()} == {"train"}


def test_split_is_deterministic_and_roughly_the_fraction():
    cfg = SplitConfig(eval_fraction=0.2, seed=3)
    splits = [split_of(f"c{i}", cfg) for i in range(2000)]
    assert splits == [split_of(f"c{i}", cfg) for i in range(2000)]
    assert 0.16 < splits.count("eval") / 2000 < 0.24
    assert {split_of("c", SplitConfig(eval_fraction=0.0))} == {"train"}


def test_exports_for_sentence_transformers_and_flagembedding():
    triplets, _ = build()
    st, skipped = to_sentence_transformers(triplets, 2)
    assert st.column_names == ["split", "anchor", "positive", "negative_1", "negative_2"]
    assert st.num_rows == 1 and skipped == 1
    assert st.to_pylist()[0]["negative_1"] == "negative passage a"
    lines = to_flagembedding_lines(triplets)["train"]
    first = json.loads(lines[0])
    assert set(first) >= {"query", "pos", "neg", "pos_scores", "neg_scores"}
    assert first["neg"] == ["negative passage a", "negative passage b"]
    assert len(first["neg_scores"]) == 2 and first["pos_scores"] == [first["pos_scores"][0]]


def test_leakage_report_counts_what_eval_shares_with_train():
    from tasks.assemble import leakage_report

    def neg(pid):
        return [
            {
                "id": pid,
                "text": "t",
                "grade": None,
                "score": 0.1,
                "origin": "mined",
                "cluster_similarity": None,
            }
        ]

    rows = [  # (query, positive_id, negatives, split)
        ("how do i parse json files in python quickly", "p1", neg("p3"), "train"),
        ("unrelated question about sockets and ports", "p2", neg("p9"), "eval"),
        ("where is the eval positive used elsewhere", "p3", neg("p8"), "eval"),
        ("how do i parse json files in python quickly?", "p4", neg("p7"), "eval"),
    ]
    triplets = pa.Table.from_pylist(
        [
            {
                "query_id": f"q{i}",
                "query": q,
                "style": "question",
                "positive_id": p,
                "positive": "x",
                "positive_score": 0.9,
                "negatives": n,
                "split": s,
            }
            for i, (q, p, n, s) in enumerate(rows)
        ],
        schema=TRIPLETS,
    )
    clusters = pa.Table.from_pylist(
        [
            {
                "passage_id": "p1",
                "cluster_id": "p1",
                "kind": "near",
                "similarity": 1.0,
                "is_canonical": True,
                "source": "f",
                "row": 0,
            },
            {
                "passage_id": "p2",
                "cluster_id": "p1",
                "kind": "near",
                "similarity": 0.8,
                "is_canonical": False,
                "source": "f",
                "row": 1,
            },
        ],
        schema=CLUSTERS,
    )
    report = leakage_report(triplets, clusters)
    assert report == {
        "positive_clusters_in_both": 1,  # p1 (train) and p2 (eval) are siblings
        "eval_positives_as_train_negatives": 1,  # p3
        "near_identical_queries_across_splits": 1,  # q0 / q3
    }
    clean = triplets.filter(pc.equal(triplets["split"], "train"))
    assert leakage_report(clean, clusters) == dict.fromkeys(report, 0)


def leak_inputs(seed: int):
    """Random queries over 30 passages in 10 clusters: query texts repeat across positives, and
    negatives are drawn from anywhere (so some are other queries' positives)."""
    import random

    rng = random.Random(seed)
    texts = [f"passage number {i} with some words" for i in range(30)]
    ps = passages(texts)
    pid = ps["passage_id"].to_pylist()
    clusters = pa.Table.from_pylist(
        [
            {
                "passage_id": p,
                "cluster_id": pid[(i // 3) * 3],
                "kind": "near",
                "similarity": 0.8,
                "is_canonical": i % 3 == 0,
                "source": "f",
                "row": i,
            }
            for i, p in enumerate(pid)
        ],
        schema=CLUSTERS,
    )
    query_texts = [f"question {k}" for k in range(3)]
    queries, cands = [], []
    for q in range(40):
        positive = rng.randrange(30)
        queries.append(
            {
                "query_id": f"q{q:02d}",
                "passage_id": pid[positive],
                # mostly a text of its own; now and then one shared with other queries
                "query": rng.choice(query_texts) if rng.random() < 0.1 else f"about {positive}",
                "style": "question",
                "model": "m",
                "backend": "b",
                "prompt_version": "v",
                "sampling": "{}",
                "seed": 0,
                "attempt": 1,
                "output_tokens": 1,
            }
        )
        for rank, n in enumerate(rng.sample([i for i in range(30) if i != positive], 3)):
            cands.append(
                {
                    "query_id": f"q{q:02d}",
                    "passage_id": pid[n],
                    "score": 0.5,
                    "positive_score": 0.9,
                    "rank": rank,
                    "origin": "mined",
                    "kept": True,
                    "reason": None,
                }
            )
    return (
        pa.Table.from_pylist(queries, schema=QUERIES),
        ps,
        pa.Table.from_pylist(cands, schema=CANDIDATES),
        clusters,
    )


@pytest.mark.parametrize("seed", range(5))
def test_splits_cannot_leak_a_query_text_or_a_positive_cluster(seed):
    from tasks.assemble import remove_eval_negatives

    queries, ps, cands, clusters = leak_inputs(seed)
    triplets = assemble_triplets(queries, ps, cands, clusters, SplitConfig(eval_fraction=0.4))
    rows = triplets.to_pylist()
    assert {r["split"] for r in rows} == {"train", "eval"}
    cluster_of = dict(
        zip(clusters["passage_id"].to_pylist(), clusters["cluster_id"].to_pylist(), strict=True)
    )
    for key in ("query", "positive_id"):
        sides: dict = {}
        for r in rows:
            value = r[key] if key == "query" else cluster_of[r[key]]
            sides.setdefault(value, set()).add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), key
    # train negatives that are (in the cluster of) an eval positive are removed, and counted
    eval_clusters = {cluster_of[r["positive_id"]] for r in rows if r["split"] == "eval"}
    leaked = sum(
        cluster_of[n["id"]] in eval_clusters
        for r in rows
        if r["split"] == "train"
        for n in r["negatives"]
    )
    assert leaked > 0  # the inputs do leak before the removal
    clean, removed, dropped = remove_eval_negatives(triplets, clusters)
    assert removed == leaked
    after = clean.to_pylist()
    assert all(
        cluster_of[n["id"]] not in eval_clusters
        for r in after
        if r["split"] == "train"
        for n in r["negatives"]
    )
    assert len(after) == len(rows) - len(dropped)
    assert all(r["negatives"] for r in after)
