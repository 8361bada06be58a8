"""The protocol every source implements, and helpers shared by the SQL sources."""

import datetime as dt
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

import pyarrow as pa

from conduit_dagster.engine.errors import SourceError

if TYPE_CHECKING:
    from conduit_dagster.engine.partitions import Partition


@dataclass(frozen=True)
class Chunk:
    """Rows as Arrow, plus the checkpoint column's values as Python objects (None without one).

    The Python values are what the checkpoint stores and binds back on resume, so they keep the
    driver's exact type (int, Decimal, aware datetime...) whatever Arrow type the column gets.
    """

    data: pa.RecordBatch
    keys: list[Any] | pa.Array | None


class Source(Protocol):
    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        """Stream the query's rows ordered by ``column`` (if any), past ``after`` when resuming."""
        ...

    def close(self) -> None: ...

    def bind(self, params: dict[str, Any]) -> None:
        """Values for the query's named placeholders (``:last_value``), bound in every statement."""
        ...

    def probe(self, query: str, column: str | None) -> list[str]:
        """Run the query for zero rows: its column names; raises if it fails or lacks ``column``."""
        ...

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        """The Python type(s) the checkpoint column's values have, or None if unknown."""
        ...

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        """How many rows the query returns now (with ``upto=(column, value)``: those up to that value)."""
        ...

    def max_value(self, query: str, column: str) -> Any:
        """The largest checkpoint value the query returns now (in the order resume uses), or None."""
        ...

    def describe(self) -> str:
        """Where the data comes from, for logs and metadata; never contains a secret."""
        ...

    def restrict(self, partition: "Partition") -> None:
        """From now on, every statement of this source (read with or without resume, count with or without ``upto``,
        max_value, probe, key_type) sees only the partition's rows: ``partition.lo <= column < partition.hi`` (``None``:
        unbounded on that side), compared as the source compares that column, the bounds bound as parameters. The first
        statement also refuses a query whose partition column holds NULL (such rows belong to no partition).

        Optional: a source without it cannot run a partitioned pipeline (the runner says so)."""
        ...

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        """The values of ``column`` in the query's rows, in one pass without ORDER BY, in chunks of bounded size, as the
        Python values the source binds back (int, Decimal, date, naive or aware datetime): key-range planning. Refuses
        a column that cannot hold key ranges (text, floating point) and NULL values. Optional, as ``restrict``."""
        ...


