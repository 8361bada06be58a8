"""PostgreSQL source: COPY parsed by Arrow, or a server-side (named) cursor; memory is bounded either way.

The column types come from PostgreSQL's type OIDs, not from the values, so every batch (and
every resumed run) writes the same Arrow schema.

A resume is exact only if PostgreSQL's ORDER BY and ``>`` agree with the equality and order of the
checkpoint values conduit hands over. So a checkpoint column must have one of the types for which
that holds (``_key_plan``); others are refused with the way out (CAST to text). Text is compared
byte-wise (COLLATE "C", or ``::text COLLATE "C"`` for types such as citext whose own equality is not
byte equality), and the resume value is cast to the column's unconstrained base type
(``pg_catalog.bpchar``, not ``character``, which means char(1)), so nothing truncates or rounds it.
"""

import datetime as dt
import itertools
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa
import pyarrow.csv as pacsv

from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError
from conduit_dagster.engine.pg import CONNECTION_KEYS, PostgresConnectionSpec, connect, describe, parse_connection, redact
from conduit_dagster.engine.sources.base import (
    Chunk,
    bound_condition,
    decimal_scan_array,
    key_index,
    key_range_type_error,
    partition_bounds,
    partition_column_error,
    partition_null_error,
    partition_type_error,
    restricted_text,
    rows_to_batch,
    scan_null_error,
)
from conduit_dagster.engine.sources.pgcopy import open_copy_producer
from conduit_dagster.engine.spec import _Entry
from conduit_dagster.engine.sql import clean_query, quote_ident, replace_last_value, uses_last_value, wrap_query

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


@dataclass(frozen=True)
class PostgresSourceSpec(PostgresConnectionSpec):
    """ingest.yml `type: postgresql` source: the connection, and the checkpoint column its resources default to."""

    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "postgresql"


_counter = itertools.count()

# PostgreSQL type OID -> Arrow type; None means "let Arrow infer" (arrays and the like).
_OID_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    26: pa.int64(),  # oid
    700: pa.float32(),
    701: pa.float64(),
    25: pa.string(),
    1043: pa.string(),
    1042: pa.string(),
    19: pa.string(),
    114: pa.string(),  # json, kept as its text
    3802: pa.string(),  # jsonb, kept as its text
    2950: pa.string(),  # uuid
    869: pa.string(),  # inet
    650: pa.string(),  # cidr
    17: pa.binary(),
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
    # interval (1186) is carried as PostgreSQL's text (IntervalStyle postgres): a duration would turn
    # '1 mon' into 30 days
    # one-dimensional arrays of simple types (a multi-dimensional one fails with a clear error)
    1000: pa.list_(pa.bool_()),
    1005: pa.list_(pa.int16()),
    1007: pa.list_(pa.int32()),
    1016: pa.list_(pa.int64()),
    1021: pa.list_(pa.float32()),
    1022: pa.list_(pa.float64()),
    1009: pa.list_(pa.string()),
    1015: pa.list_(pa.string()),
    1182: pa.list_(pa.date32()),
    1115: pa.list_(pa.timestamp("us")),
    1185: pa.list_(pa.timestamp("us", tz="UTC")),
}
# Types psycopg2 would turn into Python objects we do not map (arrays of them; intervals, whose timedelta
# would make '1 mon' 30 days; timetz, written back as +02:00 for +02; ranges, as Range objects): kept as
# PostgreSQL's text, exactly as COPY gives them.
_RANGE_OIDS = (3904, 3905, 3906, 3907, 3908, 3909, 3910, 3911, 3912, 3913, 3926, 3927)
_RAW_TEXT_OIDS = (1231, 2951, 199, 3807, 1187, 1183, 1001, 1014, 1003, 1028, 1041, 651, 1270, 1263, 1186, 1266, *_RANGE_OIDS)
_RAW_TEXT = psycopg2.extensions.new_type(_RAW_TEXT_OIDS, "CONDUIT_RAW_TEXT", lambda value, cur: value)
# Columns CSV cannot carry into their Arrow type: arrays (become lists).
_CURSOR_ONLY_OIDS = frozenset({oid for oid, t in _OID_TYPES.items() if pa.types.is_list(t)})
_NUMERIC = 1700
_BPCHAR = 1042

