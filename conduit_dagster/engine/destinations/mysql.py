"""MySQL / MariaDB destination (``type: mysql``): each batch bulk-loaded with ``LOAD DATA LOCAL INFILE`` in one
InnoDB transaction that also records which batch it was, its row count, its last checkpoint value and what the
runner's checkpoint of it needs (an incremental run's boundary). A ``GET_LOCK`` on the target table, held by a
session of its own from start to publish, keeps two writers of one table apart, whichever machines they run on.

Modes (``mode:`` on the destination):

    replace  (default) the run loads a staging table; publishing swaps it for the target with one
             ``RENAME TABLE t TO old, staging TO t`` (atomic: readers see the previous complete table or
             the new one, never neither) and drops the old one. A full refresh.
    append   rows are added to the target, batch by batch.
    merge    rows are upserted on ``primary_key`` (the last row of a key within a batch wins).

Every committed batch is final, in all three modes: a run resumed after a crash between a batch's commit and
its checkpoint adopts the batches recorded past the checkpoint (the runner rolls forward) and reads on past the
last one's key. (PostgreSQL's replace deletes those staging rows and reads them again; here DDL commits
implicitly, so keeping a batch column in the staging table would cost an ALTER at publish that a crash could cut
in half: the committed rows are kept instead, which is as exact.)

Exactness of the load:

- The session runs in ``SQL_MODE`` (strict, no zero dates) and, because ``LOAD DATA LOCAL`` turns every data
  error into a warning (the server cannot stop the client's stream midway), a load that leaves any warning or
  loads another number of rows than sent is rolled back and reported with the server's words, which name the
  column, and the row's checkpoint value: nothing is truncated, rounded or converted silently.
- The rows travel as tab-separated text with backslash escapes, built by Arrow compute: ``\\N`` is NULL, an
  empty field is the empty string, ``\\``, tab and newline are escaped; binary values go as hex through
  ``UNHEX``; float32 values as the exact decimal of their double; NaN and infinities, which MySQL cannot
  store, are refused naming the column. Lists and structs go as JSON text, binary values inside them as lowercase
  hex (as JSON Lines parts write them).
- Each batch's columns are checked against the target table's (read once a run: what matters is a table that
  existed already) by the rule table ``FITS`` before anything is written: a pair MySQL would fill by rounding, padding
  or reinterpreting without a warning (DATETIME(0) from microseconds, INT from a double, FLOAT from a double, DOUBLE
  from a 64-bit integer, ENUM from 'A' or '2') is refused naming the table, the column, both types and the fix;
  widening is fine. Merge upserts with ``ON DUPLICATE KEY UPDATE``, which fires on any unique index: the table needs
  one on exactly ``primary_key`` (whole columns), no other that could clash instead, key columns in a binary NO PAD
  collation, and no NULL keys.
- Tables conduit creates are InnoDB, text in ``utf8mb4`` with a binary NO PAD collation (``utf8mb4_nopad_bin`` on
  MariaDB, ``utf8mb4_0900_bin`` on MySQL 8: keys and later reads compare byte by byte, as the source's order did, and
  ``'a'`` and ``'a '`` stay two keys, which ``utf8mb4_bin``, PAD SPACE, would merge), and carry the comment
  ``conduit-dagster pipeline <name>``; replace never drops a table without it. Partitioned and unpartitioned runs of
  replace never share a table (a partition replaces only its window's rows, so an unpartitioned run's others would
  stay for good): a table a partition's replace created says ``... partitions``, which an unpartitioned replace
  refuses, and a partition's run refuses one an unpartitioned replace published (``... generation <id>``).

Staging tables are named from the pipeline, the database, the table and the generation (``_conduit_stage_...``),
and the checkpoint records the name; bookkeeping lives in ``<database>._conduit_batches``.

Partitions (a partitioned pipeline's run writes one ``partitions.Partition``, the rows with ``lo <= column < hi``):
the partition is a *unit* (``<pipeline>.<key>``) that names its batch records, its staging table and its
``GET_LOCK``, held for the run, so the partitions of one pipeline load at the same time, each resumable on its own.

    replace  batches go to the unit's staging table, made ``LIKE`` the target (which the first partition creates,
             under the table's lock, so every batch is checked against the target's own columns). Publishing takes
             the table's lock for as long as it runs and, in ONE transaction, deletes the target's rows with
             ``lo <= column < hi``, copies the staging rows in with ``INSERT ... SELECT`` and records the publish in
             ``_conduit_batches`` (``batch_index`` -1); the staging table is dropped after the commit (DDL commits on its
             own, so it never sits inside that transaction). Readers see the partition's previous rows or its new
             ones. A resume that finds the record knows the publish happened; the record goes at the unit's next
             fresh start. The bounds are bound parameters: a time window (aware datetimes in the partition's zone)
             compares with a DATE column as ``lo.date()``, with a DATETIME as wall-clock time in the zone (or as the
             UTC instant, for a DATETIME conduit made from zoned timestamps: its comment says ``UTC``), and with a
             TIMESTAMP as the instant (the session is UTC); ISO text dates (SQLite's) in a binary collation compare
             byte by byte with bounds written in their form, as the SQLite source compares them. Key ranges on a text
             column are refused: its collation may order keys unlike the source, and the delete would miss or take
             rows.
    append, merge
             as without partitions, with the unit's batch records; a deadlock between partitions writing one table
             rolls the batch back and writes it again.
"""

import datetime as dt
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pymysql

from conduit_dagster.engine.backends import DestinationBackend, ResourceUse, register_destination_backend
from conduit_dagster.engine.checkpoint import decode_value, encode_value
from conduit_dagster.engine.destinations.base import CommittedBatch, Resumption
from conduit_dagster.engine.destinations.formats import json_default
from conduit_dagster.engine.destinations.tables import check_table_resource, parse_table_keys
from conduit_dagster.engine.destinations.tables import partition_bound as window_bound
from conduit_dagster.engine.errors import CheckpointError, ConduitError, DestinationError
from conduit_dagster.engine.mysql import (
    CONNECTION_KEYS,
    MySQLConnectionSpec,
    connect,
    describe,
    identity,
    parse_connection,
    redact,
    target,
)
from conduit_dagster.engine.partitions import Partition, split_unit
from conduit_dagster.engine.spec import _Entry


@dataclass(frozen=True)
class MySQLDestinationSpec(MySQLConnectionSpec):
    """ingest.yml `type: mysql` destination: the connection, and the table and mode its resources write."""

    table: str | None = None
    mode: str = "replace"
    primary_key: tuple[str, ...] = ()
    type: str = "mysql"


BATCHES = "_conduit_batches"
STAGING_PREFIX = "_conduit_stage_"
OLD_PREFIX = "_conduit_old_"
MERGE_TABLE = "_conduit_merge"
MAX_NAME = 64  # MySQL's identifier length, and GET_LOCK's name length
# strict: a value a column cannot hold is an error, never truncated, rounded or zeroed; NO_AUTO_VALUE_ON_ZERO:
# a 0 loaded into an AUTO_INCREMENT column stays 0; no ANSI_QUOTES / NO_BACKSLASH_ESCAPES (the statements quote
# with backticks and escape with backslashes)
SQL_MODE = (
    "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION,NO_AUTO_VALUE_ON_ZERO"
)
# binary (byte by byte) and NO PAD ('a' and 'a ' are two keys): MySQL 8's and MariaDB's names for it. utf8mb4_bin is
# PAD SPACE on both, and would make 'a' and 'a ' one merge key.
NO_PAD_BINARY = ("utf8mb4_0900_bin", "utf8mb4_nopad_bin")
PAD_BINARY = "utf8mb4_bin"  # servers older than MySQL 8.0 / MariaDB 10.2
KEY_BYTES = 3072  # InnoDB's longest index key (DYNAMIC rows): a merge key's text columns share it
LOCK_WAIT_S = 2  # a run that just ended releases its lock as its session closes: wait that long for it
# a partition waits that long for the table's lock, which another partition holds while it publishes (or creates the
# table); a publish copies a whole partition, so it may take minutes
TABLE_LOCK_WAIT_S = 3600
PUBLISHED = -1  # the batch_index of a partition's publish record in _conduit_batches
PARTITION_INDEX = "_conduit_partition"  # the index on the partition column of a table conduit creates for partitions
WRITE_RETRIES = 5  # a partition's batch rolled back by a deadlock with another partition is written again
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ROWS_PER_CHUNK = 65536  # rows encoded at a time while the load streams
WARNINGS_SHOWN = 5
ER_NO_SUCH_TABLE = 1146
_ROW_RE = re.compile(r"\bat row (\d+)")
_STAGING_RE = re.compile(r"^_conduit_stage_[0-9a-f]{16}_[0-9a-f]{12}$")


def qi(name: str) -> str:
    """A MySQL identifier, quoted."""
    return "`" + name.replace("`", "``") + "`"


def _digest(pipeline: str, database: str, table: str) -> str:
    return hashlib.sha256(f"{pipeline}\0{database}\0{table}".encode()).hexdigest()[:16]


def staging_name(pipeline: str, database: str, table: str, generation: str) -> str:
    """A staging table's name (as PostgreSQL's: a digest of the pipeline, database and table, and the generation;
    44 characters, under MySQL's 64)."""
    return f"{STAGING_PREFIX}{_digest(pipeline, database, table)}_{generation[:12]}"


def old_name(staging: str) -> str:
    """Where publish moves the previous table before dropping it."""
    return OLD_PREFIX + staging[len(STAGING_PREFIX) :]


def lock_name(database: str, table: str) -> str:
    """The table's ``GET_LOCK`` name: ``conduit:`` and 56 hex digits of a SHA-256 of the quoted database and table
    (GET_LOCK names are at most 64 characters; `a.b`.c is not a.`b.c`)."""
    return "conduit:" + hashlib.sha256(f"{qi(database)}.{qi(table)}".encode()).hexdigest()[: MAX_NAME - 8]


def partition_lock_name(database: str, table: str, key: str) -> str:
    """The ``GET_LOCK`` name of one partition of a table (held for a run of that partition): as ``lock_name``, over
    the table and the partition key."""
    text = f"{qi(database)}.{qi(table)} partition {key}"
    return "conduit:" + hashlib.sha256(text.encode()).hexdigest()[: MAX_NAME - 8]


