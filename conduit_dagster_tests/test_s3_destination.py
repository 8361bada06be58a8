"""The S3 destination against a real S3 endpoint (moto's server on 127.0.0.1): staging, replay, resume,
publishing with a manifest, multipart parts, incremental (accumulating) output, and refusing foreign objects."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.destinations.s3 import MANIFEST, S3Destination
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.runner import run_pipeline
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster.engine.spec import S3ConnectionSpec, S3DestinationSpec, load_spec_text
from conduit_dagster_tests.conftest import s3_keys
from conduit_dagster_tests.helpers import assert_same_rows, s3_output_rows


def spec(bucket: str, endpoint: str, fmt: str = "parquet") -> S3DestinationSpec:
    return S3DestinationSpec(name="lake", bucket=bucket, prefix="raw", format=fmt, s3=S3ConnectionSpec(endpoint_url=endpoint))


def table(start: int, n: int) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "name": [f"row {i}" for i in range(start, start + n)]})


def rows(t: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in t.to_pylist()]


def test_parts_stay_invisible_until_publish_and_replayed_batches_overwrite(s3, s3_endpoint, bucket):
    dest = S3Destination(spec(bucket, s3_endpoint), "orders")
    state = dest.start(None).state
    dest.write(0, table(0, 10))
    dest.write(1, table(10, 10))
    dest.write(1, table(10, 10))  # a replay: the same key, overwritten
    assert s3_keys(s3, bucket, "raw/orders/") == []
    staged = s3_keys(s3, bucket, "raw/_conduit_staging/orders/")
    assert staged == [
        f"raw/_conduit_staging/orders/{state['generation']}/part-000000-{dest.attempt}.parquet",
        f"raw/_conduit_staging/orders/{state['generation']}/part-000001-{dest.attempt}.parquet",
    ]
    dest.publish()
    assert_same_rows(rows(table(0, 20)), s3_output_rows(s3, bucket, "raw/orders/"))
    assert s3_keys(s3, bucket, "raw/_conduit_staging/") == []
    assert dest.count() == 20

    # the next full refresh replaces the output whole: no part of the previous one is left
    again = S3Destination(spec(bucket, s3_endpoint), "orders")
    again.start(None)
    again.write(0, table(100, 5))
    assert_same_rows(rows(table(0, 20)), s3_output_rows(s3, bucket, "raw/orders/"))  # still the old output
    again.publish()
    assert_same_rows(rows(table(100, 5)), s3_output_rows(s3, bucket, "raw/orders/"))


def test_resume_drops_parts_past_the_checkpoint_and_refuses_missing_ones(s3, s3_endpoint, bucket):
    first = S3Destination(spec(bucket, s3_endpoint), "orders")
    state = first.start(None).state
    for i in range(4):
        first.write(i, table(i * 10, 10))
    # crashed after writing part 3 but before checkpointing it: the checkpoint says 3 batches
    resumed = S3Destination(spec(bucket, s3_endpoint), "orders")
    assert not resumed.start(state, 3).already_published
    names = [k.rsplit("/", 1)[1] for k in s3_keys(s3, bucket, "raw/_conduit_staging/orders/")]
    a = first.attempt
    assert names == [f"part-000000-{a}.parquet", f"part-000001-{a}.parquet", f"part-000002-{a}.parquet"]
    resumed.write(3, table(30, 3))  # the source now yields fewer rows for that batch
    resumed.publish()
    assert_same_rows(rows(table(0, 33)), s3_output_rows(s3, bucket, "raw/orders/"))

    # a checkpoint whose committed parts are gone cannot be resumed
    lost = S3Destination(spec(bucket, s3_endpoint), "other")
    lost_state = lost.start(None).state
    lost.write(0, table(0, 1))
    s3.delete_object(
        Bucket=bucket, Key=f"raw/_conduit_staging/other/{lost_state['generation']}/part-000000-{lost.attempt}.parquet"
    )
    with pytest.raises(CheckpointError, match="committed part.*missing.*clear-checkpoints"):
        S3Destination(spec(bucket, s3_endpoint), "other").start(lost_state, 1)


def test_crash_after_the_manifest_is_finished_by_the_resumed_run(s3, s3_endpoint, bucket):
    old = S3Destination(spec(bucket, s3_endpoint), "orders")
    old.start(None)
    old.write(0, table(0, 5))
    old.publish()
    dest = S3Destination(spec(bucket, s3_endpoint), "orders")
    state = dest.start(None).state
    dest.write(0, table(50, 5))
    # publish up to the manifest, then "crash" before the clean-up
    original_finish = dest._finish
    dest._finish = lambda *args: None  # type: ignore[method-assign]
    dest.publish()
    dest._finish = original_finish  # type: ignore[method-assign]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"raw/orders/{MANIFEST}")["Body"].read())
    assert manifest["generation"] == state["generation"]
    again = S3Destination(spec(bucket, s3_endpoint), "orders")
    again.set_fence(lambda: None)  # the runner's: this run owns the pipeline
    assert again.start(state, 1).already_published
    assert_same_rows(rows(table(50, 5)), s3_output_rows(s3, bucket, "raw/orders/"))
    assert s3_keys(s3, bucket, "raw/_conduit_staging/") == []


def test_large_parts_go_up_in_multipart_uploads(s3, s3_endpoint, bucket):
    dest = S3Destination(spec(bucket, s3_endpoint, "csv"), "big", multipart_bytes=5 * 1024 * 1024)
    state = dest.start(None).state
    big = pa.table({"id": list(range(200_000)), "pad": ["x" * 60] * 200_000})  # ~13 MB of CSV
    dest.write(0, big)
    head = s3.head_object(Bucket=bucket, Key=f"raw/_conduit_staging/big/{state['generation']}/part-000000-{dest.attempt}.csv")
    assert head["ContentLength"] > 10 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart upload of 3 pieces
    dest.publish()
    assert dest.count() == 200_000


def test_refuses_to_replace_objects_it_did_not_write(s3, s3_endpoint, bucket):
    s3.put_object(Bucket=bucket, Key="raw/orders/precious.parquet", Body=b"not ours")
    with pytest.raises(DestinationError, match="holds objects conduit did not write"):
        S3Destination(spec(bucket, s3_endpoint), "orders").start(None)
    assert s3_keys(s3, bucket, "raw/") == ["raw/orders/precious.parquet"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_pipeline_into_s3_in_each_format(s3, s3_endpoint, bucket, tmp_path, fmt):
    text = f"""
