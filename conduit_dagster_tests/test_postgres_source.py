"""The PostgreSQL source against the real server: exact types, streaming, clear errors, no secrets."""

import datetime as dt
import struct
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources.postgresql import PostgresSource
from conduit_dagster.engine.spec import LocalDestinationSpec, PostgresSourceSpec, ResourceSpec, Secret
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, pg_rows


def source(schema: str, **kw) -> PostgresSourceSpec:
    base = dict(name="pg", host="127.0.0.1", port=5432, database="test", user="postgres", schema=schema)
    base.update(kw)
    return PostgresSourceSpec(**base)


def resource(tmp_path, src, query, column="id", batch=3, resume=True) -> ResourceSpec:
    return ResourceSpec(
        name="t",
        source=src,
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query=query,
        batch_size=batch,
        resume=resume,
        checkpoint_column=column,
    )


TYPES = """
CREATE TABLE {s}.typed (
    id bigint, ts timestamptz, naive timestamp, d date, n numeric(20, 6), free numeric, r real, f double precision,
    t text, b bytea, j json, jb jsonb, u uuid, flag boolean, small smallint
);
INSERT INTO {s}.typed VALUES
 (9007199254740993, '2025-01-01 10:00:00.123456+02', '2025-01-01 10:00:00.000001', '2024-02-29', 12345678901234.123456,
  1.00000000000000000000000001, 1.1, 0.1, E'comma, "quote"\\nnewline', '\\x00ff10', '{{"a": [1, 2]}}', '{{"b": null}}',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, -3),
 (9007199254740994, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (9007199254740995, '1970-01-01 00:00:00+00', '0001-01-01 00:00:00', '9999-12-31', -0.000001, -5, -0.0, 1e308, '',
  '\\x', 'null', '[]', NULL, false, 32767);
"""


