"""Any SQLAlchemy database (``type: sqlalchemy``): a streamed, keyset-ordered read through SQLAlchemy.

The user's query is wrapped by SQLAlchemy Core, so the alias, LIMIT and bind syntax are the dialect's own::

    SELECT * FROM (<query>) AS conduit_src [WHERE <key> > :conduit_after] ORDER BY <key>

Identifiers are quoted by the dialect's identifier preparer, the resume value and ``:last_value`` are bound
parameters, and rows stream (``stream_results``, fetched in chunks) into Arrow record batches whose schema is
fixed once per run.

A resume is exact only if the database's ORDER BY and ``>`` agree with Python's order and equality of the
values the driver returns. That holds on every dialect for integer, decimal, date and timestamp keys. Text is
the trap: most collations are case- or accent-insensitive, or ignore trailing spaces ('a' = 'A', 'x' = 'x '),
so text (and bytes) keys are taken only on dialects where conduit knows a byte-wise comparison of UTF-8 text
(``_BYTEWISE``); on any other dialect they are refused, as are float keys (NaN, -0.0 = 0.0) and types with no
exact checkpoint. Within every read the keys are also checked to arrive non-decreasing in Python's order.

Partitions (``restrict``): every statement's subquery is itself ``SELECT * FROM (<query>) AS conduit_part WHERE
<col> >= :lo AND <col> < :hi``, the bounds bound as parameters of the kind the column's first value shows (int,
Decimal, date, naive or aware datetime; on MySQL a TIMESTAMP, which the driver returns naive in the UTC session, is
compared as the instant; on SQLite, ISO text dates are compared as text, as ``type: sqlite`` does).
"""

import datetime as dt
import itertools
import json
import operator
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.types import NullType

from conduit_dagster.engine import sql
from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError, SpecError
from conduit_dagster.engine.sources import mysql as mysql_source
from conduit_dagster.engine.sources.base import (
    Chunk,
    decimal_scan_array,
    iso_text_bounds,
    iso_text_form,
    key_index,
    key_range_type_error,
    no_reals,
    partition_bounds,
    partition_null_error,
    partition_type_error,
    scan_null_error,
)
from conduit_dagster.engine.spec import Secret, _Entry

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


@dataclass(frozen=True)
class SqlaSourceSpec:
    """ingest.yml `type: sqlalchemy` source: any SQLAlchemy URL whose driver is installed."""

    name: str
    url: Secret
    dialect: str = ""  # the URL's backend name (mysql, sqlite, duckdb ...): no secret
    location: str = ""  # dialect://host:port/database (never the user or password)
    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "sqlalchemy"


# Rows fetched per round trip and per chunk handed to the runner (the runner regroups chunks into batches).
CHUNK_ROWS = 10_000

# Dialects whose text comparison conduit can make byte-wise on UTF-8 (Python's str order): the key expression and
# the bound value's, and how `:last_value` is written in the user's own query (None: it cannot be made byte-wise).
_BYTEWISE: dict[str, tuple[str, str, str | None]] = {
    # an explicit COLLATE wins over the column's declared one (NOCASE, RTRIM)
    "sqlite": ("{col} COLLATE BINARY", "{param}", "({param} COLLATE BINARY)"),
    # default collations are case-insensitive and PAD SPACE; a binary string compares byte by byte, unpadded
    "mysql": (
        "CAST(CONVERT({col} USING utf8mb4) AS BINARY)",
        "CAST(CONVERT({param} USING utf8mb4) AS BINARY)",
        "CAST(CONVERT({param} USING utf8mb4) AS BINARY)",
    ),
    # text and varchar in a UTF8 database (checked): "C" compares the bytes
    "postgresql": ('{col} COLLATE "C"', '(CAST({param} AS TEXT) COLLATE "C")', '(CAST({param} AS TEXT) COLLATE "C")'),
    # VARCHAR compares byte-wise unless declared with a collation (NOCASE ...); encode() makes it a BLOB either way.
    # A collated column cannot be compared byte-wise with a parameter (DuckDB refuses to combine collations), and the
    # collation is not visible in the result: `:last_value` on a text column is refused.
    "duckdb": ("encode({col})", "encode(CAST({param} AS VARCHAR))", None),
}
_BYTEWISE["mariadb"] = _BYTEWISE["mysql"]
# Dialects whose bytes / binary comparison is memcmp, then length (Python's bytes order).
_BYTES_OK = frozenset({"sqlite", "mysql", "mariadb", "postgresql", "duckdb"})
_MYSQL = frozenset({"mysql", "mariadb"})
# MySQL character sets whose bytes are UTF-8 (or ASCII): a bare column compared with a binary string is then byte-wise
_MYSQL_UTF8 = frozenset({"utf8mb4", "utf8mb3", "utf8", "ascii", "binary"})
# PostgreSQL types compared exactly under COLLATE "C" (char(n), citext, enums... are not: use `type: postgresql`)
_PG_TEXT = frozenset({"text", "character varying", "name"})


# --- the query's text, read as its database reads it --------------------------------------------------------------


@dataclass(frozen=True)
class Syntax:
    """How a dialect's query text splits into code, strings and comments: where ``:last_value`` is a placeholder, and
    what trailing comments and ';' are cut. MySQL differs from standard SQL: ``--`` starts a comment only when a space
    follows (``id > 1--1`` is arithmetic), ``#`` starts one too, and a backslash escapes a quote inside a string."""

    scan: Callable[[str], list[tuple[int, int, str]]]
    clean: Callable[[str], str]
    named: re.Pattern[str]

    def uses_last_value(self, query: str) -> bool:
        return any(kind == "code" and self.named.search(query[s:e]) for s, e, kind in self.scan(query))


STANDARD = Syntax(sql._scan, sql.clean_query, sql._NAMED)
MYSQL_SYNTAX = Syntax(mysql_source._scan, mysql_source.clean_query, mysql_source._NAMED)


def syntax(dialect: str) -> Syntax:
    return MYSQL_SYNTAX if dialect in _MYSQL else STANDARD


