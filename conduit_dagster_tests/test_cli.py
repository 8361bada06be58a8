"""The way out named in checkpoint errors works: `conduit clear-checkpoints --pipeline-name X`."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.errors import CheckpointError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.spec import load_spec
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import output_rows

CONDUIT = str(Path(sys.executable).with_name("conduit"))

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
    batch_size: 10
    query: SELECT id FROM orders
"""


def conduit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CONDUIT, *args], cwd=cwd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})


def test_cli_lists_and_clears_a_damaged_checkpoint(tmp_path):
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.executemany("INSERT INTO orders VALUES (?)", [(i,) for i in range(1, 51)])
    conn.commit()
    conn.close()
    spec = load_spec(write_ingest(tmp_path, INGEST))
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    run = run_pipeline(spec.resources[0], store, run_id="run-a")
    for event in run:  # stop after three committed batches, as a crash would
        if getattr(event, "index", None) == 2:
            break
    run.close()

    listed = conduit("checkpoints", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("orders"))
    assert line.split()[:5] == ["orders", "id", "30", "int", "30"] and "run-a" in line

    (tmp_path / ".checkpoints" / "orders.json").write_text('{"format_version": 1, "pipe')
    with pytest.raises(CheckpointError) as info:
        list(run_pipeline(spec.resources[0], store, run_id="run-b"))
    assert "conduit clear-checkpoints --pipeline-name orders" in str(info.value)

    cleared = conduit("clear-checkpoints", "--pipeline-name", "orders", cwd=tmp_path)
    assert cleared.returncode == 0 and "cleared orders" in cleared.stdout
    assert not (tmp_path / ".checkpoints" / "orders.json").exists()
    events = list(run_pipeline(spec.resources[0], store, run_id="run-c"))
    assert isinstance(events[-1], RunFinished) and not events[0].resumed
    assert sorted(r[0] for r in output_rows(tmp_path / "lake" / "orders")) == list(range(1, 51))
    assert "no checkpoints" in conduit("checkpoints", cwd=tmp_path).stdout


