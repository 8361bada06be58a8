"""The MySQL / MariaDB destination with partitions, against the real server: partitions of one pipeline load and
publish at the same time; a publish replaces exactly its window (boundary rows included, DATE, DATETIME and TIMESTAMP
columns, key ranges) in one transaction; an empty partition empties its window; a crash before or after the publish
resumes exactly; append and merge keep their bookkeeping per partition."""

import dataclasses
import datetime as dt
import decimal
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.destinations.mysql import (
    BACKEND,
    MySQLDestinationSpec,
    lock_name,
    partition_lock_name,
    staging_name,
)
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.partitions import (
    KeyRanges,
    Partition,
    PartitionsSpec,
    TimeWindows,
    range_keys,
    resolve_partition,
    time_window,
)
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.sources.mysql import MySQLSourceSpec
from conduit_dagster.engine.sources.sqlite import SqliteSourceSpec
from conduit_dagster.engine.spec import PostgresSourceSpec, ResourceSpec, Secret
from conduit_dagster_tests.conftest import MYSQL, mysql_connect
from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

BERLIN = "Europe/Berlin"
UTC = dt.UTC
COMMENT = "COMMENT 'conduit-dagster pipeline things'"  # a table replace may write into (conduit's)


def dest(db: str, mode: str = "replace", *, table: str = "things", keys: tuple[str, ...] = ("id",)) -> MySQLDestinationSpec:
    password = str(MYSQL["password"])
    return MySQLDestinationSpec(
        name="wh",
        host=str(MYSQL["host"]),
        port=int(MYSQL["port"]),  # type: ignore[call-overload]
        database=db,
        user=str(MYSQL["user"]),
        password=Secret(password) if password else None,
        table=table,
        mode=mode,
        primary_key=keys if mode == "merge" else (),
    )


def window(key: str, *, every: str = "day", column: str = "ts", zone: str = BERLIN) -> Partition:
    """The partition ``key`` of a time-windowed pipeline, as partitions.py computes it."""
    tw = TimeWindows(column, every, dt.datetime(2020, 1, 1, tzinfo=ZoneInfo(zone)), None, zone)
    lo, hi = time_window(tw, key)
    return Partition("things", key, column, lo, hi, zone)


def key_range(key: str, lo: Any, hi: Any, column: str = "id") -> Partition:
    return Partition("things", key, column, lo, hi)


def rows_of(db: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def execute(db: str, *statements: str) -> None:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def tables_of(db: str) -> list[str]:
    return sorted(r[0] for r in rows_of(db, "SHOW TABLES"))


def batches(rows: list[dict[str, Any]], schema: pa.Schema, size: int) -> list[pa.Table]:
    return [pa.Table.from_pylist(rows[i : i + size], schema) for i in range(0, len(rows), size)]


def publish(
    spec: MySQLDestinationSpec, partition: Partition, rows: list[dict[str, Any]], schema: pa.Schema, *, size: int = 3
) -> int | None:
    """One whole run of a partition, driven as the runner drives the destination; returns its count()."""
    d = open_destination(spec, "things", partition=partition)
    try:
        d.start(None)
        parts = batches(rows, schema, size)
        for i, t in enumerate(parts):
            d.write(i, t, "id", t.column("id")[-1].as_py(), batch_state={})  # type: ignore[call-arg]
        d.publish(len(parts))
        return d.count()
    finally:
        d.close()


NAIVE = pa.schema([("id", pa.int64()), ("ts", pa.timestamp("us")), ("note", pa.string())])


def naive_day_rows(day: dt.date, first_id: int, note: str = "") -> list[dict[str, Any]]:
    """Rows of one Berlin day as wall-clock times: at its first and last microsecond, and between."""
    start = dt.datetime.combine(day, dt.time())
    stamps = [
        start,
        start + dt.timedelta(hours=2, minutes=30),
        start + dt.timedelta(hours=12),
        start + dt.timedelta(days=1, microseconds=-1),
    ]
    return [{"id": first_id + i, "ts": ts, "note": f"{note}{first_id + i}"} for i, ts in enumerate(stamps)]


def as_tuples(rows: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r.values()) for r in rows)


def content(db: str, columns: str = "id, ts, note") -> Counter[tuple[Any, ...]]:
    return Counter(rows_of(db, f"SELECT {columns} FROM things"))


# --- replace: partitions at the same time, each replacing exactly its window --------------------------------------


def test_partitions_load_at_the_same_time_and_a_republish_replaces_exactly_its_window(mysql_db):
    """Two day windows of Berlin (the second has the DST change: 23 hours) load batch by batch side by side, each
    holding its partition's lock, and publish at once from two threads. Republishing the first with changed rows
    changes exactly its window: the other day's rows, its boundary rows too, stay as they were."""
    spec = dest(mysql_db)
    a, b = window("2024-03-30"), window("2024-03-31")
    rows_a = naive_day_rows(dt.date(2024, 3, 30), 100, "a")
    rows_b = naive_day_rows(dt.date(2024, 3, 31), 200, "b")
    both = [open_destination(spec, "things", partition=p) for p in (a, b)]
    try:
        for d in both:
            d.start(None)
        # batches of the two partitions interleave: neither waits for the other
        for i, (ta, tb) in enumerate(zip(batches(rows_a, NAIVE, 2), batches(rows_b, NAIVE, 2), strict=True)):
            both[0].write(i, ta, "id", ta.column("id")[-1].as_py(), batch_state={})
            both[1].write(i, tb, "id", tb.column("id")[-1].as_py(), batch_state={})
        units = Counter(r[0] for r in rows_of(mysql_db, "SELECT pipeline FROM _conduit_batches"))
        assert units == {"things.2024-03-30": 2, "things.2024-03-31": 2}, "batch records are per partition"
        stagings = [t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]
        assert len(stagings) == 2, "a staging table per partition"
        errors: list[BaseException] = []

        def go(d: Any) -> None:
            try:
                d.publish(2)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(d,)) for d in both]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [d.count() for d in both] == [4, 4]
    finally:
        for d in both:
            d.close()
    assert content(mysql_db) == as_tuples(rows_a + rows_b)

    changed = [
        {**rows_a[0], "note": "changed"},  # 00:00:00 exactly, the window's first instant
        rows_a[2],
        {"id": 150, "ts": dt.datetime(2024, 3, 30, 23, 0), "note": "new"},
    ]  # rows_a[1] and rows_a[3] (23:59:59.999999) are gone from the source
    assert publish(spec, a, changed, NAIVE) == 3
    assert content(mysql_db) == as_tuples(changed + rows_b)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"], "no staging table left"
    assert rows_of(mysql_db, "SELECT pipeline, batch_index, `rows` FROM _conduit_batches ORDER BY pipeline") == [
        ("things.2024-03-30", -1, 3),
        ("things.2024-03-31", -1, 4),
    ], "only each partition's publish record"


