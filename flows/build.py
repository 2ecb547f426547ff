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
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_ray import RayTaskRunner

from flows import runtime
from schemas.config import PipelineConfig
from schemas.manifest import ShardInfo
from schemas.tables import CANDIDATES, CLUSTERS, PAIRS, PASSAGES, QUERIES, REJECTS, TRIPLETS
from tasks import assemble, dedup, embed, generate, ingest, manifest, mine
from tasks import pairs as pair_queries
from tasks.io import (
    existing_shard,
    fingerprint,
    read_tables,
    sha256_file,
    slice_table,
    write_parquet_atomic,
)
from tasks.models import resolve_llm_path
from tasks.prompts import PROMPTS

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


def _generate_outputs(
    shard: ShardInfo, index: int, limit: int, llm_path: str, cfg: PipelineConfig, run_dir: str
) -> tuple[str, Path, Path]:
    """(fingerprint, queries path, rejects path) of one generate shard."""
    fp = fingerprint(
        "generate",
        shard.sha256,
        limit,
        llm_path,
        cfg.generation.model_dump(mode="json"),
        cfg.llm.model_dump(mode="json"),
        sorted(p.version for p in PROMPTS.values()),
    )
    root = Path(run_dir)
    return fp, root / "queries" / _part(index), root / "rejects" / f"generate-{index:05d}.parquet"


def _embed_output(
    shard: ShardInfo, kind: str, index: int, cfg: PipelineConfig, run_dir: str
) -> tuple[str, Path]:
    fp = fingerprint("embed", kind, shard.sha256, cfg.embedding.model_dump(mode="json"))
    return fp, Path(run_dir) / "embeddings" / f"{kind}-{index:05d}.parquet"


def _embeddings_pending(
    passage_shards: list[ShardInfo],
    query_shards: list[ShardInfo],
    cfg: PipelineConfig,
    run_dir: str,
) -> bool:
    """True when some passage or query embedding shard is not on disk yet."""
    wanted = [("passages", s, i) for i, s in enumerate(passage_shards)]
    wanted += [("queries", s, i) for i, s in enumerate(query_shards)]
    for kind, shard, i in wanted:
        fp, out = _embed_output(shard, kind, i, cfg, run_dir)
        if existing_shard(out, fp) is None:
            return True
    return False


def _model_work_pending(
    passage_shards: list[ShardInfo],
    limits: list[int],
    llm_path: str,
    cfg: PipelineConfig,
    run_dir: str,
) -> tuple[bool, bool]:
    """(LLM needed, embedder needed): False when every shard that model makes is on disk."""
    query_shards = []
    for i, shard in enumerate(passage_shards):
        fp, out, rej = _generate_outputs(shard, i, limits[i], llm_path, cfg, run_dir)
        done = _reuse((rej, fp), (out, fp))
        if done is None:
            return True, True
        query_shards.append(done[1])
    return False, _embeddings_pending(passage_shards, query_shards, cfg, run_dir)


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
        read_tables([s.path for s in passages], PASSAGES),
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
    passages = read_tables([s.path for s in ingested], PASSAGES)
    result = dedup.deduplicate(passages, cfg.dedup)
    kept = result.passages.sort_by("passage_id")
    parts = slice_table(kept, cfg.output.shard_size)
    shards = [
        write_parquet_atomic(t, Path(run_dir) / "passages" / _part(i), fp, PASSAGES)
        for i, t in enumerate(parts)
    ]
    stats = {
        "deduplicated": result.deduplicated,
        "shards": len(shards),
        "clusters": len(set(result.clusters.column("cluster_id").to_pylist())),
        "cluster_kinds": dict(collections.Counter(result.clusters.column("kind").to_pylist())),
    }
    clusters = write_parquet_atomic(result.clusters, clusters_path, fp, CLUSTERS, stats)
    seconds = time.perf_counter() - start
    return {"passages": shards, "clusters": clusters, "skipped": False, "seconds": seconds}


