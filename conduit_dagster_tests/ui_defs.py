"""Definitions for the UI-path tests: the product's assets, jobs and schedules over the ingest.yml
in $CONDUIT_INGEST_FILE, with the checkpoint store that fails once, on its Nth save, while the
flag file $CONDUIT_TEST_FAIL_FLAG exists (it deletes the flag as it fails: a transient fault)."""

import os
from pathlib import Path

from dagster import Definitions

from conduit_dagster.assets import build_ingest_assets, build_ingest_jobs
from conduit_dagster.engine.checkpoint import Checkpoint, CheckpointStore
from conduit_dagster.engine.spec import IngestSpec, load_spec
from conduit_dagster.resources import LocalCheckpointStoreResource
from conduit_dagster_tests.injected_defs import InjectedFailure


class _FailOnce:
    def __init__(self, inner: CheckpointStore, fail_at_save: int, flag: Path) -> None:
        self.inner, self.fail_at_save, self.flag, self.saves = inner, fail_at_save, flag, 0

    def save(self, checkpoint: Checkpoint) -> None:
        self.saves += 1
        if self.saves == self.fail_at_save and self.flag.exists():
            self.flag.unlink()
            raise InjectedFailure(f"injected failure before checkpoint save {self.saves}")
        self.inner.save(checkpoint)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class FailOnceCheckpointStoreResource(LocalCheckpointStoreResource):
    fail_at_save: int = 5
    flag_file: str = ""

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        return _FailOnce(super().open_store(spec), self.fail_at_save, Path(self.flag_file))  # type: ignore[return-value]


_spec = load_spec(os.environ["CONDUIT_INGEST_FILE"])
defs = Definitions(
    assets=build_ingest_assets(_spec),
    jobs=build_ingest_jobs(_spec),
    resources={"checkpoints": FailOnceCheckpointStoreResource(flag_file=os.environ["CONDUIT_TEST_FAIL_FLAG"])},
)
