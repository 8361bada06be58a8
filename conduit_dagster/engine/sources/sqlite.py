"""SQLite source: a read-only connection streaming with fetchmany.

SQLite is dynamically typed, so each column's Arrow type is fixed once per run: from its first
non-NULL value, or, for a column that is all NULL in the rows read so far, from a probe of the
whole query (``typeof`` of its first non-NULL value). Every part file then has one schema, and a
resumed run derives the same one.
"""

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.sources.base import Chunk, key_index, rows_to_batch
from conduit_dagster.engine.spec import _Entry, entry_path
from conduit_dagster.engine.sql import clean_query, quote_ident, wrap_query


@dataclass(frozen=True)
class SqliteSourceSpec:
    """ingest.yml `type: sqlite` source: a database file, read only."""

    name: str
    path: Path
    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "sqlite"


_TYPEOF = {"integer": pa.int64(), "real": pa.float64(), "text": pa.string(), "blob": pa.binary()}


class SqliteSource:
    def __init__(self, spec: SqliteSourceSpec) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        if not spec.path.is_file():
            raise SourceError(f"source {spec.name!r}: SQLite file {spec.path} does not exist; fix `path` in ingest.yml")
        try:
            self.conn = sqlite3.connect(f"file:{spec.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise SourceError(f"source {spec.name!r}: cannot open {spec.path}: {exc}") from None

    def describe(self) -> str:
        return f"sqlite:///{self.spec.path}"

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``: SQLite's own syntax)."""
        self.params = dict(params)

    def _fail(self, what: str, exc: Exception) -> SourceError:
        return SourceError(f"source {self.spec.name!r} ({self.spec.path}): {what}: {exc}")

    def _probe_type(self, query: str, column: str) -> pa.DataType:
        sql = (
            f"SELECT typeof(conduit_src.{quote_ident(column)}) FROM (\n{clean_query(query)}\n) AS conduit_src "
            f"WHERE conduit_src.{quote_ident(column)} IS NOT NULL LIMIT 1"
        )
        row = self.conn.execute(sql, self.params).fetchone()
        return _TYPEOF.get(row[0], pa.string()) if row else pa.string()

    def probe(self, query: str, column: str | None) -> list[str]:
        try:
            cur = self.conn.execute(f"SELECT * FROM (\n{clean_query(query)}\n) AS conduit_src LIMIT 0", self.params)
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None
        names = [d[0] for d in cur.description]
        if column is not None:
            key_index(names, column, f"source {self.spec.name!r}")
        return names

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        try:
            sql = f"SELECT count(*) FROM (\n{clean_query(query)}\n) AS conduit_src"
            params = dict(self.params)
            if upto is not None:  # the rows up to a value, in the order resume uses
                sql += f" WHERE {quote_ident(upto[0])} COLLATE BINARY <= :conduit_upto"
                params["conduit_upto"] = upto[1]
            return int(self.conn.execute(sql, params).fetchone()[0])
        except sqlite3.Error as exc:
            raise self._fail("count failed", exc) from None

    def max_value(self, query: str, column: str) -> Any:
        sql = f"SELECT max({quote_ident(column)} COLLATE BINARY) FROM (\n{clean_query(query)}\n) AS conduit_src"
        try:
            return self.conn.execute(sql, self.params).fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        try:
            arrow_t = self._probe_type(query, column)
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None
        return {pa.int64(): (int,), pa.float64(): (float, int), pa.string(): (str,), pa.binary(): (bytes,)}.get(arrow_t)

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        # COLLATE BINARY: a column declared NOCASE (or any collation) would otherwise make ">" skip rows that
        # Python sees as different; BINARY on UTF-8 text is Python's str order. Numbers are unaffected.
        sql = wrap_query(query, column, resume=resume, param=":v", collate="BINARY")
        try:
            cur = self.conn.execute(sql, {**self.params, "v": after} if resume else self.params)
            names = [d[0] for d in cur.description]
            idx = key_index(names, column, f"source {self.spec.name!r}") if column else None
            types: list[pa.DataType | None] = [None] * len(names)
            while True:
                rows = cur.fetchmany(fetch_size)
                if not rows:
                    return
                batch = rows_to_batch(rows, names, types)
                for i, field in enumerate(batch.schema):
                    if types[i] is None:
                        types[i] = field.type if not pa.types.is_null(field.type) else self._probe_type(query, names[i])
                if batch.schema != pa.schema(list(zip(names, types, strict=True))):
                    batch = rows_to_batch(rows, names, types)
                yield Chunk(batch, [r[idx] for r in rows] if idx is not None else None)
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise SourceError(
                f"source {self.spec.name!r}: a column holds values of different types ({exc}); CAST it to one type in the query"
            ) from None

    def close(self) -> None:
        self.conn.close()


# --- the backend: ingest.yml `type: sqlite` ----------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str, resume: bool, column: str | None) -> SqliteSourceSpec:
    e.finish(_KEYS)
    return SqliteSourceSpec(name=name, path=entry_path(e, file.parent), resume=resume, checkpoint_column=column)


_KEYS = frozenset({"name", "type", "resume", "checkpoint_column", "path"})
BACKEND = register_source_backend(
    SourceBackend(
        type="sqlite",
        keys=_KEYS,
        parse=_parse,
        open=SqliteSource,
        identity=lambda s: f"sqlite:{s.path}",
        kinds=lambda s: {"sqlite"},
    )
)
