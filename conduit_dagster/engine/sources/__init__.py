"""Sources: one module per backend behind the small ``Source`` protocol, plus a registry."""

from collections.abc import Callable
from typing import Any

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.sources.base import Chunk, Source

_REGISTRY: dict[str, Callable[[Any], Source]] = {}


def register_source(kind: str, factory: Callable[[Any], Source]) -> None:
    if kind in _REGISTRY:
        raise ValueError(f"source type {kind!r} is already registered")
    _REGISTRY[kind] = factory


def open_source(spec: Any) -> Source:
    """A closeable reader for a SourceSpec."""
    try:
        factory = _REGISTRY[spec.type]
    except KeyError:
        raise SpecError(f"source {spec.name!r}: unknown type {spec.type!r}; use one of {', '.join(_REGISTRY)}") from None
    return factory(spec)


def _register_builtins() -> None:
    from conduit_dagster.engine.sources.files import FileSource
    from conduit_dagster.engine.sources.postgresql import PostgresSource
    from conduit_dagster.engine.sources.sqlite import SqliteSource

    register_source("postgresql", PostgresSource)
    register_source("sqlite", SqliteSource)
    register_source("file", FileSource)


_register_builtins()

__all__ = ["Chunk", "Source", "open_source", "register_source"]
