"""The S3 checkpoint store against a real S3 endpoint over HTTP (moto's server on 127.0.0.1): exact round trips,
one owner per pipeline (a lease object, conditional writes), takeover of a dead run's lease, fencing of a run
that lost the pipeline, two processes racing, and bad input failing clearly with the checkpoint left as it was.
"""

import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from conduit_dagster.engine.checkpoint import Checkpoint, IncrementalState
from conduit_dagster.engine.checkpoint_s3 import MIN_LEASE_SECONDS, S3CheckpointStore
from conduit_dagster.engine.errors import CheckpointError, PipelineBusyError, SpecError
from conduit_dagster.engine.s3 import make_client
from conduit_dagster.engine.spec import S3ConnectionSpec
from conduit_dagster_tests.conftest import s3_keys, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows
from conduit_dagster_tests.test_checkpoint import make as make_checkpoint

PREFIX = "conduit/checkpoints"


def make(value: Any = 7, **kw: Any) -> Checkpoint:
    return make_checkpoint(value, **kw)


def client(endpoint: str) -> Any:
    """A client of its own, as another process would have."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every object of the bucket, with its bytes."""
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in s3_keys(s3, bucket)}


def body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def lease_doc(s3: Any, bucket: str, pipeline: str = "orders", prefix: str = PREFIX) -> dict[str, Any]:
    return json.loads(body(s3, bucket, f"{prefix}/{pipeline}.lease.json"))


def dead_pid() -> int:
    """The pid of a process of this machine that has ended (and been reaped)."""
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


# --- 1. round trip ---------------------------------------------------------------------------------------------


VALUES = [
    2**53 + 1,
    -(2**63) - 1,
    10**40 + 7,
    Decimal("12345678901234567890.123456789"),
    Decimal("-0.00"),
    dt.datetime(2025, 6, 2, 3, 4, 5, 999999, tzinfo=ZoneInfo("America/New_York")),
    dt.datetime(2025, 1, 2, 3, 4, 5, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    b"\x00\xff\x10bytes",
]


@pytest.mark.parametrize("prefix", ["", "conduit/checkpoints/nested"], ids=["no-prefix", "nested-prefix"])
def test_round_trip_listing_and_delete(s3, bucket, prefix):
    store = S3CheckpointStore(s3, bucket, prefix)
    where = f"{prefix}/" if prefix else ""
    s3.put_object(Bucket=bucket, Key=f"{where}elsewhere/deeper.json", Body=b"{}")  # another folder: not a pipeline
    if prefix:
        s3.put_object(Bucket=bucket, Key="outside.json", Body=b"{}")  # outside the prefix
    assert store.describe("orders") == f"s3://{bucket}/{where}orders.json"
    assert store.location == f"s3://{bucket}/{where}"

    with store.lock("orders", "run-1"):
        assert store.load("orders") is None and store.load_state("orders") is None
        for value in VALUES:
            store.save(make(value))
            back = store.load("orders")
            assert back is not None and back.last_value == value and type(back.last_value) is type(value)
            if isinstance(value, dt.datetime):
                assert back.last_value.utcoffset() == value.utcoffset() and back.last_value.microsecond == value.microsecond
            if isinstance(value, Decimal):
                assert str(back.last_value) == str(value)
            assert back == make(value, updated_at=back.updated_at)
        store.save(make(2**53 + 1, records_processed=2**60))
        doc = json.loads(body(s3, bucket, f"{where}orders.json"))  # what another reader of the object sees
        assert doc["last_value"] == {"type": "int", "value": str(2**53 + 1)}
        assert doc["records_processed"] == 2**60 and doc["pipeline"] == "orders" and doc["run_id"] == "run-1"
        state = IncrementalState("orders", "ts", dt.datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), ("h1", "h2"), "run-1")
        store.save_state(state)
        assert store.load_state("orders") == IncrementalState(
            "orders", "ts", state.last_value, ("h1", "h2"), "run-1", updated_at=store.load_state("orders").updated_at
        )
        assert f"{where}orders.lease.json" in s3_keys(s3, bucket)
        assert store.list() == ["orders"], "lease and state objects are not pipelines with a checkpoint"
        assert store.list_states() == ["orders"]
        assert store.has_checkpoint("orders")
        store.delete("orders")
        assert store.load("orders") is None and not store.has_checkpoint("orders") and store.list() == []
        assert store.list_states() == ["orders"], "the incremental state outlives the checkpoint"
        store.delete("orders")  # twice is fine
        store.delete_state("orders")
        assert store.load_state("orders") is None and store.list_states() == []
    left = [k for k in s3_keys(s3, bucket) if k.startswith(where) and "elsewhere/" not in k]
    assert left == [], "the lease goes when the run ends"


