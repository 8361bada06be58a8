"""The source side of partitions against real databases: PostgreSQL, MariaDB, SQLite, and SQLAlchemy over DuckDB,
SQLite, MariaDB and PostgreSQL.

Each source reads three adjacent partitions (day windows in Europe/Berlin around the 2024-03-31 DST change on a date,
a timestamp without time zone and a zoned timestamp column; key ranges planned by ``partitions.compute_plan`` on an
integer and a decimal column). The table holds rows exactly at every boundary and one microsecond before it; the ids
are shuffled, so a resume past an id in one partition would meet other partitions' rows if the restriction slipped.
"""

import dataclasses
import datetime as dt
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.errors import SourceError, SpecError
from conduit_dagster.engine.partitions import (
    KeyRanges,
    Partition,
    PartitionsSpec,
    RangePlan,
    TimeWindows,
    compute_plan,
    plan_fingerprint,
    range_keys,
    time_partition_keys,
    time_window,
)
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources import Source, open_source
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster.engine.sources.mysql import MySQLSourceSpec
from conduit_dagster.engine.sources.sqla import SqlaSourceSpec
from conduit_dagster.engine.sources.sqlite import SqliteSourceSpec
from conduit_dagster.engine.spec import LocalDestinationSpec, PostgresSourceSpec, ResourceSpec, Secret, load_spec
from conduit_dagster_tests.conftest import MYSQL, PG_DSN, mysql_connect, write_ingest
from conduit_dagster_tests.helpers import output_rows

ZONE = "Europe/Berlin"
BERLIN = ZoneInfo(ZONE)
DAYS = ("2024-03-30", "2024-03-31", "2024-04-01")  # 2024-03-31 has 23 hours in Berlin
N = 600
SOURCES = ["postgresql", "mysql", "sqlite", "sqla-duckdb", "sqla-sqlite", "sqla-mariadb", "sqla-postgresql"]


def windows(column: str, every: str = "day") -> TimeWindows:
    start = dt.datetime(2024, 3, 30, tzinfo=BERLIN)
    return TimeWindows(column, every, start, dt.datetime(2024, 4, 2, tzinfo=BERLIN), ZONE)


def window_partitions(column: str) -> list[Partition]:
    tw = windows(column)
    return [Partition("events", key, column, *time_window(tw, key), ZONE) for key in DAYS]


# --- the rows, and which partition each belongs to (computed here, in Python) ---------------------------------------


def make_rows(seed: int = 7) -> list[dict[str, Any]]:
    """Rows whose date, timestamp and zoned timestamp fall in the three windows, with every boundary (and one
    microsecond before it) present; decimals with many ties."""
    rng = random.Random(seed)
    bounds = [time_window(windows("x"), key) for key in DAYS]
    instants = [b[0] for b in bounds] + [bounds[-1][1]]  # aware, Berlin
    walls = [i.replace(tzinfo=None) for i in instants]
    span_wall = (walls[-1] - walls[0]).total_seconds()
    span_instant = (instants[-1] - instants[0]).total_seconds()
    special_wall = walls[:-1] + [w - dt.timedelta(microseconds=1) for w in walls[1:]]
    special_instant = instants[:-1] + [i - dt.timedelta(microseconds=1) for i in instants[1:]]
    ids = list(range(1, N + 1))
    rng.shuffle(ids)
    rows = []
    for n, row_id in enumerate(ids):
        if n < len(special_wall):
            naive, zoned = special_wall[n], special_instant[n]
        else:
            naive = walls[0] + dt.timedelta(seconds=rng.randrange(int(span_wall)), microseconds=rng.randrange(2) * 500_000)
            zoned = instants[0] + dt.timedelta(seconds=rng.randrange(int(span_instant)))
        day = walls[0].date() + dt.timedelta(days=n % 3 if n < 30 else rng.randrange(3))
        rows.append(
            {
                "id": row_id,
                "d": day,
                "ts": naive,
                "tz": zoned.astimezone(dt.UTC),
                "amt": Decimal(rng.randrange(0, 120)) / 4,  # 0.00 .. 29.75: many ties
            }
        )
    return rows


