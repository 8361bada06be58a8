"""Checkpoints: a typed, versioned JSON document per pipeline, and the stores that keep them.

A checkpoint says "every source row whose checkpoint column is <= last_value is durably in the
destination, in parts 0..batches_committed-1 of the output generation named in
``destination``". It is written only after the batch it describes is durable, atomically, and
deleted when the pipeline finishes.

Values keep their exact type through JSON: ints as decimal strings (beyond 2**53), floats by
``repr`` (shortest exact round trip, incl. nan/inf/-0.0), datetimes by ISO 8601 with
microseconds and offset, dates, Decimals by ``str``, bytes as hex.
"""

import builtins
import datetime as dt
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from conduit_dagster.engine.errors import CheckpointError, PipelineBusyError

FORMAT_VERSION = 1
CHECKPOINT_DIR_ENV = "CONDUIT_CHECKPOINT_DIR"
CLEAR_HINT = "conduit clear-checkpoints --pipeline-name {name}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def encode_value(value: Any) -> dict[str, str]:
    """A checkpoint value as ``{"type": ..., "value": ...}`` with an exact string form.

    ``None`` is the value of a checkpoint saved before the first batch: nothing read yet."""
    if value is None:
        return {"type": "none", "value": ""}
    if isinstance(value, bool):
        return {"type": "bool", "value": "true" if value else "false"}
    if isinstance(value, int):
        return {"type": "int", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": repr(value)}
    if isinstance(value, Decimal):
        return {"type": "decimal", "value": str(value)}
    if isinstance(value, dt.datetime):
        if getattr(value, "nanosecond", 0):  # a pandas Timestamp: microseconds would round it
            raise CheckpointError(f"cannot checkpoint {value!r} exactly: it has nanoseconds; checkpoints keep microseconds")
        return {"type": "datetime", "value": value.isoformat(timespec="microseconds")}
    if isinstance(value, dt.date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"type": "bytes", "value": bytes(value).hex()}
    raise CheckpointError(f"cannot checkpoint a value of type {type(value).__name__}; use an int, text, date or timestamp column")


def decode_value(data: Any) -> Any:
    if not isinstance(data, dict) or set(data) != {"type", "value"} or not isinstance(data["value"], str):
        raise ValueError("last_value must be {'type': ..., 'value': '...'}")
    kind, text = data["type"], data["value"]
    if kind == "none":
        if text:
            raise ValueError("a 'none' value must be empty")
        return None
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "decimal":
        return Decimal(text)
    if kind == "datetime":
        return dt.datetime.fromisoformat(text)
    if kind == "date":
        return dt.date.fromisoformat(text)
    if kind == "str":
        return text
    if kind == "bytes":
        return bytes.fromhex(text)
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"bad bool {text!r}")
        return text == "true"
    raise ValueError(f"unknown value type {kind!r}")


@dataclass(frozen=True)
class Checkpoint:
    pipeline: str
    checkpoint_column: str
    last_value: Any
    records_processed: int
    batches_committed: int
    run_id: str | None
    query_sha256: str
    source_id: str = ""
    destination_id: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    incremental: dict[str, Any] = field(default_factory=dict)  # an incremental run's bound and boundary rows
    updated_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        doc = asdict(self)
        doc["last_value"] = encode_value(self.last_value)
        doc["updated_at"] = self.updated_at or _now()
        ordered = {"format_version": doc.pop("format_version"), "pipeline": doc.pop("pipeline"), **doc}
        return json.dumps(ordered, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str, pipeline: str) -> "Checkpoint":
        hint = CLEAR_HINT.format(name=pipeline)
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(
                f"{where}: checkpoint is not valid JSON ({exc}); it may be truncated. Inspect it, or start over with `{hint}`"
            ) from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{where}: checkpoint is not a JSON object; start over with `{hint}`")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format_version {version!r} is not {FORMAT_VERSION}, "
                f"the one this conduit-dagster reads; start over with `{hint}`"
            )
        try:
            value = decode_value(doc["last_value"])
            cp = cls(
                pipeline=_typed(doc, "pipeline", str),
                checkpoint_column=_typed(doc, "checkpoint_column", str),
                last_value=value,
                records_processed=_typed(doc, "records_processed", int),
                batches_committed=_typed(doc, "batches_committed", int),
                run_id=doc.get("run_id"),
                query_sha256=_typed(doc, "query_sha256", str),
                source_id=_typed(doc, "source_id", str),
                destination_id=_typed(doc, "destination_id", str),
                destination=_typed(doc, "destination", dict),
                incremental=doc.get("incremental") or {},
                updated_at=_typed(doc, "updated_at", str),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{where}: checkpoint is damaged or hand-edited ({exc.__class__.__name__}: {exc}); start over with `{hint}`"
            ) from None
        if cp.pipeline != pipeline:
            raise CheckpointError(
                f"{where}: checkpoint belongs to pipeline {cp.pipeline!r}, not {pipeline!r}; start over with `{hint}`"
            )
        if cp.records_processed < 0 or cp.batches_committed < 0:
            raise CheckpointError(f"{where}: checkpoint has negative counters; start over with `{hint}`")
        return cp


