"""PostgreSQL source: a server-side (named) cursor, so memory is bounded by the fetch size.

The column types come from PostgreSQL's type OIDs, not from the values, so every batch (and
every resumed run) writes the same Arrow schema. The resume parameter is cast to the column's
own type and text columns are compared with COLLATE "C", so that PostgreSQL's ``>`` and
ORDER BY agree with each other and with Python's ordering of the values we checkpoint.
"""

import datetime as dt
import itertools
import os
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa
import pyarrow.csv as pacsv

from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError
from conduit_dagster.engine.pg import connect, describe, redact
from conduit_dagster.engine.sources.base import Chunk, key_index, rows_to_batch
from conduit_dagster.engine.sources.pgcopy import PsqlCopy, ThreadCopy, psql_environment, psql_path
from conduit_dagster.engine.spec import PostgresSourceSpec
from conduit_dagster.engine.sql import clean_query, quote_ident, replace_last_value, wrap_query

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
    1186: pa.duration("us"),
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
# Array types psycopg2 would turn into Python lists of objects we do not map: kept as PostgreSQL's text.
_RAW_TEXT_OIDS = (1231, 2951, 199, 3807, 1187, 1183, 1001, 1014, 1003, 1028, 1041, 651, 1270, 1263)
_RAW_TEXT = psycopg2.extensions.new_type(_RAW_TEXT_OIDS, "CONDUIT_RAW_TEXT", lambda value, cur: value)
_TEMPORAL_OIDS = (1082, 1114, 1184)
# Columns CSV cannot carry into their Arrow type: arrays (become lists) and intervals (durations).
_CURSOR_ONLY_OIDS = frozenset({1186} | {oid for oid, t in _OID_TYPES.items() if pa.types.is_list(t)})
# Key types whose Arrow order is PostgreSQL's (text compared with COLLATE "C"): checked without Python objects.
_ARROW_ORDERED = (
    pa.types.is_integer,
    pa.types.is_floating,
    pa.types.is_decimal,
    pa.types.is_date,
    pa.types.is_timestamp,
    pa.types.is_string,
    pa.types.is_binary,
)


_TEXT_OIDS = frozenset({25, 1043, 1042, 19})
# The Python type a checkpoint value of each column type has (numeric: Decimal, whatever its Arrow type).
_KEY_TYPES: dict[int, tuple[type, ...]] = {
    **dict.fromkeys((20, 21, 23, 26), (int,)),
    **dict.fromkeys((700, 701), (float,)),
    1700: (Decimal,),
    **dict.fromkeys(_TEXT_OIDS, (str,)),
    1082: (dt.date,),
    1114: (dt.datetime,),
    1184: (dt.datetime,),
    17: (bytes,),
}


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


def _arrow_keys(array: pa.Array, oid: int, arrow_t: pa.DataType | None) -> list[Any] | pa.Array:
    if oid == 1700 and pa.types.is_string(arrow_t):  # numeric without a precision lands as text, orders as a number
        return [None if v is None else Decimal(v) for v in array.to_pylist()]
    if oid in _TEXT_OIDS or (arrow_t is not None and not pa.types.is_string(arrow_t) and any(c(arrow_t) for c in _ARROW_ORDERED)):
        return array
    return array.to_pylist()


_INFINITE = {dt.date.max, dt.date.min, dt.datetime.max, dt.datetime.min}


