"""The batch loop: read ordered batches, write each durably, then checkpoint it; yield events.

Exactness rests on four rules:

1. Batches are cut only between *different* checkpoint values: a run of equal values (ties)
   always lands whole in one batch, so ``WHERE col > last_value`` on resume can skip no row and
   repeat none.
2. A checkpoint is saved only after its batch is durable at the destination.
3. Part names come from the batch's index, so a batch replayed after a crash between its write
   and its checkpoint overwrites itself; parts beyond the checkpoint are dropped on resume. Where a
   committed batch cannot be taken back (rows appended or merged into a table), the destination
   reports it on resume instead, and the run adopts it as if its checkpoint had been saved.
4. A run's output becomes visible only when the run finishes, as a whole, replacing the previous
   output; the checkpoint is deleted after that.
"""

import datetime as dt
import hashlib
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import pyarrow as pa

from conduit_dagster.engine.backends import destination_backend, source_backend
from conduit_dagster.engine.checkpoint import (
    CLEAR_HINT,
    Checkpoint,
    CheckpointStore,
    IncrementalState,
    decode_value,
    encode_value,
)
from conduit_dagster.engine.destinations import Destination, open_destination
from conduit_dagster.engine.errors import CheckpointError, SourceError, SpecError
from conduit_dagster.engine.keys import KeyBuffer, check_keys
from conduit_dagster.engine.partitions import Partition, check_plan
from conduit_dagster.engine.sources import Chunk, Source, open_source
from conduit_dagster.engine.spec import ResourceSpec

# A tie group larger than this many batches is reported: it has to sit in memory whole.
TIE_WARNING_FACTOR = 10


@dataclass(frozen=True)
class RunStarted:
    pipeline: str
    resumed: bool
    resumed_from: Any
    records_before: int
    source: str
    destination: str


@dataclass(frozen=True)
class BatchCommitted:
    index: int
    rows: int
    rows_this_run: int
    records_processed: int
    last_value: Any
    elapsed_s: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class RunWarning:
    message: str


@dataclass(frozen=True)
class RunFinished:
    pipeline: str
    resumed: bool
    resumed_from: Any
    last_value: Any
    rows_this_run: int
    records_processed: int
    batches: int
    duration_s: float
    destination: str
    checkpoint_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.duration_s if self.duration_s > 0 else 0.0


Event = RunStarted | BatchCommitted | RunWarning | RunFinished


def query_fingerprint(resource: ResourceSpec, partition: Partition | None = None) -> str:
    """What the checkpoint's rows were selected by: the query, or for a file source its files and format (and the
    partition's bounds)."""
    selection = source_backend(resource.source).selection(resource)
    text = f"{selection}\n--conduit checkpoint_column={resource.checkpoint_column}"
    if partition is not None:
        text += f"\n--conduit partition={partition.fingerprint()}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_identity(resource: ResourceSpec) -> str:
    """What the checkpoint's rows were read from (never a secret)."""
    return source_backend(resource.source).identity(resource.source)


def destination_identity(resource: ResourceSpec) -> str:
    """Where the checkpoint's rows were written (never a secret)."""
    return destination_backend(resource.destination).identity(resource.destination, resource.name)


def row_hash(row: dict[str, Any], columns: tuple[str, ...] = ()) -> str:
    """A short, stable digest of one row's values (of ``columns`` only, when given)."""
    parts = []
    for name, value in row.items():
        if columns and name not in columns:
            continue
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        parts.append(repr(value))
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


