"""Shared test helpers: reading a destination back and comparing it with the source as multisets."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow.csv as pacsv
import pyarrow.dataset as ds


def output_rows(directory: Path, fmt: str = "parquet") -> list[tuple[Any, ...]]:
    """Every row a reader of the visible output sees, as tuples in column order."""
    if fmt == "jsonl":
        rows = []
        for part in sorted(directory.glob("part-*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                rows.append(tuple(json.loads(line).values()))
        return rows
    if fmt == "csv":
        rows = []
        for part in sorted(directory.glob("part-*.csv")):
            table = pacsv.read_csv(
                part,
                parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True, quoted_strings_can_be_null=False),
            )
            rows.extend(tuple(r.values()) for r in table.to_pylist())
        return rows
    table = ds.dataset(directory, format="parquet").to_table()
    return [tuple(r.values()) for r in table.to_pylist()]


def pg_rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute(query)
            return list(cur.fetchall())
    finally:
        conn.close()


def assert_same_rows(expected: list[tuple[Any, ...]], actual: list[tuple[Any, ...]]) -> None:
    """Multiset equality, with the lost and duplicated rows named when it fails."""
    want, got = Counter(expected), Counter(actual)
    if want == got:
        return
    lost = want - got
    extra = got - want
    raise AssertionError(
        f"destination differs from source: {sum(lost.values())} rows lost, {sum(extra.values())} rows extra "
        f"(of {len(expected)} expected, {len(actual)} present); lost e.g. {list(lost)[:3]}, extra e.g. {list(extra)[:3]}"
    )


def s3_output_rows(client, bucket: str, output: str, *, listing_exact: bool = True) -> list[tuple[Any, ...]]:
    """Every row of an S3 destination's visible output (``output``: the key prefix ending in '/'), read from the
    parts its manifest names; also checks that a reader listing the prefix sees exactly those parts (not while a
    crashed publish awaits its rerun: ``listing_exact=False``)."""
    import io

    import pyarrow.parquet as pq

    manifest = json.loads(client.get_object(Bucket=bucket, Key=output + "_conduit_manifest.json")["Body"].read())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=output)
    listed = sorted(item["Key"][len(output) :] for page in pages for item in page.get("Contents", []))
    if listing_exact:
        assert listed == sorted([*manifest["parts"], "_conduit_manifest.json"]), (
            f"listing {listed} vs manifest {manifest['parts']}"
        )
    rows: list[tuple[Any, ...]] = []
    for name in manifest["parts"]:
        body = client.get_object(Bucket=bucket, Key=output + name)["Body"].read()
        if manifest["format"] == "parquet":
            rows.extend(tuple(r.values()) for r in pq.read_table(io.BytesIO(body)).to_pylist())
        elif manifest["format"] == "jsonl":
            rows.extend(tuple(json.loads(line).values()) for line in body.decode().splitlines())
        else:
            rows.extend(tuple(r.values()) for r in pacsv.read_csv(io.BytesIO(body)).to_pylist())
    return rows