def _kind_name(kind: type) -> str:
    return {dt.datetime: "timestamp", dt.date: "date", Decimal: "decimal", bytes: "bytes", str: "text", int: "integer"}.get(
        kind, kind.__name__
    )


def _kind_of(value: Any) -> type:
    """The checkpoint kind of a key value: int, Decimal, datetime, date, str or bytes (else its own type)."""
    if isinstance(value, bool):
        return bool
    for kind in (int, Decimal, dt.datetime, dt.date, str):
        if isinstance(value, kind):
            return kind
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes
    return type(value)


@dataclass(frozen=True)
class KeyPlan:
    """How the checkpoint column is ordered and compared, the same way in every statement."""

    column: str
    kind: type | None  # the Python type of its values; None when the query returned no non-NULL value
    expr: str = "{col}"  # the column's ordering expression ({col}: the qualified column)
    bound: str = "{param}"  # the bound value's ({param}: the placeholder)
    last_value: str = "{param}"  # how the user's :last_value is written

    def python_types(self) -> tuple[type, ...] | None:
        return None if self.kind is None else (self.kind,)


def key_plan(source: str, dialect: str, column: str, value: Any, *, incremental: bool = False, detail: str = "") -> KeyPlan:
    """The ordering of checkpoint column ``column`` whose first non-NULL value is ``value``, on ``dialect``; refuses
    what cannot resume exactly (SourceError naming the source, the column and the fix). ``detail``: what the
    dialect's probe found (the column's charset on MySQL, type and encoding on PostgreSQL)."""
    where = f"source {source!r}: checkpoint column {column!r}"
    if value is None:
        return KeyPlan(column, None)
    kind = _kind_of(value)
    if kind in (int, Decimal, dt.datetime, dt.date):
        if kind is Decimal and not value.is_finite():
            raise OrderingError(
                f"{where} holds {value}, which cannot be a resume point; nothing was written. Filter it out in the query "
                "or pick another checkpoint column"
            )
        return KeyPlan(column, kind)
    if kind is float:
        raise SourceError(
            f"{where} holds floating-point values, which cannot resume exactly (NaN equals nothing, -0.0 equals 0.0, "
            f"and a database may round what it compares): rows could be skipped or read twice. Use an integer, decimal "
            f"or timestamp column, or CAST it in the query (e.g. CAST({column} AS DECIMAL(38, 10)) AS {column})"
        )
    if kind in (str, bytes):
        known = _BYTEWISE.get(dialect) if kind is str else (("{col}", "{param}", "{param}") if dialect in _BYTES_OK else None)
        if known is None:
            raise SourceError(
                f"{where} holds {_kind_name(kind)} on a {dialect} database, whose comparison conduit cannot make "
                "byte-wise: its collation may treat different values as equal or order them otherwise than Python "
                "('a' = 'A', 'x' = 'x '), so `>` on resume could skip rows or read them twice. Use an integer or "
                "timestamp checkpoint column (an identity or sequence column, an updated_at)"
            )
        expr, bound, last_value = known
        if kind is str and dialect == "postgresql":
            pg_type, _, encoding = detail.partition("/")
            if pg_type not in _PG_TEXT or encoding.upper() != "UTF8":
                why = (
                    f"has type {pg_type}, which does not compare as its bytes"
                    if pg_type not in _PG_TEXT
                    else f"is text in a {encoding} database, whose byte order is not Python's"
                )
                raise SourceError(
                    f"{where} {why}, so `>` on resume could skip rows or read them twice. Use `type: postgresql` for this "
                    f"source (it handles these), or select it as text (CAST({column} AS text) AS {column}) in a UTF8 database"
                )
        if kind is str and dialect in _MYSQL and detail and detail.lower() not in _MYSQL_UTF8:
            last_value = None  # the bare column compares its own charset's bytes with the UTF-8 bound
        if incremental and last_value is None:
            raise SourceError(
                f"source {source!r}: incremental column {column!r} is text whose own comparison on {dialect} conduit "
                f"cannot make byte-wise{f' (character set {detail})' if detail else ''}, so the query's "
                f"`{column} >= :last_value` could skip rows. Use an integer or timestamp incremental_column"
                + (f", or convert it in the query (CONVERT({column} USING utf8mb4) AS {column})" if dialect in _MYSQL else "")
            )
        return KeyPlan(column, kind, expr, bound, last_value or "{param}")
    what = "boolean" if kind is bool else kind.__name__
    raise SourceError(
        f"{where} holds {what} values ({value!r}), which a checkpoint cannot hold or compare exactly. Use an integer, "
        "decimal, date or timestamp column, or CAST it in the query"
    )


# --- Arrow types, fixed once per run ----------------------------------------------------------------------------

_DECIMAL_RE = re.compile(r"^DECIMAL\((\d+),\s*(\d+)\)$", re.IGNORECASE)
# DuckDB types whose Python value is not the stored one
_LOSSY = {"TIMESTAMP_NS": "its nanoseconds are cut to microseconds", "INTERVAL": "months become 30 days"}


def _decimal_type(desc: Any) -> pa.DataType:
    """A Decimal column's type: from the cursor's declared precision and scale (or a DECIMAL(p,s) type name), else its
    exact text (a decimal without a declared scale has none that every value fits)."""
    m = _DECIMAL_RE.match(str(desc[1]))
    precision, scale = (int(m.group(1)), int(m.group(2))) if m else (desc[4], desc[5])
    if isinstance(precision, int) and isinstance(scale, int) and 0 < precision and 0 <= scale <= precision:
        if precision <= 38:
            return pa.decimal128(precision, scale)
        if precision <= 76:
            return pa.decimal256(precision, scale)
    return pa.string()


