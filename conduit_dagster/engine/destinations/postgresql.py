"""PostgreSQL destination: each batch bulk-loaded with COPY in one transaction that also records
which batch it was and its last checkpoint value, so a batch replayed after a crash (committed,
not yet checkpointed) is recognised: its committed rows are not applied twice, in every mode and
without a primary key, and only rows past the recorded value (ones the source gained meanwhile)
are added. A session advisory lock on the target table, held from start to publish, keeps two
writers of one table apart, whichever machines they run on.

Modes (``mode:`` on the destination):

    replace  (default) the run loads a staging table; publishing swaps it for the target in one
             transaction: readers see the previous complete table until then. A full refresh.
    append   rows are added to the target, batch by batch.
    merge    rows are upserted on ``primary_key`` (the last row of a key within a batch wins).

Bookkeeping lives in ``<schema>._conduit_batches``. Tables conduit creates carry the comment
``conduit-dagster pipeline <name>`` (exactly); replace never drops a table without it.
"""

import hashlib
import io
import json
import time
import uuid
from decimal import Decimal
from typing import Any

import psycopg2
import pyarrow as pa
import pyarrow.csv as pacsv

from conduit_dagster.engine.checkpoint import decode_value, encode_value
from conduit_dagster.engine.destinations.base import Resumption
from conduit_dagster.engine.errors import CheckpointError, ConduitError, DestinationError
from conduit_dagster.engine.pg import connect, describe, redact
from conduit_dagster.engine.spec import PostgresDestinationSpec
from conduit_dagster.engine.sql import quote_ident

BATCHES = "_conduit_batches"
BATCH_COLUMN = "_conduit_batch"


def pg_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_float32(t):
        return "real"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision}, {t.scale})"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_duration(t):
        return "interval"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytea"
    if pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
        return "jsonb"
    return "text"


def column_type(field: pa.Field) -> str:
    """The column type to create: the source's own PostgreSQL type where Arrow only carries text."""
    source_type = (field.metadata or {}).get(b"conduit.pg_type")
    if source_type and pa.types.is_string(field.type):
        return source_type.decode()
    return pg_type(field.type)


