"""The `build_dataset` Prefect flow: wires the stages of `tasks/`, fans shards out to Ray.

Each Prefect task reads its input shards from the run folder and writes its output shards there
(paths travel between tasks, tables never do). A task whose outputs already exist with the
expected fingerprint returns them without recomputing: re-running a run resumes it.

    ingest (per file) -> dedup (global) -> per passage shard: generate queries, embed passages
      -> per query shard: embed queries -> mine negatives -> assemble + export -> manifest
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from prefect import allow_failure, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_ray import RayTaskRunner

from flows import runtime
from schemas.config import LLM_TRANSPORT_FIELDS, PipelineConfig
from schemas.manifest import ShardInfo
from schemas.tables import (
    CANDIDATES,
    CLUSTERS,
    GENERATED,
    PAIRS,
    PASSAGES,
    QUERIES,
    REJECTS,
    TRIPLETS,
)
from tasks import assemble, dedup, embed, generate, ingest, judge, manifest, mine
from tasks import pairs as pair_queries
from tasks.io import (
    existing_shard,
    fingerprint,
    ids_in,
    read_tables,
    sha256_file,
    slice_table,
    write_parquet_atomic,
    write_sorted_shards,
)
from tasks.memory import releases_heap
from tasks.models import resolve_llm_path
from tasks.prompts import prompt_versions

log = logging.getLogger(__name__)
# Stage and shard progress for whoever listens (the CLI shows it live).
progress = logging.getLogger("tripletforge.progress")


def _part(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _reason_counts(table: pa.Table) -> dict[str, int]:
    return dict(collections.Counter(table.column("reason").to_pylist())) if table.num_rows else {}


def _reuse(*pairs: tuple[Path, str]) -> list[ShardInfo] | None:
    """ShardInfos when every (path, fingerprint) is already on disk, else None."""
    infos = [existing_shard(path, fp) for path, fp in pairs]
    return None if any(i is None for i in infos) else infos  # type: ignore[return-value]


def _reuse_parts(folder: Path, fp: str, count: int) -> list[ShardInfo] | None:
    """part-00000 .. part-<count-1> of `folder` when every one is on disk with `fp`."""
    return _reuse(*[(folder / _part(i), fp) for i in range(count)])


def _llm_identity(cfg: PipelineConfig, llm_path: str) -> list[Any]:
    """What decides an LLM's outputs (not where it is reached): part of fingerprints. The
    in-process engine's dtype counts as resolved (auto differs by hardware)."""
    llm = cfg.llm.model_dump(mode="json", exclude=LLM_TRANSPORT_FIELDS)
    if cfg.llm.backend == "vllm":
        llm["dtype"] = runtime.llm_settings(cfg)[1]
    return [llm_path if cfg.llm.backend == "vllm" else None, llm, prompt_versions()]


def _generate_outputs(
    shard: ShardInfo, index: int, limit: int, llm_path: str, cfg: PipelineConfig, run_dir: str
) -> tuple[str, list[Path]]:
    """(fingerprint, [queries, query rejects, generated passages, passage rejects]) of one
    generate shard."""
    generation = cfg.generation.model_dump(mode="json", exclude={"consistency_top_k"})
    fp = fingerprint(
        "generate",
        shard.sha256,
        limit,
        generation,
        cfg.grading.model_dump(mode="json"),
        *_llm_identity(cfg, llm_path),
    )
    root = Path(run_dir)
    return fp, [
        root / "queries" / _part(index),
        root / "rejects" / f"generate-{index:05d}.parquet",
        root / "generated" / _part(index),
        root / "rejects" / f"generate_passages-{index:05d}.parquet",
    ]


def _embed_output(
    shard: ShardInfo, kind: str, index: int, cfg: PipelineConfig, run_dir: str, precision: str
) -> tuple[str, Path]:
    """(fingerprint, path) of one embedding shard; `precision` is the resolved one (not auto)."""
    fp = fingerprint("embed", kind, shard.sha256, cfg.embedding.model_dump(mode="json"), precision)
    return fp, Path(run_dir) / "embeddings" / f"{kind}-{index:05d}.parquet"


def _embeddings_pending(
    passage_shards: list[ShardInfo],
    query_shards: list[ShardInfo],
    cfg: PipelineConfig,
    run_dir: str,
    precision: str,
    generated_shards: list[ShardInfo] | None = None,
) -> bool:
    """True when some passage, query or generated-passage embedding shard is not on disk yet."""
    wanted = [("passages", s, i) for i, s in enumerate(passage_shards)]
    wanted += [("queries", s, i) for i, s in enumerate(query_shards)]
    wanted += [("generated", s, i) for i, s in enumerate(generated_shards or [])]
    for kind, shard, i in wanted:
        fp, out = _embed_output(shard, kind, i, cfg, run_dir, precision)
        if existing_shard(out, fp) is None:
            return True
    return False


def _model_work_pending(
    passage_shards: list[ShardInfo],
    limits: list[int],
    llm_path: str,
    cfg: PipelineConfig,
    run_dir: str,
    precision: str,
) -> tuple[bool, bool]:
    """(LLM needed, embedder needed): False when every shard that model makes is on disk."""
    query_shards, generated_shards = [], []
    for i, shard in enumerate(passage_shards):
        fp, paths = _generate_outputs(shard, i, limits[i], llm_path, cfg, run_dir)
        done = _reuse(*[(p, fp) for p in paths])
        if done is None:
            return True, True
        query_shards.append(done[0])
        generated_shards.append(done[2])
    pending = _embeddings_pending(
        passage_shards, query_shards, cfg, run_dir, precision, generated_shards
    )
    return False, pending