sources:
  - name: mem
    type: sqlite
    path: unused.db
destinations:
  - name: lake
    type: s3
    bucket: {bucket}
    prefix: raw
    format: {fmt}
    endpoint_url: {s3_endpoint}
resources:
  - name: orders
    source: mem
    destination: lake
    resume: true
    checkpoint_column: id
    batch_size: 70
    query: SELECT id, name FROM orders
"""
    resource = load_spec_text(text, tmp_path / "ingest.yml").resource("orders")
    data = table(1, 500)
    store = MemoryCheckpointStore()
    events = list(run_pipeline(resource, store, source=MemorySource(data.to_pylist(), data.schema)))
    assert events[-1].records_processed == 500
    assert_same_rows(rows(data), s3_output_rows(s3, bucket, "raw/orders/"))
    assert store.docs == {}
    parts = s3_keys(s3, bucket, "raw/orders/part-")
    assert len(parts) == 8 and all(p.endswith("." + fmt) for p in parts)
    if fmt == "parquet":
        body = s3.get_object(Bucket=bucket, Key=parts[0])["Body"].read()
        assert pq.read_table(io.BytesIO(body)).schema.names == ["id", "name"]


def test_incremental_runs_add_parts_to_the_output(s3, s3_endpoint, bucket):
    for start in (0, 10):
        dest = S3Destination(spec(bucket, s3_endpoint), "events", accumulate=True)
        dest.start(None)
        dest.write(0, table(start, 10))
        dest.publish()
    assert_same_rows(rows(table(0, 20)), s3_output_rows(s3, bucket, "raw/events/"))
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"raw/events/{MANIFEST}")["Body"].read())
    assert len(manifest["generations"]) == 2 and len(manifest["parts"]) == 2


# --- a run that lost the pipeline while paused (its lease expired and another run took over) ------------------------


def zombie_setup(s3, s3_endpoint, bucket, tmp_path):
    import boto3

    from conduit_dagster.engine.checkpoint_s3 import S3CheckpointStore

    text = f"""
