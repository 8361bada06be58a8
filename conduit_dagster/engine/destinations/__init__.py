"""Destinations: one module per backend behind the small ``Destination`` protocol; each registers its
``DestinationBackend``."""

from typing import Any

from conduit_dagster.engine.destinations.base import Destination, Resumption


def open_destination(spec: Any, pipeline: str, *, accumulate: bool = False, partition: Any = None) -> Destination:
    """A writer of ``pipeline``'s output at the destination ``spec``. ``accumulate``: each run adds to the
    output (an incremental load) instead of replacing it. ``partition`` (a ``partitions.Partition``): the writer
    of that partition's output only: its bookkeeping is the partition's own, and publishing replaces that
    partition's rows and nothing else."""
    from conduit_dagster.engine.backends import destination_backend
    from conduit_dagster.engine.errors import SpecError

    backend = destination_backend(spec)
    if partition is None:
        return backend.open(spec, pipeline, accumulate=accumulate)
    if not backend.partitioned:
        raise SpecError(f"destination {spec.name!r} (type {spec.type}) cannot hold a partitioned pipeline's output")
    return backend.open(spec, pipeline, accumulate=accumulate, partition=partition)


__all__ = ["Destination", "Resumption", "open_destination"]
