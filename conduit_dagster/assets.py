"""build_ingest_assets(spec): one Dagster asset per ingest.yml resource, plus its checks and jobs.

The asset runs the engine's batch loop and turns its events into log lines and
materialization metadata.

A partitioned resource (``partitions:`` in ingest.yml) is a partitioned asset: time windows are Dagster's
Hourly/Daily/Weekly/MonthlyPartitionsDefinition (same keys and windows as ``engine.partitions``), key ranges a
StaticPartitionsDefinition of ``r00 .. r<N-1>`` (the keys depend only on N: no I/O when the definitions load). A run
loads each partition it covers (one, or a range under a ``single_run`` or ``multi_run`` backfill policy) as its own
unit: its own checkpoint, lock and output. Such an asset has no concurrency pool: the partition's lock already keeps
two runs of one partition apart, and a pool limited to 1 would load the partitions one at a time.
"""

import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSelection,
    BackfillPolicy,
    BetaWarning,
    DailyPartitionsDefinition,
    Failure,
    HourlyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    MonthlyPartitionsDefinition,
    PartitionsDefinition,
    PreviewWarning,
    StaticPartitionsDefinition,
    WeeklyPartitionsDefinition,
    asset,
    asset_check,
    define_asset_job,
)
from dagster_aws.s3 import S3Resource

from conduit_dagster.engine.backends import destination_backend, source_backend
from conduit_dagster.engine.checkpoint import CheckpointStore, encode_value
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.partition_runs import describe_keys, describe_scheme, existing_partition, resolve
from conduit_dagster.engine.partitions import KeyRanges, Partition, TimeWindows, partition_keys, range_keys, unit_name
from conduit_dagster.engine.runner import (
    BatchCommitted,
    Event,
    RunFinished,
    RunStarted,
    RunWarning,
    restrict_source,
    run_pipeline,
)
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import IngestSpec, ResourceSpec
from conduit_dagster.resources import (
    CheckpointStoreResource,
    check_store_reach,
    data_lake_clients,
    run_launcher_name,
    uses_s3,
)

# where the previous run kept its checkpoints (an observation at the start of every run, and each materialization)
STORE_KEY = "conduit/checkpoint_store"
# a run tag naming the previous checkpoint location: the operator says it was moved or abandoned, so this run may start
# without what it held
MOVED_TAG = "conduit/checkpoints_moved_from"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
CHECK_NAME = "row_count_matches_source"
_TIME_DEFS: dict[str, type[PartitionsDefinition]] = {
    "hour": HourlyPartitionsDefinition,
    "day": DailyPartitionsDefinition,
    "week": WeeklyPartitionsDefinition,
    "month": MonthlyPartitionsDefinition,
}


def asset_description(resource: ResourceSpec) -> str:
    head = f"{resource.description}\n\n" if resource.description else ""
    tail = f"\n\nPartitioned: {describe_scheme(resource)}." if resource.partitions is not None else ""
    return head + source_backend(resource.source).describe(resource) + tail


def asset_kinds(resource: ResourceSpec) -> set[str]:
    s, d = resource.source, resource.destination
    return source_backend(s).kinds(s) | destination_backend(d).kinds(d)


def destination_uri(resource: ResourceSpec) -> str:
    """Where the asset's data lives, as a URI (``dagster/uri``); never a secret."""
    return destination_backend(resource.destination).uri(resource.destination, resource.name)


def job_name(resource: ResourceSpec) -> str:
    return f"ingest_{resource.name}"


def partitions_def(resource: ResourceSpec) -> PartitionsDefinition | None:
    """The Dagster partitions of a partitioned resource (None when it has none).

    Time windows use Dagster's default key format and windows, exactly as ``engine.partitions`` computes them (a
    test compares the two): the first window starts at the first tick at or after ``start`` (wall-clock time in
    ``timezone``), the last ends at or before ``end``, or, without one, is the last complete window."""
    if resource.partitions is None:
        return None
    scheme = resource.partitions.scheme
    if isinstance(scheme, KeyRanges):
        return StaticPartitionsDefinition(range_keys(scheme.ranges))
    assert isinstance(scheme, TimeWindows)
    end = scheme.end.replace(tzinfo=None) if scheme.end is not None else None
    definition: Any = _TIME_DEFS[scheme.every]
    result: PartitionsDefinition = definition(
        start_date=scheme.start.replace(tzinfo=None), end_date=end, timezone=scheme.timezone
    )
    return result


