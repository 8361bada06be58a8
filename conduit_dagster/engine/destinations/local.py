"""Local files: part files per batch in a hidden generation directory, published atomically.

Layout for destination ``path: out`` and pipeline ``orders``::

    out/orders/                          the visible output: only a finished run's parts
        part-000000.parquet ...
        _conduit_generation              marker: which generation this is (readers skip '_')
    out/_conduit_staging/orders.<gen>/   a run in progress (readers skip '_' folders)

Publishing swaps the staging directory with the visible one in a single ``renameat2
(RENAME_EXCHANGE)`` where the kernel and file system allow it, so a reader sees the old or the
new output, never a mix; elsewhere it falls back to two renames (a brief moment with no output,
never a mix). A crash at any point is recovered by the next run from the checkpoint and the
generation markers.
"""

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.backends import DestinationBackend, register_destination_backend
from conduit_dagster.engine.checkpoint import (
    LinkRefusedError,
    open_dir,
    open_file,
    open_subdir,
    read_file_at,
    refuse_link,
    write_atomic_at,
)
from conduit_dagster.engine.destinations.base import Resumption
from conduit_dagster.engine.destinations.formats import EXTENSIONS, count_rows, write_part
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.spec import FORMAT_KINDS, FORMATS, _Entry, entry_path


@dataclass(frozen=True)
class LocalDestinationSpec:
    """ingest.yml `type: local` destination: part files under path/<resource>/."""

    name: str
    path: Path
    format: str = "parquet"
    type: str = "local"


MARKER = "_conduit_generation"
STAGING = "_conduit_staging"
_EXT = EXTENSIONS
_RENAME_EXCHANGE = 2
_PART = re.compile(r"part-(\d{6,})\.")