def rows_to_batch(rows: Sequence[tuple[Any, ...]], names: list[str], types: list[pa.DataType | None]) -> pa.RecordBatch:
    """Build a record batch column by column (one Python pass per column, not per cell dict)."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = []
    for name, values, t in zip(names, columns, types, strict=True):
        if t is not None and pa.types.is_string(t):
            values = tuple(v if v is None or isinstance(v, str) else str(v) for v in values)
        if t is not None and pa.types.is_integer(t):
            no_reals(name, values)
        arrays.append(pa.array(values, type=t))
    return pa.RecordBatch.from_arrays(arrays, names=names)


def no_reals(name: str, values: Sequence[Any]) -> None:
    """Raise ArrowInvalid for a real among the values of an integer column: Arrow would cut 5.5 to 5 without a word
    (SQLite keeps each value in its own type, so a column typed INTEGER by its first rows can hold one later)."""
    if float in set(map(type, values)):
        real = next(v for v in values if type(v) is float)
        raise pa.ArrowInvalid(f"column {name!r} holds the real {real!r}, but integers in the rows that fixed its type")


def key_index(names: list[str], column: str, where: str) -> int:
    from conduit_dagster.engine.errors import SourceError

    try:
        return names.index(column)
    except ValueError:
        raise SourceError(
            f"{where}: checkpoint_column {column!r} is not a column of the query's result "
            f"(columns: {', '.join(names)}); fix checkpoint_column or select the column"
        ) from None


# --- partitions: the bounds of a partition as a column compares them ------------------------------------------------

# What a partition column holds, as the SQL sources tell it from the column's type:
# "int", "decimal", "date", "timestamp" (without time zone: wall-clock times), "timestamptz" (instants).
PARTITION_KINDS = ("int", "decimal", "date", "timestamp", "timestamptz")
KEY_RANGE_TYPES = "key ranges need an integer, decimal, date or timestamp column; use time windows or another column"


def partition_where(source: str, partition: "Partition") -> str:
    return f"pipeline {partition.pipeline!r} ({partition.describe()}, source {source!r})"


def partition_column_error(source: str, column: str, names: list[str]) -> SourceError:
    return SourceError(
        f"source {source!r}: partition column {column!r} is not a column of the query's result "
        f"(columns: {', '.join(names)}); fix `partitions: column` or select the column"
    )


Restriction = tuple[str, dict[str, Any]]  # a partition's condition on one query text, and that condition's parameters


def restricted_text(text: str, restrictions: dict[str, Restriction], restriction: Callable[[str], Restriction]) -> str:
    """The query ``text`` wrapped so that it returns only the partition's rows: ``SELECT * FROM (<text>) AS
    conduit_part WHERE <condition>``. The condition is made once a query text by ``restriction`` (which looks at the
    column's type and refuses NULLs) and kept in ``restrictions``, whose parameters every statement then binds."""
    found = restrictions.get(text)
    if found is None:
        found = restriction(text)
        restrictions[text] = found
    return f"SELECT * FROM (\n{text}\n) AS conduit_part\nWHERE {found[0]}"


def bound_condition(ref: str, n: int, lo: Any, hi: Any, bound: Callable[[str], str], param: Callable[[Any], Any]) -> Restriction:
    """``lo <= ref AND ref < hi`` in SQL, a side left out where its bound is None (``ref IS NOT NULL`` when both are),
    the bounds bound as parameters ``conduit_lo_<n>`` and ``conduit_hi_<n>`` (``n`` keeps the conditions of one
    source's queries apart); ``bound`` makes a placeholder compare as the column does (a CAST), ``param`` a bound
    as the driver takes it."""
    params: dict[str, Any] = {}
    conditions = []
    for op, name, value in ((">=", f"conduit_lo_{n}", lo), ("<", f"conduit_hi_{n}", hi)):
        if value is not None:
            conditions.append(f"{ref} {op} {bound(f'%({name})s')}")
            params[name] = param(value)
    return " AND ".join(conditions) or f"{ref} IS NOT NULL", params


def partition_null_error(source: str, partition: "Partition") -> SourceError:
    c = partition.column
    return SourceError(
        f"{partition_where(source, partition)}: partition column {c!r} holds NULL in some rows of the query; such rows "
        f"belong to no partition and would never be loaded, so nothing was read. Filter them out in the query (WHERE {c} "
        f"IS NOT NULL), COALESCE the column (COALESCE({c}, <a value>) AS {c}), or partition on another column"
    )


def partition_type_error(source: str, partition: "Partition", type_name: str, fix: str | None = None) -> SourceError:
    c = partition.column
    if partition.timezone is not None:
        why = "time windows need a date or timestamp column"
        fix = fix or f"select it as one in the query (e.g. CAST({c} AS DATE) AS {c}), or use key ranges (`ranges: N`)"
    else:
        why = "key ranges need an integer, decimal, date or timestamp column"
        fix = fix or "use time windows or another column"
    return SourceError(f"{partition_where(source, partition)}: partition column {c!r} has type {type_name}; {why}: {fix}")


def key_range_type_error(source: str, column: str, type_name: str) -> SourceError:
    return SourceError(f"source {source!r}: partition column {column!r} has type {type_name}; {KEY_RANGE_TYPES}")


def scan_null_error(source: str, column: str) -> SourceError:
    return SourceError(
        f"source {source!r}: partition column {column!r} holds NULL in some rows of the query, which no key range can "
        f"hold; filter them out in the query (WHERE {column} IS NOT NULL), COALESCE the column, or partition on another "
        "column"
    )


def _in_zone(value: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """``value`` in ``zone`` (as it is when already there: a wall-clock time that does not exist stays as written)."""
    if getattr(value.tzinfo, "key", None) == zone.key:
        return value
    return value.astimezone(zone)


def _window_bound(source: str, partition: "Partition", value: Any, kind: str) -> Any:
    """A time window's bound (an aware datetime) as a ``kind`` column compares it."""
    assert partition.timezone is not None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise SourceError(f"{partition_where(source, partition)}: a time window's bound {value!r} is not an aware datetime")
    if kind == "timestamptz":
        return value  # the instant
    local = _in_zone(value, ZoneInfo(partition.timezone)).replace(tzinfo=None, fold=0)
    if kind == "timestamp":
        return local  # wall-clock time in the partition's zone, as a timestamp without time zone holds it
    if kind == "date":
        if local.time() != dt.time(0):
            c = partition.column
            raise SourceError(
                f"{partition_where(source, partition)}: partition column {c!r} holds dates, but the window starts or "
                f"ends at {local.isoformat(sep=' ')} ({partition.timezone}), not at midnight, and a date cannot be split "
                f"there. Use `every: day`, `week` or `month`, or select the column as a timestamp in the query (e.g. "
                f"CAST({c} AS TIMESTAMP) AS {c})"
            )
        return local.date()
    raise partition_type_error(source, partition, {"int": "integer", "decimal": "decimal"}.get(kind, kind))


def _range_bound(source: str, partition: "Partition", value: Any, kind: str) -> Any:
    """A key range's bound (a value of the plan) checked against the column's kind: a plan made when the column had
    another type would compare across types."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "decimal": isinstance(value, Decimal | int) and not isinstance(value, bool),
        "date": isinstance(value, dt.date) and not isinstance(value, dt.datetime),
        "timestamp": isinstance(value, dt.datetime) and value.tzinfo is None,
        "timestamptz": isinstance(value, dt.datetime) and value.tzinfo is not None,
    }.get(kind, False)
    if not ok:
        raise SourceError(
            f"{partition_where(source, partition)}: the key-range plan's boundary {value!r} ({type(value).__name__}) does "
            f"not fit partition column {partition.column!r}, which now holds {kind} values (the column changed type since "
            f"the plan was made); re-plan with `conduit plan --pipeline {partition.pipeline}`"
        )
    if kind == "decimal":
        value = Decimal(value)
        if not value.is_finite():
            raise SourceError(f"{partition_where(source, partition)}: the key-range boundary {value} is not a number")
    return value


def partition_bounds(source: str, partition: "Partition", kind: str) -> tuple[Any, Any]:
    """(lo, hi) of ``partition`` as a column of ``kind`` (one of ``PARTITION_KINDS``) compares them; None stays None.

    Time windows (aware datetimes) become dates on a date column (the window must start at midnight), wall-clock
    times in the partition's zone on a timestamp without time zone, and stay instants on a zoned timestamp. Key
    ranges' values are checked to be of the column's kind.

    Wall-clock bounds never go backwards, so adjacent windows still split the rows exactly across a DST change: when
    clocks go back, the first of the two hours sharing a wall-clock time is empty ([01:00, 01:00)) and the second
    holds that hour's rows; when they go forward, the window over the gap covers it ([01:00, 03:00))."""
    if kind not in PARTITION_KINDS:
        raise partition_type_error(source, partition, kind)
    convert = _window_bound if partition.timezone is not None else _range_bound
    lo = None if partition.lo is None else convert(source, partition, partition.lo, kind)
    hi = None if partition.hi is None else convert(source, partition, partition.hi, kind)
    return lo, hi


# --- ISO text dates (SQLite): compared as the text they are written in -----------------------------------------------

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}([ T])\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
# GLOB patterns of the same forms: one per separator (a datetime's first 16 characters, then anything but a zone)
ISO_DATE_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"


def iso_text_form(value: str) -> str | None:
    """How a text date is written: 'date' (YYYY-MM-DD), 'datetime ' or 'datetimeT' (YYYY-MM-DD HH:MM[:SS[.fff]], by
    separator), or None (any other text, including one with a time zone)."""
    if _ISO_DATE.match(value):
        return "date"
    m = _ISO_DATETIME.match(value)
    return f"datetime{m.group(1)}" if m else None


def iso_text_glob(form: str) -> tuple[str, int]:
    """A GLOB every value of ``form`` matches (with the values' shortest length): used to find a value written
    otherwise."""
    if form == "date":
        return ISO_DATE_GLOB, 10
    sep = form.removeprefix("datetime")
    return f"{ISO_DATE_GLOB}{sep}[0-9][0-9]:[0-9][0-9]*", 16


def iso_text_bounds(source: str, partition: "Partition", form: str) -> tuple[str | None, str | None]:
    """A time window's bounds as text that compares, byte by byte, as the values of ``form`` do.

    Dates: 'YYYY-MM-DD' (the window must start at midnight). Date and time: the wall-clock time in the partition's
    zone to the minute, 'YYYY-MM-DD HH:MM' (with the values' separator): a window starts on a whole hour, so a value
    written to the minute, second or fraction of a second sorts on the same side of that text as its time does of the
    bound ('2024-01-01 00:00' <= '2024-01-01 00:00:00.5', '2023-12-31 23:59:59.9' < '2024-01-01 00:00')."""
    kind = "date" if form == "date" else "timestamp"
    lo, hi = partition_bounds(source, partition, kind)

    def text(value: Any) -> str | None:
        if value is None:
            return None
        if form == "date":
            return str(value.isoformat())
        if value.second or value.microsecond:
            raise SourceError(f"{partition_where(source, partition)}: a window bound {value} is not on a whole minute")
        return str(value.strftime(f"%Y-%m-%d{form.removeprefix('datetime')}%H:%M"))

    return text(lo), text(hi)


# --- key-range values as Arrow ----------------------------------------------------------------------------------------

DECIMAL_SCAN = pa.decimal256(76, 38)
_QUANTUM = Decimal(1).scaleb(-38)


def decimal_scan_array(values: Sequence[Any], source: str, column: str) -> pa.Array:
    """Decimals of no declared precision as one Arrow type every chunk shares (``DECIMAL_SCAN``): a key-range boundary
    needs only to be a value of the column's type, so digits past the 38th decimal place are cut (floor)."""
    out = []
    for v in values:
        if v is not None:
            if not isinstance(v, Decimal):
                v = Decimal(v)
            if not v.is_finite():
                raise SourceError(
                    f"source {source!r}: partition column {column!r} holds {v}, which no key range can hold; filter it "
                    "out in the query"
                )
            if v.as_tuple().exponent < -38:  # type: ignore[operator]
                # in a context holding every digit the result keeps (the default one holds 28: a numeric of more
                # significant digits would raise InvalidOperation); one too wide for 76 digits is refused below
                with localcontext() as ctx:
                    ctx.prec = max(v.adjusted(), 0) + 40
                    v = v.quantize(_QUANTUM, rounding=ROUND_FLOOR)
        out.append(v)
    try:
        return pa.array(out, type=DECIMAL_SCAN)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SourceError(
            f"source {source!r}: partition column {column!r} holds a decimal with more than 38 digits before the point "
            f"({exc}); CAST it to a narrower type in the query, or partition on another column"
        ) from None
