"""build_ingest_assets(spec): one Dagster asset per ingest.yml resource, plus its jobs.

The asset runs the engine's batch loop and turns its events into log lines and
materialization metadata.
"""

import json
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSelection,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
    define_asset_job,
)
from dagster_aws.s3 import S3Resource

from conduit_dagster.engine.backends import destination_backend, source_backend
from conduit_dagster.engine.checkpoint import CheckpointStore, encode_value
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, RunWarning, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import IngestSpec, ResourceSpec
from conduit_dagster.resources import CheckpointStoreResource, data_lake_clients, uses_s3

# where the previous run kept its checkpoints (an observation at the start of every run, and each materialization)
STORE_KEY = "conduit/checkpoint_store"
# a run tag naming the previous checkpoint location: the operator says it was moved or abandoned, so this run may start
# without what it held
MOVED_TAG = "conduit/checkpoints_moved_from"


def asset_description(resource: ResourceSpec) -> str:
    head = f"{resource.description}\n\n" if resource.description else ""
    return head + source_backend(resource.source).describe(resource)


def asset_kinds(resource: ResourceSpec) -> set[str]:
    s, d = resource.source, resource.destination
    return source_backend(s).kinds(s) | destination_backend(d).kinds(d)


def destination_uri(resource: ResourceSpec) -> str:
    """Where the asset's data lives, as a URI (``dagster/uri``); never a secret."""
    return destination_backend(resource.destination).uri(resource.destination, resource.name)


def job_name(resource: ResourceSpec) -> str:
    return f"ingest_{resource.name}"


def _show(value: Any) -> str:
    return "" if value is None else str(value)


def finished_metadata(event: RunFinished, column: str | None) -> dict[str, Any]:
    return {
        "dagster/row_count": event.records_processed,
        "conduit/rows_this_run": event.rows_this_run,
        "conduit/records_processed": event.records_processed,
        "conduit/resumed": event.resumed,
        "conduit/resumed_from": _show(event.resumed_from),
        "conduit/last_value": _show(event.last_value),
        # typed, for sensors: {"type": "datetime", "value": "..."} as in a checkpoint
        "conduit/last_value_json": json.dumps(encode_value(event.last_value)),
        "conduit/checkpoint_column": column or "",
        "conduit/batches": event.batches,
        "conduit/duration_s": round(event.duration_s, 3),
        "conduit/rows_per_second": round(event.rows_per_second, 1),
        "conduit/checkpoint_s": round(event.checkpoint_s, 4),
        "conduit/output": MetadataValue.path(event.destination),
    }


def _holds(store: CheckpointStore, resource: ResourceSpec) -> str | None:
    """What the store holds that a run of this pipeline resumes from: a checkpoint, or an incremental state."""
    if store.has_checkpoint(resource.name):
        return "the checkpoint of its unfinished run"
    if resource.incremental_column is None:
        return None
    try:
        found = store.load_state(resource.name) is not None
    except ConduitError:
        found = True  # unreadable, but there
    return "its incremental state" if found else None


def previous_store(context: AssetExecutionContext, key: AssetKey) -> str | None:
    """Where the latest run of this asset that recorded it kept its checkpoints."""
    latest: tuple[int, str] | None = None
    for fetch in (context.instance.fetch_observations, context.instance.fetch_materializations):
        for record in fetch(key, limit=1).records:
            event = record.asset_observation or record.asset_materialization
            value = event.metadata.get(STORE_KEY) if event is not None else None
            if value is not None and (latest is None or record.storage_id > latest[0]):
                latest = (record.storage_id, str(value.value))
    return latest[1] if latest else None