def _exchange(a_dir: int, a: str, b_dir: int, b: str) -> bool:
    """Atomically swap two entries (neither is followed if a link); False where the platform cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(a_dir, os.fsencode(a), b_dir, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a)


def _entries(dir_fd: int, shown: Path) -> list[os.DirEntry[str]]:
    """The entries of a folder conduit made; a symlink among them was planted, and is refused."""
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink():
            raise LinkRefusedError(shown / entry.name)
    return entries


class LocalDestination:
    """Every folder and file below ``path`` is made, opened, renamed and deleted through descriptors of the folders
    conduit made, never through a symlink: the output folder may be shared, and a link planted in it must not make
    a run truncate, delete or publish anything outside it (``path`` itself is the user's and is followed)."""

    def __init__(self, spec: LocalDestinationSpec, pipeline: str, *, accumulate: bool = False) -> None:
        self.spec = spec
        self.pipeline = pipeline
        # accumulate: every run (an incremental load) adds its parts, named part-<generation>-NNNNNN, to the
        # output instead of replacing it; each part appears whole, by rename, when the run publishes
        self.accumulate = accumulate
        self.root = spec.path
        self.visible = self.root / pipeline
        self.staging_root = self.root / STAGING
        self.generation: str | None = None

    def describe(self) -> str:
        return str(self.visible)

    @property
    def _gen_name(self) -> str:
        assert self.generation is not None
        return f"{self.pipeline}.{self.generation}"

    @property
    def _gen_dir(self) -> Path:
        return self.staging_root / self._gen_name

    @contextmanager
    def _dirs(self) -> Iterator[tuple[int, int]]:
        """Descriptors of ``path`` and of its staging folder (both made if missing)."""
        with ExitStack() as own:
            root = open_dir(self.root, create=True)
            own.callback(os.close, root)
            staging = open_subdir(root, STAGING, self.staging_root, create=True)
            own.callback(os.close, staging)
            yield root, staging

    def _open_gen(self, stack: ExitStack, staging: int) -> int:
        fd = open_subdir(staging, self._gen_name, self._gen_dir)
        stack.callback(os.close, fd)
        return fd

    def _marker(self, parent: int, name: str, shown: Path) -> str | None:
        """The generation marker of the folder ``name`` in ``parent``; None if it or its marker is missing."""
        refuse_link(parent, name, shown)
        try:
            fd = open_subdir(parent, name, shown)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = read_file_at(fd, MARKER, shown / MARKER)
        finally:
            os.close(fd)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def _fail(self, what: str, exc: OSError) -> DestinationError:
        if isinstance(exc, LinkRefusedError):
            return DestinationError(
                f"destination {self.spec.name!r}: {exc.message}. Nothing was published and the checkpoint is unchanged"
            )
        return DestinationError(
            f"destination {self.spec.name!r}: cannot {what} under {self.root} ({exc.strerror or exc}); "
            "nothing was published and the checkpoint is unchanged"
        )

    def _check_visible_is_ours(self, root: int) -> None:
        """Refuse to replace anything at the output path that conduit did not publish."""
        try:
            st = os.stat(self.pipeline, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise LinkRefusedError(self.visible)
        if not stat.S_ISDIR(st.st_mode):
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.visible} exists and is not a directory conduit wrote; "
                "move it away or point the destination's path elsewhere. Nothing was changed"
            )
        fd = open_subdir(root, self.pipeline, self.visible)
        try:
            empty = not os.listdir(fd)
        finally:
            os.close(fd)
        if not empty and self._marker(root, self.pipeline, self.visible) is None:
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.visible} holds files conduit did not write (no {MARKER} marker), "
                "and publishing would replace them; move them away or point the destination's path elsewhere. "
                "Nothing was changed"
            )

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            with self._dirs() as (root, staging):
                self._check_visible_is_ours(root)
                if state is None:
                    return self._start_fresh(staging)
                return self._resume(root, staging, state, committed)
        except OSError as exc:
            raise self._fail("prepare the output", exc) from None

    def _start_fresh(self, staging: int) -> Resumption:
        # Leftovers of runs that died before their first checkpoint, or of old swaps.
        with os.scandir(staging) as it:
            stale = [e for e in it if e.name.startswith(f"{self.pipeline}.")]
        for entry in stale:
            if entry.is_symlink():
                raise LinkRefusedError(self.staging_root / entry.name)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, ignore_errors=True, dir_fd=staging)  # never follows a link inside
        self.generation = uuid.uuid4().hex
        os.mkdir(self._gen_name, dir_fd=staging)
        with ExitStack() as stack:
            gen = self._open_gen(stack, staging)
            write_atomic_at(gen, MARKER, (self.generation + "\n").encode(), self._gen_dir / MARKER)
        os.fsync(staging)
        return Resumption({"generation": self.generation})

    def _published_parts(self, root: int, committed: int) -> int:
        """How many of this generation's committed parts (0..committed-1) are in the accumulating output."""
        try:
            fd = open_subdir(root, self.pipeline, self.visible)
        except FileNotFoundError:
            return 0
        try:
            present = 0
            for index in range(committed):
                name = self._published_name(f"part-{index:06d}.{_EXT[self.spec.format]}")
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                present += stat.S_ISREG(st.st_mode)
            return present
        finally:
            os.close(fd)

    def _published_name(self, part: str) -> str:
        assert self.generation is not None
        return f"part-{self.generation[:12]}-{part.removeprefix('part-')}"

    def _resume(self, root: int, staging: int, state: dict[str, Any], committed: int) -> Resumption:
        generation = state.get("generation")
        if not isinstance(generation, str) or not generation.isalnum():
            raise CheckpointError(f"pipeline {self.pipeline!r}: the checkpoint names no valid output generation")
        self.generation = generation
        staged = self._marker(staging, self._gen_name, self._gen_dir)
        hint = f"conduit clear-checkpoints --pipeline-name {self.pipeline}"
        if self.accumulate and staged != generation:
            # The generation folder goes (marker first) only when its parts have all been moved into the output.
            # A folder gone for another reason (deleted by hand) took its committed parts with it: resuming as if
            # published would advance the incremental state past rows that are nowhere. So: published only if
            # every committed part is in the output.
            present = self._published_parts(root, committed)
            if present < committed:
                also = (
                    ""
                    if present == 0
                    else f" delete the {present} parts {self.visible}/part-{generation[:12]}-* that did arrive, then"
                )
                raise CheckpointError(
                    f"pipeline {self.pipeline!r}: the checkpoint's unfinished output {self._gen_dir} is missing (deleted "
                    f"before it was published?) and only {present} of its {committed} committed parts are in "
                    f"{self.visible}, so it cannot be resumed and the incremental state was not advanced. To load those "
                    f"rows again from the stored incremental state,{also} run `{hint}`"
                )
            shutil.rmtree(self._gen_name, ignore_errors=True, dir_fd=staging)  # finish the clean-up
            return Resumption(state, already_published=True)
        if not self.accumulate and self._marker(root, self.pipeline, self.visible) == generation:
            # Crashed after publishing, before the checkpoint was deleted: finish the clean-up.
            if staged != generation and _lexists(staging, self._gen_name):
                shutil.rmtree(self._gen_name, dir_fd=staging)
            return Resumption(state, already_published=True)
        if staged != generation:
            raise CheckpointError(
                f"pipeline {self.pipeline!r}: the checkpoint's unfinished output {self._gen_dir} is missing, "
                f"so it cannot be resumed; start over with `{hint}`"
            )
        with ExitStack() as stack:
            gen = self._open_gen(stack, staging)
            # Parts written after the last checkpoint are replays-to-be: drop them so that a source that
            # now yields fewer batches cannot leave stale rows behind.
            for entry in _entries(gen, self._gen_dir):
                match = _PART.match(entry.name)
                if (match and int(match.group(1)) >= committed) or entry.name.startswith(".part-"):
                    os.unlink(entry.name, dir_fd=gen)
            os.fsync(gen)
        return Resumption(state)

    def write(self, index: int, table: pa.Table, key_column: str | None = None, last_key: Any = None) -> None:
        name = f"part-{index:06d}.{_EXT[self.spec.format]}"
        tmp = f".{name}.tmp"
        try:
            with self._dirs() as (_, staging), ExitStack() as stack:
                gen = self._open_gen(stack, staging)
                try:
                    fd = open_file(gen, tmp, self._gen_dir / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:  # left by a write that failed; a link there was planted (refused)
                    refuse_link(gen, tmp, self._gen_dir / tmp)
                    os.unlink(tmp, dir_fd=gen)
                    fd = open_file(gen, tmp, self._gen_dir / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    with os.fdopen(fd, "wb") as f:
                        write_part(table, self.spec.format, f)
                        f.flush()
                        os.fsync(f.fileno())
                    refuse_link(gen, name, self._gen_dir / name)
                    os.replace(tmp, name, src_dir_fd=gen, dst_dir_fd=gen)
                except BaseException:
                    try:
                        os.unlink(tmp, dir_fd=gen)
                    except FileNotFoundError:
                        pass
                    raise
                os.fsync(gen)
        except OSError as exc:
            raise self._fail(f"write part {name}", exc) from None

    def close(self) -> None:
        pass

    def _publish_parts(self, root: int, staging: int) -> None:
        """Move this run's parts into the output one rename at a time (each appears whole); a crash midway
        leaves the rest in the generation folder, which the resumed run publishes."""
        with ExitStack() as stack:
            gen = self._open_gen(stack, staging)
            entries = _entries(gen, self._gen_dir)
            visible = open_subdir(root, self.pipeline, self.visible, create=True)
            stack.callback(os.close, visible)
            if read_file_at(visible, MARKER, self.visible / MARKER) is None:
                # a new output folder, or an empty one (all _check_visible_is_ours lets through without a marker)
                write_atomic_at(visible, MARKER, b"accumulating output\n", self.visible / MARKER)
            for entry in entries:
                if entry.name.startswith("part-"):
                    os.rename(entry.name, self._published_name(entry.name), src_dir_fd=gen, dst_dir_fd=visible)
            os.fsync(visible)
            os.unlink(MARKER, dir_fd=gen)  # from here on, a resume knows the parts are all published
            os.fsync(gen)
        shutil.rmtree(self._gen_name, dir_fd=staging)
        os.fsync(staging)

    def count(self) -> int | None:
        if self.visible.is_symlink() or not self.visible.is_dir():
            return None
        if self.spec.format == "parquet":
            import pyarrow.dataset as ds

            return int(ds.dataset(self.visible, format="parquet").count_rows())
        return sum(count_rows(self.spec.format, str(p)) for p in self.visible.glob(f"part-*.{_EXT[self.spec.format]}"))

    def publish(self, batches: int | None = None) -> None:
        try:
            with self._dirs() as (root, staging):
                self._check_visible_is_ours(root)
                if self.accumulate:
                    self._publish_parts(root, staging)
                    return
                with ExitStack() as stack:
                    _entries(self._open_gen(stack, staging), self._gen_dir)  # a part swapped for a link is not published
                try:
                    os.rmdir(self.pipeline, dir_fd=root)  # an empty output folder: rmdir removes no other
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if not _lexists(root, self.pipeline):
                    os.rename(self._gen_name, self.pipeline, src_dir_fd=staging, dst_dir_fd=root)
                elif _exchange(staging, self._gen_name, root, self.pipeline):
                    shutil.rmtree(self._gen_name, dir_fd=staging)  # now holds the previous output
                else:
                    old = f"{self.pipeline}.old{self.generation}"
                    refuse_link(staging, old, self.staging_root / old)
                    os.rename(self.pipeline, old, src_dir_fd=root, dst_dir_fd=staging)
                    os.rename(self._gen_name, self.pipeline, src_dir_fd=staging, dst_dir_fd=root)
                    shutil.rmtree(old, ignore_errors=True, dir_fd=staging)
                os.fsync(root)
                os.fsync(staging)
        except OSError as exc:
            raise self._fail("publish the output", exc) from None


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# --- the backend: ingest.yml `type: local` -----------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str) -> LocalDestinationSpec:
    e.finish(_KEYS)
    path = entry_path(e, file.parent)
    return LocalDestinationSpec(name=name, path=path, format=e.choice("format", FORMATS, default="parquet"))


def _check(dest: LocalDestinationSpec) -> str:
    """`conduit validate`: the directory (or its nearest existing parent) is writable."""
    existing = dest.path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DestinationError(f"destination {dest.name!r}: {existing} is not a writable directory")
    return f"{dest.path} ({dest.format})"


_KEYS = frozenset({"name", "type", "path", "format"})
BACKEND = register_destination_backend(
    DestinationBackend(
        type="local",
        keys=_KEYS,
        parse=_parse,
        open=LocalDestination,
        identity=lambda d, pipeline: f"local:{d.path}?format={d.format}",
        uri=lambda d, pipeline: (d.path / pipeline).as_uri(),
        kinds=lambda d: {FORMAT_KINDS[d.format]},
        check=_check,
        local_output=lambda d, pipeline: (d.path / pipeline, d.format),
    )
)
