"""Schedules and sensors built from ingest.yml.

- ``schedule:`` on a resource: a ScheduleDefinition on its job (cron, optional timezone). On a
  time-windowed pipeline each tick materializes the latest window that has ended by the tick (as
  Dagster's ``build_schedule_from_partitioned_job``, which takes no cron of its own for time
  partitions, on the pipeline's cron, in the windows' time zone unless the schedule names one); on
  key ranges each tick launches every partition, one run each.
- ``sensor:`` on a resource: a sensor that asks the source for the largest checkpoint value its
  query returns now, and launches the job when that is beyond what the pipeline holds: its
  checkpoint (an unfinished run, which the new run resumes) or else the last value of its latest
  materialization. The run key is that largest value, so the same work is never launched twice.
  On a partitioned pipeline the sensor launches the partitions that are due instead: (complete)
  windows or ranges never materialized, or whose last run failed (and will not be retried by run
  retries); the run key names the partition and the reason (the failed run), so one partition is
  never launched twice for the same reason.
"""

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetKey,
    AssetPartitionStatus,
    DefaultSensorStatus,
    PartitionsDefinition,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    schedule,
    sensor,
)
from dagster_aws.s3 import S3Resource

from conduit_dagster.assets import job_name, partitions_def
from conduit_dagster.engine.checkpoint import CheckpointStore, decode_value, encode_value
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.partition_runs import describe_keys
from conduit_dagster.engine.partitions import TimeWindows
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import IngestSpec, ResourceSpec
from conduit_dagster.resources import CheckpointStoreResource, data_lake_clients, uses_s3

# partitions a partitioned pipeline's sensor requests at most per evaluation (the next evaluation requests more)
MAX_PARTITION_REQUESTS = 100


def _when(r: ResourceSpec) -> str:
    return f"{r.schedule}" + (f" ({r.schedule_timezone})" if r.schedule_timezone else "")


def build_ingest_schedule(resource: ResourceSpec, job: Any) -> Any:
    assert resource.schedule is not None
    name = f"{resource.name}_schedule"
    if resource.partitions is None:
        return ScheduleDefinition(
            name=name,
            job=job,
            cron_schedule=resource.schedule,
            execution_timezone=resource.schedule_timezone,
            description=f"Ingest {resource.name} on {_when(resource)}",
        )
    scheme = resource.partitions.scheme
    pdef = partitions_def(resource)
    assert pdef is not None

    if isinstance(scheme, TimeWindows):
        # Dagster's build_schedule_from_partitioned_job takes no cron of its own for time partitions: this is the
        # same, on the pipeline's cron (in the windows' time zone unless the schedule names one)
        def latest_window(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
            tick = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
            ended = pdef.get_partition_keys(current_time=tick)
            key = ended[-1] if ended else None
            if key is None:
                return SkipReason(f"no {scheme.every} of {resource.name} has ended by {tick.isoformat()}")
            return RunRequest(
                partition_key=key, run_key=f"{resource.name}:{tick.isoformat()}:{key}", tags={"conduit/reason": "schedule"}
            )

        return schedule(
            name=name,
            job=job,
            cron_schedule=resource.schedule,
            execution_timezone=resource.schedule_timezone or scheme.timezone,
            description=f"Ingest the latest complete {scheme.every} of {resource.name} on {_when(resource)}",
        )(latest_window)

    def every_range(context: ScheduleEvaluationContext) -> list[RunRequest]:
        tick = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
        return [
            RunRequest(
                partition_key=key, run_key=f"{resource.name}:{tick.isoformat()}:{key}", tags={"conduit/reason": "schedule"}
            )
            for key in pdef.get_partition_keys()
        ]

    return schedule(
        name=name,
        job=job,
        cron_schedule=resource.schedule,
        execution_timezone=resource.schedule_timezone,
        description=f"Ingest every key range of {resource.name} (one run each) on {_when(resource)}",
    )(every_range)


def build_ingest_schedules(spec: IngestSpec, jobs: Sequence[Any]) -> list[Any]:
    by_name = {j.name: j for j in jobs}
    return [build_ingest_schedule(r, by_name[job_name(r)]) for r in spec.resources if r.schedule]


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


def due_partitions(context: SensorEvaluationContext, resource: ResourceSpec, pdef: PartitionsDefinition) -> list[RunRequest]:
    """Run requests for the partitions that are due: never materialized, or whose last run failed and will not be
    retried automatically (relaunched once: a relaunch that fails again is left to a person). Time windows: only
    complete ones (the partitions definition lists no other)."""
    instance = context.instance
    key = AssetKey(resource.name)
    keys = pdef.get_partition_keys(current_time=dt.datetime.now(dt.UTC), dynamic_partitions_store=instance)
    status = instance.get_status_by_partition(key, keys, pdef)
    if status is None:  # an instance without the status cache: every partition not materialized yet is due
        materialized = instance.get_materialized_partitions(key)
        status = {k: AssetPartitionStatus.MATERIALIZED if k in materialized else None for k in keys}
    requests = []
    for partition in keys:
        state = status.get(partition)
        if state is None:
            reason = "missing"
        elif state == AssetPartitionStatus.FAILED:
            info = instance.get_latest_planned_materialization_info(key, partition=partition)
            run = instance.get_run_by_id(info.run_id) if info is not None else None
            if run is not None and run.is_complete_and_waiting_to_retry:
                continue  # run retries will start it again
            if run is not None and run.tags.get("conduit/reason", "").startswith("failed"):
                # this sensor's own relaunch of a failure failed too: relaunching at every tick would only fail again
                # (a partition that fails the same way each time); a person or run retries take it from here
                continue
            reason = f"failed in run {run.run_id}" if run is not None else "failed"
        else:
            continue  # materialized, or being materialized
        requests.append(
            RunRequest(
                partition_key=partition,
                run_key=f"{resource.name}:{partition}:{reason}",
                tags={"conduit/reason": reason[:63].replace(" ", "_")},
            )
        )
        if len(requests) >= MAX_PARTITION_REQUESTS:
            break
    return requests


def build_partition_sensor(spec: IngestSpec, resource: ResourceSpec, job: Any) -> SensorDefinition:
    assert resource.sensor_interval is not None
    pdef = partitions_def(resource)
    assert pdef is not None

    def _sensor(context: SensorEvaluationContext) -> Any:
        requests = due_partitions(context, resource, pdef)
        if not requests:
            keys = pdef.get_partition_keys(current_time=dt.datetime.now(dt.UTC), dynamic_partitions_store=context.instance)
            return SkipReason(
                f"no partition of {resource.name} ({describe_keys(keys)}) is due: each is materialized, running, or "
                "failed again after this sensor relaunched it"
            )
        context.log.info(f"{resource.name}: launching {', '.join(str(r.partition_key) for r in requests)}")
        return requests

    return sensor(
        name=f"{resource.name}_sensor",
        job=job,
        minimum_interval_seconds=resource.sensor_interval,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Runs the partitions of {resource.name} that were never materialized or whose last run failed",
    )(_sensor)


def build_ingest_sensors(spec: IngestSpec, jobs: Sequence[Any]) -> list[SensorDefinition]:
    by_name = {j.name: j for j in jobs}
    return [
        (build_partition_sensor if r.partitions is not None else build_ingest_sensor)(spec, r, by_name[job_name(r)])
        for r in spec.resources
        if r.sensor_interval
    ]
