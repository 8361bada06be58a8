"""The ``conduit`` command: run pipelines, check ingest.yml, look at and clear checkpoints, plan key ranges.

    conduit run [--file ingest.yml] [--pipeline NAME ...] [--partition KEY ... | --all-partitions] [--dry-run]
    conduit validate [--file ingest.yml] [--dir DIR]
    conduit checkpoints [--file ingest.yml] [--dir DIR] [--pipeline NAME]
    conduit checkpoints clear [--pipeline NAME [--partition KEY ...]] [--state] [--file ingest.yml] [--dir DIR]
    conduit clear-checkpoints [--pipeline-name NAME] [--file ingest.yml] [--dir DIR]
    conduit plan --pipeline NAME [--file ingest.yml] [--dir DIR]

A partitioned pipeline's checkpoints are per partition (``<pipeline>.<key>`` in the store); ``conduit
checkpoints`` shows them with a pipeline and a partition column. ``conduit run`` runs a partitioned
pipeline's partitions as Dagster runs the asset's backfill: one run per partition (``backfill:
multi_run``, or up to ``max_partitions_per_run`` adjacent partitions a run), or one run for adjacent
partitions (``single_run``).

The checkpoint store is found as the Dagster resource finds it: --dir (a directory or
s3://bucket/prefix), else $CONDUIT_CHECKPOINTS / $CONDUIT_CHECKPOINT_DIR, else ingest.yml's
``checkpoints:`` section, else .checkpoints/ beside ingest.yml.
"""

import argparse
import datetime as dt
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conduit_dagster.engine.checkpoint import CheckpointStore, encode_value
from conduit_dagster.engine.errors import ConduitError, SpecError
from conduit_dagster.engine.partition_runs import describe_keys, describe_scheme, select_partitions
from conduit_dagster.engine.partitions import (
    KeyRanges,
    RangePlan,
    load_plan,
    partition_keys,
    range_keys,
    split_unit,
    unit_name,
)
from conduit_dagster.engine.spec import INGEST_FILE_ENV, CheckpointsSpec, IngestSpec, ResourceSpec, load_spec
from conduit_dagster.engine.stores import CHECKPOINTS_ENV, checkpoint_settings, open_checkpoint_store


def _ingest_file(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    env = os.environ.get(INGEST_FILE_ENV)
    return Path(env).resolve() if env else Path("ingest.yml").resolve()


def _store(args: argparse.Namespace) -> CheckpointStore:
    path = _ingest_file(args.file)
    configured: CheckpointsSpec | None = None
    try:
        configured = load_spec(path).checkpoints
    except ConduitError as exc:  # checkpoints can still be listed and cleared with a broken or missing ingest.yml
        print(f"warning: {exc}; using the checkpoint store from --dir or the environment", file=sys.stderr)
    env = {**os.environ, CHECKPOINTS_ENV: args.dir} if args.dir else None
    return open_checkpoint_store(checkpoint_settings(configured, env), path.parent)


def _age(updated_at: str) -> str:
    try:
        seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(updated_at)).total_seconds()
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _wanted(args: argparse.Namespace, name: str) -> bool:
    """The checkpoint ``name`` is one of those the command's --pipeline / --partition name (all when none)."""
    pipeline, key = split_unit(name)
    if getattr(args, "pipeline", None) and pipeline != args.pipeline:
        return False
    partitions = getattr(args, "partition", None)
    return not partitions or key in partitions


def _plans(args: argparse.Namespace, store: CheckpointStore) -> list[str]:
    """One line per key-range plan of ingest.yml's partitioned pipelines that the store holds."""
    try:
        spec = load_spec(_ingest_file(args.file))
    except ConduitError:
        return []
    lines = []
    for r in spec.resources:
        if r.partitions is None or not isinstance(r.partitions.scheme, KeyRanges) or not _wanted(args, r.name):
            continue
        try:
            plan = load_plan(r, store)
        except ConduitError as exc:
            lines.append(f"{r.name}: ! {exc}")
            continue
        if plan is not None:
            lines.append(
                f"{r.name}: {plan.ranges} key ranges on {plan.column}, planned {plan.planned_at} from {plan.rows_seen:,} "
                f"rows ({_age(plan.planned_at)} ago)"
            )
    return lines


