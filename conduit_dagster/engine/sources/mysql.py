"""MySQL / MariaDB source: the rows through ConnectorX straight into Arrow, every other statement through PyMySQL.

Drivers (measured in ``bench/mysql_drivers.py``): ConnectorX reads MySQL's binary protocol into Arrow in Rust, faster
than the ``mysql`` client writes text; PyMySQL is pure Python and runs the small control statements (probe, count,
largest value, the key check). ConnectorX takes no parameters, so the statement it runs is rendered by PyMySQL's own
client-side binding (``cursor.mogrify``): that is exactly what PyMySQL's bound parameters are, since neither PyMySQL nor
mysqlclient binds on the server over MySQL's text protocol. Same escaping, no value is ever formatted by hand; bytes
are sent as ``X'..'`` literals, timestamps as text CAST to ``DATETIME(6)``.

Sessions: ``engine/mysql.py``'s (UTC, utf8mb4, long network timeouts), read only. The query is read as MySQL reads
it (backslash escapes in strings, ``#`` and ``-- `` comments, ``/*! */`` kept) to strip a trailing ``;`` or comment
and find ``:last_value``.

Types. Each result column's MySQL type comes from a PyMySQL probe (``LIMIT 0``, with the server's character set
conversion off so each text column reports its own collation), and the column is selected as something ConnectorX
reads exactly, then turned into its Arrow type:

- DECIMAL as ``CAST(.. AS CHAR)``, parsed by Arrow into ``decimal128(p, s)`` (``decimal256`` above 38 digits):
  ConnectorX cuts DECIMAL(38,27) to 10 places and panics on DECIMAL(65,30);
- DATE, DATETIME, TIMESTAMP as integers (days, microseconds since 1970 in the UTC session): ConnectorX panics on a
  zero date; the integer of one is NULL, told apart from a real NULL, and refused naming the column and the value;
  TIMESTAMP lands as ``timestamp[us, UTC]``, DATETIME as ``timestamp[us]``;
- TIME as microseconds, landing as ``duration[us]`` (TIME is a signed duration up to 838 hours; ConnectorX panics on
  a negative one);
- JSON (MySQL 8) as its text, GEOMETRY as its bytes, BIT as its bytes (as PyMySQL returns them), integers (unsigned
  too), FLOAT, DOUBLE, text, ENUM/SET (their text) and binary strings as ConnectorX reads them.

Memory. ConnectorX's stream has no back-pressure: it reads as fast as the server sends, holding what the caller has not
taken yet. So an ordered read is done in pages of a bounded size (``WHERE key >= <last page's last key> ORDER BY key
LIMIT n``), the rows equal to a page's last key held back and read again whole with the next page, so no tie is split
or read twice. The server orders text and binary values on their first ``max_sort_length`` bytes only (1024 by
default; raising it fails with "Out of sort memory"), so for such keys the held-back run is the rows sharing the last
one's first ``max_sort_length`` bytes. A read without a checkpoint column cannot be paged: it is one query through
PyMySQL's unbuffered cursor (about 5x slower than ConnectorX, memory bounded by one batch). Pages are separate
statements, so rows that change while a read runs are met as they are across a resume: keyset reading never looks
behind itself.

Resume. Keyset reads are exact only if the server's ORDER BY and ``>`` agree with the equality and order of the
values conduit hands over. Text is ordered and compared as its UTF-8 bytes (``CAST(CONVERT(k USING utf8mb4) AS
BINARY)``), which is Python's order of str, whatever the column's collation (case- and accent-insensitive, PAD SPACE,
latin1). Dates and timestamps compare with the bound value CAST to ``DATE`` / ``DATETIME(6)``, so a value is never
rounded or cut to the column's precision. NULL keys sort first, so the first chunk holding one stops the read before
anything is written (and a resumed read asks for them too); zero or impossible dates in a date key are looked for on a
second connection before the first chunk is handed over. FLOAT, TIME, BIT, JSON and spatial keys are refused, naming
the CAST that makes them exact. An incremental load (``:last_value``) on a text key is refused unless the column's
collation is code point order with trailing spaces significant (``utf8mb4_nopad_bin``, ``utf8mb4_0900_bin``): the
query's own ``k >= :last_value`` compares with the column's collation, which conduit cannot change.
"""

import contextlib
import datetime as dt
import math
import re
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pymysql
import pymysql.cursors

from conduit_dagster.engine import mysql
from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError, SpecError
from conduit_dagster.engine.sources.base import (
    Chunk,
    bound_condition,
    key_index,
    key_range_type_error,
    partition_bounds,
    partition_column_error,
    partition_null_error,
    partition_type_error,
    restricted_text,
    scan_null_error,
)
from conduit_dagster.engine.spec import _Entry

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


@dataclass(frozen=True)
class MySQLSourceSpec(mysql.MySQLConnectionSpec):
    """ingest.yml `type: mysql` source: the connection, and the checkpoint column its resources default to."""

    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "mysql"


# Every connection of a source: the shared session, read only.
SOURCE_SESSION: tuple[str, ...] = (*mysql.SESSION_STATEMENTS, "SET SESSION TRANSACTION READ ONLY")
# An ordered read's page: about this many bytes of Arrow data (ConnectorX holds up to one page if the caller is slow).
PAGE_BYTES = 256 << 20
FIRST_PAGE_ROWS = 200_000
MIN_PAGE_ROWS = 1024
MAX_PAGE_ROWS = 10_000_000
# A key-range scan's rows per fetch (one column: a few MiB)
SCAN_ROWS = 100_000


