"""Integration on the real PostgreSQL: fail mid-run, resume, and the destination holds exactly the
source rows (as a multiset), with the checkpoint gone.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, ReexecutionOptions, build_reconstructable_job, execute_job, instance_for_test

from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, pg_rows

ROWS = 12_000
BATCH = 500

# ts repeats: group k (k = floor(sqrt(id))) holds about 2k rows, up to ~220: many groups straddle
# and several exceed the batch size of 150 used with ties.
CREATE = """
CREATE TABLE {schema}.events (
    id bigint PRIMARY KEY,
    ts timestamptz NOT NULL,
    kind text NOT NULL,
    amount numeric(12, 2),
    payload jsonb,
    note text
);
INSERT INTO {schema}.events
SELECT g,
       timestamptz '2025-03-01 00:00:00+00' + floor(sqrt(g)) * interval '1 minute' + interval '0.000123 second',
       (ARRAY['click', 'view', 'buy'])[1 + g % 3],
       CASE WHEN g % 11 = 0 THEN NULL ELSE round((g * 1.37)::numeric, 2) END,
       jsonb_build_object('n', g, 'tag', 'x,"y"'),
       CASE WHEN g % 7 = 0 THEN E'line one\\nline "two", with commas' END
FROM generate_series(1, {rows}) AS g;
"""

COLUMNS = "id, ts, kind, amount, payload::text AS payload, note"


def make_table(pg, schema: str, rows: int = ROWS) -> None:
    with pg.cursor() as cur:
        cur.execute(CREATE.format(schema=schema, rows=rows))


def ingest_text(schema: str, column: str, batch: int, fmt: str = "parquet") -> str:
    return f"""
sources:
  - name: pg
    type: postgresql
    host: 127.0.0.1
    port: 5432
    database: test
    user: postgres
    schema: {schema}
    resume: true
    checkpoint_column: id
destinations:
  - name: out
    type: local
    path: out
    format: {fmt}
resources:
  - name: events
    source: pg
    destination: out
    checkpoint_column: {column}
    batch_size: {batch}
    query: |
      -- the events, with their payload as text
      SELECT {COLUMNS}
      FROM events
      ORDER BY id DESC;
"""


def source_rows(dsn: str, schema: str) -> list[tuple]:
    return pg_rows(dsn, f"SELECT {COLUMNS} FROM {schema}.events")


def latest_metadata(instance: DagsterInstance, asset: str = "events") -> dict:
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey(asset))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.mark.parametrize("column,batch", [("id", BATCH), ("ts", 150)])
def test_reexecute_from_failure_resumes_exactly(tmp_path, pg, pg_schema, postgres_dsn, column, batch):
    make_table(pg, pg_schema)
    ingest = write_ingest(tmp_path, ingest_text(pg_schema, column, batch))
    checkpoints = tmp_path / "checkpoints"
    flag = tmp_path / "fail.flag"
    fail_at = 7
    job = build_reconstructable_job(
        "conduit_dagster_tests.injected_defs",
        "build_job",
        reconstructable_args=(str(ingest), str(checkpoints), fail_at, str(flag), "ingest_events"),
    )
    out = tmp_path / "out" / "events"
    with instance_for_test() as instance:
        # 1. A complete first load: the previous output that readers must keep seeing.
        first = execute_job(job, instance=instance)
        assert first.success
        old_rows = source_rows(postgres_dsn, pg_schema)
        assert_same_rows(old_rows, output_rows(out))
        assert not (checkpoints / "events.json").exists()

        # 2. The source changes; the next load fails after 6 committed batches.
        with pg.cursor() as cur:
            cur.execute(f"DELETE FROM {pg_schema}.events WHERE id % 5 = 0")
            cur.execute(f"UPDATE {pg_schema}.events SET kind = 'changed' WHERE id % 3 = 0")
        flag.touch()
        failed = execute_job(job, instance=instance, raise_on_error=False)
        assert not failed.success
        doc = json.loads((checkpoints / "events.json").read_text())
        assert doc["pipeline"] == "events"
        assert doc["checkpoint_column"] == column
        assert doc["batches_committed"] == fail_at - 2  # save 1 is the checkpoint taken before the first batch
        assert doc["run_id"] == failed.run_id
        assert doc["last_value"]["type"] == ("int" if column == "id" else "datetime")
        # Readers still see the previous complete output, not a mix.
        assert_same_rows(old_rows, output_rows(out))

        # 3. Re-execute from failure through Dagster's API: it resumes from the checkpoint.
        flag.unlink()
        options = ReexecutionOptions.from_failure(failed.run_id, instance)
        resumed = execute_job(job, instance=instance, reexecution_options=options)
        assert resumed.success
        assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(out))
        assert not (checkpoints / "events.json").exists()
        meta = latest_metadata(instance)
        assert meta["conduit/resumed"] is True
        assert meta["conduit/records_processed"] == meta["dagster/row_count"] == len(source_rows(postgres_dsn, pg_schema))
        assert meta["conduit/rows_this_run"] == meta["dagster/row_count"] - doc["records_processed"]
        assert meta["conduit/resumed_from"] != ""


def _dagster_env(tmp_path: Path, ingest: Path, checkpoints: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = dict(os.environ)
    env.update(
        CONDUIT_INGEST_FILE=str(ingest),
        CONDUIT_CHECKPOINT_DIR=str(checkpoints),
        DAGSTER_HOME=str(home),
        PYTHONUNBUFFERED="1",
    )
    return env


def _job_execute(env: dict[str, str], log: Path) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.Popen(
        [str(dagster), "job", "execute", "-m", "conduit_dagster.definitions", "-j", "ingest_events"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.parametrize("column,batch", [("id", 300), ("ts", 150)])
def test_sigkill_at_a_random_batch_then_run_again(tmp_path, pg, pg_schema, postgres_dsn, column, batch):
    make_table(pg, pg_schema, rows=40_000)
    ingest = write_ingest(tmp_path, ingest_text(pg_schema, column, batch))
    checkpoints = tmp_path / "checkpoints"
    env = _dagster_env(tmp_path, ingest, checkpoints)
    log = tmp_path / "runs.log"
    rng = random.Random()
    target = rng.randint(2, 40)
    extra_delay = rng.uniform(0, 0.05)
    proc = _job_execute(env, log)
    cp_file = checkpoints / "events.json"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = json.loads(cp_file.read_text())["batches_committed"]
        except (FileNotFoundError, ValueError, KeyError):
            committed = 0
        if committed >= target:
            time.sleep(extra_delay)
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the step runs in a child process
            killed_at = committed
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert killed_at is not None, f"the run ended before batch {target}: {log.read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert cp_file.exists()
    assert not (tmp_path / "out" / "events").exists(), "nothing may be visible before the run finishes"

    again = _job_execute(env, log)
    assert again.wait(timeout=300) == 0, log.read_text()[-5000:]
    assert "resuming after" in log.read_text()
    assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(tmp_path / "out" / "events"))
    assert not cp_file.exists()
