"""Exactness of the PostgreSQL destination and the runner around it: a committed batch is final (a resume rolls
forward past it), deployments sharing a pipeline name keep their staging tables apart, the table lock of one table
never blocks another, a resumed source cannot hand back the checkpoint's own value, and a result with duplicate
column names is refused before anything is written."""

import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore, MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import CheckpointError, DestinationError, OrderingError, SourceError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, cut_batches, run_pipeline
from conduit_dagster.engine.sources.base import Chunk
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster.engine.spec import (
    LocalDestinationSpec,
    PostgresDestinationSpec,
    PostgresSourceSpec,
    ResourceSpec,
    SqliteSourceSpec,
    load_spec,
)
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, pg_rows
from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

DSN = "host=127.0.0.1 dbname=test user=postgres"
CONDUIT = str(Path(sys.executable).with_name("conduit"))


def resource(schema: str, mode: str, *, name: str = "things", table: str | None = None, batch: int = 2, resume: bool = True):
    return ResourceSpec(
        name=name,
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=schema),
        destination=PostgresDestinationSpec(
            name="wh",
            database="test",
            user="postgres",
            schema=f"{schema}_out",
            table=table,
            mode=mode,
            primary_key=("id",) if mode == "merge" else (),
        ),
        query="SELECT id, note FROM src",
        batch_size=batch,
        resume=resume,
        checkpoint_column="id",
    )


@pytest.fixture
def out_schema(pg, pg_schema):
    yield f"{pg_schema}_out"
    with pg.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")


def fill(pg, schema: str, ids) -> None:
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {schema}.src (id int, note text)")
        cur.executemany(f"INSERT INTO {schema}.src VALUES (%s, %s)", [(i, f"n{i}") for i in ids])


def staging_tables(schema: str) -> list[str]:
    rows = pg_rows(DSN, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' AND tablename LIKE '_conduit_stage_%'")
    return [r[0] for r in rows]


def crash_after_batch_1_committed(res: ResourceSpec, store) -> None:
    """Write batch 1 through the destination, then die before its checkpoint is saved.

    Steps: the checkpoint before the first batch (save 1-2), batch 0 (write 3-4, save 5-6), batch 1 (write 7-8);
    step 9 is batch 1's checkpoint save: its rows are committed in PostgreSQL, its checkpoint never written."""
    trip = Tripwire(9)
    dest = Wrapped(open_destination(res.destination, res.name), trip, {"write"})
    try:
        with pytest.raises(Crash, match="step 9: save"):
            list(run_pipeline(res, Wrapped(store, trip, {"save"}), run_id="a", destination=dest))
    finally:
        dest._inner.close()


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_committed_batch_is_rolled_forward_not_replayed(pg, pg_schema, out_schema, mode):
    """Ids 10..60, batch_size 2; batch 1 (30, 40) committed but not checkpointed; a late transaction commits 25;
    the rerun adopts batch 1 as it was committed and reads past 40: 40 is not loaded twice, 25 is not loaded (it
    appeared below a range conduit had already read and committed) and nothing is lost."""
    fill(pg, pg_schema, [10, 20, 30, 40, 50, 60])
    res = resource(pg_schema, mode)
    store = MemoryCheckpointStore()
    crash_after_batch_1_committed(res, store)
    before = store.load("things")
    assert (before.batches_committed, before.last_value, before.records_processed) == (1, 20, 2)
    fill(pg, pg_schema, [25])  # committed late, inside batch 1's range

    run = run_pipeline(res, store, run_id="b")
    started = next(run)
    assert isinstance(started, RunStarted) and started.resumed and started.resumed_from == 40
    adopted = store.load("things")  # saved at once, before anything is read
    assert (adopted.batches_committed, adopted.last_value, adopted.records_processed) == (2, 40, 4)
    events = list(run)
    done = events[-1]
    assert isinstance(done, RunFinished)
    assert (done.records_processed, done.batches, done.rows_this_run, done.last_value) == (6, 3, 2, 60)
    assert [e.index for e in events if isinstance(e, BatchCommitted)] == [2]
    got = [r[0] for r in pg_rows(DSN, f"SELECT id FROM {out_schema}.things")]
    assert Counter(got) == Counter([10, 20, 30, 40, 50, 60])
    assert store.docs == {}
    assert pg_rows(DSN, f"SELECT count(*) FROM {out_schema}._conduit_batches") == [(0,)]


def test_incremental_resume_rolls_forward_with_the_committed_batch_boundary(tmp_path, pg, pg_schema, out_schema):
    """The rolled-forward batch ends on a tie (two rows with k = 40): its boundary (those two rows) is what the
    incremental state keeps, so the next run, selecting k >= 40, leaves them out and loads only the new rows."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.ev (id int, k int, note text)")
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (1, 10, 'a'), (2, 20, 'b'), (3, 30, 'c'), (4, 40, 'd'), (5, 40, 'e')")
    text = f"""
sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}
destinations:
  - name: wh
    type: postgresql
    database: test
    user: postgres
    schema: {out_schema}
    mode: append