sources: [{{name: mem, type: sqlite, path: unused.db}}]
destinations: [{{name: lake, type: s3, bucket: {bucket}, prefix: raw, endpoint_url: {s3_endpoint}}}]
resources:
  - {{name: orders, source: mem, destination: lake, resume: true, checkpoint_column: id, batch_size: 10, query: SELECT id FROM o}}
"""
    resource = load_spec_text(text, tmp_path / "ingest.yml").resource("orders")
    data = pa.table({"id": list(range(100))})

    def client():
        return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def store():
        return S3CheckpointStore(client(), bucket, "cp")

    def source():
        return MemorySource(data.to_pylist(), data.schema)

    return resource, data, client, store, source


def run_in_thread(target):
    import threading

    errors: list[BaseException] = []

    def body():
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, errors


def test_a_paused_run_waking_at_publish_cannot_wipe_the_output(s3, s3_endpoint, bucket, tmp_path):
    """Z freezes just before publishing; its lease expires; N resumes Z's checkpoint and publishes. When Z wakes, its
    publish must not replace or delete N's output."""
    import threading

    resource, data, client, store, source = zombie_setup(s3, s3_endpoint, bucket, tmp_path)
    at_publish, go = threading.Event(), threading.Event()

    class Paused(S3Destination):
        def publish(self, *args):
            at_publish.set()
            go.wait()
            super().publish(*args)

    zombie = Paused(resource.destination, "orders", client=client())
    thread, errors = run_in_thread(lambda: list(run_pipeline(resource, store(), run_id="Z", source=source(), destination=zombie)))
    assert at_publish.wait(30)
    s3.delete_object(Bucket=bucket, Key="cp/orders.lease.json")  # Z's lease expired while it was frozen
    events = list(run_pipeline(resource, store(), run_id="N", source=source()))
    assert events[-1].records_processed == 100
    assert_same_rows(rows(data), s3_output_rows(s3, bucket, "raw/orders/"))
    go.set()
    thread.join(30)
    assert_same_rows(rows(data), s3_output_rows(s3, bucket, "raw/orders/"))  # still all of N's rows


def test_a_paused_run_waking_at_start_cannot_delete_the_owners_staged_parts(s3, s3_endpoint, bucket, tmp_path):
    """Z takes the pipeline and freezes before starting its destination; N takes over and writes half its batches;
    Z wakes and starts (then is fenced off at its first checkpoint). N must still publish every row."""
    import threading

    resource, data, client, store, source = zombie_setup(s3, s3_endpoint, bucket, tmp_path)
    z_at_start, z_go, n_mid, z_done = (threading.Event() for _ in range(4))

    class ZDest(S3Destination):
        def start(self, *args, **kwargs):
            z_at_start.set()
            z_go.wait()
            return super().start(*args, **kwargs)

    class NDest(S3Destination):
        def write(self, index, *args, **kwargs):
            if index == 5:
                n_mid.set()
                z_done.wait(30)
            return super().write(index, *args, **kwargs)

    def zombie_run():
        try:
            list(
                run_pipeline(
                    resource,
                    store(),
                    run_id="Z",
                    source=source(),
                    destination=ZDest(resource.destination, "orders", client=client()),
                )
            )
        finally:
            z_done.set()

    z_thread, z_errors = run_in_thread(zombie_run)
    assert z_at_start.wait(30)
    s3.delete_object(Bucket=bucket, Key="cp/orders.lease.json")  # Z's lease expired while it was frozen
    n_events: list = []
    n_thread, n_errors = run_in_thread(
        lambda: n_events.extend(
            run_pipeline(
                resource, store(), run_id="N", source=source(), destination=NDest(resource.destination, "orders", client=client())
            )
        )
    )
    assert n_mid.wait(30)
    z_go.set()
    z_thread.join(30)
    n_thread.join(60)
    assert not n_errors, n_errors
    assert z_errors and "no longer owns" in str(z_errors[0]), z_errors
    assert n_events[-1].records_processed == 100
    assert_same_rows(rows(data), s3_output_rows(s3, bucket, "raw/orders/"))


