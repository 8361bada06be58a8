"""Hostile cases for the S3 destination, the S3 checkpoint store and file sources (local and on S3, moto's real HTTP
server): each was a way to read rows twice, refuse sorted data, run without a working fence, delete what conduit did
not write or print a secret."""

import datetime as dt
import io
import json
import os
import socket
import subprocess
import time
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.checkpoint_s3 import S3CheckpointStore, _boot_id, _pid_ns
from conduit_dagster.engine.destinations.s3 import S3Destination
from conduit_dagster.engine.errors import CheckpointError, ConduitError, OrderingError, SourceError
from conduit_dagster.engine.runner import run_pipeline
from conduit_dagster.engine.s3 import make_client, public_endpoint
from conduit_dagster.engine.sources.files import FileSource
from conduit_dagster.engine.spec import FileSourceSpec, S3ConnectionSpec, S3DestinationSpec, load_spec_text
from conduit_dagster_tests.conftest import s3_keys
from conduit_dagster_tests.helpers import assert_same_rows, output_rows


def dest_spec(bucket: str, endpoint: str) -> S3DestinationSpec:
    return S3DestinationSpec(
        name="lake", bucket=bucket, prefix="raw", format="parquet", s3=S3ConnectionSpec(endpoint_url=endpoint)
    )


def file_source(path: str, fmt: str, endpoint: str | None = None) -> FileSource:
    conn = S3ConnectionSpec(endpoint_url=endpoint) if endpoint else S3ConnectionSpec()
    return FileSource(FileSourceSpec(name="files", path=path, format=fmt, s3=conn))


def read_all(src: FileSource, column: str | None = None, after: Any = None, fetch_size: int = 1000) -> list[tuple]:
    try:
        chunks = src.read("", column, after, resume=after is not None, fetch_size=fetch_size)
        return [tuple(r.values()) for c in chunks for r in c.data.to_pylist()]
    finally:
        src.close()


# --- file sources reading a conduit output ------------------------------------------------------------------------


@pytest.mark.parametrize("glob", ["part-*.parquet", "part-*", "p*"])
def test_a_glob_naming_the_parts_of_an_output_still_follows_its_manifest(s3, s3_endpoint, bucket, glob):
    """`s3://lake/raw/orders/part-*.parquet` is the obvious way to read a conduit output. Its listing started at the
    text before the wildcard (`raw/orders/part-`), which leaves out `_conduit_manifest.json`: the copies a publish that
    crashed before its manifest left beside the output (until the rerun removes them) were read too, every row twice."""
    dest = S3Destination(dest_spec(bucket, s3_endpoint), "orders")
    dest.start(None)
    dest.write(0, pa.table({"id": list(range(12))}))
    dest.publish(1)
    (published,) = s3_keys(s3, bucket, "raw/orders/part-")
    # what a later full refresh killed between its copies and its manifest leaves: another generation's copy
    s3.copy_object(
        Bucket=bucket, Key="raw/orders/part-0123456789ab-000000.parquet", CopySource={"Bucket": bucket, "Key": published}
    )
    got = read_all(file_source(f"s3://{bucket}/raw/orders/{glob}", "parquet", s3_endpoint))
    assert_same_rows([(i,) for i in range(12)], got)


# --- the S3 checkpoint store: taking over a dead run's lease ------------------------------------------------------


class Endpoint:
    """The real client behind an S3-compatible endpoint of another kind: one that ignores If-Match (``drop``) or
    answers 501 to any conditional header (``refuse``), as servers without conditional writes do."""

    def __init__(self, real: Any, mode: str) -> None:
        self.real, self.mode = real, mode

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name not in ("put_object", "delete_object"):
            return attr

        def call(**kwargs: Any) -> Any:
            conditional = {k for k in ("IfMatch", "IfNoneMatch") if k in kwargs}
            if self.mode == "drop":
                kwargs.pop("IfMatch", None)
            elif conditional:
                raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no conditional writes"}}, name)
            return attr(**kwargs)

        return call


def dead_run_lease(s3: Any, bucket: str, prefix: str) -> None:
    """The lease a run of this machine leaves when it is SIGKILLed: it names a process that no longer exists."""

    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    doc = {"run_id": "run-dead", "token": "t", "host": socket.gethostname(), "boot_id": _boot_id(), "pid": proc.pid}
    doc |= {"pid_ns": _pid_ns(), "lease_seconds": 60, "renewed_at": "2026-01-01T00:00:00+00:00"}
    assert os.path.exists("/proc/sys/kernel/random/boot_id")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/orders.lease.json", Body=json.dumps(doc).encode())