# --- column types ------------------------------------------------------------------------------------------------


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t) or _is_json(t)
    )


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t)


def _is_json(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_struct(t)
        or pa.types.is_map(t)
    )


_INTEGERS = {
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INT",
    pa.int64(): "BIGINT",
    pa.uint8(): "TINYINT UNSIGNED",
    pa.uint16(): "SMALLINT UNSIGNED",
    pa.uint32(): "INT UNSIGNED",
    pa.uint64(): "BIGINT UNSIGNED",
}


def _decimal(field: pa.Field, where: str) -> tuple[int, int]:
    t = _value_type(field.type)
    precision, scale = t.precision, t.scale
    if scale < 0:  # 12E+2: a whole number of precision - scale digits
        precision, scale = precision - scale, 0
    if precision > 65 or scale > 30:
        raise DestinationError(
            f"{where}: column {field.name!r} is {t}, beyond MySQL's largest DECIMAL(65, 30) (65 digits, 30 after the "
            "point); nothing was written. Cast it in the query to a narrower decimal, or to text to keep every digit"
        )
    return precision, scale


def text_type(collation: str) -> str:
    return f"CHARACTER SET utf8mb4 COLLATE {collation}"


def column_type(field: pa.Field, where: str, *, key_bytes: int | None = None, collation: str = NO_PAD_BINARY[1]) -> str:
    """The MySQL column type for an Arrow field. ``key_bytes``: the field is part of a merge key, and a text or
    binary key column gets that many bytes (an index cannot hold LONGTEXT)."""
    t = _value_type(field.type)
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if t in _INTEGERS:
        return _INTEGERS[t]
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_decimal(t):
        precision, scale = _decimal(field, where)
        return f"DECIMAL({precision}, {scale})"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_time(t):
        return "TIME(6)"
    if pa.types.is_timestamp(t):
        # DATETIME, not TIMESTAMP: TIMESTAMP ends in 2038 and converts with the session's zone. A zoned value is
        # stored as its UTC wall time.
        return "DATETIME(6)"
    if pa.types.is_duration(t):
        return "TIME(6)"  # MySQL's TIME is a duration: -838:59:59.999999 to 838:59:59.999999 (a longer one fails)
    if _is_bytes(t):
        return f"VARBINARY({key_bytes})" if key_bytes else "LONGBLOB"
    if _is_text(t):
        return f"VARCHAR({key_bytes // 4}) {text_type(collation)}" if key_bytes else f"LONGTEXT {text_type(collation)}"
    raise DestinationError(
        f"{where}: column {field.name!r} has the Arrow type {t}, which the MySQL destination cannot store; nothing was "
        "written. Cast it in the query (to text, for example)"
    )


def _key_bytes(schema: pa.Schema, keys: tuple[str, ...]) -> dict[str, int]:
    """Bytes for each text or binary merge-key column: InnoDB's 3072-byte key, less 32 for each other key column,
    shared evenly (a single text key is VARCHAR(768), a longer value fails its batch naming the column)."""
    variable = [
        k
        for k in keys
        if k in schema.names and (_is_text(_value_type(schema.field(k).type)) or _is_bytes(_value_type(schema.field(k).type)))
    ]
    if not variable:
        return {}
    share = (KEY_BYTES - 32 * (len(keys) - len(variable))) // len(variable)
    return {k: share - share % 4 for k in variable}


def _column_comment(field: pa.Field) -> str:
    t = _value_type(field.type)
    if pa.types.is_timestamp(t) and t.tz:
        return " COMMENT 'UTC'"
    return ""


# --- rows as LOAD DATA text --------------------------------------------------------------------------------------

NULL = "\\N"
_TAB, _NEWLINE, _EMPTY = (pa.scalar(s, pa.large_string()) for s in ("\t", "\n", ""))


def _text_bytes(array: pa.Array) -> bytes:
    """The UTF-8 bytes of a large_string array's values, end to end (a copy: bytes.find is memchr, many times faster
    than a regular expression over each value)."""
    offsets, data = array.buffers()[1], array.buffers()[2]
    if offsets is None or data is None or len(array) == 0:
        return b""
    bounds = memoryview(offsets).cast("q")
    return memoryview(data)[bounds[array.offset] : bounds[array.offset + len(array)]].tobytes()


def _escape(array: pa.Array) -> pa.Array:
    """Text with backslash, tab and newline escaped as LOAD DATA reads them back (other bytes, NUL and \\r
    included, travel as they are)."""
    text = _text_bytes(array)
    if b"\\" in text or b"\t" in text or b"\n" in text:
        array = pc.replace_substring(array, "\\", "\\\\")
        array = pc.replace_substring(array, "\t", "\\t")
        array = pc.replace_substring(array, "\n", "\\n")
    return array


def _time_text(array: pa.Array) -> pa.Array:
    """A duration as MySQL TIME text, ``[-]H:MM:SS.ffffff`` (microseconds: a finer value that does not fit fails)."""
    micros = array.cast(pa.duration("us")).cast(pa.int64())
    size = pc.abs(micros)
    hours = pc.divide(size, 3_600_000_000)
    rest = pc.subtract(size, pc.multiply(hours, 3_600_000_000))
    minutes = pc.divide(rest, 60_000_000)
    rest = pc.subtract(rest, pc.multiply(minutes, 60_000_000))
    seconds = pc.divide(rest, 1_000_000)
    fraction = pc.subtract(rest, pc.multiply(seconds, 1_000_000))

    def text(values: pa.Array, width: int) -> pa.Array:
        return pc.utf8_lpad(values.cast(pa.large_string()), width, padding="0")

    colon, point = pa.scalar(":", pa.large_string()), pa.scalar(".", pa.large_string())
    sign = pc.if_else(pc.less(micros, 0), pa.scalar("-", pa.large_string()), _EMPTY)
    parts = (sign, hours.cast(pa.large_string()), colon, text(minutes, 2), colon, text(seconds, 2), point, text(fraction, 6))
    return pc.binary_join_element_wise(*parts, _EMPTY)


def _hex(array: pa.Array) -> pa.Array:
    return pa.array([None if v is None else v.hex() for v in array.to_pylist()], pa.large_string())


def _json(array: pa.Array) -> pa.Array:
    values = [None if v is None else json.dumps(v, default=json_default, ensure_ascii=False) for v in array.to_pylist()]
    return _escape(pa.array(values, pa.large_string()))


def _encoder(field: pa.Field) -> Callable[[pa.Array], pa.Array]:
    """How one column becomes LOAD DATA text (nulls stay null; the caller writes them as \\N)."""
    t = _value_type(field.type)

    def plain(array: pa.Array) -> pa.Array:
        return array.cast(pa.large_string())

    if pa.types.is_boolean(t):
        return lambda a: a.cast(pa.int8()).cast(pa.large_string())
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return lambda a: a.cast(pa.float64()).cast(pa.large_string())  # the float's exact value, not its short form
    if pa.types.is_timestamp(t):
        # microseconds (a finer value that does not fit fails the cast: it would be rounded), zone dropped: UTC
        return lambda a: a.cast(pa.timestamp("us", t.tz)).cast(pa.timestamp("us")).cast(pa.large_string())
    if pa.types.is_time(t):
        return lambda a: a.cast(pa.time64("us")).cast(pa.large_string())
    if pa.types.is_date64(t):
        return lambda a: a.cast(pa.date32()).cast(pa.large_string())
    if pa.types.is_duration(t):
        return _time_text
    if _is_bytes(t):
        return _hex
    if _is_json(t):
        return _json
    if pa.types.is_null(t):
        return lambda a: pa.nulls(len(a), pa.large_string())
    if _is_text(t):
        return lambda a: _escape(a.cast(pa.large_string()))
    return plain  # integers, decimals (MySQL reads 1E-18 exactly), dates


