"""The PostgreSQL destination's partitions against the real server: a partition's publish replaces exactly its rows
(lo <= column < hi, compared as the column's type needs), partitions of one pipeline run and publish at the same time,
a crashed partition resumes exactly, and append/merge keep each partition's batch records apart."""

import datetime as dt
import threading
from collections import Counter
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg2
import pyarrow as pa
import pytest

from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.destinations.postgresql import BACKEND, MAX_NAME, PUBLISHED, STAGING_PREFIX, staging_name
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.partitions import Partition, RangePlan, TimeWindows, time_window
from conduit_dagster.engine.spec import PostgresDestinationSpec
from conduit_dagster_tests.helpers import assert_same_rows, pg_rows

DSN = "host=127.0.0.1 dbname=test user=postgres"
UTC = dt.UTC
ZONE = "Europe/Berlin"  # windows at local midnight: 23:00 UTC in winter, 22:00 UTC in summer


def spec(schema: str, mode: str = "replace", table: str = "things") -> PostgresDestinationSpec:
    return PostgresDestinationSpec(
        name="wh",
        database="test",
        user="postgres",
        schema=schema,
        table=table,
        mode=mode,
        primary_key=("id",) if mode == "merge" else (),
    )


def day(key: str, column: str = "at", pipeline: str = "things") -> Partition:
    """A daily partition in Berlin, as the partition core resolves its key."""
    windows = TimeWindows(column, "day", dt.datetime(2024, 1, 1, tzinfo=ZoneInfo(ZONE)), None, ZONE)
    lo, hi = time_window(windows, key)
    return Partition(pipeline, key, column, lo, hi, ZONE)


def key_range(key: str, boundaries: tuple[Any, ...] = (100, 200), column: str = "id") -> Partition:
    """A key range of a plan with these boundaries: r00 open below, the last open above."""
    plan = RangePlan("things", column, len(boundaries) + 1, boundaries, "q", "s", "2024-01-01T00:00:00Z", 0)
    return plan.partition(key)


def table_of(rows: list[tuple[Any, ...]], at: pa.DataType, names: tuple[str, ...] = ("id", "at", "v")) -> pa.Table:
    types = [pa.int64(), at, pa.string()]
    return pa.table([pa.array([r[i] for r in rows], t) for i, t in enumerate(types)], names=list(names))


def batches_of(rows: list[tuple[Any, ...]], at: pa.DataType, size: int = 2) -> list[pa.Table]:
    return [table_of(rows[i : i + size], at) for i in range(0, len(rows), size)]


def write_all(d: Any, batches: list[pa.Table], start: int = 0) -> None:
    for i, t in enumerate(batches, start):
        d.write(i, t, "id", t.column("id")[-1].as_py(), batch_state={})


def load(dest_spec: PostgresDestinationSpec, partition: Partition, batches: list[pa.Table]) -> None:
    """One run of a partition, as the runner drives it: start, every batch, publish."""
    d = open_destination(dest_spec, partition.pipeline, partition=partition)
    try:
        d.start(None)
        write_all(d, batches)
        d.publish(len(batches))
    finally:
        d.close()


def count(dest_spec: PostgresDestinationSpec, partition: Partition) -> int | None:
    d = open_destination(dest_spec, partition.pipeline, partition=partition)
    try:
        return d.count()
    finally:
        d.close()


def rows(schema: str, table: str = "things") -> list[tuple[Any, ...]]:
    return pg_rows(DSN, f"SELECT id, at, v FROM {schema}.{table}")