def test_taking_over_a_dead_runs_lease_checks_that_the_endpoint_fences(s3, s3_endpoint, bucket):
    """The check that the endpoint honours conditional writes ran only when a run created the lease. After a crash the
    next run takes the dead run's lease over instead, and on an endpoint that honours If-None-Match but ignores If-Match
    it ran with checkpoint fencing silently off."""

    dead_run_lease(s3, bucket, "cp")
    store = S3CheckpointStore(Endpoint(boto3.client("s3", endpoint_url=s3_endpoint), "drop"), bucket, "cp")
    with pytest.raises(CheckpointError, match="does not honour conditional writes.*conditional_writes: false"):
        with store.lock("orders", "run-next"):
            pytest.fail("ran on an endpoint that ignores If-Match")
    assert s3_keys(s3, bucket) == [], "the dead run's lease is not left to block the next run either"


def test_without_conditional_writes_a_dead_runs_lease_is_still_taken_over(s3, s3_endpoint, bucket):
    """With `conditional_writes: false` (an endpoint that answers 501 to If-Match), the takeover of a dead run's lease
    still sent If-Match: every later run failed on the dead lease, which nothing would ever remove."""

    dead_run_lease(s3, bucket, "cp")
    store = S3CheckpointStore(
        Endpoint(boto3.client("s3", endpoint_url=s3_endpoint), "refuse"), bucket, "cp", conditional_writes=False
    )
    with store.lock("orders", "run-next"):
        lease = json.loads(s3.get_object(Bucket=bucket, Key="cp/orders.lease.json")["Body"].read())
        assert lease["run_id"] == "run-next"
    assert s3_keys(s3, bucket) == []


# --- file sources: checkpoint-column values ------------------------------------------------------------------------

BERLIN_FALL_BACK = dt.datetime(2024, 10, 27, 0, 0, tzinfo=dt.UTC)  # 03:00 CEST becomes 02:00 CET at 01:00 UTC


def local_files_pipeline(tmp_path: Any, path: str, column: str, batch_size: int) -> Any:
    text = f"""
sources: [{{name: files, type: file, path: {path}, format: parquet, resume: true, checkpoint_column: {column}}}]
destinations: [{{name: out, type: local, path: out}}]
resources: [{{name: events, source: files, destination: out, batch_size: {batch_size}}}]
"""
    return load_spec_text(text, tmp_path / "ingest.yml").resources[0]


def berlin(quarters: range) -> pa.Array:
    values = [BERLIN_FALL_BACK + dt.timedelta(minutes=15 * q) for q in quarters]
    return pa.array(values, pa.timestamp("us", "Europe/Berlin"))


def test_a_zoned_timestamp_column_sorted_across_a_dst_fall_back_loads_and_resumes_exactly(tmp_path):
    """Rows sorted by a Europe/Berlin timestamp run 02:00..02:45 CEST, then 02:00..02:45 CET again. Python compares two
    datetimes of one zone by wall clock (fold ignored): where a chunk or file ended at 02:45 CEST and the next began at
    02:00 CET, the sorted data was refused as going backwards, and could not be loaded at all."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"ts": berlin(range(0, 12)), "id": list(range(12))}), tmp_path / "in" / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"ts": berlin(range(12, 20)), "id": list(range(12, 20))}), tmp_path / "in" / "b.parquet")
    expected = [(r["ts"], r["id"]) for r in pq.read_table(tmp_path / "in").to_pylist()]
    resource = local_files_pipeline(tmp_path, str(tmp_path / "in") + "/", "ts", batch_size=3)
    store = LocalCheckpointStore(tmp_path / "checkpoints")

    # a first run stops after some batches (as a crash would), the second resumes from its checkpoint
    events = run_pipeline(resource, store, run_id="first")
    for event in events:
        if getattr(event, "index", -1) == 4:
            break
    events.close()
    checkpoint = store.load("events")
    assert checkpoint is not None and checkpoint.batches_committed == 5
    list(run_pipeline(resource, store, run_id="second"))
    assert_same_rows(expected, output_rows(tmp_path / "out" / "events"))


def test_a_zoned_timestamp_that_goes_back_across_a_dst_fall_back_is_reported(tmp_path):
    """The other side of the same comparison: 02:30 CET (01:30 UTC) then 02:45 CEST (00:45 UTC) goes back 45 minutes,
    but its wall clock goes forward, and the step passed the order check (rows a resume would then skip or repeat)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"ts": berlin(range(0, 7))}), tmp_path / "in" / "a.parquet")  # ends 02:30 CET
    pq.write_table(pa.table({"ts": berlin(range(3, 5))}), tmp_path / "in" / "b.parquet")  # 02:45 CEST, 02:00 CET
    src = file_source(str(tmp_path / "in") + "/", "parquet")
    with pytest.raises(OrderingError, match=r"goes backwards in .*b\.parquet at row 1"):
        read_all(src, "ts")