def cmd_checkpoints(args: argparse.Namespace) -> int:
    if args.action == "clear":
        return cmd_checkpoints_clear(args)
    if args.partition and not args.pipeline:
        raise SpecError("--partition needs --pipeline: partition keys belong to one pipeline")
    store = _store(args)
    names = [n for n in store.list() if _wanted(args, n)]
    states = [n for n in store.list_states() if _wanted(args, n)]
    plans = _plans(args, store)
    if not names and not states:
        print(f"no checkpoints in {store.location}")
        for line in plans:
            print(f"plan {line}")
        return 0
    rows = [("pipeline", "partition", "column", "last value", "type", "records", "age", "run id")]
    for name in names:
        pipeline, key = split_unit(name)
        try:
            cp = store.load(name)
        except ConduitError as exc:
            rows.append((pipeline, key or "", "!", str(exc), "", "", "", ""))
            continue
        if cp is None:
            continue
        enc = encode_value(cp.last_value)
        rows.append(
            (
                pipeline,
                key or "",
                cp.checkpoint_column,
                enc["value"],
                enc["type"],
                f"{cp.records_processed:,}",
                _age(cp.updated_at),
                cp.run_id or "",
            )
        )
    for name in states:
        try:
            state = store.load_state(name)
        except ConduitError as exc:
            rows.append((name, "", "!", str(exc), "", "", "", ""))
            continue
        if state is not None:
            enc = encode_value(state.last_value)
            rows.append(
                (
                    f"{name} (incremental state)",
                    "",
                    state.incremental_column,
                    enc["value"],
                    enc["type"],
                    "",
                    _age(state.updated_at),
                    state.run_id or "",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for line in plans:
        print(f"plan {line}")
    print(f"({store.location})")
    return 0


def _clear_units(store: CheckpointStore, names: list[str]) -> list[str]:
    """Delete the checkpoints ``names`` (each under its lock: never from under a live run); print what was cleared."""
    cleared = []
    for name in names:
        if not store.has_checkpoint(name):
            continue
        with store.lock(name, "conduit clear-checkpoints"):  # never pull a checkpoint from under a live run
            leftover = _leftover_of(store, name)
            store.delete(name)
        cleared.append(name)
        pipeline, key = split_unit(name)
        if key is None:
            print(f"cleared {name} ({store.describe(name)}); its next run is a full refresh")
        else:
            print(f"cleared {pipeline} partition {key} ({store.describe(name)}); its next run loads that partition in full")
        for line in leftover or []:  # no run will touch it again, and this command cannot reach the destination
            print(f"  {line}")
    return cleared


def cmd_checkpoints_clear(args: argparse.Namespace) -> int:
    """``conduit checkpoints clear [--pipeline X [--partition K ...]] [--state]``."""
    if args.partition and not args.pipeline:
        raise SpecError("--partition needs --pipeline: partition keys belong to one pipeline")
    store = _store(args)
    names = [n for n in store.list() if _wanted(args, n)]
    if args.partition:
        missing = [k for k in args.partition if unit_name(args.pipeline, k) not in names]
        for key in missing:
            print(f"no checkpoint for {args.pipeline} partition {key} in {store.location}")
    cleared = _clear_units(store, names)
    if not cleared and not args.partition and not args.state:
        print(f"no checkpoints{f' for {args.pipeline!r}' if args.pipeline else ''} in {store.location}")
    if args.state:
        _clear_states(store, args.pipeline)
    return 0


def _clear_states(store: CheckpointStore, pipeline: str | None) -> None:
    """Incremental state: the next run starts again from initial_value."""
    states = store.list_states()
    for name in [pipeline] if pipeline else states:
        if name in states:
            with store.lock(name, "conduit clear-checkpoints"):
                store.delete_state(name)
            print(f"cleared the incremental state of {name}; its next run loads from initial_value again")


def cmd_clear(args: argparse.Namespace) -> int:
    store = _store(args)
    names = [args.pipeline_name] if args.pipeline_name else store.list()
    if args.pipeline_name and not store.has_checkpoint(args.pipeline_name):
        # a partitioned pipeline's name: its partitions' checkpoints
        names = [n for n in store.list() if split_unit(n)[0] == args.pipeline_name] or names
    cleared = _clear_units(store, names)
    if args.pipeline_name and not cleared:
        print(f"no checkpoint for {args.pipeline_name!r} in {store.location}")
    elif not cleared and not args.state:
        print(f"no checkpoints in {store.location}")
    if args.state:
        _clear_states(store, args.pipeline_name)
    return 0


def _leftover_of(store: CheckpointStore, name: str) -> list[str] | None:
    """What a checkpoint's unfinished output leaves at its destination that no run will touch again (lines to show)."""
    from conduit_dagster.engine.backends import destination_backends

    try:
        checkpoint = store.load(name)
    except ConduitError:
        return None  # a damaged checkpoint: nothing to read from it
    if checkpoint is None:
        return None
    for backend in destination_backends():
        lines = backend.leftover(checkpoint.destination_id, checkpoint.destination, name)
        if lines:
            return lines
    return None


def _check_destination(dest: Any) -> str:
    from conduit_dagster.engine.backends import destination_backend

    return destination_backend(dest).check(dest)


def _partitioning(r: ResourceSpec, store: CheckpointStore) -> str:
    """How a partitioned pipeline is split, its keys, plan and unfinished partitions (for `conduit validate`)."""
    text = f"partitioned: {describe_scheme(r)} ({describe_keys(partition_keys(r))})"
    assert r.partitions is not None
    if isinstance(r.partitions.scheme, KeyRanges):
        plan = load_plan(r, store)
        text += (
            f", planned {plan.planned_at} from {plan.rows_seen:,} rows"
            if plan is not None
            else ", not planned yet (the first partition run plans it; `conduit plan` re-plans)"
        )
    held = [key for name in store.list() for pipeline, key in [split_unit(name)] if pipeline == r.name and key is not None]
    if held:
        text += f", {len(held)} partition(s) with an unfinished run ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''})"
    return text + f", backfill {r.partitions.backfill}"


def cmd_validate(args: argparse.Namespace) -> int:
    """ingest.yml's syntax, every connection and query, and what a run would do; never a secret."""
    from conduit_dagster.engine.sources import open_source

    path = _ingest_file(args.file)
    spec = load_spec(path)
    store = _store(args)
    print(f"{path}: {len(spec.sources)} source(s), {len(spec.destinations)} destination(s), {len(spec.resources)} resource(s)")
    problems = 0
    try:
        pending = store.list()
        print(f"  checkpoints: ok, {store.location} ({len(pending)} unfinished run(s))")
    except ConduitError as exc:
        problems += 1
        print(f"  checkpoints: FAILED: {exc}")
    sources: dict[str, Any] = {}
    for source in spec.sources:
        try:
            sources[source.name] = open_source(source)
            print(f"  source {source.name}: ok, {sources[source.name].describe()}")
        except ConduitError as exc:
            problems += 1
            print(f"  source {source.name}: FAILED: {exc}")
    for dest in spec.destinations:
        try:
            print(f"  destination {dest.name}: ok, {_check_destination(dest)}")
        except ConduitError as exc:
            problems += 1
            print(f"  destination {dest.name}: FAILED: {exc}")
    for r in spec.resources:
        src = sources.get(r.source.name)
        try:
            state = store.load_state(r.name) if r.incremental_column else None
            if src is not None and r.incremental_column:
                src.bind({"last_value": state.last_value if state else r.initial_value})
            columns = src.probe(r.query, r.checkpoint_column) if src is not None else []
            cp = store.load(r.name) if r.resume and r.partitions is None else None
            split = _partitioning(r, store) if r.partitions is not None else ""
        except ConduitError as exc:
            problems += 1
            print(f"  resource {r.name}: FAILED: {exc}")
            continue
        if split:
            plan = split
        elif not r.resume:
            plan = "full refresh (resume off)"
        elif cp is None:
            plan = f"full refresh, checkpointed on {r.checkpoint_column}"
        else:
            plan = f"resumes after {r.checkpoint_column} = {cp.last_value!r} ({cp.records_processed:,} rows already written)"
        if r.incremental_column:
            plan += f"; incremental on {r.incremental_column}, :last_value = " + (
                f"{state.last_value!r} (stored)" if state else f"{r.initial_value!r} (initial_value)"
            )
        extra = f", schedule {r.schedule}" + (f" {r.schedule_timezone}" if r.schedule_timezone else "") if r.schedule else ""
        extra += f", retries {r.retries}" if r.retries else ""
        status = "ok" if src is not None else "source unavailable"
        print(
            f"  resource {r.name}: {status}, {r.source.name} -> {r.destination.name}, {len(columns)} columns, "
            f"batches of {r.batch_size:,}, {plan}{extra}"
        )
    for src in sources.values():
        src.close()
    print("valid" if problems == 0 else f"{problems} problem(s)")
    return 1 if problems else 0


class _Progress:
    """Per-pipeline progress from the checkpoints the run saves: a live line on a terminal, plain lines otherwise."""

    def __init__(self, store: CheckpointStore, names: list[str], stream: Any) -> None:
        self.store, self.names, self.stream = store, names, stream
        self.tty = stream.isatty()
        self.seen: dict[str, int] = {}
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        spin = "|/-\\"
        tick = 0
        while not self.stop.wait(0.2):
            tick += 1
            for name in self.names:
                try:
                    cp = self.store.load(name)
                except ConduitError:
                    continue
                if cp is None or cp.records_processed == self.seen.get(name):
                    continue
                self.seen[name] = cp.records_processed
                rate = cp.records_processed / max(time.monotonic() - self.started, 1e-6)
                line = f"{name}: {cp.records_processed:,} rows, {cp.batches_committed} batches, ~{rate:,.0f} rows/s"
                if self.tty:
                    self.stream.write(f"\r\033[K{spin[tick % 4]} {line}")
                else:
                    self.stream.write(line + "\n")
                self.stream.flush()

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty and self.seen:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _runs(resource: ResourceSpec, keys: list[str], every_key: list[str]) -> list[list[str]]:
    """The partition keys of each run, as a Dagster backfill would make them: adjacent partitions only (a run covers
    a range of keys), at most ``max_partitions_per_run`` a run under ``multi_run``, any number under ``single_run``."""
    assert resource.partitions is not None
    limit = len(keys) if resource.partitions.backfill == "single_run" else resource.partitions.max_partitions_per_run
    position = {k: i for i, k in enumerate(every_key)}
    runs: list[list[str]] = []
    for key in keys:
        last = runs[-1] if runs else None
        if last is not None and len(last) < limit and position[key] == position[last[-1]] + 1:
            last.append(key)
        else:
            runs.append([key])
    return runs


def _report(result: Any, instance: Any) -> None:
    """What one Dagster run did: a line per materialization (per partition), a line per failure. Read from the
    instance: a failed step's result leaves out the partitions it loaded before failing."""
    from dagster import DagsterEventType

    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()}
            label = mat.asset_key.to_user_string() + (f" partition {mat.partition}" if mat.partition else "")
            rows = meta.get("dagster/partition_row_count")
            print(
                f"{label}: {meta['conduit/rows_this_run']:,} rows this run ({meta['conduit/records_processed']:,} in total)"
                f"{' resumed' if meta['conduit/resumed'] else ''}, {meta['conduit/duration_s']:.1f} s, "
                f"{meta['conduit/rows_per_second']:,.0f} rows/s"
                + (f", {rows:,} rows in the partition" if rows is not None and mat.partition else "")
                + f" -> {meta['conduit/output']}"
            )
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            message = error.message.strip() if error else "failed"
            message = message.removeprefix("dagster._core.definitions.events.Failure: ")
            head, sep, rest = message.partition(": ")
            if sep and head.startswith(event.step_key or ""):  # "orders: ..." or "orders partition K: ..."
                print(f"{head}: FAILED: {rest}", file=sys.stderr)
            else:
                print(f"{event.step_key}: FAILED: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Materialize pipelines through Dagster: the same assets and checkpoint resource as the UI's runs."""
    path = _ingest_file(args.file)
    os.environ[INGEST_FILE_ENV] = str(path)  # child processes rebuild the same definitions
    spec = load_spec(path)
    names = args.pipeline or [r.name for r in spec.resources]
    selected: dict[str, list[str] | None] = {}
    for name in names:
        # an unknown name, a partitioned pipeline without --partition, an unknown key: errors before anything runs
        selected[name] = select_partitions(spec.resource(name), args.partition, args.all_partitions)
    if args.dry_run:
        return cmd_validate(args)
    return run_through_dagster(args, spec, path, selected)


def run_through_dagster(args: argparse.Namespace, spec: IngestSpec, path: Path, selected: dict[str, list[str] | None]) -> int:
    """One Dagster run for the unpartitioned pipelines, and for each partitioned one the runs its backfill policy
    makes of the selected partitions; each recorded in $DAGSTER_HOME when it is set."""
    from dagster import AssetKey, DagsterInstance

    from conduit_dagster.assets import job_name
    from conduit_dagster.definitions import build_definitions

    defs = build_definitions(path)
    if args.dir:
        os.environ[CHECKPOINTS_ENV] = args.dir  # the run's resource resolves the same store
    store = _store(args)
    home = os.environ.get("DAGSTER_HOME")
    instance = DagsterInstance.get() if home else DagsterInstance.ephemeral()
    shown = [n if keys is None else f"{n} ({describe_keys(keys)})" for n, keys in selected.items()]
    print(f"running {', '.join(shown)} from {path}" + (f" (runs recorded in {home})" if home else ""), flush=True)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    plain = [n for n, keys in selected.items() if keys is None]
    ok = True
    with instance:
        if plain:
            with _Progress(store, plain, sys.stdout):
                result = defs.resolve_job_def("ingest_all").execute_in_process(
                    asset_selection=[AssetKey(n) for n in plain], instance=instance, raise_on_error=False, run_config=quiet
                )
            _report(result, instance)
            print(f"run {result.run_id}: {'success' if result.success else 'failure'}")
            ok = ok and result.success
        for name, keys in selected.items():
            if keys is None:
                continue
            resource = spec.resource(name)
            job = defs.resolve_job_def(job_name(resource))
            for run_keys in _runs(resource, keys, partition_keys(resource)):
                if len(run_keys) == 1:
                    how: dict[str, Any] = {"partition_key": run_keys[0]}
                else:
                    how = {
                        "tags": {
                            "dagster/asset_partition_range_start": run_keys[0],
                            "dagster/asset_partition_range_end": run_keys[-1],
                        }
                    }
                with _Progress(store, [unit_name(name, k) for k in run_keys], sys.stdout):
                    result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=quiet, **how)
                _report(result, instance)
                what = run_keys[0] if len(run_keys) == 1 else f"{run_keys[0]} .. {run_keys[-1]}"
                print(f"run {result.run_id} ({name} {what}): {'success' if result.success else 'failure'}")
                ok = ok and result.success
    return 0 if ok else 1


def _boundaries(plan: RangePlan | None) -> list[str]:
    if plan is None:
        return []
    keys = range_keys(plan.ranges)
    bounds = ["-inf", *(repr(b) for b in plan.boundaries), "+inf"]
    return [f"{key} [{bounds[i]}, {bounds[i + 1]})" for i, key in enumerate(keys)]


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a key-range pipeline's boundaries again from the source (refused while a partition holds a checkpoint)."""
    from conduit_dagster.engine.partitions import range_keys, replan
    from conduit_dagster.engine.sources import open_source

    spec = load_spec(_ingest_file(args.file))
    resource = spec.resource(args.pipeline)
    if resource.partitions is None:
        raise SpecError(f"pipeline {resource.name!r} has no partitions: there is nothing to plan")
    if not isinstance(resource.partitions.scheme, KeyRanges):
        raise SpecError(
            f"pipeline {resource.name!r} is split into {describe_scheme(resource)}, which need no plan; `conduit plan` "
            "plans key ranges (`ranges:`)"
        )
    store = _store(args)
    print(f"planning {resource.name}: {describe_scheme(resource)}, one pass over {resource.partitions.column}", flush=True)
    old, new = replan(resource, store, lambda: open_source(resource.source))
    before, after = _boundaries(old), _boundaries(new)
    width = max([len(line) for line in before] + [len("old")])
    print(f"{'old'.ljust(width)}  new")
    for i in range(max(len(before), len(after))):
        left = before[i] if i < len(before) else ("(no plan)" if i == 0 else "")
        right = after[i] if i < len(after) else ""
        print(f"{left.ljust(width)}  {right}".rstrip())
    seen = f"from {old.rows_seen:,} rows, {old.planned_at}" if old is not None else "none before"
    print(f"rows seen: {new.rows_seen:,} now ({seen}); saved to {store.describe(resource.name).removesuffix('.json')}.plan.json")
    if old is not None and old.ranges > new.ranges:
        gone = ", ".join(range_keys(old.ranges)[new.ranges :])
        print(
            f"warning: partitions {gone} no longer exist, but the folders or S3 prefixes they published (local and S3 "
            "destinations) stay: delete them, or readers of the whole output see those rows twice. A table needs no "
            "deleting: once every remaining partition is loaded again, their ranges cover every key"
        )
    if old is not None and old.boundaries != new.boundaries:
        print(
            f"warning: the boundaries moved: the partitions already loaded hold the rows of the old ranges; load every "
            f"partition of {resource.name} again (conduit run --pipeline {resource.name} --all-partitions, or a backfill "
            "of all its partitions) so that no row is in two partitions' outputs or in none"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conduit", description="conduit-dagster: check ingest.yml, manage checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "materialize pipelines through Dagster, resuming from their checkpoints"),
        ("validate", "check ingest.yml and every connection, and print what would run"),
        ("checkpoints", "list saved checkpoints (`checkpoints clear` deletes them)"),
        ("clear-checkpoints", "delete checkpoints"),
        ("plan", "plan a key-range pipeline's partitions again from the source"),
    )
    for name, help_text in commands:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--file", help="ingest.yml (default: $CONDUIT_INGEST_FILE or ./ingest.yml)")
        p.add_argument(
            "--dir",
            help="checkpoint store: a directory or s3://bucket/prefix (default: $CONDUIT_CHECKPOINTS, "
            "ingest.yml's checkpoints:, .checkpoints/ beside ingest.yml)",
        )
        if name == "clear-checkpoints":
            p.add_argument(
                "--pipeline-name", help="the pipeline (resource) whose checkpoint to clear, or PIPELINE.KEY; default all"
            )
            p.add_argument("--state", action="store_true", help="also clear incremental state (reload from initial_value)")
        if name == "checkpoints":
            p.add_argument("action", nargs="?", choices=("list", "clear"), default="list", help="list (default) or clear")
            p.add_argument("--pipeline", help="only this pipeline's checkpoints")
            p.add_argument("--partition", action="append", help="only this partition's checkpoint (repeatable; with --pipeline)")
            p.add_argument("--state", action="store_true", help="clear: also clear incremental state (reload from initial_value)")
        if name == "run":
            p.add_argument("--pipeline", action="append", help="a resource to run (repeatable); default all")
            p.add_argument("--partition", action="append", help="a partition key of a partitioned pipeline (repeatable)")
            p.add_argument("--all-partitions", action="store_true", help="every partition of the partitioned pipelines")
            p.add_argument("--dry-run", action="store_true", help="check everything and print what would run; run nothing")
        if name == "plan":
            p.add_argument("--pipeline", required=True, help="the key-range pipeline (resource) to plan")
    args = parser.parse_args(argv)
    try:
        commands_by_name = {
            "run": cmd_run,
            "validate": cmd_validate,
            "checkpoints": cmd_checkpoints,
            "clear-checkpoints": cmd_clear,
            "plan": cmd_plan,
        }
        command = commands_by_name[args.command]
        return command(args)
    except ConduitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
