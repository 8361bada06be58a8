"""Dagster ConfigurableResources that hand back engine objects.

``CheckpointStoreResource`` is the base type assets, checks and sensors ask for; the definitions bind
the local or the S3 one under the ``checkpoints`` key, as ingest.yml or the environment choose
(``conduit_dagster.engine.stores``). Every field is optional: an unset field falls back, at run time,
to the environment and then ingest.yml, so a launchpad config that sets one field keeps the rest.
"""

import os
from typing import Any

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource
from pydantic import Field

from conduit_dagster.engine.checkpoint import CheckpointStore, LocalCheckpointStore, resolve_checkpoint_dir
from conduit_dagster.engine.checkpoint_s3 import S3CheckpointStore
from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.spec import CheckpointsSpec, IngestSpec
from conduit_dagster.engine.stores import CHECKPOINTS_ENV, checkpoint_settings, open_checkpoint_store


class CheckpointStoreResource(ConfigurableResource):
    """Where pipeline checkpoints are kept."""

    location: str | None = Field(
        default=None,
        description="A directory or s3://bucket/prefix for this run's checkpoints: overrides the environment and "
        "ingest.yml, and may switch between a local and an S3 store",
    )

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        """The store to use for the pipelines of ``spec`` (its folder anchors relative locations)."""
        raise NotImplementedError

    def _settings(self, spec: IngestSpec) -> CheckpointsSpec:
        env = {**os.environ, CHECKPOINTS_ENV: self.location} if self.location else None
        return checkpoint_settings(spec.checkpoints, env)


class LocalCheckpointStoreResource(CheckpointStoreResource):
    """Checkpoints as JSON files in a local directory.

    The directory is, first found: this resource's ``directory`` config (set it from the
    launchpad), $CONDUIT_CHECKPOINTS / $CONDUIT_CHECKPOINT_DIR, ingest.yml's ``checkpoints.directory``,
    then ``.checkpoints/`` beside ingest.yml. Relative paths are taken from ingest.yml's folder.
    """

    directory: str | None = Field(
        default=None,
        description="Checkpoint directory; default $CONDUIT_CHECKPOINT_DIR, ingest.yml's checkpoints.directory, "
        "else .checkpoints/ beside ingest.yml",
    )

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        settings = self._settings(spec)
        if settings.type == "s3" and self.location:  # the launchpad switched this run to S3
            return open_checkpoint_store(settings, spec.base_dir)
        configured = (None if self.location else self.directory) or (settings.directory if settings.type == "local" else None)
        return LocalCheckpointStore(resolve_checkpoint_dir(spec.base_dir, configured))


class S3CheckpointStoreResource(CheckpointStoreResource, S3Resource):
    """Checkpoints as JSON objects under ``s3://<bucket>/<prefix>/``, one run owning each pipeline (a lease
    object and conditional writes; see ``conduit_dagster.engine.checkpoint_s3``).

    Built on dagster-aws's ``S3Resource``: its fields (endpoint_url, region_name, aws_access_key_id,
    aws_secret_access_key with ``dagster.EnvVar``, profile_name, ...) say how to reach S3; unset, they come
    from ingest.yml's ``checkpoints:`` section and the usual AWS environment.
    """

    bucket: str | None = Field(default=None, description="Bucket; default from $CONDUIT_CHECKPOINTS or ingest.yml")
    prefix: str | None = Field(default=None, description="Key prefix; default from $CONDUIT_CHECKPOINTS or ingest.yml")
    lease_seconds: int | None = Field(
        default=None, description="A dead run's lease is taken over this long after its last renewal (default 60)"
    )
    conditional_writes: bool | None = Field(
        default=None, description="Require S3 conditional writes (If-None-Match / If-Match) to guard ownership (default true)"
    )

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        settings = self._settings(spec)
        if settings.type == "local" and self.location:  # the launchpad switched this run to a directory
            return open_checkpoint_store(settings, spec.base_dir)
        if self.location:  # s3://bucket/prefix given here wins over the bucket and prefix fields
            return self._open(spec, settings.bucket, settings.prefix, settings)
        return self._open(spec, self.bucket, self.prefix, settings)

    def _open(self, spec: IngestSpec, bucket: str | None, prefix: str | None, settings: CheckpointsSpec) -> CheckpointStore:
        bucket = bucket or (settings.bucket if settings.type == "s3" else None)
        if not bucket:
            raise SpecError(
                f"the checkpoints resource (S3) has no bucket: set its `bucket` config, ${CHECKPOINTS_ENV}=s3://bucket/prefix, "
                f"or `checkpoints: {{type: s3, bucket: ...}}` in {spec.path}"
            )
        s3 = settings.s3
        client = self._client(self.endpoint_url or s3.endpoint_url, self.region_name or s3.region)
        return S3CheckpointStore(
            client,
            bucket,
            prefix if prefix is not None else settings.prefix,
            lease_seconds=self.lease_seconds or settings.lease_seconds,
            conditional_writes=settings.conditional_writes if self.conditional_writes is None else self.conditional_writes,
        )

    def _client(self, endpoint_url: str | None, region_name: str | None) -> Any:
        """A client from S3Resource's fields, as its get_client() builds one, plus a 5 s connect timeout: a checkpoint
        store that cannot be reached fails the run in seconds, not after boto's 60 s per attempt."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile_name)
        return session.client(
            "s3",
            region_name=region_name,
            endpoint_url=endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )


def checkpoint_resource(spec: IngestSpec) -> CheckpointStoreResource:
    """The resource the environment and ingest.yml choose; its settings are read again at run time."""
    if checkpoint_settings(spec.checkpoints).type == "s3":
        return S3CheckpointStoreResource()
    return LocalCheckpointStoreResource()
