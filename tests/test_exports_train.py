"""The exports with the tools they are made for: a small pairs-mode run (real MiniLM, local
executor), then sentence-transformers training on the sentence_transformers and listwise exports,
FlagEmbedding's own data loader on the FlagEmbedding JSONL, and sentence-transformers'
InformationRetrievalEvaluator on the BEIR export."""

from __future__ import annotations

import csv
import json
import math

import polars as pl
import pyarrow as pa
import pytest

from schemas.tables import TRIPLETS
from tasks.exports import beir_files, corpus_ids, to_beir, to_flagembedding_lines
from tests.conftest import pairs_mode_config
from tests.helpers import sample_rows

NUM_NEGATIVES = 3


def _neg(pid, grade, origin="mined", score=0.5):
    return {
        "id": pid,
        "text": f"text of {pid}",
        "grade": grade,
        "score": score,
        "origin": origin,
        "cluster_similarity": None,
        "verdict": None,
    }


def _triplet(query_id, query, positive_id, negatives, split="train", extra=()):
    return {
        "query_id": query_id,
        "query": query,
        "style": "question",
        "positive_id": positive_id,
        "positive": f"text of {positive_id}",
        "positive_score": 0.9,
        "positive_rank": 1,
        "negatives": negatives,
        "extra_positives": list(extra),
        "split": split,
    }


def test_beir_qrels_are_graded_and_the_corpus_holds_every_passage():
    triplets = pa.Table.from_pylist(
        [
            _triplet(
                "q1",
                "how to parse json",
                "p1",
                [
                    _neg("m1", None),  # mined, unjudged: corpus only
                    _neg("g2", 2, "generated"),  # partial answer: graded qrel
                    _neg("g1", 1, "generated"),
                    _neg("g0", 0, "generated"),  # relevance 0: corpus only
                    _neg("m2", 1, "mined"),  # judged true negative with a grade
                ],
                extra=[_neg("x1", 3), _neg("x2", None)],  # relabelled positives
            ),
            # pairs mode: the same query text with a second positive is the same BEIR query
            _triplet("q0", "how to parse json", "p2", [_neg("m1", None)]),
            _triplet("q3", "read a csv file", "p3", [_neg("p1", None)], split="eval"),
        ],
        schema=TRIPLETS,
    )
    titles = pa.table({"passage_id": ["p1", "m1"], "title": ["JSON", None]})
    beir = to_beir(triplets, top_grade=3, titles=titles)

    corpus = {r["_id"]: r for r in beir.corpus.to_pylist()}
    assert sorted(corpus) == sorted(["p1", "p2", "p3", "m1", "m2", "g0", "g1", "g2", "x1", "x2"])
    assert sorted(corpus) == sorted(set(corpus_ids(triplets)))
    assert corpus["p1"] == {"_id": "p1", "title": "JSON", "text": "text of p1"}
    assert corpus["m1"]["title"] == "" and corpus["g2"]["title"] == ""
    assert beir.queries.to_pylist() == [
        {"_id": "q0", "text": "how to parse json"},
        {"_id": "q3", "text": "read a csv file"},
    ]
    qrels = [tuple(r.values()) for r in beir.qrels.to_pylist()]
    assert qrels == [
        ("eval", "q3", "p3", 3),
        ("train", "q0", "g1", 1),
        ("train", "q0", "g2", 2),
        ("train", "q0", "m2", 1),
        ("train", "q0", "p1", 3),
        ("train", "q0", "p2", 3),
        ("train", "q0", "x1", 3),
        ("train", "q0", "x2", 3),
    ]

    files = beir_files(beir)
    assert sorted(files) == ["corpus.jsonl", "qrels/eval.tsv", "qrels/train.tsv", "queries.jsonl"]
    assert files["qrels/eval.tsv"].decode() == "query-id\tcorpus-id\tscore\nq3\tp3\t3\n"
    lines = files["corpus.jsonl"].decode().splitlines()
    assert [json.loads(line)["_id"] for line in lines] == sorted(corpus)
    assert list(json.loads(lines[0])) == ["_id", "title", "text"]
    assert beir_files(to_beir(triplets, 3, titles)) == files  # deterministic bytes


def test_beir_of_no_triplets_is_empty_files():
    files = beir_files(to_beir(TRIPLETS.empty_table(), 3))
    assert files == {"corpus.jsonl": b"", "queries.jsonl": b""}