# --- MySQL's query text: strings with backslash escapes, # and "-- " comments -------------------------------------


def _scan(sql: str) -> list[tuple[int, int, str]]:
    """Split ``sql`` into spans of kind 'code', 'comment', 'string' or 'semicolon', as MySQL reads it (backslash
    escapes in '...' and "...", `identifiers`, # comments, -- followed by a space, /* */; /*! ... */ is code)."""
    spans: list[tuple[int, int, str]] = []
    i, n, start = 0, len(sql), 0

    def flush(upto: int) -> None:
        if upto > start:
            spans.append((start, upto, "code"))

    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "#" or (c == "-" and nxt == "-" and (i + 2 >= n or sql[i + 2] in " \t\n\r\f\v")):
            flush(i)
            end = sql.find("\n", i)
            end = n if end < 0 else end
            spans.append((i, end, "comment"))
            i = start = end
        elif c == "/" and nxt == "*":
            end = sql.find("*/", i + 2)
            if end < 0:
                raise SpecError("the query has an unterminated /* comment")
            executable = sql.startswith("/*!", i) or sql.startswith("/*M!", i)
            if not executable:
                flush(i)
                spans.append((i, end + 2, "comment"))
                start = end + 2
            i = end + 2
        elif c in ("'", '"', "`"):
            flush(i)
            j = i + 1
            while True:
                if j >= n:
                    raise SpecError(f"the query has an unterminated {c} quote")
                if sql[j] == "\\" and c != "`":
                    j += 2
                elif sql[j] == c:
                    if sql.startswith(c * 2, j):
                        j += 2
                        continue
                    break
                else:
                    j += 1
            spans.append((i, j + 1, "string"))
            i = start = j + 1
        elif c == ";":
            flush(i)
            spans.append((i, i + 1, "semicolon"))
            i = start = i + 1
        else:
            i += 1
    flush(n)
    return spans


def clean_query(query: str) -> str:
    """The query without trailing semicolons and comments; refuses several statements."""
    spans = _scan(query)
    last = -1
    for idx, (s, e, kind) in enumerate(spans):
        if kind in ("code", "string") and query[s:e].strip():
            last = idx
    if last < 0:
        raise SpecError("the query is empty (only comments or ';'); write the SELECT to run")
    if any(kind == "semicolon" for _s, _e, kind in spans[:last]):
        raise SpecError("the query holds more than one statement (a ';' before the end); keep one SELECT")
    return query[: spans[last][1]].rstrip()


_NAMED = re.compile(r"(?<![:\w@]):last_value\b")


def uses_last_value(query: str) -> bool:
    """Whether the query has a ``:last_value`` placeholder (outside strings and comments)."""
    return any(kind == "code" and _NAMED.search(query[s:e]) for s, e, kind in _scan(query))


def replace_last_value(query: str, placeholder: str) -> str:
    return "".join(_NAMED.sub(placeholder, query[s:e]) if kind == "code" else query[s:e] for s, e, kind in _scan(query))


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


# --- column types ---------------------------------------------------------------------------------------------------

_UNSIGNED, _NOT_NULL, _ENUM, _SET = 32, 1, 256, 2048
_BINARY_CHARSET = 63
_INTS: dict[int, tuple[pa.DataType, pa.DataType]] = {  # type code -> (signed, unsigned)
    1: (pa.int8(), pa.uint8()),
    2: (pa.int16(), pa.uint16()),
    9: (pa.int32(), pa.uint32()),
    3: (pa.int32(), pa.uint32()),
    8: (pa.int64(), pa.uint64()),
    13: (pa.int16(), pa.int16()),  # YEAR
}
_TEXTS = frozenset({15, 253, 254, 247, 248, 249, 250, 251, 252})  # VARCHAR, strings, ENUM, SET, blobs/texts
_DECIMALS = frozenset({0, 246})
_DATES = frozenset({10, 14})
_TYPE_NAMES = {4: "FLOAT", 11: "TIME", 16: "BIT", 245: "JSON", 255: "GEOMETRY", 6: "NULL"}
_UNIX_DAY = 719528  # TO_DAYS('1970-01-01')
# Partition column kinds (base.PARTITION_KINDS) by type code: DATETIME holds wall-clock times, TIMESTAMP instants
_PARTITION_KINDS = {
    **dict.fromkeys(_INTS, "int"),
    **dict.fromkeys(_DECIMALS, "decimal"),
    **dict.fromkeys(_DATES, "date"),
    12: "timestamp",
    7: "timestamptz",
}
# How a partition bound is compared with a column of each kind: dates and times never rounded to the column's precision
_PARTITION_BOUNDS = {
    "date": "CAST({p} AS DATE)",
    "timestamp": "CAST({p} AS DATETIME(6))",
    "timestamptz": "CAST({p} AS DATETIME(6))",
}


