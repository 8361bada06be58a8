"""Destinations: one module per backend behind the small ``Destination`` protocol, plus a registry."""

from collections.abc import Callable
from typing import Any

from conduit_dagster.engine.destinations.base import Destination, Resumption
from conduit_dagster.engine.errors import SpecError

_REGISTRY: dict[str, Callable[..., Destination]] = {}


def register_destination(kind: str, factory: Callable[..., Destination]) -> None:
    if kind in _REGISTRY:
        raise ValueError(f"destination type {kind!r} is already registered")
    _REGISTRY[kind] = factory


def open_destination(spec: Any, pipeline: str, *, accumulate: bool = False) -> Destination:
    """A writer of ``pipeline``'s output at the destination ``spec``. ``accumulate``: each run adds to the
    output (an incremental load) instead of replacing it."""
    try:
        factory = _REGISTRY[spec.type]
    except KeyError:
        raise SpecError(f"destination {spec.name!r}: unknown type {spec.type!r}; use one of {', '.join(_REGISTRY)}") from None
    return factory(spec, pipeline, accumulate=accumulate)


def _register_builtins() -> None:
    from conduit_dagster.engine.destinations.local import LocalDestination
    from conduit_dagster.engine.destinations.postgresql import PostgresDestination
    from conduit_dagster.engine.destinations.s3 import S3Destination

    register_destination("local", LocalDestination)
    register_destination("postgresql", PostgresDestination)
    register_destination("s3", S3Destination)


_register_builtins()

__all__ = ["Destination", "Resumption", "open_destination", "register_destination"]
