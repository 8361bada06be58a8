"""The PostgreSQL destination against the real server: exactly once in every mode, through crashes."""

import psycopg2
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.spec import PostgresDestinationSpec, PostgresSourceSpec, ResourceSpec
from conduit_dagster_tests.helpers import assert_same_rows, pg_rows
from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

DSN = "host=127.0.0.1 dbname=test user=postgres"


def make_resource(schema: str, mode: str, column: str = "k", batch: int = 40, query: str = "SELECT id, k, note FROM src"):
    return ResourceSpec(
        name="things",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=schema),
        destination=PostgresDestinationSpec(
            name="wh",
            database="test",
            user="postgres",
            schema=f"{schema}_out",
            mode=mode,
            primary_key=("id",) if mode == "merge" else (),
        ),
        query=query,
        batch_size=batch,
        resume=True,
        checkpoint_column=column,
    )


@pytest.fixture
def src_table(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.src (id int, k int, note text)")
        cur.execute(
            f"INSERT INTO {pg_schema}.src SELECT g, g / 7, CASE WHEN g % 5 = 0 THEN NULL ELSE 'n,\"' || g || E'\\n' END "
            "FROM generate_series(1, 300) g"
        )
    yield f"{pg_schema}.src"
    with pg.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")


def out_rows(schema: str) -> list[tuple]:
    return pg_rows(DSN, f"SELECT id, k, note FROM {schema}_out.things")


@pytest.mark.parametrize("mode", ["replace", "append", "merge"])
def test_pg_destination_crash_at_every_step_is_exact(pg, pg_schema, src_table, mode):
    res = make_resource(pg_schema, mode)
    expected = pg_rows(DSN, f"SELECT id, k, note FROM {src_table}")
    step = 1
    while True:
        with pg.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")
        store = MemoryCheckpointStore()
        trip = Tripwire(step)
        dest = Wrapped(open_destination(res.destination, "things"), trip, {"write", "publish"})
        try:
            list(run_pipeline(res, Wrapped(store, trip, {"save", "delete"}), run_id="a", destination=dest))
        except Crash as crash:
            dest._inner.close()
            if "delete (after)" not in str(crash):  # the run had not finished: the next run resumes it
                events = list(run_pipeline(res, store, run_id="b"))
                assert isinstance(events[-1], RunFinished)
            # else it crashed after deleting its checkpoint: it was complete (and a new append run would append again)
            assert_same_rows(expected, out_rows(pg_schema))
            assert store.docs == {}
            step += 1
            continue
        dest._inner.close()
        assert step > 2 * (300 // 40)
        break


def test_pg_destination_replace_keeps_old_table_until_publish(pg, pg_schema, src_table):
    res = make_resource(pg_schema, "replace")
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="first"))
    old = out_rows(pg_schema)
    with pg.cursor() as cur:
        cur.execute(f"UPDATE {src_table} SET note = 'new' WHERE id % 2 = 0")
    store = MemoryCheckpointStore()
    run = run_pipeline(res, store, run_id="second")
    for event in run:
        if type(event).__name__ == "BatchCommitted" and event.index == 3:
            assert_same_rows(old, out_rows(pg_schema))  # readers still see the previous complete table
            break
    run.close()
    list(run_pipeline(res, store, run_id="third"))
    assert_same_rows(pg_rows(DSN, f"SELECT id, k, note FROM {src_table}"), out_rows(pg_schema))
    tables = pg_rows(DSN, f"SELECT tablename FROM pg_tables WHERE schemaname = '{pg_schema}_out' ORDER BY 1")
    assert tables == [("_conduit_batches",), ("things",)], "no staging table left behind"


def test_pg_destination_merge_upserts_last_row_per_key(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.src (id int, k int, note text)")
        cur.execute(f"INSERT INTO {pg_schema}.src VALUES (1, 1, 'a'), (2, 2, 'b'), (1, 3, 'a2'), (3, 4, 'c')")
    res = make_resource(pg_schema, "merge", batch=10)
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert sorted(out_rows(pg_schema)) == [(1, 3, "a2"), (2, 2, "b"), (3, 4, "c")]
    with pg.cursor() as cur:
        cur.execute(f"UPDATE {pg_schema}.src SET note = 'b2', k = 9 WHERE id = 2")
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="r2"))
    assert sorted(out_rows(pg_schema)) == [(1, 3, "a2"), (2, 9, "b2"), (3, 4, "c")]


def test_pg_destination_append_adds_rows(pg, pg_schema, src_table):
    res = make_resource(pg_schema, "append", query="SELECT id, k, note FROM src WHERE id <= 50")
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="r1"))
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="r2"))
    assert len(out_rows(pg_schema)) == 100


def test_pg_destination_never_drops_a_foreign_table(pg, pg_schema, src_table):
    with pg.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {pg_schema}_out")
        cur.execute(f"CREATE TABLE {pg_schema}_out.things (precious text)")
        cur.execute(f"INSERT INTO {pg_schema}_out.things VALUES ('keep me')")
    with pytest.raises(DestinationError, match="was not created by conduit.*Nothing was changed"):
        list(run_pipeline(make_resource(pg_schema, "replace"), MemoryCheckpointStore(), run_id="r"))
    assert pg_rows(DSN, f"SELECT precious FROM {pg_schema}_out.things") == [("keep me",)]


