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
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.checkpoint import fsync_path
from conduit_dagster.engine.destinations.base import Resumption
from conduit_dagster.engine.destinations.formats import EXTENSIONS, count_rows, write_part
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.spec import LocalDestinationSpec

MARKER = "_conduit_generation"
STAGING = "_conduit_staging"
_EXT = EXTENSIONS
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


class LocalDestination:
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
    def _gen_dir(self) -> Path:
        assert self.generation is not None
        return self.staging_root / f"{self.pipeline}.{self.generation}"

    def _marker(self, directory: Path) -> str | None:
        try:
            return (directory / MARKER).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _fail(self, what: str, exc: OSError) -> DestinationError:
        return DestinationError(
            f"destination {self.spec.name!r}: cannot {what} under {self.root} ({exc.strerror or exc}); "
            "nothing was published and the checkpoint is unchanged"
        )

    def _check_visible_is_ours(self) -> None:
        """Refuse to replace anything at the output path that conduit did not publish."""
        if not os.path.lexists(self.visible):
            return
        if self.visible.is_symlink() or not self.visible.is_dir():
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.visible} exists and is not a directory conduit wrote; "
                "move it away or point the destination's path elsewhere. Nothing was changed"
            )
        if self._marker(self.visible) is None and any(self.visible.iterdir()):
            raise DestinationError(
                f"destination {self.spec.name!r}: {self.visible} holds files conduit did not write (no {MARKER} marker), "
                "and publishing would replace them; move them away or point the destination's path elsewhere. "
                "Nothing was changed"
            )

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        self._check_visible_is_ours()
        try:
            if state is None:
                return self._start_fresh()
            return self._resume(state, committed)
        except OSError as exc:
            raise self._fail("prepare the output", exc) from None

    def _start_fresh(self) -> Resumption:
        self.staging_root.mkdir(parents=True, exist_ok=True)
        # Leftovers of runs that died before their first checkpoint, or of old swaps.
        for stale in self.staging_root.glob(f"{self.pipeline}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.generation = uuid.uuid4().hex
        self._gen_dir.mkdir()
        (self._gen_dir / MARKER).write_text(self.generation + "\n", encoding="utf-8")
        fsync_path(self._gen_dir / MARKER)
        fsync_path(self._gen_dir)
        fsync_path(self.staging_root)
        return Resumption({"generation": self.generation})

    def _resume(self, state: dict[str, Any], committed: int) -> Resumption:
        generation = state.get("generation")
        if not isinstance(generation, str) or not generation.isalnum():
            raise CheckpointError(f"pipeline {self.pipeline!r}: the checkpoint names no valid output generation")
        self.generation = generation
        if self.accumulate and self._marker(self._gen_dir) != generation:
            # The generation folder goes (marker first) only when its parts have all been moved into the output,
            # so a missing folder, or one whose marker is gone, means the run had published: finish the clean-up.
            shutil.rmtree(self._gen_dir, ignore_errors=True)
            return Resumption(state, already_published=True)
        if not self.accumulate and self._marker(self.visible) == generation:
            # Crashed after publishing, before the checkpoint was deleted: finish the clean-up.
            if self._gen_dir.exists() and self._marker(self._gen_dir) != generation:
                shutil.rmtree(self._gen_dir)
            return Resumption(state, already_published=True)
        if self._marker(self._gen_dir) != generation:
            raise CheckpointError(
                f"pipeline {self.pipeline!r}: the checkpoint's unfinished output {self._gen_dir} is missing, "
                f"so it cannot be resumed; start over with `conduit clear-checkpoints --pipeline-name {self.pipeline}`"
            )
        # Parts written after the last checkpoint are replays-to-be: drop them so that a source that
        # now yields fewer batches cannot leave stale rows behind.
        for part in self._gen_dir.iterdir():
            if part.name.startswith("part-"):
                index = int(part.name.split("-")[1].split(".")[0])
                if index >= committed:
                    part.unlink()
            elif part.name.startswith(".part-"):
                part.unlink()
        fsync_path(self._gen_dir)
        return Resumption(state)

    def write(self, index: int, table: pa.Table, key_column: str | None = None, last_key: Any = None) -> None:
        name = f"part-{index:06d}.{_EXT[self.spec.format]}"
        final = self._gen_dir / name
        tmp = self._gen_dir / f".{name}.tmp"
        try:
            write_part(table, self.spec.format, str(tmp))
            fsync_path(tmp)
            os.replace(tmp, final)
            fsync_path(self._gen_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(f"write part {name}", exc) from None

    def close(self) -> None:
        pass

    def _publish_parts(self) -> None:
        """Move this run's parts into the output one rename at a time (each appears whole); a crash midway
        leaves the rest in the generation folder, which the resumed run publishes."""
        assert self.generation is not None
        try:
            if not self.visible.exists():
                self.visible.mkdir(parents=True)
                (self.visible / MARKER).write_text("accumulating output\n", encoding="utf-8")
            for part in sorted(self._gen_dir.glob("part-*")):
                os.rename(part, self.visible / f"part-{self.generation[:12]}-{part.name.removeprefix('part-')}")
            fsync_path(self.visible)
            (self._gen_dir / MARKER).unlink()  # from here on, a resume knows the parts are all published
            fsync_path(self._gen_dir)
            shutil.rmtree(self._gen_dir)
            fsync_path(self.staging_root)
        except OSError as exc:
            raise self._fail("publish the output", exc) from None

    def count(self) -> int | None:
        if not self.visible.is_dir():
            return None
        if self.spec.format == "parquet":
            import pyarrow.dataset as ds

            return int(ds.dataset(self.visible, format="parquet").count_rows())
        return sum(count_rows(self.spec.format, str(p)) for p in self.visible.glob(f"part-*.{_EXT[self.spec.format]}"))

    def publish(self, batches: int | None = None) -> None:
        self._check_visible_is_ours()
        if self.accumulate:
            self._publish_parts()
            return
        try:
            if self.visible.is_dir() and not any(self.visible.iterdir()):
                self.visible.rmdir()
            if not self.visible.exists():
                os.rename(self._gen_dir, self.visible)
            elif _exchange(self._gen_dir, self.visible):
                shutil.rmtree(self._gen_dir)  # now holds the previous output
            else:
                old = self.staging_root / f"{self.pipeline}.old{self.generation}"
                os.rename(self.visible, old)
                os.rename(self._gen_dir, self.visible)
                shutil.rmtree(old, ignore_errors=True)
            fsync_path(self.root)
            fsync_path(self.staging_root)
        except OSError as exc:
            raise self._fail("publish the output", exc) from None
