"""The engine: config, checkpoints, sources, destinations and the batch loop. Never imports dagster."""

from conduit_dagster.engine.checkpoint import Checkpoint, CheckpointStore, LocalCheckpointStore
from conduit_dagster.engine.errors import (
    CheckpointError,
    ConduitError,
    DestinationError,
    OrderingError,
    SourceError,
    SpecError,
)
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, run_pipeline
from conduit_dagster.engine.spec import IngestSpec, ResourceSpec, load_spec

__all__ = [
    "BatchCommitted",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "ConduitError",
    "DestinationError",
    "IngestSpec",
    "LocalCheckpointStore",
    "OrderingError",
    "ResourceSpec",
    "RunFinished",
    "RunStarted",
    "SourceError",
    "SpecError",
    "load_spec",
    "run_pipeline",
]