@pytest.mark.parametrize(
    "column_sql, schema_type, as_instants",
    [
        ("TIMESTAMP(6) NULL", pa.timestamp("us", tz="UTC"), True),  # a user's TIMESTAMP: compared as instants
        (None, pa.timestamp("us", tz="UTC"), True),  # conduit's DATETIME(6) COMMENT 'UTC' from zoned values: instants
        ("DATETIME(6)", pa.timestamp("us"), False),  # wall-clock times of the window's zone
        (None, pa.timestamp("us"), False),  # conduit's DATETIME(6) from values without a zone: wall clock too
    ],
)
def test_a_time_window_selects_the_same_rows_in_each_kind_of_timestamp_column(mysql_db, column_sql, schema_type, as_instants):
    """The Berlin day 2024-03-10 is [09 23:00Z, 10 23:00Z) as instants and [10 00:00, 11 00:00) as wall-clock times.
    Rows a microsecond either side of each edge belong to the neighbours, which a republish never touches."""
    schema = pa.schema([("id", pa.int64()), ("ts", schema_type), ("note", pa.string())])
    if column_sql is not None:
        execute(mysql_db, f"CREATE TABLE things (id BIGINT, ts {column_sql}, note LONGTEXT) {COMMENT}")
    day = window("2024-03-10")
    us = dt.timedelta(microseconds=1)
    if as_instants:
        lo, hi = dt.datetime(2024, 3, 9, 23, tzinfo=UTC), dt.datetime(2024, 3, 10, 23, tzinfo=UTC)
    else:
        lo, hi = dt.datetime(2024, 3, 10), dt.datetime(2024, 3, 11)
    before = [{"id": 1, "ts": lo - us, "note": "day before"}]
    inside = [{"id": 2, "ts": lo, "note": "first"}, {"id": 3, "ts": hi - us, "note": "last"}]
    after = [{"id": 4, "ts": hi, "note": "day after"}]
    assert publish(dest(mysql_db), window("2024-03-09"), before, schema) == 1
    assert publish(dest(mysql_db), window("2024-03-11"), after, schema) == 1
    assert publish(dest(mysql_db), day, inside, schema) == 2
    assert sorted(r[0] for r in rows_of(mysql_db, "SELECT id FROM things")) == [1, 2, 3, 4]
    again = [{"id": 5, "ts": lo + us, "note": "again"}]
    assert publish(dest(mysql_db), day, again, schema) == 1
    assert sorted(r[0] for r in rows_of(mysql_db, "SELECT id FROM things")) == [1, 4, 5], "exactly the window was replaced"
    (created,) = rows_of(mysql_db, "SHOW CREATE TABLE things")
    if column_sql is None:
        assert ("COMMENT 'UTC'" in created[1]) == as_instants
    else:
        assert column_sql.split("(")[0].lower() in created[1].lower()


def test_a_date_column_is_compared_with_the_window_as_dates(mysql_db):
    """Month windows of Berlin on a DATE column: the first and last day of each month, and only those of the month
    republished, change."""
    schema = pa.schema([("id", pa.int64()), ("ts", pa.date32()), ("note", pa.string())])
    jan, feb, mar = (window(k, every="month") for k in ("2024-01-01", "2024-02-01", "2024-03-01"))
    edge = {
        "2024-01-01": [dt.date(2024, 1, 1), dt.date(2024, 1, 31)],
        "2024-02-01": [dt.date(2024, 2, 1), dt.date(2024, 2, 29)],
        "2024-03-01": [dt.date(2024, 3, 1), dt.date(2024, 3, 31)],
    }
    ids = iter(range(1, 100))
    loaded = {k: [{"id": next(ids), "ts": d, "note": k} for d in days] for k, days in edge.items()}
    for p in (jan, feb, mar):
        assert publish(dest(mysql_db), p, loaded[p.key], schema) == 2
    assert "`ts` date" in rows_of(mysql_db, "SHOW CREATE TABLE things")[0][1]
    new_feb = [{"id": 50, "ts": dt.date(2024, 2, 15), "note": "mid february"}]
    assert publish(dest(mysql_db), feb, new_feb, schema) == 1
    assert content(mysql_db) == as_tuples(loaded["2024-01-01"] + new_feb + loaded["2024-03-01"])


def test_key_ranges_replace_exactly_their_range_open_at_both_ends(mysql_db):
    """Ranges (-inf, 100), [100, 200), [200, +inf) on an integer key: 99, 100, 199 and 200 each belong to one range;
    republishing the middle range leaves the rows of the others, and the rows far past the last boundary stay in the
    last range."""
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    r0, r1, r2 = key_range("r0", None, 100), key_range("r1", 100, 200), key_range("r2", 200, None)
    first = {
        "r0": [{"id": -(10**15), "note": "far below"}, {"id": 99, "note": "99"}],
        "r1": [{"id": 100, "note": "100"}, {"id": 150, "note": "150"}, {"id": 199, "note": "199"}],
        "r2": [{"id": 200, "note": "200"}, {"id": 10**15, "note": "far above"}],
    }
    for p in (r0, r1, r2):
        assert publish(dest(mysql_db), p, first[p.key], schema) == len(first[p.key])
    again = [{"id": 100, "note": "100 again"}, {"id": 120, "note": "120"}]
    assert publish(dest(mysql_db), r1, again, schema) == 2
    assert content(mysql_db, "id, note") == as_tuples(first["r0"] + again + first["r2"])
    assert publish(dest(mysql_db), r2, [{"id": 300, "note": "300"}], schema) == 1
    assert content(mysql_db, "id, note") == as_tuples(first["r0"] + again + [{"id": 300, "note": "300"}])


def test_decimal_and_date_key_ranges(mysql_db):
    schema = pa.schema([("id", pa.decimal128(20, 4)), ("day", pa.date32())])
    d = decimal.Decimal
    low, high = key_range("r0", None, d("1.5000")), key_range("r1", d("1.5000"), None)
    assert publish(dest(mysql_db), low, [{"id": d("1.4999"), "day": dt.date(2024, 1, 1)}], schema) == 1
    assert publish(dest(mysql_db), high, [{"id": d("1.5000"), "day": dt.date(2024, 1, 2)}], schema) == 1
    assert publish(dest(mysql_db), low, [{"id": d("-7.0001"), "day": dt.date(2024, 1, 3)}], schema) == 1
    assert sorted(rows_of(mysql_db, "SELECT id FROM things")) == [(d("-7.0001"),), (d("1.5000"),)]
    by_day = Partition("things", "r1", "day", dt.date(2024, 1, 2), None)
    spec = dest(mysql_db, table="days")
    assert publish(spec, by_day, [{"id": d("1"), "day": dt.date(2024, 1, 2)}], schema) == 1
    assert publish(spec, Partition("things", "r0", "day", None, dt.date(2024, 1, 2)), [], schema) == 0
    assert rows_of(mysql_db, "SELECT day FROM days") == [(dt.date(2024, 1, 2),)]


