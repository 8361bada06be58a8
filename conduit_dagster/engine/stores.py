"""Which checkpoint store a deployment uses, without a code change.

First found: ``$CONDUIT_CHECKPOINTS`` (a directory, or ``s3://bucket/prefix``), ``$CONDUIT_CHECKPOINT_DIR``
(a directory), the ``checkpoints:`` section of ingest.yml, then ``.checkpoints/`` beside ingest.yml.
The Dagster resource's own config (set in code or the launchpad) overrides each of these per field.
"""

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from conduit_dagster.engine.checkpoint import CHECKPOINT_DIR_ENV, CheckpointStore, LocalCheckpointStore, resolve_checkpoint_dir
from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.spec import CheckpointsSpec

CHECKPOINTS_ENV = "CONDUIT_CHECKPOINTS"


def checkpoint_settings(configured: CheckpointsSpec | None, env: Mapping[str, str] | None = None) -> CheckpointsSpec:
    env = os.environ if env is None else env
    location = env.get(CHECKPOINTS_ENV) or ""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise SpecError(f"${CHECKPOINTS_ENV}: {location!r} names no bucket; write s3://bucket/prefix")
        # endpoint, region and lease settings still come from ingest.yml's s3 section, if it has one
        base = configured if configured is not None and configured.type == "s3" else CheckpointsSpec(type="s3")
        return replace(base, type="s3", bucket=bucket, prefix=prefix.strip("/"), directory=None)
    if location or env.get(CHECKPOINT_DIR_ENV):
        return CheckpointsSpec(type="local", directory=location or env[CHECKPOINT_DIR_ENV])
    return configured if configured is not None else CheckpointsSpec()


def open_checkpoint_store(settings: CheckpointsSpec, base_dir: Path, *, s3_client: Any = None) -> CheckpointStore:
    """The store ``settings`` name; relative directories are taken from ``base_dir`` (ingest.yml's folder)."""
    if settings.type == "s3":
        from conduit_dagster.engine.checkpoint_s3 import S3CheckpointStore
        from conduit_dagster.engine.s3 import make_client

        if not settings.bucket:
            raise SpecError(f"the S3 checkpoint store has no bucket; set checkpoints.bucket in ingest.yml or ${CHECKPOINTS_ENV}")
        return S3CheckpointStore(
            s3_client if s3_client is not None else make_client(settings.s3),
            settings.bucket,
            settings.prefix,
            lease_seconds=settings.lease_seconds,
            conditional_writes=settings.conditional_writes,
        )
    return LocalCheckpointStore(resolve_checkpoint_dir(base_dir, settings.directory))
