"""DuckDB over a run folder: one view per table, the same SQL the plain `duckdb` CLI runs."""

from __future__ import annotations

from pathlib import Path

import duckdb

# view name -> Parquet glob relative to the run folder
VIEWS: dict[str, str] = {
    "passages": "passages/*.parquet",
    "rejects": "rejects/*.parquet",
    "clusters": "clusters/*.parquet",
    "queries": "queries/*.parquet",
    "generated": "generated/*.parquet",
    "candidates": "candidates/*.parquet",
    "triplets": "triplets/*.parquet",
}


def view_sql(run_dir: Path, name: str) -> str:
    glob = (run_dir / VIEWS[name]).as_posix().replace("'", "''")
    return f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{glob}')"


def connect(run_dir: str | Path, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with a view for every table the run has written."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a tripletforge run folder (no manifest.json)")
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    for name, glob in VIEWS.items():
        if any(run_dir.glob(glob)):
            con.execute(view_sql(run_dir, name))
    return con


def run_sql(run_dir: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(run_dir)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, cur.fetchall()
    finally:
        con.close()
