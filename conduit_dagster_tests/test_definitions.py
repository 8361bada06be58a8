"""The Dagster side: one asset per resource with its jobs, run through dagster.materialize."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from conduit_dagster.assets import build_ingest_assets
from conduit_dagster.definitions import build_definitions, find_spec_path
from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.runner import run_pipeline
from conduit_dagster.engine.spec import load_spec
from conduit_dagster.resources import LocalCheckpointStoreResource
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

ROOT = Path(__file__).resolve().parents[1]

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
  - name: text
    type: local
    path: text
    format: csv
resources:
  - name: orders
    source: shop
    destination: lake
    batch_size: 100
    sensor: true
    description: All orders.
    query: SELECT id, amount, note FROM orders ORDER BY id
  - name: orders_csv
    source: shop
    destination: text
    resume: false
    schedule: {cron: "15 3 * * *", timezone: Europe/Berlin}
    retries: 2
    query: SELECT id, amount, note FROM orders
"""


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    db = tmp_path / "shop.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount REAL, note TEXT)")
    conn.executemany(
        "INSERT INTO orders VALUES (?, ?, ?)", [(i, i * 1.5, f'n,"{i}"\nx' if i % 3 else None) for i in range(1, 1001)]
    )
    conn.commit()
    conn.close()
    return write_ingest(tmp_path, INGEST)


def test_definitions_assets_and_jobs(shop):
    defs = build_definitions(shop)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {"orders", "orders_csv"}
    node = graph.get(AssetKey("orders"))
    assert node.group_name == "shop"
    assert "SELECT id, amount, note FROM orders" in (node.description or "")
    assert node.description.startswith("All orders.")
    assert {t.split("/")[-1] for t in node.tags if t.startswith("dagster/kind/")} == {"sqlite", "parquet"}
    csv_node = graph.get(AssetKey("orders_csv"))
    assert {t.split("/")[-1] for t in csv_node.tags if t.startswith("dagster/kind/")} == {"sqlite", "csv"}
    for job in ("ingest_orders", "ingest_orders_csv", "ingest_all"):
        assert defs.resolve_job_def(job) is not None


def test_schedules_retries_and_pools(shop):
    defs = build_definitions(shop)
    schedules = {s.name: s for s in defs.schedules or []}
    assert set(schedules) == {"orders_csv_schedule"}
    sched = schedules["orders_csv_schedule"]
    assert sched.cron_schedule == "15 3 * * *" and sched.execution_timezone == "Europe/Berlin"
    assert sched.job_name == "ingest_orders_csv"
    assert defs.resolve_job_def("ingest_orders_csv").tags.get("dagster/max_retries") == "2"
    assert "dagster/max_retries" not in defs.resolve_job_def("ingest_orders").tags
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey("orders")).pools == {"conduit_orders"}


def check_evaluations(result):
    return [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]


def test_row_count_check_runs_with_the_job_and_reports_both_numbers(shop, tmp_path):
    defs = build_definitions(shop)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_orders").execute_in_process(instance=instance)
        assert result.success
        (evaluation,) = check_evaluations(result)
        assert evaluation.check_name == "row_count_matches_source" and evaluation.passed
        assert evaluation.metadata["conduit/source_rows"].value == 1000
        assert evaluation.metadata["conduit/destination_rows"].value == 1000
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("DELETE FROM orders WHERE id > 900")
    conn.commit()
    conn.close()
    from dagster import AssetCheckKey, AssetSelection

    from conduit_dagster.assets import build_ingest_checks

    spec = load_spec(shop)
    with DagsterInstance.ephemeral() as instance:
        only_check = materialize(
            [*build_ingest_assets(spec), *build_ingest_checks(spec)],
            selection=AssetSelection.checks(AssetCheckKey(AssetKey("orders"), "row_count_matches_source")),
            instance=instance,
            resources={"checkpoints": LocalCheckpointStoreResource()},
        )
        (evaluation,) = check_evaluations(only_check)
        assert not evaluation.passed
        assert evaluation.metadata["conduit/source_rows"].value == 900
        assert evaluation.metadata["conduit/destination_rows"].value == 1000


def test_sensor_launches_only_for_rows_beyond_what_is_held(shop, tmp_path, monkeypatch):
    from dagster import RunRequest, SkipReason, build_sensor_context

    monkeypatch.setenv("CONDUIT_CHECKPOINT_DIR", str(tmp_path / "cps"))
    defs = build_definitions(shop)
    sensors = {s.name: s for s in defs.sensors or []}
    assert set(sensors) == {"orders_sensor"}
    orders_sensor = sensors["orders_sensor"]
    with DagsterInstance.ephemeral() as instance:
        first = orders_sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(first, RunRequest) and first.run_key == 'orders:{"type": "int", "value": "1000"}'
        assert defs.resolve_job_def("ingest_orders").execute_in_process(instance=instance).success
        quiet = orders_sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(quiet, SkipReason) and "no rows beyond id = 1000" in quiet.skip_message
        conn = sqlite3.connect(tmp_path / "shop.db")
        conn.execute("INSERT INTO orders VALUES (1001, 1.0, 'late')")
        conn.commit()
        conn.close()
        again = orders_sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(again, RunRequest) and again.run_key.endswith('"1001"}')
        # an unfinished run's checkpoint is what the pipeline holds: the sensor launches the run that resumes it
        store = LocalCheckpointStore(tmp_path / "cps")
        run = run_pipeline(load_spec(shop).resource("orders"), store, run_id="crashed")
        for event in run:
            if type(event).__name__ == "BatchCommitted":
                break
        run.close()
        assert store.load("orders").last_value == 100
        resume = orders_sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(resume, RunRequest)


