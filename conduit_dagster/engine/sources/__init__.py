"""Sources: one module per backend behind the small ``Source`` protocol; each registers its ``SourceBackend``."""

from typing import Any

from conduit_dagster.engine.sources.base import Chunk, Source


def open_source(spec: Any) -> Source:
    """A closeable reader for a SourceSpec."""
    from conduit_dagster.engine.backends import source_backend

    return source_backend(spec).open(spec)


__all__ = ["Chunk", "Source", "open_source"]