def test_publish_refuses_when_committed_parts_are_missing(s3, s3_endpoint, bucket):
    dest = S3Destination(spec(bucket, s3_endpoint), "orders")
    state = dest.start(None).state
    dest.write(0, table(0, 5))
    dest.write(1, table(5, 5))
    s3.delete_object(Bucket=bucket, Key=f"raw/_conduit_staging/orders/{state['generation']}/part-000000-{dest.attempt}.parquet")
    with pytest.raises(DestinationError, match=r"1 committed part\(s\) of this run are missing.*part 0"):
        dest.publish(2)
    assert s3_keys(s3, bucket, "raw/orders/") == []  # nothing published


def test_a_damaged_manifest_is_named(s3, s3_endpoint, bucket):
    s3.put_object(Bucket=bucket, Key=f"raw/orders/{MANIFEST}", Body=b"{not json")
    with pytest.raises(DestinationError, match=r"raw/orders/_conduit_manifest.json is damaged.*Nothing was changed"):
        S3Destination(spec(bucket, s3_endpoint), "orders").start(None)


def test_a_paused_writer_landing_late_cannot_replace_a_part_the_owner_wrote(s3, s3_endpoint, bucket):
    """A passed its ownership check and was paused inside the PUT of batch 2; B took over, resumed the generation (the
    source had grown) and wrote batches 2-4; A's PUT lands after that. B must publish its own rows, all of them."""
    a = S3Destination(spec(bucket, s3_endpoint), "orders")
    state = a.start(None).state
    a.write(0, table(0, 7))
    a.write(1, table(7, 7))  # checkpoint: 2 batches committed
    b = S3Destination(spec(bucket, s3_endpoint), "orders")
    b.set_fence(lambda: None)
    b_state = b.start(state, 2).state
    assert b_state["attempts"] == [[0, a.attempt], [2, b.attempt]]
    b.write(2, table(14, 7))
    b.write(3, table(21, 7))
    b.write(4, table(28, 2))
    a.write(2, table(14, 5))  # the paused PUT lands now (A's checkpoint save will be refused: too late for it)
    b.publish(5)
    assert_same_rows(rows(table(0, 30)), s3_output_rows(s3, bucket, "raw/orders/"))


def test_a_paused_publisher_finishing_late_cannot_delete_newer_output(s3, s3_endpoint, bucket):
    """A (incremental) committed its manifest and was paused before its clean-up; B resumed and found it published;
    C, the next incremental run, published more parts. A's late clean-up must not touch C's parts."""
    a = S3Destination(spec(bucket, s3_endpoint), "orders", accumulate=True)
    a.start(None)
    a.write(0, table(0, 10))
    paused: dict = {}
    a._finish = lambda *args: paused.update(args=args)  # type: ignore[method-assign]
    a.publish(1)
    del a._finish
    b = S3Destination(spec(bucket, s3_endpoint), "orders", accumulate=True)
    b.set_fence(lambda: None)
    assert b.start({"generation": a.generation, "attempts": [[0, a.attempt]]}, 1).already_published
    c = S3Destination(spec(bucket, s3_endpoint), "orders", accumulate=True)
    c.set_fence(lambda: None)
    c.start(None)
    c.write(0, table(10, 10))
    c.publish(1)
    a._finish(*paused["args"])  # A wakes up
    assert_same_rows(rows(table(0, 20)), s3_output_rows(s3, bucket, "raw/orders/"))
    assert c.count() == 20


