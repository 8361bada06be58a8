"""The PostgreSQL source resumes exactly whatever the checkpoint column's type, and reads the same values by every
route: a crash after any batch, then a resume, leaves exactly the source rows, or the run is refused up front."""

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import psycopg2
import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.errors import OrderingError, SourceError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources.postgresql import PostgresSource
from conduit_dagster.engine.spec import LocalDestinationSpec, PostgresDestinationSpec, PostgresSourceSpec, ResourceSpec
from conduit_dagster.engine.sql import clean_query, uses_last_value
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, pg_rows

DSN = "host=127.0.0.1 dbname=test user=postgres"


def spec(schema: str) -> PostgresSourceSpec:
    return PostgresSourceSpec(name="pg", host="127.0.0.1", port=5432, database="test", user="postgres", schema=schema)


def resource(tmp_path, schema: str, query: str, column: str, batch: int, **kw) -> ResourceSpec:
    return ResourceSpec(
        name="t",
        source=spec(schema),
        destination=kw.pop("destination", None) or LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query=query,
        batch_size=batch,
        resume=True,
        checkpoint_column=column,
        **kw,
    )


def crash_after(res: ResourceSpec, store: MemoryCheckpointStore, batches: int, **kw) -> None:
    """Run until ``batches`` batches are committed and checkpointed, then stop as a crash would."""
    run = run_pipeline(res, store, run_id="first", **kw)
    seen = 0
    for event in run:
        if type(event).__name__ == "BatchCommitted":
            seen += 1
            if seen == batches:
                break
    run.close()
    assert store.load("t") is not None, "the crash left a checkpoint"


ROUTES = {"cursor": dict(use_copy=False), "copy-thread": dict(use_psql=False), "copy-psql": dict(use_psql=True)}


def crash_and_resume(tmp_path, schema: str, query: str, column: str, batch: int, batches: int = 1, route: str = "copy-psql"):
    res = resource(tmp_path, schema, query, column, batch)
    store = MemoryCheckpointStore()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        crash_after(res, store, batches, source=src)
        last = store.load("t").last_value
    finally:
        src.close()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        events = list(run_pipeline(res, store, run_id="second", source=src))
    finally:
        src.close()
    assert events[0].resumed and isinstance(events[-1], RunFinished)
    return last, output_rows(tmp_path / "out" / "t")


# --- 1. non-finite numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
@pytest.mark.parametrize(
    "sqltype,first,cast",
    [("numeric", "-Infinity", Decimal), ("double precision", "-Infinity", float), ("real", "-Infinity", float)],
)
def test_resume_from_minus_infinity_is_exact(tmp_path, pg, pg_schema, sqltype, first, cast, route):
    """The checkpoint holds -Infinity: the resume reads every other row (psycopg2 bound a numeric -Infinity as NaN,
    and `k > NaN` read nothing while reporting success)."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i serial, k {sqltype})")
        cur.execute(f"INSERT INTO {pg_schema}.v (k) SELECT '{first}' FROM generate_series(1, 20)")
        cur.execute(f"INSERT INTO {pg_schema}.v (k) SELECT g / 7 FROM generate_series(1, 300) g")
        cur.execute(f"INSERT INTO {pg_schema}.v (k) SELECT 'Infinity' FROM generate_series(1, 5)")
    last, got = crash_and_resume(tmp_path, pg_schema, "SELECT i, k::text AS t, k FROM v", "k", batch=10, route=route)
    assert last == cast("-Infinity")
    want = pg_rows(DSN, f"SELECT i, k::text FROM {pg_schema}.v")
    assert_same_rows(want, [(i, t) for i, t, _k in got])


def test_resume_from_plus_infinity_reads_nothing_more(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k numeric)")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, g FROM generate_series(1, 5) g")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, 'Infinity' FROM generate_series(6, 8) g")
    last, got = crash_and_resume(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=5)
    assert last == Decimal(5)
    assert sorted(i for i, _k in got) == list(range(1, 9))
    src = PostgresSource(spec(pg_schema))
    try:
        assert list(src.read("SELECT i, k FROM v", "k", Decimal("Infinity"), resume=True, fetch_size=10)) == []
        assert src.count("SELECT i, k FROM v", ("k", Decimal("-Infinity"))) == 0
        assert src.count("SELECT i, k FROM v", ("k", Decimal("Infinity"))) == 8
    finally:
        src.close()


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
@pytest.mark.parametrize("sqltype", ["numeric", "double precision", "real"])
def test_nan_checkpoint_column_refused_before_any_row(tmp_path, pg, pg_schema, sqltype, route):
    """NaN sorts after every number: it was found at the end of the run, after every other row was written."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k {sqltype})")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, g FROM generate_series(1, 100) g")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (101, 'NaN')")
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=10)
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        with pytest.raises(OrderingError, match=r"column 'k' holds 'NaN'.*nothing was written.*WHERE k <> 'NaN'"):
            list(run_pipeline(res, MemoryCheckpointStore(), run_id="r", source=src))
    finally:
        src.close()
    assert not (tmp_path / "out" / "t").exists()


