"""Two runs of one pipeline at once: the second fails naming the holder; nothing is written twice."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.errors import PipelineBusyError
from conduit_dagster.engine.runner import RunStarted, run_pipeline
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, pg_rows
from conduit_dagster_tests.test_postgres_resume import ingest_text, make_table, source_rows
from conduit_dagster_tests.test_runner import SCHEMA, resource, tie_rows


def test_second_run_of_a_pipeline_is_refused_while_the_first_holds_it(tmp_path):
    store = LocalCheckpointStore(tmp_path / "cp")
    res = resource(tmp_path)
    first = run_pipeline(res, store, run_id="run-one", source=MemorySource(tie_rows(50), SCHEMA))
    assert isinstance(next(first), RunStarted)
    with pytest.raises(PipelineBusyError, match=r"already being run \(.*\"run_id\": \"run-one\".*a run that died releases"):
        list(run_pipeline(res, store, run_id="run-two", source=MemorySource(tie_rows(50), SCHEMA)))
    list(first)  # the first finishes untouched
    assert_same_rows([tuple(r.values()) for r in tie_rows(50)], output_rows(tmp_path / "out" / "things"))
    list(run_pipeline(res, store, run_id="run-three", source=MemorySource(tie_rows(50), SCHEMA)))  # and the lock is free


def test_clear_checkpoints_refuses_while_a_run_holds_the_pipeline(tmp_path):
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    res = resource(tmp_path)
    run = run_pipeline(res, store, run_id="live", source=MemorySource(tie_rows(50), SCHEMA))
    next(run)
    next(run)  # the first batch is committed and checkpointed
    conduit = str(Path(sys.executable).with_name("conduit"))
    out = subprocess.run([conduit, "clear-checkpoints", "--dir", str(tmp_path / ".checkpoints")], capture_output=True, text=True)
    assert out.returncode == 1 and "already being run" in out.stderr
    assert store.load("things") is not None
    run.close()


def test_two_dagster_job_executes_at_once(tmp_path, pg, pg_schema, postgres_dsn):
    # long enough (about 2,400 batches, well over Dagster's start-up) that the first run still holds the
    # pipeline when the second one's asset starts
    make_table(pg, pg_schema, rows=600_000)
    ingest = write_ingest(tmp_path, ingest_text(pg_schema, "id", 250))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = dict(os.environ, CONDUIT_INGEST_FILE=str(ingest), CONDUIT_CHECKPOINT_DIR=str(tmp_path / "cp"), DAGSTER_HOME=str(home))
    subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "instance", "migrate"], env=env, check=True, capture_output=True
    )
    cmd = [
        str(Path(sys.executable).with_name("dagster")),
        "job",
        "execute",
        "-m",
        "conduit_dagster.definitions",
        "-j",
        "ingest_events",
    ]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = subprocess.Popen(cmd, env=env, stdout=logs[0].open("wb"), stderr=subprocess.STDOUT)
    cp = tmp_path / "cp" / "events.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        try:
            if json.loads(cp.read_text())["batches_committed"] >= 1:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    holder = json.loads(cp.read_text())["run_id"]
    second = subprocess.run(cmd, env=env, stdout=logs[1].open("wb"), stderr=subprocess.STDOUT, timeout=300)
    assert first.wait(timeout=300) == 0, logs[0].read_text()[-3000:]
    assert second.returncode == 1
    text = logs[1].read_text()
    assert "pipeline 'events' is already being run" in text and holder in text
    assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(tmp_path / "out" / "events"))
    assert pg_rows(postgres_dsn, "SELECT 1") == [(1,)]