def _typed(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class IncrementalState:
    """What an incremental pipeline has loaded: rows up to ``last_value``; of the rows equal to it, those whose
    hashes are in ``boundary``. It survives successful runs and advances once, at the end of a run."""

    pipeline: str
    incremental_column: str
    last_value: Any
    boundary: tuple[str, ...] = ()
    run_id: str | None = None
    updated_at: str = ""
    query_sha256: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        doc = {
            "format_version": self.format_version,
            "pipeline": self.pipeline,
            "incremental_column": self.incremental_column,
            "query_sha256": self.query_sha256,
            "last_value": encode_value(self.last_value),
            "boundary": list(self.boundary),
            "run_id": self.run_id,
            "updated_at": self.updated_at or _now(),
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str, pipeline: str) -> "IncrementalState":
        hint = CLEAR_HINT.format(name=pipeline) + " --state"  # a damaged state file is also simply deleted by it
        try:
            doc = json.loads(text)
            if doc.get("format_version") != FORMAT_VERSION or doc.get("pipeline") != pipeline:
                raise ValueError("another format version or pipeline")
            return cls(
                pipeline=pipeline,
                incremental_column=_typed(doc, "incremental_column", str),
                last_value=decode_value(doc["last_value"]),
                boundary=tuple(str(h) for h in _typed(doc, "boundary", list)),
                run_id=doc.get("run_id"),
                updated_at=_typed(doc, "updated_at", str),
                query_sha256=_typed(doc, "query_sha256", str),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{where}: incremental state is damaged or hand-edited ({exc}); fix it, or start the incremental "
                f"load over from initial_value with `{hint}`"
            ) from None


class CheckpointStore(Protocol):
    """Where checkpoints live. ``describe`` names the location for messages (never secrets)."""

    def load(self, pipeline: str) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint) -> None: ...

    def delete(self, pipeline: str) -> None: ...

    def list(self) -> list[str]: ...

    def describe(self, pipeline: str) -> str: ...

    def lock(self, pipeline: str, run_id: str | None) -> AbstractContextManager[None]:
        """Hold the pipeline for one run; raise PipelineBusyError if another live run holds it."""
        ...

    def load_state(self, pipeline: str) -> IncrementalState | None: ...

    def save_state(self, state: IncrementalState) -> None: ...

    def delete_state(self, pipeline: str) -> None: ...

    def list_states(self) -> "builtins.list[str]": ...

    def load_plan(self, pipeline: str) -> str | None:
        """A partitioned pipeline's key-range plan (JSON text, see ``partitions.RangePlan``), or None."""
        ...

    def save_plan(self, pipeline: str, text: str) -> None: ...

    def delete_plan(self, pipeline: str) -> None: ...

    def has_checkpoint(self, pipeline: str) -> bool:
        """A checkpoint exists (readable or not)."""
        ...

    def assert_owner(self, pipeline: str) -> None:
        """Raise CheckpointError if this run no longer holds the pipeline (called before every write)."""
        ...

    @property
    def location(self) -> str:
        """Where the checkpoints are, for messages."""
        ...