class _ActorEngine:
    """A ChatEngine that forwards to the long-lived LLM worker actor."""

    def __init__(self, actor: Any, model_name: str, timeout_s: float):
        self.actor, self.model_name, self.timeout_s, self.backend = (
            actor,
            model_name,
            timeout_s,
            "vllm",
        )

    def chat_json(self, conversations, schema, sampling, seeds):  # type: ignore[no-untyped-def]
        ref = self.actor.chat_json.remote(conversations, schema, sampling, seeds)
        return ray.get(ref, timeout=self.timeout_s)


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(
    shard: ShardInfo,
    index: int,
    limit: int,
    llm_name: str,
    llm_path: str,
    cfg: PipelineConfig,
    run_dir: str,
) -> dict[str, Any]:
    start = time.perf_counter()
    fp, out, rej = _generate_outputs(shard, index, limit, llm_path, cfg, run_dir)
    reused = _reuse((rej, fp), (out, fp))
    if reused:
        return {"queries": reused[1], "rejects": reused[0], "skipped": True, "seconds": 0.0}
    passages = pq.read_table(shard.path).slice(0, limit)
    actor = ray.get_actor(llm_name, namespace=runtime.NAMESPACE)
    engine = _ActorEngine(actor, cfg.llm.model_name, cfg.runtime.task_timeout_s)
    queries, rejects, stats = generate.generate_queries(passages, cfg.generation, engine)
    rej_info = write_parquet_atomic(rejects, rej, fp, REJECTS, {"reasons": _reason_counts(rejects)})
    out_info = write_parquet_atomic(queries, out, fp, QUERIES, stats)
    seconds = time.perf_counter() - start
    return {"queries": out_info, "rejects": rej_info, "skipped": False, "seconds": seconds}


@task(name="embed", cache_policy=NO_CACHE)
def embed_task(
    shard: ShardInfo, kind: str, index: int, embed_name: str, cfg: PipelineConfig, run_dir: str
) -> dict[str, Any]:
    start = time.perf_counter()
    id_col, text_col, prefix = {
        "passages": ("passage_id", "text", cfg.embedding.passage_prefix),
        "queries": ("query_id", "query", cfg.embedding.query_prefix),
    }[kind]
    fp, out = _embed_output(shard, kind, index, cfg, run_dir)
    reused = _reuse((out, fp))
    if reused:
        return {"embeddings": reused[0], "skipped": True, "seconds": 0.0}
    table = pq.read_table(shard.path, columns=[id_col, text_col])
    actor = ray.get_actor(embed_name, namespace=runtime.NAMESPACE)
    texts = table.column(text_col).to_pylist()
    ref = actor.encode.remote(texts, cfg.embedding.batch_size, prefix)
    vectors = ray.get(ref, timeout=cfg.runtime.task_timeout_s)
    emb = embed.embeddings_table(table.column(id_col).to_pylist(), vectors)
    info = write_parquet_atomic(emb, out, fp, None, {"texts": len(texts)})
    return {"embeddings": info, "skipped": False, "seconds": time.perf_counter() - start}