def _check_finite(keys: list[Any], column: str) -> None:
    for k in keys:
        if k is not None and (k.replace(tzinfo=None) if isinstance(k, dt.datetime) else k) in _INFINITE:
            raise OrderingError(
                f"checkpoint column {column!r} holds 'infinity' (or the largest/smallest date), which cannot be a "
                f"resume point: filter it out (WHERE {column} <> 'infinity') or pick another column"
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
        try:
            self.conn = connect(spec, "source")
        except ConduitError as exc:
            raise SourceError(str(exc)) from None
        psycopg2.extras.register_default_json(self.conn, loads=lambda s: s)
        psycopg2.extras.register_default_jsonb(self.conn, loads=lambda s: s)
        psycopg2.extensions.register_type(_RAW_TEXT, self.conn)
        with self.conn.cursor() as cur:
            # Text output that parses back exactly: UTC ISO timestamps, shortest-exact floats.
            cur.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3; SET bytea_output = 'hex'")
            if spec.schema:
                cur.execute("SELECT set_config('search_path', %s, false)", (spec.schema,))
        self.conn.commit()
        self.conn.set_session(readonly=True)

    def describe(self) -> str:
        return describe(self.spec)

    def _fail(self, what: str, exc: Exception) -> SourceError:
        return SourceError(f"source {self.spec.name!r} ({self.describe()}): {what}: {redact(str(exc).strip(), self.spec)}")

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``), bound as parameters in every statement."""
        self.params = dict(params)

    def _text(self, query: str, *, text_key: bool = False) -> str:
        """The user's query for psycopg2: trailing ';'/comments off, literal % doubled, :last_value a parameter.

        ``text_key``: the incremental column is text, which conduit orders with COLLATE "C"; the user's
        ``col >= :last_value`` must compare the same way, so the parameter carries that collation."""
        placeholder = '(%(last_value)s COLLATE "C")' if text_key else "%(last_value)s"
        return replace_last_value(clean_query(query).replace("%", "%%"), placeholder)

    def _probe(self, query: str, column: str | None) -> tuple[list[Any], str | None, bool]:
        """The result's column descriptions, and the checkpoint column's SQL type name and text-ness."""
        probe = f"SELECT * FROM (\n{self._text(query)}\n) AS conduit_src LIMIT 0"
        with self.conn.cursor() as cur:
            cur.execute(probe, self.params)
            description = list(cur.description)
            if column is None:
                self.conn.rollback()
                return description, None, False
            names = [d.name for d in description]
            oid = description[key_index(names, column, f"source {self.spec.name!r}")].type_code
            cur.execute("SELECT format_type(oid, NULL), typcategory FROM pg_type WHERE oid = %s", (oid,))
            type_name, category = cur.fetchone()
        self.conn.rollback()
        return description, type_name, category == "S"

    def probe(self, query: str, column: str | None) -> list[str]:
        try:
            description, _, _ = self._probe(query, column)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        return [d.name for d in description]

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        try:
            sql = f"SELECT count(*) FROM (\n{self._text(query)}\n) AS conduit_src"
            params = dict(self.params)
            if upto is not None:  # the rows up to a value, in the order resume uses
                _, _, is_text = self._probe(query, upto[0])
                sql = (
                    f"SELECT count(*) FROM (\n{self._text(query, text_key=is_text and 'last_value' in params)}\n) AS conduit_src"
                )
                collate = ' COLLATE "C"' if is_text else ""
                sql += f" WHERE {quote_ident(upto[0])}{collate} <= %(upto)s"
                params["upto"] = upto[1]
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
            _, _, is_text = self._probe(query, column)
            col = quote_ident(column) + (' COLLATE "C"' if is_text else "")
            with self.conn.cursor() as cur:
                inner = self._text(query, text_key=is_text and "last_value" in self.params)
                cur.execute(f"SELECT max({col}) FROM (\n{inner}\n) AS conduit_src", self.params)
                value = cur.fetchone()[0]
            self.conn.rollback()
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        return bytes(value) if isinstance(value, memoryview) else value

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        try:
            description, _, _ = self._probe(query, column)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        oid = next(d.type_code for d in description if d.name == column)
        return _KEY_TYPES.get(oid)

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        """COPY the wrapped query out as CSV and parse it with Arrow (the fast path), or, for columns
        CSV cannot carry faithfully (arrays, intervals), stream it through a server-side cursor."""
        try:
            description, cast, is_text = self._probe(query, column)
        except SourceError:
            self.conn.rollback()
            raise
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        # psycopg2 formats the text when parameters are given: a literal % must be doubled.
        text_key = is_text and "last_value" in self.params
        sql = wrap_query(
            self._text(query, text_key=text_key),
            column,
            resume=resume,
            param="%(v)s",
            collate="C" if is_text else None,
            cast=cast,
        )
        params = {**self.params, "v": after} if resume else dict(self.params)
        schema = self._schema(description, [arrow_type(d) for d in description])
        if self.use_copy and all(d.type_code not in _CURSOR_ONLY_OIDS for d in description):
            yield from self._read_copy(sql, params, description, schema, column, fetch_size)
        else:
            yield from self._read_cursor(sql, params, schema, column, fetch_size)

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
        self, sql: str, params: dict[str, Any], description: list[Any], schema: pa.Schema, column: str | None, fetch_size: int
    ) -> Iterator[Chunk]:
        names = [d.name for d in description]
        final_types = [arrow_type(d) for d in description]
        parse_types = {n: (pa.string() if t == pa.binary() else t) for n, t in zip(names, final_types, strict=True)}
        idx = names.index(column) if column is not None else None
        key_oid = description[idx].type_code if idx is not None else 0
        key_type = final_types[idx] if idx is not None else None
        with self.conn.cursor() as cur:
            # Binding happens client-side in psycopg2 either way; COPY takes no parameters, so the literal is
            # quoted by libpq's escaping here, exactly as execute() would.
            copy_sql = b"COPY (" + cur.mogrify(sql, params) + b") TO STDOUT WITH (FORMAT csv)"
        psql = psql_path() if self.use_psql else None
        env = psql_environment(self.spec) if psql else None
        producer: PsqlCopy | ThreadCopy
        if psql and env is not None:
            producer = PsqlCopy(psql, env, copy_sql, lambda text: redact(text, self.spec))
        else:
            producer = ThreadCopy(self.conn, copy_sql)
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
                keys = _arrow_keys(batch.column(idx), key_oid, key_type) if idx is not None else None
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
        self, sql: str, params: dict[str, Any], schema: pa.Schema, column: str | None, fetch_size: int
    ) -> Iterator[Chunk]:
        try:
            cur = self.conn.cursor(name=f"conduit_{next(_counter)}")
            cur.itersize = fetch_size
            cur.execute(sql, params)
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise self._fail("query failed", exc) from None
        try:
            names: list[str] | None = None
            types: list[pa.DataType | None] = []
            idx: int | None = None
            key_oid = 0
            while True:
                rows = cur.fetchmany(fetch_size)
                if names is None:
                    names = [d.name for d in cur.description]
                    types = [arrow_type(d) for d in cur.description]
                    idx = names.index(column) if column else None
                    key_oid = cur.description[idx].type_code if idx is not None else 0
                if not rows:
                    break
                keys = None
                if idx is not None:
                    assert column is not None
                    keys = [r[idx] for r in rows]
                    if key_oid == 17:  # bytea arrives as memoryview, which does not order
                        keys = [None if k is None else bytes(k) for k in keys]
                    elif key_oid in _TEMPORAL_OIDS:
                        _check_finite(keys, column)
                yield Chunk(pa.RecordBatch.from_arrays(rows_to_batch(rows, names, types).columns, schema=schema), keys)
        except psycopg2.Error as exc:
            raise self._fail("read failed", exc) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SourceError(
                f"source {self.spec.name!r}: a value does not fit its column type ({exc}); CAST the column in the query"
            ) from None
        finally:
            try:
                cur.close()
                self.conn.rollback()
            except psycopg2.Error:
                pass

    def close(self) -> None:
        self.conn.close()