def _arrow_type(value: Any, desc: Any) -> pa.DataType:
    """The Arrow type of a column from its first non-NULL value (and the cursor's description)."""
    declared = str(desc[1]).upper()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        if declared in ("UBIGINT",):
            return pa.uint64()
        if declared in ("HUGEINT", "UHUGEINT"):
            return pa.decimal256(39, 0)
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, Decimal):
        return _decimal_type(desc)
    if isinstance(value, str | uuid.UUID):
        return pa.string()
    if isinstance(value, bytes | bytearray | memoryview):
        return pa.binary()
    if isinstance(value, dt.datetime):
        return pa.timestamp("us", tz="UTC") if value.tzinfo is not None else pa.timestamp("us")
    if isinstance(value, dt.date):
        return pa.date32()
    if isinstance(value, dt.time):
        return pa.time64("us")
    if isinstance(value, dt.timedelta):
        return pa.duration("us")
    if isinstance(value, dict | list):
        return pa.string()  # as JSON text: a struct or list type taken from one value would not fit the next
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.string()


def _array(values: tuple[Any, ...], t: pa.DataType | None) -> pa.Array:
    if t is not None and pa.types.is_string(t) and not all(v is None or type(v) is str for v in values):
        values = tuple(v if v is None or isinstance(v, str) else str(v) for v in values)
    return pa.array(values, type=t)


