"""ingest.yml -> frozen IngestSpec / SourceSpec / DestinationSpec / ResourceSpec.

The file is validated once, here. Every error names the file, the line, the key path and the
fix; no secret is ever echoed back. ``${VAR}`` and ``${VAR:-default}`` are substituted inside
scalar values after YAML parsing, so an environment value can never change the document's
structure; inside a url they are percent-encoded, so they cannot change the URL's either. Keys
whose text is shown or becomes SQL (query, description, names, columns, initial_value) refuse
``${VAR}``. Unquoted scalars keep the text written (YAML 1.1 would read ``012345`` as 5349).

This module reads the document, its top-level sections and the resources; each ``sources:`` and
``destinations:`` entry is parsed by the backend its ``type`` names (``engine/backends.py``), which owns its
keys, their errors and its rules for the resources that use it. The helpers below ``building the spec`` are the
pieces several backends share (paths, S3 connection keys, buckets, prefixes, column lists).
"""

import importlib
import os
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.partitions import PartitionsSpec, parse_partitions

if TYPE_CHECKING:  # each backend's spec, importable from here too (see __getattr__)
    from conduit_dagster.engine.destinations.local import LocalDestinationSpec as LocalDestinationSpec
    from conduit_dagster.engine.destinations.postgresql import PostgresDestinationSpec as PostgresDestinationSpec
    from conduit_dagster.engine.destinations.s3 import S3DestinationSpec as S3DestinationSpec
    from conduit_dagster.engine.pg import PostgresConnectionSpec as PostgresConnectionSpec
    from conduit_dagster.engine.sources.files import FileSourceSpec as FileSourceSpec
    from conduit_dagster.engine.sources.postgresql import PostgresSourceSpec as PostgresSourceSpec
    from conduit_dagster.engine.sources.sqlite import SqliteSourceSpec as SqliteSourceSpec

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_BATCH_SIZE = 10_000
INGEST_FILE_ENV = "CONDUIT_INGEST_FILE"
WRITE_MODES = ("replace", "append", "merge")
FORMATS = ("parquet", "csv", "jsonl")
FORMAT_KINDS = {"parquet": "parquet", "csv": "csv", "jsonl": "json"}  # a format's Dagster kind


class Secret:
    """A string that never shows itself in repr, str, logs or error text."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class S3ConnectionSpec:
    """How to reach S3 or an S3-compatible store. Unset credentials come from the usual AWS chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, instance roles); an unset endpoint_url
    from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None


# Each backend's spec lives in its backend's module; these names stay importable from here (read on first use, so
# that reading this module never imports a backend, and a backend module can import this one).
_BACKEND_SPECS = {
    "PostgresConnectionSpec": "conduit_dagster.engine.pg",
    "PostgresSourceSpec": "conduit_dagster.engine.sources.postgresql",
    "SqliteSourceSpec": "conduit_dagster.engine.sources.sqlite",
    "FileSourceSpec": "conduit_dagster.engine.sources.files",
    "LocalDestinationSpec": "conduit_dagster.engine.destinations.local",
    "PostgresDestinationSpec": "conduit_dagster.engine.destinations.postgresql",
    "S3DestinationSpec": "conduit_dagster.engine.destinations.s3",
}


def __getattr__(name: str) -> type:
    module = _BACKEND_SPECS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found: type = getattr(importlib.import_module(module), name)
    return found


class SourceSpec(Protocol):
    """What every source spec has; each backend's own frozen dataclass adds its keys (PostgresSourceSpec ...)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def resume(self) -> bool: ...

    @property
    def checkpoint_column(self) -> str | None: ...


class DestinationSpec(Protocol):
    """What every destination spec has; each backend's own frozen dataclass adds its keys (S3DestinationSpec ...)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...


