"""engine/partitions.py: ingest.yml's `partitions:`, window keys and bounds, key-range plans and their storage."""

import datetime as dt
import json
import random
import textwrap
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore, MemoryCheckpointStore
from conduit_dagster.engine.errors import CheckpointError, SourceError, SpecError
from conduit_dagster.engine.partitions import (
    KeyRanges,
    RangePlan,
    TimeWindows,
    boundaries_from,
    ensure_plan,
    load_plan,
    partition_keys,
    range_keys,
    replan,
    resolve_partition,
    split_unit,
    time_window,
    unit_name,
)
from conduit_dagster.engine.spec import load_spec_text

HEAD = """
sources: [{name: s, type: sqlite, path: x.db}]
destinations: [{name: d, type: local, path: out}]
resources:
  - name: p
    source: s
    destination: d
    query: SELECT * FROM t
    checkpoint_column: id
"""


def spec(tmp_path: Path, partitions: str, extra: str = ""):
    text = HEAD + extra + "    partitions:\n" + textwrap.indent(textwrap.dedent(partitions), "      ")
    return load_spec_text(text, tmp_path / "ingest.yml").resources[0]


def error(tmp_path: Path, partitions: str, extra: str = "") -> str:
    with pytest.raises(SpecError) as info:
        spec(tmp_path, partitions, extra)
    return str(info.value)


def test_time_windows_parse_with_defaults(tmp_path):
    r = spec(tmp_path, 'column: created_at\nevery: day\nstart: "2024-01-01"\n')
    assert r.partitions is not None
    scheme = r.partitions.scheme
    assert isinstance(scheme, TimeWindows)
    assert (scheme.column, scheme.every, scheme.timezone, scheme.end) == ("created_at", "day", "UTC", None)
    assert scheme.start == dt.datetime(2024, 1, 1, tzinfo=ZoneInfo("UTC"))
    assert (r.partitions.backfill, r.partitions.max_partitions_per_run) == ("multi_run", 1)


def test_key_ranges_parse_with_policy(tmp_path):
    r = spec(tmp_path, "column: id\nranges: 16\nbackfill: multi_run\nmax_partitions_per_run: 4\n")
    assert r.partitions is not None and isinstance(r.partitions.scheme, KeyRanges)
    assert (r.partitions.scheme.ranges, r.partitions.max_partitions_per_run) == (16, 4)
    assert partition_keys(r) == [f"r{i:02d}" for i in range(16)]


@pytest.mark.parametrize(
    ("partitions", "extra", "expected"),
    [
        (
            "column: c\nevery: fortnight\nstart: 2024-01-01\n",
            "",
            "partitions.every: unknown value 'fortnight'; use one of: hour, day, week, month",
        ),
        ("column: c\nevery: day\n", "", "missing required key 'start'"),
        ("column: c\nevery: day\nstart: 1st of May\n", "", "expected a date or date and time, got '1st of May'"),
        ("column: c\nevery: day\nstart: 2024-01-01\ntimezone: Mars/Olympus\n", "", "unknown time zone 'Mars/Olympus'"),
        ("column: c\nranges: 4\nevery: day\n", "", "give one form"),
        ("column: c\n", "", "give either time windows"),
        ("column: c\nranges: 0\n", "", "partitions.ranges: must be between 1 and 1000"),
        ("column: c\nranges: 4\nbackfill: single_run\nmax_partitions_per_run: 3\n", "", "single_run backfill loads every"),
        ("column: c\nranges: 4\nbucket: x\n", "", "unknown key 'bucket'"),
        ("column: c\nevery: month\nstart: 2024-01-15\nend: 2024-02-10\n", "", "no whole month fits"),
    ],
)
def test_partitions_errors_name_key_and_fix(tmp_path, partitions, extra, expected):
    message = error(tmp_path, partitions, extra)
    assert expected in message
    assert "ingest.yml:" in message


def test_partitions_refuse_incremental_and_missing_checkpoint_column(tmp_path):
    text = HEAD.replace("query: SELECT * FROM t", "query: SELECT * FROM t WHERE u >= :last_value").replace(
        "checkpoint_column: id", "incremental_column: u\n    initial_value: 0"
    )
    with pytest.raises(SpecError, match="cannot also be an incremental load"):
        load_spec_text(text + "    partitions: {column: id, ranges: 2}\n", tmp_path / "ingest.yml")
    text = HEAD.replace("    checkpoint_column: id\n", "")
    with pytest.raises(SpecError, match="needs `checkpoint_column:`"):
        load_spec_text(text + "    partitions: {column: id, ranges: 2}\n", tmp_path / "ingest.yml")


def tw(every: str, start: str, end: str | None = None, tz: str = "UTC") -> TimeWindows:
    zone = ZoneInfo(tz)
    s = dt.datetime.fromisoformat(start).replace(tzinfo=zone)
    e = dt.datetime.fromisoformat(end).replace(tzinfo=zone) if end else None
    return TimeWindows("c", every, s, e, tz)


