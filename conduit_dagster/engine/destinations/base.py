"""The protocol every destination implements.

The runner drives a destination through one output *generation*:

    start(None)                 a fresh run: open a new, invisible generation
    start(state, committed)     a resumed run: reopen the generation named in the checkpoint,
                                dropping any part at index >= committed (written, never checkpointed)
    write(index, table, key_column, last_key)
                                durable when it returns; writing an index again replaces it (or, where
                                a committed batch cannot be replaced, adds only its rows past the
                                recorded last key)
    publish(batches)            make the generation (parts 0..batches-1) the visible output, atomically,
                                replacing the old

``state`` is a small JSON-able dict the checkpoint carries for the destination.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa


@dataclass(frozen=True)
class Resumption:
    state: dict[str, Any]
    already_published: bool = False


class Destination(Protocol):
    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption: ...

    def write(self, index: int, table: pa.Table, key_column: str | None = None, last_key: Any = None) -> None: ...

    def publish(self, batches: int | None = None) -> None:
        """``batches``: how many parts the run committed (0..batches-1), where the destination can check them."""
        ...

    def describe(self) -> str:
        """Where the output is visible (a path or URI), for logs and metadata."""
        ...

    def close(self) -> None: ...

    def count(self) -> int | None:
        """Rows in the visible output (None where there is none yet)."""
        ...