# --- the S3 destination ---------------------------------------------------------------------------------------------


def test_publishing_never_deletes_objects_beside_the_output_that_conduit_did_not_write(s3, s3_endpoint, bucket):
    """The clean-up after a publish removed every old object under `<output>/part-` that the manifest did not name, so a
    file someone put beside the output (`part-notes.txt`, `part-2024/summary.csv`) was deleted by the next run."""
    first = S3Destination(dest_spec(bucket, s3_endpoint), "orders")
    first.set_fence(lambda: None)
    first.start(None)
    first.write(0, pa.table({"id": [1, 2]}))
    first.publish(1)
    (published,) = s3_keys(s3, bucket, "raw/orders/part-")
    theirs = {"raw/orders/part-notes.txt": b"notes", "raw/orders/part-2024/summary.csv": b"a,b\n1,2\n"}
    for key, data in theirs.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    leftover = "raw/orders/part-0123456789ab-000000.parquet"  # a crashed publish's copy: conduit's, and removed
    s3.copy_object(Bucket=bucket, Key=leftover, CopySource={"Bucket": bucket, "Key": published})
    time.sleep(3)  # older than the next manifest by more than the clean-up's margin
    second = S3Destination(dest_spec(bucket, s3_endpoint), "orders")
    second.set_fence(lambda: None)
    second.start(None)
    second.write(0, pa.table({"id": [3]}))
    second.publish(1)
    for key, data in theirs.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data, f"{key} was deleted"
    assert leftover not in s3_keys(s3, bucket, "raw/orders/")
    assert_same_rows([(3,)], read_all(file_source(f"s3://{bucket}/raw/orders/*.parquet", "parquet", s3_endpoint)))


# --- secrets --------------------------------------------------------------------------------------------------------


def test_credentials_in_the_environments_endpoint_url_are_never_printed(monkeypatch, s3_endpoint, tmp_path):
    """ingest.yml refuses an endpoint_url holding user:password@, but AWS_ENDPOINT_URL_S3 (or an S3Resource's
    endpoint_url) reaches botocore unchecked, and every S3 error message printed the endpoint as the client has it."""
    secret = "SuperSecret99"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://admin:{secret}@127.0.0.1:9")
    assert public_endpoint(f"https://k:{secret}@s3.example/?X-Amz-Credential={secret}") == "https://s3.example/"

    attempts = []
    src = file_source("s3://some-bucket/in/", "csv")
    attempts.append(lambda: read_all(src))
    dest = S3Destination(S3DestinationSpec(name="lake", bucket="some-bucket", prefix="raw", format="parquet"), "orders")
    attempts.append(lambda: dest.start(None))
    store = S3CheckpointStore(make_client(S3ConnectionSpec()), "some-bucket", "cp")
    attempts.append(lambda: store.load("orders"))
    for attempt in attempts:
        with pytest.raises(ConduitError) as info:
            attempt()
        message = str(info.value)
        assert "cannot reach the S3 endpoint http://127.0.0.1:9" in message, message
        assert secret not in message and "admin" not in message, message


# --- file sources on S3: an object replaced while it is read ---------------------------------------------------------