def _csv_ready(table: pa.Table) -> pa.Table:
    """Columns CSV cannot carry as PostgreSQL reads them, turned into PostgreSQL's text forms."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            column = pa.array([None if v is None else "\\x" + v.hex() for v in column.to_pylist()], pa.string())
        elif pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
            column = pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())
        elif pa.types.is_duration(t):
            column = pa.array([None if v is None else f"{v.total_seconds()} seconds" for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.schema.names)


def _csv_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pacsv.write_csv(_csv_ready(table), buf, write_options=pacsv.WriteOptions(include_header=False))
    return buf.getvalue()


class PostgresDestination:
    def __init__(self, spec: PostgresDestinationSpec, pipeline: str, *, accumulate: bool = False) -> None:
        # accumulate (an incremental load) is what append and merge do already; replace is refused for it in the spec
        self.spec = spec
        self.pipeline = pipeline
        self.schema = spec.schema or "public"
        self.table = spec.table or pipeline
        self.mode = spec.mode
        self.generation: str | None = None
        self.comment = f"conduit-dagster pipeline {pipeline}"
        try:
            self.conn = connect(spec, "destination")
        except ConduitError as exc:
            raise DestinationError(str(exc)) from None

    # --- names -------------------------------------------------------------------------

    def _q(self, name: str) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(name)}"

    @property
    def _staging_prefix(self) -> str:
        # a digest of the pipeline's name, not the name: PostgreSQL cuts identifiers at 63 bytes, and a
        # long name would be cut into one shared with another pipeline, or no longer match its own prefix
        return f"_conduit_stage_{hashlib.sha256(self.pipeline.encode()).hexdigest()[:16]}_"

    @property
    def _staging(self) -> str:
        assert self.generation is not None
        return f"{self._staging_prefix}{self.generation[:12]}"

    def _write_target(self) -> str:
        return self._staging if self.mode == "replace" else self.table

    def describe(self) -> str:
        return f"{describe(self.spec)}/{self.schema}.{self.table}"

    def _fail(self, what: str, exc: Exception) -> DestinationError:
        return DestinationError(
            f"destination {self.spec.name!r} ({self.describe()}): {what}: {redact(str(exc).strip(), self.spec)}; "
            "that batch was rolled back and the checkpoint is unchanged"
        )

    # --- protocol ----------------------------------------------------------------------

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            with self.conn, self.conn.cursor() as cur:
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._q(BATCHES)} (pipeline text NOT NULL, generation text NOT NULL, "
                    "batch_index integer NOT NULL, rows bigint NOT NULL, last_key text, "
                    "committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, generation, batch_index))"
                )
                cur.execute(f"ALTER TABLE {self._q(BATCHES)} ADD COLUMN IF NOT EXISTS last_key text")
                self._fence(cur)
                if state is None:
                    self.generation = uuid.uuid4().hex
                    self._drop_stale_staging(cur)
                    if self.mode == "replace":
                        self._check_replaceable(cur)
                    return Resumption({"generation": self.generation})
                generation = state.get("generation")
                if not isinstance(generation, str) or not generation.isalnum():
                    raise CheckpointError(f"pipeline {self.pipeline!r}: the checkpoint names no valid output generation")
                self.generation = generation
                if self.mode == "replace":
                    if self._table_comment(cur, self.table) == f"{self.comment} generation {generation}":
                        return Resumption(state, already_published=True)
                    if not self._exists(cur, self._staging):
                        if committed == 0:  # crashed before its first batch: the staging table comes with it
                            return Resumption(state)
                        raise CheckpointError(
                            f"pipeline {self.pipeline!r}: the checkpoint's staging table {self.schema}.{self._staging} is "
                            "missing, so it cannot be resumed; start over with "
                            f"`conduit clear-checkpoints --pipeline-name {self.pipeline}`"
                        )
                    # rows of batches written after the last checkpoint are dropped; they will be read again
                    cur.execute(f"DELETE FROM {self._q(self._staging)} WHERE {BATCH_COLUMN} >= %s", (committed,))
                    cur.execute(
                        f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s AND batch_index >= %s",
                        (self.pipeline, generation, committed),
                    )
                return Resumption(state)
        except psycopg2.Error as exc:
            raise self._fail("cannot prepare the output", exc) from None

    def _fence(self, cur: Any) -> None:
        """A session advisory lock on the target table, held until this connection closes (or its holder dies):
        two runs writing one table, even from machines whose checkpoint locks never meet, cannot interleave.

        A run that just ended (or crashed) releases the lock when its server process notices the closed
        connection, a moment after the client closed it: the lock is tried for up to two seconds."""
        deadline = time.monotonic() + 2.0
        while True:
            cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"conduit:{self.schema}.{self.table}",))
            locked = bool(cur.fetchone()[0])
            if locked or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not locked:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {self.schema}.{self.table} is being written by another run "
                "(it holds the table's advisory lock); nothing was written. Wait for that run to finish"
            )

    def _exists(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (self._q(name),))
        return bool(cur.fetchone()[0])

    def _table_comment(self, cur: Any, name: str) -> str | None:
        cur.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (self._q(name),))
        row = cur.fetchone()
        return row[0] if row else None

    def _check_replaceable(self, cur: Any) -> None:
        comment = self._table_comment(cur, self.table) or ""
        ours = comment == self.comment or comment.startswith(f"{self.comment} generation ")
        if self._exists(cur, self.table) and not ours:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {self.schema}.{self.table} exists and was not created by conduit "
                f"for pipeline {self.pipeline!r}; mode replace would drop it. Choose another `table`, use mode append "
                "or merge, or drop it yourself. Nothing was changed"
            )

    def _drop_stale_staging(self, cur: Any) -> None:
        cur.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND starts_with(tablename, %s)",
            (self.schema, self._staging_prefix),
        )
        for (name,) in cur.fetchall():
            cur.execute(f"DROP TABLE {self._q(name)}")

    def _create_table(self, cur: Any, name: str, table: pa.Table, *, with_batch: bool) -> None:
        columns = [f"{quote_ident(f.name)} {column_type(f)}" for f in table.schema]
        if with_batch:
            columns.append(f"{BATCH_COLUMN} integer NOT NULL")
        if self.mode == "merge":
            columns.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in self.spec.primary_key)})")
        cur.execute(f"CREATE TABLE IF NOT EXISTS {self._q(name)} ({', '.join(columns)})")
        cur.execute(f"COMMENT ON TABLE {self._q(name)} IS %s", (self.comment,))

    def write(self, index: int, table: pa.Table, key_column: str | None = None, last_key: Any = None) -> None:
        target = self._write_target()
        key_json = json.dumps(encode_value(last_key)) if key_column is not None else None
        try:
            with self.conn, self.conn.cursor() as cur:
                # The batch record first, in the batch's own transaction: a replayed batch finds it.
                cur.execute(
                    f"INSERT INTO {self._q(BATCHES)} (pipeline, generation, batch_index, rows, last_key) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (self.pipeline, self.generation, index, table.num_rows, key_json),
                )
                if cur.rowcount == 0:
                    # Committed before the crash that lost its checkpoint. Its rows are in; applying them again
                    # would duplicate them. Rows the source gained past the recorded last key since then are
                    # new: they go in now, in this transaction, and the record moves on.
                    table = self._rows_past_record(cur, index, table, key_column)
                    if table.num_rows == 0:
                        return
                    cur.execute(
                        f"UPDATE {self._q(BATCHES)} SET rows = rows + %s, last_key = %s "
                        "WHERE pipeline = %s AND generation = %s AND batch_index = %s",
                        (table.num_rows, key_json, self.pipeline, self.generation, index),
                    )
                names = ", ".join(quote_ident(n) for n in table.schema.names)
                if not self._exists(cur, target):
                    self._create_table(cur, target, table, with_batch=self.mode == "replace")
                if self.mode == "replace":
                    batch_col = pa.array([index] * table.num_rows, pa.int32())
                    data = table.append_column(BATCH_COLUMN, batch_col)
                    cur.copy_expert(
                        f"COPY {self._q(target)} ({names}, {BATCH_COLUMN}) FROM STDIN WITH (FORMAT csv)",
                        io.BytesIO(_csv_bytes(data)),
                    )
                elif self.mode == "append":
                    cur.copy_expert(
                        f"COPY {self._q(target)} ({names}) FROM STDIN WITH (FORMAT csv)", io.BytesIO(_csv_bytes(table))
                    )
                else:
                    self._merge(cur, target, table, names)
        except psycopg2.Error as exc:
            raise self._fail(f"cannot write batch {index}", exc) from None

    def _rows_past_record(self, cur: Any, index: int, table: pa.Table, key_column: str | None) -> pa.Table:
        cur.execute(
            f"SELECT last_key FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s AND batch_index = %s FOR UPDATE",
            (self.pipeline, self.generation, index),
        )
        (recorded,) = cur.fetchone()
        if key_column is None or recorded is None:
            return table.slice(0, 0)
        last = decode_value(json.loads(recorded))
        keys = table.column(key_column).to_pylist()
        if isinstance(last, Decimal):  # numeric without a precision travels as text
            keys = [None if k is None else Decimal(k) for k in keys]
        start = next((i for i, k in enumerate(keys) if k is not None and k > last), len(keys))
        return table.slice(start)

    def _merge(self, cur: Any, target: str, table: pa.Table, names: str) -> None:
        keys = [quote_ident(k) for k in self.spec.primary_key]
        missing = [k for k in self.spec.primary_key if k not in table.schema.names]
        if missing:
            raise DestinationError(
                f"destination {self.spec.name!r}: primary_key column(s) {', '.join(missing)} are not in the query's result"
            )
        cur.execute(f"CREATE TEMP TABLE _conduit_merge (LIKE {self._q(target)} INCLUDING DEFAULTS) ON COMMIT DROP")
        cur.execute("ALTER TABLE _conduit_merge ADD COLUMN _conduit_row bigint")
        data = table.append_column("_conduit_row", pa.array(range(table.num_rows), pa.int64()))
        cur.copy_expert(f"COPY _conduit_merge ({names}, _conduit_row) FROM STDIN WITH (FORMAT csv)", io.BytesIO(_csv_bytes(data)))
        others = [quote_ident(n) for n in table.schema.names if n not in self.spec.primary_key]
        update = ", ".join(f"{c} = EXCLUDED.{c}" for c in others) or None
        cur.execute(
            f"INSERT INTO {self._q(target)} ({names}) "
            f"SELECT DISTINCT ON ({', '.join(keys)}) {names} FROM _conduit_merge ORDER BY {', '.join(keys)}, _conduit_row DESC "
            f"ON CONFLICT ({', '.join(keys)}) DO " + (f"UPDATE SET {update}" if update else "NOTHING")
        )

    def publish(self, batches: int | None = None) -> None:
        try:
            with self.conn, self.conn.cursor() as cur:
                if self.mode == "replace":
                    self._check_replaceable(cur)
                    if self._exists(cur, self._staging):
                        cur.execute(f"ALTER TABLE {self._q(self._staging)} DROP COLUMN {BATCH_COLUMN}")
                        cur.execute(f"DROP TABLE IF EXISTS {self._q(self.table)}")
                        cur.execute(f"ALTER TABLE {self._q(self._staging)} RENAME TO {quote_ident(self.table)}")
                    elif self._exists(cur, self.table):
                        cur.execute(f"TRUNCATE {self._q(self.table)}")  # a run with no rows: the output is empty
                    else:
                        return
                    # marks the table as this generation's output: a resume after a crash here sees it is done
                    cur.execute(
                        f"COMMENT ON TABLE {self._q(self.table)} IS %s", (f"{self.comment} generation {self.generation}",)
                    )
                cur.execute(
                    f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s", (self.pipeline, self.generation)
                )
        except psycopg2.Error as exc:
            raise self._fail("cannot publish the output", exc) from None

    def close(self) -> None:
        self.conn.close()

    def count(self) -> int | None:
        with self.conn, self.conn.cursor() as cur:
            if not self._exists(cur, self.table):
                return None
            cur.execute(f"SELECT count(*) FROM {self._q(self.table)}")
            return int(cur.fetchone()[0])