def test_validate_reports_connections_queries_and_plan_without_secrets(tmp_path, postgres_dsn, monkeypatch):
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.commit()
    conn.close()
    secret = "Val1date-S3cret"
    text = INGEST.replace(
        "destinations:",
        f"""  - name: down
    type: postgresql
    host: 127.0.0.1
    port: 1
    database: test
    user: postgres
    password: {secret}
  - name: pg
    type: postgresql
    url: postgresql://postgres:{secret}@127.0.0.1:5432/test
destinations:""",
    )
    text += """  - name: broken
    source: shop
    destination: lake
    checkpoint_column: nope
    resume: true
    query: SELECT id FROM orders
  - name: remote
    source: down
    destination: lake
    query: SELECT 1 AS id
  - name: fine_pg
    source: pg
    destination: lake
    schedule: "0 3 * * *"
    query: SELECT 1 AS id
"""
    write_ingest(tmp_path, text)
    out = conduit("validate", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout
    assert "source shop: ok" in lines and "source pg: ok, postgresql://127.0.0.1:5432/test" in lines
    assert "source down: FAILED: source 'down': cannot connect to PostgreSQL at postgresql://127.0.0.1:1/test" in lines
    assert "resource orders: ok, shop -> lake, 1 columns, batches of 10, full refresh, checkpointed on id" in lines
    assert "resource broken: FAILED: source 'shop': checkpoint_column 'nope' is not a column" in lines
    assert "resource fine_pg: ok" in lines and "schedule 0 3 * * *" in lines
    assert "resource remote: source unavailable" in lines
    assert "2 problem(s)" in lines
    assert secret not in out.stdout + out.stderr


def test_validate_bad_file_is_one_clear_line(tmp_path):
    write_ingest(tmp_path, INGEST.replace("batch_size: 10", "batch_size: ten"))
    out = conduit("validate", cwd=tmp_path)
    assert out.returncode == 1
    assert "resources[0].batch_size: expected a whole number, got 'ten'" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_materializes_through_dagster_records_the_run_and_fails_clearly(tmp_path):
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.executemany("INSERT INTO orders VALUES (?)", [(i,) for i in range(1, 101)])
    conn.commit()
    conn.close()
    write_ingest(tmp_path, INGEST)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"PATH": "/usr/bin:/bin", "DAGSTER_HOME": str(home)}
    run = subprocess.run([CONDUIT, "run"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "orders: 100 rows this run (100 in total)" in run.stdout and ": success" in run.stdout
    assert sorted(r[0] for r in output_rows(tmp_path / "lake" / "orders")) == list(range(1, 101))
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_runs()) == 1, "the run shows in the Dagster UI of this DAGSTER_HOME"

    (tmp_path / ".checkpoints").mkdir(exist_ok=True)
    (tmp_path / ".checkpoints" / "orders.json").write_text("{truncated")
    failed = subprocess.run([CONDUIT, "run", "--pipeline", "orders"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    assert "orders: FAILED" in failed.stderr and "conduit clear-checkpoints --pipeline-name orders" in failed.stderr


def test_cli_lists_validates_and_clears_s3_checkpoints(tmp_path, s3, s3_endpoint, bucket):
    """ingest.yml keeps checkpoints in S3: the commands find them there, with the AWS environment only."""
    import os

    from conduit_dagster.engine.stores import checkpoint_settings, open_checkpoint_store

    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.executemany("INSERT INTO orders VALUES (?)", [(i,) for i in range(1, 51)])
    conn.commit()
    conn.close()
    text = f"checkpoints:\n  type: s3\n  bucket: {bucket}\n  prefix: cps\n  endpoint_url: {s3_endpoint}\n" + INGEST
    spec = load_spec(write_ingest(tmp_path, text))
    store = open_checkpoint_store(checkpoint_settings(spec.checkpoints, env={}), spec.base_dir)
    run = run_pipeline(spec.resource("orders"), store, run_id="crashed-run")
    for event in run:
        if type(event).__name__ == "BatchCommitted" and event.index == 1:
            break
    run.close()  # the run stops after its second batch: its checkpoint stays, its lease is released
    assert [k for k in s3.list_objects_v2(Bucket=bucket)["Contents"]] and store.load("orders") is not None

    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": "/usr/bin:/bin",
            **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
        }
        return subprocess.run([CONDUIT, *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    listed = cli("checkpoints")
    assert listed.returncode == 0, listed.stderr
    assert "orders" in listed.stdout and "crashed-run" in listed.stdout and "20" in listed.stdout
    assert f"s3://{bucket}/cps/" in listed.stdout
    checked = cli("validate")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"checkpoints: ok, s3://{bucket}/cps/ (1 unfinished run(s))" in checked.stdout
    assert "resumes after id = 20" in checked.stdout
    cleared = cli("clear-checkpoints", "--pipeline-name", "orders")
    assert cleared.returncode == 0 and "cleared orders" in cleared.stdout, cleared.stdout + cleared.stderr
    assert store.load("orders") is None
    assert s3.list_objects_v2(Bucket=bucket, Prefix="cps/").get("KeyCount") == 0  # no lease left by the command
    assert "no checkpoints in s3://" in cli("checkpoints", "--dir", f"s3://{bucket}/cps").stdout


def test_cli_names_a_missing_destination_bucket(tmp_path, s3_endpoint):
    import os

    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.executemany("INSERT INTO orders VALUES (?)", [(i,) for i in range(1, 11)])
    conn.commit()
    conn.close()
    text = INGEST.replace(
        "    type: local\n    path: lake\n", f"    type: s3\n    bucket: no-such-bucket-x\n    endpoint_url: {s3_endpoint}\n"
    )
    assert "no-such-bucket-x" in text
    write_ingest(tmp_path, text)
    env = {
        "PATH": "/usr/bin:/bin",
        **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
    }
    checked = subprocess.run([CONDUIT, "validate"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert checked.returncode == 1
    assert "destination lake: FAILED: destination 'lake': bucket 'no-such-bucket-x'" in checked.stdout, checked.stdout
    assert "does not exist; create it or fix `bucket`" in checked.stdout
    ran = subprocess.run([CONDUIT, "run"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert ran.returncode == 1
    assert "orders: FAILED: destination 'lake':" in ran.stderr and "does not exist" in ran.stderr, ran.stderr[-2000:]
    assert "dagster._core" not in [line for line in ran.stderr.splitlines() if "FAILED" in line][0]