def test_invalid_names_and_lease_seconds_are_refused(s3, bucket):
    store = S3CheckpointStore(s3, bucket, PREFIX)
    for name in ("", "a/b", ".hidden", "orders.lease", "orders.state"):
        with pytest.raises(CheckpointError, match="invalid pipeline name"):
            store.describe(name)
    with pytest.raises(SpecError, match=rf"lease_seconds 5 is too short .* at least {MIN_LEASE_SECONDS}"):
        S3CheckpointStore(s3, bucket, PREFIX, lease_seconds=5)
    assert s3_keys(s3, bucket) == []


# --- 2. ownership ----------------------------------------------------------------------------------------------


def test_second_store_is_refused_while_the_first_holds_the_pipeline(s3, s3_endpoint, bucket):
    a = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, wait_seconds=0)
    with a.lock("orders", "run-a"):
        a.save(make(41, run_id="run-a"))
        before = objects(s3, bucket)
        with pytest.raises(PipelineBusyError) as info:
            with b.lock("orders", "run-b"):
                pytest.fail("two stores own one pipeline")
        message = str(info.value)
        assert "pipeline 'orders' is already being run (run run-a on" in message, message
        assert f"s3://{bucket}/{PREFIX}/orders.lease.json" in message and "nothing was read or written" in message
        assert objects(s3, bucket) == before, "the refused store wrote nothing"
        a.save(make(42, run_id="run-a"))  # the owner goes on undisturbed
    assert s3_keys(s3, bucket) == [f"{PREFIX}/orders.json"]
    with b.lock("orders", "run-b"):
        assert lease_doc(s3, bucket)["run_id"] == "run-b"
        resumed = b.load("orders")
        assert resumed is not None and resumed.last_value == 42 and resumed.run_id == "run-a"
        b.save(make(43, run_id="run-b"))
        b.delete("orders")
    assert s3_keys(s3, bucket) == []


# --- 3. a lease left behind -------------------------------------------------------------------------------------


def write_lease(s3: Any, bucket: str, doc: dict[str, Any], pipeline: str = "orders") -> None:
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{pipeline}.lease.json", Body=json.dumps(doc, sort_keys=True).encode())


def local_lease(store: S3CheckpointStore, run_id: str, pid: int) -> dict[str, Any]:
    """A lease document as a run of this machine writes it, naming ``pid``."""
    doc = json.loads(store._lease_body(run_id, uuid.uuid4().hex))
    assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
    return {**doc, "pid": pid}


def test_lease_of_a_dead_process_of_this_machine_is_taken_over_at_once(s3, s3_endpoint, bucket):
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    write_lease(s3, bucket, local_lease(b, "run-dead", dead_pid()))
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/orders.json", Body=make(5, run_id="run-dead").to_json().encode())
    started = time.monotonic()
    with b.lock("orders", "run-b"):
        assert time.monotonic() - started < 5, "a dead run's lease must not be waited out"
        doc = lease_doc(s3, bucket)
        assert doc["run_id"] == "run-b" and doc["pid"] == os.getpid()
        cp = b.load("orders")
        assert cp is not None and cp.last_value == 5
        b.save(make(6, run_id="run-b"))
    assert json.loads(body(s3, bucket, f"{PREFIX}/orders.json"))["run_id"] == "run-b"


