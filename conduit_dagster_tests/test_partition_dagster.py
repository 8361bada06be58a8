"""Partitioned pipelines on the Dagster side: partitions definitions that agree with the engine, backfill policies, no
pool serialization, per-partition runs, metadata, checks, the store-switch guard, schedules and sensors."""

import datetime as dt
import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetPartitionStatus,
    DagsterInstance,
    DailyPartitionsDefinition,
    HourlyPartitionsDefinition,
    MonthlyPartitionsDefinition,
    RunRequest,
    SkipReason,
    StaticPartitionsDefinition,
    WeeklyPartitionsDefinition,
    build_schedule_context,
    build_sensor_context,
)

from conduit_dagster.assets import backfill_policy, partitions_def
from conduit_dagster.definitions import build_definitions
from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.partitions import TimeWindows, resolve_partition, time_partition_keys, time_window
from conduit_dagster.engine.runner import BatchCommitted, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import load_spec, load_spec_text
from conduit_dagster_tests.conftest import s3_keys, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, s3_output_rows

BERLIN = ZoneInfo("Europe/Berlin")
DAYS = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]

INGEST = """
sources:
  - name: shop
    type: sqlite
    path: shop.db
    resume: true
    checkpoint_column: id
destinations:
  - name: lake
    type: local
    path: lake
resources:
  - name: orders
    source: shop
    destination: lake
    query: SELECT id, created, amount FROM orders
  - name: daily
    source: shop
    destination: lake
    batch_size: 10
    query: SELECT id, created, amount FROM orders
    partitions: {column: created, every: day, start: "2024-01-01", end: "2024-01-06", timezone: Europe/Berlin}
    schedule: "0 4 * * *"
    sensor: true
  - name: ranged
    source: shop
    destination: lake
    batch_size: 10
    query: SELECT id, created, amount FROM orders
    partitions: {column: id, ranges: 4, backfill: single_run}
    schedule: "30 5 * * *"
    sensor: true
"""


def source_rows(tmp_path: Path) -> list[tuple]:
    conn = sqlite3.connect(tmp_path / "shop.db")
    try:
        return list(conn.execute("SELECT id, created, amount FROM orders"))
    finally:
        conn.close()


def make_shop(tmp_path: Path, text: str = INGEST) -> Path:
    """240 orders, one every 30 minutes of 2024-01-01 .. 2024-01-05 (wall-clock text; midnight rows included)."""
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, created TEXT, amount REAL)")
    start = dt.datetime(2024, 1, 1)
    conn.executemany(
        "INSERT INTO orders VALUES (?, ?, ?)",
        [(i, (start + dt.timedelta(minutes=30 * (i - 1))).strftime("%Y-%m-%d %H:%M:%S"), i * 0.5) for i in range(1, 241)],
    )
    conn.commit()
    conn.close()
    return write_ingest(tmp_path, text)


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    return make_shop(tmp_path)


def day_rows(tmp_path: Path, day: str) -> list[tuple]:
    return [r for r in source_rows(tmp_path) if r[1].startswith(day)]


def partition_output(tmp_path: Path, pipeline: str, key: str) -> list[tuple]:
    table = ds.dataset(tmp_path / "lake" / pipeline / key, format="parquet").to_table()
    return [tuple(r.values()) for r in table.to_pylist()]


def materializations(result, instance: DagsterInstance | None = None) -> dict[str, dict]:
    """Partition key -> metadata values of the run's materializations (read from the instance when given: a failed
    step's result leaves out the materializations it logged)."""
    events = (
        [e.dagster_event for e in instance.all_logs(result.run_id) if e.dagster_event is not None]
        if instance is not None
        else result.all_events
    )
    found = {}
    for event in events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.step_materialization_data.materialization
            found[mat.partition] = {k: v.value for k, v in mat.metadata.items()}
    return found