@task(name="mine", cache_policy=NO_CACHE)
def mine_task(
    queries: ShardInfo,
    all_queries: list[ShardInfo],
    query_emb: ShardInfo,
    passage_embs: list[ShardInfo],
    passages: list[ShardInfo],
    clusters: ShardInfo,
    index: int,
    cfg: PipelineConfig,
    run_dir: str,
) -> dict[str, Any]:
    start = time.perf_counter()
    fp = fingerprint(
        "mine",
        queries.sha256,
        [s.sha256 for s in all_queries],
        query_emb.sha256,
        [s.sha256 for s in passage_embs],
        [s.sha256 for s in passages],
        clusters.sha256,
        cfg.mining.model_dump(mode="json"),
        cfg.dedup.shingle_size,
    )
    out = Path(run_dir) / "candidates" / _part(index)
    rej = Path(run_dir) / "rejects" / f"mine-{index:05d}.parquet"
    reused = _reuse((rej, fp), (out, fp))
    if reused:
        return {"candidates": reused[1], "rejects": reused[0], "skipped": True, "seconds": 0.0}
    corpus_ids, corpus = embed.table_to_matrix(read_tables([s.path for s in passage_embs]))
    qtable = pq.read_table(queries.path, columns=["query_id", "passage_id", "query"])
    q_ids, q_vecs = embed.table_to_matrix(pq.read_table(query_emb.path))
    if q_ids != qtable.column("query_id").to_pylist():
        raise RuntimeError(f"query embeddings {query_emb.path} do not match {queries.path}")
    cluster_table = pq.read_table(clusters.path)
    clustered = pc.is_in(
        pc.field("passage_id"), value_set=cluster_table.column("passage_id").combine_chunks()
    )
    texts = read_tables([s.path for s in passages], PASSAGES).filter(clustered)
    known = pair_queries.positives_by_query(read_tables([s.path for s in all_queries], QUERIES))
    result = mine.mine_negatives(
        qtable,
        q_vecs,
        corpus_ids,
        corpus,
        cluster_table,
        cfg.mining,
        dict(zip(texts["passage_id"].to_pylist(), texts["text"].to_pylist(), strict=True)),
        cfg.dedup.shingle_size,
        known,
    )
    reasons = _reason_counts(result.candidates.filter(pc.invert(result.candidates["kept"])))
    stats = {
        "queries_in": qtable.num_rows,
        "queries_kept": result.queries_kept,
        "candidates": result.candidates.num_rows,
        "negatives_kept": int(pc.sum(result.candidates["kept"].cast(pa.int64())).as_py() or 0),
        "filtered": reasons,
    }
    rej_info = write_parquet_atomic(
        result.rejects, rej, fp, REJECTS, {"reasons": _reason_counts(result.rejects)}
    )
    out_info = write_parquet_atomic(result.candidates, out, fp, CANDIDATES, stats)
    return {
        "candidates": out_info,
        "rejects": rej_info,
        "skipped": False,
        "seconds": time.perf_counter() - start,
    }


