"""The partition layout shared by the file destinations (local and S3): one output folder or key prefix per
partition, named by the partition key as is. Both backends must accept the same keys and read a cleared
partition's checkpoint the same way, so the rules live here once."""

import re
from typing import Any

from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.partitions import Partition, split_unit

# a partition key as a folder name or a key segment: no '/', no '.', not hidden ('_', '.') from readers
PARTITION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:+\-]*$")


def check_partition(destination: str, pipeline: str, partition: Partition, *, accumulate: bool, names: str) -> None:
    """Refuse a partition whose key cannot name its output (``names``: "folder" or "prefix"), and an incremental
    load of a partitioned pipeline: each partition's run replaces that partition's output, so it cannot add to it."""
    if not PARTITION_KEY.match(partition.key):
        raise DestinationError(
            f"destination {destination!r}: partition key {partition.key!r} of pipeline {pipeline!r} cannot name a "
            f"{names} (letters, digits, '_', ':' and '-' only, starting with a letter or digit)"
        )
    if accumulate:
        raise DestinationError(
            f"destination {destination!r}: pipeline {pipeline!r} is partitioned, so each run replaces its partition; "
            "it cannot also add to it (an incremental load)"
        )


def cleared_partition(destination_id: str, scheme: str, state: dict[str, Any], unit: str) -> tuple[str, str, str] | None:
    """(pipeline, partition key, generation) of a cleared checkpoint ``state`` named ``unit`` when it is a partition's,
    of a destination whose identity begins with ``scheme``, with a generation in progress that names a staging place
    safely; None otherwise (another backend's, an unpartitioned pipeline's, or a value not written by conduit, which
    must not be put into a path or a command).

    Only a partition's staging is reported: the partition's next run removes it (as an unpartitioned pipeline's next
    run removes its own, so that one is not reported), but a partition may never run again (its key ranges re-planned
    into fewer, its window past a new ``end``), and then nothing else would."""
    if not destination_id.startswith(scheme):
        return None
    base, key = split_unit(unit)
    generation = state.get("generation")
    if key is None or not PARTITION_KEY.match(key) or not isinstance(generation, str) or not generation.isalnum():
        return None
    return base, key, generation


def leftover_lines(staged: str, key: str, delete: str) -> list[str]:
    """What `conduit checkpoints clear` says of a cleared partition's staged output: where it stays, and the command
    ``delete`` that removes it."""
    return [f"its unfinished output stays in {staged} until partition {key} runs again; if it will not, delete it with:", delete]
