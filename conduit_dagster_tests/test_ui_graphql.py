"""The UI path, the way users take it: dagster-webserver and dagster-daemon on 127.0.0.1, a run
launched through GraphQL fails midway (a fault injected by the test), and

- a person re-executes it from failure with the mutation the UI's button sends, or
- the daemon retries it with no human (run retries, `retries:` in ingest.yml),

and the destination holds exactly the source rows. Every process started is stopped by its PID.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows
from conduit_dagster_tests.test_postgres_resume import ingest_text, make_table, source_rows

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = "conduit_dagster_tests.ui_defs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dagster:
    def __init__(self, tmp: Path, ingest: Path, retries: bool) -> None:
        self.home = tmp / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(
            "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
            + ("run_retries:\n  enabled: true\n  retry_on_asset_or_op_failure: true\n" if retries else "")
        )
        (tmp / "workspace.yaml").write_text(
            f"load_from:\n  - python_module:\n      module_name: {LOCATION}\n      working_directory: {ROOT}\n"
        )
        self.flag = tmp / "fail.flag"
        self.checkpoints = tmp / "checkpoints"
        self.env = dict(
            os.environ,
            DAGSTER_HOME=str(self.home),
            CONDUIT_INGEST_FILE=str(ingest),
            CONDUIT_CHECKPOINT_DIR=str(self.checkpoints),
            CONDUIT_TEST_FAIL_FLAG=str(self.flag),
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/graphql"
        self.logs = tmp
        self.procs: list[subprocess.Popen] = []
        workspace = str(tmp / "workspace.yaml")
        # A brand-new SQLite DAGSTER_HOME migrated by the webserver, the daemon and the code server at once can fail
        # ("alembic_version already exists"): create its storage first, alone.
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=self.env, cwd=tmp, check=True, capture_output=True)
        self._start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port), "-w", workspace])
        self._start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", workspace])

    def _start(self, name: str, cmd: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, cwd=self.logs, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def gql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our own server on 127.0.0.1
            doc = json.loads(resp.read())
        assert "errors" not in doc, doc
        return doc["data"]

    def wait_for_location(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.gql(
                    "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }"
                )
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                    return
                if entries and entries[0]["locationOrLoadError"]["__typename"] == "PythonError":
                    raise AssertionError(f"code location failed to load: {entries}")
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(
            "the webserver did not load the code location:\n" + (self.logs / "webserver.log").read_text()[-3000:]
        )

    def launch(self, job: str) -> str:
        data = self.gql(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            {"params": {"selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "jobName": job}}},
        )
        assert data["launchRun"]["__typename"] == "LaunchRunSuccess", data
        return data["launchRun"]["run"]["runId"]

    def reexecute_from_failure(self, run_id: str) -> str:
        data = self.gql(
            """mutation($params: ReexecutionParams!) { launchPipelineReexecution(reexecutionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            {"params": {"parentRunId": run_id, "strategy": "FROM_FAILURE"}},
        )
        assert data["launchPipelineReexecution"]["__typename"] == "LaunchRunSuccess", data
        return data["launchPipelineReexecution"]["run"]["runId"]

    def status(self, run_id: str) -> str:
        data = self.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})
        return data["runOrError"]["status"]

    def wait(self, run_id: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(1)
        raise AssertionError(f"run {run_id} did not finish:\n" + (self.logs / "daemon.log").read_text()[-3000:])

    def runs(self) -> list[dict]:
        data = self.gql("{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
        return data["runsOrError"]["results"]


@pytest.fixture
def dagster_ui(tmp_path, pg, pg_schema, request):
    make_table(pg, pg_schema, rows=20_000)
    text = ingest_text(pg_schema, "ts", 500)
    if request.param:
        text = text.replace("    batch_size: 500\n", "    batch_size: 500\n    retries: 2\n")
    ingest = write_ingest(tmp_path, text)
    ui = Dagster(tmp_path, ingest, retries=request.param)
    try:
        ui.wait_for_location()
        yield ui
    finally:
        ui.stop()


@pytest.mark.parametrize("dagster_ui", [False], indirect=True)
def test_ui_reexecute_from_failure_resumes_exactly(dagster_ui, tmp_path, pg_schema, postgres_dsn):
    ui = dagster_ui
    ui.flag.touch()
    failed = ui.launch("ingest_events")
    assert ui.wait(failed) == "FAILURE"
    checkpoint = json.loads((ui.checkpoints / "events.json").read_text())
    assert checkpoint["run_id"] == failed and checkpoint["batches_committed"] >= 1
    assert not (tmp_path / "out" / "events").exists()
    again = ui.reexecute_from_failure(failed)
    assert ui.wait(again) == "SUCCESS"
    assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(tmp_path / "out" / "events"))
    assert not (ui.checkpoints / "events.json").exists()
    tags = {t["key"]: t["value"] for r in ui.runs() if r["runId"] == again for t in r["tags"]}
    assert tags.get("dagster/parent_run_id") == failed


@pytest.mark.parametrize("dagster_ui", [True], indirect=True)
def test_ui_daemon_retry_resumes_exactly(dagster_ui, tmp_path, pg_schema, postgres_dsn):
    ui = dagster_ui
    ui.flag.touch()
    first = ui.launch("ingest_events")
    assert ui.wait(first) == "FAILURE"
    deadline = time.monotonic() + 120
    retry = None
    while time.monotonic() < deadline and retry is None:
        for run in ui.runs():
            tags = {t["key"]: t["value"] for t in run["tags"]}
            if tags.get("dagster/parent_run_id") == first and tags.get("dagster/retry_number") == "1":
                retry = run["runId"]
        time.sleep(1)
    assert retry, "the daemon did not retry the run:\n" + (tmp_path / "daemon.log").read_text()[-3000:]
    assert ui.wait(retry) == "SUCCESS"
    assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(tmp_path / "out" / "events"))
    assert not (ui.checkpoints / "events.json").exists()