def test_lease_of_a_live_process_or_of_another_pid_namespace_is_not_taken_over(s3, s3_endpoint, bucket):
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, wait_seconds=0)
    live = subprocess.Popen(["sleep", "30"])
    try:
        for doc in (
            local_lease(b, "run-live", live.pid),
            # another container with this host name (host networking) and boot id: its pids are not ours to check
            {**local_lease(b, "run-container", dead_pid()), "pid_ns": "pid:[1]"},
        ):
            write_lease(s3, bucket, doc)
            before = objects(s3, bucket)
            with pytest.raises(PipelineBusyError, match=f"already being run \\(run {doc['run_id']} on"):
                with b.lock("orders", "run-b"):
                    pytest.fail("a live run's lease was taken")
            assert objects(s3, bucket) == before
    finally:
        live.kill()
        live.wait()


def test_a_silent_lease_of_another_machine_is_waited_out_then_taken(s3, s3_endpoint, bucket):
    """A run that died on another machine leaves a lease nobody renews and whose process this machine cannot see: a
    retry launched right away waits for it to expire, then runs (with wait_seconds=0 it is refused at once)."""
    doc = {"run_id": "run-far", "token": "t", "host": "far-away.example", "boot_id": "x", "pid": 1, "lease_seconds": 10}
    write_lease(s3, bucket, doc)
    impatient = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, lease_seconds=MIN_LEASE_SECONDS, wait_seconds=0)
    with pytest.raises(PipelineBusyError, match=r"run run-far on far-away.example.*expires \(10 s after its last renewal\)"):
        with impatient.lock("orders", "run-b"):
            pytest.fail("a live-looking lease was taken")
    patient = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, lease_seconds=MIN_LEASE_SECONDS)
    started = time.monotonic()
    with patient.lock("orders", "run-b"):
        taken = time.monotonic() - started
        assert lease_doc(s3, bucket)["run_id"] == "run-b"
    # the server's clock counts in whole seconds: the lease may be taken up to a second early
    assert MIN_LEASE_SECONDS - 2 <= taken <= MIN_LEASE_SECONDS + 5, taken
    assert s3_keys(s3, bucket) == []


def test_a_lease_that_is_renewed_while_waiting_shows_a_live_run(s3, s3_endpoint, bucket):
    """The holder renews its lease (every third of lease_seconds): the waiting run sees that and gives up at once,
    without waiting for an expiry that will not come."""
    a = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, lease_seconds=MIN_LEASE_SECONDS)
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, lease_seconds=MIN_LEASE_SECONDS)
    with a.lock("orders", "run-a"):
        started = time.monotonic()
        with pytest.raises(PipelineBusyError, match=r"run run-a on .*it renewed its lease"):
            with b.lock("orders", "run-b"):
                pytest.fail("two stores own one pipeline")
        assert time.monotonic() - started < MIN_LEASE_SECONDS / 3 + 3
        assert lease_doc(s3, bucket)["run_id"] == "run-a"


# --- 4. fencing ------------------------------------------------------------------------------------------------


def test_a_run_that_lost_the_pipeline_cannot_overwrite_the_new_owners_checkpoint(s3, s3_endpoint, bucket):
    a = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)  # lease 60 s: its heartbeat does not notice in time
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    with ExitStack() as held_by_a:
        held_by_a.enter_context(a.lock("orders", "run-a"))
        a.save(make(10, run_id="run-a"))
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/orders.lease.json")  # as if it had expired
        with b.lock("orders", "run-b"):
            resumed = b.load("orders")
            assert resumed is not None and resumed.last_value == 10
            b.save(make(20, run_id="run-b"))
            new_owners = body(s3, bucket, f"{PREFIX}/orders.json")
            with pytest.raises(CheckpointError) as info:
                a.save(make(11, run_id="run-a"))
            message = str(info.value)
            assert "this run no longer owns pipeline 'orders'" in message, message
            assert f"s3://{bucket}/{PREFIX}/orders.json" in message
            assert body(s3, bucket, f"{PREFIX}/orders.json") == new_owners
            with pytest.raises(CheckpointError, match="no longer owns"):
                a.delete("orders")
            assert body(s3, bucket, f"{PREFIX}/orders.json") == new_owners
            held_by_a.close()  # the old owner's end leaves the new owner's lease alone
            assert lease_doc(s3, bucket)["run_id"] == "run-b"
            b.save(make(21, run_id="run-b"))  # and the new owner goes on
        cp = S3CheckpointStore(s3, bucket, PREFIX).load("orders")
        assert cp is not None and cp.last_value == 21 and cp.run_id == "run-b"