def check_evaluations(result) -> dict[str | None, object]:
    return {
        e.event_specific_data.partition: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def failure_text(result) -> str:
    return "\n".join(e.step_failure_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE")


def range_tags(first: str, last: str) -> dict[str, str]:
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


# --- definitions ------------------------------------------------------------------------------------------------


def test_definitions_partitions_backfill_policies_jobs_and_no_pool(shop):
    defs = build_definitions(shop)
    graph = defs.resolve_asset_graph()
    daily, ranged, orders = (graph.get(AssetKey(n)) for n in ("daily", "ranged", "orders"))
    assert isinstance(daily.partitions_def, DailyPartitionsDefinition)
    assert daily.partitions_def.timezone == "Europe/Berlin"
    assert daily.partitions_def.get_partition_keys() == DAYS
    assert isinstance(ranged.partitions_def, StaticPartitionsDefinition)
    assert ranged.partitions_def.get_partition_keys() == ["r00", "r01", "r02", "r03"]
    assert orders.partitions_def is None
    assert daily.backfill_policy is not None and daily.backfill_policy.max_partitions_per_run == 1  # multi_run default
    assert ranged.backfill_policy is not None and ranged.backfill_policy.max_partitions_per_run is None  # single_run
    # no pool on a partitioned asset: a pool limited to 1 would load its partitions one at a time
    assert daily.pools == set() and ranged.pools == set()
    assert orders.pools == {"conduit_orders"}
    assert "Partitioned: daily windows on created" in (daily.description or "")
    # ingest_all holds the unpartitioned assets only; each partitioned one has its own partitioned job
    all_job = defs.resolve_job_def("ingest_all")
    assert all_job.partitions_def is None
    assert {k.to_user_string() for k in all_job.asset_layer.executable_asset_keys} == {"orders"}
    assert defs.resolve_job_def("ingest_daily").partitions_def.get_partition_keys() == DAYS
    assert defs.resolve_job_def("ingest_ranged").partitions_def.get_partition_keys() == ["r00", "r01", "r02", "r03"]
    assert {s.name for s in defs.schedules} == {"daily_schedule", "ranged_schedule"}
    assert {s.name for s in defs.sensors} == {"daily_sensor", "ranged_sensor"}


def test_multi_run_limit_and_every_form_of_backfill_policy(tmp_path):
    text = INGEST.replace("backfill: single_run}", "backfill: multi_run, max_partitions_per_run: 3}")
    spec = load_spec_text(text, tmp_path / "ingest.yml")
    assert backfill_policy(spec.resource("ranged")).max_partitions_per_run == 3
    assert backfill_policy(spec.resource("orders")) is None and partitions_def(spec.resource("orders")) is None


def test_key_range_definitions_load_without_reaching_the_source(tmp_path):
    """The keys of key ranges depend only on their number: loading the definitions never opens the source."""
    text = """
sources:
  - name: down
    type: postgresql
    host: 127.0.0.1
    port: 1
    database: test
    user: postgres
    checkpoint_column: id
destinations:
  - name: lake
    type: local
    path: lake
resources:
  - name: big
    source: down
    destination: lake
    query: SELECT id FROM t
    partitions: {column: id, ranges: 12}
"""
    defs = build_definitions(write_ingest(tmp_path, text))
    keys = defs.resolve_asset_graph().get(AssetKey("big")).partitions_def.get_partition_keys()
    assert keys == [f"r{i:02d}" for i in range(12)]
    assert not (tmp_path / ".checkpoints").exists()  # nothing planned, nothing stored


_DEFS = {"hour": HourlyPartitionsDefinition, "day": DailyPartitionsDefinition, "week": WeeklyPartitionsDefinition}
_DEFS["month"] = MonthlyPartitionsDefinition


@pytest.mark.parametrize(
    ("every", "zone", "start", "end"),
    [
        # hours across both DST changes of New York (a 23-hour and a 25-hour day; 01:00 happens twice on Nov 3)
        ("hour", "America/New_York", dt.datetime(2024, 3, 9, 22, 17), dt.datetime(2024, 3, 11, 3, 30)),
        ("hour", "America/New_York", dt.datetime(2024, 11, 2, 21, 5), dt.datetime(2024, 11, 4, 2, 0)),
        ("day", "Europe/Berlin", dt.datetime(2024, 3, 1, 5, 0), dt.datetime(2024, 4, 10, 12, 0)),
        ("week", "Asia/Kolkata", dt.datetime(2024, 1, 3, 13, 0), dt.datetime(2024, 6, 1, 0, 0)),
        ("month", "Australia/Sydney", dt.datetime(2023, 11, 15, 0, 0), dt.datetime(2025, 2, 1, 0, 0)),
    ],
)
def test_engine_and_dagster_agree_on_time_partition_keys_and_windows(every, zone, start, end):
    """The engine (used by the CLI and the runs) and the Dagster definition (the UI, backfills, schedules) must name
    the same windows with the same keys, or a partition run would load another window than the one it reports."""
    z = ZoneInfo(zone)
    windows = TimeWindows("created", every, start.replace(tzinfo=z), end.replace(tzinfo=z), zone)
    dagster_def = _DEFS[every](start_date=start, end_date=end, timezone=zone)
    mine = time_partition_keys(windows)
    assert mine == list(dagster_def.get_partition_keys())
    assert len(mine) >= 14
    assert len(set(mine)) == len(mine)
    for key in [*mine[:3], *mine[len(mine) // 2 - 1 : len(mine) // 2 + 2], *mine[-2:]]:
        window = dagster_def.time_window_for_partition_key(key)
        lo, hi = time_window(windows, key)
        assert (lo.timestamp(), hi.timestamp()) == (window.start.timestamp(), window.end.timestamp()), key
    # and without an end: up to the last complete window at the same instant
    now = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
    open_ended = TimeWindows("created", every, start.replace(tzinfo=z), None, zone)
    assert time_partition_keys(open_ended, now) == list(
        _DEFS[every](start_date=start, timezone=zone).get_partition_keys(current_time=now)
    )
    assert partitions_def_from(every, zone, start, end).get_partition_keys() == mine


def partitions_def_from(every, zone, start, end):
    """The definition the glue builds from ingest.yml for the same windows."""
    text = f"""
sources:
  - {{name: s, type: sqlite, path: s.db, checkpoint_column: id}}
destinations:
  - {{name: d, type: local, path: lake}}
resources:
  - name: r
    source: s
    destination: d
    query: SELECT 1 AS id
    partitions:
      {{column: created, every: {every}, start: "{start:%Y-%m-%d %H:%M}", end: "{end:%Y-%m-%d %H:%M}", timezone: {zone}}}
"""
    return partitions_def(load_spec_text(text, Path("/nonexistent/ingest.yml")).resource("r"))


def test_dst_repeated_hour_has_its_own_key_in_both():
    z = "America/New_York"
    windows = TimeWindows("c", "hour", dt.datetime(2024, 11, 3, 0, 0, tzinfo=ZoneInfo(z)), None, z)
    keys = time_partition_keys(windows, dt.datetime(2024, 11, 3, 9, 0, tzinfo=dt.UTC))
    assert keys[:4] == ["2024-11-03-00:00", "2024-11-03-01:00", "2024-11-03-01:00-0500", "2024-11-03-02:00"]
    first, second = time_window(windows, "2024-11-03-01:00"), time_window(windows, "2024-11-03-01:00-0500")
    assert first[1].timestamp() == second[0].timestamp() and second[1].timestamp() - second[0].timestamp() == 3600


# --- runs -------------------------------------------------------------------------------------------------------


def test_two_partitions_materialize_their_own_rows_with_metadata(shop, tmp_path):
    defs = build_definitions(shop)
    job = defs.resolve_job_def("ingest_daily")
    with DagsterInstance.ephemeral() as instance:
        for key in ("2024-01-02", "2024-01-04"):
            result = job.execute_in_process(partition_key=key, instance=instance)
            assert result.success
            meta = materializations(result)[key]
            assert meta["dagster/partition_row_count"] == 48
            assert meta["conduit/rows_this_run"] == 48 and meta["conduit/records_processed"] == 48
            assert meta["conduit/resumed"] is False
            assert meta["conduit/partition"] == key
            assert meta["conduit/last_value"] == str(max(r[0] for r in day_rows(tmp_path, key)))
            assert meta["conduit/output"] == str(tmp_path / "lake" / "daily" / key)
            assert "dagster/row_count" not in meta  # one partition's run does not count the whole table
            (evaluation,) = check_evaluations(result).values()
            assert evaluation.partition == key and evaluation.passed
            assert evaluation.metadata["conduit/source_rows"].value == 48
        materialized = instance.get_materialized_partitions(AssetKey("daily"))
        assert materialized == {"2024-01-02", "2024-01-04"}
    for key in ("2024-01-02", "2024-01-04"):
        assert_same_rows(day_rows(tmp_path, key), partition_output(tmp_path, "daily", key))
    # a row at exactly midnight is in the day it starts, and only there
    midnight = [r for r in source_rows(tmp_path) if r[1] == "2024-01-02 00:00:00"]
    assert midnight and midnight[0] in partition_output(tmp_path, "daily", "2024-01-02")
    assert not (tmp_path / "lake" / "daily" / "2024-01-03").exists()
    assert not list((tmp_path / ".checkpoints").glob("*.json"))  # every partition finished: no checkpoint left


def test_a_run_over_several_partitions_reports_each_and_checks_each(shop, tmp_path):
    defs = build_definitions(shop)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_ranged").execute_in_process(tags=range_tags("r00", "r03"), instance=instance)
        assert result.success
        found = materializations(result)
        assert set(found) == {"r00", "r01", "r02", "r03"}
        counts = {k: m["dagster/partition_row_count"] for k, m in found.items()}
        assert sum(counts.values()) == 240 and all(counts.values())
        for key, meta in found.items():  # each partition's own figures, plus the run's totals
            assert meta["conduit/partition"] == key and meta["conduit/rows_this_run"] == counts[key]
            assert meta["conduit/partitions_in_run"] == 4 and meta["conduit/run_rows_this_run"] == 240
        evaluations = check_evaluations(result)
        assert set(evaluations) == {"r00", "r01", "r02", "r03"}  # one evaluation per partition, none without one
        assert all(e.passed for e in evaluations.values())
        assert {k: e.metadata["conduit/destination_rows"].value for k, e in evaluations.items()} == counts
    rows = [row for key in ("r00", "r01", "r02", "r03") for row in partition_output(tmp_path, "ranged", key)]
    assert_same_rows(source_rows(tmp_path), rows)  # every row once: the ranges neither overlap nor leave a gap


def test_a_failed_partition_fails_the_run_but_not_the_others_and_the_sensor_relaunches_it(shop, tmp_path):
    defs = build_definitions(shop)
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    sensor = next(s for s in defs.sensors if s.name == "daily_sensor")
    with DagsterInstance.ephemeral() as instance:
        first = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert [r.partition_key for r in first] == DAYS  # nothing materialized: every complete window is due
        assert first[0].run_key == "daily:2024-01-01:missing"
        with store.lock("daily.2024-01-03", "someone else"):  # a live run holds that partition
            result = defs.resolve_job_def("ingest_daily").execute_in_process(
                tags=range_tags("2024-01-02", "2024-01-04"), instance=instance, raise_on_error=False
            )
        assert not result.success
        text = failure_text(result)
        assert "1 of 3 partitions failed (2024-01-03)" in text and "daily partition 2024-01-03:" in text
        assert "already being run" in text
        loaded = materializations(result, instance)  # the loaded ones are recorded, with their own figures
        assert set(loaded) == {"2024-01-02", "2024-01-04"}
        assert loaded["2024-01-04"]["dagster/partition_row_count"] == 48
        status = instance.get_status_by_partition(AssetKey("daily"), DAYS, defs.resolve_job_def("ingest_daily").partitions_def)
        assert status["2024-01-02"] == AssetPartitionStatus.MATERIALIZED
        assert status["2024-01-03"] == AssetPartitionStatus.FAILED
        for key in ("2024-01-02", "2024-01-04"):
            assert_same_rows(day_rows(tmp_path, key), partition_output(tmp_path, "daily", key))
        due = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert [r.partition_key for r in due] == ["2024-01-01", "2024-01-03", "2024-01-05"]
        again = {r.partition_key: r.run_key for r in due}
        assert again["2024-01-03"] == f"daily:2024-01-03:failed in run {result.run_id}"
        assert again["2024-01-01"] == "daily:2024-01-01:missing"  # the same key as before: not launched twice
        for key in ("2024-01-01", "2024-01-03", "2024-01-05"):
            assert defs.resolve_job_def("ingest_daily").execute_in_process(partition_key=key, instance=instance).success
        quiet = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(quiet, SkipReason) and "5 partitions" in quiet.skip_message
    for key in DAYS:
        assert_same_rows(day_rows(tmp_path, key), partition_output(tmp_path, "daily", key))


def test_an_interrupted_partition_resumes_from_its_own_checkpoint(shop, tmp_path):
    spec = load_spec(shop)
    daily = spec.resource("daily")
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    partition = resolve_partition(daily, "2024-01-02", store, lambda: open_source(daily.source))
    run = run_pipeline(daily, store, run_id="crashed", partition=partition)
    for event in run:  # the run stops after two committed batches, as a killed worker would
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    run.close()
    held = store.load("daily.2024-01-02")
    assert held is not None and held.records_processed == 20
    assert store.load("daily") is None and store.load("daily.2024-01-03") is None
    defs = build_definitions(shop)
    with DagsterInstance.ephemeral() as instance:
        other = defs.resolve_job_def("ingest_daily").execute_in_process(partition_key="2024-01-03", instance=instance)
        assert other.success and materializations(other)["2024-01-03"]["conduit/resumed"] is False
        assert store.load("daily.2024-01-02") is not None  # another partition's run leaves it alone
        result = defs.resolve_job_def("ingest_daily").execute_in_process(partition_key="2024-01-02", instance=instance)
    assert result.success
    meta = materializations(result)["2024-01-02"]
    assert meta["conduit/resumed"] is True and meta["conduit/resumed_from"] == str(held.last_value)
    assert meta["conduit/rows_this_run"] == 28 and meta["conduit/records_processed"] == 48
    assert meta["dagster/partition_row_count"] == 48
    assert_same_rows(day_rows(tmp_path, "2024-01-02"), partition_output(tmp_path, "daily", "2024-01-02"))
    assert store.load("daily.2024-01-02") is None


def test_row_count_check_per_partition_fails_when_a_partition_output_is_tampered_with(shop, tmp_path):
    defs = build_definitions(shop)
    with DagsterInstance.ephemeral() as instance:
        loaded = defs.resolve_job_def("ingest_daily").execute_in_process(
            tags=range_tags("2024-01-02", "2024-01-03"), instance=instance
        )
        assert loaded.success and all(e.passed for e in check_evaluations(loaded).values())
    part = next((tmp_path / "lake" / "daily" / "2024-01-03").glob("part-*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 5), part)  # 5 rows of that partition's first part lost

    # the check alone, on one partition, as the UI's "Execute check" runs it
    check_key = AssetCheckKey(AssetKey("daily"), "row_count_matches_source")
    check_only = defs.resolve_job_def("ingest_daily").get_subset(asset_selection=set(), asset_check_selection={check_key})

    def only_check(key: str):
        with DagsterInstance.ephemeral() as instance:
            result = check_only.execute_in_process(partition_key=key, instance=instance)
        assert not materializations(result)  # nothing was loaded
        (evaluation,) = check_evaluations(result).values()
        assert evaluation.partition == key
        return evaluation

    bad = only_check("2024-01-03")
    assert not bad.passed
    assert bad.metadata["conduit/source_rows"].value == 48 and bad.metadata["conduit/destination_rows"].value == 43
    assert "source 48 rows, destination 43 rows" in bad.description
    good = only_check("2024-01-02")
    assert good.passed and good.metadata["conduit/destination_rows"].value == 48
    never = only_check("2024-01-05")  # never loaded: no output to count
    assert not never.passed and "destination no output" in never.description


def test_store_switch_is_refused_per_partition_and_for_the_key_range_plan(shop, tmp_path):
    spec = load_spec(shop)
    first, second = tmp_path / "cps-a", tmp_path / "cps-b"
    defs = build_definitions(shop)
    daily = spec.resource("daily")
    store = LocalCheckpointStore(first)
    with DagsterInstance.ephemeral() as instance:

        def run(job: str, key: str, directory: Path, **tags: str):
            return defs.resolve_job_def(job).execute_in_process(
                partition_key=key,
                instance=instance,
                raise_on_error=False,
                run_config={"resources": {"checkpoints": {"config": {"directory": str(directory)}}}},
                tags=tags or None,
            )

        assert run("ingest_daily", "2024-01-01", first).success
        # a run of partition 2024-01-02 with the first store fails, leaving that partition's checkpoint there
        with store.lock("daily.2024-01-02", "someone else"):
            assert not run("ingest_daily", "2024-01-02", first).success
        partition = resolve_partition(daily, "2024-01-02", store, lambda: open_source(daily.source))
        crashed = run_pipeline(daily, store, run_id="crashed", partition=partition)
        for event in crashed:
            if isinstance(event, BatchCommitted):
                break
        crashed.close()
        # another partition, with nothing held anywhere, may use another store
        assert run("ingest_daily", "2024-01-03", second).success
        moved = run("ingest_daily", "2024-01-02", second)
        assert not moved.success
        text = failure_text(moved)
        assert f"daily partition 2024-01-02: the checkpoint of partition 2024-01-02 is in {first}" in text
        assert "daily.2024-01-02.json" in text and "Nothing was read or written" in text
        assert not (tmp_path / "lake" / "daily" / "2024-01-02").exists()
        resumed = run("ingest_daily", "2024-01-02", first)  # where its checkpoint is: it resumes
        assert resumed.success
        meta = materializations(resumed)["2024-01-02"]
        assert meta["conduit/resumed"] is True and meta["conduit/rows_this_run"] == 38
        # key ranges: every partition depends on the plan, which is in the first store
        assert run("ingest_ranged", "r00", first).success
        planless = run("ingest_ranged", "r01", second)
        assert not planless.success
        assert "its key-range plan is in" in failure_text(planless) and "ranged.plan.json" in failure_text(planless)
        assert not (second / "ranged.plan.json").exists()
        # the operator says the first store is gone on purpose: the run plans and starts over in the second
        assert run("ingest_ranged", "r01", second, **{"conduit/checkpoints_moved_from": str(first)}).success
        assert (second / "ranged.plan.json").exists()
    assert_same_rows(day_rows(tmp_path, "2024-01-02"), partition_output(tmp_path, "daily", "2024-01-02"))


# --- schedules and sensors --------------------------------------------------------------------------------------


def test_schedule_of_time_windows_runs_the_latest_complete_window(shop):
    defs = build_definitions(shop)
    schedule = next(s for s in defs.schedules if s.name == "daily_schedule")
    repo = defs.get_repository_def()
    assert schedule.cron_schedule == "0 4 * * *" and schedule.execution_timezone == "Europe/Berlin"
    with DagsterInstance.ephemeral() as instance:
        tick = dt.datetime(2024, 1, 4, 4, 0, tzinfo=BERLIN)
        request = schedule.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo, scheduled_execution_time=tick)
        )
        (run,) = request.run_requests
        assert run.partition_key == "2024-01-03"  # the 4th has not ended at 04:00 on the 4th
        early = dt.datetime(2024, 1, 1, 4, 0, tzinfo=BERLIN)
        none = schedule.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo, scheduled_execution_time=early)
        )
        assert not none.run_requests and "no day of daily has ended" in (none.skip_message or "")
        late = dt.datetime(2024, 3, 1, 4, 0, tzinfo=BERLIN)
        (last,) = schedule.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo, scheduled_execution_time=late)
        ).run_requests
        assert last.partition_key == "2024-01-05"  # the end of the partitions
        assert defs.resolve_job_def("ingest_daily").execute_in_process(partition_key=run.partition_key, instance=instance).success


