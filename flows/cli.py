"""The `tripletforge` command line: run, prepare-models, query, summary."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shlex
import shutil
import sys
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
    """Shows the flow's progress messages in the live status line (shards done / total, rows
    per second, ETA) and keeps a line per stage message and per finished stage."""

    def __init__(self, status: Any, start: float):
        super().__init__(logging.INFO)
        self.status, self.start = status, start

    def emit(self, record: logging.LogRecord) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f} s] {record.getMessage()}"
        self.status.update(line)
        event = getattr(record, "event", None)
        if event is None or event["shards_done"] == event["shards_total"]:
            console.print(line, highlight=False, markup=False)


class JsonLogHandler(logging.Handler):
    """`--log-format json`: one JSON object per log record on stderr, for schedulers and log
    collectors; progress records carry their numbers (stage, shards_done, shards_total, rows,
    rows_per_s, elapsed_s, eta_s)."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)

    def emit(self, record: logging.LogRecord) -> None:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "event": "log",
        }
        doc.update(getattr(record, "event", None) or {})
        sys.stderr.write(json.dumps(doc, default=str) + "\n")
        sys.stderr.flush()


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
        hits = sum(s["extra"].get("cache_hits", 0) for s in embedded)
        console.print(
            f"embedding: {emb['name']} ({emb['device']}, {emb.get('precision') or 'float32'}), "
            f"{sum(s['rows_in'] for s in embedded)} texts in "
            f"{sum(s['seconds'] for s in embedded):.1f} s"
            + (f" ({hits} from the embedding cache)" if hits else "")
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
    for line in next_commands(run_dir):
        console.print(line, highlight=False, markup=line.startswith("[bold]"), soft_wrap=True)


def command(name: str) -> str:
    """How to call one of this environment's commands so it works as printed: the bare name
    when it is this environment's on PATH (an activated venv), else its absolute path."""
    mine = Path(sys.executable).parent / name
    found = shutil.which(name)
    if not mine.exists() or (found and Path(found).resolve() == mine.resolve()):
        return name
    return str(mine)


def next_commands(run_dir: Path) -> list[str]:
    """What the summary suggests doing next; each line works pasted into a shell as printed
    (tests/test_commands.py runs every one)."""
    tf, duckdb = shlex.quote(command("tripletforge")), shlex.quote(command("duckdb"))
    where = shlex.quote(str(run_dir))
    sql = f"SELECT query, positive FROM '{run_dir}/triplets/*.parquet' LIMIT 5"
    parquet = f'"{sql}"' if not re.search(r'[$"`\\]', sql) else shlex.quote(sql)
    lines = ["[bold]query it:[/bold]"]
    if tf != "tripletforge":
        lines.append(f"  # or: source {shlex.quote(str(Path(sys.executable).parent / 'activate'))}")
    lines += [
        f'  {tf} query {where} "SELECT split, count(*) AS n, avg(len(negatives)) AS negs '
        f'FROM triplets GROUP BY split"',
        f'  {tf} query {where} "SELECT reason, count(*) AS n FROM candidates GROUP BY reason '
        f'ORDER BY n DESC"',
        f"  {duckdb} -c {parquet}",
        f"  {tf} report {where}",
    ]
    return lines


class LogFormat(enum.StrEnum):
    rich = "rich"
    json = "json"


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
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            help="rich: a live status line and a summary; json: one JSON object per line on "
            "stderr (progress with ETA, warnings), the result as one JSON object on stdout.",
        ),
    ] = LogFormat.rich,
) -> None:
    """Build a triplet dataset: ingest, dedup, generate, embed, mine, assemble."""
    _quiet_env()
    if log_format is LogFormat.json:
        logging.basicConfig(level=logging.WARNING, handlers=[JsonLogHandler(logging.WARNING)])
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors(debug, log_format):
        if log_format is LogFormat.json:
            _run_json(config, output, set_ or [], with_report)
        else:
            _run(config, output, set_ or [], with_report)


