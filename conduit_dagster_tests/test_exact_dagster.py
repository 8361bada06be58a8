"""The Dagster path, attacked: the checkpoints resource's `location` switched between runs, the row count a
materialization reports, and `location` values that would silently pick another store or echo a secret."""

import sqlite3
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from conduit_dagster.definitions import build_definitions
from conduit_dagster.resources import LocalCheckpointStoreResource
from conduit_dagster_tests.conftest import s3_keys, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

INCREMENTAL = """
sources:
  - {name: shop, type: sqlite, path: shop.db}
destinations:
  - {name: lake, type: local, path: lake}
resources:
  - name: orders
    source: shop
    destination: lake
    batch_size: 30
    incremental_column: id
    initial_value: 0
    query: SELECT id, v FROM orders WHERE id >= :last_value
"""


def _shop(tmp_path: Path, ids: range) -> Path:
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"v{i}") for i in ids])
    conn.commit()
    conn.close()
    return tmp_path / "shop.db"


def _source(tmp_path: Path) -> list[tuple]:
    conn = sqlite3.connect(tmp_path / "shop.db")
    try:
        return list(conn.execute("SELECT id, v FROM orders"))
    finally:
        conn.close()


def _run(defs, instance: DagsterInstance, checkpoints: LocalCheckpointStoreResource, **kwargs):
    return materialize(
        list(defs.assets),
        instance=instance,
        resources={"checkpoints": checkpoints},
        selection="orders",
        raise_on_error=False,
        **kwargs,
    )