class _Rows:
    """A batch as LOAD DATA text, produced chunk by chunk while the load reads it."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.encoders = [_encoder(f) for f in table.schema]

    def chunks(self) -> Any:
        for batch in self.table.to_batches(max_chunksize=ROWS_PER_CHUNK):
            if batch.num_rows == 0:
                continue
            columns = []
            for i, encode in enumerate(self.encoders):
                array = batch.column(i)
                if pa.types.is_dictionary(array.type):
                    array = array.dictionary_decode()
                columns.append(encode(array).fill_null(NULL))
            lines = pc.binary_join_element_wise(*columns, _TAB) if len(columns) > 1 else columns[0]
            lines = pc.binary_join_element_wise(lines, _EMPTY, _NEWLINE)
            offsets = memoryview(lines.buffers()[1]).cast("q")
            yield memoryview(lines.buffers()[2])[offsets[lines.offset] : offsets[lines.offset + len(lines)]]


def _refuse_non_finite(table: pa.Table, where: str, key_column: str | None) -> None:
    for field, column in zip(table.schema, table.columns, strict=True):
        if not pa.types.is_floating(_value_type(field.type)):
            continue
        values = column.cast(pa.float64()) if not pa.types.is_float64(column.type) else column
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            at = _at_row(table, key_column, row)
            raise DestinationError(
                f"{where}: column {field.name!r} holds {values[row].as_py()!r}{at}, which a MySQL FLOAT or DOUBLE "
                "cannot store (no NaN or infinity); nothing of that batch was written. Map it in the query, e.g. "
                f"CASE WHEN {field.name} = 'NaN' THEN NULL ELSE {field.name} END, or cast it to text"
            )


def _at_row(table: pa.Table, key_column: str | None, row: int) -> str:
    if key_column is None or key_column not in table.schema.names or not 0 <= row < table.num_rows:
        return f" (row {row + 1} of the batch)"
    return f" (row {row + 1} of the batch, {key_column} = {table.column(key_column)[row].as_py()!r})"


# --- what an existing column holds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    """A column of the target table, from information_schema.COLUMNS."""

    name: str
    data_type: str  # DATA_TYPE, lower case: int, varchar, datetime, enum ...
    column_type: str  # COLUMN_TYPE: int(10) unsigned, datetime(3), enum('a','b') ...
    scale: int  # NUMERIC_SCALE (0 for integers)
    fraction: int  # DATETIME_PRECISION: digits after the second
    length: int | None  # CHARACTER_MAXIMUM_LENGTH: characters, or a BINARY(n)'s bytes
    collation: str | None  # None: not text
    auto_increment: bool
    generated: bool = False  # a generated (virtual or stored) column: its values are computed, never written


def _kind(t: pa.DataType) -> str:
    """The family of an Arrow type, as the rule table below names it."""
    t = _value_type(t)
    for kind, test in (
        ("null", pa.types.is_null),
        ("bool", pa.types.is_boolean),
        ("int", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("decimal", pa.types.is_decimal),
        ("date", pa.types.is_date),
        ("timestamp", pa.types.is_timestamp),
        ("time", pa.types.is_time),
        ("duration", pa.types.is_duration),
        ("bytes", _is_bytes),
        ("json", _is_json),
        ("text", _is_text),
    ):
        if test(t):
            return kind
    return str(t)


Condition = Callable[[pa.DataType, _Column], str | None]  # why the column cannot hold every value of the type, or None
ValueCheck = Callable[[pa.ChunkedArray, _Column], tuple[int, str] | None]  # the first row it cannot hold, and why


def _scale_fits(t: pa.DataType, c: _Column) -> str | None:
    scale = max(_value_type(t).scale, 0)
    if scale > c.scale:
        return f"its {scale} digits after the point would be rounded to {c.scale} (silently, into an integer column)"
    return None


def _fraction_fits(t: pa.DataType, c: _Column) -> str | None:
    # text is taken as carrying microseconds: MySQL rounds a longer fraction of '...00:00:00.5' without an error
    digits = {"s": 0, "ms": 3}.get(getattr(_value_type(t), "unit", "us"), 6)
    if digits > c.fraction:
        return f"its values carry {digits} digits of a second, which MySQL rounds to {c.fraction} without an error"
    return None


def _bits(limit: int) -> Condition:
    def fits(t: pa.DataType, c: _Column) -> str | None:
        bits = _value_type(t).bit_width
        if bits > limit:
            return f"{bits}-bit integers above 2^{limit} would be rounded without an error"
        return None

    return fits


def _single(t: pa.DataType, c: _Column) -> str | None:
    if _value_type(t).bit_width > 32:
        return "a double would be rounded to a FLOAT's single precision without an error (0.1 would read 0.100000001)"
    return None


def _first(mask: pa.ChunkedArray) -> int | None:
    mask = mask.fill_null(False)
    return pc.index(mask, True).as_py() if pc.any(mask).as_py() else None


def _no_trailing_space(values: pa.ChunkedArray, c: _Column) -> tuple[int, str] | None:
    row = _first(pc.ends_with(values.cast(pa.large_string()), " "))
    if row is None:
        return None
    return row, f"ends with a space, which a CHAR column drops. Change the column to VARCHAR({c.length})"


def _exact_bytes(values: pa.ChunkedArray, c: _Column) -> tuple[int, str] | None:
    row = _first(pc.not_equal(pc.binary_length(values.cast(pa.large_binary())), c.length or 0))
    if row is None:
        return None
    return row, f"is not {c.length} bytes long, and a BINARY({c.length}) column pads it with zero bytes. Make it VARBINARY"


_ENUM_VALUE_RE = re.compile(r"'((?:[^'\\]|''|\\.)*)'")
_ENUM_ESCAPES = {"0": "\0", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "Z": "\x1a"}


def enum_values(column_type: str) -> list[str]:
    """The values of an ``enum('a','it''s')`` COLUMN_TYPE (quotes doubled, backslashes escaped)."""
    inner = column_type[column_type.find("(") + 1 : column_type.rfind(")")]
    unquote = re.compile(r"''|\\(.)")
    return [
        unquote.sub(lambda e: "'" if e.group(0) == "''" else _ENUM_ESCAPES.get(e.group(1), e.group(1)), m.group(1))
        for m in _ENUM_VALUE_RE.finditer(inner)
    ]


def _enum_member(values: pa.ChunkedArray, c: _Column) -> tuple[int, str] | None:
    text = values.cast(pa.large_string())
    members = pa.array(enum_values(c.column_type), pa.large_string())
    row = _first(pc.and_(pc.is_valid(text), pc.invert(pc.is_in(text, value_set=members))))
    if row is None:
        return None
    return row, (
        "is not exactly one of its values (MySQL would store the value it matches in the column's collation, 'A' as "
        "'a', or read '2' as the second value). Add the value to the ENUM, or change the column to VARCHAR"
    )


def _year(values: pa.ChunkedArray, c: _Column) -> tuple[int, str] | None:
    row = _first(pc.or_(pc.less(values, 1901), pc.greater(values, 2155)))
    if row is None:
        return None
    return row, "is outside 1901-2155, which a YEAR column reads as another year (5 as 2005). Change the column to SMALLINT"


@dataclass(frozen=True)
class _Fit:
    """A row of the rule table: columns of these DATA_TYPEs hold Arrow types of these kinds, if ``condition`` (of the
    two types) says nothing, and each batch's values if ``values`` finds no row it cannot hold."""

    columns: tuple[str, ...]
    kinds: tuple[str, ...]
    condition: Condition | None = None
    values: ValueCheck | None = None


_INTEGER_COLUMNS = ("tinyint", "smallint", "mediumint", "int", "bigint")
_TEXT_COLUMNS = ("varchar", "tinytext", "text", "mediumtext", "longtext", "json")
_BLOB_COLUMNS = ("varbinary", "tinyblob", "blob", "mediumblob", "longblob")
# What an existing column may be loaded from (the first row naming the column's DATA_TYPE and the Arrow type's kind
# decides; a pair no row names is refused: MySQL would convert it without an error, 1.5 into an INT as 2, True into
# a VARCHAR as '1', 5 into a BIT as b'5'). A value out of range, too long, with more digits than a DECIMAL keeps, not
# in the column's character set or not a date fails its load (strict mode, any warning rolls the batch back), so
# those pairs need only the types to agree; the conditions catch what MySQL rounds or pads silently.
FITS: tuple[_Fit, ...] = (
    _Fit(_INTEGER_COLUMNS + ("decimal",), ("bool", "int")),
    _Fit(_INTEGER_COLUMNS + ("decimal",), ("decimal",), _scale_fits),
    _Fit(("decimal",), ("float", "text")),
    _Fit(("double",), ("bool", "float")),
    _Fit(("double",), ("int",), _bits(53)),
    _Fit(("float",), ("bool",)),
    _Fit(("float",), ("float",), _single),
    _Fit(("float",), ("int",), _bits(24)),
    _Fit(("year",), ("int",), values=_year),
    _Fit(("date",), ("date", "timestamp", "text")),
    _Fit(("datetime", "timestamp"), ("date",)),
    _Fit(("datetime", "timestamp"), ("timestamp", "text"), _fraction_fits),
    _Fit(("time",), ("time", "duration", "text"), _fraction_fits),
    _Fit(_TEXT_COLUMNS, ("text", "json")),
    _Fit(("char",), ("text",), values=_no_trailing_space),
    _Fit(("enum",), ("text",), values=_enum_member),
    _Fit(_BLOB_COLUMNS, ("bytes", "text")),
    _Fit(("binary",), ("bytes", "text"), values=_exact_bytes),
)


def fit(t: pa.DataType, c: _Column) -> tuple[str | None, ValueCheck | None]:
    """Whether column ``c`` holds every value of Arrow type ``t``: (why not, or None; the check of each batch's values)."""
    kind = _kind(t)
    if kind == "null":
        return None, None
    for rule in FITS:
        if c.data_type in rule.columns and kind in rule.kinds:
            return (rule.condition(t, c) if rule.condition else None), rule.values
    return f"MySQL would convert {kind} values to {c.data_type.upper()} without an error where it cannot hold them", None


def _str(value: Any) -> str:
    """An information_schema value (MySQL 8 returns some as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def exact_key_collation(collation: str | None) -> bool:
    """A merge key column's collation: binary (byte by byte) and NO PAD, or not text at all."""
    return collation is None or collation == "binary" or collation.endswith("_nopad_bin") or collation in NO_PAD_BINARY


# --- a partition's rows in a table ------------------------------------------------------------------------------

# DATA_TYPEs a partition column may have here: they compare the same way in every database (numbers, dates and times,
# bytes). Text is left out for key ranges: its collation may order keys unlike the source's, and a publish would
# delete other rows; a time window compares with ISO text dates byte by byte, as the SQLite source does.
_PARTITION_TYPES = frozenset(
    _INTEGER_COLUMNS
    + ("decimal", "float", "double", "year", "date", "datetime", "timestamp", "time")
    + _BLOB_COLUMNS
    + ("binary",)
)
_TEMPORAL_TYPES = ("date", "datetime", "timestamp")
_GENERATED_EXTRA = ("virtual", "persistent", "stored")  # MariaDB's EXTRA of a generated column; MySQL's say GENERATED
# ISO text dates as the SQLite source writes and compares them (engine/sources/base.py, iso_text_bounds): a form is
# told by the value's length or its 11th character, and compares byte by byte with a bound written in that form
_TEXT_FORMS = (
    ("CHAR_LENGTH({c}) = 10", "%Y-%m-%d"),
    ("SUBSTRING({c}, 11, 1) = ' '", "%Y-%m-%d %H:%M"),
    ("SUBSTRING({c}, 11, 1) = 'T'", "%Y-%m-%dT%H:%M"),
)


def _binary_collation(collation: str | None) -> bool:
    return collation is not None and (collation == "binary" or collation.endswith("_bin"))


