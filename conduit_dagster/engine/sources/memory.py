"""An in-memory source for unit tests, shipped beside the protocol it fakes.

It behaves like a database that honours ORDER BY but not the order among ties: rows with equal
checkpoint values come back in a different order on every read (seeded), which is exactly what
resume must survive.
"""

import random
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.sources.base import Chunk


class MemorySource:
    def __init__(self, rows: list[dict[str, Any]], schema: pa.Schema, *, seed: int = 0) -> None:
        self.rows = rows
        self.schema = schema
        self.rng = random.Random(seed)
        self.reads = 0

    def describe(self) -> str:
        return "memory://"

    def bind(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

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