@dataclass(frozen=True)
class CheckpointsSpec:
    """Where checkpoints live: ``type: local`` with a ``directory``, or ``type: s3`` with a ``bucket`` and ``prefix``."""

    type: str = "local"
    directory: str | None = None
    bucket: str | None = None
    prefix: str = "conduit/checkpoints"
    s3: S3ConnectionSpec = field(default_factory=S3ConnectionSpec)
    lease_seconds: int = 60
    conditional_writes: bool = True


@dataclass(frozen=True)
class ResourceSpec:
    """One pipeline: a query on a source, landed in a destination, in checkpointed batches."""

    name: str
    source: SourceSpec
    destination: DestinationSpec
    query: str
    batch_size: int = DEFAULT_BATCH_SIZE
    description: str | None = None
    resume: bool = False
    checkpoint_column: str | None = None
    schedule: str | None = None
    schedule_timezone: str | None = None
    retries: int = 0
    sensor_interval: int | None = None  # seconds; None: no sensor
    incremental_column: str | None = None  # with :last_value in the query: load only what is new since the last run
    initial_value: Any = None
    incremental_key: tuple[str, ...] = ()  # columns that identify a row at the boundary (default: all)
    partitions: "PartitionsSpec | None" = None  # split into partitions that load, resume and publish on their own


@dataclass(frozen=True)
class IngestSpec:
    path: Path
    sources: tuple[SourceSpec, ...]
    destinations: tuple[DestinationSpec, ...]
    resources: tuple[ResourceSpec, ...] = field(default_factory=tuple)
    checkpoints: CheckpointsSpec | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resource(self, name: str) -> ResourceSpec:
        for r in self.resources:
            if r.name == name:
                return r
        raise SpecError(f"{self.path}: no resource named {name!r} (have: {', '.join(r.name for r in self.resources)})")


# --- YAML with line numbers, scalars kept as written -------------------------------------

_YAML = "tag:yaml.org,2002:"
_MERGE_TAG = _YAML + "merge"
_NULL_TAG = _YAML + "null"
# A whole number as a person writes it: decimal digits, optionally grouped with _ (50_000). No leading zero, which YAML
# 1.1 reads as octal (012345 -> 5349); no 0x/0b, no base 60 (12:30:45 -> 45045), no sign but -.
_DECIMAL_RE = re.compile(r"-?(?:0|[1-9][0-9]*(?:_[0-9]+)*)")
_FLOAT_RE = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")
MAX_BATCH_SIZE = 10_000_000


class _LineDict(dict[str, Any]):
    lines: dict[str, int]
    line: int
    nulls: set[str]  # keys whose value was written as null, Null, NULL or ~ (rather than left empty)


class _LineList(list[Any]):
    lines: list[int]
    line: int


class _Plain(str):
    """An unquoted scalar that YAML 1.1 would turn into a number, a boolean or a date, kept as the text written.

    YAML 1.1 reads ``012345`` as 5349, ``12:30:45`` as 45045, ``1_000`` as 1000 and ``yes`` as True: in a password,
    a database name or a query that is a silent change. Each key types its own value instead (``_Entry.integer``,
    ``_Entry.boolean``, ``_initial_value``), and a text key gets exactly the characters in the file."""

    kind: str  # what YAML 1.1 would have made of it: int, float, bool, timestamp or value (a lone =)


class _Loader(yaml.SafeLoader):
    pass