def test_heartbeat_finding_the_lease_taken_stops_the_old_owner(s3, s3_endpoint, bucket):
    a = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX, lease_seconds=MIN_LEASE_SECONDS)
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    with a.lock("orders", "run-a"):
        a.save(make(10, run_id="run-a"))
        a.assert_owner("orders")
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/orders.lease.json")
        with b.lock("orders", "run-b"):
            deadline = time.monotonic() + MIN_LEASE_SECONDS
            while True:  # the heartbeat renews every third of lease_seconds
                try:
                    a.assert_owner("orders")
                except CheckpointError as exc:
                    message = str(exc)
                    break
                assert time.monotonic() < deadline, "the heartbeat did not notice the takeover"
                time.sleep(0.1)
            assert "no longer owns pipeline 'orders' (another run took over its lease)" in message, message
            before = objects(s3, bucket)
            with pytest.raises(CheckpointError, match="another run took over its lease"):
                a.save(make(11, run_id="run-a"))
            with pytest.raises(CheckpointError, match="another run took over its lease"):
                a.save_state(IncrementalState("orders", "ts", 11))
            assert objects(s3, bucket) == before
        assert s3_keys(s3, bucket) == [f"{PREFIX}/orders.json"]


def test_state_writes_are_fenced_even_when_the_run_never_read_the_state(s3, s3_endpoint, bucket):
    """A resumed incremental run saves its state without reading it first: that write is conditional too, on the
    state as it was when the run took the pipeline, and an ETag left from an earlier run does not fail it."""
    a = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    b = S3CheckpointStore(client(s3_endpoint), bucket, PREFIX)
    with a.lock("orders", "run-a1"):
        a.save_state(IncrementalState("orders", "ts", 1))
    with b.lock("orders", "run-b1"):
        b.save_state(IncrementalState("orders", "ts", 2))
    with a.lock("orders", "run-a2"):  # a's remembered ETag of the state is stale: this run must still save it
        a.save_state(IncrementalState("orders", "ts", 3))
    assert json.loads(body(s3, bucket, f"{PREFIX}/orders.state.json"))["last_value"]["value"] == "3"
    with a.lock("orders", "run-a3"):
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/orders.lease.json")  # taken over
        with b.lock("orders", "run-b2"):
            b.save_state(IncrementalState("orders", "ts", 4))
            with pytest.raises(CheckpointError, match="no longer owns pipeline 'orders'"):
                a.save_state(IncrementalState("orders", "ts", 5))
    assert json.loads(body(s3, bucket, f"{PREFIX}/orders.state.json"))["last_value"]["value"] == "4"


# --- 5. two processes racing ------------------------------------------------------------------------------------

RACER = """
import sys, time
from pathlib import Path
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.spec import load_spec
from conduit_dagster.engine.stores import checkpoint_settings, open_checkpoint_store

ingest, ready, go, run_id = sys.argv[1:5]
spec = load_spec(Path(ingest))
store = open_checkpoint_store(checkpoint_settings(spec.checkpoints, env={}), spec.base_dir)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.0005)
events, first = [], None
try:
    for event in run_pipeline(spec.resource("orders"), store, run_id=run_id):
        first = first or time.time()  # the first event comes once this run owns the pipeline
        events.append(event)
except ConduitError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
assert isinstance(events[-1], RunFinished)
print(f"{run_id} loaded {events[-1].rows_this_run} rows, owning the pipeline from {first!r} to {time.time()!r}")
"""