# --- empty partitions ----------------------------------------------------------------------------------------------


def test_an_empty_partition_empties_its_window_and_counts_zero(mysql_db):
    spec = dest(mysql_db)
    a, b = window("2024-03-30"), window("2024-03-31")
    # no table yet, no rows: nothing to delete, a count of 0, no table made without columns
    assert publish(spec, a, [], NAIVE) == 0
    assert tables_of(mysql_db) == ["_conduit_batches"]
    rows_a, rows_b = naive_day_rows(dt.date(2024, 3, 30), 1), naive_day_rows(dt.date(2024, 3, 31), 10)
    assert publish(spec, a, rows_a, NAIVE) == 4
    assert publish(spec, b, rows_b, NAIVE) == 4
    assert publish(spec, a, [], NAIVE) == 0
    assert content(mysql_db) == as_tuples(rows_b)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]
    assert rows_of(mysql_db, "SELECT pipeline, `rows` FROM _conduit_batches WHERE pipeline = 'things.2024-03-30'") == [
        ("things.2024-03-30", 0)
    ]


# --- crashes: between write and publish, and after the publish -----------------------------------------------------


def test_a_crash_between_write_and_publish_resumes_exactly(mysql_db):
    """Batches 0 and 1 committed, batch 1's checkpoint lost, then the process died: the resume adopts batch 1 (rolled
    forward), writes the rest and publishes the window's rows exactly once; the old rows of the window go."""
    spec = dest(mysql_db)
    a, b = window("2024-03-30"), window("2024-03-31")
    old_a, rows_b = naive_day_rows(dt.date(2024, 3, 30), 1, "old"), naive_day_rows(dt.date(2024, 3, 31), 10)
    publish(spec, a, old_a, NAIVE)
    publish(spec, b, rows_b, NAIVE)
    new_a = naive_day_rows(dt.date(2024, 3, 30), 100, "new") + naive_day_rows(dt.date(2024, 3, 30), 200, "newer")
    parts = batches(sorted(new_a, key=lambda r: r["id"]), NAIVE, 3)
    d = open_destination(spec, "things", partition=a)
    try:
        state = d.start(None).state
        for i in (0, 1):
            d.write(i, parts[i], "id", parts[i].column("id")[-1].as_py(), batch_state={})
    finally:
        d.close()  # the run dies; its checkpoint says 1 batch
    assert content(mysql_db) == as_tuples(old_a + rows_b), "nothing of the run is visible before its publish"
    d = open_destination(spec, "things", partition=a)
    try:
        resumed = d.start(state, 1)
        assert [(c.index, c.rows, c.last_key) for c in resumed.committed] == [(1, 3, parts[1].column("id")[-1].as_py())]
        d.write(2, parts[2], "id", parts[2].column("id")[-1].as_py(), batch_state={})
        d.publish(3)
        assert d.count() == 8
    finally:
        d.close()
    assert content(mysql_db) == as_tuples(new_a + rows_b)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]


def test_a_crash_after_the_publish_committed_resumes_as_published(mysql_db):
    """The publish committed, then the process died before it dropped the staging table (or before the runner
    deleted the checkpoint): the resume sees the publish record, drops the staging table and publishes nothing again."""
    spec = dest(mysql_db)
    a = window("2024-03-30")
    rows = naive_day_rows(dt.date(2024, 3, 30), 1)
    d = open_destination(spec, "things", partition=a)
    try:
        state = d.start(None).state
        d.write(0, pa.Table.from_pylist(rows, NAIVE), "id", 4, batch_state={})
        d.publish(1)
    finally:
        d.close()
    staging = state["staging"]
    execute(mysql_db, f"CREATE TABLE `{staging}` LIKE things")  # as if the drop after the commit never ran
    d = open_destination(spec, "things", partition=a)
    try:
        resumed = d.start(state, 1)
        assert resumed.already_published
        assert d.count() == 4
    finally:
        d.close()
    assert content(mysql_db) == as_tuples(rows)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]
    # the next fresh run of the partition forgets the record and replaces the window again
    assert publish(spec, a, rows[:1], NAIVE) == 1
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(1,)]


def test_a_run_without_a_checkpoint_drops_its_staging_table_when_it_fails(mysql_db):
    spec = dest(mysql_db)
    d = open_destination(spec, "things", partition=window("2024-03-30"))
    try:
        d.set_resumable(False)
        d.start(None)
        d.write(0, pa.Table.from_pylist(naive_day_rows(dt.date(2024, 3, 30), 1), NAIVE), "id", 4, batch_state={})
        assert len([t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]) == 1
    finally:
        d.close()
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)], "the target made for the partition, empty"


# --- readers, locks ------------------------------------------------------------------------------------------------


def test_a_republish_is_atomic_for_readers(mysql_db):
    """A reader counting the partition's rows and the table's while its window is republished with 300 and 500 rows
    sees 300 or 500 (and the other partition's 40 beside them), never a mix, an empty window or an error."""
    spec = dest(mysql_db)
    a, b = key_range("r0", None, 10_000), key_range("r1", 10_000, None)
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    small = [{"id": i, "note": "s"} for i in range(300)]
    large = [{"id": i, "note": "l"} for i in range(500)]
    publish(spec, b, [{"id": 10_000 + i, "note": "b"} for i in range(40)], schema)
    publish(spec, a, small, schema, size=100)
    seen: Counter[Any] = Counter()
    stop = threading.Event()

    def read() -> None:
        conn = mysql_connect(mysql_db)
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    try:
                        cur.execute("SELECT SUM(id < 10000), SUM(id >= 10000) FROM things")
                        seen[tuple(int(x) for x in cur.fetchone())] += 1
                    except Exception as exc:  # noqa: BLE001 - a reader must never fail
                        seen[repr(exc)] += 1
        finally:
            conn.close()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(6):
            publish(spec, a, large if i % 2 == 0 else small, schema, size=100)
    finally:
        stop.set()
        reader.join()
    assert set(seen) <= {(300, 40), (500, 40)}, seen
    assert seen[(300, 40)] and seen[(500, 40)]


