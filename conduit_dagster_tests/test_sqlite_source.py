"""The SQLite source: collations, dynamic types, resume through the real engine."""

import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.runner import run_pipeline
from conduit_dagster.engine.spec import LocalDestinationSpec, ResourceSpec, SqliteSourceSpec
from conduit_dagster_tests.helpers import assert_same_rows, output_rows


def make_db(path, ddl, rows):
    conn = sqlite3.connect(path)
    conn.execute(ddl)
    conn.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(rows[0]))})", rows)
    conn.commit()
    conn.close()


def spec(tmp_path, query, column, batch):
    return ResourceSpec(
        name="t",
        source=SqliteSourceSpec(name="lite", path=tmp_path / "db.sqlite"),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query=query,
        batch_size=batch,
        resume=True,
        checkpoint_column=column,
    )


def crash_after(res, store, batches):
    run = run_pipeline(res, store, run_id="first")
    for event in run:
        if type(event).__name__ == "BatchCommitted" and event.index + 1 == batches:
            break
    run.close()
    assert store.load("t") is not None


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_sqlite_nocase_column_resumes_exactly(tmp_path, crash_at):
    rows = [("A", 1), ("a", 2), ("b", 3), ("B", 4), ("c", 5), ("C", 6)]
    make_db(tmp_path / "db.sqlite", "CREATE TABLE t (code TEXT COLLATE NOCASE, n INTEGER)", rows)
    res = spec(tmp_path, "SELECT code, n FROM t", "code", 1)
    store = MemoryCheckpointStore()
    crash_after(res, store, crash_at)
    list(run_pipeline(res, store, run_id="second"))
    assert_same_rows(rows, output_rows(tmp_path / "out" / "t"))


def test_sqlite_column_null_in_first_batch_keeps_one_schema(tmp_path):
    rows = [(i, None if i <= 10 else i * 2, None) for i in range(1, 31)]
    make_db(tmp_path / "db.sqlite", "CREATE TABLE t (id INTEGER, sparse INTEGER, never TEXT)", rows)
    res = spec(tmp_path, "SELECT id, sparse, never FROM t", "id", 10)
    store = MemoryCheckpointStore()
    crash_after(res, store, 1)  # the resumed run starts with the typed rows
    list(run_pipeline(res, store, run_id="second"))
    out = tmp_path / "out" / "t"
    schemas = {pq.read_schema(p) for p in out.glob("part-*.parquet")}
    assert schemas == {pa.schema([("id", pa.int64()), ("sparse", pa.int64()), ("never", pa.string())])}
    assert_same_rows(rows, output_rows(out))


def test_sqlite_mixed_types_error_names_the_fix(tmp_path):
    make_db(tmp_path / "db.sqlite", "CREATE TABLE t (id INTEGER, v)", [(1, 5), (2, "five")])
    from conduit_dagster.engine.errors import SourceError

    with pytest.raises(SourceError, match="CAST it to one type"):
        list(run_pipeline(spec(tmp_path, "SELECT id, v FROM t", "id", 10), MemoryCheckpointStore(), run_id="r"))
