"""PostgreSQL source: a server-side (named) cursor, so memory is bounded by the fetch size.

The column types come from PostgreSQL's type OIDs, not from the values, so every batch (and
every resumed run) writes the same Arrow schema. The resume parameter is cast to the column's
own type and text columns are compared with COLLATE "C", so that PostgreSQL's ``>`` and
ORDER BY agree with each other and with Python's ordering of the values we checkpoint.
"""

import itertools
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa

from conduit_dagster.engine.errors import SourceError
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
}


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
                return make_url(self.spec.url.reveal()).render_as_string(hide_password=True)
            except Exception:  # noqa: BLE001
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
            while True:
                rows = cur.fetchmany(fetch_size)
                if names is None:
                    names = [d.name for d in cur.description]
                    types = [arrow_type(d) for d in cur.description]
                    idx = names.index(column) if column else None
                if not rows:
                    break
                yield Chunk(rows_to_batch(rows, names, types), [r[idx] for r in rows] if idx is not None else None)
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
