"""SQLite source: a read-only connection streaming with fetchmany."""

import sqlite3
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.sources.base import Chunk, key_index, rows_to_batch
from conduit_dagster.engine.spec import SqliteSourceSpec
from conduit_dagster.engine.sql import wrap_query


class SqliteSource:
    def __init__(self, spec: SqliteSourceSpec) -> None:
        self.spec = spec
        if not spec.path.is_file():
            raise SourceError(f"source {spec.name!r}: SQLite file {spec.path} does not exist; fix `path` in ingest.yml")
        try:
            self.conn = sqlite3.connect(f"file:{spec.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise SourceError(f"source {spec.name!r}: cannot open {spec.path}: {exc}") from None

    def describe(self) -> str:
        return f"sqlite:///{self.spec.path}"

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        sql = wrap_query(query, column, resume=resume, param=":v")
        try:
            cur = self.conn.execute(sql, {"v": after} if resume else {})
        except sqlite3.Error as exc:
            raise SourceError(f"source {self.spec.name!r}: query failed: {exc}") from None
        names = [d[0] for d in cur.description]
        idx = key_index(names, column, f"source {self.spec.name!r}") if column else None
        # SQLite is dynamically typed: the first type seen per column is kept for the whole run so
        # every part file has one schema.
        types: list[pa.DataType | None] = [None] * len(names)
        while True:
            try:
                rows = cur.fetchmany(fetch_size)
            except sqlite3.Error as exc:
                raise SourceError(f"source {self.spec.name!r}: read failed: {exc}") from None
            if not rows:
                return
            try:
                batch = rows_to_batch(rows, names, types)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SourceError(
                    f"source {self.spec.name!r}: a column changes type between rows ({exc}); CAST it to one type in the query"
                ) from None
            for i, field in enumerate(batch.schema):
                if types[i] is None and not pa.types.is_null(field.type):
                    types[i] = field.type
            yield Chunk(batch, [r[idx] for r in rows] if idx is not None else None)

    def close(self) -> None:
        self.conn.close()
