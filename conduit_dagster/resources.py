"""Dagster ConfigurableResources that hand back engine objects.

``CheckpointStoreResource`` is the base type assets ask for; any subclass bound under the
``checkpoints`` key works (the local one today, an S3 one next to it).
"""

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from conduit_dagster.engine.checkpoint import CheckpointStore, LocalCheckpointStore, resolve_checkpoint_dir


class CheckpointStoreResource(ConfigurableResource):
    """Where pipeline checkpoints are kept."""

    def open_store(self, base_dir: Path) -> CheckpointStore:
        """The store to use; ``base_dir`` is ingest.yml's folder, for relative locations."""
        raise NotImplementedError


class LocalCheckpointStoreResource(CheckpointStoreResource):
    """Checkpoints as JSON files in a local directory.

    The directory is, first found: this resource's ``directory`` config (set it from the
    launchpad), $CONDUIT_CHECKPOINT_DIR, then ``.checkpoints/`` beside ingest.yml. Relative
    paths are taken from ingest.yml's folder. Read at run time, never at import.
    """

    directory: str | None = Field(
        default=None,
        description="Checkpoint directory; default $CONDUIT_CHECKPOINT_DIR, else .checkpoints/ beside ingest.yml",
    )

    def resolve_directory(self, base_dir: Path) -> Path:
        return resolve_checkpoint_dir(base_dir, self.directory)

    def open_store(self, base_dir: Path) -> CheckpointStore:
        return LocalCheckpointStore(self.resolve_directory(base_dir))