def big_parquet(first: int, n: int) -> bytes:
    """Plain, uncompressed int64 in two row groups: two versions with other values have the very same layout."""
    buffer = io.BytesIO()
    table = pa.table({"id": pa.array(range(first, first + n), pa.int64())})
    pq.write_table(table, buffer, row_group_size=n // 2, compression="none", use_dictionary=False, write_statistics=False)
    return buffer.getvalue()


def test_a_parquet_object_replaced_while_it_is_read_stops_the_run_instead_of_mixing_versions(s3, s3_endpoint, bucket):
    """Parquet on S3 is read by ranged GETs: the footer first, then each row group when its turn comes. An object
    overwritten in between (same size, other rows) gave the first row groups of the old version and the rest of the
    new one, silently: rows of both versions lost and none of either whole."""
    n = 1_500_000  # 12 MB: more than one buffered read (8 MiB)
    old, new = big_parquet(0, n), big_parquet(10**9, n)
    assert len(old) == len(new)
    s3.put_object(Bucket=bucket, Key="in/a.parquet", Body=old)
    src = file_source(f"s3://{bucket}/in/", "parquet", s3_endpoint)
    seen: list[int] = []
    with pytest.raises(SourceError, match=rf"s3://{bucket}/in/a\.parquet changed while this run read it .*Run again"):
        try:
            for i, chunk in enumerate(src.read("", "id", None, resume=False, fetch_size=n // 2)):
                seen += chunk.data.column(0).to_pylist()
                if i == 0:
                    s3.put_object(Bucket=bucket, Key="in/a.parquet", Body=new)
        finally:
            src.close()
    assert seen == list(range(n // 2)), "only rows of the version listed"
    # the next run reads the file as it is now, whole
    assert read_all(file_source(f"s3://{bucket}/in/", "parquet", s3_endpoint), fetch_size=n) == [
        (i,) for i in range(10**9, 10**9 + n)
    ]


# --- file sources: values larger than a parse block ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_value_larger_than_a_parse_block_is_read_whole_and_no_row_twice(tmp_path, fmt):
    """CSV is parsed in 1 MiB blocks and JSON Lines in 1 MiB blocks too; a row longer than that (one 3 MiB text value, a
    valid file) stopped the run with "straddling object straddles two block boundaries ... fix the file". The CSV file
    is now read again with larger blocks, skipping the rows already given, so none is lost or given twice."""
    big = "x" * (3 << 20)
    ids = list(range(60_000))
    values = {i: (big if i == 50_000 else f"v{i}") for i in ids}  # the big row well after the first blocks
    if fmt == "csv":
        text = "id,v\n" + "".join(f'{i},"{values[i]}"\n' for i in ids)
    else:
        text = "".join(json.dumps({"id": i, "v": values[i]}) + "\n" for i in ids)
    path = tmp_path / f"a.{fmt}"
    path.write_text(text, encoding="utf-8")
    rows = read_all(file_source(str(path), fmt), "id", fetch_size=7000)
    assert [r[0] for r in rows] == ids
    assert rows[50_000][1] == big and rows[49_999][1] == "v49999"
    resumed = read_all(file_source(str(path), fmt), "id", after=49_999, fetch_size=7000)
    assert [r[0] for r in resumed] == ids[50_000:] and resumed[0][1] == big


def test_a_quote_never_closed_is_not_taken_for_a_large_value(tmp_path):
    """Reading again with larger blocks must not turn a quote that is never closed (the rest of the file, 2 MiB of
    rows, swallowed into one value) into a success."""
    path = tmp_path / "a.csv"
    rows = "".join(f"{i},v{i}\n" for i in range(1000, 200_000))
    path.write_text('id,v\n1,fine\n2,"never closed\n' + rows, encoding="utf-8")
    with pytest.raises(SourceError, match=r"a\.csv has a quote that is never closed"):
        read_all(file_source(str(path), "csv"), "id")


# --- a manifest someone else wrote ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest,message",
    [
        ({"parts": [["part-a.csv"]]}, r"_conduit_manifest\.json is damaged \(its 'parts' is not a list of names\)"),
        ({"parts": ["part-a.csv", "part-gone.csv"]}, r"names s3://.*/in/part-gone\.csv, which does not exist"),
    ],
    ids=["not-names", "names-a-missing-part"],
)
def test_a_planted_or_damaged_manifest_is_named_with_the_fix(s3, s3_endpoint, bucket, manifest, message):
    """A manifest whose parts are not names failed with a bare TypeError from deep inside the listing; one that names
    a part that does not exist was retried as a publish in progress and then reported as "kept being republished"."""
    s3.put_object(Bucket=bucket, Key="in/part-a.csv", Body=b"id\n1\n")
    s3.put_object(Bucket=bucket, Key="in/_conduit_manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(SourceError, match=message):
        read_all(file_source(f"s3://{bucket}/in/", "csv", s3_endpoint))