# Checkpoint column types (by base type OID) whose PostgreSQL equality and order are those of the values
# conduit hands over, with the Python type of those values. bool is exact too; it has no entry because the
# runner's resume-value check (isinstance) cannot tell a bool from an int.
_KEY_TYPES: dict[int, tuple[type, ...]] = {
    **dict.fromkeys((20, 21, 23, 26), (int,)),  # int8, int2, int4, oid
    **dict.fromkeys((700, 701), (float,)),  # -0.0 = 0.0 on both sides; NaN is refused before reading
    _NUMERIC: (Decimal,),  # 1.0 = 1.00 on both sides; ±Infinity are bound as text (psycopg2 would send NaN)
    1082: (dt.date,),
    1114: (dt.datetime,),
    1184: (dt.datetime,),
    17: (bytes,),  # memcmp, then length: Python's bytes order
    2950: (str,),  # uuid: memcmp of the 16 bytes = order of its lower-case hex text
    1560: (str,),  # bit, varbit: the first differing bit, then length = order of the '0'/'1' text
    1562: (str,),
    **dict.fromkeys((25, 1043, 19, _BPCHAR), (str,)),  # compared with COLLATE "C": byte-wise
}
_PLAIN_KEYS = frozenset(_KEY_TYPES) - {25, 1043, 19, _BPCHAR} | {16}
_COLLATE_KEYS = frozenset({25, 1043, 19, _BPCHAR})
# Server encodings whose byte order is the code point order Python compares str by (under COLLATE "C").
_CODE_POINT_ORDERED = frozenset({"UTF8", "SQL_ASCII", "LATIN1"})
# Key types that can hold a value sorting after every other one that is no resume point: NaN (equal to
# nothing in Python), 'infinity' (no Arrow date or timestamp holds it).
_SENTINEL_KEYS = {700: "NaN", 701: "NaN", _NUMERIC: "NaN", 1082: "infinity", 1114: "infinity", 1184: "infinity"}
# Partition column types (by base type OID): what they hold (base.PARTITION_KINDS), and the type a bound is cast to.
_PARTITION_TYPES: dict[int, tuple[str, str]] = {
    20: ("int", "pg_catalog.int8"),
    21: ("int", "pg_catalog.int2"),
    23: ("int", "pg_catalog.int4"),
    26: ("int", "pg_catalog.oid"),
    _NUMERIC: ("decimal", "pg_catalog.numeric"),
    1082: ("date", "pg_catalog.date"),
    1114: ("timestamp", "pg_catalog.timestamp"),
    1184: ("timestamptz", "pg_catalog.timestamptz"),
}
# The Arrow type a key-range scan parses each kind into (numeric: see scan_column).
_SCAN_TYPES = {
    "int": pa.int64(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
}
# Why some common types cannot be checkpoint columns.
_REFUSED_WHY = {
    1186: "'1 mon' = '30 days' in PostgreSQL, but not as values",
    1083: "a checkpoint cannot hold a time of day",
    1266: "time with time zone is ordered by its UTC time, not by the value read",
    869: "inet is ordered by address family and netmask, not by its text",
    650: "cidr is ordered by address family and netmask, not by its text",
    3802: "jsonb is ordered by its own rules, not by its text",
    114: "json has no ordering",
    790: "money is read as formatted text",
}


@dataclass(frozen=True)
class _Key:
    """How the checkpoint column is ordered and compared, the same way in every statement."""

    column: str
    oid: int  # the base type's (for a domain, the type it is over)
    type_name: str  # as the user wrote it, for messages
    cast: str  # the unconstrained base type the bound value is cast to, quoted
    # "plain": the column itself; "collate": COLLATE "C"; "text": ::text COLLATE "C"; "padded": char(n) as the padded
    # text conduit reads (PostgreSQL's own comparison ignores the padding, so 'a\t ' < 'a  ' there but not in Python)
    order: str
    width: int = 0  # char(n): n
    # in a database whose encoding orders bytes otherwise than code points (WIN1251, KOI8, EUC...), text compares as
    # its UTF-8 bytes: Python's order of str
    utf8: bool = False

    def _text(self, col: str) -> str:
        if self.order == "padded":
            return f"pg_catalog.rpad(({col})::pg_catalog.text, {self.width})"
        return f"({col})::pg_catalog.text" if self.order == "text" or self.utf8 else col

    def expr(self, col: str) -> str:
        if self.order == "plain":
            return col
        if self.utf8:
            return f"pg_catalog.convert_to({self._text(col)}, 'UTF8')"
        return f'{self._text(col)} COLLATE "C"'

    def bound(self, placeholder: str) -> str:
        if self.order == "plain":
            return f"CAST({placeholder} AS {self.cast})"
        value = f"CAST({placeholder} AS pg_catalog.text)"
        return f"pg_catalog.convert_to({value}, 'UTF8')" if self.utf8 else f'({value} COLLATE "C")'


def _bind_value(value: Any) -> Any:
    """psycopg2 sends every non-finite Decimal as 'NaN'::numeric: send its text, which the CAST reads exactly."""
    return str(value) if isinstance(value, Decimal) else value


def _is_nan(value: Any) -> bool:
    return (isinstance(value, float) and math.isnan(value)) or (isinstance(value, Decimal) and value.is_nan())


def _open_csv(stream: Any, names: list[str], types: dict[str, pa.DataType], fetch_size: int) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        pa.PythonFile(stream, mode="r"),
        read_options=pacsv.ReadOptions(column_names=names, block_size=_block_size(fetch_size)),
        # A row of one NULL column is an empty line: it must count as a row.
        parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types=types,
            null_values=[""],  # not Arrow's default list, which would turn the text 'NA' or 'NULL' into NULL
            strings_can_be_null=True,  # PostgreSQL's CSV: NULL is an empty field, '' is ""
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )


BLOCK_ENV = "CONDUIT_COPY_BLOCK_MB"


def _block_size(fetch_size: int) -> int:
    """CSV bytes per Arrow batch. 4 MiB measured fastest here (1 MiB: 14% slower, 16 MiB: 7%); small batches
    get less. A single row must fit in one block: $CONDUIT_COPY_BLOCK_MB raises the limit for huge values."""
    override = os.environ.get(BLOCK_ENV)
    if override and override.isdigit() and int(override) > 0:
        return int(override) << 20
    return max(1 << 20, min(4 << 20, fetch_size * 64))


def _unhex(value: str) -> bytes:
    if not value.startswith("\\x"):  # the session sets bytea_output = hex; anything else is not ours to guess
        raise SourceError(f"a bytea value did not arrive in hex format ({value[:20]!r}...)")
    return bytes.fromhex(value[2:])


def _finish_types(batch: pa.RecordBatch, types: list[pa.DataType | None]) -> pa.RecordBatch:
    """bytea arrives as PostgreSQL hex text (\\x00ff): decode it to binary."""
    if not any(t == pa.binary() for t in types):
        return batch
    arrays = list(batch.columns)
    for i, t in enumerate(types):
        if t == pa.binary():
            arrays[i] = pa.array([None if v is None else _unhex(v) for v in arrays[i].to_pylist()], pa.binary())
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _arrow_keys(array: pa.Array, key: _Key, arrow_t: pa.DataType | None) -> list[Any] | pa.Array:
    """The checkpoint values of a COPY chunk: the Arrow array itself (Arrow orders every exact key type as
    PostgreSQL does with the rules of ``_Key``), except numeric without a precision, which lands as text."""
    if key.oid == _NUMERIC and pa.types.is_string(arrow_t):
        return [None if v is None else Decimal(v) for v in array.to_pylist()]
    return array


def _unloadable(kind: str) -> Any:
    """A cursor typecaster for ``kind`` that refuses what COPY's Arrow parse refuses too: 'infinity' (psycopg2
    would make it date.max, a real date, silently) and BC dates."""

    def cast(value: str | None, cur: Any) -> Any:
        if value is not None and (value.endswith("infinity") or value.endswith(" BC")):
            raise _Unloadable(value)
        return kind_caster(value, cur)

    kind_caster = {"date": psycopg2.extensions.DATE, "timestamp": psycopg2.extensions.PYDATETIME}.get(
        kind, psycopg2.extensions.PYDATETIMETZ
    )
    return cast


class _Unloadable(Exception):
    pass


_DATE = psycopg2.extensions.new_type((1082,), "CONDUIT_DATE", _unloadable("date"))
_TIMESTAMP = psycopg2.extensions.new_type((1114,), "CONDUIT_TIMESTAMP", _unloadable("timestamp"))
_TIMESTAMPTZ = psycopg2.extensions.new_type((1184,), "CONDUIT_TIMESTAMPTZ", _unloadable("timestamptz"))
_CURSOR_TYPES = (
    _DATE,
    _TIMESTAMP,
    _TIMESTAMPTZ,
    psycopg2.extensions.new_array_type((1182,), "CONDUIT_DATE_ARRAY", _DATE),
    psycopg2.extensions.new_array_type((1115,), "CONDUIT_TIMESTAMP_ARRAY", _TIMESTAMP),
    psycopg2.extensions.new_array_type((1185,), "CONDUIT_TIMESTAMPTZ_ARRAY", _TIMESTAMPTZ),
    # numeric as PostgreSQL's own text, as COPY gives it (str(Decimal) would write '1E-30' or '0E-7')
    psycopg2.extensions.new_type((_NUMERIC,), "CONDUIT_NUMERIC_TEXT", lambda value, cur: value),
)


def arrow_type(column: Any) -> pa.DataType | None:
    oid = column.type_code
    if oid == 1700:  # numeric: exact decimal when its precision fits, else its exact text
        precision, scale = column.precision, column.scale
        if precision and 0 < precision <= 38 and scale is not None and scale >= 0:
            return pa.decimal128(precision, scale)
        return pa.string()
    return _OID_TYPES.get(oid, pa.string())


