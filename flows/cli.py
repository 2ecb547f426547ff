"""The `tripletforge` command line: run, prepare-models, query, summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


def _quiet_env() -> None:
    """Offline, no telemetry, no noisy analytics; set before Prefect/Ray/vLLM are imported.

    Also creates PREFECT_HOME: Prefect does not create missing parent folders, and its local
    database then fails to open (seen on a fresh clone)."""
    if os.environ.get("PREFECT_HOME"):
        os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "1",
    }.items():
        os.environ.setdefault(key, value)


class _StatusHandler(logging.Handler):
    """Shows the flow's progress messages in the live status line and keeps a log of them."""

    def __init__(self, status: Any, start: float):
        super().__init__(logging.INFO)
        self.status, self.start = status, start

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        line = f"[{time.perf_counter() - self.start:6.1f} s] {text}"
        self.status.update(line)
        shards = re.search(r"(\d+)/(\d+) shards$", text)
        if shards is None or shards[1] == shards[2]:  # a stage message, or a stage's last shard
            console.print(line)


def _stage_table(doc: dict) -> Table:
    table = Table(title=f"run {doc['run_id']}")
    for col in ("stage", "in", "out", "rejected", "deduplicated", "seconds", "resumed shards"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, c in doc["stages"].items():
        table.add_row(
            name,
            str(c["rows_in"]),
            str(c["rows_out"]),
            str(c["rejected"]),
            str(c["deduplicated"]),
            f"{c['seconds']:.1f}",
            str(c["skipped_shards"]),
        )
    return table


def print_summary(run_dir: Path, doc: dict) -> None:
    run_dir = run_dir.resolve()
    stages = doc["stages"]
    console.print(_stage_table(doc))
    if "pairs" in stages:
        console.print(f"queries: from the given pairs ({stages['pairs']['rows_out']})")
    if "generate" in stages:
        gen = stages["generate"]["extra"]
        console.print(
            f"generation: {gen.get('output_tokens', 0)} output tokens, "
            f"{gen.get('tokens_per_second')} tokens/s; queries by style {gen.get('styles', {})}; "
            f"retried {gen.get('retried', 0)}, recovered {gen.get('recovered', 0)}"
        )
    written = stages.get("generate_passages")
    if written:
        console.print(
            f"graded passages written: {written['rows_out']} of {written['rows_in']} "
            f"(by grade {written['extra'].get('grades', {})})"
        )
    emb = doc.get("models", {}).get("embedder") or {}
    embedded = [s for name, s in stages.items() if name.startswith("embed_")]
    if emb:
        console.print(
            f"embedding: {emb['name']} ({emb['device']}, {emb.get('precision') or 'float32'}), "
            f"{sum(s['rows_in'] for s in embedded)} texts in "
            f"{sum(s['seconds'] for s in embedded):.1f} s"
        )
    dedup = stages["dedup"]["extra"]
    console.print(
        f"dedup clusters: {dedup.get('clusters', 0)} "
        f"(members by kind: {dedup.get('cluster_kinds', {})})"
    )
    if "query_dedup" in stages:
        console.print(f"near-duplicate queries removed: {stages['query_dedup']['deduplicated']}")
    mine = stages["mine"]["extra"]
    console.print(
        f"mining: {mine.get('candidates', 0)} candidates, {mine.get('negatives_kept', 0)} kept "
        f"as negatives; filtered: {mine.get('filtered', {})}"
    )
    failed = doc["reject_reasons"].get("mine", {}).get("failed_consistency", 0)
    mined_in = stages["mine"]["rows_in"]
    if "generate" in stages and mined_in:
        console.print(
            f"round-trip filter: {mined_in - failed} of {mined_in} queries kept "
            f"({(mined_in - failed) / mined_in:.0%})"
        )
    judge = mine.get("judge") or {}
    if judge:
        console.print(
            f"LLM judge: {judge['judged']} negatives judged, verdicts {judge['verdicts']}, "
            f"{judge['engine_seconds']:.1f} s of LLM time"
        )
    asm = stages["assemble"]["extra"]
    if asm.get("grades"):
        console.print(f"negatives in triplets by origin and grade: {asm['grades']}")
    console.print(f"splits: {asm.get('splits')}   cross-split leakage: {asm.get('leakage')}")
    console.print(f"rejects by reason: {doc['reject_reasons']}")
    console.print(f"total {doc['timings']['total']:.1f} s")
    console.print(f"\n[bold]output:[/bold] {run_dir}")
    console.print(f"  manifest: {run_dir / 'manifest.json'}")
    console.print("[bold]query it:[/bold]")
    console.print(
        f'  tripletforge query {run_dir} "SELECT split, count(*) AS n, '
        f'avg(len(negatives)) AS negs FROM triplets GROUP BY split"'
    )
    console.print(
        f"  duckdb -c \"SELECT query, positive FROM '{run_dir}/triplets/*.parquet' LIMIT 5\""
    )


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML.")],
    output: Annotated[str | None, typer.Option(help="Output root (default: output.dir).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override, e.g. mining.num_negatives=8.")
    ] = None,
    with_report: Annotated[
        bool, typer.Option("--report", help="Also write report/report.html with plots.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Build a triplet dataset: ingest, dedup, generate, embed, mine, assemble."""
    _quiet_env()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors(debug):
        _run(config, output, set_ or [], with_report)


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """A mistake in the input, the config or the set-up ends the command with one clear
    sentence and exit status 2, no traceback (`--debug` shows it)."""
    from pydantic import ValidationError

    from tasks.stage import InputError

    try:
        yield
    except (InputError, ValidationError, FileNotFoundError) as e:
        if debug:
            raise
        if isinstance(e, ValidationError):
            problems = [
                f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors()
            ]
            message = "invalid config: " + "; ".join(problems)
        else:
            message = str(e)
        typer.echo(f"error: {message}", err=True)  # one line, never wrapped
        raise typer.Exit(2) from None


def _run(config: Path, output: str | None, overrides: list[str], with_report: bool) -> None:
    from flows.build import run_pipeline
    from schemas.config import load_config

    cfg = load_config(config, overrides)
    console.print(f"run id [bold]{cfg.run_id}[/bold] (config hash {cfg.config_hash()[:12]})")
    start = time.perf_counter()
    with console.status("starting Ray and the Prefect flow...") as status:
        handler = _StatusHandler(status, start)
        progress = logging.getLogger("tripletforge.progress")
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
        try:
            run_dir, doc = run_pipeline(cfg, output)
        finally:
            progress.removeHandler(handler)
    console.print(f"flow finished in {time.perf_counter() - start:.1f} s")
    print_summary(run_dir, doc)
    if with_report:
        from tasks.report import build_report

        console.print(f"[bold]report:[/bold] {build_report(run_dir).resolve()}")


@app.command("prepare-models")
def prepare_models(force: bool = typer.Option(False, help="Convert again.")) -> None:
    """Convert the bundled SmolLM2 GGUF to a Hugging Face folder (once) and check MiniLM."""
    _quiet_env()
    from tasks.models import minilm_path, prepare_smollm2

    start = time.perf_counter()
    llm = prepare_smollm2(force=force)
    console.print(f"llm:       {llm}  ({time.perf_counter() - start:.1f} s)")
    console.print(f"embedding: {minilm_path()}")


@app.command()
def query(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (contains manifest.json).")],
    sql: Annotated[str, typer.Argument(help="SQL over views triplets, passages, queries, ...")],
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Run SQL with DuckDB over a run's Parquet files."""
    from tasks.query import run_sql

    columns, rows = run_sql(run_dir, sql)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(dict(zip(columns, row, strict=True)), default=str))
        return
    table = Table()
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    console.print(table)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Write report/report.html with plots of score distributions, filters and rejects."""
    from tasks.report import build_report

    path = build_report(run_dir)
    console.print(f"report: {path.resolve()}")


@app.command()
def gc(
    output: Annotated[Path, typer.Argument(help="An output root (output.dir), e.g. runs.")] = Path(
        "runs"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would go."),
) -> None:
    """Drop cached stage outputs that no run folder under OUTPUT references (runs keep their own
    links, so every run stays readable) and temporary folders of interrupted runs."""
    from flows.cache import StageCache
    from flows.manifest import read_manifest

    referenced = set()
    manifests = sorted(output.glob("*/manifest.json"))
    for path in manifests:
        doc = read_manifest(path)
        for stage, jobs in doc.jobs.items():
            referenced.update((stage, j["fingerprint"]) for j in jobs)
    count, size = StageCache(output / ".stages").gc(referenced, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{len(manifests)} run(s) reference {len(referenced)} cache entries; "
        f"{verb} {count} unreferenced entries ({size / 1e6:.1f} MB)"
    )


@app.command()
def summary(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Print the counts table of a finished run from its manifest."""
    doc = json.loads((run_dir / "manifest.json").read_text())
    print_summary(run_dir, doc)


if __name__ == "__main__":
    app()