@pytest.mark.parametrize("sqltype", ["date", "timestamp", "timestamptz"])
def test_infinite_checkpoint_value_refused_before_any_row(tmp_path, pg, pg_schema, sqltype):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k {sqltype})")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, date '2025-01-01' + g FROM generate_series(1, 100) g")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (101, 'infinity')")
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=10)
    with pytest.raises(OrderingError, match=r"column 'k' holds 'infinity'.*WHERE isfinite\(k\)"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not (tmp_path / "out" / "t").exists()


@pytest.mark.parametrize("sqltype,nan", [("numeric", Decimal("NaN")), ("double precision", float("nan"))])
def test_edited_nan_checkpoint_is_refused(tmp_path, pg, pg_schema, sqltype, nan):
    """A hand-edited checkpoint holding NaN read nothing (`k > NaN`) and reported success."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k {sqltype})")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, g FROM generate_series(1, 50) g")
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=10)
    store = MemoryCheckpointStore()
    crash_after(res, store, 1)
    store.save(dataclasses.replace(store.load("t"), last_value=nan))
    with pytest.raises(OrderingError, match=r"(?i)last value of 'k' is .*nan.*cannot be a resume point"):
        list(run_pipeline(res, store, run_id="second"))
    assert store.load("t").batches_committed == 1, "nothing more was written"


# --- 2. char(n), bit(n): the bound is never truncated -----------------------------------------------------------


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
@pytest.mark.parametrize(
    "sqltype,values",
    [
        ("char(3)", ["AAA", "ATX", "A", "BBB", "ZZ", "a b"]),
        ("bit(4)", ["0000", "0101", "0110", "1000", "1111"]),
        ("varbit(6)", ["", "0", "00", "01", "1", "10", "100000", "11"]),
        (
            "uuid",
            [
                "00000000-0000-0000-0000-000000000001",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "ffffffff-0000-0000-0000-000000000000",
            ],
        ),
    ],
)
def test_fixed_length_keys_resume_exactly(tmp_path, pg, pg_schema, sqltype, values, route):
    """CAST('ATX' AS character) is 'A': the rows after 'A' were read again (or went 'backwards' forever)."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i serial, k {sqltype})")
        for v in values:
            cur.execute(f"INSERT INTO {pg_schema}.v (k) SELECT %s FROM generate_series(1, 3)", (v,))
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=4)
    store = MemoryCheckpointStore()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        crash_after(res, store, 2, source=src)
        list(run_pipeline(res, store, run_id="second", source=src))
    finally:
        src.close()
    want = pg_rows(DSN, f"SELECT i, format('%s', k) FROM {pg_schema}.v")
    assert_same_rows(want, output_rows(tmp_path / "out" / "t"))


def test_unconstrained_bpchar_key_is_refused(tmp_path, pg, pg_schema):
    """bpchar without a length: 'a' = 'a ' in PostgreSQL, not in Python, so a cut between them loses rows."""
    res = resource(tmp_path, pg_schema, "SELECT 1 AS i, 'a'::bpchar AS k", "k", batch=4)
    with pytest.raises(SourceError, match=r"checkpoint column 'k' has type (character|bpchar).*CAST it to text"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))


# --- 3. types whose equality is not byte equality ------------------------------------------------------------------