def backfill_policy(resource: ResourceSpec) -> BackfillPolicy | None:
    """ingest.yml's ``backfill:``: ``multi_run`` (default: at most ``max_partitions_per_run`` partitions a run) or
    ``single_run`` (one run loads every selected partition, one after the other)."""
    if resource.partitions is None:
        return None
    if resource.partitions.backfill == "single_run":
        return BackfillPolicy.single_run()
    return BackfillPolicy.multi_run(resource.partitions.max_partitions_per_run)


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


def _holds(store: CheckpointStore, resource: ResourceSpec, partition: str | None = None) -> str | None:
    """What the store holds that a run of this pipeline (or of its partition ``partition``) resumes from or depends
    on: a checkpoint, a key-range plan, or an incremental state."""
    unit = unit_name(resource.name, partition) if partition is not None else resource.name
    if store.has_checkpoint(unit):
        return "the checkpoint of its unfinished run" if partition is None else f"the checkpoint of partition {partition}"
    if resource.partitions is not None and isinstance(resource.partitions.scheme, KeyRanges):
        # every partition's rows are defined by the plan: planned again elsewhere, the boundaries could move and
        # rows land in two partitions' outputs, or in none
        try:
            planned = store.load_plan(resource.name) is not None
        except ConduitError:
            planned = True  # unreadable, but there
        if planned:
            return "its key-range plan"
    if resource.incremental_column is None:
        return None
    try:
        found = store.load_state(resource.name) is not None
    except ConduitError:
        found = True  # unreadable, but there
    return "its incremental state" if found else None


def _held_files(resource: ResourceSpec, partition: str | None) -> str:
    unit = unit_name(resource.name, partition) if partition is not None else resource.name
    files = [f"{unit}.json"]
    if resource.partitions is not None and isinstance(resource.partitions.scheme, KeyRanges):
        files.append(f"{resource.name}.plan.json")
    if resource.incremental_column is not None:
        files.append(f"{resource.name}.state.json")
    return " / ".join(files)


def previous_store(context: AssetExecutionContext, key: AssetKey, partition: str | None = None) -> str | None:
    """Where the latest run of this asset (of its partition ``partition``, when given) that recorded it kept its
    checkpoints."""
    target: AssetKey | AssetRecordsFilter = key if partition is None else AssetRecordsFilter(key, asset_partitions=[partition])
    latest: tuple[int, str] | None = None
    for fetch in (context.instance.fetch_observations, context.instance.fetch_materializations):
        for record in fetch(target, limit=1).records:
            event = record.asset_observation or record.asset_materialization
            value = event.metadata.get(STORE_KEY) if event is not None else None
            if value is not None and (latest is None or record.storage_id > latest[0]):
                latest = (record.storage_id, str(value.value))
    return latest[1] if latest else None


def check_reach(context: AssetExecutionContext, store: CheckpointStore) -> None:
    """Local checkpoints only for runs whose next run starts on the same machine (see resources.check_store_reach)."""
    launched = context.run.remote_job_origin is not None
    launcher = run_launcher_name(context.instance) if launched else None
    check_store_reach(store, launcher, context.job_def.executor_def.name)


