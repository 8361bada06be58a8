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

A partitioned pipeline has the same design one level down, one output folder per partition::

    out/orders/2024-01-01/                          partition 2024-01-01's output: its last finished run's parts
        part-000000.parquet ...
        _conduit_generation
    out/orders/2024-01-02/ ...
    out/_conduit_staging/orders/2024-01-01.<gen>/   a run of that partition in progress

Publishing a partition swaps its staging folder with ``out/orders/<key>/`` alone: a reader sees that partition's
old or new output, never a mix, and every other partition's folder is untouched. Each partition's bookkeeping
(its generation folder, the clean-up of folders its dead runs left, the previous output it swaps out) is named
``<key>.`` in ``out/_conduit_staging/orders/``; keys hold no ``.``, so partitions of one pipeline running at the same
time in different processes never touch each other's folders, nor the unpartitioned layout's ``orders.<gen>``
(whose clean-up, in turn, never reaches the ``orders`` folder). A zero-row partition publishes a folder with its
marker and no part (as a zero-row run of an unpartitioned pipeline does): its earlier rows are gone, readers see
none, and no schema file is invented (the destination sees no batch to take one from).

The folder is the partition key as is (``out/orders/2024-01-01/``, ``out/orders/r03/``), not hive-style
``l_shipdate=2024-01-01``: the rows already hold the partition column with its real values, and a hive-aware reader
(DuckDB's ``hive_partitioning``, Spark, ``pyarrow.dataset`` with ``partitioning="hive"``) would add or overwrite that
column with the directory's text, the window's start rather than each row's value (and ``r03`` for key ranges). An
hourly key holds ``:`` (``2024-01-31-13:00``), which Linux and macOS accept in a folder name.

Reading every partition: the part files below ``out/orders/``, e.g. ``pyarrow.dataset.dataset("out/orders",
format="parquet")`` (recursive; skips ``_`` and ``.`` names) or DuckDB's ``read_parquet('out/orders/*/*.parquet')``.
Runs in progress live under ``out/_conduit_staging/``, outside ``out/orders/``, so such a glob never sees them. A
pipeline's output is either one folder or partitioned: a partitioned run refuses ``out/orders/`` while it holds an
unpartitioned output, and an unpartitioned run refuses it while it holds partitions.
"""

import ctypes
import ctypes.util
import errno
import os
import re
import shlex
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
from conduit_dagster.engine.destinations.layout import PARTITION_KEY, check_partition, cleared_partition, leftover_lines
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.partitions import Partition
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

    def __init__(
        self, spec: LocalDestinationSpec, pipeline: str, *, accumulate: bool = False, partition: Partition | None = None
    ) -> None:
        self.spec = spec
        self.pipeline = pipeline
        # accumulate: every run (an incremental load) adds its parts, named part-<generation>-NNNNNN, to the
        # output instead of replacing it; each part appears whole, by rename, when the run publishes
        self.accumulate = accumulate
        self.partition = partition
        self.root = spec.path
        self.staging_root = self.root / STAGING
        if partition is None:
            self.unit = pipeline
            self.what = f"pipeline {pipeline!r}"
            self.out_dir = self.root  # the folder that holds the visible output folder ...
            self.name = pipeline  # ... named so in it
            self.stage_dir = self.staging_root  # the folder that holds this output's generation folders ...
            self.stage_prefix = f"{pipeline}."  # ... each named so, then the generation
        else:
            check_partition(spec.name, pipeline, partition, accumulate=accumulate, names="folder")
            self.unit = partition.unit
            self.what = f"pipeline {pipeline!r} partition {partition.key!r}"
            self.out_dir = self.root / pipeline
            self.name = partition.key
            self.stage_dir = self.staging_root / pipeline
            self.stage_prefix = f"{partition.key}."
        self.visible = self.out_dir / self.name
        self.generation: str | None = None

    def describe(self) -> str:
        return str(self.visible)

    @property
    def _gen_name(self) -> str:
        assert self.generation is not None
        return f"{self.stage_prefix}{self.generation}"

    @property
    def _gen_dir(self) -> Path:
        return self.stage_dir / self._gen_name

    @contextmanager
    def _dirs(self) -> Iterator[tuple[int, int]]:
        """Descriptors of the folder holding the output folder and of the one holding the generation folders, made
        if missing: ``path`` and ``path/_conduit_staging``, or for a partition ``path/<pipeline>`` and
        ``path/_conduit_staging/<pipeline>``."""
        with ExitStack() as own:
            root = open_dir(self.root, create=True)
            own.callback(os.close, root)
            staging = open_subdir(root, STAGING, self.staging_root, create=True)
            own.callback(os.close, staging)
            if self.partition is None:
                yield root, staging
                return
            out = open_subdir(root, self.pipeline, self.out_dir, create=True)
            own.callback(os.close, out)
            self._check_not_unpartitioned(out)
            stage = open_subdir(staging, self.pipeline, self.stage_dir, create=True)
            own.callback(os.close, stage)
            yield out, stage

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

    def _check_not_unpartitioned(self, out: int) -> None:
        """A partition's output goes into ``path/<pipeline>/<key>/``: refuse while ``path/<pipeline>/`` holds an
        unpartitioned run's output, which a reader of the folder would see next to the partitions'."""
        if self.partition is None or not _lexists(out, MARKER):
            return
        raise DestinationError(
            f"destination {self.spec.name!r}: {self.out_dir} holds the output of an unpartitioned run of {self.pipeline!r} "
            f"(its {MARKER} marker and part files), and a partitioned pipeline writes each partition into "
            f"{self.out_dir}/<partition key>/, where readers of {self.out_dir} would see both. Move that output away (or "
            "delete it), or point the destination's path elsewhere. Nothing was changed"
        )

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
            st = os.stat(self.name, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise LinkRefusedError(self.visible)
        if not stat.S_ISDIR(st.st_mode):
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.visible} exists and is not a directory conduit wrote; "
                "move it away or point the destination's path elsewhere. Nothing was changed"
            )
        fd = open_subdir(root, self.name, self.visible)
        try:
            names = os.listdir(fd)
            if names and self.partition is None and self._marker(root, self.name, self.visible) is None:
                partitions = sorted(n for n in names if PARTITION_KEY.match(n) and self._marker(fd, n, self.visible / n))
                if partitions:
                    raise DestinationError(
                        f"destination {self.spec.name!r}: {self.visible} holds the partitions of a partitioned run of "
                        f"{self.pipeline!r} ({', '.join(partitions[:3])}{' ...' if len(partitions) > 3 else ''}), which "
                        "publishing this unpartitioned output would replace; move them away (or delete them), or point the "
                        "destination's path elsewhere. Nothing was changed"
                    )
        finally:
            os.close(fd)
        if names and self._marker(root, self.name, self.visible) is None:
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
            stale = [e for e in it if e.name.startswith(self.stage_prefix)]  # this output's own, never another's
        for entry in stale:
            if entry.is_symlink():
                raise LinkRefusedError(self.stage_dir / entry.name)
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
            fd = open_subdir(root, self.name, self.visible)
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
            raise CheckpointError(f"{self.what}: the checkpoint names no valid output generation")
        self.generation = generation
        staged = self._marker(staging, self._gen_name, self._gen_dir)
        hint = f"conduit clear-checkpoints --pipeline-name {self.unit}"
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
                    f"{self.what}: the checkpoint's unfinished output {self._gen_dir} is missing (deleted "
                    f"before it was published?) and only {present} of its {committed} committed parts are in "
                    f"{self.visible}, so it cannot be resumed and the incremental state was not advanced. To load those "
                    f"rows again from the stored incremental state,{also} run `{hint}`"
                )
            shutil.rmtree(self._gen_name, ignore_errors=True, dir_fd=staging)  # finish the clean-up
            return Resumption(state, already_published=True)
        if not self.accumulate and self._marker(root, self.name, self.visible) == generation:
            # Crashed after publishing, before the checkpoint was deleted: finish the clean-up.
            if staged != generation and _lexists(staging, self._gen_name):
                shutil.rmtree(self._gen_name, dir_fd=staging)
            return Resumption(state, already_published=True)
        if staged != generation:
            raise CheckpointError(
                f"{self.what}: the checkpoint's unfinished output {self._gen_dir} is missing, "
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
            visible = open_subdir(root, self.name, self.visible, create=True)
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
                    os.rmdir(self.name, dir_fd=root)  # an empty output folder: rmdir removes no other
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if not _lexists(root, self.name):
                    os.rename(self._gen_name, self.name, src_dir_fd=staging, dst_dir_fd=root)
                elif _exchange(staging, self._gen_name, root, self.name):
                    shutil.rmtree(self._gen_name, dir_fd=staging)  # now holds the previous output
                else:
                    old = f"{self.stage_prefix}old{self.generation}"
                    refuse_link(staging, old, self.stage_dir / old)
                    os.rename(self.name, old, src_dir_fd=root, dst_dir_fd=staging)
                    os.rename(self._gen_name, self.name, src_dir_fd=staging, dst_dir_fd=root)
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


def _leftover(destination_id: str, state: dict[str, Any], pipeline: str) -> list[str] | None:
    """A partition's generation folder, when its checkpoint (``pipeline``: ``<pipeline>.<key>``) is cleared (see
    ``layout.cleared_partition``)."""
    cleared = cleared_partition(destination_id, "local:", state, pipeline)
    if cleared is None:
        return None
    base, key, generation = cleared
    path = Path(destination_id.removeprefix("local:").rpartition("?format=")[0])
    staged = path / STAGING / base / f"{key}.{generation}"
    return leftover_lines(str(staged), key, f"rm -rf {shlex.quote(str(staged))}")


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
        leftover=_leftover,
        partitioned=True,
    )
)
