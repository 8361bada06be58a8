"""Backends: one description per source or destination type, registered once, asked by everyone else.

Each backend module (``engine/sources/postgresql.py``, ``engine/destinations/s3.py`` ...) defines, next to its
implementation, a ``SourceBackend`` or ``DestinationBackend``: its ingest.yml keys and their parsing, its factory,
its identity (what a checkpoint is bound to, never a secret), its description and URI, its kinds, and its rules for
the resources that use it. ``spec.py`` hands each entry to its backend's ``parse`` by ``type``; the runner, the
Dagster glue and the CLI call ``source_backend(spec)`` / ``destination_backend(spec)`` and never switch on a type.

Adding a backend: one module that builds its description and calls ``register_source_backend`` (or
``register_destination_backend``) at import, plus its type and module in ``BUILTIN_SOURCES`` (or
``BUILTIN_DESTINATIONS``). A registration is checked when
it is made: a type registered once, a lowercase name, the keys every entry has, and every hook callable.
"""

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.sql import clean_query, uses_last_value

if TYPE_CHECKING:
    from conduit_dagster.engine.destinations.base import Destination
    from conduit_dagster.engine.sources.base import Source
    from conduit_dagster.engine.spec import ResourceSpec, _Entry

# The built-in backends: type -> the module that registers it, in the order ingest.yml errors list the types. A
# module is imported when its type is first asked for, so a run pays only for the drivers it uses (SQLAlchemy,
# PyMySQL, ConnectorX are not imported by a PostgreSQL pipeline).
BUILTIN_SOURCES = {
    "postgresql": "conduit_dagster.engine.sources.postgresql",
    "sqlite": "conduit_dagster.engine.sources.sqlite",
    "file": "conduit_dagster.engine.sources.files",
    "mysql": "conduit_dagster.engine.sources.mysql",
    "sqlalchemy": "conduit_dagster.engine.sources.sqla",
}
BUILTIN_DESTINATIONS = {
    "local": "conduit_dagster.engine.destinations.local",
    "postgresql": "conduit_dagster.engine.destinations.postgresql",
    "mysql": "conduit_dagster.engine.destinations.mysql",
    "s3": "conduit_dagster.engine.destinations.s3",
}
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# --- defaults for a source that runs the resource's SQL query -------------------------------------------------


def sql_selection(resource: "ResourceSpec") -> str:
    """What a checkpoint's rows were selected by: the query as the source runs it."""
    return clean_query(resource.query).strip()


def sql_description(resource: "ResourceSpec") -> str:
    return f"```sql\n{resource.query.strip()}\n```"


def sql_resource_query(e: "_Entry", source: Any, source_name: str) -> str:
    """The resource's ``query:`` (required, shown as written, so no ``${VAR}``)."""
    query = e.text("query", required=True, env=False) or ""
    try:
        clean_query(query)
    except SpecError as exc:
        raise e.fail("query", f"{exc}") from None
    return query


def _no_source_check(e: "_Entry", source: Any, incremental_column: str | None) -> None:
    return None


def _never(spec: Any) -> bool:
    return False


def _always(spec: Any) -> bool:
    return True


@dataclass(frozen=True)
class SourceBackend:
    """A source type. ``spec`` below is the backend's own frozen spec (the value its ``parse`` returns)."""

    type: str
    keys: frozenset[str]  # every key its ingest.yml entry may hold
    parse: Callable[["_Entry", Path, str, bool, str | None], Any]  # (entry, ingest.yml path, name, resume, column)
    open: Callable[[Any], "Source"]  # spec -> a closeable reader
    identity: Callable[[Any], str]  # spec -> what a checkpoint's rows were read from (never a secret)
    kinds: Callable[[Any], set[str]]  # spec -> Dagster kinds
    selection: Callable[["ResourceSpec"], str] = sql_selection  # resource -> what its rows are selected by
    describe: Callable[["ResourceSpec"], str] = sql_description  # resource -> the asset description's body
    resource_query: Callable[["_Entry", Any, str], str] = sql_resource_query  # the resource's query ("" if none)
    check_resource: Callable[["_Entry", Any, str | None], None] = _no_source_check  # (entry, spec, incremental_column)
    uses_s3: Callable[[Any], bool] = _never  # spec -> reads S3 (so the asset asks for the s3 resource)
    # query -> whether it has a :last_value placeholder outside its strings and comments (as its database reads them)
    uses_last_value: Callable[[str], bool] = uses_last_value


@dataclass(frozen=True)
class ResourceUse:
    """How one resource uses a destination: what ``DestinationBackend.check_resource`` rules on."""

    name: str  # the resource
    destination_name: str
    resume: bool
    incremental: bool
    others: tuple[tuple[str, Any], ...]  # (name, destination spec) of the resources declared before it


def _no_destination_check(e: "_Entry", spec: Any, use: ResourceUse) -> None:
    return None


def _no_local_output(spec: Any, pipeline: str) -> tuple[Path, str] | None:
    return None


def _no_leftover(destination_id: str, state: dict[str, Any], pipeline: str) -> list[str] | None:
    return None