def publish_unpartitioned(spec: MySQLDestinationSpec, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """One whole run of the pipeline without partitions."""
    d = open_destination(spec, "things")
    try:
        d.start(None)
        parts = batches(rows, schema, 3)
        for i, t in enumerate(parts):
            d.write(i, t, "id", t.column("id")[-1].as_py(), batch_state={})  # type: ignore[call-arg]
        d.publish(len(parts))
    finally:
        d.close()


def test_a_partition_refuses_a_table_an_unpartitioned_replace_published(mysql_db):
    """A partition replaces only its window's rows: the unpartitioned run's others would stay for good, unseen by the
    partitions' counts. Refused at start, before a row is read, and the table is left as it was."""
    spec = dest(mysql_db)
    before = naive_day_rows(dt.date(2024, 3, 29), 1, "outside") + naive_day_rows(dt.date(2024, 3, 30), 10, "inside")
    publish_unpartitioned(spec, before, NAIVE)
    d = open_destination(spec, "things", partition=window("2024-03-30"))
    try:
        with pytest.raises(DestinationError) as refused:
            d.start(None)
    finally:
        d.close()
    text = str(refused.value)
    assert f"table {mysql_db}.things holds the output of an unpartitioned run of pipeline 'things'" in text
    assert "partition '2024-03-30' of pipeline 'things'" in text
    assert f"Drop the table (DROP TABLE `{mysql_db}`.`things`)" in text and "load the pipeline unpartitioned" in text
    assert content(mysql_db) == as_tuples(before)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]


def test_an_unpartitioned_replace_refuses_a_table_of_partitions(mysql_db):
    """The other way round: the partitions' table is not swapped away by a run without partitions."""
    spec = dest(mysql_db)
    rows_a = naive_day_rows(dt.date(2024, 3, 30), 100, "a")
    rows_b = naive_day_rows(dt.date(2024, 3, 31), 200, "b")
    publish(spec, window("2024-03-30"), rows_a, NAIVE)
    publish(spec, window("2024-03-31"), rows_b, NAIVE)
    with pytest.raises(DestinationError) as refused:
        publish_unpartitioned(spec, naive_day_rows(dt.date(2025, 1, 1), 900, "z"), NAIVE)
    text = str(refused.value)
    assert f"table {mysql_db}.things holds the partitions of pipeline 'things'" in text
    assert f"Drop the table (DROP TABLE `{mysql_db}`.`things`) and load it unpartitioned" in text
    assert content(mysql_db) == as_tuples(rows_a + rows_b)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]
    # a partition's run keeps loading it
    assert publish(spec, window("2024-03-31"), rows_b[:2], NAIVE) == 2
    assert content(mysql_db) == as_tuples(rows_a + rows_b[:2])


def test_a_partition_run_is_refused_while_another_run_holds_that_partition(mysql_db):
    spec = dest(mysql_db)
    a = window("2024-03-30")
    first = open_destination(spec, "things", partition=a)
    try:
        first.start(None)
        with pytest.raises(
            DestinationError, match=r"partition '2024-03-30' of table .*things is being written by another run"
        ) as info:
            second = open_destination(spec, "things", partition=a)
            try:
                second.start(None)
            finally:
                second.close()
        assert partition_lock_name(mysql_db, "things", "2024-03-30") in str(info.value)
        # another partition of the same table is not held up
        assert publish(spec, window("2024-03-31"), naive_day_rows(dt.date(2024, 3, 31), 1), NAIVE) == 4
    finally:
        first.close()


def test_a_publish_waits_for_the_table_lock_instead_of_failing(mysql_db):
    """Another session holds the table's lock (another partition publishing, say) for a second: the publish waits
    for it, then replaces the window."""
    spec = dest(mysql_db)
    a = window("2024-03-30")
    holder = mysql_connect(None)
    d = open_destination(spec, "things", partition=a)
    try:
        d.start(None)
        d.write(0, pa.Table.from_pylist(naive_day_rows(dt.date(2024, 3, 30), 1), NAIVE), "id", 4, batch_state={})
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (lock_name(mysql_db, "things"),))
            assert cur.fetchone() == (1,)
        timer = threading.Timer(1.0, holder.close)
        timer.start()
        started = dt.datetime.now()
        d.publish(1)
        assert (dt.datetime.now() - started).total_seconds() >= 0.9
        timer.join()
    finally:
        d.close()
        if holder.open:
            holder.close()
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(4,)]


# --- what a partition column can be --------------------------------------------------------------------------------


def test_a_text_partition_column_is_refused_before_a_row_is_written(mysql_db):
    """A text column compares by its collation, perhaps in another order than the source's: the delete could miss
    rows of the partition or take another's. Refused at the first batch, naming the column and the fix."""
    schema = pa.schema([("id", pa.int64()), ("code", pa.string())])
    p = Partition("things", "r1", "code", "a", "m")
    with pytest.raises(DestinationError, match=r"partition column 'code' is longtext.*Partition on a number, date or timestamp"):
        publish(dest(mysql_db), p, [{"id": 1, "code": "b"}], schema)
    assert not [t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]
    with pytest.raises(DestinationError, match=r"partition column 'code' is longtext"):  # at start, the table existing
        open_destination(dest(mysql_db), "things", partition=p).start(None)


def test_a_time_window_on_a_column_that_is_no_date_is_refused(mysql_db):
    schema = pa.schema([("id", pa.int64()), ("ts", pa.int64())])
    with pytest.raises(DestinationError, match=r"partition column 'ts' is bigint\(20\), and time windows need a DATE"):
        publish(dest(mysql_db), window("2024-03-30"), [{"id": 1, "ts": 5}], schema)


def test_the_partition_column_missing_from_the_table_is_refused(mysql_db):
    execute(mysql_db, f"CREATE TABLE things (id BIGINT, note LONGTEXT) {COMMENT}")
    with pytest.raises(DestinationError, match=r"has no column 'ts', which the pipeline is partitioned on"):
        publish(dest(mysql_db), window("2024-03-30"), [], NAIVE)


def test_an_auto_increment_column_the_rows_do_not_carry_is_numbered_by_the_target(mysql_db):
    execute(
        mysql_db, f"CREATE TABLE things (rid BIGINT AUTO_INCREMENT PRIMARY KEY, id BIGINT, ts DATETIME(6), note TEXT) {COMMENT}"
    )
    spec = dest(mysql_db)
    publish(spec, window("2024-03-30"), naive_day_rows(dt.date(2024, 3, 30), 1), NAIVE)
    publish(spec, window("2024-03-31"), naive_day_rows(dt.date(2024, 3, 31), 10), NAIVE)
    rids = [r[0] for r in rows_of(mysql_db, "SELECT rid FROM things")]
    assert len(rids) == len(set(rids)) == 8


def test_a_target_column_changed_since_the_staging_table_was_made_is_refused(mysql_db):
    spec = dest(mysql_db)
    a = window("2024-03-30")
    publish(spec, window("2024-03-31"), naive_day_rows(dt.date(2024, 3, 31), 10), NAIVE)
    d = open_destination(spec, "things", partition=a)
    try:
        d.start(None)
        d.write(0, pa.Table.from_pylist(naive_day_rows(dt.date(2024, 3, 30), 1), NAIVE), "id", 4, batch_state={})
        execute(mysql_db, "ALTER TABLE things MODIFY ts DATETIME(0)")  # would round the microseconds silently
        with pytest.raises(DestinationError, match=r"column 'ts' of table .*things is now datetime, but was datetime\(6\)"):
            d.publish(1)
    finally:
        d.close()
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(4,)], "nothing was published"