def expected_ids(rows: list[dict[str, Any]], p: Partition) -> set[int]:
    """The ids of the rows with lo <= column < hi, as the partition's docstring defines it."""

    def value_bound(b: Any) -> Any:
        if b is None or p.timezone is None:
            return b
        if p.column == "d":
            return b.date()
        if p.column == "ts":
            return b.astimezone(BERLIN).replace(tzinfo=None)
        return b

    lo, hi = value_bound(p.lo), value_bound(p.hi)
    return {r["id"] for r in rows if (lo is None or lo <= r[p.column]) and (hi is None or r[p.column] < hi)}


# --- the databases ---------------------------------------------------------------------------------------------------


class Db:
    """One source kind: its table ``events`` filled from the rows, and the source spec conduit opens it by."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.engine = kind.removeprefix("sqla-")
        self.tmp_path = tmp_path
        if self.engine in ("postgresql",):
            self.schema = request.getfixturevalue("pg_schema")
        elif self.engine in ("mysql", "mariadb"):
            self.database = request.getfixturevalue("mysql_db")
        elif self.engine == "sqlite":
            self.path = tmp_path / "src.db"
        else:
            self.path = tmp_path / "src.duckdb"

    @property
    def columns(self) -> tuple[str, ...]:
        """The partition columns it can hold: SQLite has no zoned timestamp and no decimal."""
        return ("id", "d", "ts") if self.engine == "sqlite" else ("id", "d", "ts", "tz", "amt")

    def spec(self) -> Any:
        if self.kind == "postgresql":
            return PostgresSourceSpec(
                name="db", host="127.0.0.1", port=5432, database="test", user="postgres", schema=self.schema
            )
        if self.kind == "mysql":
            return MySQLSourceSpec(
                name="db",
                host=str(MYSQL["host"]),
                port=int(MYSQL["port"]),
                database=self.database,
                user=str(MYSQL["user"]),
                password=Secret(str(MYSQL["password"])) if MYSQL["password"] else None,
            )
        if self.kind == "sqlite":
            return SqliteSourceSpec(name="db", path=self.path)
        url = {
            "duckdb": f"duckdb:///{getattr(self, 'path', '')}",
            "sqlite": f"sqlite:///{getattr(self, 'path', '')}",
            "mariadb": f"mysql+pymysql://root@127.0.0.1:3306/{getattr(self, 'database', '')}",
            "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:5432/test?options=-csearch_path%3D"
            + getattr(self, "schema", ""),
        }[self.engine]
        dialect = {"mariadb": "mysql"}.get(self.engine, self.engine)
        return SqlaSourceSpec(name="db", url=Secret(url), dialect=dialect, location=f"{dialect}://test")

    def open(self) -> Source:
        return open_source(self.spec())

    def _connect(self) -> Any:
        if self.engine == "postgresql":
            import psycopg2

            return psycopg2.connect(PG_DSN, options=f"-c search_path={self.schema} -c TimeZone=UTC")
        if self.engine in ("mysql", "mariadb"):
            return mysql_connect(self.database)
        if self.engine == "sqlite":
            return sqlite3.connect(self.path)
        import duckdb

        conn = duckdb.connect(str(self.path))
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    def execute(self, *statements: str) -> None:
        conn = self._connect()
        try:
            cur = conn.cursor()
            for statement in statements:
                cur.execute(statement)
            conn.commit()
        finally:
            conn.close()

    def load(self, rows: list[dict[str, Any]], table: str = "events") -> None:
        ddl = {
            "postgresql": "id bigint, d date, ts timestamp, tz timestamptz, amt numeric(12, 2)",
            "mysql": "id BIGINT, d DATE, ts DATETIME(6), tz TIMESTAMP(6) NULL, amt DECIMAL(12, 2)",
            "mariadb": "id BIGINT, d DATE, ts DATETIME(6), tz TIMESTAMP(6) NULL, amt DECIMAL(12, 2)",
            "sqlite": "id INTEGER, d TEXT, ts TEXT",
            "duckdb": "id BIGINT, d DATE, ts TIMESTAMP, tz TIMESTAMPTZ, amt DECIMAL(12, 2)",
        }[self.engine]
        cols = self.columns
        values = []
        for r in rows:
            row = []
            for c in cols:
                v = r[c]
                if self.engine == "sqlite" and v is not None and c in ("d", "ts"):
                    v = v.isoformat() if c == "d" else v.isoformat(sep=" ")  # '...00:00:00' or '...00:00:00.500000'
                if self.engine in ("mysql", "mariadb") and isinstance(v, dt.datetime) and v.tzinfo is not None:
                    v = v.astimezone(dt.UTC).replace(tzinfo=None)  # the session's zone is UTC
                row.append(v)
            values.append(tuple(row))
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(f"CREATE TABLE {table} ({ddl})")
            if self.engine == "duckdb":  # executemany is slow there (seconds for 600 rows): through Arrow
                rows_table = pa.table({c: [v[i] for v in values] for i, c in enumerate(cols)})  # noqa: F841 - read by name
                cur.execute(f"INSERT INTO {table} SELECT * FROM rows_table")
                conn.commit()
                return
            mark = "?" if self.engine == "sqlite" else "%s"
            cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})", values)
            conn.commit()
        finally:
            conn.close()


@pytest.fixture(params=SOURCES)
def db(request, tmp_path) -> Db:
    return Db(request.param, tmp_path, request)


def ids_of(src: Source, query: str, *, after: Any = None, fetch_size: int = 50) -> list[int]:
    out: list[int] = []
    for chunk in src.read(query, "id", after, resume=after is not None, fetch_size=fetch_size):
        out.extend(chunk.data.column("id").to_pylist())
    return out


def check_partitions(db: Db, rows: list[dict[str, Any]], parts: list[Partition], query: str = "SELECT * FROM events") -> None:
    """Each partition reads exactly its rows (each once), counts and finds its largest id within itself, and a resume
    inside it stays inside it; together they read every row of the table once."""
    seen: Counter[int] = Counter()
    for p in parts:
        want = expected_ids(rows, p)
        src = db.open()
        try:
            src.restrict(p)
            got = ids_of(src, query)
            assert Counter(got) == Counter(want), (
                f"{p.describe()}: lost {sorted(want - set(got))[:5]}, extra {sorted(set(got) - want)[:5]}"
            )
            seen.update(got)
            assert src.count(query) == len(want)
            assert src.max_value(query, "id") == (max(want) if want else None)
            assert src.key_type(query, "id") == (int,)
            assert "id" in src.probe(query, "id")
            if want:
                middle = sorted(want)[len(want) // 2]
                assert src.count(query, upto=("id", middle)) == sum(1 for i in want if i <= middle)
                # a resume inside the partition reads on past the checkpoint value, within the partition only
                assert sorted(ids_of(src, query, after=middle)) == sorted(i for i in want if i > middle)
        finally:
            src.close()
    all_ids = [r["id"] for r in rows]
    assert sorted(seen.elements()) == sorted(all_ids), "the partitions' union is not the table, each row once"


# --- time windows ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["d", "ts", "tz"])
def test_time_windows_split_the_rows_exactly(db: Db, column: str) -> None:
    if column not in db.columns:
        pytest.skip(f"{db.kind} has no {column} column")
    rows = make_rows()
    db.load(rows)
    parts = window_partitions(column)
    # boundaries are real: the rows at each window's start, and one microsecond before the next, exist
    if column != "d":
        for p in parts:
            assert expected_ids(rows, p), p.describe()
    check_partitions(db, rows, parts)


def test_hourly_windows_on_wall_clock_times_across_both_dst_changes(db: Db) -> None:
    """Hourly windows in New York over the nights clocks go forward and back, on a timestamp without time zone: the
    repeated hour's wall-clock times land in one of its two windows, the skipped hour's window is its neighbour's, and
    every row is read once."""
    ny = ZoneInfo("America/New_York")
    rows = []
    for n, day in enumerate((dt.datetime(2024, 3, 10), dt.datetime(2024, 11, 3))):
        for minute in range(0, 4 * 60, 5):
            ts = day + dt.timedelta(minutes=minute)  # wall-clock times, 02:xx on 2024-03-10 included
            rows.append(
                {"id": n * 1000 + minute + 1, "ts": ts, "d": ts.date(), "tz": ts.replace(tzinfo=dt.UTC), "amt": Decimal(0)}
            )
    db.load(rows)
    seen: Counter[int] = Counter()
    for start in (dt.datetime(2024, 3, 10, tzinfo=ny), dt.datetime(2024, 11, 3, tzinfo=ny)):
        tw = TimeWindows("ts", "hour", start, start + dt.timedelta(hours=5), "America/New_York")
        keys = time_partition_keys(tw)
        for key in keys:
            p = Partition("events", key, "ts", *time_window(tw, key), "America/New_York")
            src = db.open()
            try:
                src.restrict(p)
                got = ids_of(src, "SELECT * FROM events")
            finally:
                src.close()
            lo, hi = (b.replace(tzinfo=None) for b in (p.lo, p.hi))
            assert sorted(got) == sorted(r["id"] for r in rows if lo <= r["ts"] < hi), p.describe()
            seen.update(got)
    assert sorted(seen.elements()) == sorted(r["id"] for r in rows)


def test_key_ranges_split_the_rows_exactly_and_evenly(db: Db) -> None:
    rows = make_rows()
    db.load(rows)
    for column in [c for c in ("id", "amt") if c in db.columns]:
        res = ResourceSpec(
            name="events",
            source=db.spec(),
            destination=LocalDestinationSpec(name="out", path=db.tmp_path / "out"),
            query="SELECT * FROM events",
            batch_size=100,
            resume=True,
            checkpoint_column="id",
            partitions=PartitionsSpec(KeyRanges(column, 3)),
        )
        src = db.open()
        try:
            plan = compute_plan(res, src)
        finally:
            src.close()
        assert plan.rows_seen == N and len(plan.boundaries) == 2
        kind = int if column == "id" else Decimal
        assert all(type(b) is kind for b in plan.boundaries), plan.boundaries
        parts = [plan.partition(key) for key in range_keys(3)]
        assert parts[0].lo is None and parts[-1].hi is None
        # every boundary is a value of the column: the rows holding it go to the range above it, and only there
        for b in plan.boundaries:
            assert any(r[column] == b for r in rows)
        check_partitions(db, rows, parts)
        sizes = [len(expected_ids(rows, p)) for p in parts]
        if column == "id":  # no ties: about N / 3 each
            assert all(abs(s - N / 3) <= N / 10 for s in sizes), sizes
        else:  # 120 distinct values, ties kept together
            assert all(abs(s - N / 3) <= N / 5 for s in sizes), sizes


def test_an_empty_partition_reads_nothing(db: Db) -> None:
    """A window the rows do not reach, and a query with no rows: nothing read, counted or found, no error."""
    db.load(make_rows())
    year_before = Partition(
        "events", "2023-03-30", "ts", dt.datetime(2023, 3, 30, tzinfo=BERLIN), dt.datetime(2023, 3, 31, tzinfo=BERLIN), ZONE
    )
    for p, query in (
        (year_before, "SELECT * FROM events"),
        (window_partitions("ts")[0], "SELECT * FROM events WHERE id < 0"),
        (Partition("events", "r00", "id", None, 1), "SELECT * FROM events"),
    ):
        src = db.open()
        try:
            src.restrict(p)
            assert ids_of(src, query) == []
            assert src.count(query) == 0 and src.count(query, upto=("id", 10)) == 0
            assert src.max_value(query, "id") is None
            assert ids_of(src, query, after=5) == []
        finally:
            src.close()


# --- refusals ----------------------------------------------------------------------------------------------------------


def test_null_in_the_partition_column_is_refused(db: Db) -> None:
    rows = make_rows()
    rows[5]["ts"] = None
    db.load(rows)
    with_null_k = "SELECT CASE WHEN id = 7 THEN NULL ELSE id END AS k, id, ts FROM events"
    for p, query in (
        (window_partitions("ts")[1], "SELECT * FROM events"),
        (Partition("events", "r01", "k", 100, 200), with_null_k),
    ):
        src = db.open()
        try:
            src.restrict(p)
            with pytest.raises(SourceError) as info:
                ids_of(src, query)
            message = str(info.value)
            assert "pipeline 'events'" in message and f"partition column {p.column!r} holds NULL" in message
            assert f"WHERE {p.column} IS NOT NULL" in message and "COALESCE" in message
            with pytest.raises(SourceError, match="holds NULL"):
                src.count(query)
        finally:
            src.close()
    src = db.open()
    try:
        # filtered in the query, as the message says: read
        p = window_partitions("ts")[1]
        src.restrict(p)
        assert set(ids_of(src, "SELECT * FROM events WHERE ts IS NOT NULL")) == expected_ids(rows[:5] + rows[6:], p)
    finally:
        src.close()
    src = db.open()
    try:
        with pytest.raises(SourceError, match="partition column 'k' holds NULL"):
            list(src.scan_column(with_null_k, "k"))
    finally:
        src.close()


def test_an_hourly_window_on_a_date_column_is_refused(db: Db) -> None:
    db.load(make_rows())
    tw = windows("d", "hour")
    key = "2024-03-30-05:00"
    p = Partition("events", key, "d", *time_window(tw, key), ZONE)
    src = db.open()
    try:
        src.restrict(p)
        with pytest.raises(SourceError) as info:
            src.count("SELECT * FROM events")
        assert "pipeline 'events'" in str(info.value) and "not at midnight" in str(info.value)
        assert "every: day" in str(info.value)
        midnight = Partition("events", "2024-03-31-00:00", "d", *time_window(tw, "2024-03-31-00:00"), ZONE)
        src.restrict(midnight)  # a window from midnight to 01:00 cannot be a date range either
        with pytest.raises(SourceError, match="not at midnight"):
            src.count("SELECT * FROM events")
    finally:
        src.close()


def test_text_and_float_columns_cannot_hold_key_ranges(db: Db) -> None:
    db.load(make_rows())
    text = "CAST(id AS TEXT)" if db.engine not in ("mysql", "mariadb") else "CAST(id AS CHAR)"
    real = "CAST(id AS REAL)" if db.engine not in ("mysql", "mariadb") else "CAST(id AS DOUBLE)"
    src = db.open()
    try:
        for expr in (text, real):
            query = f"SELECT id, {expr} AS k FROM events"
            with pytest.raises(SourceError) as info:
                list(src.scan_column(query, "k"))
            assert "key ranges need an integer, decimal, date or timestamp column" in str(info.value)
            assert "partition column 'k'" in str(info.value)
            src.restrict(Partition("events", "r00", "k", None, 5))
            with pytest.raises(SourceError, match="key ranges need an integer, decimal, date or timestamp column"):
                src.count(query)
            src.restrict(window_partitions("k")[0])
            with pytest.raises(SourceError, match="time windows need a date or timestamp column"):
                src.count(query)
            src.close()
            src = db.open()
    finally:
        src.close()


def test_a_key_range_plan_made_for_another_type_is_refused() -> None:
    """A plan's boundaries are values of the column's type then: compared with another type, they would split
    otherwise (in SQLite every integer sorts before every text)."""
    rows = [{"id": i, "k": i} for i in range(10)]
    src = MemorySource(rows, pa.schema([("id", pa.int64()), ("k", pa.int64())]))
    with pytest.raises(SourceError) as info:
        src.restrict(Partition("events", "r01", "k", Decimal("2.5"), None))
    assert "re-plan with `conduit plan --pipeline events`" in str(info.value)
    src.restrict(Partition("events", "r01", "k", 2, 5))
    assert [r["id"] for c in src.read("", "id", None, resume=False, fetch_size=3) for r in c.data.to_pylist()] == [2, 3, 4]
    assert src.count("") == 3 and src.max_value("", "id") == 4


def test_sqlite_text_dates_in_another_form_or_zone_are_refused(tmp_path) -> None:
    path = tmp_path / "src.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (id INTEGER, ts TEXT)")
    conn.executemany(
        "INSERT INTO events VALUES (?, ?)",
        [(1, "2024-03-30 10:00:00"), (2, "2024-03-31T10:00:00"), (3, "2024-03-31 10:00:00+02:00"), (4, "2024-03-31")],
    )
    conn.commit()
    conn.close()
    src = open_source(SqliteSourceSpec(name="db", path=path))
    try:
        src.restrict(window_partitions("ts")[1])
        for query, bad in (
            ("SELECT * FROM events WHERE id IN (1, 2)", "'2024-03-31T10:00:00'"),
            ("SELECT * FROM events WHERE id IN (1, 3)", "'2024-03-31 10:00:00+02:00'"),
            ("SELECT * FROM events WHERE id IN (1, 4)", "'2024-03-31'"),
        ):
            with pytest.raises(SourceError) as info:
                src.count(query)
            assert bad in str(info.value) and "strftime('%Y-%m-%d %H:%M:%S', ts) AS ts" in str(info.value)
        with pytest.raises(SourceError, match="has type text"):
            src.count("SELECT * FROM events WHERE id = 3")  # a zone: no form conduit compares as text
        assert src.count("SELECT * FROM events WHERE id IN (1, 2) AND ts > '2024-03-31'") == 1  # only the 'T' form
    finally:
        src.close()


def test_file_sources_refuse_partitions(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("id,d\n1,2024-03-30\n", encoding="utf-8")
    text = f"""