def check_store_switch(
    context: AssetExecutionContext,
    spec: IngestSpec,
    resource: ResourceSpec,
    checkpoints: CheckpointStoreResource,
    store: CheckpointStore,
    partition: str | None = None,
) -> None:
    """Refuse a run whose checkpoint store holds nothing for the pipeline (or for its partition ``partition``)
    while the store its previous run used does.

    The launchpad's ``location``, $CONDUIT_CHECKPOINTS or ingest.yml may point a run at another store than the run
    before it. Without this, a run after a failed one would not resume but start over (an ``append`` destination
    gets the rows twice), an incremental load would start again from initial_value (every row twice), and key
    ranges would be planned again with other boundaries than the partitions already loaded. A partition is compared
    with where its own previous run kept its checkpoint and with where the pipeline's latest run (of any partition)
    kept its checkpoints and plan."""
    name = resource.name
    label = name if partition is None else f"{name} partition {partition}"
    key = AssetKey(name)
    candidates = [previous_store(context, key, partition)] if partition is not None else []
    candidates.append(previous_store(context, key))
    previous_ones = list(dict.fromkeys(p for p in candidates if p is not None and p != store.location))
    if not previous_ones or _holds(store, resource, partition):
        return
    for previous in previous_ones:
        if context.run.tags.get(MOVED_TAG) == previous:
            context.log.warning(f"{label}: starting without what {previous} holds for it (run tag {MOVED_TAG})")
            continue
        way_out = (
            f"Run it with the checkpoints location {previous!r} (the `checkpoints` resource's `location` in the "
            f"launchpad, or $CONDUIT_CHECKPOINTS), or copy that store's {_held_files(resource, partition)} here; to "
            f"start over here on purpose, launch with the run tag {MOVED_TAG}={previous}"
        )
        try:
            elsewhere = _holds(checkpoints.store_at(spec, previous), resource, partition)
        except ConduitError as exc:
            raise Failure(
                description=f"{label}: the previous run kept its checkpoints in {previous}, which cannot be read now "
                f"({exc}), and this run's store {store.location} holds none for it; starting here could load rows "
                f"twice. Nothing was read or written. {way_out}"
            ) from None
        if elsewhere:
            raise Failure(
                description=f"{label}: {elsewhere} is in {previous}, where its previous run kept it, but this run's "
                f"checkpoint store is {store.location}, which holds none: starting over here would load rows twice "
                f"(or start an incremental load from initial_value, or plan the key ranges again). Nothing was read "
                f"or written. {way_out}"
            )


def output_row_count(resource: ResourceSpec, s3: S3Resource | None, partition: Partition | None = None) -> int | None:
    """Rows in the published output (of ``partition`` only, when given), counted there: an incremental, append or
    merge output holds more (or, merged, fewer) rows than one run processed."""
    with data_lake_clients(s3):
        destination = open_destination(
            resource.destination, resource.name, accumulate=resource.incremental_column is not None, partition=partition
        )
    try:
        return destination.count()
    finally:
        destination.close()


def counts_whole_output(resource: ResourceSpec) -> bool:
    """A run's records_processed is the whole output (a full refresh replaces it; a partition's run replaces that
    partition's output)."""
    if resource.incremental_column is not None:
        return False
    return destination_backend(resource.destination).counts_whole_output(resource.destination)


def log_run_events(
    context: AssetExecutionContext, label: str, resource: ResourceSpec, store: CheckpointStore, events: Any
) -> RunFinished:
    """Drive one run of the engine (a pipeline or one partition), turning its events into log lines."""
    finished: RunFinished | None = None
    event: Event
    for event in events:
        if isinstance(event, RunStarted):
            if event.resumed and event.resumed_from is None:
                context.log.info(f"{label}: resuming an unfinished run that had committed no batch yet")
            elif event.resumed:
                context.log.info(
                    f"{label}: resuming after {resource.checkpoint_column} = {event.resumed_from!r} "
                    f"({event.records_before:,} rows already written) from {store.describe(event.pipeline)}"
                )
            else:
                context.log.info(f"{label}: full load from {event.source} into {event.destination}")
        elif isinstance(event, BatchCommitted):
            context.log.info(
                f"{label}: batch {event.index} committed, {event.rows:,} rows; {event.rows_this_run:,} this run, "
                f"{event.records_processed:,} in total, {event.rows_per_second:,.0f} rows/s; "
                f"last {resource.checkpoint_column or 'row'} = {event.last_value!r}"
            )
        elif isinstance(event, RunWarning):
            context.log.warning(f"{label}: {event.message}")
        elif isinstance(event, RunFinished):
            finished = event
    assert finished is not None
    context.log.info(
        f"{label}: done, {finished.rows_this_run:,} rows this run ({finished.records_processed:,} in total) in "
        f"{finished.duration_s:.1f} s, {finished.rows_per_second:,.0f} rows/s; output in {finished.destination}"
    )
    return finished


def _materialize_pipeline(
    context: AssetExecutionContext, spec: IngestSpec, resource: ResourceSpec, checkpoints: CheckpointStoreResource, s3: Any
) -> MaterializeResult:
    """An unpartitioned pipeline's run."""
    name = resource.name
    try:
        store = checkpoints.open_store(spec)
        if resource.resume:
            check_reach(context, store)
            check_store_switch(context, spec, resource, checkpoints, store)
    except ConduitError as exc:
        raise Failure(description=f"{name}: {exc}") from None
    if resource.resume:
        context.log_event(AssetObservation(asset_key=AssetKey(name), metadata={STORE_KEY: store.location}))
    try:
        with data_lake_clients(s3):
            finished = log_run_events(context, name, resource, store, run_pipeline(resource, store, run_id=context.run.run_id))
    except ConduitError as exc:
        raise Failure(description=f"{name}: {exc}") from None
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