def tables(schema: str) -> list[str]:
    return [r[0] for r in pg_rows(DSN, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1")]


def insert(pg: Any, schema: str, values: list[tuple[Any, ...]]) -> None:
    with pg.cursor() as cur:
        cur.executemany(f"INSERT INTO {schema}.things (id, at, v) VALUES (%s, %s, %s)", values)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# Per column type: rows of three daily windows in Berlin (one with the spring DST change: 23 hours), each at its
# window's edges, and rows outside them right next to their bounds.
WINDOWS: dict[str, tuple[pa.DataType, dict[str, list[Any]], list[Any]]] = {
    "date": (
        pa.date32(),
        {
            "2024-03-01": [dt.date(2024, 3, 1), dt.date(2024, 3, 1)],
            "2024-03-02": [dt.date(2024, 3, 2), dt.date(2024, 3, 2)],
            "2024-03-31": [dt.date(2024, 3, 31)],
        },
        [dt.date(2024, 2, 29), dt.date(2024, 3, 3), dt.date(2024, 3, 30), dt.date(2024, 4, 1)],
    ),
    "timestamp": (  # wall-clock times in Berlin
        pa.timestamp("us"),
        {
            "2024-03-01": [dt.datetime(2024, 3, 1), dt.datetime(2024, 3, 1, 23, 59, 59, 999999)],
            "2024-03-02": [dt.datetime(2024, 3, 2), dt.datetime(2024, 3, 2, 12)],
            "2024-03-31": [dt.datetime(2024, 3, 31), dt.datetime(2024, 3, 31, 2, 30), dt.datetime(2024, 3, 31, 23, 59, 59)],
        },
        [
            dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
            dt.datetime(2024, 3, 3),
            dt.datetime(2024, 3, 30, 23, 59, 59, 999999),
            dt.datetime(2024, 4, 1),
        ],
    ),
    "timestamptz": (  # instants: Berlin's midnight is 23:00 UTC in winter, 22:00 UTC from March 31st
        pa.timestamp("us", tz="UTC"),
        {
            "2024-03-01": [utc(2024, 2, 29, 23), utc(2024, 3, 1, 22, 59, 59, 999999)],
            "2024-03-02": [utc(2024, 3, 1, 23), utc(2024, 3, 2, 0, 30)],
            "2024-03-31": [utc(2024, 3, 30, 23), utc(2024, 3, 31, 12), utc(2024, 3, 31, 21, 59, 59, 999999)],
        },
        [utc(2024, 2, 29, 22, 59, 59, 999999), utc(2024, 3, 2, 23), utc(2024, 3, 30, 22, 59, 59, 999999), utc(2024, 3, 31, 22)],
    ),
}


@pytest.mark.parametrize("kind", list(WINDOWS))
def test_time_windows_replace_exactly_their_rows(pg, pg_schema, kind):
    at, windows, outside = WINDOWS[kind]
    dest = spec(pg_schema)
    ids = iter(range(1, 1000))
    first = {key: [(next(ids), value, f"first {key}") for value in values] for key, values in windows.items()}
    for key, window_rows in first.items():
        load(dest, day(key), batches_of(window_rows, at))
    others = [(900 + i, value, "not in a published window") for i, value in enumerate(outside)]
    insert(pg, pg_schema, others)
    for key, window_rows in first.items():
        assert count(dest, day(key)) == len(window_rows), key
    expected = others + [r for window_rows in first.values() for r in window_rows]
    assert_same_rows(expected, rows(pg_schema))

    # the source's rows of March 2nd changed: one row gone, one changed, two new (one exactly at the window's start)
    old, values = first["2024-03-02"], windows["2024-03-02"]
    second = [(old[1][0], old[1][1], "changed"), (502, values[0], "new at the start"), (503, values[-1], "new")]
    load(dest, day("2024-03-02"), batches_of(second, at))
    expected = others + first["2024-03-01"] + second + first["2024-03-31"]
    assert_same_rows(expected, rows(pg_schema))
    assert count(dest, day("2024-03-02")) == len(second)

    # March 1st now holds no row: publishing it empties its window and nothing else
    load(dest, day("2024-03-01"), [])
    assert count(dest, day("2024-03-01")) == 0
    assert_same_rows(others + second + first["2024-03-31"], rows(pg_schema))
    assert tables(pg_schema) == ["_conduit_batches", PUBLISHED, "things"], "no staging table left behind"
    assert pg_rows(DSN, f"SELECT count(*) FROM {pg_schema}._conduit_batches") == [(0,)]


@pytest.mark.parametrize(
    "at,boundaries,values,far",
    [
        (pa.int64(), (100, 200), {"r00": [-(2**62), 99], "r01": [100, 199], "r02": [200, 300]}, 2**62),
        (
            pa.decimal128(14, 2),
            (Decimal("100.00"), Decimal("200.50")),
            {
                "r00": [Decimal("-5.00"), Decimal("99.99")],
                "r01": [Decimal("100.00"), Decimal("200.49")],
                "r02": [Decimal("200.50")],
            },
            Decimal("999999999999.99"),
        ),
        (
            pa.date32(),
            (dt.date(2024, 1, 1), dt.date(2024, 6, 1)),
            {"r00": [dt.date(1, 1, 1), dt.date(2023, 12, 31)], "r01": [dt.date(2024, 1, 1)], "r02": [dt.date(2024, 6, 1)]},
            dt.date(9999, 12, 31),
        ),
    ],
    ids=["bigint", "numeric", "date"],
)
def test_key_ranges_replace_exactly_their_rows_and_the_last_is_open(pg, pg_schema, at, boundaries, values, far):
    dest = spec(pg_schema)
    ids = iter(range(1, 1000))
    first = {key: [(next(ids), value, key) for value in vals] for key, vals in values.items()}
    for key, range_rows in first.items():
        load(dest, key_range(key, boundaries, "at"), batches_of(range_rows, at))
    assert_same_rows([r for range_rows in first.values() for r in range_rows], rows(pg_schema))

    # rows above the last boundary, far and at it, all belong to the last range
    last = [(700, values["r02"][0], "again"), (701, far, "far above")]
    load(dest, key_range("r02", boundaries, "at"), batches_of(last, at))
    assert_same_rows(first["r00"] + first["r01"] + last, rows(pg_schema))
    assert [count(dest, key_range(k, boundaries, "at")) for k in ("r00", "r01", "r02")] == [2, len(first["r01"]), 2]

    load(dest, key_range("r00", boundaries, "at"), [])  # the first range, open below, emptied
    assert_same_rows(first["r01"] + last, rows(pg_schema))
    assert count(dest, key_range("r00", boundaries, "at")) == 0


def test_an_empty_partition_publishes_before_the_table_exists(pg, pg_schema):
    dest = spec(pg_schema)
    load(dest, day("2024-03-01"), [])
    assert count(dest, day("2024-03-01")) == 0
    assert "things" not in tables(pg_schema)  # no batch told its columns: nothing to create yet
    load(dest, day("2024-03-02"), batches_of([(1, dt.datetime(2024, 3, 2, 5), "x")], pa.timestamp("us")))
    assert rows(pg_schema) == [(1, dt.datetime(2024, 3, 2, 5), "x")]
    assert count(dest, day("2024-03-01")) == 0


def test_a_partition_crashed_before_publish_resumes_exactly(pg, pg_schema):
    dest = spec(pg_schema)
    at = pa.timestamp("us")
    load(dest, day("2024-03-01"), batches_of([(1, dt.datetime(2024, 3, 1, 1), "other partition")], at))
    old = [(10, dt.datetime(2024, 3, 2, 1), "old"), (11, dt.datetime(2024, 3, 2, 2), "old")]
    load(dest, day("2024-03-02"), batches_of(old, at))
    new = [(20 + i, dt.datetime(2024, 3, 2, i), "new") for i in range(6)]
    b = batches_of(new, at)

    first = open_destination(dest, "things", partition=day("2024-03-02"))
    state = first.start(None).state
    write_all(first, b)  # the three batches committed; the crash comes before the third's checkpoint and the publish
    first.close()
    assert_same_rows([(1, dt.datetime(2024, 3, 1, 1), "other partition"), *old], rows(pg_schema))

    resumed = open_destination(dest, "things", partition=day("2024-03-02"))
    try:
        resumption = resumed.start(state, 2)  # the checkpoint saw batches 0 and 1: batch 2 is read again
        assert not resumption.already_published
        write_all(resumed, [table_of(new[4:], at)], start=2)
        resumed.publish(3)
    finally:
        resumed.close()
    assert_same_rows([(1, dt.datetime(2024, 3, 1, 1), "other partition"), *new], rows(pg_schema))

    # a crash after the publish committed, before the checkpoint was deleted: the resume finds it published
    again = open_destination(dest, "things", partition=day("2024-03-02"))
    try:
        assert again.start(state, 3).already_published
    finally:
        again.close()
    assert_same_rows([(1, dt.datetime(2024, 3, 1, 1), "other partition"), *new], rows(pg_schema))
    assert tables(pg_schema) == ["_conduit_batches", PUBLISHED, "things"]


def test_a_publish_that_fails_changes_nothing_and_is_retried(pg, pg_schema):
    dest = spec(pg_schema)
    at = pa.timestamp("us")
    load(dest, day("2024-03-01"), batches_of([(1, dt.datetime(2024, 3, 1, 1), "a")], at))
    d = open_destination(dest, "things", partition=day("2024-03-01"))
    state = d.start(None).state
    write_all(d, batches_of([(2, dt.datetime(2024, 3, 1, 2), "b")], at))
    with pg.cursor() as cur:  # the publish's INSERT fails (after its DELETE ran) on a constraint someone added
        cur.execute(f"ALTER TABLE {pg_schema}.things ADD CONSTRAINT no_b CHECK (v <> 'b')")
    with pytest.raises(DestinationError, match="cannot publish the output"):
        d.publish(1)
    d.close()
    assert rows(pg_schema) == [(1, dt.datetime(2024, 3, 1, 1), "a")]
    with pg.cursor() as cur:
        cur.execute(f"ALTER TABLE {pg_schema}.things DROP CONSTRAINT no_b")
    retry = open_destination(dest, "things", partition=day("2024-03-01"))
    try:
        assert not retry.start(state, 1).already_published
        retry.publish(1)
    finally:
        retry.close()
    assert rows(pg_schema) == [(2, dt.datetime(2024, 3, 1, 2), "b")]


def test_partitions_publish_at_the_same_moment(pg, pg_schema):
    """Every round: the table is missing, and both partitions create it as they publish, at the same moment."""
    dest = spec(pg_schema)
    at = pa.timestamp("us", tz="UTC")
    keys = ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
    for round_ in range(6):
        with pg.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {pg_schema}.things")
        want = {
            k: [(i * 10 + j, day(k).lo + dt.timedelta(hours=5 * j), f"{k} {round_}") for j in range(3)]
            for i, k in enumerate(keys)
        }
        writers = [open_destination(dest, "things", partition=day(k)) for k in keys]
        try:
            for d, k in zip(writers, keys, strict=True):
                d.start(None)  # all running at once: none holds the table for itself
                write_all(d, batches_of(want[k], at))
            gate = threading.Barrier(len(writers))
            errors: list[BaseException] = []

            def publish(d: Any, gate: threading.Barrier = gate, errors: list[BaseException] = errors) -> None:
                try:
                    gate.wait()
                    d.publish(2)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=publish, args=(d,)) for d in writers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
        finally:
            for d in writers:
                d.close()
        assert_same_rows([r for k in keys for r in want[k]], rows(pg_schema))


def test_a_partition_publishes_while_another_holds_its_rows(pg, pg_schema):
    """Another partition's publish in progress (its rows deleted and inserted, not committed) does not hold this one's."""
    dest = spec(pg_schema)
    at = pa.timestamp("us")
    load(dest, day("2024-03-01"), batches_of([(1, dt.datetime(2024, 3, 1, 1), "a")], at))
    load(dest, day("2024-03-02"), batches_of([(2, dt.datetime(2024, 3, 2, 1), "b")], at))
    other = psycopg2.connect(DSN)
    done = threading.Event()
    try:
        with other.cursor() as cur:  # what 2024-03-01's publish does, left uncommitted
            cur.execute(f"DELETE FROM {pg_schema}.things WHERE at >= '2024-03-01' AND at < '2024-03-02'")
            cur.execute(f"INSERT INTO {pg_schema}.things VALUES (3, '2024-03-01 02:00', 'a2')")
        d = open_destination(dest, "things", partition=day("2024-03-02"))
        try:
            d.start(None)
            write_all(d, batches_of([(4, dt.datetime(2024, 3, 2, 2), "b2")], at))
            publishing = threading.Thread(target=lambda: (d.publish(1), done.set()))
            publishing.start()
            publishing.join(15)
            assert done.is_set(), "the publish waited for another partition's open transaction"
        finally:
            other.rollback()
            publishing.join(15)
            d.close()
    finally:
        other.close()
    assert_same_rows([(1, dt.datetime(2024, 3, 1, 1), "a"), (4, dt.datetime(2024, 3, 2, 2), "b2")], rows(pg_schema))


def test_runs_of_one_table_fence_each_other_by_partition(pg, pg_schema):
    dest = spec(pg_schema)
    first = open_destination(dest, "things", partition=day("2024-03-01"))
    opened = [first]
    try:
        first.start(None)
        other_partition = open_destination(dest, "things", partition=day("2024-03-02"))
        opened.append(other_partition)
        other_partition.start(None)  # partitions of one pipeline run at the same time
        same_partition = open_destination(dest, "things", partition=day("2024-03-01"))
        opened.append(same_partition)
        with pytest.raises(DestinationError, match="being written by another run of pipeline 'things' partition '2024-03-01'"):
            same_partition.start(None)
        whole = open_destination(dest, "things")
        opened.append(whole)
        with pytest.raises(DestinationError, match="being written by another run"):
            whole.start(None)  # an unpartitioned run of the table waits for every partition
    finally:
        for d in opened:
            d.close()
    whole = open_destination(dest, "things")
    try:
        whole.start(None)  # released with the partitions' connections
        partition = open_destination(dest, "things", partition=day("2024-03-01"))
        with pytest.raises(DestinationError, match="being written by a run of an unpartitioned pipeline"):
            partition.start(None)
        partition.close()
    finally:
        whole.close()


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_append_and_merge_keep_each_partitions_batches_apart(pg, pg_schema, mode):
    dest = spec(pg_schema, mode)
    at = pa.timestamp("us")
    a_rows = [(i, dt.datetime(2024, 3, 1, i), "a") for i in range(1, 5)]
    b_rows = [(100 + i, dt.datetime(2024, 3, 2, i), "b") for i in range(1, 5)]
    a = open_destination(dest, "things", partition=day("2024-03-01"))
    b = open_destination(dest, "things", partition=day("2024-03-02"))
    try:
        a_state = a.start(None).state
        b.start(None)
        for i, (ta, tb) in enumerate(zip(batches_of(a_rows, at), batches_of(b_rows, at), strict=True)):
            a.write(i, ta, "id", ta.column("id")[-1].as_py(), batch_state={})  # the same batch numbers, at once
            b.write(i, tb, "id", tb.column("id")[-1].as_py(), batch_state={})
        units = pg_rows(DSN, f"SELECT pipeline, count(*) FROM {pg_schema}._conduit_batches GROUP BY 1 ORDER BY 1")
        assert units == [("things.2024-03-01", 2), ("things.2024-03-02", 2)]
        b.publish(2)
    finally:
        a.close()
        b.close()
    # partition March 1st crashed after both its batches committed, its checkpoint saying one: it adopts its own batch 1
    resumed = open_destination(dest, "things", partition=day("2024-03-01"))
    try:
        resumption = resumed.start(a_state, 1)
        assert [(c.index, c.rows, c.last_key) for c in resumption.committed] == [(1, 2, 4)]
        resumed.publish(2)
    finally:
        resumed.close()
    assert_same_rows(a_rows + b_rows, rows(pg_schema))
    assert pg_rows(DSN, f"SELECT count(*) FROM {pg_schema}._conduit_batches") == [(0,)]
    assert count(dest, day("2024-03-01")) == 4

    # a second run of March 1st: append adds its rows again, merge updates them; March 2nd is untouched
    again = [(1, dt.datetime(2024, 3, 1, 1), "a2"), (9, dt.datetime(2024, 3, 1, 9), "a2")]
    load(dest, day("2024-03-01"), batches_of(again, at))
    if mode == "append":
        assert_same_rows(a_rows + again + b_rows, rows(pg_schema))
        assert count(dest, day("2024-03-01")) == 6
    else:
        assert_same_rows([again[0], *a_rows[1:], again[1], *b_rows], rows(pg_schema))
        assert count(dest, day("2024-03-01")) == 5
    assert count(dest, day("2024-03-02")) == 4


def test_a_partition_with_other_columns_is_refused(pg, pg_schema):
    dest = spec(pg_schema)
    load(dest, day("2024-03-01"), batches_of([(1, dt.datetime(2024, 3, 1, 1), "a")], pa.timestamp("us")))
    changed = pa.table(
        {"id": pa.array([2], pa.int64()), "at": pa.array([dt.datetime(2024, 3, 2, 1)], pa.timestamp("us")), "v": [7]}
    )
    with pytest.raises(DestinationError, match=r"partition '2024-03-02'.*v is bigint in this partition's rows but text"):
        load(dest, day("2024-03-02"), [changed])
    fewer = pa.table({"id": pa.array([2], pa.int64()), "at": pa.array([dt.datetime(2024, 3, 2, 1)], pa.timestamp("us"))})
    with pytest.raises(DestinationError, match="v is in the table but not in this partition's rows"):
        load(dest, day("2024-03-02"), [fewer])
    assert rows(pg_schema) == [(1, dt.datetime(2024, 3, 1, 1), "a")]


def test_rows_outside_the_window_are_refused(pg, pg_schema):
    """Rows the table does not see in the partition's window would stay when it is replaced: nothing is published."""
    dest = spec(pg_schema)
    load(dest, day("2024-03-01"), batches_of([(1, dt.datetime(2024, 3, 1, 1), "a")], pa.timestamp("us")))
    stray = [(2, dt.datetime(2024, 3, 1, 23), "ok"), (3, dt.datetime(2024, 3, 2), "next day"), (4, None, "null")]
    with pytest.raises(DestinationError, match=r"2 row\(s\) loaded for pipeline 'things' partition '2024-03-01'.*2024-03-02"):
        load(dest, day("2024-03-01"), batches_of(stray, pa.timestamp("us"), size=3))
    assert rows(pg_schema) == [(1, dt.datetime(2024, 3, 1, 1), "a")]


def test_a_partition_column_the_table_cannot_compare_is_refused(pg, pg_schema):
    dest = spec(pg_schema)
    text_key = key_range("r01", ("m",), "v")
    with pytest.raises(DestinationError, match="'v' of table .* is text, compared by a collation"):
        load(dest, text_key, batches_of([(1, dt.datetime(2024, 3, 1), "q")], pa.timestamp("us")))
    with pytest.raises(DestinationError, match="time windows need a date, timestamp or timestamptz column"):
        load(dest, day("2024-03-01", column="id"), batches_of([(1, dt.datetime(2024, 3, 1), "q")], pa.timestamp("us")))
    with pytest.raises(DestinationError, match="has no column 'when', the partition column"):
        load(dest, day("2024-03-01", column="when"), batches_of([(1, dt.datetime(2024, 3, 1), "q")], pa.timestamp("us")))


def test_clear_checkpoints_names_a_partitions_staging_table(pg, pg_schema):
    dest = spec(pg_schema)
    pipeline = "p" * 58
    partitions = [day("2024-03-01", pipeline=pipeline), day("2024-03-02", pipeline=pipeline)]
    states = []
    for p in partitions:
        d = open_destination(dest, pipeline, partition=p)
        states.append(d.start(None).state)
        write_all(d, batches_of([(1, dt.datetime(2024, 3, 1), "x")], pa.timestamp("us")))
        d.close()  # a run that crashed: its checkpoint names its staging table
    staged = sorted(s["staging"] for s in states)
    assert all(s.startswith(STAGING_PREFIX) and len(s) <= MAX_NAME for s in staged)
    assert sorted(t for t in tables(pg_schema) if t.startswith(STAGING_PREFIX)) == staged
    assert staged[0] != staged[1]
    for p, state in zip(partitions, states, strict=True):
        assert state["staging"] == staging_name(p.unit, pg_schema, "things", state["generation"])
        lines = BACKEND.leftover(BACKEND.identity(dest, pipeline), state, p.unit)
        assert lines is not None and state["staging"] in lines[0]
        with pg.cursor() as cur:
            cur.execute(lines[1])
    assert not [t for t in tables(pg_schema) if t.startswith(STAGING_PREFIX)]


def test_unpartitioned_runs_are_unchanged(pg, pg_schema):
    """No publish record table, the whole table replaced, count() of all rows."""
    dest = spec(pg_schema)
    d = open_destination(dest, "things")
    try:
        d.start(None)
        write_all(d, batches_of([(1, dt.datetime(2024, 3, 1), "x"), (2, dt.datetime(2025, 1, 1), "y")], pa.timestamp("us")))
        d.publish(1)
        assert d.count() == 2
    finally:
        d.close()
    assert tables(pg_schema) == ["_conduit_batches", "things"]
    assert Counter(r[2] for r in rows(pg_schema)) == {"x": 1, "y": 1}


def load_unpartitioned(dest_spec: PostgresDestinationSpec, batches: list[pa.Table]) -> None:
    """One run of the pipeline without partitions: start, every batch, publish."""
    d = open_destination(dest_spec, "things")
    try:
        d.start(None)
        write_all(d, batches)
        d.publish(len(batches))
    finally:
        d.close()


def test_a_partition_refuses_a_table_an_unpartitioned_replace_published(pg, pg_schema):
    """A partition replaces only its window's rows: the unpartitioned run's others would stay for good, unseen by the
    partitions' counts. Refused at start, before a row is read, and the table is left as it was."""
    dest = spec(pg_schema)
    before = [(1, dt.datetime(2024, 2, 1), "outside every partition"), (2, dt.datetime(2024, 3, 1, 1), "in 03-01")]
    load_unpartitioned(dest, batches_of(before, pa.timestamp("us")))
    d = open_destination(dest, "things", partition=day("2024-03-01"))
    try:
        with pytest.raises(DestinationError) as refused:
            d.start(None)
    finally:
        d.close()
    text = str(refused.value)
    assert f"table {pg_schema}.things holds the output of an unpartitioned run of pipeline 'things'" in text
    assert "partition '2024-03-01'" in text
    assert f'Drop the table (DROP TABLE "{pg_schema}"."things")' in text and "load the pipeline unpartitioned" in text
    assert sorted(rows(pg_schema)) == before
    assert not [t for t in tables(pg_schema) if t.startswith(STAGING_PREFIX)]


def test_an_unpartitioned_replace_refuses_a_table_of_partitions(pg, pg_schema):
    """The other way round: the partitions' table is not swapped away by a run without partitions."""
    dest = spec(pg_schema)
    before = [(1, dt.datetime(2024, 3, 1, 1), "a"), (2, dt.datetime(2024, 3, 2, 1), "b")]
    load(dest, day("2024-03-01"), batches_of(before[:1], pa.timestamp("us")))
    load(dest, day("2024-03-02"), batches_of(before[1:], pa.timestamp("us")))
    with pytest.raises(DestinationError) as refused:
        load_unpartitioned(dest, batches_of([(9, dt.datetime(2025, 1, 1), "z")], pa.timestamp("us")))
    text = str(refused.value)
    assert f"table {pg_schema}.things holds the partitions of pipeline 'things'" in text
    assert f'Drop the table (DROP TABLE "{pg_schema}"."things") and load it unpartitioned' in text
    assert sorted(rows(pg_schema)) == before
    assert not [t for t in tables(pg_schema) if t.startswith(STAGING_PREFIX)]
    # a partition's run keeps loading it
    load(dest, day("2024-03-02"), batches_of([(3, dt.datetime(2024, 3, 2, 2), "c")], pa.timestamp("us")))
    assert sorted(rows(pg_schema)) == [before[0], (3, dt.datetime(2024, 3, 2, 2), "c")]


# --- end to end: run_pipeline from a PostgreSQL source ---------------------------------------------------------------

WINDOW_SQL = {  # each window as the SQL a reader would write for that column type, independent of conduit's code
    "d": "d >= DATE '{lo}' AND d < DATE '{hi}'",
    "ts": "ts >= TIMESTAMP '{lo}' AND ts < TIMESTAMP '{hi}'",
    "tz": f"tz >= TIMESTAMPTZ '{{lo}} {ZONE}' AND tz < TIMESTAMPTZ '{{hi}} {ZONE}'",
}
NEXT_DAY = {"2024-03-29": "2024-03-30", "2024-03-30": "2024-03-31", "2024-03-31": "2024-04-01", "2024-04-01": "2024-04-02"}


@pytest.fixture
def events(pg, pg_schema):
    """``events`` in the source schema: a row every 37 minutes from March 29th to April 2nd (Berlin; the clocks go
    forward on March 31st), one exactly at each Berlin midnight and one a microsecond before, each with the Berlin
    date (d), wall-clock time (ts) and instant (tz); plus a wall-clock time the DST change skips."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.events (id bigint PRIMARY KEY, d date, ts timestamp, tz timestamptz, v text)")
        cur.execute(
            f"INSERT INTO {pg_schema}.events SELECT g, (t AT TIME ZONE '{ZONE}')::date, t AT TIME ZONE '{ZONE}', t, 'v' || g "
            "FROM generate_series(TIMESTAMPTZ '2024-03-29 00:00+01', TIMESTAMPTZ '2024-04-02 23:00+02', interval '37 minutes') "
            "WITH ORDINALITY AS s(t, g)"
        )
        cur.execute(
            f"INSERT INTO {pg_schema}.events SELECT 10000 + g, (t AT TIME ZONE '{ZONE}')::date, t AT TIME ZONE '{ZONE}', t, "
            f"'edge' FROM unnest(ARRAY(SELECT (day::date::timestamp AT TIME ZONE '{ZONE}') + shift FROM "
            "generate_series(DATE '2024-03-30', DATE '2024-04-02', interval '1 day') day, "
            "unnest(ARRAY[interval '0', interval '-1 microsecond']) shift)) WITH ORDINALITY AS s(t, g)"
        )
        cur.execute(
            f"INSERT INTO {pg_schema}.events VALUES "
            "(20000, '2024-03-31', '2024-03-31 02:30', '2024-03-31 00:59:59.999999+00', 'gap')"
        )
    yield f"{pg_schema}.events"
    with pg.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")


def pipeline(schema: str, column: str, mode: str = "replace", batch: int = 10, partitions: Any = None) -> Any:
    from conduit_dagster.engine.partitions import PartitionsSpec
    from conduit_dagster.engine.spec import PostgresSourceSpec, ResourceSpec

    if partitions is None:
        partitions = TimeWindows(column, "day", dt.datetime(2024, 3, 1, tzinfo=ZoneInfo(ZONE)), None, ZONE)
    return ResourceSpec(
        name="things",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=schema),
        destination=spec(f"{schema}_out", mode),
        query="SELECT id, d, ts, tz, v FROM events",
        batch_size=batch,
        resume=True,
        checkpoint_column="id",
        partitions=PartitionsSpec(partitions),
    )


def source_window(schema: str, column: str, key: str) -> list[tuple[Any, ...]]:
    where = WINDOW_SQL[column].format(lo=key, hi=NEXT_DAY[key])
    return pg_rows(DSN, f"SELECT id, d, ts, tz, v FROM {schema}.events WHERE {where}")


def out(schema: str) -> list[tuple[Any, ...]]:
    return pg_rows(DSN, f"SELECT id, d, ts, tz, v FROM {schema}_out.things")


def run_all(res: Any, store: Any, partitions: list[Partition], at_once: bool = True) -> None:
    """Run the partitions, each in a thread of its own at the same time (or one after the other)."""
    from conduit_dagster.engine.runner import RunFinished, run_pipeline

    errors: list[BaseException] = []

    def run(p: Partition) -> None:
        try:
            events = list(run_pipeline(res, store, run_id=p.key, partition=p))
            assert isinstance(events[-1], RunFinished)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    if not at_once:
        for p in partitions:
            run(p)
    else:
        threads = [threading.Thread(target=run, args=(p,)) for p in partitions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors


@pytest.mark.parametrize("column", ["d", "ts", "tz"])
def test_partitions_end_to_end_replace_only_their_window(pg, pg_schema, events, column):
    from conduit_dagster.engine.checkpoint import MemoryCheckpointStore

    res = pipeline(pg_schema, column)
    store = MemoryCheckpointStore()
    keys = ["2024-03-30", "2024-03-31", "2024-04-01"]
    run_all(res, store, [day(k, column) for k in keys])
    published = {k: source_window(pg_schema, column, k) for k in keys}
    assert all(len(v) > 30 for v in published.values())
    assert_same_rows([r for k in keys for r in published[k]], out(pg_schema))

    # the source changes in every window; only March 31st is loaded again
    with pg.cursor() as cur:
        cur.execute(f"UPDATE {events} SET v = 'changed' WHERE id % 5 = 0")
        cur.execute(f"DELETE FROM {events} WHERE id % 7 = 0")
        cur.execute(f"INSERT INTO {events} SELECT 30000 + id, d, ts, tz, 'copy' FROM {events} WHERE id % 11 = 0 OR v = 'edge'")
    run_all(res, store, [day("2024-03-31", column)])
    published["2024-03-31"] = source_window(pg_schema, column, "2024-03-31")
    assert_same_rows([r for k in keys for r in published[k]], out(pg_schema))
    for k in keys:
        assert count(res.destination, day(k, column)) == len(published[k])
    assert store.docs == {}
    assert tables(f"{pg_schema}_out") == ["_conduit_batches", PUBLISHED, "things"]


@pytest.mark.parametrize("mode", ["replace", "append", "merge"])
def test_a_partition_crashed_at_every_step_resumes_exactly(pg, pg_schema, events, mode):
    from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
    from conduit_dagster.engine.runner import RunFinished, run_pipeline
    from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

    res = pipeline(pg_schema, "tz", mode, batch=12)
    p, other = day("2024-03-31", "tz"), day("2024-03-30", "tz")
    expected = source_window(pg_schema, "tz", "2024-03-30") + source_window(pg_schema, "tz", "2024-03-31")
    run_all(res, MemoryCheckpointStore(), [other])
    step = 1
    while True:
        # replace and merge load the partition again over its earlier output; append would add it again: its rows go
        if mode == "append":
            with pg.cursor() as cur:
                cur.execute(f"DELETE FROM {pg_schema}_out.things WHERE {WINDOW_SQL['tz'].format(lo=p.key, hi=NEXT_DAY[p.key])}")
        store = MemoryCheckpointStore()
        trip = Tripwire(step)
        dest = Wrapped(open_destination(res.destination, "things", partition=p), trip, {"write", "publish"})
        try:
            list(run_pipeline(res, Wrapped(store, trip, {"save", "delete"}), run_id="a", destination=dest, partition=p))
        except Crash as crash:
            dest._inner.close()
            if "delete (after)" not in str(crash):  # the run had not finished: the next run resumes it
                events_ = list(run_pipeline(res, store, run_id="b", partition=p))
                assert isinstance(events_[-1], RunFinished)
            assert_same_rows(expected, out(pg_schema))
            assert store.docs == {}
            assert pg_rows(DSN, f"SELECT count(*) FROM {pg_schema}_out._conduit_batches") == [(0,)]
            assert [t for t in tables(f"{pg_schema}_out") if t.startswith(STAGING_PREFIX)] == []
            step += 1
            continue
        dest._inner.close()
        assert step > 2 * (len(source_window(pg_schema, "tz", "2024-03-31")) // 12)
        break


def test_key_ranges_end_to_end_with_rows_past_the_last_boundary(pg, pg_schema, events):
    from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
    from conduit_dagster.engine.partitions import KeyRanges, resolve_partition
    from conduit_dagster.engine.sources import open_source

    res = pipeline(pg_schema, "id", partitions=KeyRanges("id", 3))
    store = MemoryCheckpointStore()
    parts = [resolve_partition(res, k, store, lambda: open_source(res.source)) for k in ("r00", "r01", "r02")]
    run_all(res, store, parts)
    everything = pg_rows(DSN, f"SELECT id, d, ts, tz, v FROM {events}")
    assert_same_rows(everything, out(pg_schema))
    lo, hi = parts[1].lo, parts[1].hi
    before = {k: count(res.destination, p) for k, p in zip(("r00", "r01", "r02"), parts, strict=True)}
    assert sum(before.values()) == len(everything) and min(before.values()) > 20

    with pg.cursor() as cur:  # changes at both ends of the middle range (not loaded again) and of the last; new rows past it
        cur.execute(f"UPDATE {events} SET v = 'changed' WHERE id IN (%s, %s, %s)", (lo, hi - 1, hi))
        cur.execute(f"INSERT INTO {events} (id, v) VALUES (%s, 'far'), (%s, 'farther')", (hi + 10**9, 10**15))
    run_all(res, store, [parts[2]])
    middle = [r for r in everything if lo <= r[0] < hi]
    rest = pg_rows(DSN, f"SELECT id, d, ts, tz, v FROM {events} WHERE id < {lo} OR id >= {hi}")
    assert_same_rows(middle + rest, out(pg_schema))
    assert count(res.destination, parts[2]) == before["r02"] + 2


def test_an_empty_partition_end_to_end(pg, pg_schema, events):
    from conduit_dagster.engine.checkpoint import MemoryCheckpointStore

    res = pipeline(pg_schema, "d")
    store = MemoryCheckpointStore()
    run_all(res, store, [day("2024-05-01", "d")])  # no row ever: nothing to create, a zero count
    assert count(res.destination, day("2024-05-01", "d")) == 0
    run_all(res, store, [day("2024-03-30", "d"), day("2024-03-31", "d")])
    kept = source_window(pg_schema, "d", "2024-03-31")
    with pg.cursor() as cur:
        cur.execute(f"DELETE FROM {events} WHERE d = '2024-03-30'")
    run_all(res, store, [day("2024-03-30", "d")])
    assert count(res.destination, day("2024-03-30", "d")) == 0
    assert_same_rows(kept, out(pg_schema))


@pytest.mark.parametrize("column", ["ts", "tz"])
def test_hourly_windows_across_both_dst_changes_hold_every_row_once(pg, pg_schema, events, column):
    """New York, 2024: on March 10th the wall clock skips 02:00-03:00, on November 3rd it shows 01:00-02:00 twice.
    Every hourly window of those nights, published at once, holds every row exactly once (on a timestamp without
    time zone, the first of the two 01:00 hours is empty and the second holds that wall-clock hour)."""
    from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
    from conduit_dagster.engine.partitions import time_partition_keys

    ny = "America/New_York"
    with pg.cursor() as cur:
        cur.execute(
            f"INSERT INTO {events} SELECT 50000 + row_number() OVER (), (t AT TIME ZONE '{ny}')::date, t AT TIME ZONE '{ny}', "
            "t, 'dst' FROM (SELECT generate_series(TIMESTAMPTZ '2024-03-10 04:00+00', TIMESTAMPTZ '2024-03-10 10:00+00', "
            "interval '10 minutes') UNION ALL SELECT generate_series(TIMESTAMPTZ '2024-11-03 03:00+00', "
            "TIMESTAMPTZ '2024-11-03 10:00+00', interval '10 minutes')) AS s(t)"
        )
        # a wall-clock time the change skips: only a timestamp without time zone holds it
        cur.execute(f"INSERT INTO {events} VALUES (59999, '2024-03-10', '2024-03-10 02:30', '2024-03-10 07:30+00', 'gap')")
    store = MemoryCheckpointStore()
    expected: list[tuple[Any, ...]] = []
    counts = {}
    for night in ("2024-03-10", "2024-11-03"):
        start, end = (dt.datetime.fromisoformat(f"{night} {h}").replace(tzinfo=ZoneInfo(ny)) for h in ("00:00", "05:00"))
        windows = TimeWindows(column, "hour", start, end, ny)
        parts = [Partition("things", k, column, *time_window(windows, k), ny) for k in time_partition_keys(windows)]
        run_all(pipeline(pg_schema, column, batch=7, partitions=windows), store, parts)
        counts.update({p.key: count(spec(f"{pg_schema}_out"), p) for p in parts})
        if column == "ts":
            where = f"ts >= TIMESTAMP '{night} 00:00' AND ts < TIMESTAMP '{night} 05:00'"
        else:
            where = f"tz >= TIMESTAMPTZ '{night} 00:00 {ny}' AND tz < TIMESTAMPTZ '{night} 05:00 {ny}'"
        expected += pg_rows(DSN, f"SELECT id, d, ts, tz, v FROM {events} WHERE {where}")
    assert_same_rows(expected, out(pg_schema))
    assert sum(counts.values()) == len(expected)
    if column == "ts":
        assert counts["2024-11-03-01:00"] == 0 and counts["2024-11-03-01:00-0500"] == 12  # two 01:00 hours, 6 rows each
        assert counts["2024-03-10-01:00"] == 7  # 01:00 to 03:00 on the wall clock: six rows and the skipped 02:30
    else:
        assert counts["2024-11-03-01:00"] == counts["2024-11-03-01:00-0500"] == 6


def _run_partition(res: Any, directory: str, key: str, column: str, gate: Any) -> None:
    """A partition's run in a process of its own (spawned: the test's module is imported there)."""
    from pathlib import Path

    from conduit_dagster.engine.checkpoint import LocalCheckpointStore
    from conduit_dagster.engine.runner import run_pipeline

    gate.wait(60)
    list(run_pipeline(res, LocalCheckpointStore(Path(directory)), run_id=f"process {key}", partition=day(key, column)))


def test_partitions_run_at_once_in_processes_of_their_own(pg, pg_schema, events, tmp_path):
    import multiprocessing

    res = pipeline(pg_schema, "tz", batch=5)
    keys = ["2024-03-30", "2024-03-31", "2024-04-01"]
    ctx = multiprocessing.get_context("spawn")
    gate = ctx.Barrier(len(keys))
    runs = [ctx.Process(target=_run_partition, args=(res, str(tmp_path), k, "tz", gate)) for k in keys]
    for r in runs:
        r.start()
    for r in runs:
        r.join(180)
    assert [r.exitcode for r in runs] == [0] * len(keys)
    assert_same_rows([r for k in keys for r in source_window(pg_schema, "tz", k)], out(pg_schema))
    assert not list(tmp_path.glob("*.json")), "every partition's checkpoint deleted after its publish"
