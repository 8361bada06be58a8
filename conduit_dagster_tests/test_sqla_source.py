"""The SQLAlchemy source (`type: sqlalchemy`) against real databases: a SQLite file, MariaDB and a DuckDB file.

Each test runs the real engine into local Parquet and checks the destination's rows, the checkpoint or the error.
"""

import datetime as dt
import logging
import sqlite3
import subprocess
import sys
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.errors import OrderingError, SourceError, SpecError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.sources.sqla import KeyPlan, SqlaSource, key_plan
from conduit_dagster.engine.spec import load_spec
from conduit_dagster_tests.conftest import PG_DSN, mysql_connect, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

# --- the three databases, behind one small interface ----------------------------------------------------------


class Db:
    """A database the test fills through its own driver, and the SQLAlchemy URL conduit reads it by."""

    def __init__(self, kind: str, tmp_path: Path, mysql_db: str | None = None, pg_schema: str | None = None) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "src.db"
            self.url = "sqlite:///src.db"  # relative to ingest.yml
        elif kind == "duckdb":
            self.path = tmp_path / "src.duckdb"
            self.url = "duckdb:///src.duckdb"
        elif kind == "postgresql":  # the test's own schema first in the search path, so that queries name bare tables
            self.schema = pg_schema
            self.url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{pg_schema}"
        else:
            self.database = mysql_db
            self.url = f"mysql+pymysql://root@127.0.0.1:3306/{mysql_db}"

    def _connect(self):  # noqa: ANN202
        if self.kind == "sqlite":
            return sqlite3.connect(self.path)
        if self.kind == "duckdb":
            import duckdb

            return duckdb.connect(str(self.path))
        if self.kind == "postgresql":
            import psycopg2

            return psycopg2.connect(PG_DSN, options=f"-c search_path={self.schema}")
        return mysql_connect(self.database)

    def run(self, sql: str, rows: list[tuple] | None = None) -> None:
        conn = self._connect()
        try:
            cur = conn.cursor()
            if rows is None:
                cur.execute(sql)
            else:
                mark = "%s" if self.kind in ("mariadb", "postgresql") else "?"
                cur.executemany(sql.replace("?", mark), rows)
            conn.commit()
        finally:
            conn.close()

    def rows(self, sql: str) -> list[tuple]:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return [tuple(r) for r in cur.fetchall()]
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", "mariadb", "duckdb"])
def db(request, tmp_path) -> Db:
    mysql_db = request.getfixturevalue("mysql_db") if request.param == "mariadb" else None
    return Db(request.param, tmp_path, mysql_db)


def resource(tmp_path: Path, url: str, query: str, *, column: str | None = "id", batch: int = 50, extra: str = ""):
    checkpoint = f"    resume: true\n    checkpoint_column: {column}\n" if column else ""
    text = f"""
sources:
  - name: legacy
    type: sqlalchemy
    url: {url}
destinations:
  - name: out
    type: local
    path: out
resources:
  - name: t
    source: legacy
    destination: out
    batch_size: {batch}
{checkpoint}{extra}    query: {query}
"""
    return load_spec(write_ingest(tmp_path, text)).resource("t")


def crash_after(res, store, batches: int) -> None:
    """Run until ``batches`` batches are committed, then stop as a crash would (the checkpoint stays)."""
    run = run_pipeline(res, store, run_id="first")
    for event in run:
        if isinstance(event, BatchCommitted) and event.index + 1 == batches:
            break
    run.close()
    assert store.load("t") is not None


def finish(res, store) -> RunFinished:
    events = list(run_pipeline(res, store, run_id="second"))
    assert isinstance(events[-1], RunFinished)
    return events[-1]


DDL = {
    "sqlite": "CREATE TABLE events (id INTEGER, ts TEXT, kind TEXT, amount REAL, note TEXT)",
    "duckdb": "CREATE TABLE events (id BIGINT, ts TIMESTAMP, kind VARCHAR, amount DECIMAL(12, 2), note VARCHAR)",
    "mariadb": "CREATE TABLE events (id BIGINT, ts DATETIME(6), kind VARCHAR(20), amount DECIMAL(12, 2), note TEXT)",
}