@dataclass(frozen=True)
class _Col:
    """One result column: its MySQL type (from the probe), what is selected for it, and its Arrow type."""

    name: str
    type_code: int
    flags: int
    charset: int  # the collation id (63: binary)
    length: int
    scale: int
    select: str  # with {c} for the column
    arrow: pa.DataType
    convert: str  # "same", "decimal", "date", "micros"
    temporal: bool = False  # DATE, DATETIME, TIMESTAMP: a zero or impossible date reads as NULL and is refused

    @property
    def nullable(self) -> bool:
        return not self.flags & _NOT_NULL

    @property
    def text(self) -> bool:
        return self.type_code in _TEXTS and self.charset != _BINARY_CHARSET

    def finish(self, array: pa.Array) -> pa.Array:
        if self.convert == "date":
            return array.cast(pa.int32()).cast(pa.date32())
        if array.type != self.arrow:
            return array.cast(self.arrow)
        return array


def _column(name: str, type_code: int, flags: int, charset: int, length: int, scale: int) -> _Col:
    def col(select: str, arrow: pa.DataType, convert: str = "same", temporal: bool = False) -> _Col:
        return _Col(name, type_code, flags, charset, length, scale, select, arrow, convert, temporal)

    if type_code in _INTS:
        return col("{c}", _INTS[type_code][1 if flags & _UNSIGNED else 0])
    if type_code == 4:
        return col("{c}", pa.float32())  # the binary protocol carries the stored float; the text form has 6 digits
    if type_code == 5:
        return col("{c}", pa.float64())
    if type_code in _DECIMALS:
        precision = length - (1 if scale > 0 else 0) - (0 if flags & _UNSIGNED else 1)
        precision = max(precision, scale, 1)
        t = pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        return col("CAST({c} AS CHAR)", t, "decimal")
    if type_code in _DATES:
        return col(f"TO_DAYS({{c}}) - {_UNIX_DAY}", pa.date32(), "date", temporal=True)
    if type_code == 12:
        return col("TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {c})", pa.timestamp("us"), "micros", temporal=True)
    if type_code == 7:
        return col("TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {c})", pa.timestamp("us", tz="UTC"), "micros", temporal=True)
    if type_code == 11:
        return col("CAST(TIME_TO_SEC({c}) * 1000000 AS SIGNED)", pa.duration("us"), "micros")
    if type_code in _TEXTS:
        return col("{c}", pa.binary() if charset == _BINARY_CHARSET else pa.string())
    if type_code == 16:
        return col("{c}", pa.binary())
    if type_code in (245, 6):  # JSON (MySQL 8), and a column that is only NULL
        return col("CAST({c} AS CHAR)", pa.string())
    if type_code == 255:
        return col("CAST({c} AS BINARY)", pa.binary())
    raise SourceError(
        f"column {name!r} has MySQL type code {type_code}, which conduit does not read; CAST it in the query "
        f"(e.g. CAST({name} AS CHAR) AS {name})"
    )


# --- the checkpoint column ------------------------------------------------------------------------------------------

_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "double": (float,),
    "decimal": (Decimal,),
    "date": (dt.date,),
    "datetime": (dt.datetime,),
    "timestamp": (dt.datetime,),
    "text": (str,),
    "bytes": (bytes,),
}
# Collations whose order and equality are those of Python's str: code points, trailing spaces significant.
_CODE_POINT_COLLATIONS = frozenset(
    {"utf8mb4_nopad_bin", "utf8mb3_nopad_bin", "utf8_nopad_bin", "utf8mb4_0900_bin", "ascii_nopad_bin", "binary"}
)
_REFUSED_WHY = {
    4: (
        "FLOAT is single precision: the server compares the stored float, not the value a checkpoint holds",
        "CAST({k} AS DOUBLE) AS {k}",
    ),
    11: ("a checkpoint cannot hold a TIME (a signed duration)", "TIME_TO_SEC({k}) AS {k}"),
    16: ("BIT compares as a number, not as the bytes conduit reads", "CAST({k} AS UNSIGNED) AS {k}"),
    245: ("JSON has no ordering", "another column"),
    255: ("spatial values have no ordering", "another column"),
    6: ("the column is always NULL", "another column"),
}


@dataclass(frozen=True)
class _Key:
    """How the checkpoint column is ordered, compared and bound, the same way in every statement."""

    column: str
    kind: str  # a key of _KEY_TYPES
    col: _Col

    def expr(self, c: str) -> str:
        """What is ordered and compared: text as its UTF-8 bytes (Python's order, no collation, no PAD SPACE)."""
        return f"CAST(CONVERT({c} USING utf8mb4) AS BINARY)" if self.kind == "text" else c

    def bound(self, placeholder: str) -> str:
        if self.kind == "date":
            return f"CAST({placeholder} AS DATE)"
        if self.kind in ("datetime", "timestamp"):
            return f"CAST({placeholder} AS DATETIME(6))"  # never rounded to the column's fractional digits
        return placeholder

    def param(self, value: Any) -> Any:
        """A checkpoint value as bound: text as its UTF-8 bytes (compared with the bytes of ``expr``)."""
        if self.kind == "text" and isinstance(value, str):
            return value.encode("utf-8")
        return _param(value)


def _type_name(col: _Col) -> str:
    if col.type_code in _TEXTS:
        return "binary string" if col.charset == _BINARY_CHARSET else "text"
    return _TYPE_NAMES.get(col.type_code, {5: "DOUBLE"}.get(col.type_code, f"type code {col.type_code}"))


