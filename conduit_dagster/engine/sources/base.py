"""The protocol every source implements, and helpers shared by the SQL sources."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa


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


def rows_to_batch(rows: Sequence[tuple[Any, ...]], names: list[str], types: list[pa.DataType | None]) -> pa.RecordBatch:
    """Build a record batch column by column (one Python pass per column, not per cell dict)."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = []
    for values, t in zip(columns, types, strict=True):
        if t is not None and pa.types.is_string(t):
            values = tuple(v if v is None or isinstance(v, str) else str(v) for v in values)
        arrays.append(pa.array(values, type=t))
    return pa.RecordBatch.from_arrays(arrays, names=names)


def key_index(names: list[str], column: str, where: str) -> int:
    from conduit_dagster.engine.errors import SourceError

    try:
        return names.index(column)
    except ValueError:
        raise SourceError(
            f"{where}: checkpoint_column {column!r} is not a column of the query's result "
            f"(columns: {', '.join(names)}); fix checkpoint_column or select the column"
        ) from None