def partition_metadata(
    context: AssetExecutionContext, resource: ResourceSpec, partition: Partition, finished: RunFinished, s3: Any
) -> dict[str, Any]:
    """A partition's materialization metadata: its rows (``dagster/partition_row_count``), this run's figures and
    the checkpoint progress. ``dagster/row_count`` (the whole table's rows) is left out: one partition's run does
    not count the other partitions."""
    metadata = finished_metadata(finished, resource.checkpoint_column)
    del metadata["dagster/row_count"]
    rows: int | None = finished.records_processed
    if not counts_whole_output(resource):
        try:
            rows = output_row_count(resource, s3, partition)
        except ConduitError as exc:
            rows = None
            context.log.warning(f"{resource.name} partition {partition.key}: the output's rows could not be counted: {exc}")
    if rows is not None:
        metadata[PARTITION_ROW_COUNT] = rows
    metadata["conduit/partition"] = partition.key
    metadata["conduit/partition_rows"] = partition.describe()
    return metadata


def run_partition_keys(context: Any, resource: ResourceSpec) -> list[str]:
    """The partition keys of this run; a run of a partitioned pipeline without one fails naming how to give one."""
    if not context.has_partition_key and not context.has_partition_key_range:
        keys = partition_keys(resource)
        example = keys[-1] if keys else "KEY"
        raise Failure(
            description=f"{resource.name} is partitioned ({describe_scheme(resource)}: {describe_keys(keys)}): launch it "
            f"for one or more partitions (in the UI, Materialize and pick them; `dagster job execute -j "
            f'{job_name(resource)} --tags \'{{"dagster/partition": "{example}"}}\'`; or `conduit run --pipeline '
            f"{resource.name} --partition {example}`)"
        )
    return list(context.partition_keys)


def _logger(context: AssetExecutionContext, label: str) -> Callable[[str], None]:
    return lambda message: context.log.info(f"{label}: {message}")


def _materialize_partitions(
    context: AssetExecutionContext, spec: IngestSpec, resource: ResourceSpec, checkpoints: CheckpointStoreResource, s3: Any
) -> MaterializeResult:
    """A partitioned pipeline's run: each partition it covers is loaded on its own (own checkpoint, lock and output).

    A failed partition does not stop the others; the step fails at the end naming every failed partition, and the
    partitions that finished are recorded as materialized (a backfill's "failed and missing" re-run skips them)."""
    name = resource.name
    keys = run_partition_keys(context, resource)
    try:
        store = checkpoints.open_store(spec)
        check_reach(context, store)  # partitions keep their plan, checkpoints and locks in the store
    except ConduitError as exc:
        raise Failure(description=f"{name}: {exc}") from None
    if len(keys) > 1:
        context.log.info(f"{name}: {len(keys)} partitions in this run, {keys[0]} .. {keys[-1]}")
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    total_rows = 0
    for key in keys:
        label = f"{name} partition {key}"
        try:
            if resource.resume:
                check_store_switch(context, spec, resource, checkpoints, store, key)
                context.log_event(AssetObservation(asset_key=AssetKey(name), partition=key, metadata={STORE_KEY: store.location}))
            with data_lake_clients(s3):
                partition = resolve(resource, key, store, on_wait=_logger(context, label))
                context.log.info(f"{label}: {partition.describe()}")
                events = run_pipeline(resource, store, run_id=context.run.run_id, partition=partition)
                finished = log_run_events(context, label, resource, store, events)
            done[key] = partition_metadata(context, resource, partition, finished, s3)
            total_rows += finished.rows_this_run
        except Failure as exc:
            failed[key] = exc.description or str(exc)
        except ConduitError as exc:
            failed[key] = f"{label}: {exc}"
        if key in failed:
            context.log.error(failed[key])
            if len(keys) == 1:
                raise Failure(description=failed[key])
    if failed:
        for key, metadata in done.items():  # the step fails, so no output records them: record them here
            context.log_event(
                AssetMaterialization(
                    asset_key=AssetKey(name),
                    partition=key,
                    metadata={**metadata, "dagster/uri": destination_uri(resource), STORE_KEY: store.location},
                )
            )
        raise Failure(
            description=f"{name}: {len(failed)} of {len(keys)} partitions failed ({', '.join(failed)}); "
            + ("the others were loaded. " if done else "")
            + " | ".join(failed.values())
        )
    for key, metadata in done.items():
        context.add_asset_metadata(metadata, partition_key=key)
    if len(keys) > 1:
        context.log.info(f"{name}: {len(keys)} partitions loaded, {total_rows:,} rows this run")
    # shared by every partition's materialization (each has its own figures above)
    return MaterializeResult(
        metadata={
            "conduit/partitions_in_run": len(keys),
            "conduit/run_rows_this_run": total_rows,
            "dagster/uri": destination_uri(resource),
            STORE_KEY: store.location,
        }
    )


