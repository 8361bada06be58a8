"""Schedules and sensors built from ingest.yml.

- ``schedule:`` on a resource: a ScheduleDefinition on its job (cron, optional timezone).
- ``sensor:`` on a resource: a sensor that asks the source for the largest checkpoint value its
  query returns now, and launches the job when that is beyond what the pipeline holds: its
  checkpoint (an unfinished run, which the new run resumes) or else the last value of its latest
  materialization. The run key is that largest value, so the same work is never launched twice.
"""

import json
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster_aws.s3 import S3Resource

from conduit_dagster.assets import job_name
from conduit_dagster.engine.checkpoint import CheckpointStore, decode_value, encode_value
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import IngestSpec, ResourceSpec
from conduit_dagster.resources import CheckpointStoreResource, data_lake_clients, uses_s3


def build_ingest_schedules(spec: IngestSpec, jobs: Sequence[Any]) -> list[ScheduleDefinition]:
    by_name = {j.name: j for j in jobs}
    return [
        ScheduleDefinition(
            name=f"{r.name}_schedule",
            job=by_name[job_name(r)],
            cron_schedule=r.schedule,
            execution_timezone=r.schedule_timezone,
            description=f"Ingest {r.name} on {r.schedule}" + (f" ({r.schedule_timezone})" if r.schedule_timezone else ""),
        )
        for r in spec.resources
        if r.schedule
    ]


def held_value(context: SensorEvaluationContext, resource: ResourceSpec, store: CheckpointStore) -> tuple[bool, Any]:
    """(found, value): the pipeline's checkpoint value, else its latest materialization's last value."""
    checkpoint = store.load(resource.name)
    if checkpoint is not None:
        return True, checkpoint.last_value
    state = store.load_state(resource.name) if resource.incremental_column else None
    if state is not None:
        return True, state.last_value
    event = context.instance.get_latest_materialization_event(AssetKey(resource.name))
    if event is None or event.asset_materialization is None:
        return False, None
    raw = event.asset_materialization.metadata.get("conduit/last_value_json")
    if raw is None:
        return False, None
    return True, decode_value(json.loads(str(raw.value)))


def bound_value(resource: ResourceSpec, store: CheckpointStore) -> Any:
    """The :last_value an incremental run would bind now: the stored state's, else initial_value."""
    state = store.load_state(resource.name)
    return state.last_value if state is not None else resource.initial_value


def build_ingest_sensor(spec: IngestSpec, resource: ResourceSpec, job: Any) -> SensorDefinition:
    assert resource.checkpoint_column is not None and resource.sensor_interval is not None
    column = resource.checkpoint_column

    def evaluate(context: SensorEvaluationContext, checkpoints: CheckpointStoreResource, s3: S3Resource | None) -> Any:
        try:
            store = checkpoints.open_store(spec)
            found, held = held_value(context, resource, store)
            with data_lake_clients(s3):
                source = open_source(resource.source)
            try:
                if resource.incremental_column is not None:
                    source.bind({"last_value": bound_value(resource, store)})
                newest = source.max_value(resource.query, column)
            finally:
                source.close()
        except ConduitError as exc:
            return SkipReason(f"cannot check the source: {exc}")
        if newest is None:
            return SkipReason(f"the query returns no rows with a {column}")
        if found and held is not None and not newest > held:
            return SkipReason(f"no rows beyond {column} = {held!r}")
        key = json.dumps(encode_value(newest), sort_keys=True)
        return RunRequest(run_key=f"{resource.name}:{key}", tags={"conduit/newest": str(newest)[:60]})

    decorate = sensor(
        name=f"{resource.name}_sensor",
        job=job,
        minimum_interval_seconds=resource.sensor_interval,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Runs {job.name} when {resource.source.name} has rows beyond the last {column} it loaded",
    )
    # the `s3` resource is asked for only by pipelines that read or write S3 data
    if uses_s3(resource):

        def _sensor_s3(context: SensorEvaluationContext, checkpoints: CheckpointStoreResource, s3: S3Resource) -> Any:
            return evaluate(context, checkpoints, s3)

        return decorate(_sensor_s3)

    def _sensor(context: SensorEvaluationContext, checkpoints: CheckpointStoreResource) -> Any:
        return evaluate(context, checkpoints, None)

    return decorate(_sensor)


def build_ingest_sensors(spec: IngestSpec, jobs: Sequence[Any]) -> list[SensorDefinition]:
    by_name = {j.name: j for j in jobs}
    return [build_ingest_sensor(spec, r, by_name[job_name(r)]) for r in spec.resources if r.sensor_interval]
