"""SQLite source: a read-only connection streaming with fetchmany.

SQLite is dynamically typed, so each column's Arrow type is fixed once per run: from the first
chunk's values (5 and 5.5 in one chunk: REAL), or, for a column that is all NULL in them, from a
probe of the whole query (``typeof`` of its first non-NULL value; text if it has none). Every part
file then has one schema, and a resumed run derives the same one. A run restricted to a partition
fixes them the same way from the whole query (its first rows, a bounded sample, and the same probe),
never from the partition's own rows: every partition writes the schema of the unpartitioned load.

Partitions (``restrict``): the query is wrapped as ``SELECT * FROM (<query>) AS conduit_part WHERE col >= :lo AND col
< :hi``. SQLite has no date type, so the partition column's first non-NULL value tells how it is compared:

- an integer: key ranges, bound as integers;
- text written as an ISO date, ``YYYY-MM-DD``: time windows compare it with the window's dates as text (the windows
  must start at midnight);
- text written as an ISO date and time, ``YYYY-MM-DD HH:MM[:SS[.fff]]`` (or with ``T``): time windows compare it with
  the window's wall-clock bounds in the partition's zone written ``YYYY-MM-DD HH:MM`` with the same separator, which
  sorts byte-wise exactly where the time does (a window starts on a whole hour);
- anything else (real numbers, text with a UTC offset or in another form, blobs) is refused.

Every value must have that one form: the first statement checks it, with the absence of NULL, in one query (a pass
over the query's rows, since a value written otherwise would fall outside every window, or into the wrong one).
"""

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.sources.base import (
    Chunk,
    iso_text_bounds,
    iso_text_form,
    iso_text_glob,
    key_index,
    key_range_type_error,
    partition_bounds,
    partition_null_error,
    partition_type_error,
    partition_where,
    rows_to_batch,
    scan_null_error,
)
from conduit_dagster.engine.spec import _Entry, entry_path
from conduit_dagster.engine.sql import clean_query, quote_ident, wrap_query

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


@dataclass(frozen=True)
class SqliteSourceSpec:
    """ingest.yml `type: sqlite` source: a database file, read only."""

    name: str
    path: Path
    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "sqlite"


_TYPEOF = {"integer": pa.int64(), "real": pa.float64(), "text": pa.string(), "blob": pa.binary()}
SCAN_ROWS = 100_000
_NO_ROWS = "0"  # the condition of a partition whose query returned no rows yet