def test_flagembedding_rows_without_a_plain_negative_are_left_out():
    """FlagEmbedding's dataset divides by len(neg): a row whose only negative partly answers
    its query (grade above max_grade) has no line."""
    triplets = pa.Table.from_pylist(
        [
            _triplet("q1", "how to parse json", "p1", [_neg("g2", 2, "generated")]),
            _triplet("q2", "read a csv file", "p2", [_neg("g2", 2, "generated"), _neg("m1", None)]),
        ],
        schema=TRIPLETS,
    )
    lines = to_flagembedding_lines(triplets, max_grade=1)["train"]
    assert [json.loads(line)["neg"] for line in lines] == [["text of m1"]]
    assert len(to_flagembedding_lines(triplets, max_grade=2)["train"]) == 2


# ---------------------------------------------------------------- the run and the trainers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pairs-mode run (no LLM) with a train and an eval split, every export."""
    from flows.build import run_local
    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    tmp = tmp_path_factory.mktemp("exports")
    rows = sample_rows(80)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:20]]
    corpus = [{"text": r["text"]} for r in rows[20:]]
    cfg = pairs_mode_config(
        tmp,
        pairs,
        corpus,
        mining={"num_negatives": NUM_NEGATIVES, "max_rank": 20},
        split={"eval_fraction": 0.25},
        output={
            "exports": ["sentence_transformers", "flagembedding", "listwise", "beir"],
            "shard_size": 64,
        },
    )
    embedder = Embedder(
        str(minilm_path()), "all-MiniLM-L6-v2", "cpu", 2, resolve_precision("auto", "cpu")
    )
    run_dir, doc = run_local(cfg, embedder=embedder)
    assert set(doc["stages"]["assemble"]["extra"]["splits"]) == {"train", "eval"}, doc["stages"]
    return run_dir, doc


