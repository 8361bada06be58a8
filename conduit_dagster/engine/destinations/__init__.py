"""Destinations: one module per backend behind the small ``Destination`` protocol; each registers its
``DestinationBackend``."""

from typing import Any

from conduit_dagster.engine.destinations.base import Destination, Resumption


def open_destination(spec: Any, pipeline: str, *, accumulate: bool = False) -> Destination:
    """A writer of ``pipeline``'s output at the destination ``spec``. ``accumulate``: each run adds to the
    output (an incremental load) instead of replacing it."""
    from conduit_dagster.engine.backends import destination_backend

    return destination_backend(spec).open(spec, pipeline, accumulate=accumulate)


__all__ = ["Destination", "Resumption", "open_destination"]