def _string_table(pg, schema: str, coltype: str, values: list[str]) -> None:
    with pg.cursor() as cur:
        if "citext" in coltype:
            cur.execute("CREATE EXTENSION IF NOT EXISTS citext")
        if "ci_und" in coltype:
            cur.execute(f"CREATE COLLATION {schema}.ci_und (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        cur.execute(f"CREATE DOMAIN {schema}.code AS text")
        cur.execute(f"CREATE TABLE {schema}.v (i serial, k {coltype})")
        for v in values:
            cur.execute(f"INSERT INTO {schema}.v (k) SELECT %s FROM generate_series(1, 3)", (v,))


STRINGS = ["X", "x", "a", "A", "B", "é", "E", "e"]


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
@pytest.mark.parametrize("coltype", ["citext", "{s}.code", "text COLLATE {s}.ci_und", "varchar(5) COLLATE {s}.ci_und"])
def test_case_insensitive_keys_resume_exactly(tmp_path, pg, pg_schema, coltype, route):
    """citext: 'X' = 'x', so a cut between them resumed past both ('x' > 'X'::citext is false): rows lost."""
    _string_table(pg, pg_schema, coltype.format(s=pg_schema), STRINGS)
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=3)
    store = MemoryCheckpointStore()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        crash_after(res, store, 2, source=src)
        list(run_pipeline(res, store, run_id="second", source=src))
    finally:
        src.close()
    want = pg_rows(DSN, f"SELECT i, k::text FROM {pg_schema}.v")
    assert_same_rows(want, output_rows(tmp_path / "out" / "t"))


def test_citext_count_max_and_last_value_compare_byte_wise(tmp_path, pg, pg_schema):
    _string_table(pg, pg_schema, "citext", ["a", "B"])
    # the default search_path: citext's own operators and max() (in schema public) are in sight
    src = PostgresSource(dataclasses.replace(spec(pg_schema), schema=None))
    table = f"{pg_schema}.v"
    try:
        assert src.max_value(f"SELECT i, k FROM {table}", "k") == "a"  # byte-wise; citext's own max is 'B'
        assert src.count(f"SELECT i, k FROM {table}", ("k", "B")) == 3  # 'B' < 'a' byte-wise
        src.bind({"last_value": "a"})
        query = f"SELECT i, k FROM {table} WHERE k >= :last_value"
        assert uses_last_value(query)
        rows = [r for c in src.read(query, "k", None, resume=False, fetch_size=10) for r in c.data.to_pylist()]
        assert {r["k"] for r in rows} == {"a"}  # citext would also let 'B' through ('B' >= 'a' ignoring case)
    finally:
        src.close()