def _failure(result) -> str:
    return "\n".join(e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE")


@pytest.mark.parametrize("direction", ["local_then_s3", "s3_then_local"])
def test_checkpoint_location_switched_between_runs_loads_no_row_twice(tmp_path, s3_endpoint, bucket, monkeypatch, direction):
    """An incremental load keeps its state in the checkpoint store. A run pointed at another store (the launchpad's
    `location`, or a schedule's default after a launchpad run) found no state there and loaded everything again from
    initial_value: every row twice. It must stop, name both stores, and write nothing."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    _shop(tmp_path, range(1, 101))
    defs = build_definitions(write_ingest(tmp_path, INCREMENTAL))
    instance = DagsterInstance.ephemeral()
    on_s3 = LocalCheckpointStoreResource(location=f"s3://{bucket}/cp")
    default = LocalCheckpointStoreResource()
    first, second = (default, on_s3) if direction == "local_then_s3" else (on_s3, default)

    assert _run(defs, instance, first).success
    _shop(tmp_path, range(101, 111))
    refused = _run(defs, instance, second)

    assert not refused.success
    message = _failure(refused)
    assert "its incremental state is in" in message and "load rows twice" in message
    assert (f"s3://{bucket}/cp" in message) and (str(tmp_path / ".checkpoints") in message)
    assert "Nothing was read or written" in message
    assert len(output_rows(tmp_path / "lake" / "orders")) == 100  # untouched
    # the same store again: the 10 new rows, once
    assert _run(defs, instance, first).success
    assert_same_rows(_source(tmp_path), output_rows(tmp_path / "lake" / "orders"))


def test_moving_the_state_to_the_new_store_is_accepted(tmp_path):
    """Copying the pipeline's state into the new store (what the refusal says to do) lets the run resume there."""
    _shop(tmp_path, range(1, 101))
    defs = build_definitions(write_ingest(tmp_path, INCREMENTAL))
    instance = DagsterInstance.ephemeral()
    assert _run(defs, instance, LocalCheckpointStoreResource()).success
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (tmp_path / ".checkpoints").glob("orders.*"):
        (moved / f.name).write_bytes(f.read_bytes())
    _shop(tmp_path, range(101, 111))
    assert _run(defs, instance, LocalCheckpointStoreResource(location=str(moved))).success
    assert_same_rows(_source(tmp_path), output_rows(tmp_path / "lake" / "orders"))


def test_incremental_row_count_is_the_rows_in_the_output(tmp_path):
    """dagster/row_count is documented as the rows in the output; an incremental run reported only its own rows
    (10, while the output held 110)."""
    _shop(tmp_path, range(1, 101))
    defs = build_definitions(write_ingest(tmp_path, INCREMENTAL))
    instance = DagsterInstance.ephemeral()
    assert _run(defs, instance, LocalCheckpointStoreResource()).success
    _shop(tmp_path, range(101, 111))
    assert _run(defs, instance, LocalCheckpointStoreResource()).success

    metadata = instance.get_latest_materialization_event(AssetKey("orders")).asset_materialization.metadata
    assert len(output_rows(tmp_path / "lake" / "orders")) == 110
    assert metadata["dagster/row_count"].value == 110
    assert metadata["conduit/rows_this_run"].value == 10


@pytest.mark.parametrize(
    ("location", "shown"),
    [("S3://ops-bucket/cp", "'S3://ops-bucket/cp'"), ("s3:/ops-bucket/cp", "'s3:/ops-bucket/cp'"), ("gs://b/cp", "'gs://b/cp'")],
)
def test_location_that_is_no_directory_nor_s3_url_is_refused(tmp_path, location, shown):
    """`S3://...` or `s3:/...` typed in the launchpad was taken as a relative directory ("S3:/ops-bucket/cp" beside
    ingest.yml): an empty store, so the run started over instead of resuming."""
    _shop(tmp_path, range(1, 11))
    defs = build_definitions(write_ingest(tmp_path, INCREMENTAL))
    result = _run(defs, DagsterInstance.ephemeral(), LocalCheckpointStoreResource(location=location))
    assert not result.success
    message = _failure(result)
    assert f"`location`: {shown} is neither a directory nor an s3:// URL" in message
    assert "write s3://bucket/prefix" in message
    assert not (tmp_path / (location.split(":")[0] + ":")).exists()
    assert not (tmp_path / "lake").exists()


def test_location_with_credentials_is_refused_without_echoing_them(tmp_path, s3_endpoint, s3, bucket, monkeypatch):
    """`s3://KEY:SECRET@bucket/prefix` named a bucket "KEY:SECRET@bucket": the secret went into error messages and
    the materialization's conduit/checkpoint_store. It is refused, and the value is not shown."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    _shop(tmp_path, range(1, 11))
    defs = build_definitions(write_ingest(tmp_path, INCREMENTAL))
    instance = DagsterInstance.ephemeral()
    result = _run(defs, instance, LocalCheckpointStoreResource(location=f"s3://AKIAXXXX:hunter2secret@{bucket}/cp"))
    assert not result.success
    message = _failure(result)
    assert "does not name a valid S3 bucket" in message
    logs = "\n".join(str(e.message) for e in instance.all_logs(result.run_id))
    assert "hunter2secret" not in message and "hunter2secret" not in logs
    assert s3_keys(s3, bucket) == []


FILES_TO_PG = """
sources:
  - {{name: landed, type: file, path: data/*.csv, resume: true, checkpoint_column: id}}
destinations:
  - {{name: wh, type: postgresql, database: test, user: postgres, schema: {schema}, mode: append}}
resources:
  - {{name: orders, source: landed, destination: wh, batch_size: 30}}
"""


def test_failed_append_run_resumed_with_another_store_is_refused(
    tmp_path, pg_schema, postgres_dsn, s3_endpoint, bucket, monkeypatch
):
    """An append run fails mid-way (a file out of order) with its checkpoint in S3 (the launchpad's `location`); the
    next launch (a schedule, a retry with the default store) found no checkpoint locally and appended every committed
    batch again. It must stop and point at the S3 checkpoint; resumed there, the table holds each row once."""
    from conduit_dagster_tests.helpers import pg_rows

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("id,v\n" + "".join(f"{i},v{i}\n" for i in range(1, 101)))
    (data / "b.csv").write_text("id,v\n" + "".join(f"{i},v{i}\n" for i in range(50, 61)))  # goes back: the run stops
    defs = build_definitions(write_ingest(tmp_path, FILES_TO_PG.format(schema=pg_schema)))
    instance = DagsterInstance.ephemeral()
    on_s3 = LocalCheckpointStoreResource(location=f"s3://{bucket}/cp")

    failed = _run(defs, instance, on_s3)
    assert not failed.success and "b.csv" in _failure(failed)
    committed = pg_rows(postgres_dsn, f"SELECT id, v FROM {pg_schema}.orders")
    assert committed  # some batches are in the table
    (data / "b.csv").write_text("id,v\n" + "".join(f"{i},v{i}\n" for i in range(101, 111)))

    refused = _run(defs, instance, LocalCheckpointStoreResource())
    assert not refused.success
    message = _failure(refused)
    assert f"the checkpoint of its unfinished run is in s3://{bucket}/cp/" in message
    assert "Nothing was read or written" in message
    assert pg_rows(postgres_dsn, f"SELECT id, v FROM {pg_schema}.orders") == committed

    assert _run(defs, instance, on_s3).success
    assert_same_rows(
        [(i, f"v{i}") for i in [*range(1, 101), *range(101, 111)]],
        pg_rows(postgres_dsn, f"SELECT id, v FROM {pg_schema}.orders"),
    )
