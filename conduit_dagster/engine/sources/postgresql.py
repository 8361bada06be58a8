"""PostgreSQL source: a server-side (named) cursor, so memory is bounded by the fetch size.

The column types come from PostgreSQL's type OIDs, not from the values, so every batch (and
every resumed run) writes the same Arrow schema. The resume parameter is cast to the column's
own type and text columns are compared with COLLATE "C", so that PostgreSQL's ``>`` and
ORDER BY agree with each other and with Python's ordering of the values we checkpoint.
"""

import datetime as dt
import itertools
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa

from conduit_dagster.engine.errors import OrderingError, SourceError
from conduit_dagster.engine.sources.base import Chunk, key_index, rows_to_batch
from conduit_dagster.engine.spec import PostgresSourceSpec
from conduit_dagster.engine.sql import wrap_query

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


def connect_kwargs(spec: PostgresSourceSpec) -> dict[str, Any]:
    if spec.url is not None:
        url = spec.url.reveal().replace("postgresql+psycopg2://", "postgresql://", 1)
        return {"dsn": url}
    kwargs: dict[str, Any] = {"host": spec.host, "port": spec.port, "dbname": spec.database}
    if spec.user:
        kwargs["user"] = spec.user
    if spec.password is not None:
        kwargs["password"] = spec.password.reveal()
    return kwargs


def redact(text: str, spec: PostgresSourceSpec) -> str:
    for secret in (spec.password, spec.url):
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), "***")
    if spec.url is not None:
        from sqlalchemy.engine import make_url

        try:
            pw = make_url(spec.url.reveal()).password
        except Exception:  # noqa: BLE001 - an unparsable URL has nothing more to hide here
            pw = None
        if pw:
            text = text.replace(str(pw), "***")
    return text


class PostgresSource:
    def __init__(self, spec: PostgresSourceSpec) -> None:
        self.spec = spec
        try:
            self.conn = psycopg2.connect(application_name="conduit-dagster", connect_timeout=15, **connect_kwargs(spec))
        except psycopg2.Error as exc:
            raise SourceError(
                f"source {spec.name!r}: cannot connect to PostgreSQL at {self.describe()}: {redact(str(exc).strip(), spec)}"
            ) from None
        psycopg2.extras.register_default_json(self.conn, loads=lambda s: s)
        psycopg2.extras.register_default_jsonb(self.conn, loads=lambda s: s)
        psycopg2.extensions.register_type(_RAW_TEXT, self.conn)
        with self.conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            if spec.schema:
                cur.execute("SELECT set_config('search_path', %s, false)", (spec.schema,))
        self.conn.commit()
        self.conn.set_session(readonly=True)

    def describe(self) -> str:
        if self.spec.url is not None:
            from sqlalchemy.engine import make_url

            try:
                url = make_url(self.spec.url.reveal())  # only these parts: a query string may hold a password
                return f"postgresql://{url.host or ''}:{url.port or 5432}/{url.database or ''}"
            except Exception:  # noqa: BLE001 - an unparsable URL is described by its scheme alone
                return "postgresql://***"
        return f"postgresql://{self.spec.host}:{self.spec.port}/{self.spec.database}"

    def _fail(self, what: str, exc: Exception) -> SourceError:
        return SourceError(f"source {self.spec.name!r} ({self.describe()}): {what}: {redact(str(exc).strip(), self.spec)}")

    def _column_type(self, query: str, column: str) -> tuple[str, bool]:
        """The checkpoint column's SQL type name, and whether it is a text type."""
        probe = f"SELECT * FROM (\n{query}\n) AS conduit_src LIMIT 0"
        with self.conn.cursor() as cur:
            cur.execute(probe.replace("%", "%%"), {})
            names = [d.name for d in cur.description]
            oid = cur.description[key_index(names, column, f"source {self.spec.name!r}")].type_code
            cur.execute("SELECT format_type(oid, NULL), typcategory FROM pg_type WHERE oid = %s", (oid,))
            type_name, category = cur.fetchone()
        self.conn.rollback()
        return type_name, category == "S"

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        from conduit_dagster.engine.sql import clean_query

        try:
            cast, is_text = self._column_type(clean_query(query), column) if column else (None, False)
            # psycopg2 formats the text when parameters are given: a literal % must be doubled.
            sql = wrap_query(
                query.replace("%", "%%"), column, resume=resume, param="%(v)s", collate="C" if is_text else None, cast=cast
            )
            cur = self.conn.cursor(name=f"conduit_{next(_counter)}")
            cur.itersize = fetch_size
            cur.execute(sql, {"v": after} if resume else {})
        except SourceError:
            self.conn.rollback()
            raise
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
                yield Chunk(rows_to_batch(rows, names, types), keys)
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
