import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import io


def test_atomic_write_leaves_no_temporary_files_and_carries_fingerprint(tmp_path):
    path = tmp_path / "a" / "part-00000.parquet"
    info = io.write_parquet_atomic(pa.table({"x": [1, 2, 3]}), path, "fp1", stats={"n": 3})
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


def test_prune_stale_removes_only_files_the_manifest_does_not_list(tmp_path):
    from schemas.manifest import Manifest
    from tasks.manifest import prune_stale

    kept = io.write_parquet_atomic(
        pa.table({"x": [1]}), tmp_path / "queries" / "part-00000.parquet", "f"
    )
    io.write_parquet_atomic(pa.table({"x": [2]}), tmp_path / "queries" / "part-00001.parquet", "f")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "keep.png").write_bytes(b"x")
    doc = Manifest(
        run_id="r",
        config_hash="h",
        config={},
        created_at="now",
        tripletforge_version="0",
        versions={},
        models={},
        stages={},
        reject_reasons={},
        timings={},
        shards={"queries": [kept.model_copy(update={"path": "queries/part-00000.parquet"})]},
    )
    assert prune_stale(tmp_path, doc) == ["queries/part-00001.parquet"]
    assert (tmp_path / "queries" / "part-00000.parquet").exists()
    assert (tmp_path / "report" / "keep.png").exists()