def _construct_plain(loader: _Loader, node: yaml.ScalarNode) -> _Plain:
    value = _Plain(loader.construct_scalar(node))
    value.kind = node.tag.removeprefix(_YAML)
    return value


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    result = _LineDict()
    result.lines = {}
    result.nulls = set()
    result.line = node.start_mark.line + 1
    merges: list[yaml.Node] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            merges.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise SpecError(f"{key_node.start_mark.line + 1}: keys must be strings, got {key!r}")
        key = str(key)
        if key in result:
            raise SpecError(f"{key_node.start_mark.line + 1}: key {key!r} appears twice; keep one")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
        if result[key] is None and value_node.tag == _NULL_TAG and value_node.value:
            result.nulls.add(key)
    # `<<: *anchor` (or a list of them) merges other mappings' keys as YAML's merge key defines: the mapping's own
    # keys win, then the earlier merged mapping's. Resolved here rather than by PyYAML's flatten_mapping, whose
    # precedence has changed between releases; a merged key keeps the line it was written on, for errors.
    for merged in merges:
        if not isinstance(merged, yaml.MappingNode):
            raise SpecError(
                f"{merged.start_mark.line + 1}: `<<:` merges a mapping, e.g. `<<: *defaults` or `<<: [*a, *b]`; "
                "this is not a mapping"
            )
        other = loader.construct_object(merged, deep=True)
        for key, value in other.items():
            if key not in result:
                result[key] = value
                result.lines[key] = other.lines[key]
                if key in other.nulls:
                    result.nulls.add(key)
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.lines = [child.start_mark.line + 1 for child in node.value]
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
for _kind in ("int", "float", "bool", "timestamp", "value"):
    _Loader.add_constructor(_YAML + _kind, _construct_plain)


def _bool_word(value: Any) -> bool | None:
    """True or False for the words YAML 1.1 reads as booleans (in a boolean key they cannot mean anything else)."""
    word = value.strip().lower() if isinstance(value, str) else None
    return True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None


