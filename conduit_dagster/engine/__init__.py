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
from conduit_dagster.engine.partition_runs import select_partitions
from conduit_dagster.engine.partitions import Partition, PartitionsSpec, partition_keys, resolve_partition
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, RunWarning, run_pipeline
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
    "Partition",
    "PartitionsSpec",
    "ResourceSpec",
    "RunFinished",
    "RunStarted",
    "RunWarning",
    "SourceError",
    "SpecError",
    "load_spec",
    "partition_keys",
    "resolve_partition",
    "run_pipeline",
    "select_partitions",
]
