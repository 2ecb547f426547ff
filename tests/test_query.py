import duckdb
import pyarrow as pa
import pytest

from tasks.io import write_bytes_atomic, write_parquet_atomic
from tasks.query import connect, run_sql


def make_run(tmp_path):
    write_parquet_atomic(
        pa.table({"query": ["a", "b"], "split": ["train", "eval"]}),
        tmp_path / "triplets" / "part-00000.parquet",
        "f",
    )
    write_parquet_atomic(
        pa.table({"reason": ["too_short"]}), tmp_path / "rejects" / "x.parquet", "f"
    )
    write_bytes_atomic(tmp_path / "manifest.json", b"{}")
    return tmp_path


def test_views_match_the_plain_duckdb_glob(tmp_path):
    run = make_run(tmp_path)
    cols, rows = run_sql(run, "SELECT split, count(*) FROM triplets GROUP BY split ORDER BY split")
    assert cols[0] == "split" and rows == [("eval", 1), ("train", 1)]
    plain = duckdb.execute(
        f"SELECT split, count(*) FROM read_parquet('{run}/triplets/*.parquet') "
        "GROUP BY split ORDER BY split"
    ).fetchall()
    assert plain == rows
    con = connect(run)
    names = {
        r[0]
        for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    assert names == {"triplets", "rejects"}  # only tables the run has


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        connect(tmp_path)