class PostgresSource:
    def __init__(self, spec: PostgresSourceSpec, *, use_copy: bool = True, use_psql: bool = True) -> None:
        self.spec = spec
        self.params: dict[str, Any] = {}
        self.use_copy = use_copy
        self.use_psql = use_psql
        self._server_encoding: str | None = None
        self._partition: Partition | None = None
        # the query text (as _text makes it) -> the partition's condition on it and that condition's parameters
        self._restrictions: dict[str, tuple[str, dict[str, Any]]] = {}
        self.conn = self._connect()
        psycopg2.extras.register_default_json(self.conn, loads=lambda s: s)
        psycopg2.extras.register_default_jsonb(self.conn, loads=lambda s: s)
        psycopg2.extensions.register_type(_RAW_TEXT, self.conn)
        self.conn.set_session(readonly=True)

    def _connect(self) -> Any:
        """A connection in conduit's pinned session (pg.connect: UTC, ISO dates, postgres intervals, exact floats,
        hex bytea, UTF8), with the source's search_path."""
        try:
            conn = connect(self.spec, "source")
        except ConduitError as exc:
            raise SourceError(str(exc)) from None
        if self.spec.schema:
            with conn.cursor() as cur:
                cur.execute("SELECT set_config('search_path', %s, false)", (self.spec.schema,))
            conn.commit()
        return conn

    def describe(self) -> str:
        return describe(self.spec)

    def _fail(self, what: str, exc: Exception) -> SourceError:
        return SourceError(f"source {self.spec.name!r} ({self.describe()}): {what}: {redact(str(exc).strip(), self.spec)}")

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``), bound as parameters in every statement."""
        for name, value in params.items():
            if _is_nan(value):
                raise OrderingError(
                    f"source {self.spec.name!r}: the incremental bound :{name} is {value!r}, which cannot be a resume point "
                    "(NaN equals nothing); the stored state was edited: start the incremental load over"
                )
        self.params = dict(params)

    def _text(self, query: str, key: _Key | None = None) -> str:
        """The user's query for psycopg2: trailing ';'/comments off, literal % doubled, :last_value a parameter.

        ``key``: the incremental column, ordered as conduit orders it; the user's ``col >= :last_value`` must
        compare the same way, so the parameter is cast to the column's base type and carries its collation
        (citext then compares as text: byte-wise, not case-insensitively)."""
        if key is not None:
            if (key.order == "padded" or key.utf8) and uses_last_value(query):
                # the query's own `col >= :last_value` compares the bare column, which for these keys orders
                # otherwise than conduit does (char(n) ignores its padding; the server's bytes are not code points)
                why = (
                    f"has type char({key.width}), which compares ignoring its padding"
                    if key.order == "padded"
                    else f"is text in a database encoded {self._server_encoding}, whose byte order is not Python's"
                )
                raise SourceError(
                    f"source {self.spec.name!r}: incremental column {key.column!r} {why}, so the query's "
                    f"`{key.column} >= :last_value` could skip or repeat rows. Select it as text ({key.column}::text AS "
                    f"{key.column}) in a UTF8 database, or use a numeric or timestamp incremental_column"
                )
            placeholder = key.bound("%(last_value)s")
        elif isinstance(self.params.get("last_value"), Decimal):
            placeholder = "CAST(%(last_value)s AS pg_catalog.numeric)"
        else:
            placeholder = "%(last_value)s"
        text = replace_last_value(clean_query(query).replace("%", "%%"), placeholder)
        return self._restricted(text) if self._partition is not None else text

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = {k: _bind_value(v) for k, v in self.params.items()}
        for _, bounds in self._restrictions.values():
            params.update(bounds)
        return {**params, **{k: _bind_value(v) for k, v in extra.items()}}

    # --- partitions ---------------------------------------------------------------------------------------------

    def restrict(self, partition: "Partition") -> None:
        """Every later statement sees only the partition's rows: the query text is wrapped (in ``_text``, the one
        place every statement gets it from) as ``SELECT * FROM (<query>) AS conduit_part WHERE col >= CAST(<lo> AS
        <type>) AND col < CAST(<hi> AS <type>)``, the bounds bound as parameters and cast to the column's base type.
        The column's type, and the check that it holds no NULL, come with the first statement on a query."""
        self._partition = partition
        self._restrictions = {}

    def _restricted(self, text: str) -> str:
        return restricted_text(text, self._restrictions, self._restriction)

    def _column_kind(self, cur: Any, text: str, column: str) -> tuple[Any, str | None, str, str]:
        """(description, partition kind or None, the base type to cast a bound to, the type's name) of ``column`` in
        the query ``text``."""
        cur.execute(f"SELECT * FROM (\n{text}\n) AS conduit_src LIMIT 0", self._params())
        names = [d.name for d in cur.description]
        if column not in names:
            raise partition_column_error(self.spec.name, column, names)
        desc = cur.description[names.index(column)]
        sql = "SELECT t.typtype, t.typbasetype, format_type(t.oid, NULL) FROM pg_type t WHERE t.oid = %s"
        oid = desc.type_code
        cur.execute(sql, (oid,))
        typtype, basetype, shown = cur.fetchone()
        while typtype == "d":  # a domain compares as the type it is over
            oid = basetype
            cur.execute(sql, (oid,))
            typtype, basetype, _ = cur.fetchone()
        kind, cast = _PARTITION_TYPES.get(oid, (None, ""))
        return desc, kind, cast, str(shown)

    def _restriction(self, text: str) -> tuple[str, dict[str, Any]]:
        """The partition's condition on the query ``text`` and its parameters; refuses a column of another type, and
        a query whose partition column holds NULL (one EXISTS, an index lookup where the column has an index)."""
        p = self._partition
        assert p is not None
        col = f"conduit_part.{quote_ident(p.column)}"
        try:
            with self.conn.cursor() as cur:
                _, kind, cast, type_name = self._column_kind(cur, text, p.column)
                if kind is None:
                    raise partition_type_error(self.spec.name, p, type_name)
                lo, hi = partition_bounds(self.spec.name, p, kind)
                cur.execute(f"SELECT EXISTS (SELECT 1 FROM (\n{text}\n) AS conduit_part WHERE {col} IS NULL)", self._params())
                has_null = bool(cur.fetchone()[0])
        finally:
            self.conn.rollback()
        if has_null:
            raise partition_null_error(self.spec.name, p)
        return bound_condition(col, len(self._restrictions), lo, hi, lambda p: f"CAST({p} AS {cast})", _bind_value)

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        """The column's values for key-range planning: ``COPY (SELECT col FROM (<query>)) TO STDOUT`` (no ORDER BY),
        parsed by Arrow in blocks of a few MiB, as read() does."""
        try:
            text = self._text(query)
            with self.conn.cursor() as cur:
                desc, kind, _, type_name = self._column_kind(cur, text, column)
                sql = f"SELECT conduit_src.{quote_ident(column)} FROM (\n{text}\n) AS conduit_src"
                copy_sql = b"COPY (" + cur.mogrify(sql, self._params()) + b") TO STDOUT WITH (FORMAT csv)"
            self.conn.rollback()
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        if kind is None:
            raise key_range_type_error(self.spec.name, column, type_name)
        # numeric(p, s) with p <= 38 parses exactly; any other numeric arrives as its text and becomes DECIMAL_SCAN
        parse_t = arrow_type(desc) if kind == "decimal" else _SCAN_TYPES[kind]
        try:
            producer = open_copy_producer(
                self.spec, self.conn, copy_sql, lambda message: redact(message, self.spec), use_psql=self.use_psql
            )
        except SourceError as exc:
            raise SourceError(f"source {self.spec.name!r}: {exc}") from None
        finished = False
        try:
            try:
                reader = _open_csv(producer.stream, [column], {column: parse_t}, 1 << 16)
            except pa.ArrowInvalid as exc:
                if "Empty CSV file" not in str(exc):
                    raise
                producer.finish()
                finished = True
                return
            for batch in reader:
                values = batch.column(0)
                if values.null_count:
                    raise scan_null_error(self.spec.name, column)
                if pa.types.is_string(values.type):
                    values = decimal_scan_array([Decimal(v) for v in values.to_pylist()], self.spec.name, column)
                yield values
            producer.finish()
            finished = True
        except psycopg2.Error as exc:
            raise self._fail("read failed", exc) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SourceError(
                f"source {self.spec.name!r}: partition column {column!r} holds a value that no key range can hold ({exc}); "
                "values such as 'infinity' or NaN: filter them out in the query"
            ) from None
        finally:
            if not finished:
                producer.abort()
            producer.close()

    def _probe(self, query: str, column: str | None) -> tuple[list[Any], _Key | None]:
        """The result's column descriptions, and how its checkpoint column is ordered (refused if it cannot be exact)."""
        probe = f"SELECT * FROM (\n{self._text(query)}\n) AS conduit_src LIMIT 0"
        with self.conn.cursor() as cur:
            cur.execute(probe, self._params())
            description = list(cur.description)
            if column is None:
                self.conn.rollback()
                return description, None
            names = [d.name for d in description]
            key = self._key_plan(cur, column, description[key_index(names, column, f"source {self.spec.name!r}")])
        self.conn.rollback()
        return description, key

    def _key_plan(self, cur: Any, column: str, desc: Any) -> _Key:
        sql = (
            "SELECT t.typname, n.nspname, t.typcategory, t.typtype, t.typbasetype, format_type(t.oid, NULL) "
            "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %s"
        )
        oid = desc.type_code
        cur.execute(sql, (oid,))
        typname, nspname, category, typtype, basetype, shown = cur.fetchone()
        type_name = shown
        while typtype == "d":  # a domain orders and compares as the type it is over
            oid = basetype
            cur.execute(sql, (oid,))
            typname, nspname, category, typtype, basetype, shown = cur.fetchone()
        cast = f"{quote_ident(nspname)}.{quote_ident(typname)}"
        if oid in _PLAIN_KEYS:
            return _Key(column, oid, type_name, cast, "plain")
        utf8 = self._encoding(cur) not in _CODE_POINT_ORDERED
        if oid == _BPCHAR and (desc.internal_size is None or desc.internal_size < 0):
            why = "character values without a length compare ignoring trailing spaces ('a' = 'a ')"
        elif oid == _BPCHAR:
            return _Key(column, oid, type_name, cast, "padded", width=desc.internal_size, utf8=utf8)
        elif oid in _COLLATE_KEYS:
            return _Key(column, oid, type_name, cast, "collate", utf8=utf8)
        elif category == "S":  # citext and the like: their own equality is not byte equality, their text's is
            return _Key(column, oid, type_name, "pg_catalog.text", "text", utf8=utf8)
        elif typtype == "e":
            why = "an enum is ordered by its declaration, not by its text"
        else:
            why = _REFUSED_WHY.get(oid, "PostgreSQL orders it otherwise than the values conduit reads")
        raise SourceError(
            f"source {self.spec.name!r}: checkpoint column {column!r} has type {type_name}, which cannot resume exactly "
            f"({why}): rows could be skipped or read twice. CAST it to text in the query (e.g. {column}::text AS "
            f"{column}) or pick another checkpoint column"
        )

    def _encoding(self, cur: Any) -> str:
        if self._server_encoding is None:
            cur.execute("SHOW server_encoding")
            self._server_encoding = str(cur.fetchone()[0]).upper()
        return self._server_encoding

    def probe(self, query: str, column: str | None) -> list[str]:
        try:
            description, _ = self._probe(query, column)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        return [d.name for d in description]

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        try:
            sql = f"SELECT count(*) FROM (\n{self._text(query)}\n) AS conduit_src"
            params = self._params()
            if upto is not None:  # the rows up to a value, in the order resume uses
                _, key = self._probe(query, upto[0])
                assert key is not None
                col = key.expr(f"conduit_src.{quote_ident(upto[0])}")
                sql = f"SELECT count(*) FROM (\n{self._text(query, key)}\n) AS conduit_src WHERE {col} <= {key.bound('%(upto)s')}"
                params = self._params(upto=upto[1])
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                n = int(cur.fetchone()[0])
            self.conn.rollback()
            return n
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("count failed", exc) from None

    def max_value(self, query: str, column: str) -> Any:
        try:
            _, key = self._probe(query, column)
            assert key is not None
            raw = f"conduit_src.{quote_ident(column)}"
            # real: the float of its exact value, as the checkpoint holds it, not of its short text
            selected = f"{raw}::pg_catalog.float8" if key.oid == 700 else raw
            # the largest in conduit's order (not max(), which has no bytea version before PostgreSQL 16), as read
            sql = (
                f"SELECT {selected} FROM (\n{self._text(query, key)}\n) AS conduit_src WHERE {raw} IS NOT NULL "
                f"ORDER BY {key.expr(raw)} DESC LIMIT 1"
            )
            with self.conn.cursor() as cur:
                cur.execute(sql, self._params())
                row = cur.fetchone()
            self.conn.rollback()
            value = row[0] if row else None
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        return bytes(value) if isinstance(value, memoryview) else value

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        try:
            _, key = self._probe(query, column)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        assert key is not None
        return _KEY_TYPES.get(key.oid)

    def _check_key_values(self, text: str, key: _Key) -> Callable[[], None]:
        """Start the check that the checkpoint column holds no NULL, NaN or 'infinity'; returns the call that waits
        for it.

        None of them can be a resume point, and all sort after every other value: found by the read, they would stop
        the run at its very end, after every other row was written (and, in append mode, committed). So they are
        looked for first: an index lookup each where the column has an index, else a pass over the query. The check
        runs on a connection of its own while the rows start streaming, and the first chunk is handed over only once it
        has passed: nothing is written before, and it costs no wall time while the server has a core free.
        """
        sentinel = _SENTINEL_KEYS.get(key.oid)
        col = f"conduit_src.{quote_ident(key.column)}"
        largest = f"SELECT max({key.expr(col)})::text FROM (\n{text}\n) AS conduit_src" if sentinel else "SELECT NULL"
        sql = f"SELECT ({largest}), EXISTS (SELECT 1 FROM (\n{text}\n) AS conduit_src WHERE {col} IS NULL)"
        params = self._params()
        outcome: list[BaseException | tuple[str | None, bool]] = []

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

        thread = threading.Thread(target=look, name="conduit-key-check", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            found = outcome[0]
            if isinstance(found, psycopg2.Error):
                raise self._fail("query failed", found)
            if isinstance(found, BaseException):
                raise found
            top, has_null = found
            if has_null:
                raise OrderingError(
                    f"source {self.spec.name!r}: checkpoint column {key.column!r} holds NULL, which cannot be ordered for "
                    f"resume; nothing was written. Filter it out in the query (WHERE {key.column} IS NOT NULL), COALESCE "
                    "it, or pick another checkpoint column"
                )
            if sentinel is None or top != sentinel:
                return
            fix = f"WHERE {key.column} <> 'NaN'" if sentinel == "NaN" else f"WHERE isfinite({key.column})"
            what = "equals nothing, so no resume point can be past it" if sentinel == "NaN" else "fits no Arrow date or timestamp"
            raise OrderingError(
                f"source {self.spec.name!r}: checkpoint column {key.column!r} holds {sentinel!r}, which {what}; nothing "
                f"was written. Filter it out in the query ({fix}) or pick another checkpoint column"
            )

        return wait

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        """COPY the wrapped query out as CSV and parse it with Arrow (the fast path), or, for columns
        CSV cannot carry faithfully (arrays), stream it through a server-side cursor."""
        if resume and _is_nan(after):
            raise OrderingError(
                f"source {self.spec.name!r}: the checkpoint's last value of {column!r} is {after!r}, which cannot be a "
                "resume point (NaN equals nothing); the checkpoint was edited: start over"
            )
        try:
            description, key = self._probe(query, column)
            text = self._text(query, key)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        # psycopg2 formats the text when parameters are given: a literal % must be doubled.
        sql = wrap_query(
            text,
            column,
            resume=resume,
            param="%(v)s",
            expression=key.expr("{col}") if key is not None else None,
            bound=key.bound("%(v)s") if key is not None else None,
        )
        params = self._params(v=after) if resume else self._params()
        schema = self._schema(description, [arrow_type(d) for d in description])
        checked = self._check_key_values(text, key) if key is not None else None
        if self.use_copy and all(d.type_code not in _CURSOR_ONLY_OIDS for d in description):
            chunks = self._read_copy(sql, params, description, schema, key, fetch_size)
        else:
            chunks = self._read_cursor(sql, params, description, schema, key, fetch_size)
        if checked is None:
            yield from chunks
            return
        try:
            for chunk in chunks:
                if checked is not None:
                    checked()
                    checked = None
                yield chunk
            if checked is not None:
                checked()
        except ConduitError:
            if checked is not None:  # the read failed first (say on the 'infinity' itself): the key's error says why
                pending, checked = checked, None
                pending()
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _schema(self, description: list[Any], types: list[pa.DataType | None]) -> pa.Schema:
        """The Arrow schema, each field carrying its PostgreSQL type name (``conduit.pg_type``): a PostgreSQL
        destination creates its table with it where Arrow's type is only text (json, uuid, numeric...)."""
        oids = sorted({d.type_code for d in description})
        with self.conn.cursor() as cur:
            cur.execute("SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)", (oids,))
            names = dict(cur.fetchall())
        self.conn.rollback()
        fields = []
        for d, t in zip(description, types, strict=True):
            # char(n) would come back as char(1); user-defined types (OID >= 16384) may not exist at the destination
            builtin = d.type_code < 16384 and d.type_code != 1042
            meta = {"conduit.pg_type": names.get(d.type_code, "text")} if builtin else {}
            fields.append(pa.field(d.name, t if t is not None else pa.string(), metadata=meta))
        return pa.schema(fields)

    def _read_copy(
        self, sql: str, params: dict[str, Any], description: list[Any], schema: pa.Schema, key: _Key | None, fetch_size: int
    ) -> Iterator[Chunk]:
        names = [d.name for d in description]
        final_types = [arrow_type(d) for d in description]
        parse_types = {n: (pa.string() if t == pa.binary() else t) for n, t in zip(names, final_types, strict=True)}
        idx = names.index(key.column) if key is not None else None
        key_type = final_types[idx] if idx is not None else None
        with self.conn.cursor() as cur:
            # Binding happens client-side in psycopg2 either way; COPY takes no parameters, so the literal is
            # quoted by libpq's escaping here, exactly as execute() would.
            copy_sql = b"COPY (" + cur.mogrify(sql, params) + b") TO STDOUT WITH (FORMAT csv)"
        try:
            producer = open_copy_producer(
                self.spec, self.conn, copy_sql, lambda text: redact(text, self.spec), use_psql=self.use_psql
            )
        except SourceError as exc:  # a bad CONDUIT_PSQL: say which source it stopped
            raise SourceError(f"source {self.spec.name!r}: {exc}") from None
        finished = False
        try:
            try:
                reader = _open_csv(producer.stream, names, parse_types, fetch_size)
            except pa.ArrowInvalid as exc:
                if "Empty CSV file" not in str(exc):
                    raise
                producer.finish()
                finished = True
                return  # no rows
            # One chunk is held back until the next arrives or COPY ends cleanly: a connection that dies
            # mid-row could otherwise hand Arrow a truncated last line that parses as a valid row.
            held: Chunk | None = None
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                batch = pa.RecordBatch.from_arrays(_finish_types(batch, final_types).columns, schema=schema)
                keys = _arrow_keys(batch.column(idx), key, key_type) if key is not None and idx is not None else None
                if held is not None:
                    yield held
                held = Chunk(batch, keys)
            producer.finish()
            finished = True
            if held is not None:
                yield held
        except psycopg2.Error as exc:
            raise self._fail("read failed", exc) from None
        except SourceError as exc:
            raise SourceError(f"source {self.spec.name!r} ({self.describe()}): {exc}") from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            # A parse error at the end of a cut-off stream is the connection's failure, not the data's: the
            # producer has ended then. One still running is blocked on a pipe nobody reads: stop it, never wait.
            try:
                if producer.ended(timeout=2.0):
                    finished = True
                    producer.finish()
            except (psycopg2.Error, SourceError) as cause:
                raise self._fail("read failed", cause) from None
            message = re.sub(r"CSV column #(\d+)", lambda m: f"column {names[int(m.group(1))]!r}", str(exc))
            if "straddling" in message:
                raise SourceError(
                    f"source {self.spec.name!r}: a row is larger than the CSV block ({_block_size(fetch_size) >> 20} MiB); "
                    f"raise {BLOCK_ENV} (MiB) or leave the oversized column out of the query"
                ) from None
            raise SourceError(
                f"source {self.spec.name!r}: a value does not fit its column type ({message}); values such as "
                "'infinity' dates, BC dates or NaN numerics cannot be loaded: filter or CAST them in the query"
            ) from None
        finally:
            if not finished:
                producer.abort()
            producer.close()

    def _read_cursor(
        self, sql: str, params: dict[str, Any], description: list[Any], schema: pa.Schema, key: _Key | None, fetch_size: int
    ) -> Iterator[Chunk]:
        names = [d.name for d in description]
        types = [arrow_type(d) for d in description]
        # numeric arrives as its text (as on the COPY route); the fixed-precision ones are parsed by Arrow
        decimals = [
            i for i, (d, t) in enumerate(zip(description, types, strict=True)) if d.type_code == _NUMERIC and t != pa.string()
        ]
        parse_types = [pa.string() if i in decimals else t for i, t in enumerate(types)]
        idx = names.index(key.column) if key is not None else None
        try:
            cur = self.conn.cursor(name=f"conduit_{next(_counter)}")
            for caster in _CURSOR_TYPES:
                psycopg2.extensions.register_type(caster, cur)
            cur.itersize = fetch_size
            cur.execute(sql, params)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        try:
            while True:
                rows = cur.fetchmany(fetch_size)
                if not rows:
                    break
                keys = None
                if key is not None and idx is not None:
                    keys = [r[idx] for r in rows]
                    if key.oid == 17:  # bytea arrives as memoryview, which does not order
                        keys = [None if k is None else bytes(k) for k in keys]
                    elif key.oid == _NUMERIC:
                        keys = [None if k is None else Decimal(k) for k in keys]
                batch = rows_to_batch(rows, names, parse_types)
                if decimals:
                    arrays = list(batch.columns)
                    for i in decimals:
                        arrays[i] = arrays[i].cast(types[i])
                    batch = pa.RecordBatch.from_arrays(arrays, names=names)
                yield Chunk(pa.RecordBatch.from_arrays(batch.columns, schema=schema), keys)
        except psycopg2.Error as exc:
            raise self._fail("read failed", exc) from None
        except _Unloadable as exc:
            temporal = [d.name for d in description if d.type_code in (1082, 1114, 1184, 1182, 1115, 1185)]
            raise SourceError(
                f"source {self.spec.name!r}: a value does not fit its column type (value {exc.args[0]!r} in "
                f"{' or '.join(repr(n) for n in temporal)}); 'infinity' and BC dates cannot be loaded: filter them out "
                "(WHERE isfinite(column)) or CAST them in the query"
            ) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SourceError(
                f"source {self.spec.name!r}: a value does not fit its column type ({exc}); values such as NaN or "
                "infinite numerics in a numeric(p, s) column cannot be loaded: filter or CAST them in the query"
            ) from None
        finally:
            try:
                cur.close()
                self.conn.rollback()
            except psycopg2.Error:
                pass

    def close(self) -> None:
        self.conn.close()


# --- the backend: ingest.yml `type: postgresql` ------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str, resume: bool, column: str | None) -> PostgresSourceSpec:
    e.finish(_KEYS)
    return PostgresSourceSpec(name=name, resume=resume, checkpoint_column=column, **parse_connection(e))


def _identity(s: PostgresSourceSpec) -> str:
    """The server, database and schema (never the user or password): what a checkpoint's rows were read from."""
    host, port, database = s.host, s.port, s.database
    if s.url is not None:
        from sqlalchemy.engine import make_url

        url = make_url(s.url.reveal())
        host, port, database = url.host or "", url.port or 5432, url.database
    return f"postgresql://{host}:{port}/{database}?schema={s.schema or ''}"


_KEYS = frozenset({"name", "type", "resume", "checkpoint_column"} | CONNECTION_KEYS)
BACKEND = register_source_backend(
    SourceBackend(
        type="postgresql",
        keys=_KEYS,
        parse=_parse,
        open=PostgresSource,
        identity=_identity,
        kinds=lambda s: {"postgres"},
    )
)
