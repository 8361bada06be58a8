"""The production deployment of deploy/, run for real: instance storage on a fresh PostgreSQL database,
dagster-webserver and dagster-daemon as separate processes on 127.0.0.1, the QueuedRunCoordinator with a limit,
run monitoring and run retries on. A backfill of 8 daily partitions of a PostgreSQL table is launched over GraphQL
(the mutation the UI's "Materialize all" sends) and its partition runs execute at the same time. Then, mid-load
(SIGKILL of the run worker and anything below it: a lost machine or pod):

- partition A's run is killed once: the daemon retries it (run retries) and the retry resumes from A's checkpoint;
- partition B's run is killed, and so is its retry, which had resumed: out of retries, B ends FAILURE, and so does
  the backfill; the backfill's failures are re-executed (the backfill page's "Re-execute", from failure) and B
  resumes a second time.

Then every partition's output is exactly its source rows (none lost, none twice, none outside the 8 days) and no
checkpoint remains.

The dagster.yaml is deploy/dagster.yaml itself, with the connection settings in the environment as in production and
only these changes for a test: shorter monitoring intervals, 4 runs at once, 1 automatic retry instead of 2 (so that
B's second death is final), no first-visit modal. The daemon's backfill loop wakes every 3 s instead of 30 s (a module
constant of dagster's daemon, set before it starts): each backfill needs several of its iterations (submit the runs,
see them finish), and at 30 s they would be most of the test's time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg2.extensions import parse_dsn

from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, pg_rows

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = "conduit_dagster.definitions"  # the product's own module, over $CONDUIT_INGEST_FILE
ASSET = "events"
MAX_CONCURRENT_RUNS = 4
DAYS = [f"2025-03-{day:02d}" for day in range(1, 9)]  # the 8 daily partitions
ROWS_PER_DAY = 2_000
BATCH = 25  # 80 batches per partition: a few seconds of load, in which run workers are killed
# The backfill's runs execute their steps in the run worker itself (the launchpad's `execution: in_process`), as
# deploy/README.md recommends for partition runs: the default multiprocess executor starts two more Python processes
# per partition (the asset's step and its row-count check), which on this 2-core machine costs more than the loads.
RUN_CONFIG: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
# the daemon, with its backfill loop waking every 3 s (dagster reads this constant on every loop)
DAEMON = (
    "import sys, dagster._daemon.controller as c; c.DEFAULT_DAEMON_INTERVAL_SECONDS = 3; "
    "from dagster._daemon.cli import main; sys.argv[0] = 'dagster-daemon'; sys.exit(main())"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_yaml(max_concurrent_runs: int) -> dict[str, Any]:
    """deploy/dagster.yaml, with a test's intervals."""
    config = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    config["run_coordinator"]["config"].update(dequeue_interval_seconds=1, user_code_failure_retry_delay=2)
    config["concurrency"]["runs"]["max_concurrent_runs"] = max_concurrent_runs
    config["run_monitoring"].update(poll_interval_seconds=2, start_timeout_seconds=90, cancel_timeout_seconds=30)
    config["run_retries"]["max_retries"] = 1
    config["nux"] = {"enabled": False}
    return config