def _plain(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(t) and isinstance(value, dict | list):
        return json.dumps(value, default=str, ensure_ascii=False)
    if pa.types.is_binary(t) and isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


# --- the source ---------------------------------------------------------------------------------------------------


class SqlaSource:
    def __init__(self, spec: SqlaSourceSpec) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        self._plans: dict[tuple[str, str], KeyPlan] = {}
        self._partition: Partition | None = None
        # the query -> the partition's condition on it (None: the query had no rows to tell the column's kind by)
        self._restrictions: dict[str, Any] = {}
        url = make_url(spec.url.reveal())
        self.dialect_name = spec.dialect or url.get_backend_name()
        self.syntax = syntax(self.dialect_name)
        if self.dialect_name in ("sqlite", "duckdb") and url.database not in (None, "", ":memory:"):
            path = Path(url.database)
            if not url.database.startswith("file:") and not path.is_file():
                # the driver would create an empty database there, and the run would load nothing
                raise SourceError(
                    f"source {spec.name!r}: {self.dialect_name} database file {path} does not exist; fix `url` in ingest.yml "
                    "(a relative path is relative to ingest.yml's folder)"
                )
        # DuckDB: read only, so that other readers (a sensor, another run) can open the file at the same time
        connect_args = {"read_only": True} if self.dialect_name == "duckdb" else {}
        try:
            self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)
        except ImportError as exc:
            module = getattr(exc, "name", None) or "its driver"
            raise SourceError(
                f"source {spec.name!r}: the driver of {url.drivername} is not installed (no module {module!r}); install it "
                f"where conduit runs (e.g. pip install {module}), or name an installed driver in `url` "
                f"(dialect+driver://...)"
            ) from None
        except (ArgumentError, TypeError, ValueError) as exc:
            raise SourceError(f"source {spec.name!r}: `url` is not usable: {self._redact(str(exc))}") from None
        if self.dialect_name in _MYSQL:
            sa.event.listen(self.engine, "connect", _mysql_session)
        try:
            self.conn = self.engine.connect()
        except sa.exc.DBAPIError as exc:
            raise SourceError(f"source {spec.name!r}: cannot connect to {self.describe()}: {self._message(exc)}") from None
        except ConduitError as exc:
            raise SourceError(f"source {spec.name!r}: {exc}") from None
        self.dialect = self.engine.dialect
        self.preparer = self.dialect.identifier_preparer

    # --- messages -----------------------------------------------------------------------------------------------

    def describe(self) -> str:
        return self.spec.location

    def _redact(self, text: str) -> str:
        url = self.spec.url.reveal()
        forms = {url}
        try:
            password = make_url(url).password
        except ArgumentError:
            password = None
        if password:
            forms |= {str(password), quote(str(password), safe=""), unquote(str(password))}
        if "://" in url and "@" in url.split("://", 1)[1]:
            userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
            if ":" in userinfo:  # the password as written, and the pieces a raw '@' or ':' in it cuts it into
                written = userinfo.split(":", 1)[1]
                forms |= {written, *(piece for piece in re.split(r"[@:/]", written) if len(piece) >= 3)}
        for form in sorted((f for f in forms if f), key=len, reverse=True):
            text = text.replace(form, "***")
        return text

    def _message(self, exc: BaseException) -> str:
        """The driver's own message (without SQLAlchemy's statement dump and link), secrets masked."""
        orig = getattr(exc, "orig", None)
        text = str(orig if orig is not None else exc).strip()
        return self._redact(text.split("\n[SQL:")[0].split("\n(Background on this error")[0])

    def _fail(self, what: str, exc: BaseException) -> SourceError:
        return SourceError(f"source {self.spec.name!r} ({self.describe()}): {what}: {self._message(exc)}")

    # --- statements ---------------------------------------------------------------------------------------------

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``), bound in every statement."""
        for name, value in params.items():
            if isinstance(value, float | Decimal) and value != value:
                raise OrderingError(
                    f"source {self.spec.name!r}: the incremental bound :{name} is {value!r}, which cannot be a resume point "
                    "(NaN equals nothing); the stored state was edited: start the incremental load over"
                )
        self.params = dict(params)
        self._plans.clear()

    def _col(self, column: str, alias: str = "conduit_src") -> str:
        """``conduit_src.<column>``, quoted by the dialect, as text() takes it (a colon is not a parameter)."""
        return f"{alias}.{self.preparer.quote_identifier(column)}".replace(":", "\\:")

    def _inner(self, query: str, plan: KeyPlan | None = None) -> sa.TextClause:
        """The user's query as text(): every colon literal but the ``:last_value`` placeholders, bound."""
        placeholder = (plan.last_value if plan is not None else "{param}").format(param=":last_value")
        source = self.syntax.clean(query)
        out = []
        for start, end, kind in self.syntax.scan(source):
            piece = source[start:end]
            if kind == "code":
                out.append(placeholder.join(p.replace(":", "\\:") for p in self.syntax.named.split(piece)))
            else:
                out.append(piece.replace(":", "\\:"))
        clause = sa.text("\n" + "".join(out) + "\n")
        if self.syntax.uses_last_value(source):
            if "last_value" not in self.params:
                raise SourceError(f"source {self.spec.name!r}: the query uses :last_value, but no value is bound for it")
            clause = clause.bindparams(_param("last_value", self.params["last_value"]))
        return clause

    def _select(self, query: str, plan: KeyPlan | None, *columns: str) -> Any:
        if self._partition is None:
            sub = self._inner(query, plan).columns().subquery("conduit_src")
        else:
            part = self._inner(query, plan).columns().subquery("conduit_part")
            restricted: Any = sa.select(sa.literal_column("*")).select_from(part).where(self._restriction(query))
            sub = restricted.subquery("conduit_src")
        return sa.select(*(sa.literal_column(c) for c in columns or ("*",))).select_from(sub)

    # --- partitions ---------------------------------------------------------------------------------------------

    def restrict(self, partition: "Partition") -> None:
        """Every later statement sees only the partition's rows (``_select``, where every statement gets its subquery,
        filters them); the column's kind, and the check that it holds no NULL, come with the first statement."""
        self._partition = partition
        self._restrictions = {}
        self._plans.clear()

    def _restriction(self, query: str) -> Any:
        """The partition's condition on ``query`` (a text clause with its bound parameters)."""
        found = self._restrictions.get(query)
        if found is not None:
            return found
        p = self._partition
        assert p is not None
        part = self._inner(query).columns().subquery("conduit_part")
        result = self._execute(sa.select(sa.literal_column("*")).select_from(part).limit(0))
        try:
            names = list(result.keys())
        finally:
            result.close()
        if p.column not in names:
            self._rollback()
            raise SourceError(
                f"source {self.spec.name!r}: partition column {p.column!r} is not a column of the query's result "
                f"(columns: {', '.join(names)}); fix `partitions: column` or select the column"
            )
        col = self._col(p.column, "conduit_part")
        result = self._execute(sa.select(sa.literal_column(col)).select_from(part).where(sa.text(f"{col} IS NOT NULL")).limit(1))
        try:
            row = result.fetchone()
            code = result.cursor.description[0][1] if result.cursor is not None else None
        finally:
            result.close()
        null = self._scalar_row(sa.select(sa.literal_column("1")).select_from(part).where(sa.text(f"{col} IS NULL")).limit(1))
        if null is not None:
            raise partition_null_error(self.spec.name, p)
        if row is None:  # no rows to tell the column's kind by: none to select either (asked again next statement)
            return sa.false()
        value = row[0]
        expr = col
        if isinstance(value, str) and self.dialect_name == "sqlite" and iso_text_form(value) and p.timezone is not None:
            # dates as ISO text: compared as text written in the same form (see the SQLite source)
            form = iso_text_form(value)
            assert form is not None
            lo, hi = iso_text_bounds(self.spec.name, p, form)
            expr = f"{col} COLLATE BINARY"
        else:
            kind = _partition_kind(value)
            if kind is None:
                raise partition_type_error(self.spec.name, p, _kind_name(_kind_of(value)))
            if kind == "timestamp" and self.dialect_name in _MYSQL and code == 7 and p.timezone is not None:
                # a TIMESTAMP holds instants, which the driver returns naive in the UTC session: a window compares as
                # the instant (key ranges compare the naive UTC values a scan returned)
                kind = "timestamptz"
            lo, hi = partition_bounds(self.spec.name, p, kind)
            if kind == "timestamptz" and self.dialect_name in _MYSQL:
                lo, hi = (None if b is None else b.astimezone(dt.UTC).replace(tzinfo=None) for b in (lo, hi))
        n = len(self._restrictions)
        conditions, params = [], []
        for op, name, bound in ((">=", f"conduit_lo_{n}", lo), ("<", f"conduit_hi_{n}", hi)):
            if bound is not None:
                conditions.append(f"{expr} {op} :{name}")
                params.append(_param(name, bound))
        clause = sa.text(" AND ".join(conditions) or f"{col} IS NOT NULL").bindparams(*params)
        self._restrictions[query] = clause
        return clause

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        """The column's values for key-range planning: one streamed statement without ORDER BY, fetched in chunks."""
        names = self.probe(query, None)
        if column not in names:
            raise SourceError(
                f"source {self.spec.name!r}: partition column {column!r} is not a column of the query's result "
                f"(columns: {', '.join(names)}); fix `partitions: column` or select the column"
            )
        stmt = self._select(query, None, self._col(column))
        try:
            result = self._connection().execution_options(stream_results=True).execute(stmt)
        except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
            self._rollback()
            raise self._fail("query failed", exc) from None
        ended = False
        try:
            desc = result.cursor.description[0] if result.cursor is not None else (column, None) + (None,) * 5
            arrow_t: pa.DataType | None = None
            while True:
                rows = result.fetchmany(CHUNK_ROWS)
                if not rows:
                    break
                values = [r[0] for r in rows]
                if any(v is None for v in values):
                    raise scan_null_error(self.spec.name, column)
                if arrow_t is None:
                    kind = _partition_kind(values[0])
                    if kind is None:
                        raise key_range_type_error(self.spec.name, column, _kind_name(_kind_of(values[0])))
                    arrow_t = _arrow_type(values[0], desc)
                    if kind == "int":
                        arrow_t = pa.int64()
                try:
                    if pa.types.is_string(arrow_t):  # a decimal of no declared precision
                        yield decimal_scan_array(values, self.spec.name, column)
                    else:
                        yield pa.array(values, type=arrow_t)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                    raise SourceError(
                        f"source {self.spec.name!r}: partition column {column!r} holds values of another type than its "
                        f"first ({exc}); CAST it to one integer, decimal, date or timestamp type in the query"
                    ) from None
            ended = True
        except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
            raise self._fail("read failed", exc) from None
        finally:
            if ended or self.dialect_name == "sqlite":
                try:
                    result.close()
                except Exception:  # noqa: BLE001, S110 - the scan's own error (if any) is the one to raise
                    pass
                self._rollback()
            else:  # stopped early: drop the connection rather than read the rest (see read)
                _abandon(result)
                try:
                    self.conn.invalidate()
                    result.close()
                except Exception:  # noqa: BLE001, S110 - the connection is gone either way
                    pass

    def _execute(self, stmt: Any, what: str = "query failed") -> Any:
        try:
            return self._connection().execute(stmt)
        except sa.exc.DBAPIError as exc:
            self._rollback()
            raise self._fail(what, exc) from None
        except sa.exc.StatementError as exc:
            self._rollback()
            raise self._fail(what, exc) from None

    def _connection(self) -> sa.Connection:
        """The source's connection, opened again if a read that stopped early dropped it."""
        if self.conn.invalidated or self.conn.closed:
            try:
                self.conn.close()
            except sa.exc.SQLAlchemyError:
                pass
            try:
                self.conn = self.engine.connect()
            except sa.exc.DBAPIError as exc:
                raise self._fail("cannot connect", exc) from None
        return self.conn

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except sa.exc.SQLAlchemyError:
            pass

    def _scalar_row(self, stmt: Any, what: str = "query failed") -> tuple[Any, ...] | None:
        result = self._execute(stmt, what)
        try:
            row = result.fetchone()
        finally:
            result.close()
        self._rollback()  # end the transaction the statement opened (no snapshot held between statements)
        return tuple(row) if row is not None else None

    def _plan(self, query: str, column: str) -> KeyPlan:
        """The checkpoint column's ordering, from its first non-NULL value (and the dialect's facts about it)."""
        cached = self._plans.get((query, column))
        if cached is not None:
            return cached
        self.probe(query, column)
        col = self._col(column)
        extra: list[str] = []
        if self.dialect_name in _MYSQL:
            extra = [f"CHARSET({col})"]
        elif self.dialect_name == "postgresql":
            extra = [f"CAST(pg_typeof({col}) AS TEXT)", "current_setting('server_encoding')"]
        stmt = self._select(query, None, col, *extra).where(sa.text(f"{col} IS NOT NULL")).limit(1)
        result = self._execute(stmt)
        try:
            row = result.fetchone()
            declared = str(result.cursor.description[0][1]).upper() if result.cursor is not None else ""
        finally:
            result.close()
        self._rollback()
        value = row[0] if row is not None else None
        lossy = next((why for name, why in _LOSSY.items() if declared.startswith(name)), None)
        if self.dialect_name == "duckdb" and lossy and value is not None:
            raise SourceError(
                f"source {self.spec.name!r}: checkpoint column {column!r} has type {declared}, whose Python value is not "
                f"exact ({lossy}); CAST it in the query (e.g. to TIMESTAMP or VARCHAR) or pick another column"
            )
        detail = "/".join(str(v) for v in row[1:]) if row is not None else ""
        plan = key_plan(
            self.spec.name,
            self.dialect_name,
            column,
            value,
            incremental=self.syntax.uses_last_value(self.syntax.clean(query)),
            detail=detail,
        )
        self._plans[(query, column)] = plan
        return plan

    def _no_nulls(self, query: str, column: str) -> None:
        """NULL is no resume point (and `>` would skip it on resume): looked for before anything is written."""
        col = self._col(column)
        stmt = self._select(query, None, "1").where(sa.text(f"{col} IS NULL")).limit(1)
        if self._scalar_row(stmt) is not None:
            raise OrderingError(
                f"source {self.spec.name!r}: checkpoint column {column!r} holds NULL, which cannot be ordered for resume; "
                f"nothing was written. Filter it out in the query (WHERE {column} IS NOT NULL), COALESCE it, or pick "
                "another checkpoint column"
            )

    # --- the Source protocol ------------------------------------------------------------------------------------

    def probe(self, query: str, column: str | None) -> list[str]:
        result = self._execute(self._select(query, None).limit(0))
        try:
            names = list(result.keys())
        finally:
            result.close()
        self._rollback()
        if column is not None:
            key_index(names, column, f"source {self.spec.name!r}")
        return names

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        return self._plan(query, column).python_types()

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        if upto is None:
            stmt = self._select(query, None, "count(*)")
        else:  # the rows up to a value, in the order resume uses
            plan = self._plan(query, upto[0])
            expr = plan.expr.format(col=self._col(upto[0]))
            cond = f"{expr} <= {plan.bound.format(param=':conduit_upto')}"
            stmt = self._select(query, plan, "count(*)").where(sa.text(cond).bindparams(_param("conduit_upto", upto[1])))
        row = self._scalar_row(stmt, "count failed")
        return int(row[0]) if row else 0

    def max_value(self, query: str, column: str) -> Any:
        """The largest value in conduit's order (ORDER BY ... DESC, not max(), which compares by the collation)."""
        plan = self._plan(query, column)
        col = self._col(column)
        stmt = self._select(query, plan, col).where(sa.text(f"{col} IS NOT NULL"))
        stmt = stmt.order_by(sa.text(f"{plan.expr.format(col=col)} DESC")).limit(1)
        row = self._scalar_row(stmt)
        value = row[0] if row else None
        if isinstance(value, Decimal) and not value.is_finite():  # NaN sorts last on PostgreSQL, and compares with nothing
            raise OrderingError(
                f"source {self.spec.name!r}: checkpoint column {column!r} holds {value}, which cannot be a resume point; "
                f"filter it out in the query (WHERE {column} <> 'NaN') or pick another checkpoint column"
            )
        if self._infinite(value):
            self._no_infinity(query, [column], set())
        return bytes(value) if isinstance(value, memoryview | bytearray) else value

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        if resume and isinstance(after, Decimal) and not after.is_finite():
            raise OrderingError(
                f"source {self.spec.name!r}: the checkpoint's last value of {column!r} is {after}, which cannot be a resume "
                "point (NaN equals nothing); the checkpoint was edited: start over"
            )
        plan = None
        if column is not None:
            plan = self._plan(query, column)
            self._no_nulls(query, column)
        size = max(1, min(fetch_size, CHUNK_ROWS))
        types = self._whole_types(query, size) if self._partition is not None else None
        stmt = self._select(query, plan)
        if plan is not None:
            col = self._col(plan.column)
            expr = plan.expr.format(col=col)
            if resume:
                cond = f"{expr} > {plan.bound.format(param=':conduit_after')}"
                stmt = stmt.where(sa.text(cond).bindparams(_param("conduit_after", after)))
            stmt = stmt.order_by(sa.text(expr))
        try:
            result = self._connection().execution_options(stream_results=True).execute(stmt)
        except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
            self._rollback()
            raise self._fail("query failed", exc) from None
        ended = False
        try:
            yield from self._chunks(query, result, plan, after if resume else None, size, types)
            ended = True
        except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
            raise self._fail("read failed", exc) from None
        finally:
            if ended:
                result.close()
                self._rollback()
            elif self.dialect_name == "sqlite":
                # stopped early: closing a SQLite cursor reads nothing more; after the connection is dropped it would
                # fail (and SQLAlchemy log a traceback)
                try:
                    result.close()
                except Exception:  # noqa: BLE001, S110 - the read's own error (if any) is the one to raise
                    pass
                self._rollback()
            else:
                # stopped early (an error, the run stopped): closing the result would read the rest of it first (a
                # streamed MySQL result is drained to its end); dropping the connection ends it now
                _abandon(result)
                try:
                    self.conn.invalidate()
                    result.close()
                except Exception:  # noqa: BLE001, S110 - the connection is gone either way
                    pass

    def _chunks(
        self, query: str, result: Any, plan: KeyPlan | None, after: Any, size: int, types: list[pa.DataType] | None
    ) -> Iterator[Chunk]:
        """The read's rows as chunks; ``types``: the columns' Arrow types (None: from the first chunk, ``_types``)."""
        description = list(result.cursor.description) if result.cursor is not None else []
        names = list(result.keys())
        if self.dialect_name == "duckdb":
            for d in description:
                lossy = next((why for name, why in _LOSSY.items() if str(d[1]).upper().startswith(name)), None)
                if lossy:
                    raise SourceError(
                        f"source {self.spec.name!r}: column {d[0]!r} has type {d[1]}, whose Python value is not exact "
                        f"({lossy}); CAST it in the query (to TIMESTAMP, VARCHAR ...)"
                    )
        idx = key_index(names, plan.column, f"source {self.spec.name!r}") if plan is not None else None
        position = 0  # rows of this read before the chunk
        previous = after
        finite: set[str] = set()  # DuckDB date and timestamp columns found to hold no infinity
        while True:
            rows = result.fetchmany(size)
            if not rows:
                return
            if types is None:
                types = self._types(query, rows, names, description)
            keys = None
            if plan is not None and idx is not None:
                keys = [r[idx] for r in rows]
                if plan.kind is bytes:
                    keys = [bytes(k) if isinstance(k, memoryview | bytearray) else k for k in keys]
                if self._infinite(keys[0]) or self._infinite(keys[-1]):  # in order, an infinity is at an end
                    self._no_infinity(query, [plan.column], finite)
                self._check_order(plan, keys, previous, position)
                previous = keys[-1]
            batch = self._batch(rows, names, types)
            if self.dialect_name == "duckdb":
                self._no_infinity(query, [n for n, a in zip(names, batch.columns, strict=True) if self._infinite(a)], finite)
            yield Chunk(batch, keys)
            position += len(rows)

    def _infinite(self, values: Any) -> bool:
        """Whether a DuckDB date or timestamp (a value, or an Arrow column's extremes) is the one its infinity and
        -infinity arrive as: the largest or smallest date or timestamp Python has."""
        if self.dialect_name != "duckdb" or values is None:
            return False
        if isinstance(values, pa.Array):
            if not (pa.types.is_date(values.type) or pa.types.is_timestamp(values.type)) or values.null_count == len(values):
                return False
            extremes = pc.min_max(values)
            return self._infinite(extremes["min"].as_py()) or self._infinite(extremes["max"].as_py())
        if isinstance(values, dt.datetime):
            return values.replace(tzinfo=None) in (dt.datetime.max, dt.datetime.min)
        return isinstance(values, dt.date) and values in (dt.date.max, dt.date.min)

    def _no_infinity(self, query: str, columns: list[str], finite: set[str]) -> None:
        """DuckDB's infinity and -infinity dates and timestamps arrive as 9999-12-31 (23:59:59.999999) and 0001-01-01:
        a column holding such a value is asked whether it holds an infinity (once per read), which is refused."""
        for column in columns:
            if column in finite:
                continue
            col = self._col(column)
            stmt = self._select(query, None, "1").where(sa.text(f"isinf({col})")).limit(1)
            try:  # on a connection of its own: the read's streams on this one
                with self.engine.connect() as conn:
                    found = conn.execute(stmt).fetchone() is not None
            except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
                raise self._fail("query failed", exc) from None
            if found:
                raise SourceError(
                    f"source {self.spec.name!r}: column {column!r} holds infinity or -infinity, which has no Python date or "
                    "timestamp (it would arrive changed, as 9999-12-31 or 0001-01-01); nothing past the previous batch was "
                    f"written. Filter it out (WHERE isfinite({column})) or CAST it to VARCHAR in the query"
                )
            finite.add(column)

    def _types(self, query: str, rows: list[Any], names: list[str], description: list[Any]) -> list[pa.DataType]:
        """The columns' Arrow types, fixed once per run from the first rows: each column's first non-NULL value (and
        the cursor's description), REAL for integers mixed with reals (SQLite keeps 5 and 5.5 each in its own type; an
        integer a double cannot hold exactly is refused when the batch is built), and, for a column NULL throughout
        them, its first non-NULL value in the whole query."""
        types = []
        for i, name in enumerate(names):
            first = next((r[i] for r in rows if r[i] is not None), None)
            if first is None:
                first = self._first_value(query, name)
            t = _arrow_type(first, description[i] if i < len(description) else (name, None) + (None,) * 5)
            if pa.types.is_int64(t) and any(type(r[i]) is float for r in rows):
                t = pa.float64()
            types.append(t)
        return types

    def _whole_types(self, query: str, size: int) -> list[pa.DataType]:
        """A partition's column types, taken as an unpartitioned run of the whole query takes them (``_types``): from
        its first ``size`` rows (a bounded sample, in the database's own order, not restricted to the partition). Every
        partition so writes one schema, whatever its own rows hold (5 in one and 5.5 in another, or only NULL)."""
        sample: Any = (
            sa.select(sa.literal_column("*")).select_from(self._inner(query).columns().subquery("conduit_src")).limit(size)
        )
        result = self._execute(sample)
        try:
            description = list(result.cursor.description) if result.cursor is not None else []
            names = list(result.keys())
            rows = list(result.fetchall())
        finally:
            result.close()
        self._rollback()
        return self._types(query, rows, names, description)

    def _first_value(self, query: str, column: str) -> Any:
        """A column NULL throughout the first rows: its first non-NULL value anywhere in the whole query (never only the
        partition's rows) fixes its type."""
        col = self._col(column)
        whole = self._inner(query).columns().subquery("conduit_src")
        stmt: Any = sa.select(sa.literal_column(col)).select_from(whole).where(sa.text(f"{col} IS NOT NULL")).limit(1)
        try:  # on a connection of its own: the read's streams on this one
            with self.engine.connect() as conn:
                row = conn.execute(stmt).fetchone()
        except (sa.exc.DBAPIError, sa.exc.StatementError) as exc:
            raise self._fail("query failed", exc) from None
        return row[0] if row else None

    def _batch(self, rows: list[Any], names: list[str], types: list[pa.DataType | None]) -> pa.RecordBatch:
        """Column by column (rows_to_batch's way), a value that does not fit its column's type named with the column."""
        arrays = []
        for name, values, t in zip(names, zip(*rows, strict=True), types, strict=True):
            try:
                try:
                    if t is not None and pa.types.is_integer(t):
                        no_reals(name, values)
                    arrays.append(pa.array(values, type=t))
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    if t is None or not (pa.types.is_string(t) or pa.types.is_binary(t)):
                        raise
                    # text from non-str values (UUID, JSON documents), bytes from memoryview
                    arrays.append(_array(tuple(_plain(v, t) for v in values), t))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError, ValueError) as exc:
                raise SourceError(
                    f"source {self.spec.name!r}: column {name!r} holds a value that does not fit the type {t} taken from "
                    f"its first values ({exc}); CAST it to one type in the query (e.g. a wide integer to DECIMAL(38, 0) "
                    "or to text)"
                ) from None
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _check_order(self, plan: KeyPlan, keys: list[Any], previous: Any, position: int) -> None:
        """Every key present, of the planned kind, and none smaller than the one before it in Python's order: a
        database ordering them otherwise would make a resume skip or repeat rows."""
        kind = plan.kind
        chain = keys if previous is None else [previous, *keys]
        try:
            if all(type(k) is kind for k in keys) and all(map(operator.le, chain, itertools.islice(chain, 1, None))):
                return  # the common case, at C speed
        except (TypeError, ArithmeticError):
            pass  # naive and aware timestamps, a NaN decimal (which refuses to be compared): found below
        for n, key in enumerate(keys):
            row = position + n + 1  # of the read
            if key is None:
                raise OrderingError(
                    f"source {self.spec.name!r}: checkpoint column {plan.column!r} holds NULL (row {row} of the read); filter "
                    f"it out (WHERE {plan.column} IS NOT NULL) or pick another checkpoint column"
                )
            if isinstance(key, Decimal) and not key.is_finite():
                raise OrderingError(
                    f"source {self.spec.name!r}: checkpoint column {plan.column!r} holds {key} (row {row} of the read), "
                    "which cannot be a resume point (NaN equals nothing); nothing past the previous batch was written. "
                    f"Filter it out in the query (WHERE {plan.column} <> 'NaN') or pick another checkpoint column"
                )
            found = _kind_of(key)
            if found is not kind:
                held = f"{_kind_name(kind)} values" if kind else "nothing"
                raise OrderingError(
                    f"source {self.spec.name!r}: checkpoint column {plan.column!r} holds the {_kind_name(found)} value "
                    f"{key!r} at row {row} of the read where it held {held} before (mixed types, or rows added during the "
                    "read); CAST it to one type in the query and run again"
                )
            if previous is not None:
                try:
                    backwards = key < previous
                except TypeError:
                    raise OrderingError(
                        f"source {self.spec.name!r}: checkpoint column {plan.column!r} mixes {previous!r} and {key!r} (row "
                        f"{row} of the read), which do not compare (a timestamp with and one without a time zone); CAST it "
                        "to one type in the query"
                    ) from None
                if backwards:
                    before = f"the checkpoint's {previous!r}" if row == 1 else f"{previous!r} (row {row - 1})"
                    raise OrderingError(
                        f"source {self.spec.name!r}: checkpoint column {plan.column!r}: the database returned {key!r} (row "
                        f"{row} of the read) after {before}: it orders the column otherwise than conduit compares the "
                        "values, so a resume could skip or repeat rows; nothing past the previous batch was written. Use an "
                        "integer or timestamp checkpoint column, or CAST it in the query"
                    )
            previous = key

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.engine.dispose()