class SqliteSource:
    def __init__(self, spec: SqliteSourceSpec) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        self._partition: Partition | None = None
        # the query text -> the partition's condition on it and that condition's parameters
        self._restrictions: dict[str, tuple[str, dict[str, Any]]] = {}
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

    def _text(self, query: str) -> str:
        """The query every statement runs: trailing ';' and comments off, restricted to the partition's rows."""
        text = clean_query(query)
        if self._partition is None:
            return text
        found = self._restrictions.get(text)
        if found is None:
            try:
                found = self._restriction(text)
            except sqlite3.Error as exc:
                raise self._fail("query failed", exc) from None
            if found[0] != _NO_ROWS:  # asked again: rows that come later tell how the column is written
                self._restrictions[text] = found
        return f"SELECT * FROM (\n{text}\n) AS conduit_part\nWHERE {found[0]}"

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = dict(self.params)
        for _, bounds in self._restrictions.values():
            params.update(bounds)
        return {**params, **extra}

    # --- partitions ---------------------------------------------------------------------------------------------

    def restrict(self, partition: "Partition") -> None:
        """Every later statement sees only the partition's rows (see the module's docstring for how they compare)."""
        self._partition = partition
        self._restrictions = {}

    def _restriction(self, text: str) -> tuple[str, dict[str, Any]]:
        p = self._partition
        assert p is not None
        names = [d[0] for d in self.conn.execute(f"SELECT * FROM (\n{text}\n) AS conduit_part LIMIT 0", self.params).description]
        if p.column not in names:
            raise SourceError(
                f"source {self.spec.name!r}: partition column {p.column!r} is not a column of the query's result "
                f"(columns: {', '.join(names)}); fix `partitions: column` or select the column"
            )
        col = f"conduit_part.{quote_ident(p.column)}"
        first = self.conn.execute(
            f"SELECT typeof({col}), {col} FROM (\n{text}\n) AS conduit_part WHERE {col} IS NOT NULL LIMIT 1", self.params
        ).fetchone()
        windows = p.timezone is not None
        if first is None:  # no value to tell the column's form by: no row to select either (unless NULLs)
            null = self.conn.execute(
                f"SELECT EXISTS (SELECT 1 FROM (\n{text}\n) AS conduit_part WHERE {col} IS NULL)", self.params
            ).fetchone()[0]
            if null:
                raise partition_null_error(self.spec.name, p)
            return _NO_ROWS, {}
        storage, form = first[0], iso_text_form(first[1]) if first[0] == "text" else None
        lo: Any
        hi: Any
        if storage == "integer":
            lo, hi = partition_bounds(self.spec.name, p, "int")
            valid, expr = f"typeof({col}) = 'integer'", col
        elif storage == "text" and form is not None and windows:
            lo, hi = iso_text_bounds(self.spec.name, p, form)
            pattern, _ = iso_text_glob(form)
            valid = f"typeof({col}) = 'text' AND {col} GLOB '{pattern}'"
            if form != "date":  # seconds and fractions may follow, a time zone may not
                valid += f" AND substr({col}, 17) NOT GLOB '*[^0-9:.]*'"
            expr = f"{col} COLLATE BINARY"
        else:
            shown = f"{storage} (such as {first[1]!r})" if first is not None and storage == "text" else storage
            fix = None
            if windows:
                fix = (
                    "on SQLite, dates written as ISO text ('YYYY-MM-DD', or 'YYYY-MM-DD HH:MM:SS' without a zone); select it "
                    f"so in the query (e.g. strftime('%Y-%m-%d %H:%M:%S', {p.column}) AS {p.column}), or use key ranges"
                )
            raise partition_type_error(self.spec.name, p, shown, fix)
        null, other = self.conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM (\n{text}\n) AS conduit_part WHERE {col} IS NULL), "
            f"(SELECT quote({col}) FROM (\n{text}\n) AS conduit_part WHERE {col} IS NOT NULL AND NOT ({valid}) LIMIT 1)",
            self.params,
        ).fetchone()
        if null:
            raise partition_null_error(self.spec.name, p)
        if other is not None:
            c = p.column
            if storage == "integer":
                what, fix = "integers", f"CAST({c} AS INTEGER) AS {c}"
            else:
                what, fix = f"text such as {first[1] if first else ''!r}", f"strftime('%Y-%m-%d %H:%M:%S', {c}) AS {c}"
            raise SourceError(
                f"{partition_where(self.spec.name, p)}: partition column {c!r} holds {what}, but also {other}, which "
                "does not compare with the partition's bounds as they do (SQLite keeps each value as it was written), so "
                f"its row could land in no partition or the wrong one; nothing was read. Select the column in one form in "
                f"the query (e.g. {fix})"
            )
        n = len(self._restrictions)
        params: dict[str, Any] = {}
        conditions = []
        for op, name, value in ((">=", f"conduit_lo_{n}", lo), ("<", f"conduit_hi_{n}", hi)):
            if value is not None:
                conditions.append(f"{expr} {op} :{name}")
                params[name] = value
        return " AND ".join(conditions) or f"{col} IS NOT NULL", params

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        """The column's values for key-range planning: one statement without ORDER BY, fetched in chunks."""
        text = self._text(query)
        sql = f"SELECT conduit_src.{quote_ident(column)} FROM (\n{text}\n) AS conduit_src"
        try:
            cur = self.conn.execute(f"SELECT * FROM (\n{text}\n) AS conduit_src LIMIT 0", self._params())
            names = [d[0] for d in cur.description]
            if column not in names:
                raise SourceError(
                    f"source {self.spec.name!r}: partition column {column!r} is not a column of the query's result "
                    f"(columns: {', '.join(names)}); fix `partitions: column` or select the column"
                )
            cur = self.conn.execute(sql, self._params())
            while True:
                rows = cur.fetchmany(SCAN_ROWS)
                if not rows:
                    return
                values = [r[0] for r in rows]
                if not all(type(v) is int for v in values):
                    if any(v is None for v in values):
                        raise scan_null_error(self.spec.name, column)
                    odd = next(v for v in values if type(v) is not int)
                    shown = {float: "real", str: "text", bytes: "blob"}.get(type(odd), type(odd).__name__)
                    raise key_range_type_error(self.spec.name, column, f"{shown} ({odd!r})")
                yield pa.array(values, type=pa.int64())
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None
        except OverflowError:
            raise key_range_type_error(self.spec.name, column, "integer past 64 bits") from None

    def _probe_type(self, query: str, column: str, *, whole: bool = False) -> pa.DataType:
        """The storage class of the column's first non-NULL value (text if it has none), in the partition's rows, or in
        the whole query's (``whole``: how a column's Arrow type is fixed, the same in every partition)."""
        text, params = (clean_query(query), self.params) if whole else (self._text(query), self._params())
        sql = (
            f"SELECT typeof(conduit_src.{quote_ident(column)}) FROM (\n{text}\n) AS conduit_src "
            f"WHERE conduit_src.{quote_ident(column)} IS NOT NULL LIMIT 1"
        )
        row = self.conn.execute(sql, params).fetchone()
        return _TYPEOF.get(row[0], pa.string()) if row else pa.string()

    def _whole_types(self, query: str, names: list[str], size: int) -> list[pa.DataType | None]:
        """A partition's column types, taken as an unpartitioned run of the whole query takes them: from its first
        ``size`` rows (a bounded sample, in the database's own order, not restricted to the partition), and, for a
        column NULL throughout them, from its first non-NULL value in the whole query (text if none). Every partition
        so writes one schema, whatever its own rows hold (5 in one and 5.5 in another: REAL in both)."""
        rows = self.conn.execute(f"SELECT * FROM (\n{clean_query(query)}\n) AS conduit_src LIMIT {int(size)}", self.params)
        batch = rows_to_batch(rows.fetchall(), names, [None] * len(names))
        return [
            self._probe_type(query, name, whole=True) if pa.types.is_null(field.type) else field.type
            for name, field in zip(names, batch.schema, strict=True)
        ]

    def probe(self, query: str, column: str | None) -> list[str]:
        try:
            cur = self.conn.execute(f"SELECT * FROM (\n{self._text(query)}\n) AS conduit_src LIMIT 0", self._params())
        except sqlite3.Error as exc:
            raise self._fail("query failed", exc) from None
        names = [d[0] for d in cur.description]
        if column is not None:
            key_index(names, column, f"source {self.spec.name!r}")
        return names

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        try:
            sql = f"SELECT count(*) FROM (\n{self._text(query)}\n) AS conduit_src"
            params = self._params()
            if upto is not None:  # the rows up to a value, in the order resume uses
                sql += f" WHERE {quote_ident(upto[0])} COLLATE BINARY <= :conduit_upto"
                params["conduit_upto"] = upto[1]
            return int(self.conn.execute(sql, params).fetchone()[0])
        except sqlite3.Error as exc:
            raise self._fail("count failed", exc) from None

    def max_value(self, query: str, column: str) -> Any:
        try:
            sql = f"SELECT max({quote_ident(column)} COLLATE BINARY) FROM (\n{self._text(query)}\n) AS conduit_src"
            return self.conn.execute(sql, self._params()).fetchone()[0]
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
        try:
            sql = wrap_query(self._text(query), column, resume=resume, param=":v", collate="BINARY")
            cur = self.conn.execute(sql, self._params(v=after) if resume else self._params())
            names = [d[0] for d in cur.description]
            idx = key_index(names, column, f"source {self.spec.name!r}") if column else None
            # fixed by the first rows (of the whole query, when restricted to a partition: see _whole_types)
            types = [None] * len(names) if self._partition is None else self._whole_types(query, names, max(1, fetch_size))
            while True:
                rows = cur.fetchmany(fetch_size)
                if not rows:
                    return
                batch = rows_to_batch(rows, names, types)
                for i, field in enumerate(batch.schema):
                    if types[i] is None:
                        null = pa.types.is_null(field.type)
                        types[i] = self._probe_type(query, names[i], whole=True) if null else field.type
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
