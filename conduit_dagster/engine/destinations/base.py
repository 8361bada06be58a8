"""The protocol every destination implements.

The runner drives a destination through one output *generation*:

    start(None)                 a fresh run: open a new, invisible generation
    start(state, committed)     a resumed run: reopen the generation named in the checkpoint, and either
                                drop any part at index >= committed (written, never checkpointed: it is
                                read and written again), or, where a committed batch is final (rows
                                appended or merged into a table), report those batches in
                                ``Resumption.committed``: the runner adopts them as if their checkpoints
                                had been saved and reads on from the last one's key
    write(index, table, key_column, last_key)
                                durable when it returns; writing an index again replaces it
    publish(batches)            make the generation (parts 0..batches-1) the visible output, atomically,
                                replacing the old

``state`` is a small JSON-able dict the checkpoint carries for the destination.

A destination whose batches are final sets ``rolls_forward = True``: its ``write`` then also takes
``batch_state`` (a JSON-able dict: what the checkpoint of that batch needs besides its index, rows and last
key, e.g. an incremental run's boundary), which it stores with the batch in the batch's own transaction
and hands back in ``CommittedBatch.state``.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa


@dataclass(frozen=True)
class CommittedBatch:
    """A batch the destination committed past the checkpoint (its checkpoint was never saved)."""

    index: int
    rows: int
    last_key: Any
    state: dict[str, Any]


@dataclass(frozen=True)
class Resumption:
    state: dict[str, Any]
    already_published: bool = False
    committed: tuple[CommittedBatch, ...] = ()  # batches index >= committed that are final, in index order


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