def bound_sql(partition: Partition, value: Any, data_type: str, *, utc: bool) -> tuple[str, Any]:
    """(placeholder, parameter) comparing a column of ``data_type`` with one bound of ``partition`` as the sources
    compare it. A time window's bound (an aware datetime in the partition's zone) is a date for a DATE column, the
    wall-clock time in the zone for a DATETIME, and the instant for a TIMESTAMP (the session's zone is UTC) or for a
    DATETIME that holds zoned timestamps as UTC wall time (``utc``: conduit's column comment 'UTC'). A key range's
    bound is a value of the column's own type (a zoned timestamp bound as its UTC wall time)."""
    if partition.timezone is not None:
        if data_type == "date":
            wall = window_bound(partition, value, "timestamp")
            if wall.time() != dt.time(0):
                raise DestinationError(
                    f"{partition.describe()}: the window starts or ends at {wall} ({partition.timezone}), not at midnight, "
                    f"and the DATE column {partition.column!r} cannot be split there; use `every: day`, `week` or `month`"
                )
            value = wall.date()
        else:
            value = window_bound(partition, value, "timestamp" if data_type == "datetime" and not utc else "timestamptz")
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)  # PyMySQL would drop the zone, not convert
    if isinstance(value, dt.datetime):
        return "CAST(%s AS DATETIME(6))", value  # never rounded to the column's fraction digits
    if isinstance(value, dt.date) and data_type in _TEMPORAL_TYPES:
        return "CAST(%s AS DATE)", value
    return "%s", value


def text_window(partition: Partition, quoted: str) -> tuple[str, tuple[Any, ...]]:
    """The condition selecting a time window's rows from ISO text dates (in a binary collation), each written form
    against the bounds written in that form; dates only where the window starts and ends at midnight."""
    walls = [None if v is None else window_bound(partition, v, "timestamp") for v in (partition.lo, partition.hi)]
    whole_days = all(w is None or w.time() == dt.time(0) for w in walls)
    alternatives, params = [], []
    for test, fmt in _TEXT_FORMS[0 if whole_days else 1 :]:
        parts = [test.format(c=quoted)]
        for wall, op in zip(walls, (">=", "<"), strict=True):
            if wall is not None:
                parts.append(f"{quoted} {op} %s")
                params.append(wall.strftime(fmt))
        alternatives.append("(" + " AND ".join(parts) + ")")
    return "(" + " OR ".join(alternatives) + ")", tuple(params)


# --- the destination ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TableInfo:
    kind: str  # BASE TABLE, VIEW ...
    engine: str | None
    comment: str