def _partition_kind(value: Any) -> str | None:
    """The partition kind (base.PARTITION_KINDS) of a value the driver returned, or None."""
    kind = _kind_of(value)
    if kind is int:
        return "int"
    if kind is Decimal:
        return "decimal" if value.is_finite() else None
    if kind is dt.datetime:
        return "timestamptz" if value.tzinfo is not None else "timestamp"
    if kind is dt.date:
        return "date"
    return None


def _param(name: str, value: Any) -> Any:
    """``value`` bound as ``:name``, as the driver receives it. A Decimal goes to the driver unchanged: the type
    SQLAlchemy infers for it (Numeric) turns it into a float on a dialect without a native decimal (DuckDB, SQLite), and
    ``k > 1.0`` would skip 1.00000000000000000002. Other values keep SQLAlchemy's type, which hands them over as they are
    (SQLite, which has no date type, gets dates and timestamps as SQLAlchemy writes them: 2025-01-01 00:00:00.000000)."""
    if isinstance(value, Decimal):
        return sa.bindparam(name, value, type_=NullType())
    return sa.bindparam(name, value)


def _abandon(result: Any) -> None:
    """Tell PyMySQL an unbuffered result will not be read to its end (else closing or collecting it reads on from a
    closed socket)."""
    unbuffered: Any = getattr(getattr(result, "cursor", None), "_result", None)
    if unbuffered is not None and getattr(unbuffered, "unbuffered_active", False):
        unbuffered.unbuffered_active = False