sources:
  - name: files
    type: file
    path: {tmp_path / "data" / "*.csv"}
    format: csv
destinations:
  - name: out
    type: local
    path: out
resources:
  - name: events
    source: files
    destination: out
    checkpoint_column: id
    partitions:
      column: id
      ranges: 2
"""
    with pytest.raises(SpecError) as info:
        load_spec(write_ingest(tmp_path, text))
    assert "partitions" in str(info.value) and "source 'files' reads files, which cannot be split into partitions" in str(
        info.value
    )
    # built without ingest.yml, the run stops at the source
    res = load_spec(write_ingest(tmp_path, text.replace("    partitions:\n      column: id\n      ranges: 2\n", ""))).resource(
        "events"
    )
    res = dataclasses.replace(res, partitions=PartitionsSpec(KeyRanges("id", 2)))
    store = MemoryCheckpointStore()  # with the plan the partition comes from (a run checks it under its lock)
    store.save_plan("events", RangePlan("events", "id", 2, (5,), plan_fingerprint(res), "", "", 1).to_json())
    with pytest.raises(SourceError, match="cannot be split into partitions"):
        list(run_pipeline(res, store, partition=Partition("events", "r00", "id", None, 5)))


# --- scan_column: one pass, no sort ---------------------------------------------------------------------------------


def test_scan_column_sorts_nothing_sqlite_and_sqlalchemy(db: Db) -> None:
    if not db.kind.startswith("sqla-") and db.kind != "sqlite":
        pytest.skip("statements captured by sqlite3's trace callback and SQLAlchemy's events")
    db.load(make_rows())
    src: Any = db.open()
    statements: list[str] = []
    try:
        if db.kind == "sqlite":
            src.conn.set_trace_callback(statements.append)
        else:
            import sqlalchemy as sa

            sa.event.listen(src.engine, "before_cursor_execute", lambda conn, cur, sql, *a: statements.append(sql))
        values = pa.concat_arrays(list(src.scan_column("SELECT * FROM events", "id")))
        assert sorted(values.to_pylist()) == list(range(1, N + 1))
    finally:
        src.close()
    assert statements and not [s for s in statements if "ORDER BY" in s.upper()], statements


def _running(sql_like: str, engine: str, database: str | None) -> list[str]:
    if engine == "postgresql":
        import psycopg2

        conn = psycopg2.connect(PG_DSN)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT query FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (sql_like,))
                return [r[0] for r in cur.fetchall()]
        finally:
            conn.close()
    conn = mysql_connect(None)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT INFO FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND ID <> CONNECTION_ID()", (sql_like,)
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_scan_column_streams_without_a_sort_and_plans_even_ranges(kind: str, tmp_path, request) -> None:
    """Many rows: the scan's statement, seen running on the server (its last branch sleeps two seconds, so it is
    there to be seen), has no ORDER BY; the plan's 8 ranges hold equal counts."""
    d = Db(kind, tmp_path, request)
    marker = f"conduit_scan_{uuid.uuid4().hex[:8]}"
    # PyMySQL reads about 50,000 rows a second on a busy 2-core machine: fewer rows there
    n = 1_000_000 if kind == "postgresql" else 200_000
    if kind == "postgresql":
        d.execute(f"CREATE TABLE big AS SELECT (i * 7919) % 1000003 AS k, i AS id FROM generate_series(1::bigint, {n}) i")
        sleepy = f"SELECT k, id FROM big WHERE '{marker}' <> '' UNION ALL SELECT 0::bigint, 0::bigint FROM pg_sleep(2)"
    else:
        d.execute(
            "CREATE TABLE big (k BIGINT, id BIGINT)",
            f"INSERT INTO big SELECT (seq * 7919) % 1000003, seq FROM seq_1_to_{n}",
        )
        sleepy = f"SELECT k, id FROM big WHERE '{marker}' <> '' UNION ALL SELECT 0, SLEEP(2)"
    query = "SELECT k, id FROM big"
    src = d.open()
    scanned: list[int] = []
    try:
        scan = threading.Thread(target=lambda: scanned.extend(len(a) for a in src.scan_column(sleepy, "k")))
        scan.start()
        running: list[str] = []
        while not running and scan.is_alive():
            running = _running(f"%{marker}%", d.engine, getattr(d, "database", None))
            time.sleep(0.05)
        scan.join()
        assert running, "the scan's statement was not seen running"
        assert all("ORDER BY" not in s.upper() for s in running), running
        assert sum(scanned) == n + 1
    finally:
        src.close()
    src = d.open()
    try:
        res = ResourceSpec(
            name="big",
            source=d.spec(),
            destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
            query=query,
            batch_size=1000,
            resume=True,
            checkpoint_column="id",
            partitions=PartitionsSpec(KeyRanges("k", 8)),
        )
        plan = compute_plan(res, src)
        assert plan.rows_seen == n
        counts = []
        for key in range_keys(8):
            one = d.open()
            try:
                one.restrict(plan.partition(key))
                counts.append(one.count(query))
            finally:
                one.close()
        assert sum(counts) == n
        assert all(abs(c - n / 8) < n / 8 * 0.05 for c in counts), counts
    finally:
        src.close()