def check_store_switch(
    context: AssetExecutionContext,
    spec: IngestSpec,
    resource: ResourceSpec,
    checkpoints: CheckpointStoreResource,
    store: CheckpointStore,
) -> None:
    """Refuse a run whose checkpoint store holds nothing for the pipeline while the store its previous run used does.

    The launchpad's ``location``, $CONDUIT_CHECKPOINTS or ingest.yml may point a run at another store than the run
    before it. Without this, a run after a failed one would not resume but start over (an ``append`` destination
    gets the rows twice), and an incremental load would start again from initial_value (every row twice)."""
    name = resource.name
    previous = previous_store(context, AssetKey(name))
    if previous is None or previous == store.location or _holds(store, resource):
        return
    if context.run.tags.get(MOVED_TAG) == previous:
        context.log.warning(f"{name}: starting without what {previous} holds for it (run tag {MOVED_TAG})")
        return
    way_out = (
        f"Run it with the checkpoints location {previous!r} (the `checkpoints` resource's `location` in the launchpad, "
        f"or $CONDUIT_CHECKPOINTS), or copy that store's {name}.json / {name}.state.json here; to start over here "
        f"on purpose, launch with the run tag {MOVED_TAG}={previous}"
    )
    try:
        elsewhere = _holds(checkpoints.store_at(spec, previous), resource)
    except ConduitError as exc:
        raise Failure(
            description=f"{name}: the previous run kept its checkpoints in {previous}, which cannot be read now ({exc}), "
            f"and this run's store {store.location} holds none for it; starting here could load rows twice. "
            f"Nothing was read or written. {way_out}"
        ) from None
    if elsewhere:
        raise Failure(
            description=f"{name}: {elsewhere} is in {previous}, where its previous run kept it, but this run's "
            f"checkpoint store is {store.location}, which holds none: starting over here would load rows twice "
            f"(or start an incremental load from initial_value). Nothing was read or written. {way_out}"
        )


def output_row_count(resource: ResourceSpec, s3: S3Resource | None) -> int | None:
    """Rows in the published output, counted there: an incremental, append or merge output holds more (or, merged,
    fewer) rows than one run processed."""
    with data_lake_clients(s3):
        destination = open_destination(resource.destination, resource.name, accumulate=resource.incremental_column is not None)
    try:
        return destination.count()
    finally:
        destination.close()


def counts_whole_output(resource: ResourceSpec) -> bool:
    """A run's records_processed is the whole output (a full refresh replaces it)."""
    if resource.incremental_column is not None:
        return False
    return destination_backend(resource.destination).counts_whole_output(resource.destination)


def build_ingest_asset(spec: IngestSpec, resource: ResourceSpec) -> AssetsDefinition:
    decorate = asset(
        name=resource.name,
        group_name=resource.source.name,
        kinds=asset_kinds(resource),
        # one run at a time per pipeline also inside Dagster: with a pool limit of 1 (see deploy/dagster.yaml)
        # a second run waits for the first instead of failing on the pipeline lock
        pool=f"conduit_{resource.name}",
        description=asset_description(resource),
        metadata={
            "conduit/source": resource.source.name,
            "conduit/destination": resource.destination.name,
            "conduit/checkpoint_column": resource.checkpoint_column or "",
            "conduit/resume": resource.resume,
            "conduit/batch_size": resource.batch_size,
            "dagster/uri": destination_uri(resource),
        },
    )

    def materialize(context: AssetExecutionContext, checkpoints: CheckpointStoreResource, s3: S3Resource | None) -> Any:
        name = resource.name
        try:
            store = checkpoints.open_store(spec)
            if resource.resume:
                check_store_switch(context, spec, resource, checkpoints, store)
        except ConduitError as exc:
            raise Failure(description=f"{name}: {exc}") from None
        if resource.resume:
            context.log_event(AssetObservation(asset_key=AssetKey(name), metadata={STORE_KEY: store.location}))
        finished: RunFinished | None = None
        try:
            with data_lake_clients(s3):
                for event in run_pipeline(resource, store, run_id=context.run.run_id):
                    if isinstance(event, RunStarted):
                        if event.resumed and event.resumed_from is None:
                            context.log.info(f"{name}: resuming an unfinished run that had committed no batch yet")
                        elif event.resumed:
                            context.log.info(
                                f"{name}: resuming after {resource.checkpoint_column} = {event.resumed_from!r} "
                                f"({event.records_before:,} rows already written) from {store.describe(name)}"
                            )
                        else:
                            context.log.info(f"{name}: full load from {event.source} into {event.destination}")
                    elif isinstance(event, BatchCommitted):
                        context.log.info(
                            f"{name}: batch {event.index} committed, {event.rows:,} rows; {event.rows_this_run:,} this run, "
                            f"{event.records_processed:,} in total, {event.rows_per_second:,.0f} rows/s; "
                            f"last {resource.checkpoint_column or 'row'} = {event.last_value!r}"
                        )
                    elif isinstance(event, RunWarning):
                        context.log.warning(f"{name}: {event.message}")
                    elif isinstance(event, RunFinished):
                        finished = event
        except ConduitError as exc:
            raise Failure(description=f"{name}: {exc}") from None
        assert finished is not None
        context.log.info(
            f"{name}: done, {finished.rows_this_run:,} rows this run ({finished.records_processed:,} in total) in "
            f"{finished.duration_s:.1f} s, {finished.rows_per_second:,.0f} rows/s; output in {finished.destination}"
        )
        metadata = finished_metadata(finished, resource.checkpoint_column)
        if not counts_whole_output(resource):
            try:
                rows = output_row_count(resource, s3)
            except ConduitError as exc:
                rows = None
                context.log.warning(f"{name}: the output's rows could not be counted: {exc}")
            if rows is None:
                del metadata["dagster/row_count"]
            else:
                metadata["dagster/row_count"] = rows
        return MaterializeResult(metadata={**metadata, "dagster/uri": destination_uri(resource), STORE_KEY: store.location})

    # `s3` (dagster-aws's S3Resource) only for pipelines that read or write S3 data: it fills the connection settings
    # ingest.yml leaves unset (EnvVar credentials, endpoint, region), and the launchpad can set them
    if uses_s3(resource):

        def _ingest_s3(context: AssetExecutionContext, checkpoints: CheckpointStoreResource, s3: S3Resource) -> Any:
            return materialize(context, checkpoints, s3)

        return decorate(_ingest_s3)

    def _ingest(context: AssetExecutionContext, checkpoints: CheckpointStoreResource) -> Any:
        return materialize(context, checkpoints, None)

    return decorate(_ingest)