class MySQLDestination:
    # a committed batch is final in every mode: a resume adopts it instead of writing it again
    rolls_forward = True

    def __init__(
        self, spec: MySQLDestinationSpec, pipeline: str, *, accumulate: bool = False, partition: Partition | None = None
    ) -> None:
        # accumulate (an incremental load) is what append and merge do already; replace is refused for it in the spec
        self.spec = spec
        self.pipeline = pipeline
        self.partition = partition
        # what names the run's batch records, staging table and lock: the pipeline, or the partition's unit
        self.unit = partition.unit if partition is not None else pipeline
        self.table = spec.table or pipeline
        self.mode = spec.mode
        self.generation: str | None = None
        self.staging: str | None = None
        self.comment = f"conduit-dagster pipeline {pipeline}"
        # the comment of a table a partition's replace created: it holds partitions, which an unpartitioned run refuses
        self.partitions_comment = f"{self.comment} partitions"
        self._target_expected = False
        self._created_staging = False
        self._published = False
        self._resumable = True
        self._lock: Any = None
        self.collation = NO_PAD_BINARY[1]  # the server's, found by start()
        self._fold_case = False  # the server's lower_case_table_names, found by start()
        self._columns: dict[str, _Column] | None = None  # the target's, by lower-case name: read at the first write
        self._fitted: pa.Schema | None = None  # the last batch schema checked against them
        self._value_checks: list[tuple[int, _Column, ValueCheck]] = []  # what each batch of that schema is checked for
        self._generated: set[str] = set()  # merge: AUTO_INCREMENT columns of another unique index, which rows must not carry
        try:
            self.database = target(spec).database
            self.conn = connect(spec, "destination", local_infile=True, autocommit=False)
        except ConduitError as exc:
            raise DestinationError(str(exc)) from None
        # the server may ask for a local file only while conduit runs its own LOAD DATA (see _stream): a hostile or
        # compromised server could otherwise ask for any file the process can read, in reply to any statement
        self.conn._local_infile = False
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"SET SESSION sql_mode = '{SQL_MODE}'")
        except pymysql.MySQLError as exc:
            self.conn.close()
            raise self._fail("cannot set the session", exc) from None

    # --- names and messages --------------------------------------------------------------------------------

    def _q(self, name: str) -> str:
        return f"{qi(self.database)}.{qi(name)}"

    @property
    def _staging(self) -> str:
        assert self.staging is not None
        return self.staging

    def _write_target(self) -> str:
        return self._staging if self.mode == "replace" else self.table

    def describe(self) -> str:
        return f"{describe(self.spec)}/{self.table}"

    def _where(self) -> str:
        part = f", {self.partition.describe()}" if self.partition is not None else ""
        return f"destination {self.spec.name!r} ({self.describe()}{part})"

    def _of(self) -> str:
        """Whose output this is, for messages: the pipeline, and the partition."""
        if self.partition is None:
            return f"pipeline {self.pipeline!r}"
        return f"partition {self.partition.key!r} of pipeline {self.pipeline!r}"

    def _error_text(self, exc: Exception) -> str:
        args: tuple[Any, ...] = getattr(exc, "args", ())
        if len(args) == 2 and isinstance(args[0], int):
            text = f"MySQL error {args[0]}: {args[1]}"
        else:
            text = str(exc)
        return redact(text.strip(), self.spec)

    def _fail(self, what: str, exc: Exception) -> DestinationError:
        return DestinationError(
            f"{self._where()}: {what}: {self._error_text(exc)}; that batch was rolled back and the checkpoint is unchanged"
        )

    def _missing(self, name: str, why: str) -> DestinationError:
        what = "staging table" if name != self.table else "table"
        return DestinationError(
            f"destination {self.spec.name!r}: the {what} {self.database}.{name} of {self._of()} is missing "
            f"{why}; someone dropped it, and its rows with it. Nothing more was written; start over with "
            f"`conduit clear-checkpoints --pipeline-name {self.unit}`"
        )

    # --- protocol ------------------------------------------------------------------------------------------

    def set_resumable(self, resumable: bool) -> None:
        """False: no checkpoint names this run's generation, so close() drops an unpublished staging table."""
        self._resumable = resumable

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            with self.conn.cursor() as cur:
                self._check_server(cur)
                self._find_collation(cur)
                self._fence()
                text = text_type(self.collation)
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._q(BATCHES)} ("
                    f"pipeline VARCHAR(255) {text} NOT NULL, generation VARCHAR(64) {text} NOT NULL, "
                    "batch_index INT NOT NULL, `rows` BIGINT NOT NULL, "
                    f"last_key LONGTEXT {text}, batch_state LONGTEXT {text}, "
                    "committed_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), "
                    "PRIMARY KEY (pipeline, generation, batch_index)) "
                    f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self.collation}"
                )
                if self.mode == "replace":  # before any row is read: also a resume, whose table may be another's now
                    self._check_replaceable(cur)
                if state is None:
                    # Nothing else is dropped: a staging table with another name belongs to another run (another
                    # generation, or another deployment), and only its own checkpoint can say it is abandoned.
                    self.generation = uuid.uuid4().hex
                    if self.partition is not None:
                        # the unit's earlier publish records: no checkpoint names their generation any more
                        cur.execute(
                            f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND batch_index = %s", (self.unit, PUBLISHED)
                        )
                    if self.mode == "replace":
                        self.staging = staging_name(self.unit, self.database, self.table, self.generation)
                        if self.partition is not None and self._info(cur, self.table) is not None:
                            self._condition(cur, self.table)  # a column publish cannot compare: refused before any row
                        resumption = Resumption(
                            {"generation": self.generation, "staging": self.staging, "database": self.database}
                        )
                    else:
                        self._check_writable(cur)
                        resumption = Resumption({"generation": self.generation})
                else:
                    resumption = self._resume(cur, state, committed)
            self.conn.commit()
            return resumption
        except pymysql.MySQLError as exc:
            self._rollback()
            raise self._fail("cannot prepare the output", exc) from None
        except BaseException:
            self._rollback()
            raise

    def _resume(self, cur: Any, state: dict[str, Any], committed: int) -> Resumption:
        generation = state.get("generation")
        if not isinstance(generation, str) or not generation.isalnum() or len(generation) > 64:
            raise CheckpointError(f"{self._of()}: the checkpoint names no valid output generation")
        self.generation = generation
        if self.mode == "replace":
            staging = state.get("staging")
            if not isinstance(staging, str) or not _STAGING_RE.match(staging):
                raise CheckpointError(f"{self._of()}: the checkpoint names no valid staging table")
            self.staging = staging
            if self.partition is not None:
                if self._publish_recorded(cur):
                    # published already (a crash came after the publish committed): drop what publish left
                    cur.execute(f"DROP TABLE IF EXISTS {self._q(staging)}")
                    self._published = True
                    return Resumption(state, already_published=True)
                info = None
            else:
                info = self._info(cur, self.table)
            if info is not None and info.comment == self._stamp():
                # published already (a crash came after the swap): finish what publish left
                cur.execute(f"DROP TABLE IF EXISTS {self._q(old_name(staging))}")
                self._forget_batches(cur)
                self._published = True
                return Resumption(state, already_published=True)
        else:
            self._check_writable(cur)
        beyond = self._batches_beyond(cur, committed)
        written = committed + len(beyond)
        name = self._write_target()
        if self._info(cur, name) is not None:
            self._target_expected = True
        elif written > 0:
            if self.mode == "replace":
                raise CheckpointError(
                    f"{self._of()}: the checkpoint's staging table {self.database}.{name} is missing, so it "
                    f"cannot be resumed; start over with `conduit clear-checkpoints --pipeline-name {self.unit}`"
                )
            raise self._missing(name, f"though {written} batch(es) of this run went into it")
        return Resumption(state, committed=beyond)

    def _batches_beyond(self, cur: Any, committed: int) -> tuple[CommittedBatch, ...]:
        cur.execute(
            f"SELECT batch_index, `rows`, last_key, batch_state FROM {self._q(BATCHES)} "
            "WHERE pipeline = %s AND generation = %s AND batch_index >= %s ORDER BY batch_index",
            (self.unit, self.generation, committed),
        )
        return tuple(
            CommittedBatch(
                index=int(index),
                rows=int(rows),
                last_key=None if last_key is None else decode_value(json.loads(last_key)),
                state=dict(json.loads(batch_state)) if batch_state else {},
            )
            for index, rows, last_key, batch_state in cur.fetchall()
        )

    def _forget_batches(self, cur: Any) -> None:
        cur.execute(f"DELETE FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s", (self.unit, self.generation))

    def _publish_recorded(self, cur: Any) -> bool:
        """A partition's publish of this generation committed (its record is in ``_conduit_batches``)."""
        cur.execute(
            f"SELECT 1 FROM {self._q(BATCHES)} WHERE pipeline = %s AND generation = %s AND batch_index = %s",
            (self.unit, self.generation, PUBLISHED),
        )
        return cur.fetchone() is not None

    def _stamp(self) -> str:
        """The comment of a published table: which generation it holds (a resume after the swap sees it is done)."""
        return f"{self.comment} generation {self.generation}"

    def _check_server(self, cur: Any) -> None:
        cur.execute("SELECT @@GLOBAL.local_infile, @@lower_case_table_names")
        row = cur.fetchone()
        # 1 or 2: table names compare without case (Windows, macOS), so `Things` and `things` are one table
        self._fold_case = bool(row and int(row[1] or 0))
        if not row or not int(row[0] or 0):
            raise DestinationError(
                f"{self._where()}: the server refuses LOAD DATA LOCAL INFILE (@@local_infile is OFF), which conduit loads "
                "batches with; nothing was written. Turn it on as an administrator: `SET GLOBAL local_infile = 1`, and "
                "`local_infile = 1` under [mysqld] in the server's configuration to keep it after a restart"
            )

    def _find_collation(self, cur: Any) -> None:
        cur.execute("SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN (%s, %s)", NO_PAD_BINARY)
        found = {str(r[0]) for r in cur.fetchall()}
        self.collation = next((c for c in NO_PAD_BINARY if c in found), PAD_BINARY)
        if self.collation == PAD_BINARY and self.mode == "merge":
            raise DestinationError(
                f"{self._where()}: the server has no binary NO PAD collation (MySQL 8.0+, MariaDB 10.2+), so a text merge "
                "key would treat 'a' and 'a ' as one key; nothing was written. Use a newer server, or mode append"
            )

    def _fence(self) -> None:
        """A ``GET_LOCK`` on the target table in a session of its own, held until close() (or until its holder
        dies and the server drops its connection): two runs writing one table cannot interleave."""
        name = self._lock_name()
        try:
            self._lock = connect(self.spec, "destination", autocommit=True)
        except ConduitError as exc:
            raise DestinationError(str(exc)) from None
        with self._lock.cursor() as cur:
            cur.execute("SET SESSION wait_timeout = 31536000")  # the lock must outlive any pause of the run
            cur.execute("SELECT GET_LOCK(%s, %s)", (name, LOCK_WAIT_S))
            row = cur.fetchone()
            if row and row[0] == 1:
                return
            holder = self._holder(cur, name)
        self._lock.close()
        self._lock = None
        what = f"table {self.database}.{self.table}"
        if self.partition is not None:
            what = f"partition {self.partition.key!r} of {what}"
        raise DestinationError(
            f"destination {self.spec.name!r}: {what} is being written by another run "
            f"({holder} holds its lock {name!r}); nothing was written. Wait for that run to finish"
        )

    def _holder(self, cur: Any, name: str) -> str:
        cur.execute("SELECT IS_USED_LOCK(%s)", (name,))
        row = cur.fetchone()
        if not row or row[0] is None:
            return "a session that has just released it"
        session = int(row[0])
        try:
            cur.execute("SELECT USER, HOST, TIME FROM information_schema.PROCESSLIST WHERE ID = %s", (session,))
            found = cur.fetchone()
        except pymysql.MySQLError:
            found = None
        if not found:
            return f"MySQL connection {session}"
        user, host, seconds = found
        return f"MySQL connection {session} of {user}@{host}, connected {seconds} s"

    def _still_fenced(self, cur: Any) -> None:
        """The lock session may have died (a network cut, a KILL): then another run may write the table too."""
        cur.execute("SELECT IS_USED_LOCK(%s)", (self._lock_name(),))
        row = cur.fetchone()
        if self._lock is None or not row or row[0] != self._lock.thread_id():
            raise DestinationError(
                f"{self._where()}: this run lost its lock on table {self.database}.{self.table} (its lock session was "
                "closed or killed), so another run may be writing it; nothing more was written. Run the pipeline again: "
                "it resumes from its checkpoint"
            )

    def _names(self) -> tuple[str, str]:
        """The database and table as the server tells them apart (without case, where it folds names)."""
        if self._fold_case:
            return self.database.lower(), self.table.lower()
        return self.database, self.table

    def _lock_name(self) -> str:
        """The lock held for the run: the table's, or the partition's (partitions of a table load at the same time)."""
        if self.partition is not None:
            return partition_lock_name(*self._names(), self.partition.key)
        return lock_name(*self._names())

    @contextmanager
    def _table_lock(self, what: str) -> Iterator[None]:
        """The table's own lock, taken by a partition's run (on its lock session) only while it creates the table or
        publishes: partitions publish one at a time, and never while a run without partitions writes the table."""
        name = lock_name(*self._names())
        assert self._lock is not None
        with self._lock.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, %s)", (name, TABLE_LOCK_WAIT_S))
            row = cur.fetchone()
            if not row or row[0] != 1:
                holder = self._holder(cur, name)
                raise DestinationError(
                    f"{self._where()}: cannot {what}: table {self.database}.{self.table} stayed locked for "
                    f"{TABLE_LOCK_WAIT_S} s by another run ({holder} holds its lock {name!r}); nothing was changed. Run "
                    "the partition again once that run is done: it resumes from its checkpoint"
                )
        try:
            yield
        finally:
            try:
                with self._lock.cursor() as cur:
                    cur.execute("SELECT RELEASE_LOCK(%s)", (name,))
            except pymysql.MySQLError:
                pass  # the lock session is gone, and the lock with it

    def _info(self, cur: Any, name: str) -> _TableInfo | None:
        exact = "" if self._fold_case else " AND BINARY TABLE_NAME = BINARY %s"  # information_schema ignores case
        cur.execute(
            "SELECT TABLE_TYPE, ENGINE, TABLE_COMMENT FROM information_schema.TABLES "
            f"WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s{exact}",
            (self.database, name) + (() if self._fold_case else (name,)),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return _TableInfo(kind=str(row[0]), engine=row[1], comment=row[2] or "")

    def _check_replaceable(self, cur: Any) -> None:
        """Refuse a table conduit did not create for this pipeline, and a mix of partitioned and unpartitioned runs of
        mode replace: a partition replaces only its window's rows, so an unpartitioned run's rows outside every window
        would stay for good (unseen by the partitions' counts); an unpartitioned run would swap the partitions away."""
        info = self._info(cur, self.table)
        if info is None:
            return
        table = f"{self.database}.{self.table}"
        published = info.comment.startswith(f"{self.comment} generation ")  # by an unpartitioned run of replace
        ours = info.comment in (self.comment, self.partitions_comment) or published
        if not ours or info.kind != "BASE TABLE":
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} exists and was not created by "
                f"conduit for pipeline {self.pipeline!r}; mode replace would drop it. Choose another `table`, use mode "
                "append or merge, or drop it yourself. Nothing was changed"
            )
        if self.partition is not None and published:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} holds the output of an unpartitioned run of pipeline "
                f"{self.pipeline!r}, and {self._of()} would replace only its own rows there: the rows outside every "
                f"partition would stay for good. Drop the table (DROP TABLE {self._q(self.table)}) and load the "
                "partitions again, or load the pipeline unpartitioned (without `partitions:`). Nothing was changed"
            )
        if self.partition is None and info.comment == self.partitions_comment:
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} holds the partitions of pipeline {self.pipeline!r}, "
                "loaded by its partitioned runs, which this unpartitioned run of mode replace would replace. Drop the "
                f"table (DROP TABLE {self._q(self.table)}) and load it unpartitioned, or load it by partitions (with "
                "`partitions:`). Nothing was changed"
            )

    def _check_writable(self, cur: Any) -> None:
        """Append and merge into an existing table: it must be transactional (a batch and its record commit
        together), and merge needs a unique key on exactly ``primary_key``."""
        info = self._info(cur, self.table)
        if info is None:
            return
        if info.kind != "BASE TABLE" or (info.engine or "").lower() != "innodb":
            raise DestinationError(
                f"destination {self.spec.name!r}: table {self.database}.{self.table} is a {info.kind.lower()} with "
                f"engine {info.engine}; conduit writes only InnoDB tables, where each batch and its record commit "
                f"together. Convert it (ALTER TABLE {self.table} ENGINE=InnoDB) or choose another `table`. Nothing was written"
            )
        if self.mode == "merge":
            self._check_merge_keys(cur)

    def _columns_of(self, cur: Any, name: str) -> dict[str, _Column]:
        """The table's columns by lower-case name (MySQL's column names ignore case)."""
        exact = "" if self._fold_case else " AND BINARY TABLE_NAME = BINARY %s"
        cur.execute(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_SCALE, DATETIME_PRECISION, CHARACTER_MAXIMUM_LENGTH, "
            f"COLLATION_NAME, EXTRA FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s{exact}",
            (self.database, name) + (() if self._fold_case else (name,)),
        )
        return {
            _str(column).lower(): _Column(
                name=_str(column),
                data_type=_str(data_type).lower(),
                column_type=_str(column_type),
                scale=int(scale or 0),
                fraction=int(fraction or 0),
                length=None if length is None else int(length),
                collation=None if collation is None else _str(collation),
                auto_increment="auto_increment" in _str(extra or "").lower(),
                generated=_str(extra or "").lower() in _GENERATED_EXTRA or "generated" in _str(extra or "").lower(),
            )
            for column, data_type, column_type, scale, fraction, length, collation, extra in cur.fetchall()
        }

    def _check_merge_keys(self, cur: Any) -> None:
        """Merge upserts with ``INSERT ... ON DUPLICATE KEY UPDATE``, which fires on a clash in ANY unique index: the
        table needs one on exactly ``primary_key`` (whole columns, not prefixes), no other that could clash where the key
        does not (one that holds every key column whole cannot; one on AUTO_INCREMENT columns the rows do not carry
        cannot), and key columns that compare byte by byte and NO PAD, as Python compares the keys."""
        exact = "" if self._fold_case else " AND BINARY TABLE_NAME = BINARY %s"
        cur.execute(
            "SELECT INDEX_NAME, COLUMN_NAME, SUB_PART FROM information_schema.STATISTICS "
            f"WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s{exact} AND NON_UNIQUE = 0 ORDER BY INDEX_NAME, SEQ_IN_INDEX",
            (self.database, self.table) + (() if self._fold_case else (self.table,)),
        )
        indexes: dict[str, list[tuple[str | None, Any]]] = {}
        for index, column, part in cur.fetchall():
            indexes.setdefault(_str(index), []).append((None if column is None else _str(column).lower(), part))
        columns = self._columns_of(cur, self.table)
        wanted = {k.lower() for k in self.spec.primary_key}
        table, keys = f"{self.database}.{self.table}", ", ".join(self.spec.primary_key)

        def whole(parts: list[tuple[str | None, Any]]) -> set[str]:
            return {c for c, part in parts if c is not None and part is None}

        if not any(whole(parts) == wanted and len(parts) == len(wanted) for parts in indexes.values()):
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} has no PRIMARY KEY or UNIQUE index on exactly ({keys}) "
                "(whole columns, not a prefix of one), which mode merge upserts on; add one, or fix `primary_key`. "
                "Nothing was written"
            )
        self._generated = set()
        for index, parts in sorted(indexes.items()):
            if wanted <= whole(parts):
                continue  # a clash in it is a clash of the key
            generated = [c for c, _ in parts if c is not None and c in columns and columns[c].auto_increment]
            if len(generated) == len(parts):
                self._generated.update(generated)  # write() refuses rows that carry them
                continue
            on = ", ".join(columns[c].name if c is not None and c in columns else "an expression" for c, _ in parts)
            raise DestinationError(
                f"destination {self.spec.name!r}: table {table} has the unique index {index!r} on ({on}) besides the one on "
                f"({keys}) that mode merge upserts on; MySQL's INSERT ... ON DUPLICATE KEY UPDATE fires on either, so a "
                f"new row sharing its {on} with another row would overwrite that row and be lost. Drop the index "
                f"(ALTER TABLE {qi(self.table)} DROP INDEX {qi(index)}), make {keys} the only unique key, or merge into "
                "another table. Nothing was written"
            )
        for key in self.spec.primary_key:
            column = columns.get(key.lower())
            if column is not None and not exact_key_collation(column.collation):
                raise DestinationError(
                    f"destination {self.spec.name!r}: the merge key column {key!r} of table {table} has the collation "
                    f"{column.collation}, which holds keys equal that Python tells apart ('a', 'A' and 'a ' would merge into "
                    f"one row); nothing was written. Give it a binary NO PAD collation: ALTER TABLE {qi(self.table)} "
                    f"MODIFY {qi(column.name)} {column.column_type} CHARACTER SET utf8mb4 COLLATE {self.collation} NOT NULL, "
                    "or let conduit create the table (it does so)"
                )

    def _check_fit(self, cur: Any, name: str, table: pa.Table, where: str, key_column: str | None) -> None:
        """The batch's columns against the table's (read once a run), by the rule table ``FITS``: a type MySQL would
        round, pad or reinterpret without an error is refused before the batch is written, and so is a value that a
        CHAR, BINARY(n), ENUM or YEAR column would change."""
        if self._columns is None:
            self._columns = self._columns_of(cur, name)
        where_in = f"table {self.database}.{name}"
        if self._fitted is None or not table.schema.equals(self._fitted):
            self._value_checks = []
            widths = _key_bytes(table.schema, self.spec.primary_key if self.mode == "merge" else ())
            for i, field in enumerate(table.schema):
                column = self._columns.get(field.name.lower())
                if column is None:
                    continue  # the load fails naming it
                why, values = fit(field.type, column)
                if why is not None:
                    wide = column_type(field, where, key_bytes=widths.get(field.name), collation=self.collation)
                    raise DestinationError(
                        f"{where}: column {column.name!r} of {where_in} is {column.column_type}, and the query's "
                        f"{field.name!r} is {field.type}: {why}. Nothing of the batch was written and the checkpoint is "
                        "unchanged. Cast the value in the query to a type the column holds, change the column (ALTER TABLE "
                        f"{qi(name)} MODIFY {qi(column.name)} {wide}, keeping its NOT NULL and DEFAULT), or write to a new "
                        "table (conduit creates it to fit)"
                    )
                if values is not None:
                    self._value_checks.append((i, column, values))
            self._fitted = table.schema
        for i, column, check in self._value_checks:
            found = check(table.column(i), column)
            if found is not None:
                row, why = found
                raise DestinationError(
                    f"{where}: column {column.name!r} of {where_in} is {column.column_type}, and the value "
                    f"{table.column(i)[row].as_py()!r}{_at_row(table, key_column, row)} {why}. Nothing of the batch was "
                    "written and the checkpoint is unchanged"
                )

    def _create_table(self, cur: Any, name: str, table: pa.Table, comment: str) -> None:
        where = self._where()
        keys = self.spec.primary_key if self.mode == "merge" else ()
        widths = _key_bytes(table.schema, keys)
        types = {f.name: column_type(f, where, key_bytes=widths.get(f.name), collation=self.collation) for f in table.schema}
        columns = [
            f"{qi(f.name)} {types[f.name]}" + (" NOT NULL" if f.name in keys else "") + _column_comment(f) for f in table.schema
        ]
        if keys:
            columns.append(f"PRIMARY KEY ({', '.join(qi(k) for k in keys)})")
        column = self.partition.column if self.partition is not None else None
        if column is not None and column in types and not types[column].startswith("LONG"):
            # a publish deletes and a count reads the partition's rows by this column: a range of the index, not a scan
            columns.append(f"KEY {qi(PARTITION_INDEX)} ({qi(column)})")
        # not IF NOT EXISTS: it was checked missing under the table's lock
        cur.execute(
            f"CREATE TABLE {self._q(name)} ({', '.join(columns)}) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 "
            f"COLLATE={self.collation} COMMENT={self.conn.escape(comment)}"
        )

    def _create_for_partition(self, cur: Any, table: pa.Table) -> None:
        """A partition run's first batch: the target, created if missing under the table's lock (other partitions may
        be starting at the same time); for replace, the unit's staging table made LIKE it, so every batch is checked
        against the target's own columns and the publish copies rows between identical columns."""
        if self._info(cur, self.table) is None:
            self.conn.commit()
            with self._table_lock("create the table"):
                if self._info(cur, self.table) is None:
                    comment = self.partitions_comment if self.mode == "replace" else self.comment
                    self._create_table(cur, self.table, table, comment)
        if self.mode != "replace":
            return
        self._check_replaceable(cur)
        self._condition(cur, self.table)  # a partition column a publish cannot compare: refused before a row is written
        staging = self._staging
        cur.execute(f"CREATE TABLE {self._q(staging)} LIKE {self._q(self.table)}")
        self._created_staging = True
        # an AUTO_INCREMENT column the rows do not carry: the target numbers the rows itself when they are copied in
        carried = {n.lower() for n in table.schema.names}
        generated = [c.name for k, c in self._columns_of(cur, staging).items() if c.auto_increment and k not in carried]
        if generated:
            cur.execute(f"ALTER TABLE {self._q(staging)} {', '.join(f'DROP COLUMN {qi(c)}' for c in generated)}")

    def _condition(self, cur: Any, name: str) -> tuple[str, tuple[Any, ...]]:
        """The WHERE condition selecting the partition's rows in table ``name`` (``lo <= column < hi``, the bounds
        bound as parameters, compared as the source compared them), and its parameters."""
        condition, params, _ = self._partition_filter(cur, name)
        return condition, params

    def _partition_filter(self, cur: Any, name: str) -> tuple[str, tuple[Any, ...], str]:
        """``_condition``, and the partition column as the statement quotes it."""
        p = self.partition
        assert p is not None
        exact = "" if self._fold_case else " AND BINARY TABLE_NAME = BINARY %s"
        cur.execute(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, COLUMN_COMMENT, COLLATION_NAME FROM information_schema.COLUMNS "
            f"WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s{exact} AND COLUMN_NAME = %s",
            (self.database, name) + (() if self._fold_case else (name,)) + (p.column,),
        )
        row = cur.fetchone()
        where = f"{self._where()}: table {self.database}.{name}"
        if row is None:
            raise DestinationError(
                f"{where} has no column {p.column!r}, which the pipeline is partitioned on, so the partition's rows cannot "
                "be told from the others'; nothing was published. Keep the partition column in the query's result"
            )
        column, data_type, shown, comment = _str(row[0]), _str(row[1]).lower(), _str(row[2]), _str(row[3] or "")
        collation = None if row[4] is None else _str(row[4])
        quoted = qi(column).replace("%", "%%")  # the statement goes through %-formatting with its parameters
        is_text = data_type in _TEXT_COLUMNS + ("char",)
        if p.timezone is not None and is_text and _binary_collation(collation):
            return (*text_window(p, quoted), quoted)  # ISO text dates (from SQLite): byte by byte, as the source did
        if p.timezone is not None and data_type not in _TEMPORAL_TYPES:
            raise DestinationError(
                f"{where}: its partition column {column!r} is {shown}"
                + (f" {collation}" if is_text else "")
                + ", and time windows need a DATE, DATETIME or TIMESTAMP column (or ISO text dates in a binary collation) "
                "to compare with; nothing was published. Cast the column in the query to a date or timestamp"
            )
        if data_type not in _PARTITION_TYPES:
            raise DestinationError(
                f"{where}: its partition column {column!r} is {shown}, which MySQL compares by its collation, perhaps in "
                "another order than the source did, so publishing the partition could delete rows of another partition "
                "or keep rows of this one; nothing was published. Partition on a number, date or timestamp column"
            )
        parts, params = [], []
        for value, op in ((p.lo, ">="), (p.hi, "<")):
            if value is not None:
                placeholder, param = bound_sql(p, value, data_type, utc=comment.strip() == "UTC")
                parts.append(f"{quoted} {op} {placeholder}")
                params.append(param)
        return " AND ".join(parts) or f"{quoted} IS NOT NULL", tuple(params), quoted

    def _refuse_outside(self, cur: Any, staging: str, condition: str, params: tuple[Any, ...], quoted: str) -> None:
        """Every staged row in the partition's window as the table compares it: a row outside would not be deleted
        when the partition is replaced next (and would show up in another partition's), so nothing is published."""
        outside = f"FROM {self._q(staging)} WHERE NOT ({condition}) OR {quoted} IS NULL"
        cur.execute(f"SELECT COUNT(*) {outside}", params)
        (n,) = cur.fetchone()
        if not n:
            return
        cur.execute(f"SELECT {quoted} {outside} LIMIT 3", params)
        examples = ", ".join("NULL" if v is None else repr(v) for (v,) in cur.fetchall())
        assert self.partition is not None
        raise DestinationError(
            f"{self._where()}: {n} row(s) loaded for {self._of()} have {self.partition.column} outside its window as "
            f"table {self.database}.{self.table} compares them (e.g. {examples}), so the source and the table disagree on "
            "which rows are the partition's, and replacing the partition again would keep them; nothing was published. "
            "Give the table's column the source column's kind (DATETIME for a timestamp without time zone, TIMESTAMP for "
            "one with a zone, DATE for a date)"
        )

    def write(
        self,
        index: int,
        table: pa.Table,
        key_column: str | None = None,
        last_key: Any = None,
        batch_state: dict[str, Any] | None = None,
    ) -> None:
        where = f"{self._where()}, batch {index}"
        if self.mode == "merge":
            missing = [k for k in self.spec.primary_key if k not in table.schema.names]
            if missing:
                raise DestinationError(
                    f"destination {self.spec.name!r}: primary_key column(s) {', '.join(missing)} are not in the query's result"
                )
            for key in self.spec.primary_key:
                row = _first(table.column(key).is_null())
                if row is not None:
                    raise DestinationError(
                        f"{where}: primary_key column {key!r} is NULL{_at_row(table, key_column, row)}; a NULL key matches "
                        "no row (a unique index holds NULLs apart), so every run would add that row again. Nothing of the "
                        f"batch was written; leave such rows out in the query (WHERE {key} IS NOT NULL)"
                    )
            carried = [n for n in table.schema.names if n.lower() in self._generated]
            if carried:
                raise DestinationError(
                    f"{where}: the query's result holds {', '.join(carried)}, the AUTO_INCREMENT column(s) of another unique "
                    f"index of table {self.database}.{self.table} than the one on ({', '.join(self.spec.primary_key)}) that "
                    "mode merge upserts on: a row sharing its value with another row would overwrite that row. Nothing "
                    "was written; leave the column(s) out of the query, and MySQL numbers new rows itself"
                )
        for field in table.schema:
            column_type(field, where)  # a type MySQL cannot hold is refused before anything is written
        _refuse_non_finite(table, where, key_column)
        key_json = json.dumps(encode_value(last_key)) if key_column is not None else None
        name = self._write_target()
        for attempt in range(WRITE_RETRIES + 1):
            if self._write_once(index, table, where, key_column, key_json, batch_state, name, attempt):
                return

    def _write_once(
        self,
        index: int,
        table: pa.Table,
        where: str,
        key_column: str | None,
        key_json: str | None,
        batch_state: dict[str, Any] | None,
        name: str,
        attempt: int,
    ) -> bool:
        """One attempt at a batch's transaction: True when it committed, False when a deadlock with another partition
        rolled it back and it may be written again."""
        try:
            with self.conn.cursor() as cur:
                # once the table is there, it is not looked up again: a table dropped since then fails the load
                # (error 1146), which is reported below as the missing table
                if not self._target_expected and self._info(cur, name) is None:
                    # DDL commits on its own: the table comes before the batch's transaction
                    if self.partition is not None:
                        self._create_for_partition(cur, table)
                    else:
                        self._create_table(cur, name, table, self._stamp() if self.mode == "replace" else self.comment)
                        self._created_staging = self.mode == "replace"
                self._target_expected = True
                self._check_fit(cur, name, table, where, key_column)
                load_into = name
                if self.mode == "merge":
                    # a temporary table is created outside the batch's transaction (GTID-consistent servers refuse
                    # it inside one); it is the batch's rows, numbered in order, so the last row of a key wins
                    cur.execute(f"DROP TEMPORARY TABLE IF EXISTS {qi(MERGE_TABLE)}")
                    cols = ", ".join(qi(n) for n in table.schema.names)
                    cur.execute(
                        f"CREATE TEMPORARY TABLE {qi(MERGE_TABLE)} (_conduit_row BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY) "
                        f"ENGINE=InnoDB SELECT {cols} FROM {self._q(name)} LIMIT 0"
                    )
                    self.conn.commit()
                    load_into = MERGE_TABLE
                self._still_fenced(cur)
                try:
                    cur.execute(
                        f"INSERT INTO {self._q(BATCHES)} (pipeline, generation, batch_index, `rows`, last_key, batch_state) "
                        "VALUES (%s, %s, %s, %s, %s, %s)",
                        (self.unit, self.generation, index, table.num_rows, key_json, json.dumps(batch_state or {})),
                    )
                except pymysql.err.IntegrityError:
                    # A resume adopts committed batches and never writes them again: another writer got here
                    raise DestinationError(
                        f"destination {self.spec.name!r}: batch {index} of {self._of()} (generation "
                        f"{self.generation}) is committed already in {self.database}.{BATCHES}; writing it again would "
                        "apply its rows twice. Is another run writing this pipeline? Nothing was written"
                    ) from None
                self._load(cur, load_into, table, where, key_column)
                if self.mode == "merge":
                    self._merge(cur, name, table)
            self.conn.commit()
            return True
        except pymysql.MySQLError as exc:
            self._rollback()
            code = exc.args[0] if exc.args else None
            if self.partition is not None and code in (ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT) and attempt < WRITE_RETRIES:
                # the whole transaction (batch record included) was rolled back: writing it again is exact
                time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
                return False
            if exc.args and exc.args[0] == ER_NO_SUCH_TABLE and self._gone(name):
                raise self._missing(name, f"after batches of this run went into it (at batch {index})") from None
            raise self._fail(f"cannot write batch {index}", exc) from None
        except BaseException:
            self._rollback()
            raise
        finally:
            if self.mode == "merge":
                self._drop_merge_table()

    def _load(self, cur: Any, name: str, table: pa.Table, where: str, key_column: str | None) -> None:
        """``LOAD DATA LOCAL INFILE`` of the batch, streamed through a pipe; any warning fails it."""
        names, sets = [], []
        for i, field in enumerate(table.schema):
            if _is_bytes(_value_type(field.type)):
                names.append(f"@c{i}")
                sets.append(f"{qi(field.name)} = UNHEX(@c{i})")
            else:
                names.append(qi(field.name))
        statement = (
            "LOAD DATA LOCAL INFILE {path} INTO TABLE " + (self._q(name) if name != MERGE_TABLE else qi(name)) + " "
            "CHARACTER SET utf8mb4 FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' "
            f"({', '.join(names)})" + (f" SET {', '.join(sets)}" if sets else "")
        )
        loaded = _stream(cur, statement, _Rows(table))
        if cur.warning_count or loaded != table.num_rows:
            cur.execute(f"SHOW WARNINGS LIMIT {WARNINGS_SHOWN}")
            warnings = cur.fetchall()
            if warnings:
                _, _, first = warnings[0]
                m = _ROW_RE.search(str(first))
                at = _at_row(table, key_column, int(m.group(1)) - 1) if m else ""
                said = "; ".join(f"{message}" for _, _, message in warnings)
                more = f" (and {cur.warning_count - len(warnings)} more)" if cur.warning_count > len(warnings) else ""
                raise DestinationError(
                    f"{where}: table {self.database}.{self._write_target()} cannot hold a value of the batch{at}: "
                    f"{redact(said, self.spec)}{more}; MySQL would have truncated or converted it, so the batch was rolled "
                    "back and the checkpoint is unchanged. Widen the column, or cast the value in the query"
                )
            raise DestinationError(
                f"{where}: the server loaded {loaded} of the batch's {table.num_rows} rows into "
                f"{self.database}.{self._write_target()}; the batch was rolled back and the checkpoint is unchanged"
            )

    def _merge(self, cur: Any, name: str, table: pa.Table) -> None:
        cols = [qi(n) for n in table.schema.names]
        others = [qi(n) for n in table.schema.names if n not in self.spec.primary_key]
        # rows in load order: a later row of a key updates the row an earlier one inserted, so the last one wins
        update = ", ".join(f"{c} = VALUES({c})" for c in others) or ", ".join(f"{c} = {c}" for c in cols[:1])
        cur.execute(
            f"INSERT INTO {self._q(name)} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {qi(MERGE_TABLE)} "
            f"ORDER BY _conduit_row ON DUPLICATE KEY UPDATE {update}"
        )

    def _gone(self, name: str) -> bool:
        try:
            with self.conn.cursor() as cur:
                gone = self._info(cur, name) is None
            self.conn.commit()
            return gone
        except pymysql.MySQLError:
            return False

    def _drop_merge_table(self) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"DROP TEMPORARY TABLE IF EXISTS {qi(MERGE_TABLE)}")
            self.conn.commit()
        except pymysql.MySQLError:
            pass  # the session is gone, and its temporary table with it

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except pymysql.MySQLError:
            pass

    def publish(self, batches: int | None = None) -> None:
        if self.partition is not None and self.mode == "replace":
            self._publish_partition()
            return
        try:
            with self.conn.cursor() as cur:
                if self.mode == "replace":
                    self._check_replaceable(cur)
                    current = self._info(cur, self.table)
                    staging = self._staging
                    if self._info(cur, staging) is None:
                        if self._target_expected:  # publishing would empty the table instead of loading it
                            raise self._missing(staging, "at publish, after batches of this run went into it")
                        if current is None:
                            return
                        # a run with no rows: the output is empty, with the previous table's columns
                        cur.execute(f"CREATE TABLE {self._q(staging)} LIKE {self._q(self.table)}")
                        cur.execute(f"ALTER TABLE {self._q(staging)} COMMENT = {self.conn.escape(self._stamp())}")
                    if current is None:
                        cur.execute(f"RENAME TABLE {self._q(staging)} TO {self._q(self.table)}")
                    else:
                        # one statement: readers see the previous table or the new one, never neither
                        old = old_name(staging)
                        cur.execute(
                            f"RENAME TABLE {self._q(self.table)} TO {self._q(old)}, {self._q(staging)} TO {self._q(self.table)}"
                        )
                        cur.execute(f"DROP TABLE {self._q(old)}")
                self._forget_batches(cur)
            self.conn.commit()
            self._published = True
        except pymysql.MySQLError as exc:
            self._rollback()
            raise self._fail("cannot publish the output", exc) from None

    def _publish_partition(self) -> None:
        """Replace the partition's rows in the target by the staging table's, in one transaction, under the table's
        lock; then drop the staging table (DDL, after the commit)."""
        staging = self._staging
        try:
            with self.conn.cursor() as cur:
                staged = self._info(cur, staging) is not None
                if not staged and self._target_expected:  # publishing would empty the partition instead of loading it
                    raise self._missing(staging, "at publish, after batches of this run went into it")
                self.conn.commit()
                with self._table_lock("publish the partition"):
                    self._check_replaceable(cur)
                    if staged and self._info(cur, self.table) is None:
                        # dropped since this run made its staging table from it: the staging table has its columns
                        cur.execute(f"CREATE TABLE {self._q(self.table)} LIKE {self._q(staging)}")
                    exists = self._info(cur, self.table) is not None
                    copy = self._copied_columns(cur, staging) if staged else []
                    condition, params, quoted = self._partition_filter(cur, self.table) if exists else ("", (), "")
                    if copy:
                        self._refuse_outside(cur, staging, condition, params, quoted)
                    self.conn.commit()
                    # one transaction: the partition's previous rows go, its new rows come, the publish is recorded;
                    # readers see the one or the other
                    self._still_fenced(cur)
                    copied = 0
                    if exists:
                        cur.execute(f"DELETE FROM {self._q(self.table)} WHERE {condition}", params)
                    if copy:
                        cols = ", ".join(qi(c) for c in copy)
                        cur.execute(f"INSERT INTO {self._q(self.table)} ({cols}) SELECT {cols} FROM {self._q(staging)}")
                        copied = int(cur.rowcount)
                    self._forget_batches(cur)
                    cur.execute(
                        f"INSERT INTO {self._q(BATCHES)} (pipeline, generation, batch_index, `rows`, batch_state) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (self.unit, self.generation, PUBLISHED, copied, "{}"),
                    )
                    self.conn.commit()
                self._published = True
                if staged:
                    cur.execute(f"DROP TABLE IF EXISTS {self._q(staging)}")  # a crash before this: the resume drops it
                self.conn.commit()
        except pymysql.MySQLError as exc:
            self._rollback()
            raise self._fail("cannot publish the partition", exc) from None
        except BaseException:
            self._rollback()
            raise

    def _copied_columns(self, cur: Any, staging: str) -> list[str]:
        """The staging table's columns a publish copies (not generated ones), each checked to have the target's type
        still: ``INSERT ... SELECT`` would convert (and round) a value into another type without an error."""
        target_columns = self._columns_of(cur, self.table)
        copy = []
        for key, column in self._columns_of(cur, staging).items():
            if column.generated:
                continue
            now = target_columns.get(key)
            if now is None or (now.column_type, now.collation) != (column.column_type, column.collation):
                became = (
                    "is gone" if now is None else f"is now {now.column_type}" + (f" {now.collation}" if now.collation else "")
                )
                raise DestinationError(
                    f"{self._where()}: column {column.name!r} of table {self.database}.{self.table} {became}, but was "
                    f"{column.column_type} when this run made its staging table {staging} from the table; copying its rows "
                    "could convert their values, so nothing was published. Start the partition over: "
                    f"`conduit clear-checkpoints --pipeline-name {self.unit}`, then run it again"
                )
            copy.append(column.name)
        return copy

    def close(self) -> None:
        try:
            if not self._resumable and not self._published and self.generation is not None and self.conn.open:
                self._discard()
        finally:
            try:
                self.conn.close()
            except pymysql.MySQLError:
                pass
            if self._lock is not None:
                try:
                    self._lock.close()  # the lock goes with its session
                except pymysql.MySQLError:
                    pass
                self._lock = None

    def _discard(self) -> None:
        """A run no checkpoint can resume ended unpublished: its staging table and batch records are nobody's."""
        try:
            with self.conn.cursor() as cur:
                if self._created_staging:
                    cur.execute(f"DROP TABLE IF EXISTS {self._q(self._staging)}")
                self._forget_batches(cur)
            self.conn.commit()
        except pymysql.MySQLError:
            pass  # the connection failed with the run; the staging table stays until dropped by hand

    def count(self) -> int | None:
        """Rows in the table; a partition's: its rows in the table (0 where there is no table: it published none)."""
        with self.conn.cursor() as cur:
            if self._info(cur, self.table) is None:
                self.conn.commit()
                return 0 if self.partition is not None else None
            if self.partition is not None:
                condition, params = self._condition(cur, self.table)
                cur.execute(f"SELECT COUNT(*) FROM {self._q(self.table)} WHERE {condition}", params)
            else:
                cur.execute(f"SELECT COUNT(*) FROM {self._q(self.table)}")
            (n,) = cur.fetchone()
        self.conn.commit()
        return int(n)


