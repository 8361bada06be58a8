"""Hostile cases for the S3 destination, the S3 checkpoint store and file sources (local and on S3, moto's real HTTP
server): each was a way to read rows twice, refuse sorted data, run without a working fence, delete what conduit did
not write or print a secret."""

import datetime as dt
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.destinations.s3 import S3Destination
from conduit_dagster.engine.sources.files import FileSource
from conduit_dagster.engine.spec import FileSourceSpec, S3ConnectionSpec, S3DestinationSpec
from conduit_dagster_tests.conftest import s3_keys
from conduit_dagster_tests.helpers import assert_same_rows


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