# --- stage tasks ---------------------------------------------------------------------------------


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(
    path: str, index: int, cfg: PipelineConfig, run_dir: str, as_corpus: bool = False
) -> dict[str, Any]:
    """One input file. In pairs mode a pairs file also writes pairs/part-N; `as_corpus` reads a
    file of `input.corpus_paths` as plain passages."""
    start = time.perf_counter()
    input_cfg = cfg.input.model_copy(update={"mode": "passages"}) if as_corpus else cfg.input
    fp = fingerprint("ingest", sha256_file(path), input_cfg.model_dump(mode="json"))
    out = Path(run_dir) / "ingest" / _part(index)
    rej = Path(run_dir) / "rejects" / f"ingest-{index:05d}.parquet"
    pairs_out = Path(run_dir) / "pairs" / _part(index)
    with_pairs = input_cfg.mode == "pairs"
    reused = _reuse((rej, fp), (out, fp), *([(pairs_out, fp)] if with_pairs else []))
    if reused:
        return {
            "passages": reused[1],
            "rejects": reused[0],
            "skipped": True,
            "seconds": 0.0,
            "pairs": reused[2] if with_pairs else None,
        }
    result = ingest.ingest_file(path, input_cfg)
    reasons = _reason_counts(result.rejects)
    rej_info = write_parquet_atomic(result.rejects, rej, fp, REJECTS, {"reasons": reasons})
    pairs_info = (
        write_parquet_atomic(result.pairs, pairs_out, fp, PAIRS)
        if result.pairs is not None
        else None
    )
    out_info = write_parquet_atomic(
        result.passages, out, fp, PASSAGES, {"rows_in": result.rows_in, "file": path}
    )
    seconds = time.perf_counter() - start
    return {
        "passages": out_info,
        "rejects": rej_info,
        "pairs": pairs_info,
        "skipped": False,
        "seconds": seconds,
    }


@task(name="pairs", cache_policy=NO_CACHE)
@releases_heap
def pairs_task(
    ingested: list[dict[str, Any]], passages: list[ShardInfo], cfg: PipelineConfig, run_dir: str
) -> list[dict[str, Any]]:
    """pairs mode: the queries table (one row per distinct query and positive), in shards."""
    pair_files = [r for r in ingested if r.get("pairs") is not None]
    fp = fingerprint(
        "pairs",
        [r["pairs"].sha256 for r in pair_files] + [r["passages"].sha256 for r in pair_files],
        [s.sha256 for s in passages],
        cfg.output.shard_size,
    )
    first = existing_shard(Path(run_dir) / "queries" / _part(0), fp)
    if first is not None:
        shards = _reuse_parts(Path(run_dir) / "queries", fp, first.stats["shards"])
        if shards is not None:
            return [{"queries": s, "skipped": True} for s in shards]
    queries, duplicates = pair_queries.queries_from_pairs(
        read_tables([r["pairs"].path for r in pair_files], PAIRS),
        read_tables([r["passages"].path for r in pair_files], PASSAGES),
        [s.path for s in passages],
    )
    parts = slice_table(queries.sort_by("query_id"), cfg.output.shard_size)
    n_pairs = sum(r["pairs"].rows for r in pair_files)
    out = []
    for i, part in enumerate(parts):
        stats = {"shards": len(parts), "source": "pairs"}
        if i == 0:  # the stage's totals travel with the first shard
            stats.update(requests=n_pairs, deduplicated=duplicates)
        info = write_parquet_atomic(part, Path(run_dir) / "queries" / _part(i), fp, QUERIES, stats)
        out.append({"queries": info, "skipped": False})
    return out


