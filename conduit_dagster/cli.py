"""The ``conduit`` command: run pipelines, check ingest.yml, look at and clear checkpoints.

    conduit run [--file ingest.yml] [--pipeline NAME ...] [--dry-run]
    conduit validate [--file ingest.yml] [--dir DIR]
    conduit checkpoints [--file ingest.yml] [--dir DIR]
    conduit clear-checkpoints [--pipeline-name NAME] [--file ingest.yml] [--dir DIR]

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
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.spec import INGEST_FILE_ENV, CheckpointsSpec, load_spec
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


def cmd_checkpoints(args: argparse.Namespace) -> int:
    store = _store(args)
    names = store.list()
    if not names and not store.list_states():
        print(f"no checkpoints in {store.location}")
        return 0
    rows = [("pipeline", "column", "last value", "type", "records", "age", "run id")]
    for name in names:
        try:
            cp = store.load(name)
        except ConduitError as exc:
            rows.append((name, "!", str(exc), "", "", "", ""))
            continue
        if cp is None:
            continue
        enc = encode_value(cp.last_value)
        rows.append(
            (
                name,
                cp.checkpoint_column,
                enc["value"],
                enc["type"],
                f"{cp.records_processed:,}",
                _age(cp.updated_at),
                cp.run_id or "",
            )
        )
    for name in store.list_states():
        try:
            state = store.load_state(name)
        except ConduitError as exc:
            rows.append((name, "!", str(exc), "", "", "", ""))
            continue
        if state is not None:
            enc = encode_value(state.last_value)
            rows.append(
                (
                    f"{name} (incremental state)",
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
    print(f"({store.location})")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = _store(args)
    names = [args.pipeline_name] if args.pipeline_name else store.list()
    cleared = []
    leftovers: dict[str, list[str]] = {}
    for name in names:
        if store.has_checkpoint(name):
            with store.lock(name, "conduit clear-checkpoints"):  # never pull a checkpoint from under a live run
                leftover = _leftover_of(store, name)
                store.delete(name)
            cleared.append(name)
            if leftover:
                leftovers[name] = leftover
        elif args.pipeline_name:
            print(f"no checkpoint for {name!r} in {store.location}")
            return 0
    if not cleared and not args.state:
        print(f"no checkpoints in {store.location}")
    for name in cleared:
        print(f"cleared {name} ({store.describe(name)}); its next run is a full refresh")
        for line in leftovers.get(name, []):  # no run will touch it again, and this command cannot reach the destination
            print(f"  {line}")
    if args.state:  # incremental state: the next run starts again from initial_value
        states = store.list_states()
        for name in [args.pipeline_name] if args.pipeline_name else states:
            if name in states:
                with store.lock(name, "conduit clear-checkpoints"):
                    store.delete_state(name)
                print(f"cleared the incremental state of {name}; its next run loads from initial_value again")
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
            cp = store.load(r.name) if r.resume else None
        except ConduitError as exc:
            problems += 1
            print(f"  resource {r.name}: FAILED: {exc}")
            continue
        if not r.resume:
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


def cmd_run(args: argparse.Namespace) -> int:
    """Materialize pipelines through Dagster: the same assets and checkpoint resource as the UI's runs."""
    path = _ingest_file(args.file)
    os.environ[INGEST_FILE_ENV] = str(path)  # child processes rebuild the same definitions
    from dagster import AssetKey, DagsterEventType, DagsterInstance

    from conduit_dagster.definitions import build_definitions
    from conduit_dagster.engine.spec import load_spec

    spec = load_spec(path)
    names = args.pipeline or [r.name for r in spec.resources]
    for name in names:
        spec.resource(name)  # an unknown name is an error before anything runs
    if args.dry_run:
        return cmd_validate(args)
    defs = build_definitions(path)
    job = defs.resolve_implicit_global_asset_job_def()
    if args.dir:
        os.environ[CHECKPOINTS_ENV] = args.dir  # the run's resource resolves the same store
    store = _store(args)
    home = os.environ.get("DAGSTER_HOME")
    instance = DagsterInstance.get() if home else DagsterInstance.ephemeral()
    print(f"running {', '.join(names)} from {path}" + (f" (runs recorded in {home})" if home else ""), flush=True)
    with instance, _Progress(store, names, sys.stdout):
        result = job.execute_in_process(
            asset_selection=[AssetKey(n) for n in names],
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()}
            print(
                f"{mat.asset_key.to_user_string()}: {meta['conduit/rows_this_run']:,} rows this run "
                f"({meta['conduit/records_processed']:,} in total){' resumed' if meta['conduit/resumed'] else ''}, "
                f"{meta['conduit/duration_s']:.1f} s, {meta['conduit/rows_per_second']:,.0f} rows/s -> {meta['conduit/output']}"
            )
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            message = error.message.strip() if error else "failed"
            message = message.removeprefix("dagster._core.definitions.events.Failure: ").removeprefix(f"{event.step_key}: ")
            print(f"{event.step_key}: FAILED: {message}", file=sys.stderr)
    print(f"run {result.run_id}: {'success' if result.success else 'failure'}")
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conduit", description="conduit-dagster: check ingest.yml, manage checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "materialize pipelines through Dagster, resuming from their checkpoints"),
        ("validate", "check ingest.yml and every connection, and print what would run"),
        ("checkpoints", "list saved checkpoints"),
        ("clear-checkpoints", "delete checkpoints"),
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
            p.add_argument("--pipeline-name", help="the pipeline (resource) whose checkpoint to clear; default all")
            p.add_argument("--state", action="store_true", help="also clear incremental state (reload from initial_value)")
        if name == "run":
            p.add_argument("--pipeline", action="append", help="a resource to run (repeatable); default all")
            p.add_argument("--dry-run", action="store_true", help="check everything and print what would run; run nothing")
    args = parser.parse_args(argv)
    try:
        commands_by_name = {
            "run": cmd_run,
            "validate": cmd_validate,
            "checkpoints": cmd_checkpoints,
            "clear-checkpoints": cmd_clear,
        }
        command = commands_by_name[args.command]
        return command(args)
    except ConduitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