# --- append and merge ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_append_and_merge_partitions_write_at_the_same_time_with_their_own_records(mysql_db, mode):
    """Four key ranges write one table from four threads at once (merge upserts on id); each partition's batch
    records carry its unit, a crash of one is rolled forward from its own records, and count() is its rows."""
    spec = dest(mysql_db, mode)
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    ranges = [key_range(f"r{i}", None if i == 0 else i * 1000, None if i == 3 else (i + 1) * 1000) for i in range(4)]
    rows = {p.key: [{"id": i * 1000 + j, "note": f"{p.key}-{j}"} for j in range(0, 1000, 7)] for i, p in enumerate(ranges)}
    errors: list[BaseException] = []
    counts: dict[str, int | None] = {}

    def go(p: Partition) -> None:
        try:
            counts[p.key] = publish(spec, p, rows[p.key], schema, size=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(p,)) for p in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert counts == {p.key: len(rows[p.key]) for p in ranges}
    want = as_tuples([r for p in ranges for r in rows[p.key]])
    assert content(mysql_db, "id, note") == want
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]

    # a crash of r1 after 2 batches, its checkpoint at 1: the resume adopts batch 1 of r1's own records
    p = ranges[1]
    more = [{"id": 1000 + j, "note": f"again-{j}"} for j in range(1, 1000, 7)]
    parts = batches(more, schema, 20)
    d = open_destination(spec, "things", partition=p)
    try:
        state = d.start(None).state
        for i in (0, 1):
            d.write(i, parts[i], "id", parts[i].column("id")[-1].as_py(), batch_state={})
    finally:
        d.close()
    assert rows_of(mysql_db, "SELECT DISTINCT pipeline FROM _conduit_batches") == [("things.r1",)]
    d = open_destination(spec, "things", partition=p)
    try:
        resumed = d.start(state, 1)
        assert [c.index for c in resumed.committed] == [1]
        for i in range(2, len(parts)):
            d.write(i, parts[i], "id", parts[i].column("id")[-1].as_py(), batch_state={})
        d.publish(len(parts))
        assert d.count() == len(rows["r1"]) + len(more)
    finally:
        d.close()
    assert content(mysql_db, "id, note") == want + as_tuples(more)
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]


def test_merge_partitions_upsert_their_rows(mysql_db):
    spec = dest(mysql_db, "merge")
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    low, high = key_range("r0", None, 10), key_range("r1", 10, None)
    publish(spec, low, [{"id": i, "note": "v1"} for i in range(10)], schema)
    publish(spec, high, [{"id": i, "note": "v1"} for i in range(10, 20)], schema)
    publish(spec, low, [{"id": 3, "note": "v2"}], schema)
    assert dict(rows_of(mysql_db, "SELECT id, note FROM things")) == {i: "v2" if i == 3 else "v1" for i in range(20)}


# --- names ---------------------------------------------------------------------------------------------------------


def test_staging_and_lock_names_are_the_partitions_own_and_fit_mysql(mysql_db):
    units = [f"{'p' * 200}.{k}" for k in ("2024-01-01-13:00", "2024-01-01-14:00", "r000", "r001")]
    names = {staging_name(u, "d" * 64, "t" * 64, uuid.uuid4().hex) for u in units}
    assert len(names) == 4 and all(len(n) <= 64 for n in names)
    locks = {partition_lock_name("d" * 64, "t" * 64, k) for k in ("a", "b", "2024-01-01-13:00")}
    assert len(locks) == 3 and all(len(n) == 64 for n in locks)
    assert lock_name("d", "t") not in locks | {partition_lock_name("d", "t", "a")}


def test_clearing_a_partitions_checkpoint_names_its_staging_table(mysql_db):
    spec = dest(mysql_db)
    a = window("2024-03-30")
    d = open_destination(spec, "things", partition=a)
    try:
        state = d.start(None).state
        d.write(0, pa.Table.from_pylist(naive_day_rows(dt.date(2024, 3, 30), 1), NAIVE), "id", 4, batch_state={})
    finally:
        d.close()
    (staging,) = [t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]
    assert state["staging"] == staging
    destination_id = BACKEND.identity(spec, "things")
    lines = BACKEND.leftover(destination_id, state, a.unit)
    assert lines is not None and f"DROP TABLE IF EXISTS `{mysql_db}`.`{staging}`;" in lines
    assert "partition '2024-03-30'" in lines[0]
    execute(mysql_db, lines[-1])
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]


# --- ISO text dates (the SQLite source's), rows outside the window ------------------------------------------------

TEXT = pa.schema([("id", pa.int64()), ("ts", pa.string()), ("note", pa.string())])


def test_iso_text_dates_are_compared_byte_by_byte_in_each_written_form(mysql_db):
    """Text dates land in a binary collation; a day window takes the values of its day in each form the SQLite source
    reads ('YYYY-MM-DD', with ' ' or 'T' and a time), and an hour window its hour (a bare date is in no hour)."""
    spec = dest(mysql_db)
    before = [{"id": 1, "ts": "2024-03-09 23:59:59.999999", "note": "before"}, {"id": 2, "ts": "2024-03-09", "note": "before"}]
    inside = [
        {"id": 3, "ts": "2024-03-10", "note": "in"},
        {"id": 4, "ts": "2024-03-10 00:00", "note": "in"},
        {"id": 5, "ts": "2024-03-10T23:59:59.999", "note": "in"},
    ]
    after = [{"id": 6, "ts": "2024-03-11", "note": "after"}, {"id": 7, "ts": "2024-03-11T00:00:00", "note": "after"}]
    assert publish(spec, window("2024-03-09"), before, TEXT) == 2
    assert publish(spec, window("2024-03-11"), after, TEXT) == 2
    assert publish(spec, window("2024-03-10"), inside, TEXT) == 3
    assert publish(spec, window("2024-03-10"), inside[1:], TEXT) == 2
    assert sorted(r[0] for r in rows_of(mysql_db, "SELECT id FROM things")) == [1, 2, 4, 5, 6, 7]
    assert "utf8mb4_nopad_bin" in rows_of(mysql_db, "SHOW CREATE TABLE things")[0][1]

    hourly = dest(mysql_db, table="hourly")
    h13, h14 = window("2024-03-10-13:00", every="hour"), window("2024-03-10-14:00", every="hour")
    assert (
        publish(
            hourly,
            h13,
            [{"id": 1, "ts": "2024-03-10 13:00:00", "note": ""}, {"id": 2, "ts": "2024-03-10T13:59", "note": ""}],
            TEXT,
        )
        == 2
    )
    assert publish(hourly, h14, [{"id": 3, "ts": "2024-03-10 14:00", "note": ""}], TEXT) == 1
    assert publish(hourly, h13, [], TEXT) == 0
    assert rows_of(mysql_db, "SELECT id FROM hourly") == [(3,)]