def test_a_file_source_on_an_output_prefix_reads_only_the_published_parts(s3, s3_endpoint, bucket):
    """After a publish that crashed between its copies and its manifest, the prefix holds extra parts until the resumed
    run removes them; conduit's own file source, pointed at the prefix, reads only the parts the manifest names."""
    from conduit_dagster.engine.sources.files import FileSource
    from conduit_dagster.engine.spec import FileSourceSpec

    dest = S3Destination(spec(bucket, s3_endpoint), "orders")
    dest.start(None)
    dest.write(0, table(0, 12))
    dest.publish(1)
    (published,) = s3_keys(s3, bucket, "raw/orders/part-")
    s3.copy_object(
        Bucket=bucket, Key="raw/orders/part-0123456789ab-000000.parquet", CopySource={"Bucket": bucket, "Key": published}
    )
    for path in (f"s3://{bucket}/raw/orders/", f"s3://{bucket}/raw/orders/*.parquet", f"s3://{bucket}/raw/"):
        src = FileSource(FileSourceSpec(name="lake", path=path, format="parquet", s3=S3ConnectionSpec(endpoint_url=s3_endpoint)))
        got = [tuple(r.values()) for c in src.read("", "id", None, resume=False, fetch_size=100) for r in c.data.to_pylist()]
        src.close()
        assert_same_rows(rows(table(0, 12)), got)


class Crash(BaseException):
    """Like a kill: not an Exception, so nothing on the way catches it."""


class CrashingClient:
    """The real client, except that call number ``at`` (counting every S3 call the destination makes) crashes just
    before or just after it reaches S3."""

    def __init__(self, real, when: str, at: int) -> None:
        self.real, self.when, self.at, self.calls = real, when, at, 0

    def __getattr__(self, name: str):
        attr = getattr(self.real, name)
        if name in ("meta", "get_paginator") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls += 1
            if (self.when, self.calls) == ("before", self.at):
                raise Crash(f"before {name}")
            result = attr(*args, **kwargs)
            if (self.when, self.calls) == ("after", self.at):
                raise Crash(f"after {name}")
            return result

        return call