def _mysql_session(dbapi_connection: Any, record: Any) -> None:
    """UTC for TIMESTAMP (read in the session zone), and a UTF-8 result set: a value the driver decodes in another
    character set could turn two values into one ('?'), and ties would be grouped otherwise than the database orders."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET time_zone = '+00:00'")
        cursor.execute("SELECT @@character_set_results")
        charset = str((cursor.fetchone() or [""])[0] or "")
    finally:
        cursor.close()
    if charset.lower() != "utf8mb4":
        raise ConduitError(
            f"the connection's result character set is {charset or 'NULL'}, not utf8mb4, so values could be changed; "
            "remove charset= from `url` (or set charset=utf8mb4)"
        )


# --- the backend: ingest.yml `type: sqlalchemy` ----------------------------------------------------------------------


_URL_FIX = (
    "write dialect+driver://user:${PASSWORD}@host:port/database (e.g. mysql+pymysql://etl:${MYSQL_PASSWORD}@db:3306/shop, "
    "sqlite:///data/app.db, duckdb:///data/lake.duckdb), percent-encoding @ : / in a user or password"
)


def _location(url: URL, dialect: str) -> str:
    """``dialect://host:port/database``: never the user, the password or the query string."""
    database = url.database or ""
    if dialect in ("sqlite", "duckdb"):
        return f"{dialect}:///{database}"
    host = url.host or ""
    if re.search(r"[@/?#\s]", host):  # a password holding a raw '@' puts a piece of itself there
        return f"{dialect}://***"
    if re.search(r"[@:/?#\s]", database):
        database = "***"
    return f"{dialect}://{host}:{url.port or ''}/{database}"