NO_LINKS = "conduit does not follow links in its checkpoint/output folders; remove it"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LinkRefusedError(OSError):
    """An entry conduit would open, replace or delete in its own folders is a symlink (or a hard link, fifo or
    device): following it could truncate or delete a file elsewhere. An OSError, so that every handler of a
    failed file operation reports it, with ``message`` as its text."""

    def __init__(self, path: "Path | str", what: str = "is a symlink", hint: str = NO_LINKS) -> None:
        self.message = f"{path} {what}; {hint}"
        super().__init__(errno.ELOOP, self.message, str(path))

    def __str__(self) -> str:
        return self.message


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def refuse_link(dir_fd: int, name: str, shown: "Path | str") -> None:
    """Raise LinkRefusedError if ``name`` in the folder ``dir_fd`` is a symlink (a missing entry is fine)."""
    if _is_link(dir_fd, name):
        raise LinkRefusedError(shown)


def open_dir(path: Path, *, create: bool = False) -> int:
    """A descriptor of a configured folder (a checkpoint directory or a destination's path). Links in the path
    the user configured are theirs and are followed; everything conduit makes inside is opened through it."""
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return os.open(path, _DIR_FLAGS)


def open_subdir(dir_fd: int, name: str, shown: "Path | str", *, create: bool = False) -> int:
    """A descriptor of the folder ``name`` in ``dir_fd``, made if ``create``; never through a symlink."""
    if create:
        try:
            os.mkdir(name, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(dir_fd, name):
            raise LinkRefusedError(shown) from None
        raise


def open_file(dir_fd: int, name: str, shown: "Path | str", flags: int, mode: int = 0o644) -> int:
    """Open the file ``name`` in ``dir_fd`` never through a symlink, and only if it is a regular file; one opened
    for writing in place (not made here, by O_EXCL) must have no other hard link."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkRefusedError(shown) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LinkRefusedError(shown, "is not a regular file", "conduit keeps only its own files there; move it away")
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_EXCL and st.st_nlink > 1:
            raise LinkRefusedError(
                shown, "has another hard link", "writing it would change that other file too; conduit follows no links, remove it"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file_at(dir_fd: int, name: str, shown: "Path | str") -> bytes | None:
    """The bytes of ``name`` in ``dir_fd``, None if it does not exist; never through a symlink."""
    try:
        fd = open_file(dir_fd, name, shown, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_atomic_at(dir_fd: int, name: str, data: bytes, shown: "Path | str", *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``name`` in the folder ``dir_fd`` so that a reader sees the old or the new file, never a
    part: through a new temporary file (O_EXCL, so never through a link someone planted) renamed over it. A
    symlink at ``name`` is refused, not replaced."""
    refuse_link(dir_fd, name, shown)
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = open_file(dir_fd, tmp, os.path.join(os.path.dirname(shown), tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fdatasync(f.fileno())  # the data and its size; mtime need not be durable
        refuse_link(dir_fd, name, shown)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        os.fsync(dir_fd)


def resolve_checkpoint_dir(base_dir: Path, configured: str | None = None) -> Path:
    """The local checkpoint directory: ``configured``, else $CONDUIT_CHECKPOINT_DIR, else
    ``.checkpoints``; a relative path is taken from ``base_dir`` (ingest.yml's folder)."""
    chosen = configured or os.environ.get(CHECKPOINT_DIR_ENV) or ".checkpoints"
    path = Path(chosen).expanduser()
    return path if path.is_absolute() else base_dir / path


class LocalCheckpointStore:
    """One ``<pipeline>.json`` file per pipeline in a directory.

    The directory may be shared, so nothing in it is trusted to be what its name says: every file is opened,
    replaced and deleted through a descriptor of the directory, never through a symlink (see ``open_file``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, pipeline: str) -> Path:
        if not pipeline or "/" in pipeline or "\\" in pipeline or "\x00" in pipeline or pipeline.startswith("."):
            raise CheckpointError(f"invalid pipeline name {pipeline!r} for a checkpoint file")
        return self.directory / f"{pipeline}.json"

    @contextmanager
    def _dir(self, *, create: bool = False) -> Iterator[int | None]:
        """A descriptor of the directory; None when it does not exist and ``create`` is false."""
        try:
            fd = open_dir(self.directory, create=create)
        except FileNotFoundError:
            if create:
                raise
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _read(self, path: Path) -> str | None:
        with self._dir() as fd:
            if fd is None:
                return None
            data = read_file_at(fd, path.name, path)
        return None if data is None else data.decode("utf-8")

    def describe(self, pipeline: str) -> str:
        return str(self._path(pipeline))

    @property
    def location(self) -> str:
        return str(self.directory)

    def has_checkpoint(self, pipeline: str) -> bool:
        return os.path.lexists(self._path(pipeline))

    def assert_owner(self, pipeline: str) -> None:
        """An flock cannot be lost while its holder lives."""

    def load(self, pipeline: str) -> Checkpoint | None:
        path = self._path(pipeline)
        try:
            text = self._read(path)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; nothing was read or written") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{path}: cannot read checkpoint ({exc}); fix it or start over with `{CLEAR_HINT.format(name=pipeline)}`"
            ) from None
        if text is None:
            return None
        return Checkpoint.from_json(text, where=str(path), pipeline=pipeline)

    def save(self, checkpoint: Checkpoint) -> None:
        path = self._path(checkpoint.pipeline)
        try:
            # No directory fsync: if a power cut loses this rename, the previous checkpoint comes back and
            # the run replays one more batch, which overwrites its own part. Exactness holds; 1 ms saved.
            with self._dir(create=True) as fd:
                assert fd is not None
                write_atomic_at(fd, path.name, checkpoint.to_json().encode("utf-8"), path, sync_dir=False)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; the previous checkpoint is unchanged") from None
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot write checkpoint ({exc.strerror or exc}); the previous checkpoint is unchanged"
            ) from None

    def _unlink(self, path: Path, *, sync: bool) -> None:
        """Delete ``path``: a symlink there is itself deleted (unlink never follows it), not what it points to."""
        with self._dir() as fd:
            if fd is None:
                return
            try:
                os.unlink(path.name, dir_fd=fd)
            except FileNotFoundError:
                return
            if sync:
                os.fsync(fd)

    def delete(self, pipeline: str) -> None:
        self._unlink(self._path(pipeline), sync=True)

    def list(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(
            p.stem
            for p in self.directory.glob("*.json")
            if not p.name.startswith(".") and not p.name.endswith((".state.json", ".plan.json"))
        )

    def _state_path(self, pipeline: str) -> Path:
        return self._path(pipeline).with_suffix(".state.json")

    def list_states(self) -> "builtins.list[str]":
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(".state.json") for p in self.directory.glob("*.state.json"))

    def load_state(self, pipeline: str) -> IncrementalState | None:
        path = self._state_path(pipeline)
        try:
            text = self._read(path)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; nothing was read or written") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read incremental state ({exc})") from None
        if text is None:
            return None
        return IncrementalState.from_json(text, where=str(path), pipeline=pipeline)

    def save_state(self, state: IncrementalState) -> None:
        path = self._state_path(state.pipeline)
        try:
            with self._dir(create=True) as fd:
                assert fd is not None
                # with the directory fsync: it must outlive the run
                write_atomic_at(fd, path.name, state.to_json().encode("utf-8"), path)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; the incremental state is unchanged") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot write incremental state ({exc.strerror or exc})") from None

    def delete_state(self, pipeline: str) -> None:
        self._unlink(self._state_path(pipeline), sync=False)

    def _plan_path(self, pipeline: str) -> Path:
        return self._path(pipeline).with_suffix(".plan.json")

    def load_plan(self, pipeline: str) -> str | None:
        path = self._plan_path(pipeline)
        try:
            return self._read(path)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; nothing was read or written") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the key-range plan ({exc})") from None

    def save_plan(self, pipeline: str, text: str) -> None:
        path = self._plan_path(pipeline)
        try:
            with self._dir(create=True) as fd:
                assert fd is not None
                write_atomic_at(fd, path.name, text.encode("utf-8"), path)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; the plan is unchanged") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot write the key-range plan ({exc.strerror or exc})") from None

    def delete_plan(self, pipeline: str) -> None:
        self._unlink(self._plan_path(pipeline), sync=True)

    @contextmanager
    def lock(self, pipeline: str, run_id: str | None) -> Iterator[None]:
        """An exclusive ``flock`` on ``.<pipeline>.lock``: the kernel drops it when the holder dies,
        so a crashed run never blocks the next. It holds between processes of one machine (every
        Dagster run and CLI run sharing this directory); across machines use a shared store."""
        self._path(pipeline)  # validates the name
        path = self.directory / f".{pipeline}.lock"
        try:
            with self._dir(create=True) as dir_fd:
                assert dir_fd is not None
                # the lock file is truncated and written in place: never through a link to someone else's file
                fd = open_file(dir_fd, path.name, path, os.O_RDWR | os.O_CREAT)
        except LinkRefusedError as exc:
            raise CheckpointError(f"{exc.message}; nothing was read or written") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
                raise PipelineBusyError(
                    f"pipeline {pipeline!r} is already being run ({holder}); nothing was read or written. "
                    "Wait for that run to finish or stop it; a run that died releases the pipeline by itself"
                ) from None
            holder_doc = json.dumps(
                {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": _now()}, sort_keys=True
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_doc.encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class MemoryCheckpointStore:
    """An in-memory store for unit tests: keeps the JSON text so every save round-trips."""

    def __init__(self) -> None:
        self.docs: dict[str, str] = {}
        self.states: dict[str, str] = {}
        self.plans: dict[str, str] = {}
        self.held: dict[str, str | None] = {}

    def describe(self, pipeline: str) -> str:
        return f"memory:{pipeline}"

    location = "memory"

    def has_checkpoint(self, pipeline: str) -> bool:
        return pipeline in self.docs

    def assert_owner(self, pipeline: str) -> None:
        pass

    def list_states(self) -> list[str]:
        return sorted(self.states)

    def load(self, pipeline: str) -> Checkpoint | None:
        text = self.docs.get(pipeline)
        return None if text is None else Checkpoint.from_json(text, where=self.describe(pipeline), pipeline=pipeline)

    def save(self, checkpoint: Checkpoint) -> None:
        self.docs[checkpoint.pipeline] = checkpoint.to_json()

    def delete(self, pipeline: str) -> None:
        self.docs.pop(pipeline, None)

    def list(self) -> list[str]:
        return sorted(self.docs)

    def load_state(self, pipeline: str) -> IncrementalState | None:
        text = self.states.get(pipeline)
        return None if text is None else IncrementalState.from_json(text, where=f"memory:{pipeline}", pipeline=pipeline)

    def save_state(self, state: IncrementalState) -> None:
        self.states[state.pipeline] = state.to_json()

    def delete_state(self, pipeline: str) -> None:
        self.states.pop(pipeline, None)

    def load_plan(self, pipeline: str) -> str | None:
        return self.plans.get(pipeline)

    def save_plan(self, pipeline: str, text: str) -> None:
        self.plans[pipeline] = text

    def delete_plan(self, pipeline: str) -> None:
        self.plans.pop(pipeline, None)

    @contextmanager
    def lock(self, pipeline: str, run_id: str | None) -> Iterator[None]:
        if pipeline in self.held:
            raise PipelineBusyError(f"pipeline {pipeline!r} is already being run (run_id {self.held[pipeline]})")
        self.held[pipeline] = run_id
        try:
            yield
        finally:
            del self.held[pipeline]