def test_two_processes_racing_for_one_pipeline(tmp_path, s3, s3_endpoint, bucket):
    import sqlite3

    rows = [(i, i // 3, f"order {i}") for i in range(1, 3001)]  # ties of 3 on the checkpoint column
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER, k INTEGER, note TEXT)")
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()
    ingest = write_ingest(
        tmp_path,
        f"""
checkpoints:
  type: s3
  bucket: {bucket}
  prefix: {PREFIX}
  endpoint_url: {s3_endpoint}
  region: us-east-1
sources:
  - name: shop
    type: sqlite
    path: shop.db
    resume: true
    checkpoint_column: k
destinations:
  - name: lake
    type: local
    path: out
resources:
  - name: orders
    source: shop
    destination: lake
    batch_size: 100
    query: SELECT id, k, note FROM orders
""",
    )
    go = tmp_path / "go"
    procs = []
    for n in (1, 2):
        ready = tmp_path / f"ready-{n}"
        cmd = [sys.executable, "-c", RACER, str(ingest), str(ready), str(go), f"racer-{n}"]
        procs.append((ready, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready, _ in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
        time.sleep(0.005)
    go.touch()  # both start at the same moment
    results = [(p.wait(timeout=120), *p.communicate()) for _, p in procs]
    codes = sorted(code for code, _, _ in results)
    # The second waits while the first holds the pipeline (a lease nobody renews might be a dead run's), then
    # either finds it renewed (busy: it fails having done nothing) or released (it runs, after the first).
    assert codes in ([0, 0], [0, 1]), results
    windows = []
    for code, out, err in results:
        if code == 0:
            assert "loaded 3000 rows" in out, results
            start, end = (float(x) for x in out.rsplit("from ", 1)[1].split(" to "))
            windows.append((start, end))
        else:
            assert "pipeline 'orders' is already being run (run racer-" in err and "nothing was read or written" in err, err
            assert "conduit-test-secret" not in err
    windows.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(windows, windows[1:], strict=False)), windows
    assert_same_rows(rows, output_rows(tmp_path / "out" / "orders"))
    assert s3_keys(s3, bucket) == [], "neither a checkpoint nor a lease remains"


# --- 6. bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def existing(s3, bucket) -> bytes:
    """A checkpoint left by a failed run, which every failure below must leave byte for byte."""
    store = S3CheckpointStore(s3, bucket, PREFIX)
    with store.lock("orders", "failed-run"):
        store.save(make(99, run_id="failed-run"))
    return body(s3, bucket, f"{PREFIX}/orders.json")


def attempts(store: S3CheckpointStore) -> Iterator[tuple[str, Any]]:
    """Each way a run touches the store first, and a write."""

    def lock_and_save() -> None:
        with store.lock("orders", "run-x"):
            store.save(make(100))

    yield "lock", lock_and_save
    yield "load", lambda: store.load("orders")
    yield "save", lambda: store.save(make(100))
    yield "list", store.list


def test_missing_bucket_is_named(s3, s3_endpoint, bucket, existing):
    missing = f"conduit-missing-{uuid.uuid4().hex[:8]}"
    store = S3CheckpointStore(client(s3_endpoint), missing, PREFIX)
    for what, attempt in attempts(store):
        with pytest.raises(CheckpointError) as info:
            attempt()
        message = str(info.value)
        assert f"s3://{missing}/" in message, (what, message)
        assert f"bucket {missing!r} at {s3_endpoint} does not exist; create it or fix `bucket`" in message, (what, message)
    assert body(s3, bucket, f"{PREFIX}/orders.json") == existing
    assert s3_keys(s3, bucket) == [f"{PREFIX}/orders.json"]


def test_endpoint_down_fails_in_seconds(s3, bucket, existing):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    store = S3CheckpointStore(make_client(S3ConnectionSpec(endpoint_url=endpoint, region="us-east-1")), bucket, PREFIX)
    for what, attempt in attempts(store):
        started = time.monotonic()
        with pytest.raises(CheckpointError) as info:
            attempt()
        assert time.monotonic() - started < 15, what
        message = str(info.value)
        assert f"cannot reach the S3 endpoint {endpoint}" in message and "check `endpoint_url`" in message, (what, message)
        assert f"s3://{bucket}/" in message, (what, message)
    assert body(s3, bucket, f"{PREFIX}/orders.json") == existing


@contextmanager
def moto_checks_credentials(endpoint: str) -> Iterator[None]:
    """moto's server checks credentials and signatures (against its IAM users) while this is active; otherwise it
    accepts anything. The server runs in this process, so the setting is this process's alone."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


@pytest.mark.parametrize("wrong", ["unknown key id", "wrong secret"])
def test_rejected_credentials_are_named_without_revealing_them(s3_endpoint, s3, bucket, existing, wrong):
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    user = f"conduit-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    real_key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    key_id = "AKIACONDUITUNKNOWN01" if wrong == "unknown key id" else real_key_id
    secret = "do-not-print-this-secret-7f3a9"
    code = "InvalidAccessKeyId" if wrong == "unknown key id" else "SignatureDoesNotMatch"
    bad = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=key_id, aws_secret_access_key=secret
    )
    store = S3CheckpointStore(bad, bucket, PREFIX)
    messages = []
    with moto_checks_credentials(s3_endpoint):
        for what, attempt in attempts(store):
            with pytest.raises(CheckpointError) as info:
                attempt()
            message = str(info.value)
            messages.append(message)
            assert f"the credentials were rejected by bucket {bucket!r} at {s3_endpoint} ({code})" in message, (what, message)
            assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    for message in messages:
        assert secret not in message and key_id not in message and real_key_id not in message
    assert body(s3, bucket, f"{PREFIX}/orders.json") == existing
    assert s3_keys(s3, bucket) == [f"{PREFIX}/orders.json"]


def test_damaged_checkpoint_names_the_object_and_the_way_out(s3, bucket):
    store = S3CheckpointStore(s3, bucket, PREFIX)
    damaged = b'{"format_version": 1, "pipeline": "orders", "last_va'
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/orders.json", Body=damaged)
    with store.lock("orders", "run-x"):
        with pytest.raises(CheckpointError) as info:
            store.load("orders")
    message = str(info.value)
    assert f"s3://{bucket}/{PREFIX}/orders.json: checkpoint is not valid JSON" in message, message
    assert "`conduit clear-checkpoints --pipeline-name orders`" in message
    assert body(s3, bucket, f"{PREFIX}/orders.json") == damaged, "a bad checkpoint is left for the user to inspect"
    assert store.list() == ["orders"] and store.has_checkpoint("orders")
    with store.lock("orders", "conduit clear-checkpoints"):  # what the suggested command does
        store.delete("orders")
    assert s3_keys(s3, bucket) == []


# --- 7. an endpoint that ignores conditional headers --------------------------------------------------------------


class IgnoringS3:
    """An in-memory S3 client that accepts If-None-Match / If-Match and ignores them, as some S3-compatible
    servers do."""

    class meta:  # noqa: N801 - boto3's shape
        endpoint_url = "http://old-s3.example:9000"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    @staticmethod
    def _missing(op: str) -> ClientError:
        return ClientError({"Error": {"Code": "NoSuchKey", "Message": "no such key"}}, op)

    def _etag(self, data: bytes) -> str:
        import hashlib

        return f'"{hashlib.md5(data).hexdigest()}"'  # noqa: S324 - S3's ETag

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **kw: Any) -> dict[str, Any]:  # noqa: N803
        with self.lock:
            self.calls.append(("put", Key, kw))
            self.objects[Key] = bytes(Body)
            return {"ETag": self._etag(self.objects[Key])}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        with self.lock:
            if Key not in self.objects:
                raise self._missing("GetObject")
            data = self.objects[Key]
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return {
            "Body": io.BytesIO(data),
            "ETag": self._etag(data),
            "LastModified": now,
            "ResponseMetadata": {"HTTPHeaders": {"date": now.strftime("%a, %d %b %Y %H:%M:%S GMT")}},
        }

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        with self.lock:
            if Key not in self.objects:
                raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
            return {"ETag": self._etag(self.objects[Key])}

    def delete_object(self, *, Bucket: str, Key: str, **kw: Any) -> dict[str, Any]:  # noqa: N803
        with self.lock:
            self.calls.append(("delete", Key, kw))
            self.objects.pop(Key, None)
        return {}


def test_endpoint_ignoring_conditional_writes_is_refused_with_the_way_out():
    fake = IgnoringS3()
    store = S3CheckpointStore(fake, "bkt", PREFIX)
    with pytest.raises(CheckpointError) as info:
        with store.lock("orders", "run-1"):
            pytest.fail("ran without a working guard")
    message = str(info.value)
    assert "the S3 endpoint http://old-s3.example:9000 does not honour conditional writes" in message, message
    assert "set `conditional_writes: false` under `checkpoints:`" in message and "pool limit of 1" in message
    assert any("IfNoneMatch" in kw for op, _, kw in fake.calls if op == "put"), "the guard was asked for"
    assert fake.objects == {}, "no lease is left behind to block the next run"

    relaxed = S3CheckpointStore(fake, "bkt", PREFIX, conditional_writes=False)
    other = S3CheckpointStore(fake, "bkt", PREFIX, conditional_writes=False, wait_seconds=0)
    first = len(fake.calls)
    with relaxed.lock("orders", "run-2"):
        relaxed.save(make(2**53 + 1, run_id="run-2"))
        cp = relaxed.load("orders")
        assert cp is not None and cp.last_value == 2**53 + 1
        assert json.loads(fake.objects[f"{PREFIX}/orders.lease.json"])["run_id"] == "run-2"
        with pytest.raises(PipelineBusyError, match=r"already being run \(run run-2"):
            with other.lock("orders", "run-3"):
                pytest.fail("two stores own one pipeline")
        relaxed.delete("orders")
    assert fake.objects == {}
    conditional = [kw for _, _, kw in fake.calls[first:] if {"IfMatch", "IfNoneMatch"} & set(kw)]
    assert len(fake.calls) > first and conditional == [], "no conditional headers once they are off"


def test_the_dagster_resource_fails_fast_when_its_endpoint_is_down(tmp_path, s3_endpoint):
    """The checkpoints resource builds its client from S3Resource's fields; an endpoint that is down fails in seconds."""
    import time

    from conduit_dagster.engine.errors import CheckpointError as Refused
    from conduit_dagster.engine.spec import load_spec_text
    from conduit_dagster.resources import S3CheckpointStoreResource

    spec = load_spec_text(
        "sources: [{name: s, type: sqlite, path: x.db}]\ndestinations: [{name: d, type: local, path: out}]\n"
        "resources: [{name: p, source: s, destination: d, query: SELECT 1}]\n",
        tmp_path / "ingest.yml",
    )
    store = S3CheckpointStoreResource(bucket="some-bucket", endpoint_url="http://127.0.0.1:9", max_attempts=2).open_store(spec)
    started = time.monotonic()
    with pytest.raises(Refused, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9"):
        store.load("p")
    assert time.monotonic() - started < 15


class HonoursOnlyIfNoneMatch(IgnoringS3):
    """Refuses a second create (If-None-Match) but ignores If-Match: checkpoint fencing would silently do nothing."""

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **kw: Any) -> dict[str, Any]:  # noqa: N803
        if kw.get("IfNoneMatch") == "*" and Key in self.objects:
            raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "exists"}}, "PutObject")
        return super().put_object(Bucket=Bucket, Key=Key, Body=Body, **kw)


