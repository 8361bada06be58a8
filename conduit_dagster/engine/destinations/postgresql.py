"""PostgreSQL destination: each batch bulk-loaded with COPY (in binary where every column's type allows, else
as CSV: see "binary COPY" below) in one transaction that also records which batch it was, its row count
and last checkpoint value, and what the runner's checkpoint of it needs (an incremental run's boundary).
A session advisory lock on the target table, held from start to publish, keeps two writers of one table
apart, whichever machines they run on.

Modes (``mode:`` on the destination):

    replace  (default) the run loads a staging table; publishing swaps it for the target in one
             transaction: readers see the previous complete table until then. A full refresh.
    append   rows are added to the target, batch by batch.
    merge    rows are upserted on ``primary_key`` (the last row of a key within a batch wins).

Resuming after a crash between a batch's commit and its checkpoint:

    append, merge  a committed batch is final. ``start`` reports the batches recorded past the
             checkpoint and the runner rolls forward: it adopts them as if their checkpoints had been
             saved and reads on past the last one's key. No part of a committed batch is applied twice,
             and no later batch brings its rows again.
    replace  the staging rows of batches past the checkpoint are deleted and that range is read again.

What this promises for rows that become visible late (a transaction that commits after conduit read
past its key): a row that appears in the source with a key at or below a range conduit already read
and committed is not loaded by that run, crash or not, and never twice. Replace mode, like the file
destinations, reads an uncheckpointed batch again after a crash and may then include it.

Staging tables are named from the pipeline, the target's schema and table, and the generation, and the
checkpoint records the name (``{"generation", "staging"}``): a run touches only its own. A staging
table that disappears during a run (or before a resume with committed batches) is an error naming it,
never silently created again; a run that cannot be resumed (``resume: false``) drops its own staging
table when it fails. Bookkeeping lives in ``<schema>._conduit_batches``. Tables conduit creates carry
the comment ``conduit-dagster pipeline <name>`` (exactly); replace never drops a table without it.

Partitions (a partitioned pipeline: ``partition=`` a ``partitions.Partition``). The partitions of a pipeline share
its table and run at the same time, so everything a run keeps is the partition's own, named by its unit
(``<pipeline>.<key>``): its batch records, its staging table (a digest of the unit: two partitions never share one)
and its advisory lock; the table's lock is held shared by every partition's run (an unpartitioned run of the table
takes it alone). In mode replace, publishing a partition is one transaction: the target is created if missing (from
the staged columns, under a transaction lock of its creation: partitions publishing together find it made once), its
rows ``lo <= column < hi`` are deleted (bounds bound as parameters; a time window's compared with a date column as
dates, with a timestamp as wall-clock times in the partition's zone, with a timestamptz as instants, as the sources
compare them), the staged rows inserted (each checked to be inside that window, and the columns to be the table's
with the same types, or nothing is published), the staging table dropped, and the publish recorded in
``<schema>._conduit_published``, where a resume after a crash past the commit finds it. No lock is taken on the whole
table, and no other partition's row is touched: partitions publish at the same moment. An empty partition publishes
by deleting its rows. Append and merge write the target as without partitions, their batch records per unit.
``count()`` counts the partition's rows. Partitioned and unpartitioned runs of replace never share a table (a
partition replaces only its window's rows, so an unpartitioned run's others would stay for good): a table a partition
created carries the comment ``conduit-dagster pipeline <name> partitions``, which an unpartitioned replace refuses, and
a partition's run refuses one an unpartitioned replace published (``... generation <id>``).
A key range on a text column is refused: the source orders text by its own collation, which the table's need not
share, and a partition could then delete another's rows.
"""

import array
import hashlib
import io
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from conduit_dagster.engine.backends import DestinationBackend, ResourceUse, register_destination_backend
from conduit_dagster.engine.checkpoint import decode_value, encode_value
from conduit_dagster.engine.destinations.base import CommittedBatch, Resumption
from conduit_dagster.engine.destinations.formats import json_default
from conduit_dagster.engine.destinations.tables import check_table_resource, parse_table_keys, partition_bound
from conduit_dagster.engine.errors import CheckpointError, ConduitError, DestinationError
from conduit_dagster.engine.partitions import Partition
from conduit_dagster.engine.pg import CONNECTION_KEYS, PostgresConnectionSpec, connect, describe, parse_connection, redact
from conduit_dagster.engine.spec import _Entry
from conduit_dagster.engine.sql import quote_ident

MAX_NAME = 63  # PostgreSQL cuts longer identifiers: two long names could end up one table


@dataclass(frozen=True)
class PostgresDestinationSpec(PostgresConnectionSpec):
    """ingest.yml `type: postgresql` destination: the connection, and the table and mode its resources write."""

    table: str | None = None
    mode: str = "replace"
    primary_key: tuple[str, ...] = ()
    type: str = "postgresql"


BATCHES = "_conduit_batches"
PUBLISHED = "_conduit_published"  # the generations partitions published (created by partitioned runs only)
BATCH_COLUMN = "_conduit_batch"
STAGING_PREFIX = "_conduit_stage_"


def staging_name(pipeline: str, schema: str, table: str, generation: str) -> str:
    """A staging table's name: a digest, not the names, as PostgreSQL cuts identifiers at 63 bytes (a long
    name would be cut into one shared with another pipeline); the schema and table are in it so that two
    deployments of one pipeline name into one schema never share one."""
    digest = hashlib.sha256(f"{pipeline}\0{schema}\0{table}".encode()).hexdigest()[:16]
    return f"{STAGING_PREFIX}{digest}_{generation[:12]}"


def legacy_staging_name(pipeline: str, generation: str) -> str:
    """The staging table of a checkpoint written before the name was recorded: a digest of the pipeline alone."""
    return f"{STAGING_PREFIX}{hashlib.sha256(pipeline.encode()).hexdigest()[:16]}_{generation[:12]}"