def test_deploy_dagster_yaml_example_is_valid():
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(ROOT / "deploy"), "dagster.yaml")
    assert config["run_retries"]["enabled"] is True
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_materialize_reports_metadata_and_writes_rows(shop, tmp_path):
    spec = load_spec(shop)
    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            build_ingest_assets(spec),
            resources={"checkpoints": LocalCheckpointStoreResource(directory=str(tmp_path / "cps"))},
            instance=instance,
        )
    assert result.success
    mats = {m.asset_key.to_user_string(): m.metadata for m in result.asset_materializations_for_node("orders")}
    meta = {k: v.value for k, v in mats["orders"].items()}
    assert meta["dagster/row_count"] == 1000
    assert meta["conduit/rows_this_run"] == 1000
    assert meta["conduit/records_processed"] == 1000
    assert meta["conduit/resumed"] is False
    assert meta["conduit/last_value"] == "1000"
    assert meta["conduit/batches"] == 10
    assert meta["conduit/rows_per_second"] > 0
    assert meta["conduit/output"] == str(tmp_path / "lake" / "orders")
    conn = sqlite3.connect(tmp_path / "shop.db")
    source = list(conn.execute("SELECT id, amount, note FROM orders"))
    assert_same_rows(source, output_rows(tmp_path / "lake" / "orders"))
    assert_same_rows(source, output_rows(tmp_path / "text" / "orders_csv", "csv"))
    logs = [e.message for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert logs
    assert not list((tmp_path / "cps").glob("*.json"))


def test_checkpoint_location_precedence(tmp_path, monkeypatch):
    """resource config > $CONDUIT_CHECKPOINTS > $CONDUIT_CHECKPOINT_DIR > ingest.yml checkpoints: > .checkpoints/"""
    from conduit_dagster.engine.spec import load_spec_text
    from conduit_dagster.resources import S3CheckpointStoreResource, checkpoint_resource

    base = tmp_path / "project"
    plain = load_spec_text(INGEST, base / "ingest.yml")
    with_dir = load_spec_text(INGEST + "checkpoints:\n  directory: yml-cps\n", base / "ingest.yml")
    with_s3 = load_spec_text(INGEST + "checkpoints:\n  type: s3\n  bucket: yml-bucket\n  prefix: cp\n", base / "ingest.yml")
    for var in ("CONDUIT_CHECKPOINT_DIR", "CONDUIT_CHECKPOINTS"):
        monkeypatch.delenv(var, raising=False)
    assert LocalCheckpointStoreResource().open_store(plain).location == str(base / ".checkpoints")
    assert LocalCheckpointStoreResource().open_store(with_dir).location == str(base / "yml-cps")
    assert isinstance(checkpoint_resource(with_s3), S3CheckpointStoreResource)
    assert S3CheckpointStoreResource().open_store(with_s3).location == "s3://yml-bucket/cp/"
    monkeypatch.setenv("CONDUIT_CHECKPOINT_DIR", str(tmp_path / "env"))
    assert LocalCheckpointStoreResource().open_store(with_dir).location == str(tmp_path / "env")
    assert LocalCheckpointStoreResource(directory="cfg").open_store(with_dir).location == str(base / "cfg")
    monkeypatch.setenv("CONDUIT_CHECKPOINTS", "s3://env-bucket/some/prefix/")
    assert isinstance(checkpoint_resource(plain), S3CheckpointStoreResource)
    assert S3CheckpointStoreResource().open_store(with_s3).location == "s3://env-bucket/some/prefix/"
    assert S3CheckpointStoreResource(prefix="lp").open_store(with_s3).location == "s3://env-bucket/lp/"
    # `location` (the launchpad's one switch) overrides everything, and may change the kind of store
    assert LocalCheckpointStoreResource(location="s3://lp-bucket/lp").open_store(plain).location == "s3://lp-bucket/lp/"
    assert S3CheckpointStoreResource(location=str(tmp_path / "lp")).open_store(with_s3).location == str(tmp_path / "lp")
    assert S3CheckpointStoreResource(location="s3://b2/x", prefix="ignored").open_store(with_s3).location == "s3://b2/x/"
    monkeypatch.setenv("CONDUIT_CHECKPOINTS", str(tmp_path / "env2"))
    assert not isinstance(checkpoint_resource(with_s3), S3CheckpointStoreResource)
    assert LocalCheckpointStoreResource().open_store(with_s3).location == str(tmp_path / "env2")


def test_launchpad_config_overrides_checkpoint_directory(shop, tmp_path):
    """Run config (as the launchpad sends it) picks the checkpoint directory, checked while a run is cut short."""
    defs = build_definitions(shop)
    job = defs.resolve_job_def("ingest_orders")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config={"resources": {"checkpoints": {"config": {"directory": str(tmp_path / "from_launchpad")}}}},
            instance=instance,
        )
    assert result.success
    # the run finished so the checkpoint is gone, but the directory was created by its saves
    assert (tmp_path / "from_launchpad").is_dir()


def test_find_spec_path_env_and_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDUIT_INGEST_FILE", str(tmp_path / "other.yml"))
    assert find_spec_path() == (tmp_path / "other.yml").resolve()
    monkeypatch.delenv("CONDUIT_INGEST_FILE")
    (tmp_path / "workspace.yaml").write_text("load_from: []\n")
    (tmp_path / "sub").mkdir()
    assert find_spec_path(tmp_path / "sub") == tmp_path.resolve() / "ingest.yml"


def test_root_ingest_yml_is_valid_and_definitions_load():
    env = {k: v for k, v in os.environ.items() if k != "CONDUIT_INGEST_FILE"}
    code = "from conduit_dagster.definitions import defs; print(sorted(j.name for j in defs.jobs))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == ["ingest_all", "ingest_customers", "ingest_orders"]