class _Incremental:
    """One incremental run: the ``:last_value`` it binds, the boundary rows already loaded (equal to that value),
    and the state it leaves behind.

    The query selects ``incremental_column >= :last_value``. Rows equal to the stored value were partly loaded by
    the previous run: the stored boundary is the multiset of their hashes (of every column, or of
    ``incremental_key``), and as many rows per hash are left out as it counts; the rest (late arrivals with the
    same value, even exact copies) are loaded. The checkpoint carries the bound and both boundaries, so a crashed
    incremental run resumes with the same bound and the state advances once, at the end.
    """

    def __init__(self, resource: ResourceSpec, store: CheckpointStore, bound: Any, loaded: list[str]) -> None:
        self.resource, self.store, self.bound, self.loaded = resource, store, bound, sorted(loaded)
        self.key = resource.incremental_key

    @classmethod
    def open(cls, resource: ResourceSpec, store: CheckpointStore, checkpoint: Checkpoint | None) -> "_Incremental | None":
        if resource.incremental_column is None:
            return None
        if checkpoint is not None and checkpoint.incremental:
            doc = checkpoint.incremental
            return cls(resource, store, decode_value(doc["bound"]), list(doc.get("loaded", [])))
        state = store.load_state(resource.name)
        if state is None:
            return cls(resource, store, resource.initial_value, [])
        fingerprint = query_fingerprint(resource)
        if state.incremental_column != resource.incremental_column or state.query_sha256 != fingerprint:
            raise CheckpointError(
                f"{store.describe(resource.name)}: the incremental state was stored for another query or "
                f"incremental_column ({state.incremental_column!r}); using it would skip or repeat rows. Restore them, "
                f"or start the incremental load over from initial_value with "
                f"`{CLEAR_HINT.format(name=resource.name)} --state`"
            )
        return cls(resource, store, state.last_value, list(state.boundary))

    def document(self, boundary: list[str]) -> dict[str, Any]:
        return {"bound": encode_value(self.bound), "loaded": self.loaded, "boundary": boundary}

    def drop_loaded(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Leave out the rows equal to the bound that the previous run loaded (they come first: rows are ordered)."""
        remaining = Counter(self.loaded)
        filtering = bool(remaining)
        for chunk in chunks:
            if filtering:
                keys = chunk.keys.to_pylist() if isinstance(chunk.keys, pa.Array) else list(chunk.keys or [])
                keep = []
                for k, row in zip(keys, chunk.data.to_pylist(), strict=True):
                    h = row_hash(row, self.key) if k == self.bound else None
                    if h is not None and remaining[h] > 0:
                        remaining[h] -= 1
                        keep.append(False)
                    else:
                        keep.append(True)
                if keys and keys[-1] != self.bound:
                    filtering = False
                if not all(keep):
                    mask = pa.array(keep)
                    kept_keys = (
                        chunk.keys.filter(mask)
                        if isinstance(chunk.keys, pa.Array)
                        else [k for k, f in zip(keys, keep, strict=True) if f]
                    )
                    chunk = Chunk(chunk.data.filter(mask), kept_keys)
            if chunk.data.num_rows:
                yield chunk

    def boundary_of(self, table: pa.Table, batch_last: Any) -> list[str]:
        """Hashes of the batch's rows equal to its last value (ties are never split: they are all here)."""
        column = self.resource.incremental_column
        assert column is not None
        keys = table.column(column).to_pylist()
        if isinstance(batch_last, Decimal):
            keys = [None if k is None else Decimal(k) for k in keys]
        start = len(keys)
        while start > 0 and keys[start - 1] == batch_last:
            start -= 1
        hashes = [row_hash(r, self.key) for r in table.slice(start).to_pylist()]
        if batch_last == self.bound:  # still at the stored value: the earlier runs' boundary rows count too
            hashes = self.loaded + hashes
        return sorted(hashes)

    def advance(self, last_value: Any, boundary: list[str], run_id: str | None) -> None:
        column = self.resource.incremental_column
        assert column is not None
        if last_value is None:
            return  # nothing new: the state stays
        state = IncrementalState(
            self.resource.name, column, last_value, tuple(boundary), run_id=run_id, query_sha256=query_fingerprint(self.resource)
        )
        self.store.save_state(state)


def _check_resume_value(src: Source, resource: ResourceSpec, after: Any, where: str) -> None:
    """A checkpoint value must have the column's type: compared across types, ``>`` would skip or repeat rows
    silently (in SQLite every integer sorts before every text), or a hand-edited value would change the query."""
    assert resource.checkpoint_column is not None
    expected = src.key_type(resource.query, resource.checkpoint_column)
    if expected is None:
        return
    ok = isinstance(after, expected) and not isinstance(after, bool)
    if isinstance(after, dt.datetime) and dt.datetime not in expected:
        ok = False  # a datetime is also a date, but not a valid date checkpoint
    if ok:
        return
    hint = CLEAR_HINT.format(name=resource.name)
    raise CheckpointError(
        f"{where}: the checkpoint's last value {after!r} is a {type(after).__name__}, but column "
        f"{resource.checkpoint_column!r} now holds {' or '.join(t.__name__ for t in expected)} values; the checkpoint "
        f"was edited or the column changed type. Nothing was read or written; start over with `{hint}`"
    )


def refuse_duplicate_columns(chunks: Iterator[Chunk], where: str) -> Iterator[Chunk]:
    """Stop before the first batch if two result columns share a name: Parquet readers reject such a file, a
    PostgreSQL table cannot have them, and by-name lookups (checkpoint column, primary key) would be ambiguous."""
    for i, chunk in enumerate(chunks):
        if i == 0:
            counts = Counter(chunk.data.schema.names)
            duplicated = [name for name, n in counts.items() if n > 1]
            if duplicated:
                names = ", ".join(repr(n) for n in duplicated)
                raise SourceError(
                    f"{where}: the rows have more than one column named {names} (columns: "
                    f"{', '.join(chunk.data.schema.names)}); give each a distinct name: with AS in a query (e.g. "
                    "SELECT a.id AS a_id, b.id AS b_id ...), in the header of a file source's files. Nothing was written"
                )
        yield chunk


def cut_batches(chunks: Iterator[Chunk], batch_size: int, column: str | None, after: Any) -> Iterator[tuple[pa.Table, Any]]:
    """Regroup source chunks into batches of about ``batch_size`` rows that never split a tie.

    Yields (table, last checkpoint value). A batch grows past ``batch_size`` only to keep a run of
    equal checkpoint values together. ``after`` is the checkpoint's value when resuming: every row at it
    was loaded already, so the read must start strictly past it.
    """
    pending: list[pa.RecordBatch] = []
    keys = KeyBuffer()
    count = 0
    scanned = 0  # how far a tie at the cut point has been followed already
    last_seen = after
    first = True
    for chunk in chunks:
        n = chunk.data.num_rows
        if n == 0:
            continue
        if column is not None:
            assert chunk.keys is not None
            check_keys(chunk.keys, last_seen, column, strict_first=first and after is not None)
            first = False
            last = chunk.keys[-1]
            last_seen = last.as_py() if isinstance(last, pa.Scalar) else last
            keys.extend(chunk.keys)
        pending.append(chunk.data)
        count += n
        while count >= batch_size:
            cut = max(batch_size, scanned)
            if column is not None:
                cut = keys.end_of_tie(cut, count)
                if cut == count:
                    scanned = cut
                    break  # the tie may continue in the next chunk
            scanned = 0
            table = pa.Table.from_batches(pending)
            head, tail = table.slice(0, cut), table.slice(cut)
            yield head, (keys.value(cut - 1) if column is not None else None)
            pending = tail.to_batches()
            if column is not None:
                keys.drop(cut)
            count -= cut
    if count:
        yield pa.Table.from_batches(pending), (keys.value(count - 1) if column is not None else None)


def open_partitioned_source(resource: ResourceSpec, partition: Partition | None) -> Source:
    """The resource's source, restricted to ``partition``'s rows when it has one."""
    src = open_source(resource.source)
    if partition is None:
        return src
    try:
        restrict_source(src, resource, partition)
    except BaseException:
        src.close()
        raise
    return src


def restrict_source(src: Source, resource: ResourceSpec, partition: Partition) -> None:
    restrict = getattr(src, "restrict", None)
    if restrict is None:
        raise SourceError(
            f"pipeline {resource.name!r}: source {resource.source.name!r} (type {resource.source.type}) cannot read "
            "one partition's rows; partitions need a SQL source (postgresql, mysql, sqlite, sqlalchemy)"
        )
    restrict(partition)


def run_pipeline(
    resource: ResourceSpec,
    store: CheckpointStore,
    *,
    run_id: str | None = None,
    source: Source | None = None,
    destination: Destination | None = None,
    partition: Partition | None = None,
) -> Iterator[Event]:
    """Run one pipeline (or one partition of a partitioned pipeline) to the end, resuming from its checkpoint if it
    has one. A partition is a pipeline of its own for the store (checkpoint and lock named ``<pipeline>.<key>``), the
    source (only its rows) and the destination (its own output, replacing only that partition's)."""
    if (partition is None) != (resource.partitions is None):
        raise SpecError(
            f"pipeline {resource.name!r} is partitioned: name the partition to run"
            if partition is None
            else f"pipeline {resource.name!r} has no partitions: run it without a partition key"
        )
    unit = partition.unit if partition is not None else resource.name
    with store.lock(unit, run_id):
        if partition is not None:
            check_plan(resource, store, partition)
        dest = destination or open_destination(
            resource.destination, resource.name, accumulate=resource.incremental_column is not None, partition=partition
        )
        try:
            if source is not None and partition is not None:
                restrict_source(source, resource, partition)
            yield from _run_locked(resource, store, run_id=run_id, source=source, dest=dest, partition=partition)
        finally:
            if destination is None:
                dest.close()


def _run_locked(
    resource: ResourceSpec,
    store: CheckpointStore,
    *,
    run_id: str | None,
    source: Source | None,
    dest: Destination,
    partition: Partition | None = None,
) -> Iterator[Event]:
    started = time.monotonic()
    name = partition.unit if partition is not None else resource.name
    column = resource.checkpoint_column
    set_fence = getattr(dest, "set_fence", None)
    if callable(set_fence):  # a destination that cleans up after others checks first that this run still owns the pipeline
        set_fence(lambda: store.assert_owner(name))
    set_resumable = getattr(dest, "set_resumable", None)
    if callable(set_resumable):  # without a checkpoint, what a failed run leaves can never be resumed
        set_resumable(resource.resume)
    rolls_forward = bool(getattr(dest, "rolls_forward", False))
    fingerprint = query_fingerprint(resource, partition)
    checkpoint = store.load(name) if resource.resume else None
    if checkpoint is not None:
        where = store.describe(name)
        hint = CLEAR_HINT.format(name=name)
        if checkpoint.checkpoint_column != column:
            raise CheckpointError(
                f"{where}: checkpoint was written for checkpoint_column {checkpoint.checkpoint_column!r}, "
                f"but ingest.yml now says {column!r}; resuming would lose or repeat rows. Start over with `{hint}`"
            )
        if checkpoint.query_sha256 != fingerprint:
            raise CheckpointError(
                f"{where}: checkpoint was written for a different query of pipeline {name!r}; resuming would "
                f"mix two queries' rows. Restore the query, or start over with `{hint}`"
            )
        for what, then, now in (
            ("source", checkpoint.source_id, source_identity(resource)),
            ("destination", checkpoint.destination_id, destination_identity(resource)),
        ):
            if then != now:
                raise CheckpointError(
                    f"{where}: checkpoint was written for {what} {then!r}, but ingest.yml now says {now!r}; resuming "
                    f"would mix two {what}s' rows. Restore the {what}, or start over with `{hint}`"
                )

    src_id, dest_id = source_identity(resource), destination_identity(resource)
    incremental = _Incremental.open(resource, store, checkpoint)

    def checkpoint_at(last: Any, records: int, batches: int, boundary: list[str]) -> Checkpoint:
        """The checkpoint after ``batches`` committed batches, the last ending at ``last``."""
        assert column is not None
        return Checkpoint(
            pipeline=name,
            checkpoint_column=column,
            last_value=last,
            records_processed=records,
            batches_committed=batches,
            run_id=run_id,
            query_sha256=fingerprint,
            source_id=src_id,
            destination_id=dest_id,
            destination=resumption.state,
            incremental=incremental.document(boundary) if incremental else {},
        )

    store.assert_owner(name)  # starting a destination may clean up: only the pipeline's owner does
    if checkpoint is not None:
        resumption = dest.start(checkpoint.destination, checkpoint.batches_committed)
    else:
        resumption = dest.start(None)
        if resource.resume:
            # A checkpoint before the first batch: it names the output generation, so a crash after the first
            # commit resumes that generation (where the batch is recorded) instead of starting a second one.
            assert column is not None
            store.save(checkpoint_at(None, 0, 0, []))
    resumed = checkpoint is not None
    after = checkpoint.last_value if checkpoint else None
    index = checkpoint.batches_committed if checkpoint else 0
    records = checkpoint.records_processed if checkpoint else 0
    boundary: list[str] = list(checkpoint.incremental.get("boundary", [])) if checkpoint else []
    if checkpoint is not None and resumption.committed:
        # Batches the destination committed after the last checkpoint are final: adopt them as if their
        # checkpoints had been saved, and read on past them (reading their range again could only repeat rows).
        assert column is not None
        for batch in resumption.committed:
            if batch.index != index or batch.last_key is None:
                raise CheckpointError(
                    f"{store.describe(name)}: the destination {dest.describe()} reports batch {batch.index} "
                    f"(last value {batch.last_key!r}) committed after the checkpoint's batch {index - 1}, so the run "
                    f"cannot tell which rows it holds; start over with `{CLEAR_HINT.format(name=name)}`"
                )
            if incremental and not isinstance(batch.state.get("boundary"), list):
                # Recorded by a conduit version that kept no boundary with the batch: adopted without it, the rows
                # equal to its last value would be loaded again by the next incremental run.
                raise CheckpointError(
                    f"{store.describe(name)}: batch {batch.index} was committed to {dest.describe()} by an older conduit "
                    "version, which did not record the incremental boundary this resume needs; nothing was read or "
                    "written. Finish this run with the version that started it, then upgrade"
                )
            after, index, records = batch.last_key, index + 1, records + batch.rows
            if incremental:
                boundary = list(batch.state["boundary"])
        store.save(checkpoint_at(after, records, index, boundary))
    src = source or (None if resumption.already_published else open_partitioned_source(resource, partition))
    if src is not None and incremental:
        src.bind({"last_value": incremental.bound})
    if src is not None and checkpoint is not None and after is not None and column is not None:
        try:
            _check_resume_value(src, resource, after, store.describe(name))
        except BaseException:
            if source is None:
                src.close()
            raise
    yield RunStarted(name, resumed, after, records, src.describe() if src else "", dest.describe())

    rows_this_run = 0
    last_value = after
    checkpoint_s = 0.0

    def commit(index: int, table: pa.Table, batch_last: Any, records: int, batch_boundary: list[str]) -> float:
        """Write one batch durably, then checkpoint it; returns the seconds the checkpoint took."""
        store.assert_owner(name)  # a run that lost the pipeline (its lease taken over) writes nothing more
        if rolls_forward:  # stored with the batch: what its checkpoint needs if a crash loses the checkpoint
            state = {"boundary": batch_boundary} if incremental else {}
            cast(Any, dest).write(index, table, column, batch_last, batch_state=state)
        else:
            dest.write(index, table, column, batch_last)
        if not resource.resume:
            return 0.0
        assert column is not None
        t0 = time.monotonic()
        store.save(checkpoint_at(batch_last, records, index + 1, batch_boundary))
        return time.monotonic() - t0

    # Batches are committed (write, then checkpoint) one at a time, in order, on a worker thread, while
    # this thread reads and cuts the next batch: reading overlaps writing, the commit order is unchanged,
    # and at most one batch waits in memory.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conduit-commit")
    inflight: tuple[Future[float], int, int, Any] | None = None
    chunks: Iterator[Chunk] | None = None
    try:
        if src is not None and not resumption.already_published:
            chunks = src.read(resource.query, column, after, resume=after is not None, fetch_size=resource.batch_size)
            stream = refuse_duplicate_columns(chunks, f"pipeline {name!r} (source {src.describe()})")
            stream = incremental.drop_loaded(stream) if incremental else stream
            for table, batch_last in cut_batches(stream, resource.batch_size, column, after):
                if table.num_rows > TIE_WARNING_FACTOR * resource.batch_size:
                    yield RunWarning(
                        f"batch {index} holds {table.num_rows} rows sharing checkpoint value {batch_last!r}; "
                        "a column with fewer repeats keeps batches (and memory) near batch_size"
                    )
                if inflight is not None:
                    done, inflight = inflight, None
                    checkpoint_s += done[0].result()
                    yield BatchCommitted(done[1], done[2], rows_this_run, records, last_value, time.monotonic() - started)
                rows_this_run += table.num_rows
                records += table.num_rows
                last_value = batch_last
                if incremental:
                    boundary = incremental.boundary_of(table, batch_last)
                future = pool.submit(commit, index, table, batch_last, records, boundary)
                inflight = (future, index, table.num_rows, batch_last)
                index += 1
            if inflight is not None:
                done, inflight = inflight, None
                checkpoint_s += done[0].result()
                yield BatchCommitted(done[1], done[2], rows_this_run, records, last_value, time.monotonic() - started)
            store.assert_owner(name)
            dest.publish(index)
    except BaseException as failure:
        if inflight is not None:  # the read failed or the caller stopped: let the commit in progress end first
            wait([inflight[0]])
            commit_error = inflight[0].exception()
            if commit_error is not None and not isinstance(failure, GeneratorExit):
                failure.add_note(f"the commit of batch {inflight[1]} failed too: {commit_error!r}")
        raise
    finally:
        pool.shutdown(wait=True)
        if chunks is not None:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stops the source's stream (a COPY child or thread) now, not when it is collected
        if src is not None and source is None:
            src.close()
    if incremental:  # advanced once, after the data is published and before the checkpoint goes
        incremental.advance(last_value, boundary, run_id)
    if resource.resume:
        store.delete(name)
    yield RunFinished(
        pipeline=name,
        resumed=resumed,
        resumed_from=after,
        last_value=last_value,
        rows_this_run=rows_this_run,
        records_processed=records,
        batches=index,
        duration_s=time.monotonic() - started,
        destination=dest.describe(),
        checkpoint_s=checkpoint_s,
    )