def test_endpoint_ignoring_if_match_only_is_refused_too():
    fake = HonoursOnlyIfNoneMatch()
    with pytest.raises(CheckpointError, match="does not honour conditional writes"):
        with S3CheckpointStore(fake, "bkt", PREFIX).lock("orders", "run-1"):
            pytest.fail("ran with If-Match ignored")
    assert fake.objects == {}


def test_a_lease_create_whose_response_was_lost_is_still_ours(s3, s3_endpoint, bucket):
    """botocore retries a PUT whose response was lost; the retry of our own If-None-Match create gets 412. The run
    must recognise its own lease (by its token) instead of refusing itself and leaving the lease behind."""
    real = client(s3_endpoint)

    class LosesFirstResponse:
        def __init__(self) -> None:
            self.lost = False

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def put_object(self, **kw: Any) -> Any:
            response = real.put_object(**kw)
            if not self.lost and kw.get("IfNoneMatch") == "*" and kw["Key"].endswith(".lease.json"):
                self.lost = True  # the create landed, then its response was lost and the retry was refused
                raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "exists"}}, "PutObject")
            return response

    store = S3CheckpointStore(LosesFirstResponse(), bucket, PREFIX)
    with store.lock("orders", "run-1"):
        store.save(make(5, run_id="run-1"))
        assert lease_doc(s3, bucket)["run_id"] == "run-1"
    assert f"{PREFIX}/orders.lease.json" not in objects(s3, bucket)