def test_pg_to_pg_types(pg, pg_schema):
    from conduit_dagster_tests.test_postgres_source import TYPES

    with pg.cursor() as cur:
        cur.execute(TYPES.format(s=pg_schema))
    res = ResourceSpec(
        name="typed",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=pg_schema),
        destination=PostgresDestinationSpec(name="wh", database="test", user="postgres", schema=f"{pg_schema}_out"),
        query="SELECT * FROM typed",
        batch_size=2,
        resume=True,
        checkpoint_column="id",
    )
    try:
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
        cols = "id, ts, naive, d, n, free, r, t, b, j::text, jb::text, u, flag, small"
        want = pg_rows(DSN, f"SELECT {cols} FROM {pg_schema}.typed ORDER BY id")
        got = pg_rows(DSN, f"SELECT {cols} FROM {pg_schema}_out.typed ORDER BY id")

        def norm(rows):
            return [tuple(bytes(v) if isinstance(v, memoryview) else (None if v is None else str(v)) for v in r) for r in rows]

        assert norm(got) == norm(want)
        assert pg_rows(DSN, f"SELECT 'NaN'::float8 = f FROM {pg_schema}_out.typed WHERE id = 9007199254740994") == [(True,)]
    finally:
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        conn.cursor().execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")
        conn.close()


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_pg_destination_replayed_batch_adds_rows_the_source_gained(pg, pg_schema, src_table, mode):
    """Crash after batch 2's commit, before its checkpoint; the source gains rows; the rerun skips what batch 2
    committed and adds the rest."""
    res = make_resource(pg_schema, mode, column="id", batch=100, query="SELECT id, k, note FROM src")
    with pg.cursor() as cur:
        cur.execute(f"DELETE FROM {src_table} WHERE id > 250")
    store = MemoryCheckpointStore()
    trip = Tripwire(12)  # write2 11-12: batch 2 (ids 201-250) committed, not checkpointed
    dest = Wrapped(open_destination(res.destination, "things"), trip, {"write", "publish"})
    with pytest.raises(Crash):
        list(run_pipeline(res, Wrapped(store, trip, {"save", "delete"}), run_id="a", destination=dest))
    dest._inner.close()
    assert store.load("things").batches_committed == 2
    with pg.cursor() as cur:
        cur.execute(f"INSERT INTO {src_table} SELECT g, g / 7, 'late' FROM generate_series(251, 280) g")
    list(run_pipeline(res, store, run_id="b"))
    assert_same_rows(pg_rows(DSN, f"SELECT id, k, note FROM {src_table}"), out_rows(pg_schema))


def test_pg_destination_long_pipeline_names_do_not_share_staging(pg, pg_schema, src_table):
    name = "p" * 58
    res = ResourceSpec(**{**make_resource(pg_schema, "replace", batch=100).__dict__, "name": name})
    store = MemoryCheckpointStore()
    run = run_pipeline(res, store, run_id="a")
    for event in run:
        if type(event).__name__ == "BatchCommitted" and event.index == 1:
            break
    run.close()
    store.docs.clear()  # as `conduit clear-checkpoints` would: the next run is a full refresh
    list(run_pipeline(res, store, run_id="b"))
    assert_same_rows(
        pg_rows(DSN, f"SELECT id, k, note FROM {src_table}"), pg_rows(DSN, f"SELECT id, k, note FROM {pg_schema}_out.{name}")
    )


def test_pg_destination_refuses_a_table_of_another_pipeline(pg, pg_schema, src_table):
    list(run_pipeline(make_resource(pg_schema, "replace"), MemoryCheckpointStore(), run_id="orders"))
    other = ResourceSpec(**{**make_resource(pg_schema, "replace").__dict__, "name": "thing"})
    other = ResourceSpec(
        **{**other.__dict__, "destination": PostgresDestinationSpec(**{**other.destination.__dict__, "table": "things"})}
    )
    with pytest.raises(DestinationError, match="was not created by conduit for pipeline 'thing'"):
        list(run_pipeline(other, MemoryCheckpointStore(), run_id="x"))


def test_pg_destination_fences_the_table_against_a_second_writer(pg, pg_schema, src_table):
    res = make_resource(pg_schema, "replace")
    first = open_destination(res.destination, "things")
    second = open_destination(res.destination, "things")
    try:
        first.start(None)
        with pytest.raises(DestinationError, match="being written by another run"):
            second.start(None)
    finally:
        first.close()
        second.close()
    third = open_destination(res.destination, "things")
    try:
        third.start(None)  # released with the first's connection
    finally:
        third.close()


def test_pg_to_pg_keeps_source_column_types(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {pg_schema}.typed2 (id int, j json, jb jsonb, u uuid, n numeric, v varchar(20), tz timetz, ip inet)"
        )
        cur.execute(
            f"INSERT INTO {pg_schema}.typed2 VALUES "
            "(1, '{\"a\": 1}', '{\"b\": 2}', gen_random_uuid(), 1.5, 'x', '10:00+02', '10.0.0.1')"
        )
    res = ResourceSpec(
        name="typed2",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=pg_schema),
        destination=PostgresDestinationSpec(name="wh", database="test", user="postgres", schema=f"{pg_schema}_out"),
        query="SELECT * FROM typed2",
        batch_size=10,
        resume=True,
        checkpoint_column="id",
    )
    try:
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
        types = dict(
            pg_rows(
                DSN,
                "SELECT column_name, data_type FROM information_schema.columns "
                f"WHERE table_schema = '{pg_schema}_out' AND table_name = 'typed2'",
            )
        )
        assert types == {
            "id": "integer",
            "j": "json",
            "jb": "jsonb",
            "u": "uuid",
            "n": "numeric",
            "v": "character varying",
            "tz": "time with time zone",
            "ip": "inet",
        }
    finally:
        with pg.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")