def build_ingest_asset(spec: IngestSpec, resource: ResourceSpec) -> AssetsDefinition:
    partitioned = resource.partitions is not None
    metadata: dict[str, Any] = {
        "conduit/source": resource.source.name,
        "conduit/destination": resource.destination.name,
        "conduit/checkpoint_column": resource.checkpoint_column or "",
        "conduit/resume": resource.resume,
        "conduit/batch_size": resource.batch_size,
        "dagster/uri": destination_uri(resource),
    }
    if partitioned:
        metadata["conduit/partitions"] = describe_scheme(resource)
    extra: dict[str, Any] = {}
    if partitioned:
        extra = {"partitions_def": partitions_def(resource), "backfill_policy": backfill_policy(resource)}
    with warnings.catch_warnings():  # backfill_policy is a beta parameter of Dagster 1.13; it works as used here
        warnings.simplefilter("ignore", BetaWarning)
        decorator = asset(
            name=resource.name,
            group_name=resource.source.name,
            kinds=asset_kinds(resource),
            # one run at a time per pipeline also inside Dagster: with a pool limit of 1 (see deploy/dagster.yaml)
            # a second run waits for the first instead of failing on the pipeline lock. A partitioned pipeline has
            # no pool: its partitions are meant to load at the same time, and each partition's own lock keeps two
            # runs of one partition apart.
            pool=None if partitioned else f"conduit_{resource.name}",
            description=asset_description(resource),
            metadata=metadata,
            **extra,
        )

    def decorate(fn: Any) -> AssetsDefinition:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BetaWarning)
            return decorator(fn)

    run = _materialize_partitions if partitioned else _materialize_pipeline

    # `s3` (dagster-aws's S3Resource) only for pipelines that read or write S3 data: it fills the connection settings
    # ingest.yml leaves unset (EnvVar credentials, endpoint, region), and the launchpad can set them
    if uses_s3(resource):

        def _ingest_s3(context: AssetExecutionContext, checkpoints: CheckpointStoreResource, s3: S3Resource) -> Any:
            return run(context, spec, resource, checkpoints, s3)

        return decorate(_ingest_s3)

    def _ingest(context: AssetExecutionContext, checkpoints: CheckpointStoreResource) -> Any:
        return run(context, spec, resource, checkpoints, None)

    return decorate(_ingest)


def _count_result(expected: int, actual: int | None) -> tuple[bool, dict[str, Any], str]:
    metadata = {
        "conduit/source_rows": expected,
        "conduit/destination_rows": -1 if actual is None else actual,
        "conduit/difference": expected - (actual or 0),
    }
    text = f"source {expected:,} rows, destination {'no output' if actual is None else f'{actual:,} rows'}"
    return actual == expected, metadata, text


def partition_row_counts(
    resource: ResourceSpec, store: CheckpointStore, key: str, s3: S3Resource | None
) -> tuple[Partition, int, int | None]:
    """(partition, the source's rows in it now, the rows in its published output)."""
    partition = existing_partition(resource, key, store)
    with data_lake_clients(s3):
        source = open_source(resource.source)
    try:
        restrict_source(source, resource, partition)
        expected = source.count(resource.query)
    finally:
        source.close()
    return partition, expected, output_row_count(resource, s3, partition)