resources:
  - name: ev
    source: pg
    destination: wh
    batch_size: 2
    incremental_column: k
    initial_value: 0
    query: SELECT id, k, note FROM ev WHERE k >= :last_value
"""
    res = load_spec(write_ingest(tmp_path, text)).resource("ev")
    assert res.resume
    store = MemoryCheckpointStore()
    crash_after_batch_1_committed(res, store)  # batch 0: k 10, 20; batch 1: k 30, 40, 40 (a tie is never split)
    assert store.load("ev").last_value == 20
    with pg.cursor() as cur:
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (6, 35, 'late, below the committed range')")
    done = list(run_pipeline(res, store, run_id="b"))[-1]
    assert isinstance(done, RunFinished) and (done.records_processed, done.batches, done.last_value) == (5, 2, 40)
    state = store.load_state("ev")
    assert state is not None and state.last_value == 40 and len(state.boundary) == 2
    with pg.cursor() as cur:
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (7, 40, 'late at the stored value'), (8, 50, 'new')")
    assert list(run_pipeline(res, store, run_id="c"))[-1].rows_this_run == 2
    got = pg_rows(DSN, f"SELECT id FROM {out_schema}.ev")
    assert Counter(r[0] for r in got) == Counter([1, 2, 3, 4, 5, 7, 8])  # 6 appeared below a committed range


def test_incremental_resume_refuses_a_batch_recorded_without_its_boundary(tmp_path, pg, pg_schema, out_schema):
    """A batch committed by a version that kept no boundary with it (batch_state NULL): adopting it with an empty
    boundary made the next run load the rows equal to its last value a second time."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.ev (id int, k int)")
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (1, 10), (2, 20), (3, 30), (4, 40), (5, 40)")
    text = f"""
sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}
destinations:
  - name: wh
    type: postgresql
    database: test
    user: postgres
    schema: {out_schema}
    mode: append
resources:
  - name: ev
    source: pg
    destination: wh
    batch_size: 2
    incremental_column: k
    initial_value: 0
    query: SELECT id, k FROM ev WHERE k >= :last_value
"""
    res = load_spec(write_ingest(tmp_path, text)).resource("ev")
    store = MemoryCheckpointStore()
    crash_after_batch_1_committed(res, store)
    with pg.cursor() as cur:
        cur.execute(f"UPDATE {out_schema}._conduit_batches SET batch_state = NULL")
    with pytest.raises(CheckpointError, match=r"batch 1 was committed .* by an older conduit version.*Finish this run"):
        list(run_pipeline(res, store, run_id="b"))
    assert store.load_state("ev") is None, "the incremental state did not move"
    got = pg_rows(DSN, f"SELECT id FROM {out_schema}.ev")
    assert Counter(r[0] for r in got) == Counter([1, 2, 3, 4, 5]), "nothing was written"


def test_two_deployments_sharing_a_pipeline_name_and_schema_stay_exact(tmp_path, pg, pg_schema, out_schema):
    """Two deployments (own checkpoint directories) of pipeline `things` into one schema, tables a and b: B's fresh
    start while A is between batches must not touch A's staging table, and A must not silently recreate it."""
    fill(pg, pg_schema, range(1, 101))
    a_res = resource(pg_schema, "replace", table="a", batch=10)
    b_res = resource(pg_schema, "replace", table="b", batch=10)
    a_store, b_store = LocalCheckpointStore(tmp_path / "a"), LocalCheckpointStore(tmp_path / "b")
    a_run = run_pipeline(a_res, a_store, run_id="a")
    for event in a_run:
        if isinstance(event, BatchCommitted) and event.index == 2:
            break
    b_run = run_pipeline(b_res, b_store, run_id="b")
    for event in b_run:  # B starts fresh and writes while A is between batches
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    a_done = list(a_run)[-1]
    b_done = list(b_run)[-1]
    want = pg_rows(DSN, f"SELECT id, note FROM {pg_schema}.src")
    assert isinstance(a_done, RunFinished) and a_done.records_processed == 100
    assert isinstance(b_done, RunFinished) and b_done.records_processed == 100
    assert_same_rows(want, pg_rows(DSN, f"SELECT id, note FROM {out_schema}.a"))
    assert_same_rows(want, pg_rows(DSN, f"SELECT id, note FROM {out_schema}.b"))

    # A crashes between batches; B starts over from scratch meanwhile; A resumes its own staging table
    a_run = run_pipeline(a_res, a_store, run_id="a2")
    for event in a_run:
        if isinstance(event, BatchCommitted) and event.index == 3:
            break
    a_run.close()
    (staging,) = staging_tables(out_schema)
    list(run_pipeline(b_res, b_store, run_id="b2"))
    assert pg_rows(DSN, f"SELECT to_regclass('{out_schema}.{staging}') IS NOT NULL") == [(True,)]
    assert list(run_pipeline(a_res, a_store, run_id="a3"))[-1].records_processed == 100
    assert_same_rows(want, pg_rows(DSN, f"SELECT id, note FROM {out_schema}.a"))
    assert_same_rows(want, pg_rows(DSN, f"SELECT id, note FROM {out_schema}.b"))
    left = pg_rows(DSN, f"SELECT tablename FROM pg_tables WHERE schemaname = '{out_schema}' ORDER BY 1")
    assert left == [("_conduit_batches",), ("a",), ("b",)]