def test_rows_outside_the_window_as_the_table_compares_them_are_refused(mysql_db):
    """A row the table does not see in the window would stay when the partition is replaced next (and count in
    another partition): nothing is published, and the message names the rows and the fix."""
    spec = dest(mysql_db)
    day = window("2024-03-30")
    rows = naive_day_rows(dt.date(2024, 3, 30), 1)
    assert publish(spec, day, rows, NAIVE) == 4
    stray = [
        {"id": 9, "ts": dt.datetime(2024, 3, 30, 12), "note": "in"},
        {"id": 10, "ts": dt.datetime(2024, 3, 31), "note": "next"},
    ]
    with pytest.raises(DestinationError, match=r"1 row\(s\) loaded for partition '2024-03-30'.*outside its window.*2024, 3, 31"):
        publish(spec, day, stray, NAIVE)
    assert content(mysql_db) == as_tuples(rows), "nothing was published"
    with pytest.raises(DestinationError, match=r"row\(s\) loaded .* \(e\.g\. NULL\)"):
        publish(spec, day, [{"id": 11, "ts": None, "note": "null"}], NAIVE)
    assert content(mysql_db) == as_tuples(rows)


def test_an_hour_window_cannot_split_a_date_column(mysql_db):
    execute(mysql_db, f"CREATE TABLE things (id BIGINT, ts DATE) {COMMENT}")
    schema = pa.schema([("id", pa.int64()), ("ts", pa.date32())])
    with pytest.raises(DestinationError, match=r"not at midnight, and the DATE column 'ts' cannot be split there"):
        publish(dest(mysql_db), window("2024-03-10-13:00", every="hour"), [{"id": 1, "ts": dt.date(2024, 3, 10)}], schema)


# --- end to end: sources restricted to a partition, through engine.run_pipeline ----------------------------------

DAYS = ("2024-03-30", "2024-03-31", "2024-04-01")  # 2024-03-31 has 23 hours in Berlin


def day_windows(column: str) -> TimeWindows:
    return TimeWindows(column, "day", dt.datetime(2024, 3, 30, tzinfo=ZoneInfo(BERLIN)), None, BERLIN)


def event_rows(seed: int, n: int = 90, first_id: int = 1) -> list[dict[str, Any]]:
    """Rows around the three Berlin days: every window edge, and a microsecond before it, as wall-clock time (at),
    instant (tz) and date (d); the others at random from the evening before to the morning after."""
    rng = random.Random(seed)
    edges = [dt.datetime(2024, 3, 30), dt.datetime(2024, 3, 31), dt.datetime(2024, 4, 1), dt.datetime(2024, 4, 2)]
    walls = edges + [e - dt.timedelta(microseconds=1) for e in edges]
    start, span = dt.datetime(2024, 3, 29, 20), 3 * 86400 + 10 * 3600
    walls += [start + dt.timedelta(seconds=rng.uniform(0, span)) for _ in range(n - len(walls))]
    rng.shuffle(walls)
    rows = []
    for i, wall in enumerate(walls):
        wall = wall.replace(microsecond=wall.microsecond)
        tz = wall.replace(tzinfo=ZoneInfo(BERLIN)).astimezone(UTC)
        rows.append({"id": first_id + i, "at": wall, "tz": tz, "d": wall.date(), "note": f"v{seed}-{first_id + i}"})
    return rows


def in_partition(row: dict[str, Any], p: Partition, column: str) -> bool:
    """Which rows a partition holds, computed here in Python."""
    lo, hi = p.lo, p.hi
    if column == "at":
        return lo.replace(tzinfo=None) <= row["at"] < hi.replace(tzinfo=None)
    if column == "tz":
        return lo <= row["tz"] < hi
    return lo.date() <= row["d"] < hi.date()


def pg_load(pg: Any, schema: str, rows: list[dict[str, Any]]) -> None:
    with pg.cursor() as cur:
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.events (id int PRIMARY KEY, at timestamp, tz timestamptz, d date, note text)"
        )
        cur.executemany(
            f"INSERT INTO {schema}.events VALUES (%(id)s, %(at)s, %(tz)s, %(d)s, %(note)s)",
            rows,
        )


def pg_partitioned(schema: str, db: str, column: str, *, mode: str = "replace", batch: int = 7) -> ResourceSpec:
    return ResourceSpec(
        name="events",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=schema),
        destination=dest(db, mode, table="events"),
        query="SELECT id, at, tz, d, note FROM events",
        batch_size=batch,
        resume=True,
        checkpoint_column="id",
        partitions=PartitionsSpec(day_windows(column)),
    )


def partition_of(res: ResourceSpec, key: str) -> Partition:
    assert res.partitions is not None and isinstance(res.partitions.scheme, TimeWindows)
    tw = res.partitions.scheme
    return Partition(res.name, key, tw.column, *time_window(tw, key), tw.timezone)


def run_partitions(res: ResourceSpec, store: Any, keys: list[str]) -> None:
    """Runs of the partitions, each in a thread of its own, all at once."""
    errors: list[BaseException] = []

    def go(key: str) -> None:
        try:
            events = list(run_pipeline(res, store, run_id=f"run-{key}", partition=partition_of(res, key)))
            assert isinstance(events[-1], RunFinished)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def target_rows(db: str, table: str = "events") -> Counter[tuple[Any, ...]]:
    return Counter(rows_of(db, f"SELECT id, note FROM {table}"))


def want(rows_by_key: dict[str, list[dict[str, Any]]]) -> Counter[tuple[Any, ...]]:
    return Counter((r["id"], r["note"]) for rs in rows_by_key.values() for r in rs)