@pytest.fixture
def one_thread():
    """Torch on one thread: these batches are tiny, and on a shared CPU more threads only wait
    for each other (several times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, after):
    return [k for k in before if not bool((before[k] == after[k]).all())]


def _args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_beir_export_is_written_and_counted(run):
    run_dir, doc = run
    beir = run_dir / "exports" / "beir"
    stats = doc["stages"]["assemble"]["extra"]["exports"]["beir"]
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").open()]
    queries = [json.loads(line) for line in (beir / "queries.jsonl").open()]
    assert stats["corpus"] == len(corpus) > 0
    assert sum(stats["rows"].values()) == len(queries)
    triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
    ids = set(triplets["positive_id"]) | set(
        triplets.explode("negatives").unnest("negatives")["id"].drop_nulls()
    )
    assert {c["_id"] for c in corpus} == ids
    assert len(queries) == triplets["query"].n_unique()
    for split in ("train", "eval"):
        with (beir / "qrels" / f"{split}.tsv").open() as f:
            rows = list(csv.reader(f, delimiter="\t"))
        assert rows[0] == ["query-id", "corpus-id", "score"]
        assert len(rows) - 1 == stats["qrels"][split]
        assert {r[2] for r in rows[1:]} == {"3"}  # pairs mode: positives only, top grade
        in_split = triplets.filter(pl.col("split") == split)
        assert {r[0] for r in rows[1:]} == set(in_split["query_id"])
        assert {r[1] for r in rows[1:]} == set(in_split["positive_id"])


@pytest.mark.slow
def test_sentence_transformers_export_trains_with_multiple_negatives_ranking_loss(
    run, tmp_path, one_thread
):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers

    from tasks.models import minilm_path

    run_dir, _ = run
    train = Dataset.from_parquet(
        str(run_dir / "exports" / "sentence_transformers" / "train.parquet"),
        cache_dir=str(tmp_path / "hf"),
    )
    assert train.column_names == ["anchor", "positive"] + [
        f"negative_{i + 1}" for i in range(NUM_NEGATIVES)
    ]
    assert train.num_rows >= 4  # two steps of two
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = 128
    before = _weights(model)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=_args(
            SentenceTransformerTrainingArguments,
            tmp_path,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
        ),
        train_dataset=train,
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    result = trainer.train()
    assert result.global_step == 2
    assert len(_losses(trainer)) == 2
    assert all(math.isfinite(x) and x > 0 for x in _losses(trainer))
    assert _changed(before, _weights(model))


@pytest.mark.slow
def test_listwise_export_trains_a_cross_encoder_with_lambda_loss(run, tmp_path, one_thread):
    """LambdaLoss (sentence-transformers' cross-encoder list-wise losses) optimises NDCG over a
    query's graded list: the listwise export's (query, passages, grades) as they are, once
    ungraded mined negatives are read as grade 0. No cross-encoder ships with the project, so
    one is built from the bundled MiniLM (a seeded new head)."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )

    from tasks.models import minilm_path

    run_dir, _ = run
    listwise = Dataset.from_parquet(
        str(run_dir / "exports" / "listwise" / "train.parquet"), cache_dir=str(tmp_path / "hf")
    )
    assert listwise.column_names == ["query", "passages", "grades", "scores"]
    row = listwise[0]
    assert row["grades"][0] == 3 and len(row["grades"]) == len(row["passages"]) > 1
    train = listwise.map(
        lambda r: {"labels": [float(g or 0) for g in r["grades"]]},
        remove_columns=["grades", "scores"],
    )
    torch.manual_seed(0)
    model = CrossEncoder(str(minilm_path()), num_labels=1, max_length=128, device="cpu")
    before = _weights(model)
    trainer = CrossEncoderTrainer(
        model=model,
        args=_args(CrossEncoderTrainingArguments, tmp_path),
        train_dataset=train,
        loss=losses.LambdaLoss(model),
    )
    trainer.train()
    assert len(_losses(trainer)) == 2
    assert all(math.isfinite(x) for x in _losses(trainer))
    changed = _changed(before, _weights(model))
    assert any(not k.startswith("classifier") for k in changed), changed  # the encoder learnt


@pytest.mark.slow
def test_flagembedding_jsonl_loads_with_flagembedding_own_dataset(run, tmp_path):
    """FlagEmbedding's fine-tuning dataset and collator (the classes its embedder runner uses),
    with knowledge distillation on, so pos_scores / neg_scores are read too."""
    from FlagEmbedding.abc.finetune.embedder import (
        AbsEmbedderCollator,
        AbsEmbedderDataArguments,
        AbsEmbedderTrainDataset,
    )
    from transformers import AutoTokenizer

    from tasks.models import minilm_path

    run_dir, doc = run
    group = NUM_NEGATIVES + 1
    args = AbsEmbedderDataArguments(
        train_data=[str(run_dir / "exports" / "flagembedding")],  # a folder: every split file
        cache_path=str(tmp_path / "hf"),
        train_group_size=group,
        knowledge_distillation=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    dataset = AbsEmbedderTrainDataset(args, tokenizer)
    rows = doc["stages"]["assemble"]["extra"]["exports"]["flagembedding"]["rows"]
    assert len(dataset) == sum(rows.values()) > 0
    items = [dataset[i] for i in range(len(dataset))]
    for query, passages, teacher_scores in items:
        assert isinstance(query, str) and query
        assert len(passages) == group and all(isinstance(p, str) and p for p in passages)
        assert len(teacher_scores) == group
        assert all(isinstance(s, float) and math.isfinite(s) for s in teacher_scores)
    batch = AbsEmbedderCollator(tokenizer=tokenizer, query_max_len=32, passage_max_len=128)(
        items[:4]
    )
    assert batch["queries"]["input_ids"].shape[0] == 4
    assert batch["passages"]["input_ids"].shape[0] == 4 * group
    assert len(batch["teacher_scores"]) == 4 * group


@pytest.mark.slow
def test_beir_export_evaluates_with_information_retrieval_evaluator(run, one_thread):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from tasks.models import minilm_path

    run_dir, _ = run
    beir = run_dir / "exports" / "beir"
    corpus = {
        r["_id"]: (r["title"] + " " + r["text"]).strip()
        for r in map(json.loads, (beir / "corpus.jsonl").open())
    }
    queries = {r["_id"]: r["text"] for r in map(json.loads, (beir / "queries.jsonl").open())}
    relevant: dict[str, set[str]] = {}
    with (beir / "qrels" / "eval.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                relevant.setdefault(row["query-id"], set()).add(row["corpus-id"])
    assert relevant and set(relevant) <= set(queries)
    assert all(doc_id in corpus for docs in relevant.values() for doc_id in docs)
    evaluator = InformationRetrievalEvaluator(
        queries={q: queries[q] for q in relevant},
        corpus=corpus,
        relevant_docs=relevant,
        name="eval",
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[10],
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        show_progress_bar=False,
        batch_size=16,
    )
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    metrics = evaluator(model)
    # random ranking: ndcg@10 about 0.14 and accuracy@10 about 0.3 on a corpus of ~33 passages
    assert metrics["eval_cosine_ndcg@10"] > 0.3, metrics
    assert metrics["eval_cosine_accuracy@10"] > 0.5, metrics  # most positives are found