def _parse(e: _Entry, file: Path, name: str, resume: bool, column: str | None) -> SqlaSourceSpec:
    e.finish(_KEYS)
    text = e.text("url", required=True, url=True)
    assert text is not None
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise e.fail("url", f"is not a SQLAlchemy URL (not shown, it may hold a password): {_URL_FIX}") from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise e.fail(
            "url",
            f"no SQLAlchemy dialect {url.drivername!r} is installed: install the package that provides it (e.g. "
            "duckdb-engine, snowflake-sqlalchemy), or fix the URL's scheme; " + _URL_FIX,
        ) from None
    except ImportError as exc:
        raise e.fail("url", f"the dialect {url.drivername!r} could not be loaded ({exc.name or exc}); install it") from None
    backend = url.get_backend_name()
    if backend in ("sqlite", "duckdb") and url.database not in (None, "", ":memory:") and not url.database.startswith("file:"):
        path = Path(url.database).expanduser()
        if not path.is_absolute():  # relative to ingest.yml, as every path in it
            url = url.set(database=str((file.parent / path).resolve()))
        text = url.render_as_string(hide_password=False)
    return SqlaSourceSpec(
        name=name, url=Secret(text), dialect=backend, location=_location(url, backend), resume=resume, checkpoint_column=column
    )