def test_a_staging_table_dropped_mid_run_is_an_error_naming_it(pg, pg_schema, out_schema):
    fill(pg, pg_schema, range(1, 51))
    res = resource(pg_schema, "replace", batch=10)
    store = MemoryCheckpointStore()
    run = run_pipeline(res, store, run_id="a")
    for event in run:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    (staging,) = staging_tables(out_schema)
    with pg.cursor() as cur:
        cur.execute(f"DROP TABLE {out_schema}.{staging}")
    with pytest.raises(DestinationError, match=f"staging table {out_schema}.{staging} .*is missing") as info:
        list(run)
    assert "conduit clear-checkpoints --pipeline-name things" in str(info.value)
    assert store.load("things").destination["staging"] == staging
    assert pg_rows(DSN, f"SELECT to_regclass('{out_schema}.things') IS NULL") == [(True,)], "nothing was published"


def test_a_run_without_resume_drops_its_staging_table_when_it_fails(pg, pg_schema, out_schema):
    fill(pg, pg_schema, range(1, 51))
    run = run_pipeline(resource(pg_schema, "replace", batch=10, resume=False), MemoryCheckpointStore(), run_id="a")
    for event in run:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    assert len(staging_tables(out_schema)) == 1
    run.close()  # stopped mid-run: no checkpoint can resume this staging table
    assert staging_tables(out_schema) == []
    assert pg_rows(DSN, f"SELECT count(*) FROM {out_schema}._conduit_batches") == [(0,)]


