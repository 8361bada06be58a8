"""An in-memory source for unit tests, shipped beside the protocol it fakes.

It behaves like a database that honours ORDER BY but not the order among ties: rows with equal
checkpoint values come back in a different order on every read (seeded), which is exactly what
resume must survive. ``restrict`` keeps a partition's rows as the SQL sources do (its column's kind
taken from its values' Python type).
"""

import datetime as dt
import random
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.sources.base import (
    Chunk,
    key_range_type_error,
    partition_bounds,
    partition_null_error,
    partition_type_error,
    scan_null_error,
)

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


def _kind(value: Any) -> str | None:
    """The partition kind (base.PARTITION_KINDS) of a Python value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "int"
    if isinstance(value, Decimal):
        return "decimal"
    if isinstance(value, dt.datetime):
        return "timestamptz" if value.tzinfo is not None else "timestamp"
    if isinstance(value, dt.date):
        return "date"
    return None


class MemorySource:
    def __init__(self, rows: list[dict[str, Any]], schema: pa.Schema, *, seed: int = 0) -> None:
        self.all_rows = rows
        self.rows = rows
        self.schema = schema
        self.rng = random.Random(seed)
        self.reads = 0
        self.partition: Partition | None = None

    def describe(self) -> str:
        return "memory://"

    def bind(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def restrict(self, partition: "Partition") -> None:
        column = partition.column
        if column not in self.schema.names:
            raise SourceError(f"source 'memory': partition column {column!r} is not one of {', '.join(self.schema.names)}")
        values = [r[column] for r in self.all_rows]
        if any(v is None for v in values):
            raise partition_null_error("memory", partition)
        kinds = {_kind(v) for v in values}
        if None in kinds or len(kinds) > 1:
            raise partition_type_error("memory", partition, ", ".join(sorted({type(v).__name__ for v in values})))
        if not kinds:  # no rows: nothing to compare
            self.partition, self.rows = partition, []
            return
        lo, hi = partition_bounds("memory", partition, str(kinds.pop()))
        self.partition = partition
        self.rows = [r for r in self.all_rows if (lo is None or lo <= r[column]) and (hi is None or r[column] < hi)]

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        values = [r[column] for r in self.rows]
        if any(v is None for v in values):
            raise scan_null_error("memory", column)
        kinds = {_kind(v) for v in values}
        if None in kinds:
            raise key_range_type_error("memory", column, ", ".join(sorted({type(v).__name__ for v in values})))
        for i in range(0, len(values), 1000):
            yield pa.array(values[i : i + 1000], type=self.schema.field(column).type)

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        self.reads += 1
        rows = list(self.rows)
        if column is not None:
            if resume:
                rows = [r for r in rows if r[column] is None or r[column] > after]
            self.rng.shuffle(rows)
            rows.sort(key=lambda r: (r[column] is None, r[column] if r[column] is not None else 0))
        for i in range(0, len(rows), fetch_size):
            part = rows[i : i + fetch_size]
            batch = pa.RecordBatch.from_pylist(part, schema=self.schema)
            yield Chunk(batch, [r[column] for r in part] if column is not None else None)

    def close(self) -> None:
        pass

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        if upto is None:
            return len(self.rows)
        return sum(1 for r in self.rows if r[upto[0]] is not None and r[upto[0]] <= upto[1])

    def max_value(self, query: str, column: str) -> Any:
        values = [r[column] for r in self.rows if r[column] is not None]
        return max(values) if values else None

    def probe(self, query: str, column: str | None) -> list[str]:
        return list(self.schema.names)

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        values = [r[column] for r in self.rows if r[column] is not None]
        return (type(values[0]),) if values else None