@pytest.mark.parametrize(
    "coltype,setup,value,why",
    [
        ("interval", "", "1 mon", "'1 mon' = '30 days'"),
        ("{s}.mood", "CREATE TYPE {s}.mood AS ENUM ('sad', 'happy')", "sad", "declaration"),
        ("inet", "", "10.0.0.1", "netmask"),
        ("time", "", "10:00", "time of day"),
        ("jsonb", "", "1", "jsonb"),
        ("int4range", "", "[1,2)", "otherwise"),
    ],
)
def test_inexact_key_types_are_refused(tmp_path, pg, pg_schema, coltype, setup, value, why):
    with pg.cursor() as cur:
        if setup:
            cur.execute(setup.format(s=pg_schema))
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k {coltype.format(s=pg_schema)})")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (1, %s)", (value,))
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=3)
    with pytest.raises(SourceError, match=rf"checkpoint column 'k' has type .*{why}.*CAST it to text"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not (tmp_path / "out" / "t").exists()
    src = PostgresSource(spec(pg_schema))
    try:
        with pytest.raises(SourceError, match="cannot resume exactly"):
            src.key_type("SELECT i, k FROM v", "k")
    finally:
        src.close()


# --- 7. intervals exactly --------------------------------------------------------------------------------------------

INTERVALS = ["1 year", "-1 mon +1 day", "1 day 25:00:00.000001", "00:00:00", "-178000000 years", "1 mon -30 days"]


def test_intervals_kept_as_postgres_text_to_parquet(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, d interval)")
        cur.executemany(f"INSERT INTO {pg_schema}.v VALUES (%s, %s)", list(enumerate(INTERVALS)))
    for route, kw in ROUTES.items():
        src = PostgresSource(spec(pg_schema), **kw)
        try:
            chunks = list(src.read("SELECT i, d FROM v", "i", None, resume=False, fetch_size=10))
        finally:
            src.close()
        table = pa.Table.from_batches([c.data for c in chunks])
        assert table.schema.field("d").metadata == {b"conduit.pg_type": b"interval"}, route
        want = pg_rows(DSN, f"SET IntervalStyle = 'postgres'; SELECT d::text FROM {pg_schema}.v ORDER BY i")
        assert table.column("d").to_pylist() == [d for (d,) in want], route


def test_intervals_kept_exactly_pg_to_pg(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, d interval)")
        cur.executemany(f"INSERT INTO {pg_schema}.v VALUES (%s, %s)", list(enumerate(INTERVALS)))
    dest = PostgresDestinationSpec(name="wh", database="test", user="postgres", schema=f"{pg_schema}_out")
    res = resource(tmp_path, pg_schema, "SELECT i, d FROM v", "i", batch=2, destination=dest)
    try:
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
        query = "SET IntervalStyle = 'postgres'; SELECT i, d::text, pg_typeof(d)::text, d = '{}'::interval FROM {} ORDER BY i"
        got = pg_rows(DSN, query.format("1 year", f"{pg_schema}_out.t"))
        want = pg_rows(DSN, query.format("1 year", f"{pg_schema}.v"))
        assert got == want and got[0][2] == "interval"
    finally:
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        conn.cursor().execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")
        conn.close()


# --- 8. every route reads the same values ------------------------------------------------------------------------------

WIDE = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TYPE {s}.mood AS ENUM ('sad', 'happy');
CREATE TABLE {s}.wide (
    id int, i2 smallint, i8 bigint, o oid, f4 real, f8 double precision, n numeric, n2 numeric(30, 10), t text,
    vc varchar(9), ch char(4), nm name, c citext, b bytea, bo boolean, d date, ts timestamp, tz timestamptz,
    ti time, ttz timetz, iv interval, u uuid, ip inet, cid cidr, mac macaddr, m money, bi bit(3), vb varbit,
    j json, jb jsonb, x xml, e {s}.mood, r int4range, tr tsrange, pt point, tv tsvector, lsn pg_lsn, qc "char"
);
INSERT INTO {s}.wide VALUES
 (1, -32768, 9223372036854775807, 4294967295, 3.4028235e38, 1e-308, 0.000000000000000000000000000001,
  12345678901234567890.0123456789, E'a\\tb', 'x', 'ab', 'nm', 'CiTeXt', '\\x00', true, '0001-01-01', '2025-01-01 00:00:00.000001',
  '2025-06-01 12:00:00+05', '23:59:59.999999', '10:00:00+02', '1 year -1 mons 25:00:00.000001', gen_random_uuid(),
  '10.0.0.1/8', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34, '101', '1', '{{"a":1}}', '{{"b": [1, 2]}}', '<a>x</a>', 'happy',
  '[1,5)', '[2025-01-01,2025-02-01)', '(1,2)', 'a fat cat', '16/B374D848', 'q'),
 (2, 0, 0, 0, 'Infinity', '-Infinity', 'NaN', 0, '', '', '', '', '', '\\x', false, '9999-12-31', '0001-01-01',
  '9999-12-31 23:59:59.999999+00', '00:00', '00:00+00', '0 seconds', NULL, '::1', '::/0', '00:00:00:00:00:00', -0.01, '000',
  '', '[]', 'null', '', 'sad',
  'empty', '(,)', '(0,0)', '', '0/0', ' '),
 (3, NULL, NULL, NULL, 'NaN', 'NaN', '-Infinity', -0.0000000001, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 1, 1, 1, -0.0, 0.1, 0.0000000, 1e19, 'é', 'é', 'é', 'é', 'é', '\\xff', true, '2024-02-29', '2024-02-29 01:02:03',
  '2024-02-29 01:02:03.5-08', '12:00', '12:00-08', '-1 mon +1 day', NULL, '192.168.0.1', '192.168.0.0/16', 'ff:ff:ff:ff:ff:ff',
  1000000, '111', '0101', '"x"', '{{"a": null}}', '<b/>', 'sad', '(,3]', '[,)', '(-1.5,2e10)', 'b:1 a:2', 'FFFFFFFF/FFFFFFFF',
  'z');
"""


def _route_table(schema: str, route: str) -> pa.Table:
    src = PostgresSource(spec(schema), **ROUTES[route])
    try:
        return pa.Table.from_batches([c.data for c in src.read("SELECT * FROM wide", "id", None, resume=False, fetch_size=10)])
    finally:
        src.close()


def test_every_route_reads_every_column_the_same(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(WIDE.format(s=pg_schema))
    cursor = _route_table(pg_schema, "cursor")
    assert cursor.column("n").to_pylist()[:4] == ["0.000000000000000000000000000001", "NaN", "-Infinity", "0.0000000"]
    assert cursor.column("iv").to_pylist()[0] == "11 mons 25:00:00.000001"
    for route in ("copy-thread", "copy-psql"):
        table = _route_table(pg_schema, route)
        assert table.schema == cursor.schema, route
        for name in table.column_names:
            got, want = table.column(name).to_pylist(), cursor.column(name).to_pylist()
            assert [repr(v) for v in got] == [repr(v) for v in want], (route, name)  # repr: NaN, -0.0


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("value", ["infinity", "-infinity", "0044-03-15 BC"])
def test_unloadable_dates_refused_by_every_route(pg, pg_schema, route, value):
    """psycopg2 turned 'infinity' into date.max (a real date) on the cursor route, silently."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, d date)")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (1, '2025-01-01'), (2, %s)", (value,))
    src = PostgresSource(spec(pg_schema), **ROUTES[route])
    try:
        with pytest.raises(SourceError, match=r"'d'.*(infinity|BC)"):
            list(src.read("SELECT i, d FROM v", "i", None, resume=False, fetch_size=10))
    finally:
        src.close()