def test_postgres_types_kept_exactly(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(TYPES.format(s=pg_schema))
    res = resource(tmp_path, source(pg_schema), "SELECT * FROM typed", batch=2)
    events = list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert isinstance(events[-1], RunFinished) and events[-1].last_value == 9007199254740995
    table = pq.read_table(tmp_path / "out" / "t")
    schema = table.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert schema.field("naive").type == pa.timestamp("us")
    assert schema.field("d").type == pa.date32()
    assert schema.field("n").type == pa.decimal128(20, 6)
    assert schema.field("free").type == pa.string()
    assert schema.field("r").type == pa.float32()
    assert schema.field("b").type == pa.binary()
    rows = {r["id"]: r for r in table.to_pylist()}
    first = rows[9007199254740993]
    assert first["ts"] == dt.datetime(2025, 1, 1, 8, 0, 0, 123456, tzinfo=dt.UTC)
    assert first["naive"] == dt.datetime(2025, 1, 1, 10, 0, 0, 1)
    assert first["n"] == Decimal("12345678901234.123456")
    assert first["free"] == "1.00000000000000000000000001"
    assert first["t"] == 'comma, "quote"\nnewline'
    assert first["b"] == b"\x00\xff\x10"
    assert first["j"] == '{"a": [1, 2]}' and first["jb"] == '{"b": null}'
    assert first["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert rows[9007199254740994]["ts"] is None
    assert rows[9007199254740995]["t"] == "" and rows[9007199254740995]["b"] == b""


@pytest.mark.parametrize(
    "column,sqltype,values",
    [
        ("v", "numeric", ["1.5", "2", "10.25", "10.250001", "99999999999999999999.5"]),
        ("v", "real", ["1.1", "2.2", "3.3000002", "1e30"]),
        ("v", "timestamptz", ["2025-01-01 00:00:00.000001+00", "2025-01-01 00:00:00.000002+00", "2025-06-01 12:00:00+05"]),
        ("v", "date", ["2024-01-01", "2024-01-02", "2025-12-31"]),
        ("v", "text", ["a", "B", "b", "é", "z", "Zebra", "10", "9"]),
    ],
)
def test_postgres_resume_per_checkpoint_type(tmp_path, pg, pg_schema, column, sqltype, values):
    """Resume from each type of value: the rows after it, none again, none skipped (3 copies of each value)."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i serial, v {sqltype})")
        for value in values:
            cur.execute(f"INSERT INTO {pg_schema}.v (v) SELECT %s FROM generate_series(1, 3)", (value,))
    res = resource(tmp_path, source(pg_schema), "SELECT i, v FROM v", column=column, batch=4)
    store = MemoryCheckpointStore()
    stop_after = 2
    gen = run_pipeline(res, store, run_id="first")
    seen = 0
    for event in gen:
        if type(event).__name__ == "BatchCommitted":
            seen += 1
            if seen == stop_after:
                break
    gen.close()
    assert store.load("t") is not None
    events = list(run_pipeline(res, store, run_id="second"))
    assert events[0].resumed
    expected = pg_rows("host=127.0.0.1 dbname=test user=postgres", f"SELECT i, v FROM {pg_schema}.v")
    assert_same_rows(_normal(expected, sqltype), _normal(output_rows(tmp_path / "out" / "t"), sqltype))


def _normal(rows, sqltype):
    if sqltype == "numeric":  # unconstrained numeric lands as its exact text
        return [(i, Decimal(v)) for i, v in rows]
    if sqltype == "real":  # psycopg2 reads real as the float of its text; Parquet keeps the float32
        return [(i, struct.unpack("f", struct.pack("f", v))[0]) for i, v in rows]
    return rows


def test_postgres_null_checkpoint_value_is_an_error(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.n (id int)")
        cur.execute(f"INSERT INTO {pg_schema}.n VALUES (1), (2), (NULL)")
    res = resource(tmp_path, source(pg_schema), "SELECT id FROM n", batch=10)
    with pytest.raises(OrderingError, match="'id' holds NULL.*nothing was written.*WHERE id IS NOT NULL"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not (tmp_path / "out" / "t").exists()


def test_postgres_unknown_checkpoint_column(tmp_path, pg_schema):
    res = resource(tmp_path, source(pg_schema), "SELECT 1 AS x", column="id")
    with pytest.raises(SourceError, match=r"checkpoint_column 'id' is not a column of the query's result \(columns: x\)"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))


def test_postgres_connection_error_hides_password(tmp_path):
    secret = "hunter2-very-secret"
    spec = PostgresSourceSpec(name="pg", host="127.0.0.1", port=1, database="test", user="postgres", password=Secret(secret))
    with pytest.raises(SourceError) as info:
        PostgresSource(spec)
    assert "cannot connect" in str(info.value) and "127.0.0.1:1" in str(info.value)
    assert secret not in str(info.value)
    for url in (f"postgresql://postgres:{secret}@127.0.0.1:1/test", f"postgresql://postgres@127.0.0.1:1/test?password={secret}"):
        with pytest.raises(SourceError) as info:
            PostgresSource(PostgresSourceSpec(name="pg", url=Secret(url)))
        assert "cannot connect" in str(info.value) and "127.0.0.1:1/test" in str(info.value)
        assert secret not in str(info.value)


def test_postgres_describe_never_shows_url_secrets(pg_schema):
    secret = "S3cr3tPW-in-query"
    url = f"postgresql://postgres@127.0.0.1:5432/test?password={secret}&application_name=x"
    src = PostgresSource(PostgresSourceSpec(name="pg", url=Secret(url)))
    try:
        assert src.describe() == "postgresql://127.0.0.1:5432/test"
    finally:
        src.close()


def test_postgres_query_error_is_clear(tmp_path, pg_schema):
    res = resource(tmp_path, source(pg_schema), "SELECT id FROM no_such_table")
    with pytest.raises(ConduitError, match='relation "no_such_table" does not exist'):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))


def test_postgres_hostile_checkpoint_value_is_bound(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.h (v text)")
        cur.execute(f"INSERT INTO {pg_schema}.h VALUES ('a'), ('b'), ('z')")
    src = PostgresSource(source(pg_schema))
    try:
        got = [
            list(c.data.column("v").to_pylist())
            for c in src.read("SELECT v FROM h", "v", "x' OR '1'='1", resume=True, fetch_size=10)
        ]
    finally:
        src.close()
    assert got == [["z"]]
    assert pg_rows("host=127.0.0.1 dbname=test user=postgres", f"SELECT count(*) FROM {pg_schema}.h") == [(3,)]


def test_postgres_cursor_path_streams_with_server_side_cursor(tmp_path, pg, pg_schema):
    """Chunks arrive at the fetch size: rows are not all fetched up front."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.big AS SELECT g AS id FROM generate_series(1, 5000) g")
    src = PostgresSource(source(pg_schema), use_copy=False)
    try:
        it = src.read("SELECT id FROM big", "id", None, resume=False, fetch_size=1000)
        first = next(it)
        assert first.data.num_rows == 1000
        with src.conn.cursor() as cur:  # the named cursor is open on the server
            cur.execute("SELECT count(*) FROM pg_cursors")
            assert cur.fetchone()[0] == 1
        assert sum(c.data.num_rows for c in it) == 4000
    finally:
        src.close()


def test_postgres_copy_path_streams(tmp_path, pg, pg_schema):
    """COPY output is parsed block by block: the first chunk arrives long before the last row."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.big AS SELECT g AS id, repeat('x', 80) AS pad FROM generate_series(1, 200000) g")
    src = PostgresSource(source(pg_schema))
    try:
        sizes = [c.data.num_rows for c in src.read("SELECT id, pad FROM big", "id", None, resume=False, fetch_size=1000)]
    finally:
        src.close()
    assert sum(sizes) == 200000 and len(sizes) > 5 and max(sizes) < 50000


ROUTES = {"cursor": dict(use_copy=False), "copy-thread": dict(use_psql=False), "copy-psql": dict(use_psql=True)}


@pytest.mark.parametrize("route", ["copy-thread", "copy-psql"])
def test_postgres_copy_routes_give_the_cursor_table(tmp_path, pg, pg_schema, route):
    with pg.cursor() as cur:
        cur.execute(TYPES.format(s=pg_schema))

    def read(**kw):
        src = PostgresSource(source(pg_schema), **kw)
        try:
            return pa.Table.from_batches(
                [c.data for c in src.read("SELECT * FROM typed", "id", None, resume=False, fetch_size=10)]
            )
        finally:
            src.close()

    table, expected = read(**ROUTES[route]), read(**ROUTES["cursor"])
    assert table.schema == expected.schema
    for name in table.column_names:
        got, want = table.column(name).to_pylist(), expected.column(name).to_pylist()
        if name == "f":  # NaN != NaN
            got, want = [repr(v) for v in got], [repr(v) for v in want]
        assert got == want, name


@pytest.mark.parametrize("route", list(ROUTES))
def test_postgres_connection_killed_mid_read_fails_cleanly(tmp_path, pg, pg_schema, route):
    """The server ends the session mid-stream: a clear error, and no row past the last whole chunk is handed on."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.big AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 400000) g")
    src = PostgresSource(source(pg_schema), **ROUTES[route])
    seen = 0
    try:
        with pytest.raises(SourceError, match="read failed|COPY failed|terminat") as info:
            for chunk in src.read("SELECT id, pad FROM big", "id", None, resume=False, fetch_size=5000):
                ids = chunk.data.column("id").to_pylist()
                assert ids == list(range(seen + 1, seen + 1 + len(ids))), "every chunk is whole and in order"
                seen += len(ids)
                if seen and seen < 400000:
                    with pg.cursor() as cur:
                        cur.execute(  # only the session reading this test's table, not those of tests beside it
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'conduit-dagster' AND pid <> pg_backend_pid() "
                            "AND pid IN (SELECT pid FROM pg_locks WHERE relation = %s::regclass)",
                            (f"{pg_schema}.big",),
                        )
        assert "password" not in str(info.value).lower() or "authentication" in str(info.value).lower()
    finally:
        src.close()
    assert seen < 400000


