"""Checkpoint-column values in flight: validated, and searched for safe batch boundaries.

A source hands over the checkpoint column of each chunk either as an Arrow array (when Arrow's
ordering of that type is the source's ordering: integers, floats, decimals, dates, timestamps,
byte-wise text and binary) or as a list of Python values. Arrow arrays are checked and searched
with vectorised kernels, so the fast path never builds a Python object per row; lists are
checked value by value.
"""

from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from conduit_dagster.engine.errors import OrderingError

Keys: TypeAlias = list[Any] | pa.Array  # noqa: UP040 - Python 3.11


def _null_error(column: str, prev: Any) -> OrderingError:
    return OrderingError(
        f"checkpoint column {column!r} holds a NULL after value {prev!r}; NULLs cannot be ordered "
        f"for resume: filter them out (WHERE {column} IS NOT NULL) or COALESCE them in the query"
    )


def _nan_error(column: str, prev: Any) -> OrderingError:
    return OrderingError(
        f"checkpoint column {column!r} holds NaN after value {prev!r}; NaN cannot be ordered for resume: "
        f"filter it out (WHERE {column} <> 'NaN') or pick another column"
    )


def _shown(value: Any, limit: int = 100) -> str:
    """A key value for an error message: its repr, cut in the middle when long (keys of 1 KB make a message unreadable)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(text)} characters)"


def _backwards_error(column: str, prev: Any, value: Any) -> OrderingError:
    return OrderingError(
        f"checkpoint column {column!r} went backwards: {_shown(value)} came after {_shown(prev)}; the column must be "
        "sortable by the source in the same order Python compares it (cast it, or pick another column). Long values "
        "that share a prefix do this on a source that sorts text on a prefix only (MySQL's max_sort_length, 1024 "
        "bytes by default): order by a shorter or an integer column"
    )


def _at_checkpoint_error(column: str, value: Any) -> OrderingError:
    return OrderingError(
        f"checkpoint column {column!r}: the resumed read returned value {value!r}, equal to the checkpoint's last value "
        f"{value!r}; a resume reads only rows past it (WHERE {column} > {value!r}), and every row at that value was "
        "loaded already, so loading it would repeat rows. The source compares the column differently from the value "
        "the checkpoint stores (a collation, a rounded or cast type): make the column compare exactly (cast it in "
        "the query), or pick another checkpoint_column. Nothing more was written"
    )


def _check_list(keys: list[Any], previous: Any, column: str, strict_first: bool) -> None:
    if strict_first and keys and previous is not None and _same(keys[0], previous):
        raise _at_checkpoint_error(column, keys[0])
    prev = previous
    for value in keys:
        if value is None:
            raise _null_error(column, prev)
        if value != value:  # NaN: equal to nothing, so no resume point can be past it exactly
            raise _nan_error(column, prev)
        try:
            backwards = prev is not None and value < prev
        except (TypeError, ArithmeticError):
            raise OrderingError(
                f"checkpoint column {column!r} mixes types ({prev!r} then {value!r}); CAST it to one type in the query"
            ) from None
        if backwards:
            raise _backwards_error(column, prev, value)
        prev = value


def _same(value: Any, previous: Any) -> bool:
    try:
        return bool(value == previous)
    except (TypeError, ArithmeticError):
        return False  # the type mismatch is reported by the ordering check


def _first(mask: pa.Array) -> int:
    return int(pc.index(mask, True).as_py())


def _check_arrow(keys: pa.Array, previous: Any, column: str, strict_first: bool) -> None:
    if keys.null_count:
        i = _first(pc.is_null(keys))
        raise _null_error(column, keys[i - 1].as_py() if i else previous)
    if pa.types.is_floating(keys.type) and pc.any(pc.is_nan(keys)).as_py():
        i = _first(pc.is_nan(keys))
        raise _nan_error(column, keys[i - 1].as_py() if i else previous)
    first = keys[0].as_py()
    if previous is not None and first < previous:
        raise _backwards_error(column, previous, first)
    if strict_first and previous is not None and _same(first, previous):
        raise _at_checkpoint_error(column, first)
    if len(keys) > 1:
        back = pc.less(keys.slice(1), keys.slice(0, len(keys) - 1))
        if pc.any(back).as_py():
            i = _first(back)
            raise _backwards_error(column, keys[i].as_py(), keys[i + 1].as_py())


def check_keys(keys: Keys, previous: Any, column: str, *, strict_first: bool = False) -> None:
    """Every value present and orderable, and none smaller than the one before it; with ``strict_first`` (the
    first chunk of a resumed read, ``previous`` being the checkpoint's value) the first one also not equal to it."""
    if isinstance(keys, pa.Array):
        _check_arrow(keys, previous, column, strict_first)
    else:
        _check_list(keys, previous, column, strict_first)


class KeyBuffer:
    """The checkpoint values of the rows waiting to be cut into a batch."""

    def __init__(self) -> None:
        self._parts: list[Keys] = []
        self._joined: Keys | None = None

    def extend(self, keys: Keys) -> None:
        self._parts.append(keys)
        self._joined = None

    def _all(self) -> Keys:
        if self._joined is not None:
            return self._joined
        joined: Keys
        if all(isinstance(p, pa.Array) for p in self._parts):
            arrays = [p for p in self._parts if isinstance(p, pa.Array)]
            joined = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)
        else:
            values: list[Any] = []
            for p in self._parts:
                values.extend(p.to_pylist() if isinstance(p, pa.Array) else p)
            joined = values
        self._parts = [joined]
        self._joined = joined
        return joined

    def value(self, i: int) -> Any:
        keys = self._all()
        return keys[i].as_py() if isinstance(keys, pa.Array) else keys[i]

    def end_of_tie(self, start: int, count: int) -> int:
        """The first index >= start whose value differs from the one before it, or ``count``."""
        keys = self._all()
        if start >= count:
            return count
        if isinstance(keys, pa.Array):
            differs = pc.not_equal(keys.slice(start, count - start), keys.slice(start - 1, count - start))
            i = _first(differs)
            return count if i < 0 else start + i
        i = start
        while i < count and keys[i] == keys[i - 1]:
            i += 1
        return i

    def drop(self, n: int) -> None:
        keys = self._all()
        rest = keys.slice(n) if isinstance(keys, pa.Array) else keys[n:]
        self._parts = [rest]
        self._joined = rest