def test_real_key_max_value_is_the_checkpointed_float(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (k real)")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (1.1), (0.5)")
    src = PostgresSource(spec(pg_schema))
    try:
        keys = [k for c in src.read("SELECT k FROM v", "k", None, resume=False, fetch_size=10) for k in c.keys.to_pylist()]
        assert src.max_value("SELECT k FROM v", "k") == keys[-1]
    finally:
        src.close()


# --- 16. E'' escape strings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1 AS a, E'a\\'b' || '--' AS c",
        "SELECT 1 AS a, e'x\\\\' || ';' AS c",
        "SELECT 1 AS a, E'it''s \\' -- ; ' AS c",
        "SELECT 1 AS a, U&'d\\0061t\\+000061' || '--' AS c",
        "SELECT 1 AS a, $q$ it's ' $q$ || '--' AS c",
    ],
)
def test_escape_strings_are_scanned_whole(pg, pg_schema, query):
    assert clean_query(query + " ; -- end") == query
    src = PostgresSource(spec(pg_schema))
    try:
        (chunk,) = list(src.read(query + ";", "a", None, resume=False, fetch_size=10))
    finally:
        src.close()
    with pg.cursor() as cur:
        cur.execute(query.replace("%", "%%"))
        assert chunk.data.column("c").to_pylist() == [cur.fetchone()[1]]


def test_escape_string_needs_a_lone_e():
    # `name'...'` is no escape string: a backslash there is an ordinary character and the quote closes it
    assert clean_query("SELECT typE'\\' AS x;") == "SELECT typE'\\' AS x"
    assert clean_query("SELECT 1 AS a, E'\\\\' AS b;") == "SELECT 1 AS a, E'\\\\' AS b"