def test_schedule_of_key_ranges_runs_every_range_once_per_tick(shop):
    defs = build_definitions(shop)
    schedule = next(s for s in defs.schedules if s.name == "ranged_schedule")
    repo = defs.get_repository_def()
    with DagsterInstance.ephemeral() as instance:
        tick = dt.datetime(2024, 2, 1, 5, 30, tzinfo=dt.UTC)
        runs = schedule.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo, scheduled_execution_time=tick)
        ).run_requests
        assert [r.partition_key for r in runs] == ["r00", "r01", "r02", "r03"]
        assert len({r.run_key for r in runs}) == 4 and all(tick.isoformat() in r.run_key for r in runs)
        later = tick + dt.timedelta(days=1)
        next_runs = schedule.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo, scheduled_execution_time=later)
        )
        assert not {r.run_key for r in runs} & {r.run_key for r in next_runs.run_requests}


def test_the_sensor_relaunches_a_failed_partition_once_not_at_every_tick(shop, tmp_path):
    defs = build_definitions(shop)
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    sensor = next(s for s in defs.sensors if s.name == "daily_sensor")
    job = defs.resolve_job_def("ingest_daily")
    with DagsterInstance.ephemeral() as instance:
        for key in DAYS:
            if key != "2024-01-03":
                assert job.execute_in_process(partition_key=key, instance=instance).success
        with store.lock("daily.2024-01-03", "someone else"):
            first = job.execute_in_process(partition_key="2024-01-03", instance=instance, raise_on_error=False)
            due = sensor(build_sensor_context(instance=instance, resources=defs.resources))
            assert [r.partition_key for r in due] == ["2024-01-03"]
            relaunch = due[0]
            assert relaunch.run_key == f"daily:2024-01-03:failed in run {first.run_id}"
            again = job.execute_in_process(
                partition_key="2024-01-03", instance=instance, raise_on_error=False, tags=relaunch.tags
            )
            assert not again.success
            quiet = sensor(build_sensor_context(instance=instance, resources=defs.resources))
            assert isinstance(quiet, SkipReason)  # its relaunch failed too: not launched again at every tick