def owned_staging(state: dict[str, Any], pipeline: str, destination_id: str) -> tuple[str, str] | None:
    """(schema, table) of the staging table a replace-mode checkpoint's destination state owns, if any."""
    generation = state.get("generation")
    if "?mode=replace" not in destination_id or not isinstance(generation, str) or not generation.isalnum():
        return None
    staging = state.get("staging") or legacy_staging_name(pipeline, generation)
    schema = state.get("schema")
    if not isinstance(schema, str):  # older checkpoints: the identity ends ".../<schema>.<table>?mode=replace"
        schema = destination_id.rsplit("?", 1)[0].rsplit("/", 1)[-1].split(".", 1)[0]
    return (schema, staging) if isinstance(staging, str) else None


def lock_key(schema: str, table: str, scope: str = "") -> int:
    """The table's advisory-lock key: 64 bits of a SHA-256 (32-bit ``hashtext`` keys collide between
    different tables often enough to report a busy table that nobody writes). ``scope``: another lock of that
    table (one partition's runs, or the creation of the table), apart from the table's own."""
    name = f"conduit:{quote_ident(schema)}.{quote_ident(table)}"  # "a.b".c is not a."b.c"
    digest = hashlib.sha256((f"{name}\0{scope}" if scope else name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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
            values = [None if v is None else json.dumps(v, default=json_default) for v in column.to_pylist()]
            column = pa.array(values, pa.string())
        elif pa.types.is_duration(t):
            column = pa.array([None if v is None else f"{v.total_seconds()} seconds" for v in column.to_pylist()], pa.string())
        elif pa.types.is_timestamp(t) and t.tz is not None:
            # The same instant as UTC text with its offset. Arrow writes a zoned timestamp ~25x slower than a naive
            # one, and past the year 32767 writes the wrong year: a naive one is written for the years 1 to 9999,
            # others (rare: PostgreSQL holds 4714 BC to 294276 AD) value by value.
            if _four_digit_years(column):
                column = pc.binary_join_element_wise(column.cast(pa.timestamp(t.unit)).cast(pa.string()), "+00", "")
            else:
                values = column.cast(pa.int64()).to_pylist()
                column = pa.array([None if v is None else _timestamp_text(v, t.unit) for v in values], pa.string())
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.schema.names)


_SECONDS_IN = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _four_digit_years(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether every value of a timestamp column falls in the years 1 to 9999."""
    per_second = _SECONDS_IN[column.type.unit]
    least, most = pc.min_max(column.cast(pa.int64())).values()
    # 0001-01-01 and 10000-01-01, in seconds since 1970
    return not least.is_valid or (least.as_py() >= -62_135_596_800 * per_second and most.as_py() < 253_402_300_800 * per_second)


def _timestamp_text(value: int, unit: str) -> str:
    """PostgreSQL's text of a UTC instant ``value`` (in ``unit`` since 1970), for any year (BC ones as PostgreSQL
    writes them)."""
    per_second = _SECONDS_IN[unit]
    seconds, fraction = divmod(value, per_second)
    days, second = divmod(seconds, 86_400)
    # the proleptic Gregorian date of a day count (H. Hinnant's civil_from_days), for any integer
    z = days + 719_468
    era, day_of_era = divmod(z, 146_097)
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + 3 if shifted_month < 10 else shifted_month - 9
    year = year_of_era + era * 400 + (month <= 2)
    digits = len(str(per_second)) - 1
    fractional = f".{fraction:0{digits}d}" if digits else ""
    clock = f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}{fractional}"
    if year > 0:
        return f"{year:04d}-{month:02d}-{day:02d} {clock}+00"
    return f"{1 - year:04d}-{month:02d}-{day:02d} {clock}+00 BC"


def _csv_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pacsv.write_csv(_csv_ready(table), buf, write_options=pacsv.WriteOptions(include_header=False))
    return buf.getvalue()


# --- binary COPY ---------------------------------------------------------------------------------------------------
# A batch whose every column has a type below, in a target column of the matching PostgreSQL type, goes to COPY in
# PostgreSQL's binary format, encoded from the Arrow buffers by Arrow's compute functions: no Python code per row or
# value, and no text for the server to parse (measured on bench/pg_to_pg.py's 5M rows, PostgreSQL 15: COPY FROM took
# 7.7-11.6 s in binary, 14.0-18.3 s as text, 15.1-21.5 s as CSV; and Arrow writes zoned timestamps as CSV slowly). The
# values are the same as through text: integers and floats bit for bit, timestamps and dates as PostgreSQL's
# microseconds and days since 2000-01-01, text as its UTF-8 (which the server checks and converts as it does text
# input), bytea as its bytes. Anything else (numeric, uuid, interval, arrays, other Arrow units...) sends the batch as
# CSV, as does a value outside PostgreSQL's range, which the server then refuses as before.

_BOOL, _INT2, _INT4, _INT8, _FLOAT4, _FLOAT8 = 16, 21, 23, 20, 700, 701
_BYTEA, _TEXT, _VARCHAR, _BPCHAR, _JSON, _JSONB = 17, 25, 1043, 1042, 114, 3802
_DATE, _TIME, _TIMESTAMP, _TIMESTAMPTZ = 1082, 1083, 1114, 1184
_INT_RANGE = {_INT2: (-(1 << 15), (1 << 15) - 1), _INT4: (-(1 << 31), (1 << 31) - 1), _INT8: (-(1 << 63), (1 << 63) - 1)}
_INT_TYPES = {_INT2: pa.int16(), _INT4: pa.int32(), _INT8: pa.int64()}
_TEXT_OIDS = frozenset({_TEXT, _VARCHAR, _BPCHAR, _JSON})
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970
_PG_EPOCH_DAYS = 10_957
# PostgreSQL's valid ranges (datatype/timestamp.h: MIN_TIMESTAMP, END_TIMESTAMP, IS_VALID_DATE) in Arrow's terms (since
# 1970). In binary the extreme integers would mean -infinity/infinity: a value outside goes as text, which is refused.
_TS_MIN, _TS_END = -211_813_488_000_000_000 + _PG_EPOCH_US, 9_223_371_331_200_000_000 + _PG_EPOCH_US
_DATE_MIN, _DATE_END = -2_451_545 + _PG_EPOCH_DAYS, 2_147_483_494 - 2_451_545 + _PG_EPOCH_DAYS
_NULL = pa.scalar(b"\xff\xff\xff\xff", pa.large_binary())  # a field's length -1: NULL
_EMPTY = pa.scalar(b"", pa.large_binary())
_SWAP_CODES = {2: "h", 4: "i", 8: "q"}
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_COPY_TRAILER = b"\xff\xff"
_PIECE_ROWS = 65_536  # rows encoded at a time: memory beyond the batch stays a few MiB
assert all(array.array(code).itemsize == width for width, code in _SWAP_CODES.items())


def _binary_plan(table: pa.Table, oids: list[int | None]) -> list[Any] | None:
    """How each column goes to binary COPY into target columns of types ``oids`` (one callable per column, taking
    the column's array and giving its fields' parts), or None when one cannot: the batch then goes as CSV."""
    plan: list[Any] = []
    for column, oid in zip(table.columns, oids, strict=True):
        t = column.type
        if oid is None:
            return None
        if pa.types.is_integer(t) and oid in _INT_RANGE:
            low, high = _INT_RANGE[oid]
            width = t.bit_width - (0 if pa.types.is_signed_integer(t) else -1)  # bits a value of the type may need
            if width > _INT_TYPES[oid].bit_width:  # may not fit: look at the values
                least, most = pc.min_max(column).values()
                if least.is_valid and (least.as_py() < low or most.as_py() > high):
                    return None
            plan.append(lambda a, target=_INT_TYPES[oid]: _fixed(a.cast(target)))
        elif (pa.types.is_float32(t) and oid == _FLOAT4) or (pa.types.is_float64(t) and oid == _FLOAT8):
            plan.append(_fixed)
        elif pa.types.is_boolean(t) and oid == _BOOL:
            plan.append(lambda a: _fixed(a.cast(pa.uint8())))
        elif pa.types.is_timestamp(t) and t.unit == "us" and oid == (_TIMESTAMPTZ if t.tz else _TIMESTAMP):
            least, most = pc.min_max(column.cast(pa.int64())).values()
            if least.is_valid and (least.as_py() < _TS_MIN or most.as_py() >= _TS_END):
                return None
            plan.append(lambda a: _fixed(pc.subtract(a.cast(pa.int64()), _PG_EPOCH_US)))
        elif pa.types.is_date32(t) and oid == _DATE:
            least, most = pc.min_max(column.cast(pa.int32())).values()
            if least.is_valid and (least.as_py() < _DATE_MIN or most.as_py() >= _DATE_END):
                return None
            plan.append(lambda a: _fixed(pc.subtract(a.cast(pa.int32()), pa.scalar(_PG_EPOCH_DAYS, pa.int32()))))
        elif pa.types.is_time64(t) and t.unit == "us" and oid == _TIME:
            plan.append(lambda a: _fixed(a.cast(pa.int64())))
        elif (pa.types.is_string(t) or pa.types.is_large_string(t)) and oid in _TEXT_OIDS | {_JSONB}:
            plan.append(lambda a, jsonb=oid == _JSONB: _varlena(a.cast(pa.large_binary()), b"\x01" if jsonb else b""))
        elif (pa.types.is_binary(t) or pa.types.is_large_binary(t)) and oid == _BYTEA:
            plan.append(lambda a: _varlena(a.cast(pa.large_binary()), b""))
        else:
            return None
    return plan


def _big_endian(values: pa.Array) -> pa.Array:
    """A fixed-width array's values in network byte order, as large_binary (validity not carried: see callers)."""
    width = values.type.bit_width // 8
    swapped = array.array(_SWAP_CODES[width]) if width > 1 else array.array("B")
    swapped.frombytes(memoryview(values.buffers()[1])[values.offset * width : (values.offset + len(values)) * width])
    if width > 1 and sys.byteorder == "little":
        swapped.byteswap()
    return pa.Array.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(swapped)]).cast(pa.large_binary())