def test_date_max_is_a_real_date_not_infinity(tmp_path, pg, pg_schema):
    """9999-12-31 is a valid checkpoint value: only 'infinity' is refused."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k date)")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (1, '2025-01-01'), (2, '9999-12-31')")
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=1)
    src = PostgresSource(res.source, use_copy=False)
    try:
        events = list(run_pipeline(res, MemoryCheckpointStore(), run_id="r", source=src))
    finally:
        src.close()
    assert events[-1].last_value == dt.date(9999, 12, 31)


# --- what the first review of the fixes found ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
def test_null_checkpoint_value_refused_before_an_append_commits_a_row(tmp_path, pg, pg_schema, route):
    """NULL sorts after every value: found by the read, it stopped the run after 30 batches were appended for good."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i int, k int)")
        cur.execute(f"INSERT INTO {pg_schema}.v SELECT g, g FROM generate_series(1, 30000) g")
        cur.execute(f"INSERT INTO {pg_schema}.v VALUES (30001, NULL)")
    dest = PostgresDestinationSpec(
        name="wh", host="127.0.0.1", port=5432, database="test", user="postgres", schema=pg_schema, table="out", mode="append"
    )
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=1000, destination=dest)
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        with pytest.raises(OrderingError, match=r"column 'k' holds NULL.*nothing was written.*WHERE k IS NOT NULL"):
            list(run_pipeline(res, MemoryCheckpointStore(), run_id="r", source=src))
    finally:
        src.close()
    with pg.cursor() as cur:
        cur.execute(f"SELECT to_regclass('{pg_schema}.out') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute(f"SELECT count(*) FROM {pg_schema}.out")
            assert cur.fetchone()[0] == 0, "no row reached the append table"


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
def test_char_keys_with_characters_below_a_space_resume_exactly(tmp_path, pg, pg_schema, route):
    """char(n) compares ignoring its padding ('a\\t' < 'a'), Python compares the padded text ('a\\t ' < 'a  ' is false):
    the run stopped with 'went backwards' for ever."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i serial, k char(3))")
        for v in ["a", "a", "a\t", "a\t", "a\x01b", "b", "b", "c", "ab", "a b"]:
            cur.execute(f"INSERT INTO {pg_schema}.v (k) VALUES (%s)", (v,))
    res = resource(tmp_path, pg_schema, "SELECT i, k FROM v", "k", batch=2)
    store = MemoryCheckpointStore()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        crash_after(res, store, 2, source=src)
        list(run_pipeline(res, store, run_id="second", source=src))
    finally:
        src.close()
    want = pg_rows(DSN, f"SELECT i, rpad(k::text, 3) FROM {pg_schema}.v")
    assert_same_rows(want, output_rows(tmp_path / "out" / "t"))


@pytest.fixture
def win1251_schema(pg):
    """A schema in a WIN1251 database: its bytes order Cyrillic otherwise than Unicode code points do."""
    name = f"conduit_win1251_{uuid.uuid4().hex[:8]}"
    with pg.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} ENCODING 'WIN1251' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    yield name
    with pg.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("route", ["copy-psql", "cursor"])
def test_text_keys_in_a_database_not_ordered_by_code_points_resume_exactly(tmp_path, win1251_schema, route):
    """In WIN1251 'ё' (0xB8) sorts before 'а' (0xE0) under COLLATE "C"; Python puts U+0451 after U+0430: the run went
    'backwards' at the first 'а' after an 'ё'."""
    dsn = f"host=127.0.0.1 dbname={win1251_schema} user=postgres"
    conn = psycopg2.connect(dsn, client_encoding="UTF8")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE v (i serial, k text)")
        for v in ["а", "а", "ё", "я", "я", "Ё", "б", "z", "ж"]:
            cur.execute("INSERT INTO v (k) VALUES (%s)", (v,))
    conn.close()
    source = dataclasses.replace(spec(""), database=win1251_schema, schema=None)
    res = dataclasses.replace(resource(tmp_path, "public", "SELECT i, k FROM v", "k", batch=2), source=source)
    store = MemoryCheckpointStore()
    src = PostgresSource(res.source, **ROUTES[route])
    try:
        crash_after(res, store, 2, source=src)
        list(run_pipeline(res, store, run_id="second", source=src))
    finally:
        src.close()
    conn = psycopg2.connect(dsn, client_encoding="UTF8")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT i, k FROM v")
            want = list(cur.fetchall())
    finally:
        conn.close()
    assert_same_rows(want, output_rows(tmp_path / "out" / "t"))


def test_incremental_char_key_is_refused_not_loaded_short(tmp_path, pg, pg_schema):
    """`k >= :last_value` on char(3) compares ignoring the padding, conduit's order does not: the stored 'c  ' made the
    query drop a new 'c' row, and the run reported success."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.v (i serial, k char(3))")
        cur.execute(f"INSERT INTO {pg_schema}.v (k) VALUES ('a'), ('b'), ('c')")
    res = dataclasses.replace(
        resource(tmp_path, pg_schema, "SELECT i, k FROM v WHERE k >= :last_value", "k", batch=2),
        incremental_column="k",
        initial_value="",
    )
    with pytest.raises(SourceError, match=r"incremental column 'k' has type char\(3\).*k::text AS k"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not (tmp_path / "out" / "t").exists()


def test_sensor_max_value_in_a_database_not_ordered_by_code_points(win1251_schema):
    """max() of the UTF-8 bytes failed (no max(bytea) before PostgreSQL 16): the sensor skipped every tick."""
    dsn = f"host=127.0.0.1 dbname={win1251_schema} user=postgres"
    conn = psycopg2.connect(dsn, client_encoding="UTF8")
    conn.autocommit = True
    values = ["а", "ё", "я", "Ё", "z"]
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE v (i serial, k text)")
        for v in [*values, None]:
            cur.execute("INSERT INTO v (k) VALUES (%s)", (v,))
    conn.close()
    src = PostgresSource(dataclasses.replace(spec(""), database=win1251_schema, schema=None))
    try:
        assert src.max_value("SELECT i, k FROM v", "k") == max(values)  # 'ё' (U+0451): Python's order, not WIN1251's
    finally:
        src.close()