@task(name="assemble", cache_policy=NO_CACHE)
def assemble_task(
    queries: list[ShardInfo],
    candidates: list[ShardInfo],
    passages: list[ShardInfo],
    clusters: ShardInfo,
    cfg: PipelineConfig,
    run_dir: str,
) -> dict[str, Any]:
    start = time.perf_counter()
    fp = fingerprint(
        "assemble",
        [s.sha256 for s in queries + candidates + passages],
        clusters.sha256,
        cfg.split.model_dump(),
        cfg.output.model_dump(mode="json", exclude={"dir"}),
        cfg.mining.num_negatives,
    )
    root = Path(run_dir)
    triplets = assemble.assemble_triplets(
        read_tables([s.path for s in queries], QUERIES),
        read_tables([s.path for s in passages], PASSAGES),
        read_tables([s.path for s in candidates], CANDIDATES),
        pq.read_table(clusters.path),
        cfg.split,
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
    splits = dict(collections.Counter(triplets.column("split").to_pylist()))
    leakage = assemble.leakage_report(triplets, pq.read_table(clusters.path))
    return {
        "triplets": shards,
        "exports": exports,
        "splits": splits,
        "leakage": leakage,
        "seconds": time.perf_counter() - start,
    }


# --- the flow ------------------------------------------------------------------------------------


def _results(futures: list[Any], timeout_s: float, stage: str) -> list[Any]:
    """Results of every future, in order; a failed task fails the flow (Prefect does not by
    itself). Each finished shard is reported on the `tripletforge.progress` logger."""
    out = []
    for i, future in enumerate(futures):
        out.append(future.result(timeout=timeout_s))
        progress.info("%s: %d/%d shards", stage, i + 1, len(futures))
    return out


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
    try:
        t0 = time.perf_counter()
        if pairs_mode:  # the user's queries: no LLM
            progress.info("queries from pairs")
            generated = pairs_task.submit(ingested, passage_shards, cfg, run_dir).result(
                timeout=timeout
            )
            wall["generate"] = time.perf_counter() - t0
            need_embedder = _embeddings_pending(
                passage_shards, [g["queries"] for g in generated], cfg, run_dir
            )
        else:
            llm_path = str(resolve_llm_path(cfg.llm.model_path))
            need_llm, need_embedder = _model_work_pending(
                passage_shards, limits, llm_path, cfg, run_dir
            )
            progress.info("loading the LLM" if need_llm else "LLM not needed")
            llm = runtime.llm_worker(cfg, start=need_llm)
            workers.append(llm)
        embedder = runtime.embed_worker(cfg, start=need_embedder)
        workers.append(embedder)
        wall["load_models"] = time.perf_counter() - t0 - wall.get("generate", 0.0)
        logger.info(
            "models: llm=%s, embedder=%s (%s)",
            "not used (pairs mode)"
            if llm is None
            else f"{llm.model_name} ({llm.device}, "
            f"{'loaded' if llm.actor else 'not needed: every shard is on disk'})",
            embedder.model_name,
            "loaded" if embedder.actor else "not needed",
        )

        def embed_passages() -> list[Any]:
            return [
                embed_task.submit(s, "passages", i, embedder.name, cfg, run_dir)
                for i, s in enumerate(passage_shards)
            ]

        if llm is not None:
            t0 = time.perf_counter()
            gen_futs = [
                generate_task.submit(s, i, limits[i], llm.name, llm.model_path, cfg, run_dir)
                for i, s in enumerate(passage_shards)
            ]
            # On a CPU engine, embedding beside generation slows vLLM's spin-waiting OpenMP
            # threads far more than it gains (measured 33 vs 330 tokens/s on 2 cores).
            overlap = llm.device != "cpu"
            emb_p_futs = embed_passages() if overlap else []
            generated = _results(gen_futs, timeout, "generate")
            wall["generate"] = time.perf_counter() - t0
            if not overlap:
                emb_p_futs = embed_passages()
        else:
            emb_p_futs = embed_passages()
        t0 = time.perf_counter()
        emb_q_futs = [
            embed_task.submit(g["queries"], "queries", i, embedder.name, cfg, run_dir)
            for i, g in enumerate(generated)
        ]
        embedded = _results(emb_p_futs, timeout, "embed passages")
        passage_embs = [r["embeddings"] for r in embedded]
        embedded_q = _results(emb_q_futs, timeout, "embed queries")
        query_embs = [r["embeddings"] for r in embedded_q]
        embed_skipped = sum(r["skipped"] for r in embedded + embedded_q)
        wall["embed"] = time.perf_counter() - t0
    finally:
        for w in workers:
            if w.created:
                runtime.shutdown_worker(w)

    t0 = time.perf_counter()
    mined = _results(
        [
            mine_task.submit(
                g["queries"],
                [x["queries"] for x in generated],
                qe,
                passage_embs,
                passage_shards,
                clusters,
                i,
                cfg,
                run_dir,
            )
            for i, (g, qe) in enumerate(zip(generated, query_embs, strict=True))
        ],
        timeout,
        "mine",
    )
    wall["mine"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    progress.info("assemble and export")
    assembled = assemble_task.submit(
        [g["queries"] for g in generated],
        [m["candidates"] for m in mined],
        passage_shards,
        clusters,
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
        embedded={"passages": passage_embs, "queries": query_embs},
        embed_skipped=embed_skipped,
        mined=mined,
        assembled=assembled,
        models={
            "llm": None
            if llm is None
            else {"name": llm.model_name, "path": llm.model_path, "device": llm.device},
            "embedding": {
                "name": embedder.model_name,
                "path": embedder.model_path,
                "device": embedder.device,
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
