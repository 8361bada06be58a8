"""The ``conduit`` command: look at and clear checkpoints.

    conduit checkpoints [--file ingest.yml] [--dir DIR]
    conduit clear-checkpoints [--pipeline-name NAME] [--file ingest.yml] [--dir DIR]

The checkpoint directory is found as the Dagster resource finds it: --dir, else
$CONDUIT_CHECKPOINT_DIR, else .checkpoints/ beside ingest.yml.
"""

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from conduit_dagster.engine.checkpoint import LocalCheckpointStore, encode_value, resolve_checkpoint_dir
from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.spec import INGEST_FILE_ENV


def _ingest_file(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    env = os.environ.get(INGEST_FILE_ENV)
    return Path(env).resolve() if env else Path("ingest.yml").resolve()


def _store(args: argparse.Namespace) -> LocalCheckpointStore:
    return LocalCheckpointStore(resolve_checkpoint_dir(_ingest_file(args.file).parent, args.dir))


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
    if not names:
        print(f"no checkpoints in {store.directory}")
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"({store.directory})")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = _store(args)
    names = [args.pipeline_name] if args.pipeline_name else store.list()
    cleared = []
    for name in names:
        path = Path(store.describe(name))
        if path.exists():
            with store.lock(name, "conduit clear-checkpoints"):  # never pull a checkpoint from under a live run
                store.delete(name)
            cleared.append(name)
        elif args.pipeline_name:
            print(f"no checkpoint for {name!r} in {store.directory}")
            return 0
    if not cleared:
        print(f"no checkpoints in {store.directory}")
    for name in cleared:
        print(f"cleared {name} ({store.describe(name)}); its next run is a full refresh")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conduit", description="conduit-dagster checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("checkpoints", "list saved checkpoints"), ("clear-checkpoints", "delete checkpoints")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--file", help="ingest.yml (default: $CONDUIT_INGEST_FILE or ./ingest.yml)")
        p.add_argument("--dir", help="checkpoint directory (default: $CONDUIT_CHECKPOINT_DIR or .checkpoints/ beside ingest.yml)")
        if name == "clear-checkpoints":
            p.add_argument("--pipeline-name", help="the pipeline (resource) whose checkpoint to clear; default all")
    args = parser.parse_args(argv)
    try:
        return cmd_checkpoints(args) if args.command == "checkpoints" else cmd_clear(args)
    except ConduitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
