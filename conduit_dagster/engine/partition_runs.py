"""Which partitions a command runs, and one partition's run: shared by every way a partition is run.

The Dagster asset (``conduit_dagster.assets``), ``conduit run`` and ``python -m conduit_dagster.engine run`` pick
partition keys with ``select_partitions`` (one error text for a partitioned pipeline run without ``--partition``)
and turn a key into its rows with ``resolve``, so the three agree on what a key means.
"""

import datetime as dt
import time
from collections.abc import Callable, Sequence

from conduit_dagster.engine.checkpoint import CheckpointStore
from conduit_dagster.engine.errors import CheckpointError, PipelineBusyError, SpecError
from conduit_dagster.engine.partitions import (
    KeyRanges,
    Partition,
    TimeWindows,
    load_plan,
    partition_keys,
    resolve_partition,
    time_window,
)
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import ResourceSpec

# How long a partition run waits for another run (or `conduit plan`) that is planning the pipeline's key ranges: the
# plan is one pass over the partition column, which takes minutes on a large table.
PLAN_WAIT_S = 3600.0
PLAN_POLL_S = 2.0
_ADVERB = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}


def describe_keys(keys: Sequence[str]) -> str:
    """``16 partitions, r00 .. r15`` (first, last and how many)."""
    if not keys:
        return "no partitions yet"
    if len(keys) == 1:
        return f"1 partition, {keys[0]}"
    return f"{len(keys):,} partitions, {keys[0]} .. {keys[-1]}"


def describe_scheme(resource: ResourceSpec) -> str:
    """How a partitioned pipeline is split, in words (for logs, `conduit validate` and asset descriptions)."""
    assert resource.partitions is not None
    scheme = resource.partitions.scheme
    if isinstance(scheme, KeyRanges):
        return f"{scheme.ranges} key ranges on {scheme.column}"
    end = f" to {scheme.end.isoformat()}" if scheme.end is not None else ""
    return f"{_ADVERB[scheme.every]} windows on {scheme.column} from {scheme.start.isoformat()}{end} ({scheme.timezone})"


def select_partitions(
    resource: ResourceSpec, requested: Sequence[str] | None, all_partitions: bool, *, now: dt.datetime | None = None
) -> list[str] | None:
    """The partition keys a run of ``resource`` loads, in the pipeline's order; None for an unpartitioned pipeline.

    ``requested`` are the ``--partition`` values, ``all_partitions`` is ``--all-partitions``."""
    name = resource.name
    if resource.partitions is None:
        if requested:
            raise SpecError(f"pipeline {name!r} has no partitions: run it without --partition")
        return None
    keys = partition_keys(resource, now)
    if all_partitions:
        if requested:
            raise SpecError("give either --partition KEY or --all-partitions, not both")
        if not keys:
            raise SpecError(f"pipeline {name!r} ({describe_scheme(resource)}) has no complete window yet: nothing to run")
        return keys
    if not requested:
        raise SpecError(
            f"pipeline {name!r} is partitioned ({describe_scheme(resource)}: {describe_keys(keys)}); name the partitions "
            f"to run with --partition KEY (repeatable), e.g. --partition {keys[-1] if keys else 'KEY'}, or run every "
            "one with --all-partitions"
        )
    known = set(keys)
    unknown = [k for k in requested if k not in known]
    if unknown:
        why = ""
        scheme = resource.partitions.scheme
        if isinstance(scheme, TimeWindows):
            for key in unknown:
                try:
                    time_window(scheme, key)
                except SpecError as exc:
                    why = f": {exc}"
                    break
                else:
                    why = f": the window {key} has not ended yet"
                    break
        shown = ", ".join(repr(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise SpecError(
            f"pipeline {name!r}: {shown} {'is' if len(unknown) == 1 else 'are'} not among its partitions "
            f"({describe_keys(keys)}){why}"
        )
    wanted = set(requested)
    return [k for k in keys if k in wanted]


def resolve(
    resource: ResourceSpec,
    key: str,
    store: CheckpointStore,
    *,
    wait_s: float = PLAN_WAIT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Partition:
    """The partition ``key`` of ``resource``; key ranges are planned on first use (one run plans, under the
    pipeline's lock; partition runs started at the same time wait for its plan instead of failing)."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return resolve_partition(resource, key, store, lambda: open_source(resource.source))
        except PipelineBusyError as exc:
            if time.monotonic() >= deadline:
                raise PipelineBusyError(
                    f"pipeline {resource.name!r}: its key ranges are still being planned by another run after "
                    f"{wait_s:.0f} s ({exc}); run partition {key} again when that run has finished"
                ) from None
            if on_wait is not None and not told:
                on_wait(f"waiting for the key-range plan that another run is computing ({exc})")
                told = True
            time.sleep(PLAN_POLL_S)


def existing_partition(resource: ResourceSpec, key: str, store: CheckpointStore) -> Partition:
    """The partition ``key`` as it was loaded, never planning: key ranges need their stored plan."""
    assert resource.partitions is not None
    if isinstance(resource.partitions.scheme, KeyRanges) and load_plan(resource, store) is None:
        raise CheckpointError(
            f"pipeline {resource.name!r} has no key-range plan in {store.location}: no partition of it was loaded "
            "with this checkpoint store"
        )
    return resolve_partition(resource, key, store, lambda: open_source(resource.source))
