"""Partitioned pipelines: one pipeline split into partitions that load, resume and publish on their own.

``partitions:`` in a resource splits its rows by a partition column, in one of two ways:

- time windows (``every: hour | day | week | month`` from ``start`` to ``end``, in ``timezone``): the partition
  keys are Dagster's default keys for the window (``2024-01-31``; ``2024-01-31-13:00`` for hours); a window is the
  half-open interval ``[start, end)``.
- key ranges (``ranges: N``): ``N`` ranges of about equal row counts, keyed ``r00`` .. ``r<N-1>``. Their
  boundaries (the *plan*) are computed once from the source, by one pass over the partition column without a sort,
  and stored through the checkpoint store, so a key always means the same rows; ``conduit plan`` re-plans (refused
  while a partition holds a checkpoint). The first range is open below and the last open above: rows whose key is
  past every boundary when a partition runs still belong to the last range.

Every partition is a *unit*: its own checkpoint and lock (``<pipeline>.<key>`` in the store), its own source filter
``lo <= column < hi`` (values bound as parameters, compared as the source compares keys; ``None`` is unbounded)
and its own output, published atomically and replacing only that partition's earlier output.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from conduit_dagster.engine.errors import CheckpointError, SourceError, SpecError

if TYPE_CHECKING:
    import pyarrow as pa

    from conduit_dagster.engine.checkpoint import CheckpointStore
    from conduit_dagster.engine.sources.base import Source
    from conduit_dagster.engine.spec import ResourceSpec, _Entry

EVERY = ("hour", "day", "week", "month")
# Dagster's default partition key format for each window length (TimeWindowPartitionsDefinition defaults).
KEY_FORMATS = {"hour": "%Y-%m-%d-%H:%M", "day": "%Y-%m-%d", "week": "%Y-%m-%d", "month": "%Y-%m-%d"}
BACKFILL = ("multi_run", "single_run")
MAX_RANGES = 1000
PLAN_SAMPLE = 1_000_000  # values kept (uniformly) from the partition column to place the boundaries
PARTITION_KEYS = {"column", "every", "start", "end", "timezone", "ranges", "backfill", "max_partitions_per_run"}
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:+\-]*$")


@dataclass(frozen=True)
class TimeWindows:
    column: str
    every: str  # hour | day | week | month
    start: dt.datetime  # aware, in timezone; the first window starts at the first tick at or after it
    end: dt.datetime | None  # aware; windows end at or before it (None: up to the last complete window)
    timezone: str = "UTC"

    @property
    def fmt(self) -> str:
        return KEY_FORMATS[self.every]


@dataclass(frozen=True)
class KeyRanges:
    column: str
    ranges: int


@dataclass(frozen=True)
class PartitionsSpec:
    scheme: TimeWindows | KeyRanges
    backfill: str = "multi_run"  # multi_run: at most max_partitions_per_run partitions a run; single_run: one run
    max_partitions_per_run: int = 1

    @property
    def column(self) -> str:
        return self.scheme.column


@dataclass(frozen=True)
class Partition:
    """One partition of a pipeline: the rows with ``lo <= column < hi`` (``None``: unbounded on that side).

    Time windows give aware datetimes in ``timezone``; a source compares them with a date column as dates
    (windows of a day or longer start at midnight), with a timestamp without time zone as wall-clock times in
    ``timezone``, and with a zoned timestamp as instants. Key ranges give values of the column's own type."""

    pipeline: str
    key: str
    column: str
    lo: Any
    hi: Any
    timezone: str | None = None

    @property
    def unit(self) -> str:
        return unit_name(self.pipeline, self.key)

    def describe(self) -> str:
        lo = "-inf" if self.lo is None else _show(self.lo)
        hi = "+inf" if self.hi is None else _show(self.hi)
        return f"partition {self.key!r} ({self.column} in [{lo}, {hi}))"

    def fingerprint(self) -> str:
        """What selects the partition's rows, for the checkpoint's query fingerprint."""
        from conduit_dagster.engine.checkpoint import encode_value

        lo = None if self.lo is None else encode_value(self.lo)
        hi = None if self.hi is None else encode_value(self.hi)
        return json.dumps({"key": self.key, "column": self.column, "lo": lo, "hi": hi}, sort_keys=True)


def _show(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.date | dt.datetime) else str(value)


def unit_name(pipeline: str, key: str) -> str:
    """The name a partition's checkpoint and lock have in the store (pipeline names hold no '.')."""
    return f"{pipeline}.{key}"


