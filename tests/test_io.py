import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import io


def test_atomic_write_leaves_no_temporary_files_and_carries_fingerprint(tmp_path):
    path = tmp_path / "a" / "part-00000.parquet"
    info = io.write_parquet_atomic(pa.table({"x": [1, 2, 3]}), path, "fp1", stats={"n": 3})
    again_bytes = tmp_path / "b.parquet"
    io.write_parquet_atomic(pa.table({"x": [1, 2, 3]}), again_bytes, "fp1", stats={"n": 3})
    assert io.sha256_file(again_bytes) == info.sha256  # same rows, same bytes
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert info.rows == 3 and info.sha256 == io.sha256_file(path)
    assert io.shard_is_current(path, "fp1") and not io.shard_is_current(path, "fp2")
    again = io.existing_shard(path, "fp1")
    assert again is not None and again.stats == {"n": 3} and again.sha256 == info.sha256
    assert io.existing_shard(path, "other") is None
    assert io.existing_shard(tmp_path / "missing.parquet", "fp1") is None


def test_failed_write_keeps_the_old_shard_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "s.parquet"
    io.write_parquet_atomic(pa.table({"x": [1]}), path, "old")

    def boom(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_parquet_atomic(pa.table({"x": [9, 9]}), path, "new")
    monkeypatch.undo()
    assert pq.read_table(path).column("x").to_pylist() == [1]
    assert io.stored_fingerprint(path) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_fingerprint_is_order_stable_and_read_tables_concatenates(tmp_path):
    assert io.fingerprint({"a": 1, "b": 2}) == io.fingerprint({"b": 2, "a": 1})
    assert io.fingerprint("x", 1) != io.fingerprint("x", 2)
    schema = pa.schema([("x", pa.int64())])
    for i in range(3):
        io.write_parquet_atomic(pa.table({"x": [i]}), tmp_path / f"{i}.parquet", "f")
    table = io.read_tables(sorted(tmp_path.glob("*.parquet")), schema)
    assert table.column("x").to_pylist() == [0, 1, 2]
    assert io.read_tables([], schema).num_rows == 0
    assert [t.num_rows for t in io.slice_table(pa.table({"x": list(range(5))}), 2)] == [2, 2, 1]


def _files(tmp_path, keys_per_file: list[list[str]]) -> list[str]:
    paths = []
    for k, keys in enumerate(keys_per_file):
        paths.append(str(tmp_path / f"in-{k}.parquet"))
        table = pa.table({"key": keys, "file": [k] * len(keys), "row": list(range(len(keys)))})
        pq.write_table(table, paths[-1])
    return paths


@pytest.mark.parametrize("budget", [1, 1 << 30])  # one output shard per pass / all in one pass
def test_sorted_shards_hold_exactly_the_kept_rows_in_key_order(tmp_path, budget):
    files = _files(tmp_path, [["e", "c", "a", "c"], ["d", "b", "f", "c"], []])
    keep = pa.table({"shard": [0, 0, 0, 1, 1, 1, 1], "position": [0, 1, 2, 0, 1, 2, 3]})
    schema = pa.schema([("key", pa.string()), ("file", pa.int64()), ("row", pa.int64())])
    shards: list[pa.Table] = []
    n = io.write_sorted_shards(files, keep, "key", 3, schema, shards.append, budget_bytes=budget)
    assert n == 3 and [s.num_rows for s in shards] == [3, 3, 1]
    assert all(s.schema.equals(schema) for s in shards)
    rows = pa.concat_tables(shards).to_pylist()
    # a-f in order; the three "c" rows by (file, row); row 3 of file 0 was not kept
    assert [(r["key"], r["file"], r["row"]) for r in rows] == [
        ("a", 0, 2),
        ("b", 1, 1),
        ("c", 0, 1),
        ("c", 1, 3),
        ("d", 1, 0),
        ("e", 0, 0),
        ("f", 1, 2),
    ]
    none: list[pa.Table] = []
    assert io.write_sorted_shards(files, keep.slice(0, 0), "key", 3, schema, none.append) == 1
    assert [s.num_rows for s in none] == [0]
    empty: list[pa.Table] = []
    assert io.write_sorted_shards([], keep, "key", 3, schema, empty.append) == 1
    assert empty[0].num_rows == 0


def test_filtered_read_returns_only_matching_rows_and_columns(tmp_path):
    files = _files(tmp_path, [["a", "b"], ["c", "a"]])
    schema = pa.schema([("key", pa.string()), ("file", pa.int64()), ("row", pa.int64())])
    got = io.read_tables(files, schema, columns=["key", "file"], where=io.ids_in("key", ["a", "x"]))
    assert got.to_pylist() == [{"key": "a", "file": 0}, {"key": "a", "file": 1}]
    assert io.read_tables([], schema, columns=["row"]).schema.names == ["row"]
    assert io.row_count(files) == 4 and io.row_count([pa.table({"x": [1]})]) == 1