class _Entry:
    """Typed, line-aware access to one mapping of ingest.yml; tracks which keys were used."""

    def __init__(self, file: Path, data: Mapping[str, Any], path: str, line: int) -> None:
        self.file = file
        self.data = data
        self.path = path
        self.line = line
        self.used: set[str] = set()
        self.from_env: set[str] = set()

    def where(self, key: str | None = None) -> str:
        lines = getattr(self.data, "lines", {})
        line = lines.get(key, self.line) if key else self.line
        key_path = f"{self.path}.{key}" if key else self.path
        return f"{self.file}:{line}: {key_path}"

    def fail(self, key: str | None, message: str) -> SpecError:
        return SpecError(f"{self.where(key)}: {message}")

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def sub(self, key: str, value: Any, *, url: bool = False) -> Any:
        if isinstance(value, str):
            if _VAR_RE.search(value):
                self.from_env.add(key)
            return substitute_env(value, lambda msg: self.fail(key, msg), quote=url)
        return value

    def literal(self, key: str, value: Any) -> None:
        """Refuse ``${VAR}`` in a key whose text is shown (Dagster UI, logs, database errors) or becomes SQL."""
        m = _VAR_RE.search(value) if isinstance(value, str) else None
        if m is None:
            return
        var = m.group(1)
        if key == "query":
            fix = (
                "bind a changing value with :last_value (incremental_column / initial_value), or keep it in a table or "
                "view the query reads; for a schema name set the source's `schema:`"
            )
            shown = "the query is shown in the Dagster UI and in database errors (LINE 2: ...)"
        else:
            fix = "write the value itself"
            shown = f"{key} is shown as written in the Dagster UI, logs and errors"
        raise self.fail(
            key,
            f"${{{var}}} is not substituted in `{key}`: {shown}, so an environment value there would be shown too. "
            f"Fix: {fix}. Environment values belong in connection keys (password, url, user, host, aws_secret_access_key ...)",
        )

    def show(self, key: str, value: Any) -> str:
        """A value for an error message; one that came from the environment is never echoed."""
        return "a value from the environment (not shown)" if key in self.from_env else _show(value)

    def text(
        self, key: str, *, required: bool = False, default: str | None = None, env: bool = True, url: bool = False
    ) -> str | None:
        """The text exactly as written (``env``: with ``${VAR}`` substituted; ``url``: substituted values encoded)."""
        value = self.raw(key)
        if value is None:
            if key in getattr(self.data, "nulls", ()):
                raise self.fail(
                    key,
                    f"null (or ~) here would mean that {key} is not set; remove the line to leave it unset, "
                    "or quote the value ('null') if that is the text",
                )
            if required:
                raise self.fail(None, f"missing required key {key!r}; add `{key}: ...`")
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_show(value)}; write a plain value")
        if not env:
            self.literal(key, value)
            return str(value)
        return str(self.sub(key, value, url=url))

    def integer(self, key: str, *, default: int, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
        value = self.raw(key)
        if value is None:
            return default
        value = self.sub(key, value)
        if not isinstance(value, str) or not _DECIMAL_RE.fullmatch(value.strip()):
            raise self.fail(
                key,
                f"expected a whole number, got {self.show(key, value)}; write it as a plain decimal number "
                f"(no leading 0, 0x, or :), e.g. `{key}: {default}`",
            )
        number = int(value.strip())
        if number < minimum or (maximum is not None and number > maximum):
            limit = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            reason = f"; {why}" if why and maximum is not None and number > maximum else ""
            raise self.fail(key, f"must be {limit}, got {self.show(key, number)}{reason}")
        return number

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None:
            return None
        value = self.sub(key, value)
        result = _bool_word(value)
        if result is None:
            raise self.fail(key, f"expected true or false, got {self.show(key, value)}")
        return result

    def choice(self, key: str, choices: tuple[str, ...], *, default: str | None = None) -> str:
        value = self.text(key, required=default is None, default=default)
        assert value is not None
        if value not in choices:
            raise self.fail(key, f"unknown value {self.show(key, value)}; use one of: {', '.join(choices)}")
        return value

    def name(self, key: str = "name") -> str:
        value = self.text(key, required=True, env=False)
        assert value is not None
        if not NAME_RE.match(value):
            raise self.fail(key, f"{value!r} is not a valid name; use letters, digits and _ and start with a letter or _")
        return value

    def finish(self, allowed: Collection[str]) -> None:
        for key in self.data:
            if key not in allowed:
                hint = f"allowed keys: {', '.join(sorted(allowed))}"
                raise self.fail(key, f"unknown key {key!r}; remove it or fix its spelling ({hint})")


def _show(value: Any) -> str:
    if isinstance(value, str | int | float | bool):
        return repr(str(value)) if isinstance(value, str) else repr(value)
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def substitute_env(value: str, fail: Any = None, env: Mapping[str, str] | None = None, *, quote: bool = False) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in one scalar value.

    ``quote`` (URLs): a ``${VAR}`` with other text around it is percent-encoded, so a password holding ``@``, ``:``,
    ``/`` or ``#`` stays the password instead of moving the host; a value that is one ``${VAR}`` is a whole URL and
    is used as it is."""
    env = os.environ if env is None else env
    encode = quote and _VAR_RE.fullmatch(value) is None

    def repl(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if var in env:
            found = env[var]
        elif default is not None:
            found = default
        else:
            message = f"environment variable {var} is not set; export it or write ${{{var}:-default}}"
            raise fail(message) if fail else SpecError(message)
        return urllib.parse.quote(found, safe="") if encode else found

    return _VAR_RE.sub(repl, value)


# --- building the spec -----------------------------------------------------------------

S3_KEYS = frozenset({"endpoint_url", "region", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"})
_CHECKPOINT_KEYS = {"type", "directory", "bucket", "prefix", "lease_seconds", "conditional_writes", "endpoint_url", "region"}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_RESOURCE_KEYS = {
    "name",
    "source",
    "destination",
    "query",
    "batch_size",
    "description",
    "resume",
    "checkpoint_column",
    "schedule",
    "retries",
    "sensor",
    "incremental_column",
    "initial_value",
    "incremental_key",
    "partitions",
}


def entry_path(e: _Entry, base: Path) -> Path:
    """The entry's ``path``, relative to ingest.yml's folder."""
    value = e.text("path", required=True)
    assert value is not None
    if "\x00" in value:
        raise e.fail("path", "contains a NUL byte; write a plain path")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def s3_connection(e: _Entry) -> S3ConnectionSpec:
    """The keys that say how to reach S3; credentials should come from ${VAR}s or the AWS environment."""
    endpoint = e.text("endpoint_url")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise e.fail("endpoint_url", "must start with http:// or https://, e.g. http://127.0.0.1:9000")
    if endpoint is not None and "@" in endpoint.split("://", 1)[1].split("/", 1)[0]:
        raise e.fail("endpoint_url", "must not hold credentials; give them as aws_access_key_id / aws_secret_access_key")

    def secret(key: str) -> Secret | None:
        value = e.text(key)
        return None if value is None else Secret(value)

    key_id, secret_key = secret("aws_access_key_id"), secret("aws_secret_access_key")
    if (key_id is None) != (secret_key is None):
        raise e.fail(None, "give both aws_access_key_id and aws_secret_access_key (e.g. from ${VARS}), or neither")
    return S3ConnectionSpec(
        endpoint_url=endpoint or None,
        region=e.text("region") or None,
        access_key_id=key_id,
        secret_access_key=secret_key,
        session_token=secret("aws_session_token"),
    )


def bucket_name(e: _Entry, value: str | None, key: str = "bucket") -> str:
    if value is None or not _BUCKET_RE.match(value) or ".." in value:
        raise e.fail(
            key if value is not None else None,
            f"{'missing `bucket:`' if value is None else f'{e.show(key, value)} is not a valid S3 bucket name'}; "
            "a bucket name has 3 to 63 lowercase letters, digits, dots or hyphens",
        )
    return value


def key_prefix(e: _Entry, key: str = "prefix", default: str = "") -> str:
    value = (e.text(key) or default).strip("/")
    if any(part in ("", ".", "..") for part in value.split("/")) and value:
        raise e.fail(key, f"{e.show(key, value)} is not a clean key prefix; write it like raw/shop (no //, . or ..)")
    return value


def _source(file: Path, e: _Entry) -> SourceSpec:
    """A ``sources:`` entry, parsed by the backend its ``type`` names."""
    from conduit_dagster.engine.backends import source_backend, source_types

    name = e.name()
    kind = e.choice("type", source_types())
    resume = bool(e.boolean("resume"))
    column = e.text("checkpoint_column", env=False)
    spec: SourceSpec = source_backend(kind).parse(e, file, name, resume, column)
    return spec


def _destination(file: Path, e: _Entry) -> DestinationSpec:
    """A ``destinations:`` entry, parsed by the backend its ``type`` names."""
    from conduit_dagster.engine.backends import destination_backend, destination_types

    name = e.name()
    kind = e.choice("type", destination_types())
    spec: DestinationSpec = destination_backend(kind).parse(e, file, name)
    return spec


def _schedule(e: _Entry) -> tuple[str | None, str | None]:
    """``schedule: "<cron>"`` or ``schedule: {cron: "<cron>", timezone: Europe/Berlin}``."""
    raw = e.raw("schedule")
    if raw is None:
        return None, None
    if isinstance(raw, dict):
        sub = _Entry(e.file, raw, f"{e.path}.schedule", getattr(raw, "line", e.line))
        sub.finish({"cron", "timezone"})
        cron, timezone = sub.text("cron", required=True), sub.text("timezone")
        where = sub
    elif isinstance(raw, str):
        cron, timezone, where = e.text("schedule"), None, e
    else:
        raise e.fail("schedule", 'expected a cron string like "0 3 * * *", or {cron: ..., timezone: ...}')
    from croniter import croniter

    if not cron or not croniter.is_valid(cron) or len(cron.split()) != 5:
        raise where.fail("cron" if where is not e else "schedule", f'{cron!r} is not a 5-field cron expression; e.g. "0 3 * * *"')
    if timezone is not None:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise where.fail("timezone", f"unknown time zone {timezone!r}; use an IANA name such as Europe/Berlin") from None
    return cron, timezone


def column_list(e: _Entry, key: str) -> tuple[str, ...]:
    raw = e.raw(key)
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
        raise e.fail(key, f"expected a column name or a list of them, e.g. `{key}: [id]`")
    for c in raw:
        e.literal(key, c)
    return tuple(str(c) for c in raw)


def _initial_value(e: _Entry) -> Any:
    """The :last_value of an incremental load's first run: a number, a date or time, or text (quoted, or any other word).

    It is compared with the column's values, so a number YAML 1.1 reads differently from how it looks (012, 0x1F,
    1:30, .inf) is refused rather than changed; an impossible date is refused rather than crashing the parser."""
    raw = e.raw("initial_value")
    if raw is None:
        if "initial_value" in getattr(e.data, "nulls", ()):
            raise e.fail("initial_value", "null is not a starting value; write the :last_value of the first run")
        return None
    if not isinstance(raw, str):
        raise e.fail("initial_value", f"expected a number, a date or time, or text, got {_show(raw)}")
    e.literal("initial_value", raw)
    text = str(raw)
    kind = raw.kind if isinstance(raw, _Plain) else "str"
    if kind == "int" and _DECIMAL_RE.fullmatch(text):
        return int(text)
    if kind == "float" and _FLOAT_RE.fullmatch(text):
        return float(text)
    if kind == "timestamp":
        try:
            return yaml.constructor.SafeConstructor().construct_yaml_timestamp(yaml.ScalarNode(_YAML + "timestamp", text))
        except ValueError:
            raise e.fail(
                "initial_value", f"{text!r} is not a valid date or time; write e.g. 2025-01-01 or 2025-01-01T00:00:00+00:00"
            ) from None
    if kind in ("int", "float", "bool"):
        raise e.fail(
            "initial_value",
            f"{text!r} reads as {'a boolean' if kind == 'bool' else 'a number other than it looks'} in YAML 1.1; "
            "write a number as plain decimal digits (e.g. 12345 or 1.5), or quote the value ('...') to compare it as text",
        )
    return text


def _sensor(e: _Entry, column: str | None) -> int | None:
    """``sensor: true`` (checks every 60 s) or ``sensor: {interval: 300}``."""
    raw = e.raw("sensor")
    on = _bool_word(e.sub("sensor", raw))
    if raw is None or on is False:
        return None
    if on:
        interval = 60
    elif isinstance(raw, dict):
        sub = _Entry(e.file, raw, f"{e.path}.sensor", getattr(raw, "line", e.line))
        sub.finish({"interval"})
        interval = sub.integer("interval", default=60, minimum=30, maximum=86400)
    else:
        raise e.fail("sensor", "expected true, or {interval: <seconds>}")
    if column is None:
        raise e.fail("sensor", "a sensor watches the checkpoint column for new rows: set checkpoint_column")
    return interval


def _checkpoints(file: Path, doc: "_LineDict") -> CheckpointsSpec | None:
    """``checkpoints: {type: s3, bucket: ..., prefix: ...}`` or ``{type: local, directory: ...}``."""
    raw = doc.get("checkpoints")
    if raw is None:
        return None
    line = doc.lines.get("checkpoints", 1)
    if not isinstance(raw, dict):
        raise SpecError(
            f"{file}:{line}: checkpoints: expected a mapping, "
            "e.g. `checkpoints: {type: s3, bucket: my-bucket, prefix: conduit}`"
        )
    e = _Entry(file, raw, "checkpoints", getattr(raw, "line", line))
    kind = e.choice("type", ("local", "s3"), default="local")
    e.finish(_CHECKPOINT_KEYS)
    lease = e.integer(
        "lease_seconds",
        default=60,
        minimum=10,  # checkpoint_s3.MIN_LEASE_SECONDS
        maximum=3600,
        why="a shorter lease cannot be renewed in time; with a longer one a crashed run blocks its retry for that long",
    )
    conditional = e.boolean("conditional_writes")
    if kind == "local":
        for key in ("bucket", "prefix", "endpoint_url", "region", "lease_seconds", "conditional_writes"):
            if e.data.get(key) is not None:
                raise e.fail(key, f"{key} applies to `type: s3` only; remove it or set `type: s3`")
        return CheckpointsSpec(type="local", directory=e.text("directory"))
    if e.data.get("directory") is not None:
        raise e.fail("directory", "directory applies to `type: local` only; an S3 store uses bucket and prefix")
    return CheckpointsSpec(
        type="s3",
        bucket=bucket_name(e, e.text("bucket")),
        prefix=key_prefix(e, default="conduit/checkpoints"),
        s3=s3_connection(e),
        lease_seconds=lease,
        conditional_writes=True if conditional is None else conditional,
    )


def _entries(file: Path, doc: _LineDict, section: str, required: bool) -> list[_Entry]:
    value = doc.get(section)
    line = doc.lines.get(section, 1) if isinstance(doc, _LineDict) else 1
    if value is None:
        if required:
            raise SpecError(f"{file}:{line}: missing top-level `{section}:` list; add at least one entry")
        return []
    if not isinstance(value, list):
        raise SpecError(f"{file}:{line}: {section}: expected a list of entries (`- name: ...`), got {type(value).__name__}")
    if required and not value:
        raise SpecError(f"{file}:{line}: {section}: the list is empty; add at least one entry")
    entries = []
    for i, item in enumerate(value):
        item_line = value.lines[i] if isinstance(value, _LineList) else line
        if not isinstance(item, dict):
            raise SpecError(f"{file}:{item_line}: {section}[{i}]: expected a mapping with `name:`, got {_show(item)}")
        entries.append(_Entry(file, item, f"{section}[{i}]", getattr(item, "line", item_line)))
    return entries


def load_spec_text(text: str, path: Path) -> IngestSpec:
    """Parse and validate ingest.yml content; ``path`` is used for messages and relative paths."""
    path = path.resolve()
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except SpecError as exc:
        raise SpecError(f"{path}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: not valid YAML ({problem}); check indentation and quoting") from None
    if doc is None:
        raise SpecError(f"{path}: the file is empty; declare `sources:`, `destinations:` and `resources:`")
    if not isinstance(doc, dict):
        raise SpecError(f"{path}:1: expected a mapping with `sources:`, `destinations:` and `resources:`")
    for key in doc:
        if key not in ("sources", "destinations", "resources", "checkpoints"):
            line = doc.lines.get(key, 1) if isinstance(doc, _LineDict) else 1
            raise SpecError(f"{path}:{line}: unknown top-level key {key!r}; use sources, destinations, resources, checkpoints")
    if not isinstance(doc, _LineDict):  # pragma: no cover - the loader always builds _LineDict
        raise SpecError(f"{path}: could not read the document")

    from conduit_dagster.engine.backends import ResourceUse, destination_backend, source_backend

    sources: dict[str, SourceSpec] = {}
    for e in _entries(path, doc, "sources", True):
        s = _source(path, e)
        if s.name in sources:
            raise e.fail("name", f"duplicate source name {s.name!r}; names must be unique")
        sources[s.name] = s
    destinations: dict[str, DestinationSpec] = {}
    for e in _entries(path, doc, "destinations", True):
        d = _destination(path, e)
        if d.name in destinations:
            raise e.fail("name", f"duplicate destination name {d.name!r}; names must be unique")
        destinations[d.name] = d
    resources: dict[str, ResourceSpec] = {}
    for e in _entries(path, doc, "resources", True):
        name = e.name()
        if name.startswith("_"):
            raise e.fail(
                "name", f"{name!r} starts with _, which Parquet readers skip (and conduit keeps for bookkeeping); rename it"
            )
        e.finish(_RESOURCE_KEYS)
        if name in resources:
            raise e.fail("name", f"duplicate resource name {name!r}; names must be unique")
        source_name = e.text("source", required=True)
        if source_name not in sources:
            raise e.fail(
                "source", f"unknown source {e.show('source', source_name)}; declared sources: {', '.join(sources) or 'none'}"
            )
        dest_name = e.text("destination", required=True)
        if dest_name not in destinations:
            raise e.fail(
                "destination",
                f"unknown destination {e.show('destination', dest_name)}; "
                f"declared destinations: {', '.join(destinations) or 'none'}",
            )
        source = sources[source_name]
        source_kind = source_backend(source)
        query = source_kind.resource_query(e, source, source_name)
        destination = destinations[dest_name]
        resume = e.boolean("resume")
        explicit_column = e.text("checkpoint_column", env=False)
        resume = source.resume if resume is None else resume
        column = explicit_column or source.checkpoint_column
        incremental_column = e.text("incremental_column", env=False)
        initial_value = _initial_value(e)
        source_kind.check_resource(e, source, incremental_column)
        if source_kind.uses_last_value(query) != (incremental_column is not None):
            raise e.fail(
                "incremental_column" if incremental_column else "query",
                "an incremental load needs both `incremental_column:` and `:last_value` in the query "
                "(e.g. WHERE updated_at >= :last_value); give both or neither",
            )
        if incremental_column is not None:
            if initial_value is None:
                raise e.fail(
                    "initial_value" if "initial_value" in e.data else None,
                    "an incremental load needs `initial_value:` (the :last_value of its first run), "
                    "e.g. `initial_value: 1970-01-01` or `initial_value: 0`",
                )
            if explicit_column and explicit_column != incremental_column:
                raise e.fail(
                    "checkpoint_column",
                    f"an incremental load checkpoints on its incremental_column "
                    f"{incremental_column!r}; remove checkpoint_column or make them the same",
                )
            if e.boolean("resume") is False:
                raise e.fail("resume", "an incremental load always resumes after a crash; remove `resume: false`")
            column, resume = incremental_column, True
        if resume and not column:
            raise e.fail(
                "checkpoint_column" if "resume" in e.data else None,
                "resume is on but no checkpoint_column is set; add `checkpoint_column: <column>` to the resource or its source",
            )
        use = ResourceUse(
            name=name,
            destination_name=dest_name,
            resume=resume,
            incremental=incremental_column is not None,
            others=tuple((other.name, other.destination) for other in resources.values()),
        )
        destination_backend(destination).check_resource(e, destination, use)
        cron, timezone = _schedule(e)
        partitions = parse_partitions(e, column, incremental_column is not None)
        resources[name] = ResourceSpec(
            name=name,
            source=source,
            destination=destination,
            query=query,
            batch_size=e.integer(
                "batch_size",
                default=DEFAULT_BATCH_SIZE,
                maximum=MAX_BATCH_SIZE,
                why="a batch is held in memory whole and written as one part file or one transaction; "
                "a larger batch does not load faster",
            ),
            description=e.text("description", env=False),
            resume=resume,
            checkpoint_column=column,
            schedule=cron,
            schedule_timezone=timezone,
            retries=e.integer("retries", default=0, minimum=0, maximum=100),
            sensor_interval=_sensor(e, column),
            incremental_column=incremental_column,
            initial_value=initial_value,
            incremental_key=column_list(e, "incremental_key"),
            partitions=partitions,
        )
    return IngestSpec(
        path=path,
        sources=tuple(sources.values()),
        destinations=tuple(destinations.values()),
        resources=tuple(resources.values()),
        checkpoints=_checkpoints(path, doc),
    )


def load_spec(path: str | os.PathLike[str]) -> IngestSpec:
    """Read and validate an ingest.yml file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: file not found; create it or set {INGEST_FILE_ENV} to the right path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    return load_spec_text(text, p)
