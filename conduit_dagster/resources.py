"""Dagster ConfigurableResources that hand back engine objects.

``CheckpointStoreResource`` is the base type assets, checks and sensors ask for; the definitions bind
the local or the S3 one under the ``checkpoints`` key, as ingest.yml or the environment choose
(``conduit_dagster.engine.stores``). Every field is optional: an unset field falls back, at run time,
to the environment and then ingest.yml, so a launchpad config that sets one field keeps the rest.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource
from pydantic import Field

from conduit_dagster.engine.checkpoint import CheckpointStore, LocalCheckpointStore, resolve_checkpoint_dir
from conduit_dagster.engine.checkpoint_s3 import S3CheckpointStore
from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.s3 import client_config, client_factory
from conduit_dagster.engine.spec import (
    CheckpointsSpec,
    IngestSpec,
    ResourceSpec,
    S3ConnectionSpec,
)
from conduit_dagster.engine.stores import CHECKPOINTS_ENV, checkpoint_settings, open_checkpoint_store

# "S3://", "s3:/", "gs://", "file://": a URL, not a directory; taken as a path it would make a folder named "S3:" and
# start a run with no checkpoint (a full load, or an incremental one from initial_value, loading rows twice)
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{0,61}[a-z0-9]$")  # lowercase letters, digits, dots, hyphens: never "KEY:SECRET@b"


def checked_location(location: str | None) -> str | None:
    """The ``location`` config, checked: a directory, or ``s3://bucket/prefix`` with a valid bucket; None when unset.

    Refused values are not echoed when they could hold credentials (``s3://KEY:SECRET@bucket``)."""
    value = (location or "").strip()
    if not value:
        return None
    after_scheme = value.partition(":")[2]
    shown = "the value given" if "@" in value or ":" in after_scheme else repr(value)
    fix = "write s3://bucket/prefix (credentials come from the AWS environment or the resource's aws_* fields) or a directory"
    if value.startswith("s3://"):
        bucket, _, prefix = value.removeprefix("s3://").partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise SpecError(f"the checkpoints resource's `location`: {shown} does not name a valid S3 bucket; {fix}")
        parts = prefix.strip("/").split("/")
        if prefix.strip("/") and any(part in ("", ".", "..") for part in parts):
            raise SpecError(f"the checkpoints resource's `location`: {shown} has an unclean key prefix (//, . or ..); {fix}")
        return value
    if _URL_LIKE.match(value):
        raise SpecError(f"the checkpoints resource's `location`: {shown} is neither a directory nor an s3:// URL; {fix}")
    return value


class CheckpointStoreResource(ConfigurableResource):
    """Where pipeline checkpoints are kept."""

    location: str | None = Field(
        default=None,
        description="A directory or s3://bucket/prefix for this run's checkpoints: overrides the environment and "
        "ingest.yml, and may switch between a local and an S3 store",
    )

    def open_store(self, spec: IngestSpec) -> CheckpointStore:
        """The store to use for the pipelines of ``spec`` (its folder anchors relative locations)."""
        return self.store_at(spec, self.location)

    def store_at(self, spec: IngestSpec, location: str | None) -> CheckpointStore:
        """The store at ``location`` (a directory or s3://bucket/prefix; None: this resource's fields, the environment
        and ingest.yml), reached with this resource's connection settings."""
        raise NotImplementedError

    def _settings(self, spec: IngestSpec, location: str | None) -> CheckpointsSpec:
        env = {**os.environ, CHECKPOINTS_ENV: location} if location else None
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

    def store_at(self, spec: IngestSpec, location: str | None) -> CheckpointStore:
        location = checked_location(location)
        settings = self._settings(spec, location)
        if settings.type == "s3" and location:  # the launchpad switched this run to S3
            return open_checkpoint_store(settings, spec.base_dir)
        configured = (None if location else self.directory) or (settings.directory if settings.type == "local" else None)
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

    def store_at(self, spec: IngestSpec, location: str | None) -> CheckpointStore:
        location = checked_location(location)
        settings = self._settings(spec, location)
        if settings.type == "local" and location:  # the launchpad switched this run to a directory
            return open_checkpoint_store(settings, spec.base_dir)
        if location:  # s3://bucket/prefix given here wins over the bucket and prefix fields
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
        # this resource's own fields (code, launchpad) win over ingest.yml's checkpoints: section
        conn = S3ConnectionSpec(endpoint_url=self.endpoint_url or s3.endpoint_url, region=self.region_name or s3.region)
        client = boto_client(self, conn)
        return S3CheckpointStore(
            client,
            bucket,
            prefix if prefix is not None else settings.prefix,
            lease_seconds=self.lease_seconds or settings.lease_seconds,
            conditional_writes=settings.conditional_writes if self.conditional_writes is None else self.conditional_writes,
        )


def boto_client(resource: S3Resource | None, conn: S3ConnectionSpec) -> Any:
    """An S3 client: ingest.yml's settings (``conn``) first, then the dagster-aws ``S3Resource``'s fields (EnvVar
    credentials, endpoint, region, profile), then the usual AWS environment. Built as ``S3Resource.get_client()``
    builds one, plus a 5 s connect timeout so that an unreachable endpoint fails in seconds, not minutes."""
    import boto3

    r = resource if resource is not None else S3Resource()
    use_conn_keys = conn.access_key_id is not None and conn.secret_access_key is not None
    session = boto3.session.Session(profile_name=None if use_conn_keys else r.profile_name)
    return session.client(
        "s3",
        region_name=conn.region or r.region_name,
        endpoint_url=conn.endpoint_url or r.endpoint_url,
        use_ssl=r.use_ssl,
        verify=r.verify,
        aws_access_key_id=conn.access_key_id.reveal() if use_conn_keys and conn.access_key_id else r.aws_access_key_id,
        aws_secret_access_key=conn.secret_access_key.reveal()
        if use_conn_keys and conn.secret_access_key
        else r.aws_secret_access_key,
        aws_session_token=conn.session_token.reveal() if conn.session_token else (None if use_conn_keys else r.aws_session_token),
        config=client_config(r.max_attempts),
    )


@contextmanager
def data_lake_clients(resource: S3Resource | None) -> Iterator[None]:
    """S3 sources and destinations opened in this block reach S3 through ``resource`` (the ``s3`` resource)."""
    with client_factory(lambda conn: boto_client(resource, conn)):
        yield


def uses_s3(resource: ResourceSpec) -> bool:
    """The pipeline reads or writes S3 data (and so asks for the ``s3`` resource)."""
    from conduit_dagster.engine.backends import destination_backend, source_backend

    s, d = resource.source, resource.destination
    return destination_backend(d).uses_s3(d) or source_backend(s).uses_s3(s)


def checkpoint_resource(spec: IngestSpec) -> CheckpointStoreResource:
    """The resource the environment and ingest.yml choose; its settings are read again at run time."""
    if checkpoint_settings(spec.checkpoints).type == "s3":
        return S3CheckpointStoreResource()
    return LocalCheckpointStoreResource()


# Run launchers and executors that run every step of a run on the machine of the code server that launched it: with
# them, a local checkpoint directory is where the next run of the pipeline finds it.
LOCAL_RUN_LAUNCHERS = frozenset({"DefaultRunLauncher", "SyncInMemoryRunLauncher"})
LOCAL_EXECUTORS = frozenset({"multi_or_in_process_executor", "in_process", "multiprocess", "execute_in_process_executor"})
SHARED_CHECKPOINT_DIR_ENV = "CONDUIT_CHECKPOINT_DIR_SHARED"


def run_launcher_name(instance: Any) -> str:
    """The instance's run launcher class, read from its dagster.yaml without building it (building the K8s launcher
    needs dagster-k8s installed)."""
    if instance.is_ephemeral:
        return type(instance.run_launcher).__name__
    data = instance.get_ref().run_launcher_data
    return str(data.class_name) if data is not None else "DefaultRunLauncher"


def check_store_reach(store: CheckpointStore, launcher: str | None, executor: str) -> None:
    """Refuse local checkpoints for a run whose launcher or executor may start the pipeline's next run on another
    machine: there the directory (its checkpoints, plans and locks) is not, so a retry would start over and could load
    rows twice. ``launcher`` is None for a run started outside a code location (`dagster job execute`, `conduit run`),
    which runs where it was started."""
    if not isinstance(store, LocalCheckpointStore) or os.environ.get(SHARED_CHECKPOINT_DIR_ENV, "") == "1":
        return
    remote_launcher = launcher is not None and launcher not in LOCAL_RUN_LAUNCHERS
    if not remote_launcher and executor in LOCAL_EXECUTORS:
        return
    where = f"run launcher {launcher}" if remote_launcher else f"executor {executor}"
    raise SpecError(
        f"checkpoints are in the local directory {store.location}, but this run's {where} may start the next run of "
        "the pipeline on another machine, where that directory and its lock are not: a retry would start over and "
        f"could load rows twice. Keep checkpoints in S3 (${CHECKPOINTS_ENV}=s3://bucket/prefix, or `checkpoints: "
        f"{{type: s3, ...}}` in ingest.yml); if every run worker mounts this directory from one file system whose "
        f"flock holds across machines, set {SHARED_CHECKPOINT_DIR_ENV}=1. Nothing was read or written"
    )