def test_clear_checkpoints_names_the_staging_table_to_drop(tmp_path, pg, pg_schema, out_schema):
    fill(pg, pg_schema, range(1, 51))
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    run = run_pipeline(resource(pg_schema, "replace", batch=10), store, run_id="a")
    for event in run:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    run.close()
    staging = store.load("things").destination["staging"]
    cleared = subprocess.run(
        [CONDUIT, "clear-checkpoints", "--pipeline-name", "things", "--dir", str(tmp_path / ".checkpoints")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert cleared.returncode == 0, cleared.stderr
    assert f'DROP TABLE IF EXISTS "{out_schema}"."{staging}";' in cleared.stdout
    assert store.load("things") is None
    with pg.cursor() as cur:  # the statement printed is the one to run
        cur.execute(next(ln.strip() for ln in cleared.stdout.splitlines() if "DROP TABLE" in ln))
    assert pg_rows(DSN, f"SELECT to_regclass('{out_schema}.{staging}') IS NULL") == [(True,)]


def colliding_tables(pg, schema: str) -> tuple[str, str]:
    """Two table names whose table-lock text has one 32-bit hashtext."""
    with pg.cursor() as cur:
        cur.execute(
            "SELECT min(g), max(g) FROM generate_series(1, 300000) g GROUP BY hashtext(%s || g) HAVING count(*) > 1 LIMIT 1",
            (f"conduit:{schema}.t",),
        )
        a, b = cur.fetchone()
        cur.execute("SELECT hashtext(%s) = hashtext(%s)", (f"conduit:{schema}.t{a}", f"conduit:{schema}.t{b}"))
        assert cur.fetchone()[0]
    return f"t{a}", f"t{b}"


def test_two_tables_whose_names_hash_alike_are_written_at_once(pg, pg_schema, out_schema):
    fill(pg, pg_schema, range(1, 31))
    first, second = colliding_tables(pg, out_schema)
    a_res = resource(pg_schema, "append", name="one", table=first, batch=10)
    b_res = resource(pg_schema, "append", name="two", table=second, batch=10)
    a_run = run_pipeline(a_res, MemoryCheckpointStore(), run_id="a")
    for event in a_run:  # holds its table's lock from here until it finishes
        if isinstance(event, BatchCommitted):
            break
    assert isinstance(list(run_pipeline(b_res, MemoryCheckpointStore(), run_id="b"))[-1], RunFinished)
    assert isinstance(list(a_run)[-1], RunFinished)
    want = pg_rows(DSN, f"SELECT id, note FROM {pg_schema}.src")
    assert_same_rows(want, pg_rows(DSN, f'SELECT id, note FROM {out_schema}."{first}"'))
    assert_same_rows(want, pg_rows(DSN, f'SELECT id, note FROM {out_schema}."{second}"'))


SCHEMA = pa.schema([("id", pa.int64()), ("note", pa.string())])


@pytest.mark.parametrize("arrow", [False, True], ids=["python-keys", "arrow-keys"])
def test_a_resumed_read_that_returns_the_checkpoint_value_is_refused(arrow):
    batch = pa.RecordBatch.from_pylist([{"id": 5, "note": "again"}, {"id": 6, "note": None}], schema=SCHEMA)
    chunk = Chunk(batch, batch.column("id") if arrow else [5, 6])
    with pytest.raises(OrderingError, match="'id'.*value 5, equal to the checkpoint's last value 5") as info:
        list(cut_batches(iter([chunk]), 10, "id", 5))
    assert "WHERE id > 5" in str(info.value)
    assert [t.num_rows for t, _ in cut_batches(iter([chunk]), 10, "id", None)] == [2], "a fresh read may start anywhere"


class InclusiveSource(MemorySource):
    """A source whose resume comparison lets the checkpoint value itself through (as a mismatched collation or a
    rounded timestamp would)."""

    def read(self, query, column, after, *, resume, fetch_size):
        rows = sorted((r for r in self.rows if not resume or r[column] >= after), key=lambda r: r[column])
        for i in range(0, len(rows), fetch_size):
            part = rows[i : i + fetch_size]
            yield Chunk(pa.RecordBatch.from_pylist(part, schema=self.schema), [r[column] for r in part])


def test_a_resumed_run_refuses_rows_at_the_checkpoint_value(tmp_path):
    rows = [{"id": i, "note": f"n{i}"} for i in range(1, 11)]
    res = ResourceSpec(
        name="things",
        source=SqliteSourceSpec(name="mem", path=tmp_path / "unused.db"),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query="q",
        batch_size=3,
        resume=True,
        checkpoint_column="id",
    )
    store = MemoryCheckpointStore()
    run = run_pipeline(res, store, run_id="a", source=InclusiveSource(rows, SCHEMA))
    for event in run:
        if isinstance(event, BatchCommitted):
            break
    run.close()
    assert store.load("things").last_value == 3
    with pytest.raises(OrderingError, match="'id'.*value 3, equal to the checkpoint's last value 3"):
        list(run_pipeline(res, store, run_id="b", source=InclusiveSource(rows, SCHEMA)))
    assert store.load("things").batches_committed == 1, "nothing more was committed"


def test_duplicate_column_names_from_postgres_are_refused_before_writing(tmp_path, pg, pg_schema):
    fill(pg, pg_schema, range(1, 6))
    res = ResourceSpec(
        name="joined",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=pg_schema),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query="SELECT a.id AS k, a.id, b.id, a.note FROM src a JOIN src b ON b.id = a.id",
        batch_size=2,
        resume=True,
        checkpoint_column="k",
    )
    store = MemoryCheckpointStore()
    with pytest.raises(SourceError, match="more than one column named 'id'.*AS") as info:
        list(run_pipeline(res, store, run_id="r"))
    assert "joined" in str(info.value)
    assert not list((tmp_path / "out").rglob("part-*")), "nothing was written"
    assert not (tmp_path / "out" / "joined").exists()


def test_duplicate_column_names_from_sqlite_are_refused_before_writing(tmp_path):
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.execute("CREATE TABLE a (id INTEGER, v TEXT)")
    conn.execute("CREATE TABLE b (id INTEGER, v TEXT)")
    conn.executemany("INSERT INTO a VALUES (?, ?)", [(i, f"a{i}") for i in range(5)])
    conn.executemany("INSERT INTO b VALUES (?, ?)", [(i, f"b{i}") for i in range(5)])
    conn.commit()
    conn.close()
    res = ResourceSpec(
        name="joined",
        source=SqliteSourceSpec(name="lite", path=tmp_path / "db.sqlite"),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query="SELECT a.id, a.v, b.v, b.id AS id2 FROM a JOIN b ON b.id = a.id",
        batch_size=2,
        resume=False,
        checkpoint_column=None,
    )
    with pytest.raises(SourceError, match="more than one column named 'v'"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not list((tmp_path / "out").rglob("part-*")), "nothing was written"
    fixed = ResourceSpec(**{**res.__dict__, "query": "SELECT a.id, a.v AS a_v, b.v AS b_v FROM a JOIN b ON b.id = a.id"})
    list(run_pipeline(fixed, MemoryCheckpointStore(), run_id="r"))
    assert pq.read_table(tmp_path / "out" / "joined").num_rows == 5