def change_source(pg: Any, schema: str, rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Update, delete and insert rows across every day (edges too); returns the source's rows now."""
    rng = random.Random(seed)
    now = []
    with pg.cursor() as cur:
        for r in rows:
            fate = rng.random()
            if fate < 0.2:
                cur.execute(f"DELETE FROM {schema}.events WHERE id = %s", (r["id"],))
            elif fate < 0.5:
                cur.execute(f"UPDATE {schema}.events SET note = %s WHERE id = %s", (f"changed-{seed}", r["id"]))
                now.append({**r, "note": f"changed-{seed}"})
            else:
                now.append(r)
    new = event_rows(seed, n=30, first_id=10_000 * seed)
    pg_load(pg, schema, new)
    return now + new


@pytest.mark.parametrize("column", ["at", "tz", "d"])
def test_partitions_from_postgresql_load_at_once_and_a_republish_changes_exactly_its_window(pg, pg_schema, mysql_db, column):
    """Three Berlin days on a timestamp (wall clock), a zoned timestamp (instants) or a date, each a run of its own,
    all at the same time. The source then changes on every day; rematerializing the middle day makes exactly its
    window match the source, edges included, while the other days keep what they loaded."""
    rows = event_rows(1)
    pg_load(pg, pg_schema, rows)
    res = pg_partitioned(pg_schema, mysql_db, column)
    parts = {k: partition_of(res, k) for k in DAYS}
    store = MemoryCheckpointStore()
    run_partitions(res, store, list(DAYS))
    loaded = {k: [r for r in rows if in_partition(r, p, column)] for k, p in parts.items()}
    assert target_rows(mysql_db) == want(loaded)
    assert sum(map(len, loaded.values())) < len(rows), "some rows are in no partition (the evenings around)"
    for k, p in parts.items():
        d = open_destination(res.destination, "events", partition=p)
        try:
            assert d.count() == len(loaded[k]), k
        finally:
            d.close()

    now = change_source(pg, pg_schema, rows, 2)
    run_partitions(res, store, ["2024-03-31"])
    loaded["2024-03-31"] = [r for r in now if in_partition(r, parts["2024-03-31"], column)]
    assert target_rows(mysql_db) == want(loaded)
    assert store.docs == {}, "no checkpoint left"
    assert tables_of(mysql_db) == ["_conduit_batches", "events"]
    kinds = {"at": "datetime(6)", "tz": "datetime(6) DEFAULT NULL COMMENT 'UTC'", "d": "date"}
    assert f"`{column}` {kinds[column]}" in rows_of(mysql_db, "SHOW CREATE TABLE events")[0][1]


def test_a_partition_crashed_at_any_step_then_rerun_holds_exactly_its_rows(pg, pg_schema, mysql_db):
    """Crash one partition's run before and after every checkpoint save, batch write, publish and checkpoint delete;
    readers see the window's old rows or its new ones, never a mix, and the rerun publishes exactly the source's
    rows of the window. The other days are never touched."""
    rows = event_rows(1, n=60)
    pg_load(pg, pg_schema, rows)
    res = pg_partitioned(pg_schema, mysql_db, "at", batch=4)
    store = MemoryCheckpointStore()
    run_partitions(res, store, list(DAYS))
    key = "2024-03-31"
    p = partition_of(res, key)
    old = {k: [r for r in rows if in_partition(r, partition_of(res, k), "at")] for k in DAYS}
    now = change_source(pg, pg_schema, rows, 3)
    new = {**old, key: [r for r in now if in_partition(r, p, "at")]}
    step = 1
    while True:
        trip = Tripwire(step)
        inner = open_destination(res.destination, res.name, partition=p)
        try:
            list(
                run_pipeline(
                    res,
                    Wrapped(store, trip, {"save", "delete"}),
                    run_id=f"crash-{step}",
                    destination=Wrapped(inner, trip, {"write", "publish"}),
                    partition=p,
                )
            )
        except Crash as crash:
            inner.close()
            assert target_rows(mysql_db) in (want(old), want(new)), f"old or new window, never a mix ({crash})"
            events = list(run_pipeline(res, store, run_id=f"rerun-{step}", partition=p))
            assert isinstance(events[-1], RunFinished)
            assert target_rows(mysql_db) == want(new), f"{crash}"
            assert store.docs == {}
            step += 1
            continue
        inner.close()
        break
    assert step > 10, "every step was crashed once"
    assert not [t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches WHERE batch_index >= 0") == [(0,)]


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_append_and_merge_partitions_from_postgresql(pg, pg_schema, mysql_db, mode):
    """Append: each partition's run adds its rows once, two at the same time. Merge: a rerun of a day upserts its
    changed rows (deleted source rows stay, as merge keeps them)."""
    rows = event_rows(1)
    pg_load(pg, pg_schema, rows)
    res = pg_partitioned(pg_schema, mysql_db, "tz", mode=mode)
    if mode == "merge":
        res = dataclasses.replace(res, destination=dest(mysql_db, "merge", table="events", keys=("id",)))
    store = MemoryCheckpointStore()
    run_partitions(res, store, list(DAYS))
    parts = {k: partition_of(res, k) for k in DAYS}
    loaded = {k: [r for r in rows if in_partition(r, p, "tz")] for k, p in parts.items()}
    assert target_rows(mysql_db) == want(loaded)
    if mode == "merge":
        now = change_source(pg, pg_schema, rows, 4)
        run_partitions(res, store, ["2024-03-31"])
        fresh = {r["id"]: r for r in now if in_partition(r, parts["2024-03-31"], "tz")}
        merged = {r["id"]: r for r in loaded["2024-03-31"]} | fresh
        loaded["2024-03-31"] = list(merged.values())
        assert target_rows(mysql_db) == want(loaded)
    d = open_destination(res.destination, "events", partition=parts["2024-03-31"])
    try:
        assert d.count() == len(loaded["2024-03-31"])
    finally:
        d.close()
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]


def test_sqlite_text_dates_through_the_engine(tmp_path, mysql_db):
    """SQLite's dates are ISO text: the MySQL table holds them as text in a binary collation and a republished day
    replaces exactly the values its source read, in any of the forms it reads."""
    path = tmp_path / "src.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (id INTEGER, at TEXT, note TEXT)")
    stamps = [
        "2024-03-29 23:59:59.999999",
        "2024-03-30 00:00:00",
        "2024-03-30 12:00",
        "2024-03-30 23:59:59.999999",
        "2024-03-31 00:00:00",
        "2024-03-31 22:00:00",
        "2024-04-01 00:00",
    ]
    conn.executemany("INSERT INTO events VALUES (?, ?, ?)", [(i, s, "v1") for i, s in enumerate(stamps)])
    conn.commit()
    res = ResourceSpec(
        name="events",
        source=SqliteSourceSpec(name="lite", path=path),
        destination=dest(mysql_db, table="events"),
        query="SELECT id, at, note FROM events",
        batch_size=2,
        resume=True,
        checkpoint_column="id",
        partitions=PartitionsSpec(day_windows("at")),
    )
    store = MemoryCheckpointStore()
    run_partitions(res, store, ["2024-03-30", "2024-03-31"])
    assert sorted(r[0] for r in rows_of(mysql_db, "SELECT id FROM events")) == [1, 2, 3, 4, 5]
    conn.execute("UPDATE events SET note = 'v2'")
    conn.execute("DELETE FROM events WHERE id = 2")
    conn.execute("INSERT INTO events VALUES (9, '2024-03-30 05:00:00', 'v2')")
    conn.commit()
    conn.close()
    run_partitions(res, store, ["2024-03-30"])
    assert sorted(rows_of(mysql_db, "SELECT id, note FROM events")) == [(1, "v2"), (3, "v2"), (4, "v1"), (5, "v1"), (9, "v2")]


