"""How far to trust the LLM judge: its grades on pairs whose answer is known.

From a finished run folder (the demo's, say) it takes each kept query with
(a) its own positive passage — the judge should say `false_negative` (top grade), and
(b) a random passage of the corpus from another duplicate cluster — it should say
    `true_negative`,
runs the pipeline's judge (`tasks.llm.judge.judge_pairs`, same prompt, schema and config) on both,
and prints the verdict shares. With a small model the point is to know the judge's error rates
before letting it relabel or drop negatives: a judge that calls random passages answers is a
reason to use `on_false_negative: drop` or a bigger model.

Last line: `judge positives_flagged=P random_flagged=R separation=P-R`.
Usage: .venv/bin/python benchmarks/judge.py runs/<run_id> [--pairs 100]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import PipelineConfig, apply_override  # noqa: E402
from tasks.llm.engine import engine_env  # noqa: E402
from tasks.models import cache_dir, resolve_llm_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], help="config override, e.g. grading.levels=..."
    )
    args = parser.parse_args()

    import json

    import polars as pl

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    raw = manifest["config"]
    for item in args.set:
        apply_override(raw, item)
    cfg = PipelineConfig.model_validate(raw)
    os.environ.update(engine_env(cfg.llm, str(cache_dir()), os.cpu_count() or 1))
    from tasks.llm.engine import VLLMEngine
    from tasks.llm.judge import judge_pairs

    triplets = pl.read_parquet(args.run_dir / "triplets" / "*.parquet")
    passages = pl.read_parquet(args.run_dir / "passages" / "*.parquet")
    clusters = pl.read_parquet(args.run_dir / "clusters" / "clusters.parquet")
    cluster_of = dict(zip(clusters["passage_id"], clusters["cluster_id"], strict=True))
    rng = random.Random(args.seed)
    rows = triplets.sample(min(args.pairs, triplets.height), seed=args.seed).to_dicts()
    ids, texts = passages["passage_id"].to_list(), passages["text"].to_list()
    pos, rand = [], []
    for r in rows:
        pos.append((r["query_id"], r["positive_id"], r["query"], r["positive"]))
        while True:
            j = rng.randrange(len(ids))
            if cluster_of.get(ids[j], ids[j]) != cluster_of.get(r["positive_id"], r["positive_id"]):
                break
        rand.append((r["query_id"], ids[j], r["query"], texts[j]))
    schema = {"query_id": pl.String, "passage_id": pl.String, "query": pl.String, "text": pl.String}
    engine = VLLMEngine(
        str(resolve_llm_path(cfg.llm.model_path)), cfg.llm.model_name, cfg.llm, seed=0
    )
    try:
        results = {}
        for name, pairs in (("own positive", pos), ("random passage", rand)):
            frame = pl.DataFrame(pairs, schema=schema, orient="row")
            judged, _ = judge_pairs(frame, engine, cfg.grading, cfg.judge, cfg.judge_grades())
            results[name] = judged
    finally:
        engine.shutdown()
    print(f"{len(rows)} queries of {args.run_dir.name}, judge = {cfg.llm.model_name}")
    print(f"{'pairs':<16}{'false_negative':>16}{'unsure':>10}{'true_negative':>15}   grades")
    shares = {}
    for name, judged in results.items():
        n = judged.height
        v = Counter(judged["verdict"].to_list())
        grades = dict(sorted(Counter(judged["grade"].to_list()).items(), key=lambda x: str(x[0])))
        shares[name] = v["false_negative"] / n
        print(
            f"{name:<16}{v['false_negative'] / n:>16.2f}{v['unsure'] / n:>10.2f}"
            f"{v['true_negative'] / n:>15.2f}   {grades}"
        )
    p, r = shares["own positive"], shares["random passage"]
    print(f"judge positives_flagged={p:.2f} random_flagged={r:.2f} separation={p - r:.2f}")


if __name__ == "__main__":
    main()