@task(name="dedup", cache_policy=NO_CACHE)
@releases_heap
def dedup_task(ingested: list[ShardInfo], cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    start = time.perf_counter()
    fp = fingerprint(
        "dedup", [s.sha256 for s in ingested], cfg.dedup.model_dump(), cfg.output.shard_size
    )
    clusters_path = Path(run_dir) / "clusters" / "clusters.parquet"
    done = existing_shard(clusters_path, fp)
    if done is not None:
        shards = _reuse_parts(Path(run_dir) / "passages", fp, done.stats["shards"])
        if shards is not None:
            return {"passages": shards, "clusters": done, "skipped": True, "seconds": 0.0}
    files = [s.path for s in ingested]
    plan = dedup.plan_dedup(files, cfg.dedup)
    # The kept rows, sorted by passage_id (an external sort: no task holds every text at once).
    shards = write_sorted_shards(
        files,
        plan.keep,
        "passage_id",
        cfg.output.shard_size,
        Path(run_dir) / "passages",
        fp,
        PASSAGES,
    )
    stats = {
        "deduplicated": plan.deduplicated,
        "shards": len(shards),
        "clusters": len(set(plan.clusters.column("cluster_id").to_pylist())),
        "cluster_kinds": dict(collections.Counter(plan.clusters.column("kind").to_pylist())),
    }
    clusters = write_parquet_atomic(plan.clusters, clusters_path, fp, CLUSTERS, stats)
    seconds = time.perf_counter() - start
    return {"passages": shards, "clusters": clusters, "skipped": False, "seconds": seconds}


@task(name="semantic_dedup", cache_policy=NO_CACHE)
@releases_heap
def semantic_task(
    clusters: ShardInfo,
    passages: list[ShardInfo],
    passage_embs: list[ShardInfo],
    cfg: PipelineConfig,
    run_dir: str,
) -> ShardInfo:
    """Clusters with semantic (embedding cosine) edges added; see `dedup.semantic_clusters`."""
    fp = fingerprint(
        "semantic",
        clusters.sha256,
        [s.sha256 for s in passages + passage_embs],
        cfg.dedup.model_dump(mode="json"),
    )
    out = Path(run_dir) / "clusters" / "clusters-semantic.parquet"
    done = existing_shard(out, fp)
    if done is not None:
        return done
    ids, vectors = embed.table_to_matrix(read_tables([s.path for s in passage_embs]))
    table = dedup.semantic_clusters(
        pq.read_table(clusters.path),
        read_tables([s.path for s in passages], PASSAGES, columns=["passage_id", "source", "row"]),
        ids,
        vectors,
        cfg.dedup.semantic_threshold,
        cfg.dedup.semantic_neighbours,
    )
    kinds = dict(collections.Counter(table.column("kind").to_pylist()))
    stats = {"clusters": len(set(table.column("cluster_id").to_pylist())), "cluster_kinds": kinds}
    return write_parquet_atomic(table, out, fp, CLUSTERS, stats)


class _ActorEngine:
    """A ChatEngine that forwards to the long-lived LLM worker actor."""

    backend = "vllm"

    def __init__(self, actor: Any, model_name: str, timeout_s: float):
        self.actor, self.model_name, self.timeout_s = actor, model_name, timeout_s

    def chat_json(self, conversations, schema, sampling, seeds, retry=False):  # type: ignore[no-untyped-def]
        ref = self.actor.chat_json.remote(conversations, schema, sampling, seeds, retry)
        return ray.get(ref, timeout=self.timeout_s)


def _chat_engine(cfg: PipelineConfig, llm_name: str | None) -> Any:
    """The ChatEngine a task talks to: the named vLLM actor, or the configured HTTP server."""
    if cfg.llm.backend == "openai":
        from tasks.llm_http import OpenAIEngine

        return OpenAIEngine(cfg.llm, check=False)
    if llm_name is None:
        raise RuntimeError("the vLLM backend needs its worker")
    actor = ray.get_actor(llm_name, namespace=runtime.NAMESPACE)
    return _ActorEngine(actor, cfg.llm.model_name, cfg.runtime.task_timeout_s)


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(
    shard: ShardInfo,
    index: int,
    limit: int,
    llm_name: str | None,
    llm_path: str,
    cfg: PipelineConfig,
    run_dir: str,
    after: Any = None,
) -> dict[str, Any]:
    """Queries for one passage shard, then (with generation.negative_levels) graded passages
    written for each kept query. `after`: unused, see `_Lanes`."""
    start = time.perf_counter()
    fp, (out, rej, gen_out, gen_rej) = _generate_outputs(
        shard, index, limit, llm_path, cfg, run_dir
    )
    reused = _reuse((rej, fp), (out, fp), (gen_out, fp), (gen_rej, fp))
    if reused:
        return {
            "queries": reused[1],
            "rejects": reused[0],
            "generated": reused[2],
            "generated_rejects": reused[3],
            "skipped": True,
            "seconds": 0.0,
        }
    passages = pq.read_table(shard.path).slice(0, limit)
    engine = _chat_engine(cfg, llm_name)
    queries, rejects, stats = generate.generate_queries(passages, cfg.generation, engine)
    positives = dict(
        zip(passages["passage_id"].to_pylist(), passages["text"].to_pylist(), strict=True)
    )
    written, written_rej, gen_stats = generate.generate_passages(
        queries, positives, cfg.generation, cfg.grading, engine
    )
    if hasattr(engine, "close"):
        engine.close()
    infos = [
        write_parquet_atomic(rejects, rej, fp, REJECTS, {"reasons": _reason_counts(rejects)}),
        write_parquet_atomic(
            written_rej, gen_rej, fp, REJECTS, {"reasons": _reason_counts(written_rej)}
        ),
        write_parquet_atomic(written, gen_out, fp, GENERATED, gen_stats),
        write_parquet_atomic(queries, out, fp, QUERIES, stats),
    ]
    return {
        "queries": infos[3],
        "rejects": infos[0],
        "generated": infos[2],
        "generated_rejects": infos[1],
        "skipped": False,
        "seconds": time.perf_counter() - start,
    }


@task(name="embed", cache_policy=NO_CACHE)
def embed_task(
    shard: ShardInfo,
    kind: str,
    index: int,
    embed_name: str,
    precision: str,
    cfg: PipelineConfig,
    run_dir: str,
    after: Any = None,
) -> dict[str, Any]:
    """Embeddings of one shard by the embedder worker `embed_name` (running at `precision`).
    `after`: unused, see `_Lanes`."""
    start = time.perf_counter()
    id_col, text_col, prefix = {
        "passages": ("passage_id", "text", cfg.embedding.passage_prefix),
        "generated": ("passage_id", "text", cfg.embedding.passage_prefix),
        "queries": ("query_id", "query", cfg.embedding.query_prefix),
    }[kind]
    fp, out = _embed_output(shard, kind, index, cfg, run_dir, precision)
    reused = _reuse((out, fp))
    if reused:
        return {"embeddings": reused[0], "skipped": True, "seconds": 0.0}
    table = pq.read_table(shard.path, columns=[id_col, text_col])
    actor = ray.get_actor(embed_name, namespace=runtime.NAMESPACE)
    texts = table.column(text_col).to_pylist()
    ref = actor.encode.remote(
        texts, cfg.embedding.batch_size, prefix, cfg.embedding.pad_to_multiple_of
    )
    vectors = ray.get(ref, timeout=cfg.runtime.task_timeout_s)
    emb = embed.embeddings_table(table.column(id_col).to_pylist(), vectors)
    info = write_parquet_atomic(emb, out, fp, None, {"texts": len(texts)})
    return {"embeddings": info, "skipped": False, "seconds": time.perf_counter() - start}


def _mine_outputs(
    queries: ShardInfo,
    all_queries: list[ShardInfo],
    query_emb: ShardInfo,
    passage_embs: list[ShardInfo],
    passages: list[ShardInfo],
    clusters: ShardInfo,
    generated: tuple[ShardInfo, ShardInfo] | None,
    index: int,
    cfg: PipelineConfig,
    run_dir: str,
) -> tuple[str, Path, Path]:
    """(fingerprint, candidates path, rejects path) of one mine shard."""
    llm_path = str(resolve_llm_path(cfg.llm.model_path)) if cfg.judge.enabled else ""
    fp = fingerprint(
        "mine",
        queries.sha256,
        [s.sha256 for s in all_queries],
        query_emb.sha256,
        [s.sha256 for s in passage_embs],
        [s.sha256 for s in passages],
        clusters.sha256,
        [s.sha256 for s in generated] if generated else None,
        cfg.mining.model_dump(mode="json"),
        cfg.dedup.model_dump(mode="json"),
        _consistency_top_k(cfg),
        cfg.judge.model_dump(mode="json"),
        cfg.grading.model_dump(mode="json") if cfg.judge.enabled else None,
        _llm_identity(cfg, llm_path) if cfg.judge.enabled else None,
    )
    root = Path(run_dir)
    return fp, root / "candidates" / _part(index), root / "rejects" / f"mine-{index:05d}.parquet"


def _consistency_top_k(cfg: PipelineConfig) -> int | None:
    """The round-trip filter applies to generated queries only, never to the user's pairs."""
    return None if cfg.input.mode == "pairs" else cfg.generation.consistency_top_k


def _passage_texts(shards: list[ShardInfo], ids: list[str]) -> dict[str, str]:
    """passage_id -> text for these ids only (each shard filtered as it is read)."""
    if not ids:
        return {}
    table = read_tables(
        [s.path for s in shards], columns=["passage_id", "text"], where=ids_in("passage_id", ids)
    )
    return dict(zip(table["passage_id"].to_pylist(), table["text"].to_pylist(), strict=True))


def _judge_step(
    cfg: PipelineConfig, llm_name: str | None, qtable: pa.Table, passages: list[ShardInfo]
) -> tuple[mine.JudgeStep, dict[str, Any]]:
    """The LLM judge as mining calls it, and the dict its stats are collected into."""
    collected: dict[str, Any] = {}
    query_of = dict(zip(qtable["query_id"].to_pylist(), qtable["query"].to_pylist(), strict=True))

    def run(todo: Any) -> Any:
        texts = _passage_texts(passages, todo["passage_id"].to_list())
        rows = todo.with_columns(
            todo["query_id"].replace_strict(query_of).alias("query"),
            todo["passage_id"]
            .replace_strict(texts, return_dtype=todo["passage_id"].dtype)
            .alias("text"),
        )
        engine = _chat_engine(cfg, llm_name)
        judged, stats = judge.judge_pairs(rows, engine, cfg.grading, cfg.judge, cfg.judge_grades())
        if hasattr(engine, "close"):
            engine.close()
        collected.update(stats)
        return judged

    return mine.JudgeStep(run, cfg.judge, cfg.judge.on_false_negative), collected


def _rescorer(cfg: PipelineConfig, name: str, passages: list[ShardInfo]) -> tuple[Any, Any]:
    """(score function, passage-text lookup) over the cross-encoder worker `name`."""
    actor = ray.get_actor(name, namespace=runtime.NAMESPACE)

    def score(queries: list[str], texts: list[str]) -> Any:
        ref = actor.predict.remote(queries, texts, cfg.mining.rescore_batch_size)
        return ray.get(ref, timeout=cfg.runtime.task_timeout_s)

    return score, lambda ids: _passage_texts(passages, ids)


@task(name="mine", cache_policy=NO_CACHE)
@releases_heap
def mine_task(
    queries: ShardInfo,
    all_queries: list[ShardInfo],
    query_emb: ShardInfo,
    passage_embs: list[ShardInfo],
    passages: list[ShardInfo],
    clusters: ShardInfo,
    generated: tuple[ShardInfo, ShardInfo] | None,
    llm_name: str | None,
    index: int,
    cfg: PipelineConfig,
    run_dir: str,
    rescore_name: str | None = None,
    after: Any = None,
) -> dict[str, Any]:
    """Mine, filter and (optionally) judge negatives for one query shard; `generated` is its
    (written passages, their embeddings) when the LLM wrote graded passages. `after`: unused,
    see `_Lanes`."""
    start = time.perf_counter()
    fp, out, rej = _mine_outputs(
        queries,
        all_queries,
        query_emb,
        passage_embs,
        passages,
        clusters,
        generated,
        index,
        cfg,
        run_dir,
    )
    reused = _reuse((rej, fp), (out, fp))
    if reused:
        return {"candidates": reused[1], "rejects": reused[0], "skipped": True, "seconds": 0.0}
    corpus_ids, corpus = embed.table_to_matrix(read_tables([s.path for s in passage_embs]))
    qtable = pq.read_table(queries.path, columns=["query_id", "passage_id", "query"])
    q_ids, q_vecs = embed.table_to_matrix(pq.read_table(query_emb.path))
    if q_ids != qtable.column("query_id").to_pylist():
        raise RuntimeError(f"query embeddings {query_emb.path} do not match {queries.path}")
    cluster_table = pq.read_table(clusters.path)
    known = pair_queries.positives_by_query(read_tables([s.path for s in all_queries], QUERIES))
    judge_step, judge_stats = (
        _judge_step(cfg, llm_name, qtable, passages) if cfg.judge.enabled else (None, {})
    )
    gen_table, gen_vecs = None, None
    if generated is not None:
        gen_table = pq.read_table(generated[0].path)
        gen_ids, gen_vecs = embed.table_to_matrix(pq.read_table(generated[1].path))
        if gen_ids != gen_table["passage_id"].to_pylist():
            raise RuntimeError(f"embeddings {generated[1].path} do not match {generated[0].path}")
    result = mine.mine_negatives(
        qtable,
        q_vecs,
        corpus_ids,
        corpus,
        cluster_table,
        cfg.mining,
        _passage_texts(passages, cluster_table["passage_id"].to_pylist()),
        cfg.dedup.shingle_size,
        known,
        semantic_threshold=cfg.dedup.semantic_threshold if cfg.dedup.semantic else None,
        rescore=_rescorer(cfg, rescore_name, passages) if rescore_name else None,
        consistency_top_k=_consistency_top_k(cfg),
        judge=judge_step,
        generated=gen_table,
        generated_vectors=gen_vecs,
    )
    cands = result.candidates
    reasons = _reason_counts(cands.filter(pc.invert(cands["kept"])))
    mined_kept = pc.and_(cands["kept"], pc.equal(cands["origin"], "mined"))
    stats = {
        "queries_in": qtable.num_rows,
        "queries_kept": result.queries_kept,
        "candidates": cands.num_rows,
        "negatives_kept": int(pc.sum(cands["kept"].cast(pa.int64())).as_py() or 0),
        "mined_kept": int(pc.sum(mined_kept.cast(pa.int64())).as_py() or 0),
        "filtered": reasons,
        "judge": {
            **result.judge_stats,
            **{
                k: v
                for k, v in judge_stats.items()
                if k in ("output_tokens", "generate_seconds", "retried", "model", "prompt_version")
            },
        },
    }
    rej_info = write_parquet_atomic(
        result.rejects, rej, fp, REJECTS, {"reasons": _reason_counts(result.rejects)}
    )
    out_info = write_parquet_atomic(cands, out, fp, CANDIDATES, stats)
    return {
        "candidates": out_info,
        "rejects": rej_info,
        "skipped": False,
        "seconds": time.perf_counter() - start,
    }


@task(name="assemble", cache_policy=NO_CACHE)
@releases_heap
def assemble_task(
    queries: list[ShardInfo],
    candidates: list[ShardInfo],
    passages: list[ShardInfo],
    clusters: ShardInfo,
    generated: list[ShardInfo],
    cfg: PipelineConfig,
    run_dir: str,
) -> dict[str, Any]:
    start = time.perf_counter()
    fp = fingerprint(
        "assemble",
        [s.sha256 for s in queries + candidates + passages + generated],
        clusters.sha256,
        cfg.grading.top,
        cfg.split.model_dump(),
        cfg.output.model_dump(mode="json", exclude={"dir"}),
        cfg.mining.num_negatives,
    )
    root = Path(run_dir)
    query_table = read_tables([s.path for s in queries], QUERIES)
    # Only the candidates that reach a triplet, and the texts of those and of the positives.
    used = read_tables(
        [s.path for s in candidates],
        CANDIDATES,
        where=pc.field("kept") | (pc.field("reason") == mine.RELABELED),
    )
    ids = query_table["passage_id"].to_pylist() + used["passage_id"].to_pylist()
    triplets = assemble.assemble_triplets(
        query_table,
        read_tables(
            [s.path for s in passages],
            PASSAGES,
            columns=["passage_id", "text"],
            where=ids_in("passage_id", ids),
        ),
        used,
        pq.read_table(clusters.path),
        cfg.split,
        read_tables([s.path for s in generated], GENERATED) if generated else None,
    )
    shards = [
        write_parquet_atomic(t, root / "triplets" / _part(i), fp, TRIPLETS)
        for i, t in enumerate(slice_table(triplets, cfg.output.shard_size))
    ]
    exports: dict[str, Any] = {}
    shutil.rmtree(root / "exports", ignore_errors=True)  # rewritten whole, every run
    if "sentence_transformers" in cfg.output.exports:
        st_table, skipped = assemble.to_sentence_transformers(triplets, cfg.mining.num_negatives)
        by_split = {}
        for split in ("train", "eval"):
            part = st_table.filter(pc.equal(st_table["split"], split)).drop(["split"])
            if part.num_rows:
                write_parquet_atomic(
                    part, root / "exports" / "sentence_transformers" / f"{split}.parquet", fp
                )
                by_split[split] = part.num_rows
        exports["sentence_transformers"] = {"rows": by_split, "skipped_too_few_negatives": skipped}
    if "flagembedding" in cfg.output.exports:
        exports["flagembedding"] = {
            "rows": assemble.write_flagembedding(triplets, root / "exports" / "flagembedding")
        }
    if "listwise" in cfg.output.exports:
        listwise = assemble.to_listwise(triplets, cfg.grading.top)
        rows = {}
        for split in ("train", "eval"):
            part = listwise.filter(pc.equal(listwise["split"], split)).drop(["split"])
            if part.num_rows:
                write_parquet_atomic(part, root / "exports" / "listwise" / f"{split}.parquet", fp)
                rows[split] = part.num_rows
        exports["listwise"] = {"rows": rows}
    splits = dict(collections.Counter(triplets.column("split").to_pylist()))
    grades = collections.Counter(
        f"{n['origin']}:{'ungraded' if n['grade'] is None else n['grade']}"
        for negs in triplets.column("negatives").to_pylist()
        for n in negs
    )
    leakage = assemble.leakage_report(triplets, pq.read_table(clusters.path))
    return {
        "triplets": shards,
        "exports": exports,
        "splits": splits,
        "grades": dict(sorted(grades.items())),
        "extra_positives": sum(len(x) for x in triplets.column("extra_positives").to_pylist()),
        "leakage": leakage,
        "seconds": time.perf_counter() - start,
    }


# --- the flow ------------------------------------------------------------------------------------


def _check_llm_server(cfg: PipelineConfig) -> None:
    """Fail early, with the server's own words, when the HTTP backend is unreachable."""
    from tasks.llm_http import OpenAIEngine

    OpenAIEngine(cfg.llm, check=True).close()


def _llm_description(cfg: PipelineConfig, llm: runtime.WorkerHandle | None, pairs: bool) -> str:
    if cfg.llm.backend == "openai":
        return f"{cfg.llm.model_name} (openai-compatible server)"
    if llm is None:
        return "not used (pairs mode)" if pairs else "not used"
    state = "loaded" if llm.actor else "not loaded: its shards are on disk"
    return f"{llm.model_name} ({llm.device}, {state})"


def _llm_record(
    cfg: PipelineConfig, llm: runtime.WorkerHandle | None, used: bool, path: str
) -> dict[str, Any] | None:
    """The LLM as the manifest records it (no URL credentials, never the API key)."""
    if not used:
        return None
    record: dict[str, Any] = {"name": cfg.llm.model_name, "backend": cfg.llm.backend}
    if cfg.llm.backend == "vllm":
        device, dtype = runtime.llm_settings(cfg)
        record.update(path=path, device=device, dtype=dtype)
    return record


def _results(futures: list[Any], timeout_s: float, stage: str) -> list[Any]:
    """Results of every future, in order; a failed task fails the flow (Prefect does not by
    itself). Each finished shard is reported on the `tripletforge.progress` logger."""
    out = []
    for i, future in enumerate(futures):
        out.append(future.result(timeout=timeout_s))
        progress.info("%s: %d/%d shards", stage, i + 1, len(futures))
    return out


# Shards in flight per model worker: one being served, one with its inputs ready.
MODEL_LANES = 2


class _Lanes:
    """Submits tasks so that at most `width` of them are scheduled at a time.

    Each task gets, as its `after` argument, the future of the task `width` places before it;
    prefect-ray hands futures in arguments to Ray as object refs, and Ray gives a task a worker
    only once those exist. This matters for tasks that wait on a model worker: a task blocked in
    `ray.get` lends its CPU back to Ray, which starts another worker process (~300 MB each) for
    the next queued task. Without lanes, 25 passage shards queued on the embedder held 7 such
    processes (2.1 GB) at 100k passages (benchmarks/pipeline_scale.py).
    """

    def __init__(self, width: int):
        self.width = max(1, width)
        self._futures: list[Any] = []

    def submit(self, task: Any, *args: Any) -> Any:
        n = len(self._futures)
        # Ordering only: a failed earlier shard must not stop this one (its error is raised
        # when the flow collects the results, in order).
        after = allow_failure(self._futures[n - self.width]) if n >= self.width else None
        future = task.submit(*args, after=after)
        self._futures.append(future)
        return future


@flow(name="build_dataset")
def build_dataset(cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    """Run every stage for `cfg` into `run_dir` and write manifest.json; returns the manifest."""
    logger = get_run_logger()
    started = time.time()
    wall: dict[str, float] = {}
    timeout = cfg.runtime.task_timeout_s
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    pairs_mode = cfg.input.mode == "pairs"
    files = [str(p) for p in ingest.expand_paths(cfg.input.paths)]
    corpus_files = [str(p) for p in ingest.expand_paths(cfg.input.corpus_paths)]
    logger.info(
        "run %s: %d input file(s), %d corpus file(s) -> %s",
        cfg.run_id,
        len(files),
        len(corpus_files),
        run_dir,
    )

    t0 = time.perf_counter()
    ingest_futs = [ingest_task.submit(f, i, cfg, run_dir) for i, f in enumerate(files)] + [
        ingest_task.submit(f, len(files) + i, cfg, run_dir, as_corpus=True)
        for i, f in enumerate(corpus_files)
    ]
    ingested = _results(ingest_futs, timeout, "ingest")
    wall["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    progress.info("dedup")
    deduped = dedup_task.submit([r["passages"] for r in ingested], cfg, run_dir).result(
        timeout=timeout
    )
    wall["dedup"] = time.perf_counter() - t0
    passage_shards: list[ShardInfo] = deduped["passages"]
    clusters: ShardInfo = deduped["clusters"]

    budget = cfg.generation.max_passages
    limits = []
    for s in passage_shards:
        take = s.rows if budget is None else max(0, min(s.rows, budget))
        limits.append(take)
        budget = None if budget is None else budget - take

    workers: list[runtime.WorkerHandle] = []
    llm: runtime.WorkerHandle | None = None
    llm_used = not pairs_mode or cfg.judge.enabled
    http = cfg.llm.backend == "openai"
    llm_path = str(resolve_llm_path(cfg.llm.model_path)) if llm_used and not http else ""
    generated_shards: list[ShardInfo] | None = None
    try:
        t0 = time.perf_counter()
        need_llm = False
        _, embed_precision = runtime.embedding_settings(cfg)
        if pairs_mode:  # the user's queries: no generation
            progress.info("queries from pairs")
            generated = pairs_task.submit(ingested, passage_shards, cfg, run_dir).result(
                timeout=timeout
            )
            wall["generate"] = time.perf_counter() - t0
            need_embedder = _embeddings_pending(
                passage_shards, [g["queries"] for g in generated], cfg, run_dir, embed_precision
            )
        else:
            need_llm, need_embedder = _model_work_pending(
                passage_shards, limits, llm_path, cfg, run_dir, embed_precision
            )
        if llm_used and not http:
            progress.info("loading the LLM" if need_llm else "LLM not needed yet")
            llm = runtime.llm_worker(cfg, start=need_llm)
            workers.append(llm)
        elif http and need_llm:
            _check_llm_server(cfg)
        embedder = runtime.embed_worker(cfg, start=need_embedder)
        workers.append(embedder)
        embed_lanes = _Lanes(MODEL_LANES)

        def embed_shard(shard: ShardInfo, kind: str, index: int) -> Any:
            args = (shard, kind, index, embedder.name, embed_precision, cfg, run_dir)
            return embed_lanes.submit(embed_task, *args)

        wall["load_models"] = time.perf_counter() - t0 - wall.get("generate", 0.0)
        logger.info(
            "models: llm=%s, embedder=%s (%s)",
            _llm_description(cfg, llm, pairs_mode),
            embedder.model_name,
            "loaded" if embedder.actor else "not needed",
        )

        def embed_passages() -> list[Any]:
            return [embed_shard(s, "passages", i) for i, s in enumerate(passage_shards)]

        if not pairs_mode:
            t0 = time.perf_counter()
            llm_name = llm.name if llm is not None else None
            # Over HTTP a task sends its requests itself (it never waits on an actor).
            gen_lanes = _Lanes(runtime.cluster_cpus() if http else MODEL_LANES)
            gen_futs = [
                gen_lanes.submit(generate_task, s, i, limits[i], llm_name, llm_path, cfg, run_dir)
                for i, s in enumerate(passage_shards)
            ]
            # On a CPU engine, embedding beside generation slows vLLM's spin-waiting OpenMP
            # threads far more than it gains (measured 33 vs 330 tokens/s on 2 cores).
            overlap = http or (llm is not None and llm.device != "cpu")
            emb_p_futs = embed_passages() if overlap else []
            generated = _results(gen_futs, timeout, "generate")
            wall["generate"] = time.perf_counter() - t0
            if not overlap:
                emb_p_futs = embed_passages()
            generated_shards = [g["generated"] for g in generated]
        else:
            emb_p_futs = embed_passages()
        t0 = time.perf_counter()
        emb_q_futs = [embed_shard(g["queries"], "queries", i) for i, g in enumerate(generated)]
        emb_g_futs = [embed_shard(s, "generated", i) for i, s in enumerate(generated_shards or [])]
        embedded = _results(emb_p_futs, timeout, "embed passages")
        passage_embs = [r["embeddings"] for r in embedded]
        embedded_q = _results(emb_q_futs, timeout, "embed queries")
        query_embs = [r["embeddings"] for r in embedded_q]
        embedded_g = _results(emb_g_futs, timeout, "embed written passages")
        generated_embs = [r["embeddings"] for r in embedded_g]
        embed_skipped = sum(r["skipped"] for r in embedded + embedded_q + embedded_g)
        wall["embed"] = time.perf_counter() - t0
        if embedder.created:  # nothing after this embeds: free its memory for mining and the judge
            runtime.shutdown_worker(embedder)
            workers.remove(embedder)
        if cfg.dedup.semantic:
            progress.info("semantic dedup")
            t0 = time.perf_counter()
            clusters = semantic_task.submit(
                clusters, passage_shards, passage_embs, cfg, run_dir
            ).result(timeout=timeout)
            deduped["semantic"] = clusters
            wall["semantic_dedup"] = time.perf_counter() - t0

        mine_args = [
            (
                g["queries"],
                [x["queries"] for x in generated],
                qe,
                passage_embs,
                passage_shards,
                clusters,
                (generated_shards[i], generated_embs[i]) if generated_shards else None,
                i,
            )
            for i, (g, qe) in enumerate(zip(generated, query_embs, strict=True))
        ]
        if cfg.judge.enabled and not http and llm is not None and llm.actor is None:
            pending = any(
                _reuse(*[(p, fp) for p in (out, rej)]) is None
                for fp, out, rej in (_mine_outputs(*a, cfg, run_dir) for a in mine_args)
            )
            if pending:  # generation was on disk but the judge has work: load the LLM now
                progress.info("loading the LLM for the judge")
                llm = runtime.llm_worker(cfg, start=True)
                workers.append(llm)
        rescore_name = None
        if cfg.mining.rescore_model_path:
            rescorer = runtime.rescore_worker(cfg)
            workers.append(rescorer)
            rescore_name = rescorer.name
        t0 = time.perf_counter()
        llm_name = llm.name if llm is not None and llm.actor is not None else None
        # Mine tasks that wait on a model (judge, cross-encoder) go in lanes; plain mining is
        # CPU work, as wide as the cluster (each task holds the corpus embeddings).
        waits = (cfg.judge.enabled and not http) or rescore_name is not None
        mine_lanes = _Lanes(MODEL_LANES if waits else runtime.cluster_cpus())
        mined = _results(
            [
                mine_lanes.submit(mine_task, *a[:7], llm_name, a[7], cfg, run_dir, rescore_name)
                for a in mine_args
            ],
            timeout,
            "mine",
        )
    finally:
        for w in workers:
            if w.created:
                runtime.shutdown_worker(w)

    wall["mine"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    progress.info("assemble and export")
    assembled = assemble_task.submit(
        [g["queries"] for g in generated],
        [m["candidates"] for m in mined],
        passage_shards,
        clusters,
        generated_shards or [],
        cfg,
        run_dir,
    ).result(timeout=timeout)
    wall["assemble"] = time.perf_counter() - t0

    doc = manifest.build_manifest(
        cfg,
        run_dir,
        ingested=ingested,
        deduped=deduped,
        generated=generated,
        embedded={"passages": passage_embs, "queries": query_embs, "generated": generated_embs},
        embed_skipped=embed_skipped,
        mined=mined,
        assembled=assembled,
        models={
            "llm": _llm_record(cfg, llm, llm_used, llm_path),
            "embedding": {
                "name": embedder.model_name,
                "path": embedder.model_path,
                "device": embedder.device,
                "precision": embedder.precision,
            },
        },
        wall=wall,
        total_seconds=time.time() - started,
    )
    removed = manifest.prune_stale(run_dir, doc)
    if removed:
        logger.info("removed %d stale file(s) of an earlier run: %s", len(removed), removed[:5])
    manifest.write_manifest(doc, Path(run_dir) / "manifest.json")
    bad = doc.unbalanced_stages()
    if bad:
        raise RuntimeError(f"row accounting does not balance for stages {bad}: see manifest.json")
    logger.info("run %s complete in %.1f s", cfg.run_id, time.time() - started)
    return json.loads(doc.model_dump_json())


def run_pipeline(cfg: PipelineConfig, output_dir: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Entry point for the CLI and `ray job submit`: Ray + Prefect set up, the flow run.

    Ray is started by the flow's RayTaskRunner (local, num_cpus from the machine or config), or
    reused when already initialised (tests, notebooks), or joined at RAY_ADDRESS (ray job submit).
    """
    run_dir = Path(output_dir or cfg.output.dir) / cfg.run_id
    kwargs = runtime.ray_init_kwargs(cfg)
    address = kwargs.pop("address", None)
    runner = RayTaskRunner(address=address, init_kwargs=kwargs)
    with runtime.prefect_api():
        result = build_dataset.with_options(task_runner=runner)(cfg, str(run_dir.resolve()))
    return run_dir, result


@flow(name="build_from_config")
def build_from_config(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Deployment entry point (deploy/prefect.yaml): load a YAML config, run the pipeline.

    Parameters stay JSON-friendly (a path and override strings) so a schedule or the UI can
    set them; the real work runs in the `build_dataset` subflow on Ray.
    """
    from schemas.config import load_config

    cfg = load_config(config_path, overrides or [])
    run_dir, doc = run_pipeline(cfg)
    get_run_logger().info("wrote %s", run_dir)
    return {"run_dir": str(run_dir), "run_id": doc["run_id"], "stages": doc["stages"]}