def children(pid: int) -> list[int]:
    """The pids of the processes below ``pid`` (from /proc: no psutil here)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        below = [p for p, parent in parent_of.items() if parent == current]
        found.extend(below)
        frontier.extend(below)
    return found


class Deployment:
    """dagster-webserver and dagster-daemon on one DAGSTER_HOME whose storage is the database ``db`` of the PostgreSQL
    ``server`` (libpq keywords: host, port, user, password)."""

    def __init__(self, tmp: Path, server: dict[str, str], db: str, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.home = tmp / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml(MAX_CONCURRENT_RUNS), sort_keys=False))
        workspace = tmp / "workspace.yaml"
        workspace.write_text(f"load_from:\n  - python_module:\n      module_name: {LOCATION}\n      working_directory: {ROOT}\n")
        self.env = dict(
            os.environ,
            DAGSTER_HOME=str(self.home),
            DAGSTER_PG_HOST=server.get("host", "127.0.0.1"),
            DAGSTER_PG_PORT=server.get("port", "5432"),
            DAGSTER_PG_USERNAME=server.get("user", "postgres"),
            DAGSTER_PG_PASSWORD=server.get("password", ""),
            DAGSTER_PG_DB=db,
            # a run worker answers its code server once it has loaded the definitions: on a busy 2-core machine with
            # 4 runs starting at once that can take longer than Dagster's default 60 s
            DAGSTER_GRPC_TIMEOUT_SECONDS="180",
            **env,
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/graphql"
        self.procs: list[subprocess.Popen] = []
        self.t0 = time.monotonic()
        self.phases: list[str] = []  # what happened when, printed when the test fails
        # create the instance's tables once, alone, before three processes would race to
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=self.env, cwd=tmp, check=True, capture_output=True)
        webserver = [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port), "-w", str(workspace)]
        try:
            self._start("webserver", webserver)
            self._start("daemon", [sys.executable, "-c", DAEMON, "run", "-w", str(workspace)])
        except BaseException:
            self.stop()
            raise
        self.mark("instance migrated, webserver and daemon started")

    def mark(self, what: str) -> None:
        self.phases.append(f"{time.monotonic() - self.t0:6.1f} s  {what}")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

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
        # The code servers they started, and those servers' run workers, are in the same process groups. A code server
        # given SIGTERM waits for its runs to end, for ever if one is stuck: whatever is left of the groups is killed.
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
                    "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename "
                    "... on PythonError { message } } } } } }"
                )
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                    return
                if entries and entries[0]["locationOrLoadError"]["__typename"] == "PythonError":
                    raise AssertionError(f"code location failed to load: {entries}")
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError("the webserver did not load the code location:\n" + self.log("webserver"))

    # --- backfills --------------------------------------------------------------------------------------------

    def launch_backfill(self, asset: str) -> str:
        """An asset backfill of every partition: what the UI's "Materialize all" dialog sends."""
        data = self.gql(
            """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }""",
            {"params": {"assetSelection": [{"path": [asset]}], "allPartitions": True, "runConfigData": RUN_CONFIG}},
        )
        result = data["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        return result["backfillId"]

    def reexecute_backfill(self, backfill_id: str) -> str:
        """A new backfill of the partitions that did not materialize: the backfill page's "Re-execute from failure"."""
        data = self.gql(
            """mutation($params: ReexecutionParams!) { reexecutePartitionBackfill(reexecutionParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }""",
            {"params": {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}},
        )
        result = data["reexecutePartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        return result["backfillId"]

    def backfill_status(self, backfill_id: str) -> str:
        data = self.gql(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename "
            "... on PartitionBackfill { status } ... on PythonError { message } } }",
            {"id": backfill_id},
        )
        result = data["partitionBackfillOrError"]
        assert result["__typename"] == "PartitionBackfill", result
        return result["status"]

    def wait_backfill(self, backfill_id: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.backfill_status(backfill_id)
            if status not in ("REQUESTED", "CANCELING", "FAILING"):
                return status
            time.sleep(1)
        raise AssertionError(f"backfill {backfill_id} did not finish:\n" + self.log("daemon"))

    def backfill_runs(self, backfill_id: str) -> list[dict[str, Any]]:
        """The backfill's runs: runId, status, partition, startTime, endTime."""
        data = self.gql(
            """query($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
                 ... on Runs { results { runId status startTime endTime tags { key value } } } } }""",
            {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}},
        )
        runs = []
        for run in data["runsOrError"]["results"]:
            tags = {t["key"]: t["value"] for t in run.pop("tags")}
            # a run of one partition: dagster/partition, or (an asset backfill's run) a range of one key
            start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
            partition = tags.get("dagster/partition") or (start if start == end else None)
            runs.append({**run, "partition": partition, "tags": tags})
        return runs

    def messages(self, run_id: str) -> list[str]:
        data = self.gql(
            """query($id: ID!) { logsForRun(runId: $id) { __typename
                 ... on EventConnection { events { __typename ... on MessageEvent { message } } } } }""",
            {"id": run_id},
        )
        return [e["message"] for e in data["logsForRun"]["events"] if e.get("message")]

    def worker_pid(self, run_id: str) -> int | None:
        """The run worker's pid, from the run's event "Started process for run (pid: N)." (DefaultRunLauncher)."""
        for message in self.messages(run_id):
            if message.startswith("Started process for run (pid: "):
                return int(message.split("pid: ")[1].split(")")[0])
        return None

    def materializations(self, asset: str) -> list[dict[str, Any]]:
        """Every materialization of the asset: runId, partition and metadata."""
        data = self.gql(
            """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { __typename ... on Asset {
                 assetMaterializations(limit: 1000) { runId partition metadataEntries { label
                   ... on BoolMetadataEntry { boolValue } ... on IntMetadataEntry { intValue }
                   ... on TextMetadataEntry { text } } } } } }""",
            {"key": {"path": [asset]}},
        )
        out = []
        for m in data["assetOrError"]["assetMaterializations"]:
            meta = {e["label"]: e.get("boolValue", e.get("intValue", e.get("text"))) for e in m["metadataEntries"]}
            out.append({"runId": m["runId"], "partition": m["partition"], "metadata": meta})
        return out


@pytest.fixture
def instance_db(pg) -> Iterator[str]:
    """A fresh PostgreSQL database for the Dagster instance's storage, dropped afterwards."""
    name = f"dagster_deploy_{uuid.uuid4().hex[:10]}"
    with pg.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with pg.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def overlapping(runs: list[dict[str, Any]]) -> int:
    """The most runs whose [startTime, endTime] intervals overlap at one instant."""
    edges = []
    for run in runs:
        if run["startTime"] and run["endTime"]:
            edges += [(run["startTime"], 1), (run["endTime"], -1)]
    most = current = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        current += step
        most = max(most, current)
    return most


def kill_tree(pid: int) -> None:
    """SIGKILL a run worker and every process below it, as when its machine or pod is lost; return once they are gone."""
    victims = [pid, *children(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(alive(victim) for victim in victims):
        assert time.monotonic() < deadline, f"processes {victims} survived SIGKILL"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (dead, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Each day holds ROWS_PER_DAY rows at scattered instants, plus a row exactly at each midnight from 03-01 to 03-09 and
# one a microsecond before it: the rows before 03-01 and from 03-09 on belong to no partition and must not be loaded.
CREATE = """
CREATE TABLE {schema}.events (id bigint PRIMARY KEY, ts timestamptz NOT NULL, kind text, amount numeric(12, 2), note text);
INSERT INTO {schema}.events
SELECT g,
       timestamptz '2025-03-01 00:00:00+00' + (g % 8) * interval '1 day' + ((g * 7919) % 86399000) * interval '1 millisecond'
         + interval '0.000321 second',
       (ARRAY['click', 'view', 'buy'])[1 + g % 3],
       CASE WHEN g % 11 = 0 THEN NULL ELSE round((g * 1.37)::numeric, 2) END,
       CASE WHEN g % 7 = 0 THEN E'line one\\nline "two", with commas' END
FROM generate_series(1, {rows}) AS g;
INSERT INTO {schema}.events
SELECT 1000000 + d * 2 + e, timestamptz '2025-03-01 00:00:00+00' + d * interval '1 day' - e * interval '1 microsecond',
       'edge', NULL, NULL
FROM generate_series(0, 8) AS d, generate_series(0, 1) AS e;
"""

INGEST = """
sources:
  - name: pg
    type: postgresql
    host: {host}
    port: {port}
    database: {dbname}
    user: {user}
    password: "{password}"
    schema: {schema}
    resume: true
destinations:
  - name: out
    type: local
    path: out
    format: parquet
resources:
  - name: events
    source: pg
    destination: out
    checkpoint_column: id
    batch_size: {batch}
    query: SELECT id, ts, kind, amount, note FROM events
    partitions:
      column: ts
      every: day
      start: "2025-03-01"
      end: "2025-03-09"
"""


def source_rows(dsn: str, schema: str, day: str) -> list[tuple[Any, ...]]:
    """The source rows of one day's partition, [day, day + 1) in UTC."""
    return pg_rows(
        dsn,
        f"SELECT id, ts, kind, amount, note FROM {schema}.events "
        f"WHERE ts >= timestamptz '{day} 00:00:00+00' AND ts < timestamptz '{day} 00:00:00+00' + interval '1 day'",
    )


def test_backfill_on_the_production_deployment(tmp_path, pg, pg_schema, postgres_dsn, instance_db):
    with pg.cursor() as cur:
        cur.execute(CREATE.format(schema=pg_schema, rows=ROWS_PER_DAY * len(DAYS)))
    server = {"host": "127.0.0.1", "port": "5432", "user": "postgres", "password": "", **parse_dsn(postgres_dsn)}
    ingest = write_ingest(tmp_path, INGEST.format(schema=pg_schema, batch=BATCH, **server))
    checkpoints = tmp_path / ".checkpoints"  # the default: .checkpoints/ beside ingest.yml, on this machine
    output = tmp_path / "out" / ASSET
    deployment = Deployment(tmp_path, server, instance_db, {"CONDUIT_INGEST_FILE": str(ingest)})
    try:
        deployment.wait_for_location()
        deployment.mark("code location loaded")
        backfill = deployment.launch_backfill(ASSET)

        # the first partition caught mid-load is B (killed twice), the second A (killed once)
        kills_left: dict[str, int] = {}
        killed: dict[str, list[dict[str, Any]]] = {}  # partition -> [{run_id, checkpoint when killed}]
        pids: dict[str, int] = {}
        most_started = 0
        deadline = time.monotonic() + 300
        idle_since: float | None = None
        while (len(kills_left) < 2 or any(kills_left.values())) and time.monotonic() < deadline:
            runs = deployment.backfill_runs(backfill)
            if len(runs) >= len(DAYS) and all(r["status"] in FINISHED for r in runs):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 20:
                    break  # every run ended, and no retry came: not enough of them were caught mid-load
            else:
                idle_since = None
            started = [r for r in runs if r["status"] == "STARTED"]
            most_started = max(most_started, len(started))
            for run in started:
                key, run_id = run["partition"], run["runId"]
                if kills_left.get(key) == 0 or run_id in [k["run_id"] for k in killed.get(key, [])]:
                    continue
                if key not in kills_left and len(kills_left) == 2:
                    continue
                if run_id not in pids:
                    pid = deployment.worker_pid(run_id)
                    if pid is None:
                        continue
                    pids[run_id] = pid
                checkpoint = checkpoints / f"{ASSET}.{key}.json"
                try:
                    saved = json.loads(checkpoint.read_text())
                except (OSError, ValueError):
                    continue  # no checkpoint yet (or being replaced right now)
                # mid-load: this run committed a batch itself, and is well before the partition's last one
                before = killed[key][-1]["checkpoint"]["batches_committed"] if key in killed else 0
                if saved["run_id"] != run_id or not before < saved["batches_committed"] <= (ROWS_PER_DAY // BATCH + before) // 2:
                    continue
                kill_tree(pids[run_id])
                # what the dead run left: the checkpoint its successor resumes from
                left = json.loads(checkpoint.read_text())
                kills_left.setdefault(key, 2 if not kills_left else 1)
                kills_left[key] -= 1
                killed.setdefault(key, []).append({"run_id": run_id, "checkpoint": left})
                deployment.mark(f"killed the run worker of {key} ({run_id}) after batch {saved['batches_committed']}")
            time.sleep(0.2)
        assert len(kills_left) == 2 and not any(kills_left.values()), (
            f"the partition runs were not caught mid-load: {killed}; {deployment.backfill_runs(backfill)}"
        )
        assert most_started >= 2, "no two partition runs were STARTED at the same time"
        b_key, a_key = list(killed)

        # the dead runs are marked failed; A's retry resumes and loads the rest, B's retry is killed too
        status = deployment.wait_backfill(backfill)
        deployment.mark(f"backfill {status}")
        runs = deployment.backfill_runs(backfill)
        assert sorted({r["partition"] for r in runs}) == DAYS, runs
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for run in sorted(runs, key=lambda r: r["startTime"] or 0):
            by_partition.setdefault(run["partition"], []).append(run)
        for key, victims in killed.items():
            for victim in victims:
                run = next(r for r in by_partition[key] if r["runId"] == victim["run_id"])
                assert run["status"] == "FAILURE", runs
                assert any("terminated by signal 9" in m for m in deployment.messages(victim["run_id"]))
        first_a, retry_a = by_partition[a_key]
        assert retry_a["status"] == "SUCCESS" and retry_a["tags"].get("dagster/parent_run_id") == first_a["runId"], runs
        first_b, retry_b = by_partition[b_key]
        assert [first_b["runId"], retry_b["runId"]] == [k["run_id"] for k in killed[b_key]], runs
        assert retry_b["tags"].get("dagster/retry_number") == "1", runs
        assert any(f"partition {b_key}: resuming after id = " in m for m in deployment.messages(retry_b["runId"]))
        assert (checkpoints / f"{ASSET}.{b_key}.json").exists(), f"the killed partition {b_key} lost its checkpoint"
        for key in set(DAYS) - set(killed):
            assert [r["status"] for r in by_partition[key]] == ["SUCCESS"], runs
        assert status == "COMPLETED_FAILED", status
        assert overlapping(runs) >= 2, runs

        # "Re-execute from failure" on the backfill: a new backfill of B alone, which resumes again
        again = deployment.reexecute_backfill(backfill)
        assert deployment.wait_backfill(again) == "COMPLETED_SUCCESS"
        deployment.mark("re-executed backfill COMPLETED_SUCCESS")
        rerun = deployment.backfill_runs(again)
        assert [(r["partition"], r["status"]) for r in rerun] == [(b_key, "SUCCESS")], rerun

        # the runs that finished A and B resumed from the checkpoints the killed runs left
        finishers = {a_key: retry_a["runId"], b_key: rerun[0]["runId"]}
        for key, run_id in finishers.items():
            (metadata,) = [m["metadata"] for m in deployment.materializations(ASSET) if m["runId"] == run_id]
            assert metadata["conduit/resumed"] is True, (key, metadata)
            assert metadata["conduit/resumed_from"] not in ("", None), (key, metadata)
            rows_before = killed[key][-1]["checkpoint"]["records_processed"]
            assert metadata["conduit/rows_this_run"] <= len(source_rows(postgres_dsn, pg_schema, key)) - rows_before

        # exactly the source rows, partition by partition; nothing outside the 8 days; no checkpoint left
        assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == DAYS
        for key in DAYS:
            assert_same_rows(source_rows(postgres_dsn, pg_schema, key), output_rows(output / key))
        assert sum(len(output_rows(output / key)) for key in DAYS) == ROWS_PER_DAY * len(DAYS) + 16
        assert not [p.name for p in checkpoints.iterdir() if p.suffix == ".json"]
        deployment.mark("output checked")
        print("\n".join(deployment.phases))
    except BaseException:
        print("\n".join(deployment.phases))
        print("--- daemon log ---\n" + deployment.log("daemon") + "\n--- webserver log ---\n" + deployment.log("webserver"))
        raise
    finally:
        deployment.stop()