def _fixed(values: pa.Array) -> list[Any]:
    """The parts of a fixed-width column's fields: length, value (NULL: length -1, no value)."""
    length = pa.scalar((values.type.bit_width // 8).to_bytes(4, "big"), pa.large_binary())
    data = _big_endian(values)
    if not values.null_count:
        return [length, data]
    valid = values.is_valid()
    return [pc.if_else(valid, length, _NULL), pc.if_else(valid, data, _EMPTY)]


def _varlena(values: pa.Array, prefix: bytes) -> list[Any]:
    """The parts of a variable-length column's fields: length, ``prefix`` (jsonb's version byte), bytes."""
    lengths = pc.binary_length(values)
    lengths = (pc.add(lengths, len(prefix)) if prefix else lengths).cast(pa.int32())  # over 2 GiB fails, as in PostgreSQL
    parts = [_big_endian(lengths.fill_null(-1)), pc.fill_null(values, _EMPTY)]
    if not values.null_count:
        return parts[:1] + ([pa.scalar(prefix, pa.large_binary())] if prefix else []) + parts[1:]
    valid = values.is_valid()
    return parts[:1] + ([pc.if_else(valid, pa.scalar(prefix, pa.large_binary()), _EMPTY)] if prefix else []) + parts[1:]


def _binary_stream(table: pa.Table, plan: list[Any]) -> Iterator[bytes]:
    """The binary COPY stream of ``table`` as ``plan`` encodes it, a piece of rows at a time."""
    fields = pa.scalar(table.num_columns.to_bytes(2, "big"), pa.large_binary())
    yield _COPY_HEADER
    for piece in table.to_batches(max_chunksize=_PIECE_ROWS):
        parts = [part for encode, column in zip(plan, piece.columns, strict=True) for part in encode(column)]
        rows = pc.binary_join_element_wise(fields, *parts, _EMPTY)
        offsets = memoryview(rows.buffers()[1]).cast("q")
        yield memoryview(rows.buffers()[2])[offsets[rows.offset] : offsets[rows.offset + len(rows)]].tobytes()
    yield _COPY_TRAILER


class _Chunks:
    """A file-like psycopg2's ``copy_expert`` reads from: each ``read`` hands over the next chunk, whatever its size."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


class PostgresDestination:
    # a committed batch is final (append, merge): a resume adopts it instead of writing it again
    rolls_forward = True

    def __init__(
        self, spec: PostgresDestinationSpec, pipeline: str, *, accumulate: bool = False, partition: Partition | None = None
    ) -> None:
        # accumulate (an incremental load) is what append and merge do already; replace is refused for it in the spec
        self.spec = spec
        self.pipeline = pipeline
        self.partition = partition
        # the name of this writer's bookkeeping (batch records, staging table, lock): the partition's unit, or the pipeline
        self.unit = partition.unit if partition is not None else pipeline
        self.who = f"pipeline {pipeline!r}" + (f" partition {partition.key!r}" if partition is not None else "")
        self.schema = spec.schema or "public"
        self.table = spec.table or pipeline
        self.mode = spec.mode
        self.generation: str | None = None
        self.staging: str | None = None
        self.comment = f"conduit-dagster pipeline {pipeline}"
        # the comment of a table a partition's replace created: it holds partitions, which an unpartitioned run refuses
        self.partitions_comment = f"{self.comment} partitions"
        # once the write target existed in this run (or the checkpoint says batches went into it), a missing
        # one means someone dropped it: its committed rows are gone, and creating it again would hide that
        self._target_expected = False
        self._created_staging = False
        self._published = False
        self._resumable = True  # until the runner says no checkpoint can come back for this generation
        try:
            self.conn = connect(spec, "destination")
        except ConduitError as exc:
            raise DestinationError(str(exc)) from None

    # --- names -------------------------------------------------------------------------

    def _q(self, name: str) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(name)}"

    @property
    def _staging(self) -> str:
        assert self.staging is not None
        return self.staging

    def _write_target(self) -> str:
        return self._staging if self.mode == "replace" else self.table

    def describe(self) -> str:
        return f"{describe(self.spec)}/{self.schema}.{self.table}"

    def _fail(self, what: str, exc: Exception) -> DestinationError:
        return DestinationError(
            f"destination {self.spec.name!r} ({self.describe()}): {what}: {redact(str(exc).strip(), self.spec)}; "
            "that batch was rolled back and the checkpoint is unchanged"
        )

    def _missing(self, name: str, why: str) -> DestinationError:
        what = "staging table" if name != self.table else "table"
        return DestinationError(
            f"destination {self.spec.name!r}: the {what} {self.schema}.{name} of {self.who} is missing "
            f"{why}; someone dropped it, and its rows with it. Nothing more was written; start over with "
            f"`conduit clear-checkpoints --pipeline-name {self.unit}`"
        )

    # --- protocol ----------------------------------------------------------------------

    def set_resumable(self, resumable: bool) -> None:
        """False: no checkpoint names this run's generation, so close() drops an unpublished staging table."""
        self._resumable = resumable

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            with self.conn, self.conn.cursor() as cur:
                self._bookkeeping(cur)
                self._fence(cur)
                if self.mode == "replace":  # before any row is read: also a resume, whose table may be another's now
                    self._check_replaceable(cur)
                if self.partition is not None and self._exists(cur, self.table):
                    self._window(cur, self.table)  # a partition column it cannot compare is refused before any work
                if state is None:
                    # Nothing else is dropped: a staging table with another name belongs to another run (another
                    # generation, or another deployment), and only its own checkpoint can say it is abandoned.
                    self.generation = uuid.uuid4().hex
                    if self.partition is not None:  # a publish record of an earlier run: no checkpoint names it any more
                        cur.execute(f"DELETE FROM {self._q(PUBLISHED)} WHERE pipeline = %s", (self.unit,))
                    if self.mode == "replace":
                        self.staging = staging_name(self.unit, self.schema, self.table, self.generation)
                        return Resumption({"generation": self.generation, "staging": self.staging, "schema": self.schema})
                    return Resumption({"generation": self.generation})
                return self._resume(cur, state, committed)
        except psycopg2.Error as exc:
            raise self._fail("cannot prepare the output", exc) from None

    def _bookkeeping(self, cur: Any) -> None:
        """The schema and conduit's tables in it, created once: under a lock of the schema's bookkeeping, as two
        runs starting at the same moment (partitions of one pipeline do) would both try to create them."""
        cur.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (lock_key(self.schema, BATCHES, "create"),))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._q(BATCHES)} (pipeline text NOT NULL, generation text NOT NULL, "
            "batch_index integer NOT NULL, rows bigint NOT NULL, last_key text, batch_state jsonb, "
            "committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, generation, batch_index))"
        )
        # columns added by later versions; ALTER TABLE only when missing, as it would wait for every batch in progress
        cur.execute(
            f"SELECT count(*) FROM pg_attribute WHERE attrelid = {self._OID} AND attname IN ('last_key', 'batch_state') "
            "AND NOT attisdropped",
            (self.schema, BATCHES),
        )
        if cur.fetchone()[0] < 2:
            cur.execute(f"ALTER TABLE {self._q(BATCHES)} ADD COLUMN IF NOT EXISTS last_key text")
            cur.execute(f"ALTER TABLE {self._q(BATCHES)} ADD COLUMN IF NOT EXISTS batch_state jsonb")
        if self.partition is not None:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._q(PUBLISHED)} (pipeline text NOT NULL, generation text NOT NULL, "
                "rows bigint NOT NULL, published_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, generation))"
            )

    def _resume(self, cur: Any, state: dict[str, Any], committed: int) -> Resumption:
        generation = state.get("generation")
        if not isinstance(generation, str) or not generation.isalnum():
            raise CheckpointError(f"{self.who}: the checkpoint names no valid output generation")
        self.generation = generation
        if self.mode == "replace":
            staging = state.get("staging", legacy_staging_name(self.pipeline, generation))
            if not isinstance(staging, str) or not staging.startswith(STAGING_PREFIX) or not staging.isascii():
                raise CheckpointError(f"{self.who}: the checkpoint names no valid staging table")
            self.staging = staging
            if self._published_before(cur, generation):
                self._published = True
                return Resumption(state, already_published=True)
            if not self._exists(cur, staging):
                if committed == 0:  # crashed before its first batch: the staging table comes with it
                    return Resumption(state)
                raise CheckpointError(
                    f"{self.who}: the checkpoint's staging table {self.schema}.{staging} is "
                    "missing, so it cannot be resumed; start over with "
                    f"`conduit clear-checkpoints --pipeline-name {self.unit}`"
                )
            self._target_expected = True
            # rows of batches written after the last checkpoint are dropped; they will be read again
            cur.execute(f"DELETE FROM {self._q(staging)} WHERE {BATCH_COLUMN} >= %s", (committed,))
            cur.execute(
                f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s AND batch_index >= %s",
                (self.unit, generation, committed),
            )
            return Resumption(state)
        # append, merge: what was committed past the checkpoint is in the table for good; the runner adopts it
        cur.execute(
            f"SELECT batch_index, rows, last_key, batch_state FROM {self._q(BATCHES)} "
            "WHERE pipeline = %s AND generation = %s AND batch_index >= %s ORDER BY batch_index",
            (self.unit, generation, committed),
        )
        beyond = tuple(
            CommittedBatch(
                index=int(index),
                rows=int(rows),
                last_key=None if last_key is None else decode_value(json.loads(last_key)),
                state=dict(batch_state or {}),
            )
            for index, rows, last_key, batch_state in cur.fetchall()
        )
        if committed + len(beyond) > 0:
            if not self._exists(cur, self.table):
                raise self._missing(self.table, f"though {committed + len(beyond)} batch(es) of this run went into it")
            self._target_expected = True
        return Resumption(state, committed=beyond)

    def _published_before(self, cur: Any, generation: str) -> bool:
        """Whether this generation's publish committed (a crash after it, before the checkpoint was deleted)."""
        if self.partition is None:  # the table itself carries the generation it holds
            return self._table_comment(cur, self.table) == f"{self.comment} generation {generation}"
        cur.execute(f"SELECT 1 FROM {self._q(PUBLISHED)} WHERE pipeline = %s AND generation = %s", (self.unit, generation))
        return cur.fetchone() is not None

    def _fence(self, cur: Any) -> None:
        """A session advisory lock on the target table, held until this connection closes (or its holder dies):
        two runs writing one table, even from machines whose checkpoint locks never meet, cannot interleave.

        A partition's run holds the table's lock shared (the partitions of a pipeline write it at the same time, each
        its own rows) and its partition's own lock exclusively: it keeps out an unpartitioned run of the table, and a
        second run of the same partition.

        A run that just ended (or crashed) releases the lock when its server process notices the closed
        connection, a moment after the client closed it: the lock is tried for up to two seconds."""
        table_key = lock_key(self.schema, self.table)
        if self.partition is None:
            locks = [("pg_try_advisory_lock", table_key, "another run (it holds the table's advisory lock)")]
        else:
            locks = [
                (
                    "pg_try_advisory_lock_shared",
                    table_key,
                    "a run of an unpartitioned pipeline (it holds the table's advisory lock)",
                ),
                ("pg_try_advisory_lock", lock_key(self.schema, self.table, f"unit {self.unit}"), f"another run of {self.who}"),
            ]
        for function, key, holder in locks:
            deadline = time.monotonic() + 2.0
            while True:
                cur.execute(f"SELECT {function}(%s::bigint)", (key,))
                locked = bool(cur.fetchone()[0])
                if locked or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not locked:
                raise DestinationError(
                    f"destination {self.spec.name!r}: table {self.schema}.{self.table} is being written by {holder}; "
                    "nothing was written. Wait for that run to finish"
                )

    def _lock_creation(self, cur: Any) -> None:
        """Until this transaction ends: the right to create the target table. Partitions of a pipeline create it at
        the same moment (the first to write or publish); the others wait, then find it."""
        cur.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (lock_key(self.schema, self.table, "create"),))

    def _columns(self, cur: Any, name: str) -> list[tuple[str, str, int, bool]]:
        """(name, type as SQL, type oid, collatable) of a table's columns, in order."""
        cur.execute(
            "SELECT attname, format_type(atttypid, atttypmod), atttypid::bigint, attcollation <> 0 FROM pg_attribute "
            f"WHERE attrelid = {self._OID} AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (self.schema, name),
        )
        return [(str(n), str(t), int(o), bool(c)) for n, t, o, c in cur.fetchall()]

    def _window(self, cur: Any, name: str) -> tuple[str, tuple[Any, ...]]:
        """The SQL condition selecting the partition's rows of table ``name`` (``lo <= column < hi``, its bounds
        as parameters, compared as the column's type needs), and its parameters."""
        partition = self.partition
        assert partition is not None
        column = next((c for c in self._columns(cur, name) if c[0] == partition.column), None)
        if column is None:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {self.schema}.{name} has no column {partition.column!r}, the "
                f"partition column of {self.who}, so the partition's rows cannot be told apart there; the query must "
                "give that column (as named in `partitions: column:`)"
            )
        _, sql_type, oid, collatable = column
        if partition.timezone is not None:  # a time window
            kinds = {_DATE: "date", _TIMESTAMP: "timestamp", _TIMESTAMPTZ: "timestamptz"}
            if oid not in kinds:
                raise DestinationError(
                    f"destination {self.spec.name!r}: the partition column {partition.column!r} of table "
                    f"{self.schema}.{name} is {sql_type}; time windows need a date, timestamp or timestamptz column"
                )
            kind = kinds[oid]
            cast = f"::{kind}"
        else:
            if collatable:
                # the source orders text by its own collation, which this column's need not share: the rows the
                # destination deletes as the partition's could then be another partition's, lost at its next publish
                raise DestinationError(
                    f"destination {self.spec.name!r}: the partition column {partition.column!r} of table "
                    f"{self.schema}.{name} is {sql_type}, compared by a collation, which may order text otherwise "
                    "than the source did when it planned the key ranges; partition on a number, date or timestamp column"
                )
            kind, cast = "", ""
        ident = quote_ident(partition.column)
        where, params = [], []
        if partition.lo is not None:
            where.append(f"{ident} >= %s{cast}")
            params.append(partition_bound(partition, partition.lo, kind))
        if partition.hi is not None:
            where.append(f"{ident} < %s{cast}")
            params.append(partition_bound(partition, partition.hi, kind))
        # unbounded on both sides (a single key range): every row but NULL's, which no partition holds (as the sources)
        return (" AND ".join(where) or f"{ident} IS NOT NULL"), tuple(params)

    # A table's oid as of the statement, read from the catalog tables: not through the name cache (to_regclass,
    # ::regclass), which keeps missing a table another transaction created while this one waited for a lock (two
    # partitions creating the target at once: the second, let in, must see the first's table).
    _OID = (
        "(SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s)"
    )

    def _exists(self, cur: Any, name: str) -> bool:
        cur.execute(f"SELECT {self._OID} IS NOT NULL", (self.schema, name))
        return bool(cur.fetchone()[0])

    def _table_comment(self, cur: Any, name: str) -> str | None:
        cur.execute(f"SELECT obj_description({self._OID}, 'pg_class')", (self.schema, name))
        row = cur.fetchone()
        return row[0] if row else None

    def _check_replaceable(self, cur: Any) -> None:
        """Refuse a table conduit did not create for this pipeline, and a mix of partitioned and unpartitioned runs of
        mode replace: a partition replaces only its window's rows, so an unpartitioned run's rows outside every window
        would stay for good (unseen by the partitions' counts); an unpartitioned run would swap the partitions away."""
        if not self._exists(cur, self.table):
            return
        comment = self._table_comment(cur, self.table) or ""
        table = f"{self.schema}.{self.table}"
        published = comment.startswith(f"{self.comment} generation ")  # by an unpartitioned run of replace
        if comment not in (self.comment, self.partitions_comment) and not published:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} exists and was not created by conduit "
                f"for pipeline {self.pipeline!r}; mode replace would drop it. Choose another `table`, use mode append "
                "or merge, or drop it yourself. Nothing was changed"
            )
        if self.partition is not None and published:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} holds the output of an unpartitioned run of pipeline "
                f"{self.pipeline!r}, and {self.who} would replace only its own rows there: the rows outside every "
                f"partition would stay for good. Drop the table (DROP TABLE {quote_ident(self.schema)}."
                f"{quote_ident(self.table)}) and load the partitions again, or load the pipeline unpartitioned (without "
                "`partitions:`). Nothing was changed"
            )
        if self.partition is None and comment == self.partitions_comment:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} holds the partitions of pipeline {self.pipeline!r}, "
                "loaded by its partitioned runs, which this unpartitioned run of mode replace would replace. Drop the "
                f"table (DROP TABLE {quote_ident(self.schema)}.{quote_ident(self.table)}) and load it unpartitioned, or "
                "load it by partitions (with `partitions:`). Nothing was changed"
            )

    def _create_table(self, cur: Any, name: str, table: pa.Table, *, with_batch: bool) -> None:
        columns = [f"{quote_ident(f.name)} {column_type(f)}" for f in table.schema]
        if with_batch:
            columns.append(f"{BATCH_COLUMN} integer NOT NULL")
        if self.mode == "merge":
            columns.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in self.spec.primary_key)})")
        # not IF NOT EXISTS: it was checked missing in this transaction under the table's lock
        cur.execute(f"CREATE TABLE {self._q(name)} ({', '.join(columns)})")
        cur.execute(f"COMMENT ON TABLE {self._q(name)} IS %s", (self.comment,))

    def write(
        self,
        index: int,
        table: pa.Table,
        key_column: str | None = None,
        last_key: Any = None,
        batch_state: dict[str, Any] | None = None,
    ) -> None:
        target = self._write_target()
        key_json = json.dumps(encode_value(last_key)) if key_column is not None else None
        try:
            with self.conn, self.conn.cursor() as cur:
                # The batch record first, in the batch's own transaction: a resume finds what was committed.
                cur.execute(
                    f"INSERT INTO {self._q(BATCHES)} (pipeline, generation, batch_index, rows, last_key, batch_state) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (self.unit, self.generation, index, table.num_rows, key_json, json.dumps(batch_state or {})),
                )
                if cur.rowcount == 0:
                    # A resume adopts committed batches and never writes them again: another writer got here
                    raise DestinationError(
                        f"destination {self.spec.name!r}: batch {index} of {self.who} (generation "
                        f"{self.generation}) is committed already in {self.schema}.{BATCHES}; writing it again would "
                        "apply its rows twice. Is another run writing this pipeline? Nothing was written"
                    )
                if self._exists(cur, target):
                    self._target_expected = True
                elif self._target_expected:
                    raise self._missing(target, f"after batches of this run went into it (at batch {index})")
                else:
                    if self.partition is not None and target == self.table:
                        self._lock_creation(cur)  # another partition may be creating it now
                    if not self._exists(cur, target):
                        self._create_table(cur, target, table, with_batch=self.mode == "replace")
                        self._created_staging = self.mode == "replace"
                    self._target_expected = True
                if self.mode == "replace":
                    self._copy_in(
                        cur,
                        self._q(target),
                        table.append_column(BATCH_COLUMN, pa.repeat(pa.scalar(index, pa.int32()), table.num_rows)),
                    )
                elif self.mode == "append":
                    self._copy_in(cur, self._q(target), table)
                else:
                    self._merge(cur, target, table)
        except psycopg2.Error as exc:
            raise self._fail(f"cannot write batch {index}", exc) from None

    def _copy_in(self, cur: Any, relation: str, data: pa.Table) -> None:
        """COPY ``data`` into ``relation`` (by column name): in binary where every column can go so, else as CSV.

        The target's column types are read after locking it (as COPY does) in this transaction: no ALTER TABLE can
        change a type between the look and the load, so binary fields never land in a column of another type."""
        cur.execute(
            f"LOCK TABLE {relation.replace('%', '%%')} IN ROW EXCLUSIVE MODE; SELECT attname, atttypid::bigint "
            "FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (relation,),
        )
        types = dict(cur.fetchall())
        columns = ", ".join(quote_ident(n) for n in data.schema.names)
        plan = _binary_plan(data, [types.get(n) for n in data.schema.names])
        if plan is not None:
            cur.copy_expert(f"COPY {relation} ({columns}) FROM STDIN WITH (FORMAT binary)", _Chunks(_binary_stream(data, plan)))
        else:
            cur.copy_expert(f"COPY {relation} ({columns}) FROM STDIN WITH (FORMAT csv)", io.BytesIO(_csv_bytes(data)))

    def _merge(self, cur: Any, target: str, table: pa.Table) -> None:
        keys = [quote_ident(k) for k in self.spec.primary_key]
        missing = [k for k in self.spec.primary_key if k not in table.schema.names]
        if missing:
            raise DestinationError(
                f"destination {self.spec.name!r}: primary_key column(s) {', '.join(missing)} are not in the query's result"
            )
        cur.execute(f"CREATE TEMP TABLE _conduit_merge (LIKE {self._q(target)} INCLUDING DEFAULTS) ON COMMIT DROP")
        cur.execute("ALTER TABLE _conduit_merge ADD COLUMN _conduit_row bigint")
        self._copy_in(
            cur, "pg_temp._conduit_merge", table.append_column("_conduit_row", pa.array(range(table.num_rows), pa.int64()))
        )
        names = ", ".join(quote_ident(n) for n in table.schema.names)
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
                if self.mode == "replace" and self.partition is not None:
                    self._publish_partition(cur)
                elif self.mode == "replace":
                    self._check_replaceable(cur)
                    if self._exists(cur, self._staging):
                        cur.execute(f"ALTER TABLE {self._q(self._staging)} DROP COLUMN {BATCH_COLUMN}")
                        cur.execute(f"DROP TABLE IF EXISTS {self._q(self.table)}")
                        cur.execute(f"ALTER TABLE {self._q(self._staging)} RENAME TO {quote_ident(self.table)}")
                    elif self._target_expected:  # publishing would empty the table instead of loading it
                        raise self._missing(self._staging, "at publish, after batches of this run went into it")
                    elif self._exists(cur, self.table):
                        cur.execute(f"TRUNCATE {self._q(self.table)}")  # a run with no rows: the output is empty
                    else:
                        return
                    # marks the table as this generation's output: a resume after a crash here sees it is done
                    cur.execute(
                        f"COMMENT ON TABLE {self._q(self.table)} IS %s", (f"{self.comment} generation {self.generation}",)
                    )
                cur.execute(
                    f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s", (self.unit, self.generation)
                )
            self._published = True
        except psycopg2.Error as exc:
            raise self._fail("cannot publish the output", exc) from None

    def _publish_partition(self, cur: Any) -> None:
        """Replace the partition's rows of the target with the staged ones, in the publish's one transaction: the
        target created if missing, its rows in the partition's window deleted, the staged rows inserted, the staging
        table dropped and the publish recorded (a resume after a crash past the commit finds it done). Only this
        partition's rows are touched and no lock is taken on the whole table: other partitions publish meanwhile."""
        assert self.partition is not None and self.generation is not None
        self._check_replaceable(cur)
        staged = self._exists(cur, self._staging)
        if not staged and self._target_expected:  # publishing would empty the partition instead of loading it
            raise self._missing(self._staging, "at publish, after batches of this run went into it")
        if staged and not self._exists(cur, self.table):
            self._lock_creation(cur)
            if not self._exists(cur, self.table):
                columns = [(n, t) for n, t, _, _ in self._columns(cur, self._staging) if n != BATCH_COLUMN]
                # not IF NOT EXISTS: it was checked missing in this transaction under the lock of its creation
                cur.execute(f"CREATE TABLE {self._q(self.table)} ({', '.join(f'{quote_ident(n)} {t}' for n, t in columns)})")
                cur.execute(f"COMMENT ON TABLE {self._q(self.table)} IS %s", (self.partitions_comment,))
            else:  # created meanwhile: by another partition of this pipeline, which the check lets in
                self._check_replaceable(cur)
        rows = 0
        if self._exists(cur, self.table):
            where, params = self._window(cur, self.table)
            if staged:
                names = self._check_compatible(cur)
            cur.execute(f"DELETE FROM {self._q(self.table)} WHERE {where}", params)
            if staged:
                cur.execute(
                    f"SELECT coalesce(sum(rows), 0) FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s",
                    (self.unit, self.generation),
                )
                expected = int(cur.fetchone()[0])
                listed = ", ".join(quote_ident(n) for n in names)
                cur.execute(
                    f"INSERT INTO {self._q(self.table)} ({listed}) SELECT {listed} FROM {self._q(self._staging)} WHERE {where}",
                    params,
                )
                rows = cur.rowcount
                if rows != expected:
                    self._outside_window(cur, where, params, expected - rows)
                cur.execute(f"DROP TABLE {self._q(self._staging)}")
        cur.execute(
            f"INSERT INTO {self._q(PUBLISHED)} (pipeline, generation, rows) VALUES (%s, %s, %s)",
            (self.unit, self.generation, rows),
        )

    def _check_compatible(self, cur: Any) -> list[str]:
        """The staged columns, checked to be the existing target's columns with the same types: the partition's rows
        land as they were loaded, none of the other partitions' columns is left empty for them. Returns their names."""
        staged = [(n, t) for n, t, _, _ in self._columns(cur, self._staging) if n != BATCH_COLUMN]
        target = dict((n, t) for n, t, _, _ in self._columns(cur, self.table))
        problems = [
            f"{n} is {t} in this partition's rows but {target[n]} in the table"
            for n, t in staged
            if n in target and target[n] != t
        ]
        problems += [f"{n} ({t}) is not in the table" for n, t in staged if n not in target]
        problems += [f"{n} is in the table but not in this partition's rows" for n in target if n not in dict(staged)]
        if problems:
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.who} cannot replace its rows of table {self.schema}.{self.table}, "
                f"whose columns differ from the rows loaded now: {'; '.join(problems)}. Nothing was published. Restore the "
                "query the table was loaded with, or drop the table and load every partition again"
            )
        return [n for n, _ in staged]

    def _outside_window(self, cur: Any, where: str, params: tuple[Any, ...], missing: int) -> None:
        """Staged rows the partition's window does not hold, as this table compares them: refused (inserted, the next
        publish of the partition would not delete them, and another partition's would)."""
        assert self.partition is not None
        column = quote_ident(self.partition.column)
        cur.execute(f"SELECT {column}::text FROM {self._q(self._staging)} WHERE ({where}) IS NOT TRUE LIMIT 3", params)
        examples = ", ".join("NULL" if v is None else repr(v) for (v,) in cur.fetchall())
        raise DestinationError(
            f"destination {self.spec.name!r}: {missing} row(s) loaded for {self.who} have {self.partition.column} values "
            f"outside it as PostgreSQL compares them (e.g. {examples}), so the source and the table disagree on which "
            "rows are the partition's; nothing was published. Partition on a column both compare alike (a number, date "
            "or timestamp)"
        )

    def close(self) -> None:
        try:
            if not self._resumable and not self._published and self.generation is not None and not self.conn.closed:
                self._discard()
        finally:
            self.conn.close()

    def _discard(self) -> None:
        """A run no checkpoint can resume ended unpublished: its staging table and batch records are nobody's."""
        try:
            with self.conn, self.conn.cursor() as cur:
                if self._created_staging:
                    cur.execute(f"DROP TABLE IF EXISTS {self._q(self._staging)}")
                cur.execute(
                    f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s", (self.unit, self.generation)
                )
        except psycopg2.Error:
            pass  # the connection failed with the run; the staging table stays until dropped by hand

    def count(self) -> int | None:
        """Rows of the table; with a partition, its rows in the partition (0 before the table exists: the partition
        published no row, as an empty partition leaves no table to create)."""
        with self.conn, self.conn.cursor() as cur:
            if not self._exists(cur, self.table):
                return None if self.partition is None else 0
            if self.partition is None:
                cur.execute(f"SELECT count(*) FROM {self._q(self.table)}")
            else:
                where, params = self._window(cur, self.table)
                cur.execute(f"SELECT count(*) FROM {self._q(self.table)} WHERE {where}", params)
            return int(cur.fetchone()[0])