def test_postgres_psql_route_hides_password(tmp_path):
    secret = "hunter2-psql-secret"
    spec = PostgresSourceSpec(
        name="pg", host="127.0.0.1", port=5432, database="no_such_db", user="postgres", password=Secret(secret)
    )
    from conduit_dagster.engine.sources.pgcopy import PsqlCopy, psql_environment, psql_path

    env = psql_environment(spec)
    assert env is not None and env["PGPASSWORD"] == secret
    psql = psql_path()
    assert psql, "psql is installed on this machine kind (postgresql-client)"
    producer = PsqlCopy(psql, env, b"COPY (SELECT 1) TO STDOUT WITH (FORMAT csv)", lambda t: t.replace(secret, "***"))
    producer.stream.read()
    with pytest.raises(SourceError, match='database "no_such_db" does not exist') as info:
        producer.finish()
    producer.close()
    assert secret not in str(info.value)
    assert secret not in " ".join(producer.proc.args)


@pytest.mark.parametrize("use_copy", [True, False])
def test_postgres_infinity_checkpoint_value_is_an_error(tmp_path, pg, pg_schema, use_copy):
    """Refused before any row is read, by both routes alike (it sorts last: a run would otherwise fail at its end)."""
    error = r"checkpoint column 'ts' holds 'infinity'.*nothing was written.*WHERE isfinite\(ts\)"
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.inf (ts timestamp)")
        cur.execute(f"INSERT INTO {pg_schema}.inf VALUES ('2025-01-01'), ('infinity')")
    res = resource(tmp_path, source(pg_schema), "SELECT ts FROM inf", column="ts", batch=10)
    src = PostgresSource(res.source, use_copy=use_copy)
    try:
        with pytest.raises(SourceError, match=error):
            list(run_pipeline(res, MemoryCheckpointStore(), run_id="r", source=src))
    finally:
        src.close()
    assert not (tmp_path / "out" / "t").exists()