@pytest.mark.parametrize(
    "incremental,first", [(False, False), (False, True), (True, False)], ids=["full-refresh", "first-load", "incremental"]
)
def test_a_crash_before_or_after_any_s3_call_then_a_rerun_is_exact(s3, s3_endpoint, tmp_path, incremental, first):
    """A load (the second, or with `first` the very first) crashes before, then after, each S3 call in turn; the rerun
    must leave exactly the source rows (the previous output stays whole until the crashed run's rerun publishes)."""
    import sqlite3
    import uuid

    import boto3

    crashes = 0
    for at in range(1, 200):
        crashed_here = False
        for when in ("before", "after"):
            bucket = f"crash-{uuid.uuid4().hex[:12]}"
            s3.create_bucket(Bucket=bucket)
            case = tmp_path / f"{when}{at}"
            case.mkdir()
            db = sqlite3.connect(case / "s.db")
            db.execute("CREATE TABLE o (id INTEGER, ts INTEGER)")
            db.executemany("INSERT INTO o VALUES (?, ?)", [(i, i // 3) for i in range(30)])
            db.commit()
            load = (
                "incremental_column: ts, initial_value: -1, query: 'SELECT id, ts FROM o WHERE ts >= :last_value'"
                if incremental
                else "resume: true, checkpoint_column: ts, query: 'SELECT id, ts FROM o'"
            )
            text = f"""
sources: [{{name: db, type: sqlite, path: {case}/s.db}}]
destinations: [{{name: lake, type: s3, bucket: {bucket}, prefix: raw, endpoint_url: {s3_endpoint}}}]
resources:
  - {{name: p, source: db, destination: lake, batch_size: 7, {load}}}
"""
            resource = load_spec_text(text, case / "ingest.yml").resource("p")
            store = MemoryCheckpointStore()

            def run(crash: tuple[str, int] | None = None, resource=resource, store=store):
                real = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
                client = CrashingClient(real, *crash) if crash else real
                list(
                    run_pipeline(
                        resource,
                        store,
                        destination=S3Destination(resource.destination, "p", accumulate=incremental, client=client),
                    )
                )

            if not first:
                run()  # a first, complete load
            db.executemany("INSERT INTO o VALUES (?, ?)", [(i, i // 3) for i in range(30, 55)])
            db.commit()
            db.close()
            try:
                run((when, at))
            except Crash:
                crashes += 1
                crashed_here = True
                if s3_keys(s3, bucket, "raw/p/_conduit_manifest.json"):
                    got = sorted(r[0] for r in s3_output_rows(s3, bucket, "raw/p/", listing_exact=False))
                    assert got in (list(range(30)), list(range(55))), f"{when} call {at}: a reader saw a mix"
            run()
            assert sorted(r[0] for r in s3_output_rows(s3, bucket, "raw/p/")) == list(range(55)), f"{when} call {at}"
            assert store.docs == {}
        if not crashed_here:
            break  # past the load's last S3 call
    assert crashes > 15, crashes  # every S3 call of the load was hit, before and after


# --- a paused run against a real, expiring lease (10 s): the next run waits it out and takes over -------------------


def lease_setup(s3, s3_endpoint, tmp_path, *, incremental: bool):
    import sqlite3
    import uuid

    import boto3

    from conduit_dagster.engine.checkpoint_s3 import MIN_LEASE_SECONDS, S3CheckpointStore

    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    db = tmp_path / "s.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE o (id INTEGER, ts INTEGER)")
    conn.executemany("INSERT INTO o VALUES (?, ?)", [(i, i) for i in range(30)])
    conn.commit()
    conn.close()
    load = (
        "incremental_column: ts, initial_value: -1, query: 'SELECT id, ts FROM o WHERE ts >= :last_value'"
        if incremental
        else "resume: true, checkpoint_column: ts, query: 'SELECT id, ts FROM o'"
    )
    text = f"""
sources: [{{name: db, type: sqlite, path: {db}}}]
destinations: [{{name: lake, type: s3, bucket: {bucket}, prefix: raw, endpoint_url: {s3_endpoint}}}]
resources:
  - {{name: p, source: db, destination: lake, batch_size: 10, {load}}}
"""
    resource = load_spec_text(text, tmp_path / "ingest.yml").resource("p")

    def client():
        return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def store():
        return S3CheckpointStore(client(), bucket, "cp", lease_seconds=MIN_LEASE_SECONDS)

    def add_rows(lo: int, hi: int) -> None:
        conn = sqlite3.connect(db)
        conn.executemany("INSERT INTO o VALUES (?, ?)", [(i, i) for i in range(lo, hi)])
        conn.commit()
        conn.close()

    def ids() -> list[int]:
        return sorted(r[0] for r in s3_output_rows(s3, bucket, "raw/p/", listing_exact=False))

    return resource, client, store, add_rows, ids


def freeze(store) -> None:
    """What SIGSTOP does to a run: its lease renewal stops too (its clock goes on)."""
    store._leases["p"].stop.set()


def test_a_frozen_publisher_and_the_run_that_took_over_publish_every_row(s3, s3_endpoint, tmp_path):
    """Incremental. Z committed 3 batches, passed its last ownership check and froze before publishing; N waited its
    lease out, resumed and loaded 20 new rows; Z wakes and publishes its 3 batches just before N publishes. N must
    still publish its own 2 batches (not take Z's partial publish for its own), and no row is ever lost."""
    import threading

    resource, client, store, add_rows, ids = lease_setup(s3, s3_endpoint, tmp_path, incremental=True)
    at_publish, go = threading.Event(), threading.Event()
    z_store = store()

    class ZDest(S3Destination):
        def publish(self, *args):
            freeze(z_store)
            at_publish.set()
            go.wait(60)
            super().publish(*args)

    z_thread, _ = run_in_thread(
        lambda: list(
            run_pipeline(
                resource, z_store, run_id="Z", destination=ZDest(resource.destination, "p", accumulate=True, client=client())
            )
        )
    )
    assert at_publish.wait(30)
    add_rows(30, 50)

    class NDest(S3Destination):
        def publish(self, *args):
            go.set()
            z_thread.join(30)  # Z wakes and publishes first
            super().publish(*args)

    events = list(
        run_pipeline(
            resource, store(), run_id="N", destination=NDest(resource.destination, "p", accumulate=True, client=client())
        )
    )
    assert events[-1].records_processed == 50
    assert ids() == list(range(50))
    add_rows(50, 55)
    list(run_pipeline(resource, store(), run_id="R"))
    assert ids() == list(range(55))


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "full-refresh"])
def test_a_run_frozen_after_its_ownership_check_cannot_clean_up_a_later_runs_objects(s3, s3_endpoint, tmp_path, incremental):
    """Z published, passed the ownership check before its clean-up and froze; N took over and finished; C, the next
    run, published new rows (incremental) or is mid-run (full refresh) when Z wakes and cleans up. Nothing of C's may
    go, and no rerun may be left unable to resume."""
    import threading

    resource, client, store, add_rows, ids = lease_setup(s3, s3_endpoint, tmp_path, incremental=incremental)
    z_store = store()
    frozen, go = threading.Event(), threading.Event()

    class ZDest(S3Destination):
        def set_fence(self, fence):
            def checked_then_frozen():
                fence()  # passes: Z still owns the pipeline
                freeze(z_store)
                frozen.set()
                go.wait(60)

            super().set_fence(checked_then_frozen)

    z_thread, _ = run_in_thread(
        lambda: list(
            run_pipeline(
                resource,
                z_store,
                run_id="Z",
                destination=ZDest(resource.destination, "p", accumulate=incremental, client=client()),
            )
        )
    )
    assert frozen.wait(30)
    list(run_pipeline(resource, store(), run_id="N"))  # waits Z's lease out, finds Z's run published
    add_rows(30, 40)
    if incremental:
        list(run_pipeline(resource, store(), run_id="C"))
        go.set()
        z_thread.join(30)
        assert ids() == list(range(40))
    else:

        class CDest(S3Destination):
            def write(self, index, *args, **kwargs):
                if index == 2:
                    go.set()
                    z_thread.join(30)  # Z wakes mid-run of C
                return super().write(index, *args, **kwargs)

        list(run_pipeline(resource, store(), run_id="C", destination=CDest(resource.destination, "p", client=client())))
        assert ids() == list(range(40))
    add_rows(40, 45)
    list(run_pipeline(resource, store(), run_id="R"))
    assert ids() == list(range(45))


def test_a_reader_listing_while_a_publish_commits_gets_one_whole_output(s3, s3_endpoint, bucket):
    """The file source lists an output folder, then reads its manifest; a publish that commits in between would leave
    it with the parts both listed and named (some of the new output). It notices and lists again: it reads the old
    output or the new one, whole."""
    import threading

    from conduit_dagster.engine.sources.files import FileSource
    from conduit_dagster.engine.spec import FileSourceSpec

    old = S3Destination(spec(bucket, s3_endpoint), "orders")
    old.start(None)
    old.write(0, table(0, 10))
    old.write(1, table(10, 10))
    old.publish(2)
    held, release = threading.Event(), threading.Event()

    class SlowCopies:
        def __init__(self, real):
            self.real, self.copies = real, 0

        def __getattr__(self, name):
            return getattr(self.real, name)

        def copy(self, *args, **kwargs):
            self.copies += 1
            if self.copies > 2:  # the first two copies land, the rest wait
                held.set()
                release.wait(30)
            return self.real.copy(*args, **kwargs)

    new = S3Destination(spec(bucket, s3_endpoint), "orders", client=SlowCopies(s3))
    new.start(None)
    for i in range(4):
        new.write(i, table(100 + 10 * i, 10))
    publishing, errors = run_in_thread(lambda: new.publish(4))
    assert held.wait(30)

    src = FileSource(
        FileSourceSpec(
            name="lake", path=f"s3://{bucket}/raw/orders/", format="parquet", s3=S3ConnectionSpec(endpoint_url=s3_endpoint)
        )
    )
    real = src.client

    class CommitsMidListing:
        def __getattr__(self, name):
            return getattr(real, name)

        def get_object(self, **kwargs):
            if kwargs["Key"].endswith("_conduit_manifest.json") and not release.is_set():
                release.set()
                publishing.join(30)  # the publish commits between the reader's listing and its manifest read
            return real.get_object(**kwargs)

    src.client = CommitsMidListing()
    got = sorted(r["id"] for c in src.read("", "id", None, resume=False, fetch_size=100) for r in c.data.to_pylist())
    src.close()
    assert not errors, errors
    assert got in (list(range(20)), list(range(100, 140))), got