def _resource_query(e: _Entry, source: Any, source_name: str) -> str:
    """The resource's ``query:`` (required, shown as written, so no ``${VAR}``), read as the source's dialect reads it.

    ingest.yml's check that ``:last_value`` and ``incremental_column`` go together calls ``_uses_last_value`` with the
    query alone: on MySQL/MariaDB the query is refused here when standard SQL would read its placeholder otherwise than
    MySQL does, so that either reading gives MySQL's answer."""
    query = e.text("query", required=True, env=False) or ""
    mine = syntax(getattr(source, "dialect", ""))
    try:
        mine.clean(query)
    except SpecError as exc:
        raise e.fail("query", f"{exc}") from None
    if mine is MYSQL_SYNTAX:
        try:
            standard: bool | None = STANDARD.uses_last_value(query)
        except SpecError:
            standard = None  # not standard SQL (a quote in a # comment, a backslash escape): MySQL's reading is used
        if standard is not None and standard != MYSQL_SYNTAX.uses_last_value(query):
            raise e.fail(
                "query",
                f"source {source_name!r} is MySQL, which reads this query's :last_value "
                f"{'outside' if not standard else 'inside'} a comment or string where standard SQL does not (`#` starts "
                "a comment in MySQL, `--` only when a space follows it, and a backslash escapes a quote): write "
                "comments as /* ... */ and put :last_value in the query's code only",
            )
    return query


def _uses_last_value(query: str) -> bool:
    """Whether the query has a ``:last_value`` placeholder: as standard SQL reads it, or as MySQL does for a query only
    MySQL can read (``_resource_query`` has refused a MySQL query on which the two disagree)."""
    try:
        return STANDARD.uses_last_value(query)
    except SpecError:
        return MYSQL_SYNTAX.uses_last_value(query)


def _selection(resource: Any) -> str:
    """What a checkpoint's rows were selected by: the query as the source runs it."""
    return syntax(getattr(resource.source, "dialect", "")).clean(resource.query).strip()


_KINDS = {"postgresql": "postgres", "mssql": "sqlserver"}
_KEYS = frozenset({"name", "type", "resume", "checkpoint_column", "url"})
BACKEND = register_source_backend(
    SourceBackend(
        type="sqlalchemy",
        keys=_KEYS,
        parse=_parse,
        open=SqlaSource,
        identity=lambda s: f"sqlalchemy:{s.location}",
        kinds=lambda s: {_KINDS.get(s.dialect, s.dialect), "sqlalchemy"},
        selection=_selection,
        resource_query=_resource_query,
        uses_last_value=_uses_last_value,
    )
)