def test_postgres_bytea_checkpoint_column_resumes(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.bin (k bytea, n int)")
        cur.execute(
            f"INSERT INTO {pg_schema}.bin SELECT decode(lpad(to_hex(g % 40), 4, '0'), 'hex'), g FROM generate_series(1, 200) g"
        )
    res = resource(tmp_path, source(pg_schema), "SELECT k, n FROM bin", column="k", batch=30)
    store = MemoryCheckpointStore()
    run = run_pipeline(res, store, run_id="first")
    for event in run:
        if type(event).__name__ == "BatchCommitted":
            break
    run.close()
    assert isinstance(store.load("t").last_value, bytes)
    list(run_pipeline(res, store, run_id="second"))
    expected = pg_rows("host=127.0.0.1 dbname=test user=postgres", f"SELECT k, n FROM {pg_schema}.bin")
    assert_same_rows([(bytes(k), n) for k, n in expected], output_rows(tmp_path / "out" / "t"))


def test_postgres_arrays_land_as_lists_or_text(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.arr (id int, tags text[], nums int[], dec numeric[])")
        cur.execute(f"INSERT INTO {pg_schema}.arr VALUES (1, ARRAY['x', 'y,z'], ARRAY[1, NULL], ARRAY[1.5, 2])")
    list(run_pipeline(resource(tmp_path, source(pg_schema), "SELECT * FROM arr"), MemoryCheckpointStore(), run_id="r"))
    (row,) = pq.read_table(tmp_path / "out" / "t").to_pylist()
    assert row == {"id": 1, "tags": ["x", "y,z"], "nums": [1, None], "dec": "{1.5,2}"}


def test_postgres_copy_keeps_text_that_looks_like_null(tmp_path, pg, pg_schema):
    words = ["NA", "NULL", "null", "NaN", "N/A", "#N/A", "", " ", "t", "f", "\\N"]
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.words (id int, w text, b boolean)")
        cur.executemany(f"INSERT INTO {pg_schema}.words VALUES (%s, %s, %s)", [(i, w, i % 2 == 0) for i, w in enumerate(words)])
        cur.execute(f"INSERT INTO {pg_schema}.words VALUES (100, NULL, NULL)")
    res = resource(tmp_path, source(pg_schema), "SELECT id, w, b FROM words", batch=4)
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    got = sorted(output_rows(tmp_path / "out" / "t"))
    assert got == sorted([(i, w, i % 2 == 0) for i, w in enumerate(words)] + [(100, None, None)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_psql", [True, False])
def test_postgres_unparsable_value_fails_fast_instead_of_hanging(tmp_path, pg, pg_schema, use_psql):
    """The producer is blocked on a full pipe when Arrow gives up: it must be stopped, not waited for."""
    with pg.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {pg_schema}.big AS SELECT g AS id, date '2025-01-01' + g % 100 AS d FROM generate_series(1, 600000) g"
        )
        cur.execute(f"UPDATE {pg_schema}.big SET d = 'infinity' WHERE id = 10")
    src = PostgresSource(source(pg_schema), use_psql=use_psql)
    try:
        with pytest.raises(SourceError, match="column 'd'.*infinity"):
            list(src.read("SELECT id, d FROM big", "id", None, resume=False, fetch_size=1000))
    finally:
        src.close()


@pytest.mark.parametrize("use_psql", [True, False])
def test_postgres_bytea_is_hex_whatever_the_role_default(tmp_path, pg, pg_schema, monkeypatch, use_psql):
    monkeypatch.setenv("PGOPTIONS", "-c bytea_output=escape")
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.bin (id int, b bytea)")
        cur.execute(f"INSERT INTO {pg_schema}.bin VALUES (1, 'xx00ff'::bytea), (2, '\\x00ff'::bytea), (3, 'ab12'::bytea)")
    src = PostgresSource(source(pg_schema), use_psql=use_psql)
    try:
        rows = [r for c in src.read("SELECT id, b FROM bin", "id", None, resume=False, fetch_size=10) for r in c.data.to_pylist()]
    finally:
        src.close()
    assert [r["b"] for r in rows] == [b"xx00ff", b"\x00\xff", b"ab12"]


def test_postgres_failed_run_stops_its_copy(tmp_path, pg, pg_schema):
    from conduit_dagster.engine.destinations import open_destination
    from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.big AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 500000) g")
    res = resource(tmp_path, source(pg_schema), "SELECT id, pad FROM big", batch=1000)
    trip = Tripwire(4)  # the second part write fails
    dest = Wrapped(open_destination(res.destination, "t"), trip, {"write"})
    with pytest.raises(Crash):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r", destination=dest))
    import time

    deadline = time.monotonic() + 10  # the server notices a killed client at its next write
    while True:
        with pg.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'conduit-dagster' "
                "AND state = 'active' AND query ILIKE 'COPY%%'"
            )
            active = cur.fetchone()[0]
        if active == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert active == 0, "the COPY was left running"