def _stream(cur: Any, statement: str, rows: _Rows) -> int:
    """Run ``statement`` (its ``{path}`` a file the client sends) with the rows written into a pipe by a thread while
    PyMySQL reads it: the batch is encoded chunk by chunk as it travels, never whole. Returns the rows loaded."""
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            with open(write_end, "wb", buffering=1 << 20) as pipe:
                for chunk in rows.chunks():
                    pipe.write(chunk)
        except BrokenPipeError:
            pass  # the statement ended without reading it all: its own error says why
        except BaseException as exc:  # noqa: BLE001 - an encoding error: the short stream is rolled back below
            failure.append(exc)

    writer = threading.Thread(target=feed, name="conduit-mysql-load", daemon=True)
    writer.start()
    conn = cur.connection
    try:
        conn._local_infile = True
        cur.execute(statement.format(path=conn.escape(f"/dev/fd/{read_end}")))
        loaded = int(cur.rowcount)
    finally:
        conn._local_infile = False
        os.close(read_end)  # a writer still blocked on a full pipe gets EPIPE and ends
        writer.join()
    if failure:
        raise DestinationError(f"cannot encode the batch for LOAD DATA: {failure[0]}") from failure[0]
    return loaded


# --- the backend: ingest.yml `type: mysql` -----------------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str) -> MySQLDestinationSpec:
    e.finish(_KEYS)
    table, mode, keys = parse_table_keys(e, "MySQL", MAX_NAME)
    return MySQLDestinationSpec(name=name, table=table, mode=mode, primary_key=keys, **parse_connection(e))