def split_unit(name: str) -> tuple[str, str | None]:
    """(pipeline, partition key or None) of a checkpoint name."""
    pipeline, dot, key = name.partition(".")
    return (pipeline, key) if dot else (pipeline, None)


# --- ingest.yml -----------------------------------------------------------------------------------------------


def _zone(e: _Entry, name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise e.fail("timezone", f"unknown time zone {name!r}; use an IANA name such as UTC or Europe/Berlin") from None


def _instant(e: _Entry, key: str, text: str, zone: ZoneInfo) -> dt.datetime:
    for fmt in ("%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=zone)
        except ValueError:
            continue
    raise e.fail(key, f'expected a date or date and time, got {text!r}; write e.g. `{key}: "2024-01-01"`')


def parse_partitions(parent: _Entry, checkpoint_column: str | None, incremental: bool) -> PartitionsSpec | None:
    """The ``partitions:`` mapping of a resource entry (None when absent)."""
    from conduit_dagster.engine.spec import _Entry

    raw = parent.raw("partitions")
    if raw is None:
        return None
    line = getattr(parent.data, "lines", {}).get("partitions", parent.line)
    if not isinstance(raw, dict):
        raise parent.fail(
            "partitions",
            'expected a mapping: `partitions: {column: created_at, every: day, start: "2024-01-01"}` '
            "or `partitions: {column: id, ranges: 16}`",
        )
    e = _Entry(parent.file, raw, f"{parent.path}.partitions", getattr(raw, "line", line))
    e.finish(PARTITION_KEYS)
    if incremental:
        raise parent.fail(
            "partitions",
            "a partitioned pipeline cannot also be an incremental load (incremental_column / :last_value): each "
            "partition is reloaded whole when it is rematerialized; remove one of them",
        )
    if not checkpoint_column:
        raise parent.fail(
            "partitions",
            "a partitioned pipeline needs `checkpoint_column:` (it orders and resumes the rows inside each partition)",
        )
    column = e.text("column", required=True, env=False)
    assert column is not None
    backfill = e.choice("backfill", BACKFILL, default="multi_run")
    per_run = e.integer("max_partitions_per_run", default=1, minimum=1, maximum=10_000)
    if backfill == "single_run" and "max_partitions_per_run" in e.data:
        raise e.fail(
            "max_partitions_per_run",
            "a single_run backfill loads every selected partition in one run; remove max_partitions_per_run, "
            "or use `backfill: multi_run` to cap the partitions a run loads",
        )
    has_time = [k for k in ("every", "start", "end", "timezone") if k in e.data]
    if "ranges" in e.data:
        if has_time:
            raise e.fail(has_time[0], "`ranges:` splits by key; time windows use every/start/end/timezone: give one form")
        n = e.integer("ranges", default=2, minimum=1, maximum=MAX_RANGES)
        return PartitionsSpec(KeyRanges(column, n), backfill, per_run)
    if "every" not in e.data:
        raise e.fail(None, 'give either time windows (`every: day`, `start: "2024-01-01"`) or key ranges (`ranges: 16`)')
    every = e.choice("every", EVERY)
    zone_name = e.text("timezone", default="UTC", env=False) or "UTC"
    zone = _zone(e, zone_name)
    start_text = e.text("start", required=True, env=False)
    assert start_text is not None
    start = _instant(e, "start", start_text, zone)
    end_text = e.text("end", env=False)
    end = _instant(e, "end", end_text, zone) if end_text is not None else None
    windows = TimeWindows(column, every, start, end, zone_name)
    if end is not None and not list(_window_starts(windows, end)):
        raise e.fail("end", f"no whole {every} fits between start {start_text} and end {end_text}; move end later")
    return PartitionsSpec(windows, backfill, per_run)


# --- time windows ---------------------------------------------------------------------------------------------


def _tick_at_or_after(tw: TimeWindows, t: dt.datetime) -> dt.datetime:
    zone = ZoneInfo(tw.timezone)
    local = t.astimezone(zone)
    if tw.every == "hour":
        base = local.replace(minute=0, second=0, microsecond=0)
    elif tw.every == "day":
        base = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif tw.every == "week":  # Dagster's weeks start on Sunday
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        base = day - dt.timedelta(days=(day.weekday() + 1) % 7)
    else:
        base = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    base = base.replace(tzinfo=zone)
    return base if base >= local else _next(tw, base)


def _next(tw: TimeWindows, start: dt.datetime) -> dt.datetime:
    zone = ZoneInfo(tw.timezone)
    if tw.every == "hour":  # elapsed hours (a day with a DST change has 23 or 25 of them)
        return (start.astimezone(dt.UTC) + dt.timedelta(hours=1)).astimezone(zone)
    wall = start.replace(tzinfo=None)
    if tw.every == "day":
        wall += dt.timedelta(days=1)
    elif tw.every == "week":
        wall += dt.timedelta(days=7)
    else:
        wall = wall.replace(year=wall.year + 1, month=1) if wall.month == 12 else wall.replace(month=wall.month + 1)
    return wall.replace(tzinfo=zone)


def _window_starts(tw: TimeWindows, limit: dt.datetime) -> Iterator[dt.datetime]:
    """Starts of the windows that end at or before ``limit``."""
    start = _tick_at_or_after(tw, tw.start)
    while True:
        end = _next(tw, start)
        if end > limit:
            return
        yield start
        start = end


def time_partition_keys(tw: TimeWindows, now: dt.datetime | None = None) -> list[str]:
    """Every window's key, oldest first: up to ``end``, or without one up to the last complete window."""
    limit = tw.end if tw.end is not None else (now or dt.datetime.now(dt.UTC))
    return [window_key(tw, s) for s in _window_starts(tw, limit)]


def time_window(tw: TimeWindows, key: str) -> tuple[dt.datetime, dt.datetime]:
    """The window ``[start, end)`` of a partition key."""
    zone = ZoneInfo(tw.timezone)
    try:
        start = dt.datetime.strptime(key, tw.fmt).replace(tzinfo=zone)
    except ValueError:
        try:  # the second of two equal wall-clock hours (see window_key)
            start = dt.datetime.fromtimestamp(dt.datetime.strptime(key, tw.fmt + "%z").timestamp(), tz=zone)
        except ValueError:
            raise SpecError(f"{key!r} is not a partition key of a {tw.every} window (keys look like {_example(tw)})") from None
    if window_key(tw, start) != key or _tick_at_or_after(tw, start) != start or start < _tick_at_or_after(tw, tw.start):
        raise SpecError(f"{key!r} is not the key of a {tw.every} window of this pipeline (keys look like {_example(tw)})")
    end = _next(tw, start)
    if tw.end is not None and end > tw.end:
        raise SpecError(f"{key!r} is past the pipeline's partitions end ({tw.end.isoformat()})")
    return start, end


def _example(tw: TimeWindows) -> str:
    return window_key(tw, _tick_at_or_after(tw, tw.start))


def window_key(tw: TimeWindows, start: dt.datetime) -> str:
    """Dagster's key of the window starting at ``start``. When clocks go back, an hour's wall-clock time repeats:
    the second window of that hour gets its UTC offset appended (``2024-11-03-01:00-0500``), as Dagster's
    ``dst_safe_strftime`` does; without it two windows would share one key (one checkpoint, one output)."""
    if tw.every == "hour" and start.fold == 1 and start.utcoffset() != start.replace(fold=0).utcoffset():
        return start.strftime(tw.fmt + "%z")
    return start.strftime(tw.fmt)


# --- key ranges -----------------------------------------------------------------------------------------------


def range_keys(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"r{i:0{width}d}" for i in range(n)]


@dataclass(frozen=True)
class RangePlan:
    """The boundaries of a pipeline's key ranges: range i is ``[boundaries[i-1], boundaries[i])``, the first open
    below and the last open above. Equal neighbouring boundaries make an empty range (a column with few values)."""

    pipeline: str
    column: str
    ranges: int
    boundaries: tuple[Any, ...]
    query_sha256: str
    source_id: str
    planned_at: str
    rows_seen: int

    def to_json(self) -> str:
        from conduit_dagster.engine.checkpoint import encode_value

        return json.dumps(
            {
                "version": 1,
                "pipeline": self.pipeline,
                "column": self.column,
                "ranges": self.ranges,
                "boundaries": [encode_value(b) for b in self.boundaries],
                "query_sha256": self.query_sha256,
                "source_id": self.source_id,
                "planned_at": self.planned_at,
                "rows_seen": self.rows_seen,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, *, where: str) -> RangePlan:
        from conduit_dagster.engine.checkpoint import decode_value

        try:
            doc = json.loads(text)
            plan = cls(
                pipeline=str(doc["pipeline"]),
                column=str(doc["column"]),
                ranges=int(doc["ranges"]),
                boundaries=tuple(decode_value(b) for b in doc["boundaries"]),
                query_sha256=str(doc["query_sha256"]),
                source_id=str(doc["source_id"]),
                planned_at=str(doc["planned_at"]),
                rows_seen=int(doc.get("rows_seen", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: the key-range plan is not readable ({exc}); re-plan with `conduit plan`") from None
        if len(plan.boundaries) != plan.ranges - 1:
            raise CheckpointError(f"{where}: the key-range plan has {len(plan.boundaries)} boundaries for {plan.ranges} ranges")
        return plan

    def partition(self, key: str) -> Partition:
        keys = range_keys(self.ranges)
        try:
            i = keys.index(key)
        except ValueError:
            raise SpecError(
                f"{key!r} is not a partition of pipeline {self.pipeline!r} (its keys are {keys[0]} .. {keys[-1]})"
            ) from None
        lo = self.boundaries[i - 1] if i > 0 else None
        hi = self.boundaries[i] if i < len(self.boundaries) else None
        return Partition(self.pipeline, key, self.column, lo, hi)


def plan_fingerprint(resource: ResourceSpec) -> str:
    from conduit_dagster.engine.runner import query_fingerprint

    assert resource.partitions is not None
    return hashlib.sha256(
        f"{query_fingerprint(resource)}\n--conduit partitions={resource.partitions.column}".encode()
    ).hexdigest()


def boundaries_from(values: Iterable[pa.Array], n: int, *, sample: int = PLAN_SAMPLE, seed: int = 0) -> tuple[list[Any], int]:
    """``n - 1`` boundaries splitting ``values`` (one pass, any order) into ``n`` ranges of about equal counts.

    Keeps a uniform sample of at most about ``2 * sample`` values (each value kept with one probability, halved
    whenever the sample grows past that), sorts only the sample, and takes its quantiles. Returns (boundaries,
    values seen)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = random.Random(seed)

    def coin(size: int, p: float) -> pa.Array:
        return pc.less(pc.random(size, initializer=rng.getrandbits(63)), p)

    keep_p = 1.0
    kept: list[pa.Array] = []
    kept_n = 0
    seen = 0
    for chunk in values:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise SourceError(
                "the partition column holds NULL values, which no key range can hold; filter them out in "
                "the query, or partition on a column without NULLs"
            )
        seen += len(chunk)
        if keep_p < 1.0:
            chunk = chunk.filter(coin(len(chunk), keep_p))
        kept.append(chunk)
        kept_n += len(chunk)
        while kept_n > 2 * sample:
            merged = pa.concat_arrays(kept)
            kept = [merged.filter(coin(len(merged), 0.5))]
            kept_n = len(kept[0])
            keep_p /= 2
    if seen == 0 or n <= 1:
        return [], seen
    merged = pa.concat_arrays(kept)
    ordered = merged.take(pc.sort_indices(merged))
    m = len(ordered)
    return [ordered[min(m - 1, (i * m) // n)].as_py() for i in range(1, n)], seen


def compute_plan(resource: ResourceSpec, src: Source) -> RangePlan:
    """Plan a pipeline's key ranges from the source now: one pass over the partition column, no sort."""
    from conduit_dagster.engine.checkpoint import _now
    from conduit_dagster.engine.runner import source_identity

    assert resource.partitions is not None and isinstance(resource.partitions.scheme, KeyRanges)
    n = resource.partitions.scheme.ranges
    column = resource.partitions.column
    scan = getattr(src, "scan_column", None)
    if scan is None:
        raise SourceError(f"pipeline {resource.name!r}: its source cannot plan key ranges; use time windows")
    boundaries, seen = boundaries_from(scan(resource.query, column), n)
    if seen == 0:
        # an empty source: every row that comes later belongs to the last range (open above)
        boundaries = []
    if len(boundaries) < n - 1:
        if boundaries:
            boundaries += [boundaries[-1]] * (n - 1 - len(boundaries))
        else:
            boundaries = []
    plan_boundaries: tuple[Any, ...] = tuple(boundaries)
    if not plan_boundaries and n > 1:
        raise SourceError(
            f"pipeline {resource.name!r}: the source returned no rows, so key ranges cannot be planned yet; run again "
            "when it has rows, or use time windows"
        )
    return RangePlan(
        resource.name, column, n, plan_boundaries, plan_fingerprint(resource), source_identity(resource), _now(), seen
    )


def load_plan(resource: ResourceSpec, store: CheckpointStore) -> RangePlan | None:
    """The stored plan, checked against the pipeline as ingest.yml declares it now."""
    text = store.load_plan(resource.name)
    if text is None:
        return None
    where = store.describe(resource.name).removesuffix(".json") + ".plan.json"
    plan = RangePlan.from_json(text, where=where)
    assert resource.partitions is not None and isinstance(resource.partitions.scheme, KeyRanges)
    n = resource.partitions.scheme.ranges
    if plan.ranges != n or plan.column != resource.partitions.column or plan.query_sha256 != plan_fingerprint(resource):
        raise CheckpointError(
            f"{where}: the key ranges were planned for another query, column or number of ranges ({plan.ranges} ranges on "
            f"{plan.column!r}); the partition keys would change meaning. Re-plan with `conduit plan --pipeline "
            f"{resource.name}` once no partition holds a checkpoint"
        )
    return plan


def ensure_plan(resource: ResourceSpec, store: CheckpointStore, open_src: Callable[[], Source]) -> RangePlan:
    """The stored plan, or a new one computed and stored once (under the pipeline's lock: concurrent partition runs
    agree on one plan)."""
    plan = load_plan(resource, store)
    if plan is not None:
        return plan
    with store.lock(resource.name, None):
        plan = load_plan(resource, store)
        if plan is not None:
            return plan
        return _plan_and_save(resource, store, open_src)


def _plan_and_save(resource: ResourceSpec, store: CheckpointStore, open_src: Callable[[], Source]) -> RangePlan:
    """Plan from a source opened for it, and store the plan (the caller holds the pipeline's lock)."""
    src = open_src()
    try:
        plan = compute_plan(resource, src)
    finally:
        src.close()
    store.save_plan(resource.name, plan.to_json())
    return plan


def replan(resource: ResourceSpec, store: CheckpointStore, open_src: Callable[[], Source]) -> tuple[RangePlan | None, RangePlan]:
    """Compute and store a new plan. Returns (old, new).

    Refused while a partition holds a checkpoint or is being run: it holds the pipeline's lock and every partition's
    lock while it plans, and a partition run checks under its own lock that the plan it resolved is still the stored
    one (``check_plan``), so no run loads a range of a plan that was replaced meanwhile."""
    keys = (
        range_keys(resource.partitions.scheme.ranges)
        if resource.partitions and isinstance(resource.partitions.scheme, KeyRanges)
        else []
    )
    with store.lock(resource.name, None), ExitStack() as held:
        for key in keys:
            held.enter_context(store.lock(unit_name(resource.name, key), None))
        busy = [n for n in store.list() if split_unit(n)[0] == resource.name and split_unit(n)[1] is not None]
        if busy:
            raise CheckpointError(
                f"pipeline {resource.name!r}: partitions {', '.join(split_unit(n)[1] or '' for n in busy)} hold checkpoints "
                "of unfinished runs, planned with the current boundaries; finish them (or clear them with `conduit "
                "checkpoints clear`) before re-planning"
            )
        text = store.load_plan(resource.name)
        try:  # as stored, whatever it was planned for (another number of ranges, another query)
            old = RangePlan.from_json(text, where=resource.name) if text is not None else None
        except CheckpointError:
            old = None
        return old, _plan_and_save(resource, store, open_src)


def check_plan(resource: ResourceSpec, store: CheckpointStore, partition: Partition) -> None:
    """Under the partition's lock: a key range must still be the stored plan's (``conduit plan`` may have replaced the
    plan between the run resolving its key and taking its lock)."""
    if resource.partitions is None or not isinstance(resource.partitions.scheme, KeyRanges):
        return
    plan = load_plan(resource, store)
    current = plan.partition(partition.key) if plan is not None else None
    if current is None or (current.lo, current.hi) != (partition.lo, partition.hi):
        raise CheckpointError(
            f"pipeline {resource.name!r}: the key ranges were re-planned while this run of partition {partition.key} "
            "was starting, so its bounds are no longer the plan's; nothing was read or written. Run the partition again"
        )


def partition_keys(resource: ResourceSpec, now: dt.datetime | None = None) -> list[str]:
    """Every partition key of a partitioned pipeline (no I/O: range keys depend only on their number)."""
    assert resource.partitions is not None
    scheme = resource.partitions.scheme
    if isinstance(scheme, TimeWindows):
        return time_partition_keys(scheme, now)
    return range_keys(scheme.ranges)


def resolve_partition(resource: ResourceSpec, key: str, store: CheckpointStore, open_src: Callable[[], Source]) -> Partition:
    """The partition ``key`` of a partitioned pipeline (planning key ranges first if they have no plan yet)."""
    assert resource.partitions is not None
    if not _KEY_RE.match(key):
        raise SpecError(f"pipeline {resource.name!r}: {key!r} is not a partition key")
    scheme = resource.partitions.scheme
    if isinstance(scheme, TimeWindows):
        lo, hi = time_window(scheme, key)
        return Partition(resource.name, key, scheme.column, lo, hi, scheme.timezone)
    return ensure_plan(resource, store, open_src).partition(key)
