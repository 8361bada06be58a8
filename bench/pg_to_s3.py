"""Benchmark: PostgreSQL table -> Parquet in S3, against the obvious script (psql \\copy, one Parquet file, one upload).

Method. The table of bench/pg_to_parquet.py (N rows, six columns) is read warm. S3 is moto's server
(`moto_server`, a separate process on 127.0.0.1, objects in memory), the same endpoint for every method;
it is a Python server sharing the machine's 2 cores, so absolute S3 figures are far below AWS's and the
comparison between methods is what counts. Each method runs as its own process, methods alternate within
each repetition (then in reverse), and every figure is the median over the repetitions with the range.
Wall time is measured around the whole process (start-up included).

- copy-upload (the baseline): `psql \\copy ... TO file CSV`, then pyarrow CSV -> one zstd Parquet file,
  then one boto3 upload_file (multipart, 16 MiB pieces): what one writes by hand to put the rows into S3 as
  Parquet, with no batching, no checkpoint and no publish step. Its three steps run one after the other and it
  holds the whole table in memory; the engine streams and overlaps reading, writing and uploading, which is
  why it can beat it.
- engine-local: the engine into local Parquet (local checkpoints), for reference.
- engine-s3: the engine into the S3 destination, checkpoints in a local directory.
- engine-s3-cp: the engine into the S3 destination, checkpoints in S3 (lease + conditional writes).
Every engine method writes one part per 100,000 rows and checkpoints after each; the S3 destination
stages the parts, then copies them into the output at publish (server-side) and writes the manifest.

    .venv/bin/python bench/pg_to_s3.py --rows 1000000 --repeat 3
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_to_parquet  # noqa: E402
from pg_to_parquet import COLUMNS, ensure_table, run_measured, summary, table_name  # noqa: E402

ALL_METHODS = ["copy-upload", "engine-local", "engine-s3", "engine-s3-cp"]
BUCKET = "conduit-bench"


def write_ingest(rows: int, out: Path, endpoint: str, *, to_s3: bool, s3_checkpoints: bool) -> Path:
    if to_s3:
        destination = f"    type: s3\n    bucket: {BUCKET}\n    prefix: {out.name}\n    endpoint_url: {endpoint}\n"
    else:
        destination = f"    type: local\n    path: {out / 'lake'}\n"
    checkpoints = (
        f"checkpoints:\n  type: s3\n  bucket: {BUCKET}\n  prefix: {out.name}/checkpoints\n  endpoint_url: {endpoint}\n"
        if s3_checkpoints
        else f"checkpoints:\n  directory: {out / 'checkpoints'}\n"
    )
    return pg_to_parquet.write_ingest(rows, out, destination=destination, head=checkpoints)


def child_engine(method: str, rows: int, out: Path, endpoint: str) -> dict:
    from conduit_dagster.engine.runner import RunFinished, run_pipeline
    from conduit_dagster.engine.spec import load_spec
    from conduit_dagster.engine.stores import checkpoint_settings, open_checkpoint_store

    spec = load_spec(write_ingest(rows, out, endpoint, to_s3=method != "engine-local", s3_checkpoints=method == "engine-s3-cp"))
    store = open_checkpoint_store(checkpoint_settings(spec.checkpoints, env={}), spec.base_dir)
    finished = None
    for event in run_pipeline(spec.resources[0], store, run_id="bench"):
        if isinstance(event, RunFinished):
            finished = event
    assert finished is not None and finished.rows_this_run == rows
    return {"rows": rows, "checkpoint_s": finished.checkpoint_s}


def child_copy_upload(rows: int, out: Path, endpoint: str) -> dict:
    import boto3
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from boto3.s3.transfer import TransferConfig

    csv = out / "floor.csv"
    sql = f"\\copy (SELECT {COLUMNS} FROM public.{table_name(rows)} ORDER BY id) TO '{csv}' CSV"
    subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c", sql], check=True)
    names = [c.strip() for c in COLUMNS.split(",")]
    table = pacsv.read_csv(csv, read_options=pacsv.ReadOptions(column_names=names))
    pq.write_table(table, out / "floor.parquet", compression="zstd")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    size = 16 * 1024 * 1024
    client.upload_file(
        str(out / "floor.parquet"),
        BUCKET,
        f"{out.name}/floor.parquet",
        Config=TransferConfig(multipart_threshold=size, multipart_chunksize=size),
    )
    return {"rows": table.num_rows}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def measure(method: str, rows: int, endpoint: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    try:
        cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows), "--out", str(out), "--endpoint", endpoint]
        wall, rss, text = run_measured(cmd)
        return {"wall": wall, "rss": rss, **json.loads(text.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    if args.child:
        rows, out = int(args.rows), Path(args.out)
        result = (
            child_copy_upload(rows, out, args.endpoint)
            if args.child == "copy-upload"
            else child_engine(args.child, rows, out, args.endpoint)
        )
        print(json.dumps(result))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    proc, endpoint = start_moto()
    try:
        for size in [int(r) for r in args.rows.split(",")]:
            ensure_table(size)
            results: dict[str, list[dict]] = {m: [] for m in methods}
            for rep in range(args.repeat):
                for method in methods if rep % 2 == 0 else list(reversed(methods)):
                    r = measure(method, size, endpoint)
                    results[method].append(r)
                    print(f"  rep {rep + 1} {method:14s} {r['wall']:7.2f} s  {r['rss']:5d} MB", flush=True)
            base = statistics.median(r["wall"] for r in results["copy-upload"]) if "copy-upload" in results else None
            print(f"\n{size:,} rows, {args.repeat} repetitions, median [min-max]; S3 = moto_server on 127.0.0.1")
            print(
                f"{'method':14s} {'wall s':>22s} {'rows/s':>24s} {'x baseline':>10s} {'peak RSS MB':>18s} "
                f"{'checkpoint share':>17s}"
            )
            for method in methods:
                walls = [r["wall"] for r in results[method]]
                ratio = f"{statistics.median(walls) / base:.2f}" if base else "-"
                cp = [r["checkpoint_s"] / r["wall"] * 100 for r in results[method] if "checkpoint_s" in r]
                cp_text = summary(cp, "{:.2f}") + " %" if cp else ""
                print(
                    f"{method:14s} {summary(walls):>22s} {summary([size / w for w in walls], '{:,.0f}'):>24s} {ratio:>10s} "
                    f"{summary([float(r['rss']) for r in results[method]], '{:.0f}'):>18s} {cp_text:>17s}"
                )
            print()
    finally:
        proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
