"""A failure injected from the tests: a checkpoint store that raises on its Nth save while a flag
file exists. The batch before it is already written, so the re-execution must replay it without
duplicating a row. Product code has no switch for this; the test binds this resource instead.
"""

from pathlib import Path

from dagster import Definitions, JobDefinition
from dagster_aws.s3 import S3Resource

from conduit_dagster.assets import build_ingest_assets, build_ingest_jobs
from conduit_dagster.engine.checkpoint import Checkpoint, CheckpointStore
from conduit_dagster.engine.spec import IngestSpec, load_spec
from conduit_dagster.resources import LocalCheckpointStoreResource, S3CheckpointStoreResource


class InjectedFailure(RuntimeError):
    pass


class _FailingStore:
    def __init__(self, inner: CheckpointStore, fail_at_save: int, flag_file: Path) -> None:
        self.inner = inner
        self.fail_at_save = fail_at_save
        self.flag_file = flag_file
        self.saves = 0

    def save(self, checkpoint: Checkpoint) -> None:
        self.saves += 1
        if self.saves == self.fail_at_save and self.flag_file.exists():
            raise InjectedFailure(f"injected failure before checkpoint save {self.saves}")
        self.inner.save(checkpoint)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class FailingCheckpointStoreResource(LocalCheckpointStoreResource):
    fail_at_save: int
    flag_file: str

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        return _FailingStore(super().open_store(spec), self.fail_at_save, Path(self.flag_file))  # type: ignore[return-value]


def build_job(ingest_path: str, checkpoint_dir: str, fail_at_save: int, flag_file: str, job_name: str) -> JobDefinition:
    spec = load_spec(ingest_path)
    defs = Definitions(
        assets=build_ingest_assets(spec),
        jobs=build_ingest_jobs(spec),
        resources={
            "checkpoints": FailingCheckpointStoreResource(
                directory=checkpoint_dir, fail_at_save=fail_at_save, flag_file=flag_file
            )
        },
    )
    return defs.resolve_job_def(job_name)


class FailingS3CheckpointStoreResource(S3CheckpointStoreResource):
    fail_at_save: int
    flag_file: str

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        return _FailingStore(super().open_store(spec), self.fail_at_save, Path(self.flag_file))  # type: ignore[return-value]


def build_s3_job(ingest_path: str, fail_at_save: int, flag_file: str, job_name: str) -> JobDefinition:
    """The checkpoint store (S3) comes from ingest.yml's checkpoints: section, as in production."""
    spec = load_spec(ingest_path)
    defs = Definitions(
        assets=build_ingest_assets(spec),
        jobs=build_ingest_jobs(spec),
        resources={
            "checkpoints": FailingS3CheckpointStoreResource(fail_at_save=fail_at_save, flag_file=flag_file),
            "s3": S3Resource(),
        },
    )
    return defs.resolve_job_def(job_name)