def test_sensor_of_key_ranges_launches_missing_ranges(shop):
    defs = build_definitions(shop)
    sensor = next(s for s in defs.sensors if s.name == "ranged_sensor")
    with DagsterInstance.ephemeral() as instance:
        due = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert all(isinstance(r, RunRequest) for r in due) and [r.partition_key for r in due] == ["r00", "r01", "r02", "r03"]
        job = defs.resolve_job_def("ingest_ranged")
        assert job.execute_in_process(tags=range_tags("r01", "r02"), instance=instance).success
        due = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert [r.partition_key for r in due] == ["r00", "r03"]


def test_a_partitioned_job_run_without_a_partition_says_how_to_give_one(shop, tmp_path):
    defs = build_definitions(shop)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_daily").execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "daily is partitioned (daily windows on created" in text and "5 partitions, 2024-01-01 .. 2024-01-05" in text
    assert """dagster job execute -j ingest_daily --tags '{"dagster/partition": "2024-01-05"}'""" in text
    assert "conduit run --pipeline daily --partition 2024-01-05" in text
    assert not (tmp_path / "lake").exists()


def test_partitions_into_s3_with_checkpoints_in_s3(tmp_path, s3, s3_endpoint, bucket):
    """The S3 variant of the asset and of its check (they also take the `s3` resource): key ranges planned and
    kept in the S3 checkpoint store, each partition's output under <prefix>/<resource>/<key>/."""
    text = INGEST.replace(
        "  - name: lake\n    type: local\n    path: lake\n",
        f"  - name: lake\n    type: s3\n    bucket: {bucket}\n    prefix: raw\n    endpoint_url: {s3_endpoint}\n",
    )
    text = f"checkpoints:\n  type: s3\n  bucket: {bucket}\n  prefix: cps\n  endpoint_url: {s3_endpoint}\n" + text
    defs = build_definitions(make_shop(tmp_path, text))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_ranged").execute_in_process(tags=range_tags("r00", "r03"), instance=instance)
        assert result.success
        counts = {k: m["dagster/partition_row_count"] for k, m in materializations(result).items()}
        assert set(counts) == {"r00", "r01", "r02", "r03"} and sum(counts.values()) == 240
        assert all(materializations(result)[k]["conduit/checkpoint_store"] == f"s3://{bucket}/cps/" for k in counts)
        evaluations = check_evaluations(result)
        assert set(evaluations) == set(counts) and all(e.passed for e in evaluations.values())
        day = defs.resolve_job_def("ingest_daily").execute_in_process(partition_key="2024-01-05", instance=instance)
        assert day.success
    assert "cps/ranged.plan.json" in s3_keys(s3, bucket, "cps/")
    rows = [row for key in counts for row in s3_output_rows(s3, bucket, f"raw/ranged/{key}/")]
    assert_same_rows(source_rows(tmp_path), rows)
    assert_same_rows(day_rows(tmp_path, "2024-01-05"), s3_output_rows(s3, bucket, "raw/daily/2024-01-05/"))
    assert not [k for k in s3_keys(s3, bucket, "cps/") if k.endswith(".json") and not k.endswith(".plan.json")]