def _param(value: Any) -> Any:
    """A value as PyMySQL binds it: an aware datetime as its UTC wall time (the session's zone); PyMySQL would drop the
    offset."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _is_nan(value: Any) -> bool:
    return (isinstance(value, float) and math.isnan(value)) or (isinstance(value, Decimal) and not value.is_finite())


class MySQLSource:
    def __init__(self, spec: MySQLSourceSpec) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        self._collations: dict[int, str] | None = None
        self._partition: Partition | None = None
        # the query text (as _text makes it) -> the partition's condition on it and that condition's parameters
        self._restrictions: dict[str, tuple[str, dict[str, Any]]] = {}
        self.conn = self._connect()

    # --- connections and statements -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            conn = mysql.connect(self.spec, "source", autocommit=True)
        except ConduitError as exc:
            raise SourceError(str(exc)) from None
        try:
            with conn.cursor() as cur:
                for statement in SOURCE_SESSION[len(mysql.SESSION_STATEMENTS) :]:
                    cur.execute(statement)
        except pymysql.MySQLError as exc:
            conn.close()
            raise self._fail("cannot set the session", exc) from None
        return conn

    def describe(self) -> str:
        return mysql.describe(self.spec)

    def _fail(self, what: str, exc: BaseException) -> SourceError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return SourceError(f"source {self.spec.name!r} ({self.describe()}): {what}: {mysql.redact(text, self.spec)}")

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``), bound in every statement."""
        for name, value in params.items():
            if _is_nan(value):
                raise OrderingError(
                    f"source {self.spec.name!r}: the incremental bound :{name} is {value!r}, which cannot be a resume point; "
                    "the stored state was edited: start the incremental load over"
                )
        self.params = dict(params)

    def _text(self, query: str, key: _Key | None = None) -> str:
        """The user's query for PyMySQL: trailing ';'/comments off, literal % doubled, :last_value a parameter (compared
        as ``key`` compares, if given)."""
        text = clean_query(query).replace("%", "%%")
        if uses_last_value(text):
            placeholder = "%(last_value)s"
            if key is not None:
                if key.kind == "text":
                    self._refuse_incremental_text(key)
                else:
                    placeholder = key.bound(placeholder)
            elif isinstance(self.params.get("last_value"), dt.datetime):
                placeholder = "CAST(%(last_value)s AS DATETIME(6))"
            text = replace_last_value(text, placeholder)
        return self._restricted(text) if self._partition is not None else text

    def _refuse_incremental_text(self, key: _Key) -> None:
        """The query's own ``k >= :last_value`` compares with the column's collation: unless that is code point order
        with trailing spaces significant, it skips or repeats rows conduit tells apart ('a' = 'A' = 'á', 'x' = 'x ')."""
        collation = self._collation(key.col.charset)
        if collation in _CODE_POINT_COLLATIONS and not key.col.flags & (_ENUM | _SET):
            return
        k = key.column
        raise SourceError(
            f"source {self.spec.name!r}: incremental column {k!r} is text with collation {collation}, so the query's "
            f"`{k} >= :last_value` compares ignoring case, accents or trailing spaces and could skip or repeat rows. "
            f"Select and compare it in code point order in the query (e.g. `SELECT ..., CONVERT({k} USING utf8mb4) "
            f"COLLATE utf8mb4_nopad_bin AS {k} ... WHERE CONVERT({k} USING utf8mb4) COLLATE utf8mb4_nopad_bin >= "
            ":last_value`), or use a numeric or timestamp incremental_column"
        )

    def _collation(self, collation_id: int) -> str:
        if self._collations is None:
            with self.conn.cursor() as cur:
                cur.execute("SELECT ID, COLLATION_NAME FROM information_schema.COLLATIONS WHERE ID IS NOT NULL")
                self._collations = {int(i): str(name) for i, name in cur.fetchall()}
        return self._collations.get(collation_id, f"#{collation_id}")

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = {k: _param(v) for k, v in self.params.items()}
        for _, bounds in self._restrictions.values():
            params.update(bounds)
        return {**params, **extra}

    # --- partitions ---------------------------------------------------------------------------------------------

    def restrict(self, partition: "Partition") -> None:
        """Every later statement sees only the partition's rows: the query text is wrapped (in ``_text``, where every
        statement gets it, ConnectorX's too) as ``SELECT * FROM (<query>) AS conduit_part WHERE col >= <lo> AND col <
        <hi>``, the bounds bound by PyMySQL and compared as checkpoint values are (dates CAST to DATE, times to
        DATETIME(6); a TIMESTAMP's bound as its UTC time, the session's zone). The column's type, and the check that
        it holds no NULL, come with the first statement on a query."""
        self._partition = partition
        self._restrictions = {}

    def _restricted(self, text: str) -> str:
        return restricted_text(text, self._restrictions, self._restriction)

    def _partition_column(self, text: str, column: str) -> _Col:
        cols = self._columns(text)
        names = [c.name for c in cols]
        if column not in names:
            raise partition_column_error(self.spec.name, column, names)
        return cols[names.index(column)]

    def _restriction(self, text: str) -> tuple[str, dict[str, Any]]:
        """The partition's condition on the query ``text`` and its parameters; refuses a column of another type, and
        a query whose partition column holds NULL (one EXISTS, an index lookup where the column has an index)."""
        p = self._partition
        assert p is not None
        col = self._partition_column(text, p.column)
        kind = _PARTITION_KINDS.get(col.type_code)
        if kind is None:
            raise partition_type_error(self.spec.name, p, _type_name(col))
        lo, hi = partition_bounds(self.spec.name, p, kind)
        ref = f"conduit_part.{quote_ident(p.column)}"
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM (\n{text}\n) AS conduit_part WHERE {ref} IS NULL)", self._params())
            has_null = bool(cur.fetchone()[0])
        if has_null:
            raise partition_null_error(self.spec.name, p)
        cast = _PARTITION_BOUNDS.get(kind, "{p}")
        return bound_condition(ref, len(self._restrictions), lo, hi, lambda p: cast.format(p=p), _param)

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        """The column's values for key-range planning: one statement without ORDER BY through PyMySQL's unbuffered
        cursor (ConnectorX's stream would hold whatever the caller has not taken yet), selected and converted as read()
        does (zero dates refused)."""
        try:
            text = self._text(query)
            col = self._partition_column(text, column)
        except pymysql.MySQLError as exc:
            raise self._fail("query failed", exc) from None
        if _PARTITION_KINDS.get(col.type_code) is None:
            raise key_range_type_error(self.spec.name, column, _type_name(col))
        for chunk in _Reader(self, [col], None, text, SCAN_ROWS).unordered():
            values = chunk.data.column(0)
            if values.null_count:
                raise scan_null_error(self.spec.name, column)
            yield values

    # --- the probe ----------------------------------------------------------------------------------------------

    def _probe(self, query: str, column: str | None) -> tuple[list[_Col], _Key | None]:
        """The result's columns, and how its checkpoint column is ordered (refused if it cannot be exact)."""
        cols = self._columns(self._text(query))
        if column is None:
            return cols, None
        col = cols[key_index([c.name for c in cols], column, f"source {self.spec.name!r}")]
        return cols, self._key_plan(col)

    def _columns(self, text: str) -> list[_Col]:
        """The columns of the query ``text`` (as _text makes it)."""
        sql = f"SELECT * FROM (\n{text}\n) AS conduit_src LIMIT 0"
        with self.conn.cursor() as cur:
            # without the conversion to utf8mb4, each text column reports its own collation
            cur.execute("SET SESSION character_set_results = NULL")
            try:
                cur.execute(sql, self._params())
                fields = list(cur._result.fields)  # the descriptions with flags and collation (PyMySQL's own)
            finally:
                cur.execute("SET SESSION character_set_results = utf8mb4")
        cols = []
        for f in fields:
            try:
                cols.append(_column(f.name, f.type_code, f.flags, f.charsetnr, f.length, f.scale))
            except SourceError as exc:
                raise SourceError(f"source {self.spec.name!r}: {exc}") from None
        return cols

    def _key_plan(self, col: _Col) -> _Key:
        t = col.type_code
        kind = None
        if t in _INTS:
            kind = "int"
        elif t == 5:
            kind = "double"
        elif t in _DECIMALS:
            kind = "decimal"
        elif t in _DATES:
            kind = "date"
        elif t == 12:
            kind = "datetime"
        elif t == 7:
            kind = "timestamp"
        elif t in _TEXTS:
            kind = "bytes" if col.charset == _BINARY_CHARSET else "text"
        if kind is not None:
            return _Key(col.name, kind, col)
        why, fix = _REFUSED_WHY.get(t, ("MySQL orders it otherwise than the values conduit reads", "another column"))
        k = col.name
        raise SourceError(
            f"source {self.spec.name!r}: checkpoint column {k!r} has MySQL type {_TYPE_NAMES.get(t, t)}, which cannot "
            f"resume exactly ({why}): rows could be skipped or read twice. Select it as {fix.format(k=k)} in the query, "
            "or pick another checkpoint column"
        )

    def _plan(self, query: str, column: str | None) -> tuple[list[_Col], _Key | None, str]:
        """The columns, the key, and the query text with :last_value compared as the key compares."""
        cols, key = self._probe(query, column)
        return cols, key, self._text(query, key)

    def probe(self, query: str, column: str | None) -> list[str]:
        try:
            cols, _key, _text = self._plan(query, column)
        except pymysql.MySQLError as exc:
            raise self._fail("query failed", exc) from None
        return [c.name for c in cols]

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        try:
            _cols, key, _text = self._plan(query, column)
        except pymysql.MySQLError as exc:
            raise self._fail("query failed", exc) from None
        assert key is not None
        return _KEY_TYPES[key.kind]

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        try:
            if upto is None:
                sql = f"SELECT COUNT(*) FROM (\n{self._text(query)}\n) AS conduit_src"
                params = self._params()
            else:  # the rows up to a value, in the order resume uses
                _cols, key, text = self._plan(query, upto[0])
                assert key is not None
                col = key.expr(f"conduit_src.{quote_ident(upto[0])}")
                sql = f"SELECT COUNT(*) FROM (\n{text}\n) AS conduit_src WHERE {col} <= {key.bound('%(conduit_upto)s')}"
                params = self._params(conduit_upto=key.param(upto[1]))
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return int(cur.fetchone()[0])
        except pymysql.MySQLError as exc:
            raise self._fail("count failed", exc) from None

    def max_value(self, query: str, column: str) -> Any:
        """The largest checkpoint value in the order resume uses, as a read would hand it over (or None)."""
        try:
            _cols, key, text = self._plan(query, column)
            assert key is not None
            raw = f"conduit_src.{quote_ident(column)}"
            if key.kind in ("text", "bytes"):  # max() compares whole values; ORDER BY only their first max_sort_length bytes
                sql = f"SELECT MAX({key.expr(raw)}) FROM (\n{text}\n) AS conduit_src"
            else:
                sql = f"SELECT {raw} FROM (\n{text}\n) AS conduit_src WHERE {raw} IS NOT NULL ORDER BY {raw} DESC LIMIT 1"
            with self.conn.cursor() as cur:
                cur.execute(sql, self._params())
                row = cur.fetchone()
        except pymysql.MySQLError as exc:
            raise self._fail("query failed", exc) from None
        if row is None or row[0] is None:
            return None
        value = row[0]
        if key.kind == "text":
            return bytes(value).decode("utf-8")
        if key.kind in ("date", "datetime", "timestamp") and not isinstance(value, dt.date):
            raise self._zero_date_error(column, value)
        if key.kind == "timestamp":
            return value.replace(tzinfo=dt.UTC)
        if key.kind == "bytes":
            return bytes(value)
        return value

    # --- reading ------------------------------------------------------------------------------------------------

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        if resume and _is_nan(after):
            raise OrderingError(
                f"source {self.spec.name!r}: the checkpoint's last value of {column!r} is {after!r}, which cannot be a "
                "resume point; the checkpoint was edited: start over"
            )
        try:
            cols, key, text = self._plan(query, column)
        except pymysql.MySQLError as exc:
            raise self._fail("query failed", exc) from None
        reader = _Reader(self, cols, key, text, fetch_size)
        if key is None:
            yield from reader.unordered()
            return
        checked = self._check_key_values(text, key) if key.col.temporal else None
        pages = reader.pages(after if resume else None)
        try:
            for chunk in pages:
                if checked is not None:
                    checked()
                    checked = None
                yield chunk
            if checked is not None:
                checked()
        except ConduitError:
            if checked is not None:  # the read failed first (say on the zero date itself): the key's error says why
                pending, checked = checked, None
                pending()
            raise
        finally:
            pages.close()

    def _check_key_values(self, text: str, key: _Key) -> Callable[[], None]:
        """Start the check that a date or timestamp key holds no zero or impossible date; returns the call that waits
        for it. Such a date ('2024-00-10', '0000-00-00') sorts among the others, so the read could meet it after rows
        were written; the check runs on a connection of its own while the rows start streaming, and the first chunk
        is handed over only once it has passed."""
        c = f"conduit_src.{quote_ident(key.column)}"
        sql = f"SELECT CAST({c} AS CHAR) FROM (\n{text}\n) AS conduit_src WHERE {c} IS NOT NULL AND TO_DAYS({c}) IS NULL LIMIT 1"
        params = self._params()
        outcome: list[BaseException | tuple[Any, ...] | None] = []

        def look() -> None:
            try:
                conn = self._connect()
                try:
                    with conn.cursor() as cur:
                        cur.execute(sql, params)
                        outcome.append(cur.fetchone())
                finally:
                    conn.close()
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                outcome.append(exc)

        thread = threading.Thread(target=look, name="conduit-mysql-key-check", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            found = outcome[0]
            if isinstance(found, ConduitError):
                raise found
            if isinstance(found, BaseException):
                raise self._fail("query failed", found)
            if found is not None:
                raise self._zero_date_error(key.column, found[0], key=True)

        return wait

    def _zero_date_error(self, column: str, value: Any, *, key: bool = False) -> SourceError:
        what = "checkpoint column" if key else "column"
        return SourceError(
            f"source {self.spec.name!r}: {what} {column!r} holds {str(value)!r}, a zero or impossible date that no date "
            f"value can hold; {'nothing was' if key else 'the batch holding it was not'} written. Select a real date or NULL "
            f"in its place (e.g. IF(TO_DAYS({column}) IS NULL, NULL, {column}) AS {column}), or filter it out"
            + (f" (WHERE TO_DAYS({column}) IS NOT NULL)" if key else ", or CAST it to CHAR to load its text")
        )

    def _first_bad_date(self, text: str, column: str) -> Any:
        c = f"conduit_src.{quote_ident(column)}"
        sql = f"SELECT CAST({c} AS CHAR) FROM (\n{text}\n) AS conduit_src WHERE {c} IS NOT NULL AND TO_DAYS({c}) IS NULL LIMIT 1"
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, self._params())
                row = cur.fetchone()
        except pymysql.MySQLError:  # only for the message
            return "a zero date"
        return row[0] if row else "a zero date"

    def close(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):  # closing an already broken connection
            self.conn.close()