# --- through the engine -------------------------------------------------------------------------------------------


def test_partitions_of_a_postgresql_pipeline_through_run_pipeline(pg_schema, tmp_path, request) -> None:
    """Three day windows on a zoned timestamp, each a run of its own into local Parquet (two at the same time): each
    partition's output holds exactly its rows, the union every row once."""
    d = Db("postgresql", tmp_path, request)
    rows = make_rows()
    d.load(rows)
    tw = windows("tz")
    res = ResourceSpec(
        name="events",
        source=d.spec(),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query="SELECT id, tz FROM events",
        batch_size=37,
        resume=True,
        checkpoint_column="id",
        partitions=PartitionsSpec(tw),
    )
    store = MemoryCheckpointStore()
    parts = window_partitions("tz")
    errors: list[BaseException] = []

    def run(p: Partition) -> None:
        try:
            events = list(run_pipeline(res, store, run_id=p.key, partition=p))
            assert isinstance(events[-1], RunFinished)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in parts[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run(parts[2])
    assert not errors, errors
    union: Counter[int] = Counter()
    for p in parts:
        got = [r[0] for r in output_rows(tmp_path / "out" / "events" / p.key)]
        assert Counter(got) == Counter(expected_ids(rows, p)), p.describe()
        union.update(got)
    assert sorted(union.elements()) == sorted(r["id"] for r in rows)


# --- column types: the whole query's, never one partition's ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "sqla-sqlite", "sqla-duckdb"])
def test_every_partition_types_its_columns_from_the_whole_query(kind: str, tmp_path, request) -> None:
    """A column holding integers in one partition and reals in the other (SQLite keeps 5 and 5.5 each in its own
    type), one NULL throughout the first partition, and one NULL everywhere: both partitions' batches have one schema
    (the one an unpartitioned read of the whole query gets), and every value reads back exactly."""
    d = Db(kind, tmp_path, request)
    price_type = "DOUBLE" if d.engine == "duckdb" else "NUMERIC"  # DuckDB's columns have one type: the NULLs only
    d.execute(f"CREATE TABLE src (id BIGINT, price {price_type}, note BIGINT, empty TEXT)")
    rows = [(i, i if i <= 50 else i + 0.5, None if i <= 50 else i * 10, None) for i in range(1, 101)]
    d.execute(*(f"INSERT INTO src VALUES ({i}, {p}, {'NULL' if n is None else n}, NULL)" for i, p, n, _ in rows))
    query = "SELECT id, price, note, empty FROM src"
    whole = d.open()
    try:
        want_schema = pa.Table.from_batches([c.data for c in whole.read(query, "id", None, resume=False, fetch_size=1000)]).schema
    finally:
        whole.close()
    assert want_schema.field("price").type == pa.float64() and want_schema.field("note").type == pa.int64()
    got: dict[int, tuple[Any, ...]] = {}
    for p in (Partition("p", "r00", "id", None, 51, None), Partition("p", "r01", "id", 51, None, None)):
        src = d.open()
        try:
            src.restrict(p)
            batches = [c.data for c in src.read(query, "id", None, resume=False, fetch_size=1000)]
        finally:
            src.close()
        assert batches and all(b.schema == want_schema for b in batches), (p.key, [b.schema for b in batches])
        for r in pa.Table.from_batches(batches).to_pylist():
            got[r["id"]] = (r["id"], r["price"], r["note"], r["empty"])
    assert got == {r[0]: r for r in rows}
    for i in (1, 51):
        assert type(got[i][1]) is float


@pytest.mark.parametrize("kind", ["sqlite", "sqla-sqlite"])
def test_a_value_that_does_not_fit_the_whole_querys_type_is_refused_in_its_partition(kind: str, tmp_path, request) -> None:
    """The whole query's first rows type the column INTEGER; the partition holding a real past them is refused with
    the fix (as an unpartitioned read is), never cut to an integer nor written under a type of its own."""
    d = Db(kind, tmp_path, request)
    d.execute("CREATE TABLE src (id INTEGER, price NUMERIC)", *(f"INSERT INTO src VALUES ({i}, {i})" for i in range(1, 21)))
    d.execute("INSERT INTO src VALUES (21, 21.5)")
    src = d.open()
    try:
        src.restrict(Partition("p", "r01", "id", 11, None, None))
        with pytest.raises(SourceError, match="CAST it to one type in the query") as info:
            list(src.read("SELECT id, price FROM src", "id", None, resume=False, fetch_size=5))
        assert "'price'" in str(info.value) and "21.5" in str(info.value)
    finally:
        src.close()
    whole = d.open()  # unpartitioned: the same refusal
    try:
        with pytest.raises(SourceError, match="CAST it to one type in the query"):
            list(whole.read("SELECT id, price FROM src", "id", None, resume=False, fetch_size=5))
    finally:
        whole.close()


def test_a_long_unconstrained_decimal_is_cut_to_38_places_for_planning() -> None:
    """A numeric of no declared scale with more than 38 decimal places and more than 28 significant digits (past the
    default decimal context) is cut (floor) to 38 places, not a raw InvalidOperation; one with more than 38 integer
    digits is refused with the fix."""
    from conduit_dagster.engine.sources.base import decimal_scan_array

    long = Decimal("123456789012345678901234567890." + "9" * 45)
    got = decimal_scan_array([long, Decimal("-0." + "0" * 45 + "1"), Decimal(7)], "db", "amt").to_pylist()
    assert got == [Decimal("123456789012345678901234567890." + "9" * 38), Decimal("-1E-38"), Decimal(7)]
    with pytest.raises(SourceError, match="more than 38 digits before the point"):
        decimal_scan_array([Decimal("1" * 60 + "." + "1" * 45)], "db", "amt")
