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
