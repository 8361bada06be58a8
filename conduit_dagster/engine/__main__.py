"""Run pipelines with the engine alone, without Dagster (benchmarks, the crash harness, scripts).

    python -m conduit_dagster.engine run --file ingest.yml --pipeline NAME [--partition KEY ... | --all-partitions]
        [--checkpoint-dir DIR|s3://bucket/prefix] [--run-id ID]

Prints one line per committed batch and a summary; exits 0 on success, 1 on a ConduitError
(its message on stderr), 2 on usage errors. Runs started from Dagster (the usual way) show in
its UI; these do not. A partitioned pipeline runs the partitions named with ``--partition`` (or
every one with ``--all-partitions``) one after the other, each as its own unit (checkpoint, lock,
output), chosen and resolved by the same functions as the Dagster asset and ``conduit run``
(``engine.partition_runs``).
"""

import argparse
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from conduit_dagster.engine.checkpoint import CheckpointStore
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.partition_runs import resolve, select_partitions
from conduit_dagster.engine.partitions import Partition
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, RunWarning, run_pipeline
from conduit_dagster.engine.spec import ResourceSpec, load_spec
from conduit_dagster.engine.stores import CHECKPOINTS_ENV, checkpoint_settings, open_checkpoint_store


def run_one(resource: ResourceSpec, store: CheckpointStore, run_id: str, partition: Partition | None = None) -> None:
    """Run a pipeline (or one partition of it) to the end, printing its events."""
    say = _say(resource.name if partition is None else partition.unit)  # <pipeline>.<key>, the name of its checkpoint
    for event in run_pipeline(resource, store, run_id=run_id, partition=partition):
        if isinstance(event, RunStarted):
            how = f"resuming after {event.resumed_from!r}" if event.resumed else "full load"
            say(f"{how} into {event.destination}")
        elif isinstance(event, BatchCommitted):
            say(
                f"batch {event.index} committed, {event.rows} rows, {event.records_processed} in total, last {event.last_value!r}"
            )
        elif isinstance(event, RunWarning):
            say(f"warning: {event.message}")
        elif isinstance(event, RunFinished):
            say(f"done, {event.rows_this_run} rows this run, {event.records_processed} in total, {event.duration_s:.2f} s")


def _say(name: str) -> Callable[[str], None]:
    return lambda message: print(f"{name}: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conduit_dagster.engine")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipelines to the end, resuming from their checkpoints")
    run.add_argument("--file", default="ingest.yml")
    run.add_argument("--pipeline", action="append", help="a resource name (repeatable); default all")
    run.add_argument("--partition", action="append", help="a partition key of a partitioned pipeline (repeatable)")
    run.add_argument("--all-partitions", action="store_true", help="every partition of the partitioned pipelines")
    run.add_argument(
        "--checkpoint-dir",
        help="a directory or s3://bucket/prefix; default: $CONDUIT_CHECKPOINTS, ingest.yml's checkpoints:, .checkpoints/",
    )
    run.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    run_id = args.run_id or f"engine-{uuid.uuid4().hex[:12]}"
    try:
        spec = load_spec(Path(args.file))
        env = {**os.environ, CHECKPOINTS_ENV: args.checkpoint_dir} if args.checkpoint_dir else None
        store = open_checkpoint_store(checkpoint_settings(spec.checkpoints, env), spec.base_dir)
        names = args.pipeline or [r.name for r in spec.resources]
        # every name and partition key is checked before anything runs
        selected = {name: select_partitions(spec.resource(name), args.partition, args.all_partitions) for name in names}
        for name, keys in selected.items():
            resource = spec.resource(name)
            if keys is None:
                run_one(resource, store, run_id)
                continue
            for key in keys:
                partition = resolve(resource, key, store, on_wait=_say(name))
                run_one(resource, store, run_id, partition)
    except ConduitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