def build_row_count_check(spec: IngestSpec, resource: ResourceSpec) -> AssetChecksDefinition:
    """The destination holds as many rows as the source has for the same range: all the query returns now (a
    full refresh), or, for an incremental load, what it returns from initial_value up to the stored value.

    On a partitioned pipeline the check is partitioned too: each partition of the run compares the source's rows in
    that partition with that partition's output, and reports its own evaluation."""

    pdef = partitions_def(resource)
    check = asset_check(
        asset=resource.name,
        name=CHECK_NAME,
        description="Rows in the destination against the source's rows for the same range"
        + (" (per partition)" if pdef is not None else "")
        + "; both numbers are reported.",
        partitions_def=pdef,
    )

    def decorate(fn: Any) -> AssetChecksDefinition:
        with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13; they work as used here
            warnings.simplefilter("ignore", PreviewWarning)
            return check(fn)

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
        passed, metadata, text = _count_result(expected, actual)
        return AssetCheckResult(passed=passed, metadata=metadata, description=text)

    def evaluate_partitions(
        context: AssetCheckExecutionContext, checkpoints: CheckpointStoreResource, s3: S3Resource | None
    ) -> AssetCheckResult | None:
        keys = run_partition_keys(context, resource)
        results: list[tuple[str, bool, dict[str, Any], str]] = []
        try:
            store = checkpoints.open_store(spec)
            for key in keys:
                partition, expected, actual = partition_row_counts(resource, store, key, s3)
                passed, metadata, text = _count_result(expected, actual)
                results.append((key, passed, {**metadata, "conduit/partition_rows": partition.describe()}, text))
                context.log.info(f"{resource.name} partition {key}: {text}" + ("" if passed else ": DIFFERENT"))
        except ConduitError as exc:
            raise Failure(description=f"{resource.name}: {exc}") from None
        if context.has_partition_key:  # one partition: Dagster records the result against it
            (_, passed, metadata, text) = results[0]
            return AssetCheckResult(passed=passed, metadata=metadata, description=text)
        # several partitions (a range run): one evaluation per partition; a returned result would be recorded
        # against no partition
        for key, passed, metadata, text in results:
            cast(Any, context.op_execution_context).log_event(
                AssetCheckEvaluation(
                    asset_key=AssetKey(resource.name),
                    check_name=CHECK_NAME,
                    passed=passed,
                    metadata=metadata,
                    description=text,
                    partition=key,
                )
            )
        return None

    if pdef is not None:
        if uses_s3(resource):

            def _check_partitions_s3(
                context: AssetCheckExecutionContext, checkpoints: CheckpointStoreResource, s3: S3Resource
            ) -> Any:
                return evaluate_partitions(context, checkpoints, s3)

            return decorate(_check_partitions_s3)

        def _check_partitions(context: AssetCheckExecutionContext, checkpoints: CheckpointStoreResource) -> Any:
            return evaluate_partitions(context, checkpoints, None)

        return decorate(_check_partitions)

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
    repeated full reads have no source range to compare with); per partition for a partitioned one."""
    return [
        build_row_count_check(spec, r)
        for r in spec.resources
        if r.incremental_column is not None or destination_backend(r.destination).counts_whole_output(r.destination)
    ]


def build_ingest_jobs(spec: IngestSpec) -> Sequence[Any]:
    """``ingest_<name>`` for every resource (partitioned for a partitioned one), and ``ingest_all`` for the
    unpartitioned ones (a Dagster job cannot mix partitioned and unpartitioned assets, or two partitionings)."""
    jobs = [
        define_asset_job(
            job_name(r),
            selection=AssetSelection.assets(r.name),
            description=f"Ingest {r.name}" + (f", one or more of its partitions ({describe_scheme(r)})" if r.partitions else ""),
            # run retries (needs `run_retries: {enabled: true}` in dagster.yaml and the daemon); a retry resumes
            tags={"dagster/max_retries": str(r.retries)} if r.retries else None,
        )
        for r in spec.resources
    ]
    plain = [r.name for r in spec.resources if r.partitions is None]
    if plain:
        partitioned = [r.name for r in spec.resources if r.partitions is not None]
        jobs.append(
            define_asset_job(
                "ingest_all",
                selection=AssetSelection.assets(*plain),
                description="Ingest every resource of ingest.yml"
                + (
                    f" except the partitioned ones ({', '.join(partitioned)}: see their ingest_<name> jobs)"
                    if partitioned
                    else ""
                ),
            )
        )
    return jobs