def build_row_count_check(spec: IngestSpec, resource: ResourceSpec) -> AssetChecksDefinition:
    """The destination holds as many rows as the source has for the same range: all the query returns now (a
    full refresh), or, for an incremental load, what it returns from initial_value up to the stored value."""

    decorate = asset_check(
        asset=resource.name,
        name="row_count_matches_source",
        description="Rows in the destination against the source's rows for the same range; both numbers are reported.",
    )

    def evaluate(checkpoints: CheckpointStoreResource, s3: S3Resource | None) -> AssetCheckResult:
        with data_lake_clients(s3):
            try:
                source = open_source(resource.source)
            except ConduitError as exc:
                raise Failure(description=str(exc)) from None
        try:
            if resource.incremental_column is not None:
                state = checkpoints.open_store(spec).load_state(resource.name)
                source.bind({"last_value": resource.initial_value})
                upto = (resource.incremental_column, state.last_value) if state is not None else None
                expected = source.count(resource.query, upto) if state is not None else 0
            else:
                expected = source.count(resource.query)
            actual = output_row_count(resource, s3)
        except ConduitError as exc:
            raise Failure(description=str(exc)) from None
        finally:
            source.close()
        return AssetCheckResult(
            passed=actual == expected,
            metadata={
                "conduit/source_rows": expected,
                "conduit/destination_rows": -1 if actual is None else actual,
                "conduit/difference": expected - (actual or 0),
            },
            description=f"source {expected:,} rows, destination {'no output' if actual is None else f'{actual:,} rows'}",
        )

    if uses_s3(resource):

        def _check_s3(checkpoints: CheckpointStoreResource, s3: S3Resource) -> AssetCheckResult:
            return evaluate(checkpoints, s3)

        return decorate(_check_s3)

    def _check(checkpoints: CheckpointStoreResource) -> AssetCheckResult:
        return evaluate(checkpoints, None)

    return decorate(_check)


def build_ingest_assets(spec: IngestSpec) -> list[AssetsDefinition]:
    return [build_ingest_asset(spec, r) for r in spec.resources]


def build_ingest_checks(spec: IngestSpec) -> list[AssetChecksDefinition]:
    """A row-count check for every full-refresh or incremental resource (append and merge outputs of
    repeated full reads have no source range to compare with)."""
    return [
        build_row_count_check(spec, r)
        for r in spec.resources
        if r.incremental_column is not None or destination_backend(r.destination).counts_whole_output(r.destination)
    ]


def build_ingest_jobs(spec: IngestSpec) -> Sequence[Any]:
    jobs = [
        define_asset_job(
            job_name(r),
            selection=AssetSelection.assets(r.name),
            description=f"Ingest {r.name}",
            # run retries (needs `run_retries: {enabled: true}` in dagster.yaml and the daemon); a retry resumes
            tags={"dagster/max_retries": str(r.retries)} if r.retries else None,
        )
        for r in spec.resources
    ]
    jobs.append(
        define_asset_job(
            "ingest_all",
            selection=AssetSelection.assets(*[r.name for r in spec.resources]),
            description="Ingest every resource of ingest.yml",
        )
    )
    return jobs