@dataclass(frozen=True)
class DestinationBackend:
    """A destination type. ``spec`` below is the backend's own frozen spec (the value its ``parse`` returns)."""

    type: str
    keys: frozenset[str]
    parse: Callable[["_Entry", Path, str], Any]  # (entry, ingest.yml path, name)
    open: Callable[..., "Destination"]  # (spec, pipeline, *, accumulate) -> a writer of pipeline's output
    identity: Callable[[Any, str], str]  # (spec, pipeline) -> where a checkpoint's rows were written (never a secret)
    uri: Callable[[Any, str], str]  # (spec, pipeline) -> dagster/uri of the output (never a secret)
    kinds: Callable[[Any], set[str]]
    check: Callable[[Any], str]  # `conduit validate`: reach it (raise if not); what it writes, for the report
    counts_whole_output: Callable[[Any], bool] = _always  # a full read's row count is the whole output
    check_resource: Callable[["_Entry", Any, ResourceUse], None] = _no_destination_check
    uses_s3: Callable[[Any], bool] = _never
    local_output: Callable[[Any, str], tuple[Path, str] | None] = _no_local_output  # (directory, format) on disk
    # (destination_id, destination state, pipeline) of a checkpoint about to be cleared -> lines telling what it
    # leaves behind that no run will touch again, or None
    leftover: Callable[[str, dict[str, Any], str], list[str] | None] = _no_leftover
    # its ``open`` takes ``partition=`` (a partitions.Partition) and publishes each partition on its own
    partitioned: bool = False


_SOURCES: dict[str, SourceBackend] = {}
_DESTINATIONS: dict[str, DestinationBackend] = {}
_SOURCE_ENTRY_KEYS = frozenset({"name", "type", "resume", "checkpoint_column"})
_DESTINATION_ENTRY_KEYS = frozenset({"name", "type"})


def _check(given: object, kind: type, registry: dict[str, Any], required_keys: frozenset[str]) -> None:
    what = "source" if kind is SourceBackend else "destination"
    if type(given) is not kind:
        raise TypeError(f"register_{what}_backend takes a {kind.__name__}, got {type(given).__name__}")
    backend: Any = given
    if not isinstance(backend.type, str) or not _TYPE_RE.match(backend.type):
        raise ValueError(f"{what} type {backend.type!r} is not a lowercase name (letters, digits, _)")
    if backend.type in registry:
        raise ValueError(f"{what} type {backend.type!r} is already registered")
    if not isinstance(backend.keys, frozenset) or not all(isinstance(k, str) for k in backend.keys):
        raise ValueError(f"{what} type {backend.type!r}: keys must be a frozenset of key names")
    missing = sorted(required_keys - backend.keys)
    if missing:
        raise ValueError(f"{what} type {backend.type!r}: keys lack {', '.join(missing)}, which every {what} entry has")
    for f in fields(backend):
        if f.name not in ("type", "keys", "partitioned") and not callable(getattr(backend, f.name)):
            raise ValueError(f"{what} type {backend.type!r}: {f.name} must be callable, got {getattr(backend, f.name)!r}")


def register_source_backend(backend: SourceBackend) -> SourceBackend:
    _check(backend, SourceBackend, _SOURCES, _SOURCE_ENTRY_KEYS)
    _SOURCES[backend.type] = backend
    return backend


def register_destination_backend(backend: DestinationBackend) -> DestinationBackend:
    _check(backend, DestinationBackend, _DESTINATIONS, _DESTINATION_ENTRY_KEYS)
    _DESTINATIONS[backend.type] = backend
    return backend


def _in_order(registry: dict[str, Any], builtin: dict[str, str]) -> list[str]:
    """The types: the built-in ones in their fixed order, then the others in the order they were registered."""
    return [*builtin, *(kind for kind in registry if kind not in builtin)]


def source_types() -> tuple[str, ...]:
    return tuple(_in_order(_SOURCES, BUILTIN_SOURCES))


def destination_types() -> tuple[str, ...]:
    return tuple(_in_order(_DESTINATIONS, BUILTIN_DESTINATIONS))


def _load(registry: dict[str, Any], builtin: dict[str, str], kind: str) -> None:
    if kind not in registry and kind in builtin:
        importlib.import_module(builtin[kind])
        if kind not in registry:
            raise RuntimeError(f"{builtin[kind]} did not register the backend type {kind!r}")


def destination_backends() -> Iterable[DestinationBackend]:
    """Every destination backend (each built-in module imported)."""
    for kind in BUILTIN_DESTINATIONS:
        _load(_DESTINATIONS, BUILTIN_DESTINATIONS, kind)
    return tuple(_DESTINATIONS[kind] for kind in destination_types())


def _kind(spec_or_type: Any) -> str:
    return spec_or_type if isinstance(spec_or_type, str) else spec_or_type.type


def _find(registry: dict[str, Any], builtin: dict[str, str], what: str, spec_or_type: Any) -> Any:
    kind = _kind(spec_or_type)
    _load(registry, builtin, kind)
    try:
        return registry[kind]
    except KeyError:
        name = getattr(spec_or_type, "name", kind)
        types = _in_order(registry, builtin)
        raise SpecError(f"{what} {name!r}: unknown type {kind!r}; use one of {', '.join(types)}") from None


def source_backend(spec_or_type: Any) -> SourceBackend:
    """The backend of a source spec (or of a type name)."""
    backend: SourceBackend = _find(_SOURCES, BUILTIN_SOURCES, "source", spec_or_type)
    return backend


def destination_backend(spec_or_type: Any) -> DestinationBackend:
    """The backend of a destination spec (or of a type name)."""
    backend: DestinationBackend = _find(_DESTINATIONS, BUILTIN_DESTINATIONS, "destination", spec_or_type)
    return backend