# --- the backend: ingest.yml `type: postgresql` ------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str) -> PostgresDestinationSpec:
    e.finish(_KEYS)
    table, mode, keys = parse_table_keys(e, "PostgreSQL", MAX_NAME)
    return PostgresDestinationSpec(name=name, table=table, mode=mode, primary_key=keys, **parse_connection(e))


def _check_resource(e: _Entry, d: PostgresDestinationSpec, use: ResourceUse) -> None:
    check_table_resource(e, d, use, "PostgreSQL", MAX_NAME)


def _table_uri(d: PostgresDestinationSpec, pipeline: str) -> str:
    """``postgresql://host:port/database/schema.table``: never a user or password."""
    return f"{describe(d)}/{d.schema or 'public'}.{d.table or pipeline}"


def _check(dest: PostgresDestinationSpec) -> str:
    """`conduit validate`: connect."""
    connect(dest, "destination").close()
    return f"{describe(dest)} schema {dest.schema or 'public'} ({dest.mode})"


def _leftover(destination_id: str, state: dict[str, Any], pipeline: str) -> list[str] | None:
    """A replace-mode checkpoint's staging table, which no run touches once the checkpoint is cleared."""
    if not destination_id.startswith("postgresql://"):
        return None
    owned = owned_staging(state, pipeline, destination_id)
    if not owned:
        return None
    table = f"{quote_ident(owned[0])}.{quote_ident(owned[1])}"
    return [
        f"its unfinished output stays in PostgreSQL, in staging table {table}; drop it with:",
        f"DROP TABLE IF EXISTS {table};",
    ]


_KEYS = frozenset({"name", "type", "table", "mode", "primary_key"} | CONNECTION_KEYS)
BACKEND = register_destination_backend(
    DestinationBackend(
        type="postgresql",
        keys=_KEYS,
        parse=_parse,
        open=PostgresDestination,
        identity=lambda d, pipeline: f"{_table_uri(d, pipeline)}?mode={d.mode}",
        uri=_table_uri,
        kinds=lambda d: {"postgres"},
        check=_check,
        counts_whole_output=lambda d: d.mode == "replace",
        check_resource=_check_resource,
        leftover=_leftover,
        partitioned=True,
    )
)