def test_mysql_timestamps_through_the_engine(mysql_db):
    """From a MariaDB source, day windows on a TIMESTAMP (instants) and on a DATETIME (wall clock in Berlin):
    each lands with its meaning (DATETIME(6) COMMENT 'UTC' for the instants) and a republish replaces its day."""
    execute(
        mysql_db,
        "CREATE TABLE src (id INT PRIMARY KEY, ts TIMESTAMP(6) NULL, wall DATETIME(6), note TEXT)",
    )
    berlin_midnight_utc = dt.datetime(2024, 3, 30, 23)  # 2024-03-31 00:00 Berlin (UTC+1), as UTC wall time
    rows = [
        (1, berlin_midnight_utc - dt.timedelta(microseconds=1), dt.datetime(2024, 3, 30, 23, 59, 59, 999999)),
        (2, berlin_midnight_utc, dt.datetime(2024, 3, 31)),
        (3, dt.datetime(2024, 3, 31, 21, 59, 59, 999999), dt.datetime(2024, 3, 31, 23, 59, 59, 999999)),  # 23:59:59.999999 +02
        (4, dt.datetime(2024, 3, 31, 22), dt.datetime(2024, 4, 1)),
    ]
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO src VALUES (%s, %s, %s, 'v1')", rows)
    conn.close()
    source = MySQLSourceSpec(
        name="maria",
        host=str(MYSQL["host"]),
        port=int(MYSQL["port"]),
        database=mysql_db,
        user=str(MYSQL["user"]),
        password=Secret(str(MYSQL["password"])) if MYSQL["password"] else None,
    )
    for column, table in (("ts", "by_instant"), ("wall", "by_wall")):
        res = ResourceSpec(
            name=table,
            source=source,
            destination=dest(mysql_db, table=table),
            query="SELECT id, ts, wall, note FROM src",
            batch_size=1,
            resume=True,
            checkpoint_column="id",
            partitions=PartitionsSpec(day_windows(column)),
        )
        store = MemoryCheckpointStore()
        run_partitions(res, store, ["2024-03-30", "2024-03-31", "2024-04-01"])
        assert sorted(r[0] for r in rows_of(mysql_db, f"SELECT id FROM {table}")) == [1, 2, 3, 4]
        execute(mysql_db, "UPDATE src SET note = 'v2'")
        run_partitions(res, store, ["2024-03-31"])
        assert sorted(rows_of(mysql_db, f"SELECT id, note FROM {table}")) == [(1, "v1"), (2, "v2"), (3, "v2"), (4, "v1")]
        execute(mysql_db, "UPDATE src SET note = 'v1'")
    assert "`ts` datetime(6) DEFAULT NULL COMMENT 'UTC'" in rows_of(mysql_db, "SHOW CREATE TABLE by_instant")[0][1]


def test_key_ranges_planned_from_postgresql_through_the_engine(pg, pg_schema, mysql_db):
    """Four key ranges on the id, planned once from the source and stored; all four load at once, then the source
    changes everywhere, ids far past the last boundary arrive, and rematerializing the last range (open above) and
    the first (open below) brings exactly their ranges up to date."""
    rows = event_rows(1, n=120)
    pg_load(pg, pg_schema, rows)
    res = dataclasses.replace(pg_partitioned(pg_schema, mysql_db, "at"), partitions=PartitionsSpec(KeyRanges("id", 4)))
    store = MemoryCheckpointStore()
    keys = range_keys(4)
    parts = {k: resolve_partition(res, k, store, lambda: open_source(res.source)) for k in keys}
    assert parts[keys[0]].lo is None and parts[keys[-1]].hi is None

    def member(row: dict[str, Any], p: Partition) -> bool:
        return (p.lo is None or p.lo <= row["id"]) and (p.hi is None or row["id"] < p.hi)

    def go(selected: list[str]) -> None:
        errors: list[BaseException] = []

        def one(k: str) -> None:
            try:
                assert isinstance(list(run_pipeline(res, store, run_id=k, partition=parts[k]))[-1], RunFinished)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(k,)) for k in selected]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    go(keys)
    loaded = {k: [r for r in rows if member(r, p)] for k, p in parts.items()}
    assert target_rows(mysql_db) == want(loaded) == Counter((r["id"], r["note"]) for r in rows)
    now = change_source(pg, pg_schema, rows, 5)  # new ids 50000.. are past every boundary
    go([keys[0], keys[-1]])
    for k in (keys[0], keys[-1]):
        loaded[k] = [r for r in now if member(r, parts[k])]
    assert target_rows(mysql_db) == want(loaded)
    assert any(r["id"] >= 50_000 for r in loaded[keys[-1]])


def test_a_batch_rolled_back_by_a_deadlock_with_another_writer_is_written_again(mysql_db):
    """Another transaction, heavier (so InnoDB rolls back the batch, not it), holds the gap the batch inserts into
    and then waits for the batch's record: a deadlock. The batch's transaction is rolled back whole and written
    again once the other commits: its rows land once, with one record."""
    spec = dest(mysql_db, "append")
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    below, above = key_range("r0", None, 0), key_range("r1", 0, None)
    assert publish(spec, below, [{"id": -5, "note": "below"}], schema) == 1
    assert "KEY `_conduit_partition` (`id`)" in rows_of(mysql_db, "SHOW CREATE TABLE things")[0][1]
    execute(mysql_db, "CREATE TABLE heavy (n INT)")
    other = mysql_connect(mysql_db)
    other.autocommit(False)
    holding = threading.Event()
    outcome: list[Any] = []

    def hold() -> None:
        try:
            with other.cursor() as cur:
                cur.executemany("INSERT INTO heavy VALUES (%s)", [(i,) for i in range(2000)])
                cur.execute("SELECT id FROM things WHERE id >= 0 FOR UPDATE")  # the gap above 0: inserts wait
                holding.set()
                time.sleep(1.0)  # the batch has inserted its record and waits in LOAD DATA by now
                cur.execute("SELECT * FROM _conduit_batches WHERE pipeline = 'things.r1' FOR UPDATE")
                outcome.append("waited its turn")
                time.sleep(0.5)
            other.commit()
        except Exception as exc:  # noqa: BLE001 - the test asserts which side lost
            outcome.append(exc)
            other.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    d = open_destination(spec, "things", partition=above)
    try:
        d.start(None)
        batch = pa.Table.from_pylist([{"id": i, "note": "above"} for i in range(10)], schema)
        d.write(0, batch, "id", 9, batch_state={})
        thread.join()
        assert outcome == ["waited its turn"], "the other transaction was not the one rolled back"
        d.publish(1)
        assert d.count() == 10
    finally:
        d.close()
        other.close()
    assert Counter(r[0] for r in rows_of(mysql_db, "SELECT id FROM things")) == Counter([-5, *range(10)])
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]