class _Reader:
    """One read: the statement ConnectorX runs (rendered by PyMySQL), its pages, and the Arrow batches it yields."""

    def __init__(self, source: MySQLSource, cols: list[_Col], key: _Key | None, text: str, fetch_size: int) -> None:
        self.source, self.cols, self.key, self.text, self.fetch_size = source, cols, key, text, fetch_size
        self.schema = pa.schema([pa.field(c.name, c.arrow) for c in cols])
        # nullable dates: which rows were NULL before their conversion (a NULL after it is a zero date)
        self.masked = [i for i, c in enumerate(cols) if c.temporal and c.nullable]
        names = {c.name for c in cols}
        self.mask_names = []
        for j in range(0, len(self.masked), 62):
            name = f"conduit_null_dates_{j // 62}"
            while name in names:
                name = "_" + name
            self.mask_names.append(name)
        self.key_index = [c.name for c in cols].index(key.column) if key is not None else None
        self.sort_length: int | None = None
        if key is not None and key.kind in ("text", "bytes"):
            with source.conn.cursor() as cur:
                cur.execute("SELECT @@SESSION.max_sort_length")
                self.sort_length = int(cur.fetchone()[0])

    def sql(self, start: Any, inclusive: bool, limit: int | None, *, text_protocol: bool = False) -> str:
        """The statement, rendered by PyMySQL. ``text_protocol``: for PyMySQL's own read, where a FLOAT would arrive as
        its 6-digit text: selected as the DOUBLE it widens to exactly."""
        parts = []
        for c in self.cols:
            ref = f"conduit_src.{quote_ident(c.name)}"
            select = "CAST({c} AS DOUBLE)" if text_protocol and c.type_code == 4 else c.select
            parts.append(f"{select.format(c=ref)} AS {quote_ident(c.name)}")
        for j, name in enumerate(self.mask_names):
            bits = " | ".join(
                f"(ISNULL(conduit_src.{quote_ident(self.cols[i].name)}) << {b})"
                for b, i in enumerate(self.masked[j * 62 : (j + 1) * 62])
            )
            parts.append(f"({bits}) AS {quote_ident(name)}")
        sql = f"SELECT {', '.join(parts)} FROM (\n{self.text}\n) AS conduit_src"
        params = self.source._params()
        if self.key is not None:
            raw = f"conduit_src.{quote_ident(self.key.column)}"
            expr = self.key.expr(raw)
            if start is not None:
                # NULL keys sort first: a resumed page asks for them too, so that they stop it
                op = ">=" if inclusive else ">"
                sql += f"\nWHERE {expr} {op} {self.key.bound('%(conduit_v)s')} OR {raw} IS NULL"
                params["conduit_v"] = self.key.param(start)
            sql += f"\nORDER BY {expr}"
            if limit is not None:
                sql += f"\nLIMIT {int(limit)}"
        with self.source.conn.cursor() as cur:
            rendered: str = cur.mogrify(sql, params)
        return rendered

    def _stream(self, sql: str) -> Iterator[pa.RecordBatch]:
        import connectorx

        spec = self.source.spec
        try:
            reader = connectorx.read_sql(
                mysql.connectorx_url(spec),
                sql,
                return_type="arrow_stream",
                pre_execution_query=list(SOURCE_SESSION),
                batch_size=max(self.fetch_size, 1024),
            )
            for batch in reader:
                if batch.num_rows:
                    yield batch
        except ConduitError:
            raise
        except GeneratorExit:
            raise
        except BaseException as exc:  # ConnectorX's Rust panics are BaseException (pyo3's PanicException)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise self.source._fail("read failed", exc) from None

    def finish(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """A ConnectorX batch as the Arrow schema; a zero date (NULL after its conversion, not before) is refused."""
        arrays = []
        for i, c in enumerate(self.cols):
            try:
                arrays.append(c.finish(batch.column(i)))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SourceError(
                    f"source {self.source.spec.name!r}: column {c.name!r} holds a value that does not fit {c.arrow} "
                    f"({exc}); CAST it in the query"
                ) from None
        n = len(self.cols)
        for i, c in enumerate(self.cols):
            if not c.temporal or not arrays[i].null_count:
                continue
            bad = pc.is_null(arrays[i])
            if c.nullable:
                position = self.masked.index(i)
                mask = batch.column(n + position // 62)
                was_null = pc.not_equal(pc.bit_wise_and(mask, 1 << (position % 62)), 0)
                bad = pc.and_(bad, pc.invert(was_null))
            if pc.any(bad).as_py():
                value = self.source._first_bad_date(self.text, c.name)
                raise self.source._zero_date_error(c.name, value)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _stream_rows(self, sql: str) -> Iterator[pa.RecordBatch]:
        """The statement through PyMySQL's unbuffered cursor on a connection of its own: rows leave the server only as
        they are fetched, so memory holds one batch whatever the caller does with it."""
        raw = [_raw_type(c) for c in self.cols] + [pa.uint64()] * len(self.mask_names)
        names = [c.name for c in self.cols] + self.mask_names
        conn = self.source._connect()
        cur = conn.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute(sql)
            while True:
                rows = cur.fetchmany(self.fetch_size)
                if not rows:
                    return
                columns = list(zip(*rows, strict=True))
                yield pa.RecordBatch.from_arrays([pa.array(v, type=t) for v, t in zip(columns, raw, strict=True)], names=names)
        except pymysql.MySQLError as exc:
            raise self.source._fail("read failed", exc) from None
        finally:
            result = getattr(cur, "_result", None)
            if result is not None and getattr(result, "unbuffered_active", False):
                # a stream stopped early or broken: drop the connection; PyMySQL would read the rest of the rows first
                # (or fail doing so on a dead socket)
                result.unbuffered_active = False
            with contextlib.suppress(pymysql.MySQLError):
                conn.close()

    def unordered(self) -> Iterator[Chunk]:
        """A read without a checkpoint column: one statement, which cannot be paged, so not through ConnectorX (whose
        stream would hold whatever the caller has not taken yet) but through PyMySQL's unbuffered cursor."""
        for batch in self._stream_rows(self.sql(None, False, None, text_protocol=True)):
            yield Chunk(self.finish(batch), None)

    def chunks(self, sql: str) -> Iterator[Chunk]:
        for batch in self._stream(sql):
            data = self.finish(batch)
            keys = data.column(self.key_index) if self.key_index is not None else None
            yield Chunk(data, keys)

    def _sort_keys(self, keys: pa.Array) -> pa.Array:
        """What the server's ORDER BY tells apart: a text or binary key only on its first ``max_sort_length`` bytes."""
        if self.sort_length is None:
            return keys
        return pc.binary_slice(keys.cast(pa.binary()), 0, self.sort_length)

    def pages(self, after: Any) -> Generator[Chunk, None, None]:
        """The ordered read in pages of bounded size; a page's trailing run of rows the server orders as equal (equal
        keys; for text and binary keys, equal first ``max_sort_length`` bytes) is held back and read again whole with
        the next page, which starts at that value: no tie is split, none is read twice, and the order within such a run
        (which the server leaves open beyond ``max_sort_length``) is checked by the runner like any other."""
        assert self.key is not None and self.key_index is not None
        start, inclusive = after, False
        limit = max(FIRST_PAGE_ROWS, self.fetch_size)
        while True:
            rows = 0
            nbytes = 0
            # the last chunks read, from the one where the current run of equal values began: handed over whole once a
            # later chunk shows a different value (so the run ends inside this page), else held to the page's end
            pending: list[Chunk] = []
            pending_last: pa.Scalar | None = None
            for chunk in self.chunks(self.sql(start, inclusive, limit)):
                keys = chunk.keys
                assert isinstance(keys, pa.Array)
                if rows == 0 and not keys[0].is_valid:  # NULLs sort first: a page's first row tells
                    raise self._null_error()
                rows += chunk.data.num_rows
                nbytes += chunk.data.nbytes
                sort = self._sort_keys(keys)
                if pending_last is not None and pc.all(pc.equal(sort, pending_last)).as_py():
                    pending.append(chunk)  # the run goes on
                    continue
                yield from pending
                pending, pending_last = [chunk], sort[-1]
            if rows < limit:  # the last page: everything is in
                yield from pending
                return
            assert pending_last is not None
            first = pending[0]
            assert isinstance(first.keys, pa.Array)
            tail = _trailing_tie(self._sort_keys(first.keys), pending_last)
            held = first.data.num_rows - tail + sum(c.data.num_rows for c in pending[1:])
            if held == rows:
                limit *= 2  # one run fills the page: read it again in a larger one
                continue
            if tail:
                yield Chunk(first.data.slice(0, tail), first.keys.slice(0, tail))
            start, inclusive = pending_last.as_py(), True
            per_row = max(nbytes // max(rows, 1), 1)
            limit = min(max(PAGE_BYTES // per_row, self.fetch_size, MIN_PAGE_ROWS), MAX_PAGE_ROWS)

    def _null_error(self) -> OrderingError:
        assert self.key is not None
        k = self.key.column
        return OrderingError(
            f"source {self.source.spec.name!r}: checkpoint column {k!r} holds NULL, which cannot be ordered for resume; "
            f"the read stopped before the rows holding it (at the start, before any row was written, unless the NULL "
            f"appeared while the read was under way). Filter it out in the query (WHERE {k} IS NOT NULL), COALESCE it, "
            "or pick another checkpoint column"
        )


def _raw_type(c: _Col) -> pa.DataType:
    """The Arrow type of the values PyMySQL returns for what ``c`` selects (before ``_Col.finish``)."""
    if c.convert == "decimal":
        return pa.string()
    if c.convert in ("date", "micros"):
        return pa.int64()
    if c.type_code == 4:
        return pa.float64()
    return c.arrow


def _trailing_tie(keys: pa.Array, last: pa.Scalar) -> int:
    """Where the run of values equal to ``last`` at the end of ``keys`` starts."""
    differs = pc.not_equal(keys, last)
    if not pc.any(differs).as_py():
        return 0
    positions = pc.indices_nonzero(pc.fill_null(differs, True))
    return int(positions[-1].as_py()) + 1


def _same(keys: Any, last: pa.Scalar) -> bool:
    return bool(isinstance(keys, pa.Array) and len(keys) and keys[0] == last)


# --- the backend: ingest.yml `type: mysql` ---------------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str, resume: bool, column: str | None) -> MySQLSourceSpec:
    e.finish(_KEYS)
    return MySQLSourceSpec(name=name, resume=resume, checkpoint_column=column, **mysql.parse_connection(e))


def _resource_query(e: _Entry, source: Any, source_name: str) -> str:
    """The resource's ``query:`` (required, shown as written, so no ``${VAR}``), read as MySQL reads it."""
    query = e.text("query", required=True, env=False) or ""
    try:
        clean_query(query)
    except SpecError as exc:
        raise e.fail("query", f"{exc}") from None
    return query


def _selection(resource: Any) -> str:
    return clean_query(resource.query).strip()


_KEYS = frozenset({"name", "type", "resume", "checkpoint_column"} | mysql.CONNECTION_KEYS)
BACKEND = register_source_backend(
    SourceBackend(
        type="mysql",
        keys=_KEYS,
        parse=_parse,
        open=MySQLSource,
        identity=mysql.identity,
        kinds=lambda s: {"mysql"},
        selection=_selection,
        resource_query=_resource_query,
        uses_last_value=uses_last_value,
    )
)