def _check_resource(e: _Entry, d: MySQLDestinationSpec, use: ResourceUse) -> None:
    check_table_resource(e, d, use, "MySQL", MAX_NAME)


def _table_uri(d: MySQLDestinationSpec, pipeline: str) -> str:
    """``mysql://host:port/database/table``: never a user or password."""
    return f"{describe(d)}/{d.table or pipeline}"


def _check(dest: MySQLDestinationSpec) -> str:
    """`conduit validate`: connect, and check what a run needs (LOAD DATA LOCAL, InnoDB)."""
    conn = connect(dest, "destination", local_infile=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION(), @@GLOBAL.local_infile")
            version, local_infile = cur.fetchone()
            if not int(local_infile or 0):
                raise DestinationError(
                    f"destination {dest.name!r} ({describe(dest)}): the server refuses LOAD DATA LOCAL INFILE "
                    "(@@local_infile is OFF), which conduit loads batches with. Turn it on as an administrator: "
                    "`SET GLOBAL local_infile = 1`, and `local_infile = 1` under [mysqld] in the server's configuration"
                )
            cur.execute("SELECT SUPPORT FROM information_schema.ENGINES WHERE ENGINE = 'InnoDB'")
            row = cur.fetchone()
            if not row or str(row[0]).upper() not in ("YES", "DEFAULT"):
                raise DestinationError(f"destination {dest.name!r} ({describe(dest)}): the server has no InnoDB engine")
    except pymysql.MySQLError as exc:
        raise DestinationError(f"destination {dest.name!r} ({describe(dest)}): {redact(str(exc), dest)}") from None
    finally:
        conn.close()
    return f"{describe(dest)} ({dest.mode}), server {version}, LOAD DATA LOCAL on"


def _leftover(destination_id: str, state: dict[str, Any], pipeline: str) -> list[str] | None:
    """A replace-mode checkpoint's staging table, which no run touches once the checkpoint is cleared."""
    if not destination_id.startswith("mysql://") or "?mode=replace" not in destination_id:
        return None
    staging, database = state.get("staging"), state.get("database")
    if not isinstance(staging, str) or not _STAGING_RE.match(staging) or not isinstance(database, str):
        return None
    table = f"{qi(database)}.{qi(staging)}"
    key = split_unit(pipeline)[1]
    whose = f"partition {key!r}'s" if key is not None else "its"
    return [
        f"{whose} unfinished output stays in MySQL, in staging table {table}; drop it with:",
        f"DROP TABLE IF EXISTS {table};",
    ]


_KEYS = frozenset({"name", "type", "table", "mode", "primary_key"} | CONNECTION_KEYS)
BACKEND = register_destination_backend(
    DestinationBackend(
        type="mysql",
        keys=_KEYS,
        parse=_parse,
        open=MySQLDestination,
        identity=lambda d, pipeline: f"{identity(d)}/{d.table or pipeline}?mode={d.mode}",
        uri=_table_uri,
        kinds=lambda d: {"mysql"},
        check=_check,
        counts_whole_output=lambda d: d.mode == "replace",
        check_resource=_check_resource,
        leftover=_leftover,
        partitioned=True,
    )
)