def test_window_keys_follow_dagster_defaults_and_ticks():
    from conduit_dagster.engine.partitions import time_partition_keys

    assert time_partition_keys(tw("month", "2024-01-15", "2024-05-01")) == ["2024-02-01", "2024-03-01", "2024-04-01"]
    # weeks start on Sunday; 2024-01-03 is a Wednesday, 2024-01-07 the next Sunday
    assert time_partition_keys(tw("week", "2024-01-03", "2024-01-22")) == ["2024-01-07", "2024-01-14"]
    assert time_partition_keys(tw("hour", "2024-01-01 22:30", "2024-01-02 01:00")) == ["2024-01-01-23:00", "2024-01-02-00:00"]
    now = dt.datetime(2024, 1, 4, 12, tzinfo=dt.UTC)  # without an end: complete windows only
    assert time_partition_keys(tw("day", "2024-01-01"), now) == ["2024-01-01", "2024-01-02", "2024-01-03"]


def test_windows_are_half_open_and_adjacent_across_dst():
    t = tw("day", "2024-03-30", "2024-04-01", "Europe/Berlin")  # clocks go forward on 2024-03-31
    a = time_window(t, "2024-03-30")
    b = time_window(t, "2024-03-31")
    assert a[1] == b[0]
    assert (b[1].astimezone(dt.UTC) - b[0].astimezone(dt.UTC)).total_seconds() == 23 * 3600
    assert b[0].utcoffset() == dt.timedelta(hours=1) and b[1].utcoffset() == dt.timedelta(hours=2)


def test_window_of_a_foreign_key_is_refused():
    t = tw("month", "2024-01-01", "2024-06-01")
    with pytest.raises(SpecError, match="is not the key of a month window"):
        time_window(t, "2024-02-15")
    with pytest.raises(SpecError, match="past the pipeline's partitions end"):
        time_window(t, "2024-06-01")
    with pytest.raises(SpecError, match="keys look like 2024-01-01"):
        time_window(t, "February")


def test_unit_names_round_trip():
    assert unit_name("orders", "2024-01-01-13:00") == "orders.2024-01-01-13:00"
    assert split_unit("orders.2024-01-01-13:00") == ("orders", "2024-01-01-13:00")
    assert split_unit("orders") == ("orders", None)
    assert range_keys(3) == ["r00", "r01", "r02"] and range_keys(101)[-1] == "r100"


def test_boundaries_split_into_equal_counts_from_a_sample():
    values = list(range(200_000))
    random.Random(1).shuffle(values)
    chunks = [pa.array(values[i : i + 7_000]) for i in range(0, len(values), 7_000)]
    exact, seen = boundaries_from(chunks, 4)
    assert (exact, seen) == ([50_000, 100_000, 150_000], 200_000)
    sampled, _ = boundaries_from(chunks, 4, sample=5_000)
    for got, want in zip(sampled, exact, strict=True):
        assert abs(got - want) < 200_000 * 0.03  # a uniform sample of 5k-10k values: within 3% of the rows
    with pytest.raises(SourceError, match="NULL"):
        boundaries_from([pa.array([1, None, 3])], 2)


class _Scan:
    """A source that only scans (what planning uses), counting its scans."""

    def __init__(self, values: list) -> None:
        self.values, self.scans, self.closed = values, 0, 0

    def scan_column(self, query: str, column: str):
        self.scans += 1
        yield pa.array(self.values)

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("store_kind", ["memory", "local"])
def test_plan_is_made_once_stored_and_checked(tmp_path, store_kind):
    r = spec(tmp_path, "column: id\nranges: 4\n")
    store = MemoryCheckpointStore() if store_kind == "memory" else LocalCheckpointStore(tmp_path / "cp")
    src = _Scan(list(range(1, 101)))
    plan = ensure_plan(r, store, lambda: src)
    assert plan.boundaries == (26, 51, 76)
    assert ensure_plan(r, store, lambda: _Scan([999])).boundaries == (26, 51, 76)  # stored: never re-planned silently
    assert src.scans == 1 and src.closed == 1
    first, last = resolve_partition(r, "r00", store, lambda: src), resolve_partition(r, "r03", store, lambda: src)
    assert (first.lo, first.hi, last.lo, last.hi) == (None, 26, 76, None)  # open below and above
    assert first.unit == "p.r00"
    with pytest.raises(SpecError, match="'r04' is not a partition of pipeline 'p'"):
        resolve_partition(r, "r04", store, lambda: src)
    # the plan sits beside the checkpoints but is not one
    assert store.list() == []
    doc = json.loads(store.load_plan("p") or "")
    assert doc["boundaries"][0] == {"type": "int", "value": "26"} and doc["rows_seen"] == 100
    # another number of ranges: the keys would change meaning
    r8 = spec(tmp_path, "column: id\nranges: 8\n")
    with pytest.raises(CheckpointError, match="Re-plan with `conduit plan --pipeline p`"):
        load_plan(r8, store)