def events(db: Db, n: int) -> None:
    db.run(DDL[db.kind])
    rows = []
    for i in range(1, n + 1):
        ts = dt.datetime(2025, 3, 1) + dt.timedelta(minutes=int(i**0.5), microseconds=123)  # groups of ~2k rows
        amount = None if i % 11 == 0 else (round(i * 1.37, 2) if db.kind == "sqlite" else Decimal(i * 137) / 100)
        rows.append((i, ts.isoformat(sep=" ") if db.kind == "sqlite" else ts, ["click", "view", "buy"][i % 3], amount, None))
    db.run("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)


# --- exact loads and resumes ----------------------------------------------------------------------------------


def test_full_load_then_crash_and_resume_is_exact(db, tmp_path):
    events(db, 1000)
    res = resource(tmp_path, db.url, "SELECT id, ts, kind, amount, note FROM events", column="id", batch=90)
    store = MemoryCheckpointStore()
    crash_after(res, store, 4)
    assert store.load("t").last_value == 360
    finished = finish(res, store)
    assert finished.resumed and finished.rows_this_run == 640
    assert_same_rows(db.rows("SELECT id, ts, kind, amount, note FROM events"), output_rows(tmp_path / "out" / "t"))
    assert store.docs == {}
    schemas = {pq.read_schema(p).remove_metadata() for p in (tmp_path / "out" / "t").glob("part-*.parquet")}
    assert len(schemas) == 1, "one schema per run, even though `note` is NULL throughout"


@pytest.mark.parametrize("crash_at", [1, 3, 7])
def test_ties_across_the_batch_size_resume_exactly(db, tmp_path, crash_at):
    events(db, 600)  # ts repeats in groups of up to 49 rows: larger than the batch of 20
    res = resource(tmp_path, db.url, "SELECT id, ts, kind FROM events", column="ts", batch=20)
    store = MemoryCheckpointStore()
    crash_after(res, store, crash_at)
    finish(res, store)
    out = output_rows(tmp_path / "out" / "t")
    assert_same_rows(db.rows("SELECT id, ts, kind FROM events"), out)
    for part in (tmp_path / "out" / "t").glob("part-*.parquet"):  # no tie was split between two parts
        assert pq.read_table(part).num_rows >= 20 or part == max((tmp_path / "out" / "t").glob("part-*.parquet"))


TEXT_KEYS = ["ABC", "abc", "Abc", "x", "x ", "x  ", "X", "e", "é", "E", "é ", "a", "b", "B", "zz", "Z"]
TEXT_DDL = {
    "sqlite": "CREATE TABLE words (id INTEGER, k TEXT COLLATE NOCASE)",
    "duckdb": "CREATE TABLE words (id INTEGER, k VARCHAR COLLATE NOCASE)",
    # MariaDB's default: case- and accent-insensitive, PAD SPACE ('a' = 'A' = 'á', 'x' = 'x ')
    "mariadb": "CREATE TABLE words (id INT, k VARCHAR(10)) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
}


@pytest.mark.parametrize("crash_at", [1, 2, 4, 6])
def test_text_keys_on_case_insensitive_collations_load_exactly_once(db, tmp_path, crash_at):
    db.run(TEXT_DDL[db.kind])
    rows = [(i, TEXT_KEYS[i % len(TEXT_KEYS)]) for i in range(48)]  # each key three times
    db.run("INSERT INTO words VALUES (?, ?)", rows)
    res = resource(tmp_path, db.url, "SELECT id, k FROM words", column="k", batch=4)
    store = MemoryCheckpointStore()
    crash_after(res, store, crash_at)
    finish(res, store)
    out = output_rows(tmp_path / "out" / "t")
    assert_same_rows(rows, out)
    with closing(open_source(res.source)) as src:
        assert src.max_value(res.query, "k") == "é "  # byte-wise the largest (é is 0xC3 0xA9), not the collation's
        assert src.count(res.query, ("k", "x")) == 3 * sum(1 for k in TEXT_KEYS if k <= "x")


# --- incremental loads with :last_value ---------------------------------------------------------------------------


def test_incremental_last_value_loads_new_and_late_rows_once(db, tmp_path):
    events(db, 300)
    query = "SELECT id, ts, kind FROM events WHERE ts >= :last_value  -- >= keeps late rows at the boundary"
    extra = "    incremental_column: ts\n    initial_value: 2025-03-01 00:05:00\n"
    res = resource(tmp_path, db.url, query, column=None, batch=25, extra=extra)
    store = MemoryCheckpointStore()
    first = list(run_pipeline(res, store, run_id="one"))[-1]
    loaded = [r for r in db.rows("SELECT id, ts, kind FROM events") if r[0] >= 25]  # ts >= 00:05 from id 25 on
    assert first.rows_this_run == len(loaded)
    last = store.load_state("t").last_value
    assert str(last).startswith("2025-03-01 00:17:00.000123")
    # late rows at the stored value, and newer ones; then a crash in the middle of the second run
    base = dt.datetime.fromisoformat(str(last))
    late = [(1000, base, "late"), (1001, base, "late too")]
    late += [(2000 + i, base + dt.timedelta(minutes=1 + i // 7), "new") for i in range(70)]
    if db.kind == "sqlite":
        late = [(i, t.isoformat(sep=" ") if isinstance(t, dt.datetime) else t, k) for i, t, k in late]
    db.run("INSERT INTO events (id, ts, kind) VALUES (?, ?, ?)", late)
    crash_after(res, store, 1)
    second = finish(res, store)
    out = output_rows(tmp_path / "out" / "t")
    assert_same_rows([r for r in db.rows("SELECT id, ts, kind FROM events") if r[0] >= 25], out)
    assert second.rows_this_run + 25 <= 72 + 25
    assert list(run_pipeline(res, store, run_id="three"))[-1].rows_this_run == 0


def test_incremental_text_column_on_a_case_insensitive_collation(tmp_path, mysql_db):
    db = Db("mariadb", tmp_path, mysql_db)
    db.run(TEXT_DDL["mariadb"])
    db.run("INSERT INTO words VALUES (?, ?)", [(1, "B"), (2, "a")])
    extra = '    incremental_column: k\n    initial_value: ""\n'
    res = resource(tmp_path, db.url, "SELECT id, k FROM words WHERE k >= :last_value", column=None, batch=10, extra=extra)
    store = MemoryCheckpointStore()
    list(run_pipeline(res, store, run_id="one"))
    assert store.load_state("t").last_value == "a"  # byte-wise: 'B' < 'a'
    db.run("INSERT INTO words VALUES (?, ?)", [(3, "b"), (4, "A"), (5, "a "), (6, "x")])
    list(run_pipeline(res, store, run_id="two"))
    # 'A' sorts before 'a' byte-wise: not new. Compared as the column's collation, `k >= 'a'` would take 'A' and
    # load 'B' again (equal to 'b' and greater than 'a' there)
    assert sorted(r[0] for r in output_rows(tmp_path / "out" / "t")) == [1, 2, 3, 5, 6]


# --- what is refused, and how it is said ----------------------------------------------------------------------


def test_float_key_is_refused_with_the_fix(db, tmp_path):
    db.run("CREATE TABLE m (id INTEGER, v DOUBLE PRECISION)" if db.kind != "sqlite" else "CREATE TABLE m (id INTEGER, v REAL)")
    db.run("INSERT INTO m VALUES (?, ?)", [(1, 0.5), (2, -0.0)])
    res = resource(tmp_path, db.url, "SELECT id, v FROM m", column="v")
    with pytest.raises(SourceError) as err:
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    message = str(err.value)
    assert "checkpoint column 'v' holds floating-point values" in message and "source 'legacy'" in message
    assert "CAST(v AS DECIMAL(38, 10))" in message
    assert not (tmp_path / "out" / "t").exists()


def test_null_key_is_refused_before_anything_is_written(db, tmp_path):
    db.run("CREATE TABLE n (id INTEGER, k INTEGER)")
    db.run("INSERT INTO n VALUES (?, ?)", [(i, None if i == 57 else i) for i in range(100)])
    res = resource(tmp_path, db.url, "SELECT id, k FROM n", column="k", batch=10)
    with pytest.raises(OrderingError, match=r"checkpoint column 'k' holds NULL.*nothing was written.*WHERE k IS NOT NULL"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert not list((tmp_path / "out").rglob("part-*"))


def test_bad_url_errors_never_show_the_password(tmp_path, monkeypatch, mysql_server):
    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("LEGACY_PW", secret)
    monkeypatch.setenv("LEGACY_URL", f"mysql+pymysql://etl:{secret}@db:not-a-port/shop")
    cases = {
        "${LEGACY_URL}": (SpecError, "is not a SQLAlchemy URL (not shown"),
        "nosuchdb+driver://etl:${LEGACY_PW}@db/shop": (SpecError, "no SQLAlchemy dialect 'nosuchdb+driver' is installed"),
    }
    for url, (kind, expected) in cases.items():
        with pytest.raises(kind) as err:
            resource(tmp_path, url, "SELECT 1 AS id")
        assert expected in str(err.value) and secret not in str(err.value) and "ingest.yml" in str(err.value)
    # a dialect whose driver is not installed: said at open, with the module to install
    res = resource(tmp_path, "mssql+pyodbc://etl:${LEGACY_PW}@db:1433/shop", "SELECT 1 AS id")
    with pytest.raises(SourceError) as err:
        open_source(res.source)
    assert "the driver of mssql+pyodbc is not installed (no module 'pyodbc')" in str(err.value)
    assert "pip install pyodbc" in str(err.value) and secret not in str(err.value)
    # a wrong password on the real server: the driver's message, without the password
    res = resource(tmp_path, "mysql+pymysql://root:${LEGACY_PW}@127.0.0.1:3306/test", "SELECT 1 AS id")
    with pytest.raises(SourceError) as err:
        open_source(res.source)
    assert "cannot connect to mysql://127.0.0.1:3306/test" in str(err.value) and "Access denied" in str(err.value)
    assert secret not in str(err.value) and secret not in repr(res.source)
    # a raw '@' in a password written into the url moves a piece of it into the host: never shown either
    res = resource(tmp_path, "mysql+pymysql://root:pw@Rest-Of-Pw@127.0.0.1:3306/test", "SELECT 1 AS id")
    assert res.source.location == "mysql://***"
    with pytest.raises(SourceError) as err:
        open_source(res.source)
    assert "Rest-Of-Pw" not in str(err.value) and "cannot connect to mysql://***" in str(err.value)


def test_sqlite_file_that_does_not_exist_is_not_created(tmp_path):
    res = resource(tmp_path, "sqlite:///missing.db", "SELECT 1 AS id")
    with pytest.raises(SourceError, match=r"sqlite database file .*missing.db does not exist; fix `url`"):
        open_source(res.source)
    assert not (tmp_path / "missing.db").exists()


# --- a dialect conduit does not know ----------------------------------------------------------------------------

from sqlalchemy.dialects import registry  # noqa: E402
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite  # noqa: E402


class UnknownDialect(SQLiteDialect_pysqlite):
    """A real database (SQLite) behind a dialect name conduit has no rules for."""

    name = "conduitunknown"
    supports_statement_cache = True


registry.register("conduitunknown", __name__, "UnknownDialect")


def test_unknown_dialect_refuses_a_text_key_and_loads_an_integer_key(tmp_path):
    db = Db("sqlite", tmp_path)
    db.run("CREATE TABLE words (id INTEGER, k TEXT)")
    db.run("INSERT INTO words VALUES (?, ?)", [(i, f"k{i % 5}") for i in range(30)])
    url = f"conduitunknown:///{tmp_path / 'src.db'}"  # a dialect conduit does not know: no path rules either
    res = resource(tmp_path, url, "SELECT id, k FROM words", column="k", batch=7)
    assert res.source.dialect == "conduitunknown"
    with pytest.raises(SourceError) as err:
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    assert "checkpoint column 'k' holds text on a conduitunknown database" in str(err.value)
    assert "collation may treat different values as equal" in str(err.value) and "Use an integer or timestamp" in str(err.value)
    res = resource(tmp_path, url, "SELECT id, k FROM words", column="id", batch=7)
    store = MemoryCheckpointStore()
    crash_after(res, store, 2)
    finish(res, store)
    assert_same_rows(db.rows("SELECT id, k FROM words"), output_rows(tmp_path / "out" / "t"))


def test_key_rules_by_dialect():
    assert key_plan("s", "mssql", "id", 5).kind is int
    assert key_plan("s", "oracle", "ts", dt.datetime(2025, 1, 1)).kind is dt.datetime
    assert key_plan("s", "mssql", "d", dt.date(2025, 1, 1)).kind is dt.date
    assert key_plan("s", "snowflake", "n", Decimal("1.5")).kind is Decimal
    for dialect in ("mssql", "oracle", "snowflake"):
        with pytest.raises(SourceError, match="whose comparison conduit cannot make byte-wise"):
            key_plan("s", dialect, "k", "text")
        with pytest.raises(SourceError, match="holds bytes"):
            key_plan("s", dialect, "k", b"\x00")
    assert key_plan("s", "mysql", "k", "a").expr == "CAST(CONVERT({col} USING utf8mb4) AS BINARY)"
    assert key_plan("s", "duckdb", "k", "a").expr == "encode({col})"
    with pytest.raises(SourceError, match="holds floating-point values"):
        key_plan("s", "sqlite", "v", 1.5)
    with pytest.raises(OrderingError, match="holds NaN"):
        key_plan("s", "postgresql", "n", Decimal("NaN"))
    with pytest.raises(SourceError, match="boolean"):
        key_plan("s", "duckdb", "b", True)
    with pytest.raises(SourceError, match="type character, which does not compare as its bytes"):
        key_plan("s", "postgresql", "k", "a  ", detail="character/UTF8")
    with pytest.raises(SourceError, match="incremental column 'k' is text"):
        key_plan("s", "duckdb", "k", "a", incremental=True)
    with pytest.raises(SourceError, match=r"character set latin1.*CONVERT\(k USING utf8mb4\)"):
        key_plan("s", "mariadb", "k", "a", incremental=True, detail="latin1")


def test_keys_arriving_out_of_python_order_stop_the_read(tmp_path):
    Db("sqlite", tmp_path).run("CREATE TABLE t (id INTEGER)")
    res = resource(tmp_path, "sqlite:///src.db", "SELECT id FROM t")
    src = open_source(res.source)
    try:
        assert isinstance(src, SqlaSource)
        plan = KeyPlan("k", str)
        src._check_order(plan, ["a", "b", "b"], None, 0)
        with pytest.raises(OrderingError) as err:
            src._check_order(plan, ["b", "c", "B"], "a", 100)
        assert "returned 'B' (row 103 of the read) after 'c' (row 102)" in str(err.value)
        assert "orders the column otherwise than conduit compares the values" in str(err.value)
        with pytest.raises(OrderingError, match="holds the integer value 5 at row 2 of the read where it held text values"):
            src._check_order(plan, ["a", 5], None, 0)
    finally:
        src.close()


# --- what the rest of conduit sees ------------------------------------------------------------------------------


def test_identity_kinds_and_validate_never_show_a_secret(tmp_path, monkeypatch, mysql_db):
    from conduit_dagster.assets import asset_kinds
    from conduit_dagster.engine.backends import source_backend

    monkeypatch.setenv("LEGACY_PW", "")
    Db("mariadb", tmp_path, mysql_db).run("CREATE TABLE t (id INT, k VARCHAR(5))")
    res = resource(tmp_path, f"mysql+pymysql://root:${{LEGACY_PW}}@127.0.0.1:3306/{mysql_db}", "SELECT id, k FROM t")
    backend = source_backend(res.source)
    assert backend.identity(res.source) == f"sqlalchemy:mysql://127.0.0.1:3306/{mysql_db}"
    assert asset_kinds(res) == {"mysql", "sqlalchemy", "parquet"}
    conduit = str(Path(sys.executable).with_name("conduit"))
    done = subprocess.run([conduit, "validate"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"source legacy: ok, mysql://127.0.0.1:3306/{mysql_db}" in done.stdout
    assert "resource t: ok, legacy -> out, 2 columns" in done.stdout and "root@" not in done.stdout


def test_postgresql_through_sqlalchemy_text_keys_in_c_order_and_char_refused(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f'CREATE TABLE {pg_schema}.words (id int, k text COLLATE "en-US-x-icu", c char(5))')
        cur.executemany(f"INSERT INTO {pg_schema}.words VALUES (%s, %s, %s)", [(i, TEXT_KEYS[i % 16], "a") for i in range(48)])
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    res = resource(tmp_path, url, f"SELECT id, k FROM {pg_schema}.words", column="k", batch=4)
    store = MemoryCheckpointStore()
    crash_after(res, store, 3)
    finish(res, store)
    assert_same_rows([(i, TEXT_KEYS[i % 16]) for i in range(48)], output_rows(tmp_path / "out" / "t"))
    assert res.source.location == "postgresql://127.0.0.1:5432/test"
    res = resource(tmp_path, url, f"SELECT id, c FROM {pg_schema}.words", column="c", batch=4)
    with pytest.raises(SourceError, match=r"checkpoint column 'c' has type character, .*Use `type: postgresql`"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))


# --- values bound exactly, queries read as their database reads them, values Python cannot hold ---------------------


@pytest.fixture(params=["mariadb", "duckdb", "postgresql"])
def decimal_db(request, tmp_path) -> Db:
    if request.param == "mariadb":
        return Db("mariadb", tmp_path, request.getfixturevalue("mysql_db"))
    if request.param == "postgresql":
        return Db("postgresql", tmp_path, pg_schema=request.getfixturevalue("pg_schema"))
    return Db("duckdb", tmp_path)


@pytest.mark.parametrize("crash_at", [1, 2])
def test_decimal_keys_differing_in_the_20th_digit_resume_exactly(decimal_db, tmp_path, crash_at):
    # DuckDB has no native decimal for SQLAlchemy: a Decimal bound with SQLAlchemy's own Numeric type became the float
    # 1.0, and `k > 1.0` skipped ...02 and ...03 on resume
    db = decimal_db
    db.run("CREATE TABLE v (i INT, k DECIMAL(38, 20))")
    keys = ["1.00000000000000000001", "1.00000000000000000002", "1.00000000000000000003", "1.00000000000000000003", "2.5"]
    rows = [(i, Decimal(k)) for i, k in enumerate(keys)]
    db.run("INSERT INTO v VALUES (?, ?)", rows)
    res = resource(tmp_path, db.url, "SELECT i, k FROM v", column="k", batch=1)
    store = MemoryCheckpointStore()
    crash_after(res, store, crash_at)
    assert store.load("t").last_value == Decimal(keys[crash_at - 1])
    finish(res, store)
    assert_same_rows(db.rows("SELECT i, k FROM v"), output_rows(tmp_path / "out" / "t"))
    with closing(open_source(res.source)) as src:
        assert src.count(res.query, ("k", Decimal("1.00000000000000000002"))) == 2


def test_decimal_last_value_is_bound_exactly(tmp_path):
    db = Db("duckdb", tmp_path)
    db.run("CREATE TABLE v (i INT, k DECIMAL(38, 20))")
    db.run("INSERT INTO v VALUES (?, ?)", [(1, Decimal("1.00000000000000000001")), (2, Decimal("1.00000000000000000002"))])
    extra = "    incremental_column: k\n    initial_value: 0\n"
    res = resource(tmp_path, db.url, "SELECT i, k FROM v WHERE k > :last_value", column=None, batch=10, extra=extra)
    store = MemoryCheckpointStore()
    list(run_pipeline(res, store, run_id="one"))
    assert store.load_state("t").last_value == Decimal("1.00000000000000000002")
    db.run("INSERT INTO v VALUES (?, ?)", [(3, Decimal("1.00000000000000000003"))])
    second = list(run_pipeline(res, store, run_id="two"))[-1]
    assert second.rows_this_run == 1  # not 3: `k > 1.0` would load the first two again
    assert_same_rows(db.rows("SELECT i, k FROM v"), output_rows(tmp_path / "out" / "t"))


MYSQL_QUERIES = [
    "SELECT id FROM v WHERE id > 1--1",  # MySQL: id > 1 - (-1); `--` starts a comment only before a space
    "SELECT id FROM v WHERE id > 1 -- not 1\\nAND id < 4",
    "SELECT id FROM v  # don't stop at this quote\\nWHERE id > 2",
    "SELECT id FROM v WHERE id <> 'it\\\\'s' # a backslash escape\\nAND id > 1",
]


@pytest.mark.parametrize("query", MYSQL_QUERIES)
@pytest.mark.parametrize("column", [None, "id"])
def test_mysql_dialect_reads_the_query_as_mysql_does(tmp_path, mysql_db, query, column):
    db = Db("mariadb", tmp_path, mysql_db)
    db.run("CREATE TABLE v (id INT PRIMARY KEY)")
    db.run("INSERT INTO v VALUES (?)", [(i,) for i in range(1, 6)])
    res = resource(tmp_path, db.url, f'"{query}"', column=column, batch=1)
    want = db.rows(res.query)
    assert want and len(want) < 5
    store = MemoryCheckpointStore()
    if column is not None and len(want) > 1:
        crash_after(res, store, 1)
    finish(res, store)
    assert_same_rows(want, output_rows(tmp_path / "out" / "t"))


def test_mysql_dialect_last_value_placeholder_as_mysql_reads_it(tmp_path, mysql_db):
    db = Db("mariadb", tmp_path, mysql_db)
    db.run("CREATE TABLE v (id INT PRIMARY KEY)")
    db.run("INSERT INTO v VALUES (?)", [(i,) for i in range(1, 6)])
    extra = "    incremental_column: id\n    initial_value: 3\n"
    res = resource(
        tmp_path, db.url, '"SELECT id FROM v # isn\'t :last_value\\nWHERE id >= :last_value"', column=None, extra=extra
    )
    list(run_pipeline(res, MemoryCheckpointStore(), run_id="one"))
    assert sorted(r[0] for r in output_rows(tmp_path / "out" / "t")) == [3, 4, 5]
    # MySQL sees no placeholder (a # comment) where standard SQL sees one: refused, whichever way it is declared
    for more in (extra, ""):
        with pytest.raises(SpecError, match=r"query.*MySQL, which reads this query's :last_value inside a comment"):
            resource(tmp_path, db.url, '"SELECT id FROM v # WHERE id >= :last_value"', column=None, extra=more)
    # on another dialect `--1` is a comment, as there
    sqlite = Db("sqlite", tmp_path)
    sqlite.run("CREATE TABLE v (id INTEGER)")
    sqlite.run("INSERT INTO v VALUES (?)", [(i,) for i in range(1, 6)])
    res = resource(tmp_path, sqlite.url, "SELECT id FROM v WHERE id > 1--1", column="id")
    finish(res, MemoryCheckpointStore())
    assert sorted(r[0] for r in output_rows(tmp_path / "out" / "t")) == [2, 3, 4, 5]


def test_duckdb_infinity_dates_and_timestamps_are_refused(tmp_path):
    db = Db("duckdb", tmp_path)
    db.run("CREATE TABLE v (i INT, d DATE, ts TIMESTAMP, tz TIMESTAMPTZ)")
    edges = [
        (1, "2024-01-01", "2024-01-01 00:00:00", "2024-01-01 00:00:00+00"),
        (2, "9999-12-31", "9999-12-31 23:59:59.999999", "9999-12-31 23:59:59.999999+00"),
        (3, "0001-01-01", "0001-01-01 00:00:00", "0001-01-01 00:00:00+00"),
    ]
    db.run("INSERT INTO v VALUES (?, ?, ?, ?)", edges)
    # the largest and smallest real values load as they are
    res = resource(tmp_path, db.url, "SELECT i, d, ts, tz FROM v", column="ts", batch=1)
    store = MemoryCheckpointStore()
    crash_after(res, store, 2)
    finish(res, store)
    got = sorted(output_rows(tmp_path / "out" / "t"))
    assert [(r[0], r[1], r[2]) for r in got] == [
        (1, dt.date(2024, 1, 1), dt.datetime(2024, 1, 1)),
        (2, dt.date.max, dt.datetime.max),
        (3, dt.date.min, dt.datetime.min),
    ]
    with closing(open_source(res.source)) as src:
        assert src.max_value(res.query, "ts") == dt.datetime.max
    # infinity arrives as those same values: refused, naming the column, whether it is the key or not
    for column, value in {"d": "'infinity'::DATE", "ts": "'-infinity'::TIMESTAMP", "tz": "'infinity'::TIMESTAMPTZ"}.items():
        query = f"SELECT i, {value} AS {column} FROM v"
        for key in ("i", column):
            res = resource(tmp_path, db.url, f'"{query}"', column=key, batch=1)
            with pytest.raises(SourceError, match=rf"column '{column}' holds infinity or -infinity.*isfinite\({column}\)"):
                list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
        with closing(open_source(res.source)) as src, pytest.raises(SourceError, match=f"column '{column}' holds infinity"):
            src.max_value(res.query, column)


def test_postgresql_numeric_key_with_a_later_nan_is_refused(tmp_path, pg_schema):
    db = Db("postgresql", tmp_path, pg_schema=pg_schema)
    db.run("CREATE TABLE v (i int, k numeric)")
    db.run("INSERT INTO v VALUES (?, ?)", [(1, Decimal(1)), (2, Decimal(2)), (3, Decimal("NaN")), (4, Decimal("NaN"))])
    res = resource(tmp_path, db.url, "SELECT i, k FROM v", column="k", batch=10)
    with pytest.raises(OrderingError, match=r"checkpoint column 'k' holds NaN \(row 3 of the read\).*WHERE k <> 'NaN'"):
        list(run_pipeline(res, MemoryCheckpointStore(), run_id="r"))
    with closing(open_source(res.source)) as src, pytest.raises(OrderingError, match="checkpoint column 'k' holds NaN"):
        src.max_value(res.query, "k")


def test_a_read_stopped_early_logs_nothing(db, tmp_path, caplog):
    events(db, 3000)
    res = resource(tmp_path, db.url, "SELECT id, ts FROM events")
    with closing(open_source(res.source)) as src, caplog.at_level(logging.WARNING):
        for column in (None, "id"):
            chunks = src.read(res.query, column, None, resume=False, fetch_size=100)
            assert next(chunks).data.num_rows == 100
            chunks.close()
            assert src.count(res.query) == 3000  # the source goes on working
    assert [r.getMessage() for r in caplog.records] == []