@contextlib.contextmanager
def user_errors(debug: bool, log_format: Any = None) -> Iterator[None]:
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
        if log_format is LogFormat.json:
            typer.echo(
                json.dumps({"event": "error", "level": "error", "message": message}), err=True
            )
        else:
            typer.echo(f"error: {message}", err=True)  # one line, never wrapped
        raise typer.Exit(2) from None


def _run(config: Path, output: str | None, overrides: list[str], with_report: bool) -> None:
    from flows.build import run_pipeline
    from schemas.config import load_config

    cfg = load_config(config, overrides)
    console.print(f"run id [bold]{cfg.run_id}[/bold] (config hash {cfg.config_hash()[:12]})")
    start = time.perf_counter()
    status = console.status("starting Ray and the Prefect flow...")
    with status, progress_to(_StatusHandler(status, start)):
        run_dir, doc = run_pipeline(cfg, output)
    console.print(f"flow finished in {time.perf_counter() - start:.1f} s")
    print_summary(run_dir, doc)
    if with_report:
        from tasks.report import build_report

        console.print(f"[bold]report:[/bold] {build_report(run_dir).resolve()}")


@contextlib.contextmanager
def progress_to(handler: logging.Handler) -> Iterator[None]:
    """The executor's progress records (logger tripletforge.progress) go to `handler` only."""
    progress = logging.getLogger("tripletforge.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    try:
        yield
    finally:
        progress.removeHandler(handler)


def _run_json(config: Path, output: str | None, overrides: list[str], with_report: bool) -> None:
    from flows.build import run_pipeline
    from flows.manifest import stage_counts
    from schemas.config import load_config

    cfg = load_config(config, overrides)
    import ray  # noqa: F401 - Ray installs its own log handler on import: replace it

    logging.getLogger("ray").handlers = [JsonLogHandler(logging.INFO)]
    with progress_to(JsonLogHandler()):
        run_dir, doc = run_pipeline(cfg, output)
    result = {
        "event": "run_done",
        "run_id": doc["run_id"],
        "run_dir": str(run_dir.resolve()),
        "manifest": str((run_dir / "manifest.json").resolve()),
        "seconds": round(doc["timings"]["total"], 1),
        "stages": stage_counts(doc),
    }
    if with_report:
        from tasks.report import build_report

        result["report"] = str(build_report(run_dir).resolve())
    typer.echo(json.dumps(result))


@app.command("prepare-models")
def prepare_models(force: bool = typer.Option(False, help="Convert again.")) -> None:
    """Convert the bundled SmolLM2 GGUF to a Hugging Face folder (once), check MiniLM and export
    it to ONNX (once: the onnx and openvino backends run it; a run then loads its embedder in
    ~1 s instead of importing torch, ~15-30 s on 2 cores), and let vLLM inspect the LLM's
    architecture once (cached; ~20 s of a first run's LLM load otherwise)."""
    _quiet_env()
    from tasks.llm.engine import warm_model_info
    from tasks.models import cache_dir, minilm_path, prepare_onnx, prepare_smollm2

    start = time.perf_counter()
    llm = prepare_smollm2(force=force)
    console.print(f"llm:       {llm}  ({time.perf_counter() - start:.1f} s)")
    console.print(f"embedding: {minilm_path()}")
    start = time.perf_counter()
    onnx = prepare_onnx(minilm_path())
    console.print(f"  as ONNX: {onnx}  ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    known = warm_model_info(str(llm), str(cache_dir()))
    seconds = time.perf_counter() - start
    console.print(f"vLLM's model info: {', '.join(known) or 'not cached'}  ({seconds:.1f} s)")


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
    """Write report/report.html: the funnel of rows per stage, duplicate clusters, query
    lengths by style, score distributions, filters, rejects and a sample of triplets."""
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