def test_replan_is_refused_while_a_partition_holds_a_checkpoint(tmp_path):
    from conduit_dagster.engine.checkpoint import Checkpoint

    r = spec(tmp_path, "column: id\nranges: 2\n")
    store = LocalCheckpointStore(tmp_path / "cp")
    ensure_plan(r, store, lambda: _Scan(list(range(10))))
    store.save(
        Checkpoint(
            pipeline="p.r01",
            checkpoint_column="id",
            last_value=7,
            records_processed=2,
            batches_committed=1,
            run_id=None,
            query_sha256="x",
        )
    )
    with pytest.raises(CheckpointError, match="partitions r01 hold checkpoints"):
        replan(r, store, lambda: _Scan(list(range(100))))
    store.delete("p.r01")
    old, new = replan(r, store, lambda: _Scan(list(range(100))))
    assert old is not None and old.boundaries == (5,) and new.boundaries == (50,)
    assert load_plan(r, store) == new


def test_plan_of_an_empty_source_is_refused_and_few_values_give_empty_ranges(tmp_path):
    r = spec(tmp_path, "column: id\nranges: 4\n")
    with pytest.raises(SourceError, match="returned no rows"):
        ensure_plan(r, MemoryCheckpointStore(), lambda: _Scan([]))
    plan = ensure_plan(r, MemoryCheckpointStore(), lambda: _Scan([5, 5, 5, 9]))
    assert plan.boundaries == (5, 5, 9)
    assert plan.partition("r01").lo == plan.partition("r01").hi == 5  # empty: [5, 5)


def test_plan_json_is_checked(tmp_path):
    with pytest.raises(CheckpointError, match="not readable"):
        RangePlan.from_json("{}", where="x.plan.json")


def test_replan_waits_for_no_partition_run_and_a_run_of_a_replaced_plan_stops(tmp_path):
    from conduit_dagster.engine.errors import PipelineBusyError
    from conduit_dagster.engine.partitions import check_plan

    r = spec(tmp_path, "column: id\nranges: 2\n")
    store = MemoryCheckpointStore()
    ensure_plan(r, store, lambda: _Scan(list(range(10))))
    resolved = resolve_partition(r, "r01", store, lambda: _Scan([]))
    with store.lock("p.r01", "run-1"), pytest.raises(PipelineBusyError):  # a run of r01 is going
        replan(r, store, lambda: _Scan(list(range(100))))
    check_plan(r, store, resolved)  # the plan is unchanged: the run may go on
    replan(r, store, lambda: _Scan(list(range(100))))
    with pytest.raises(CheckpointError, match="re-planned while this run of partition r01 was starting"):
        check_plan(r, store, resolved)


def test_replan_into_fewer_ranges_names_the_partitions_left_behind(tmp_path, capsys):
    from conduit_dagster.engine.partitions import replan as do_replan

    r4 = spec(tmp_path, "column: id\nranges: 4\n")
    r2 = spec(tmp_path, "column: id\nranges: 2\n")
    store = MemoryCheckpointStore()
    ensure_plan(r4, store, lambda: _Scan(list(range(100))))
    old, new = do_replan(r2, store, lambda: _Scan(list(range(100))))
    assert old is not None and (old.ranges, new.ranges) == (4, 2)


def test_the_repeated_hour_east_of_utc_is_a_valid_key_with_its_own_window(tmp_path):
    """Berlin's clocks go back on 2024-10-27: Dagster keys the second 02:00 hour `2024-10-27-02:00+0100`."""
    from conduit_dagster.engine.partitions import time_partition_keys

    r = spec(tmp_path, 'column: ts\nevery: hour\nstart: "2024-10-27 01:00"\nend: "2024-10-27 04:00"\ntimezone: Europe/Berlin\n')
    assert r.partitions is not None and isinstance(r.partitions.scheme, TimeWindows)
    keys = time_partition_keys(r.partitions.scheme)
    assert keys == ["2024-10-27-01:00", "2024-10-27-02:00", "2024-10-27-02:00+0100", "2024-10-27-03:00"]
    windows = [resolve_partition(r, k, MemoryCheckpointStore(), lambda: _Scan([])) for k in keys]
    utc = [(w.lo.astimezone(dt.UTC), w.hi.astimezone(dt.UTC)) for w in windows]
    assert [hi - lo for lo, hi in utc] == [dt.timedelta(hours=1)] * 4
    assert all(a[1] == b[0] for a, b in zip(utc, utc[1:], strict=False))  # adjacent, no gap, no overlap
    assert windows[2].unit == "p.2024-10-27-02:00+0100"
