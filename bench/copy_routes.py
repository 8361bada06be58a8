"""Benchmark: the routes a PostgreSQL COPY stream can take into Arrow, against `psql \\copy` (the floor).

Question: can an in-process route replace the `psql` child the PostgreSQL source runs, without
losing speed? Each route reads `COPY (SELECT <6 columns> FROM conduit_bench_<N> ORDER BY id) TO
STDOUT (FORMAT csv)` into pyarrow.csv.open_csv (the source's options: 4 MiB blocks, column types
given, PostgreSQL's NULL/quoting rules) and writes one Parquet file per ~100,000 rows:

- psql      the `psql` child (conduit's PsqlCopy: its environment, the session SETs on stdin), read
            from its stdout; no Python code per row.
- thread    psycopg2 `copy_expert` in a thread into an OS pipe (conduit's ThreadCopy): psycopg2
            calls the pipe's write() once per row.
- psycopg3  psycopg 3 `cursor.copy()` in a thread, its chunks (one per row: libpq hands COPY data
            over a row at a time) written to a 1 MiB-buffered OS pipe.

Method. The table (bigint id primary key, text with 10 values, bigint, ~80-char text, double,
timestamptz; bench/pg_to_parquet.py's) is created once and read warm. Every route, and the floor
(`psql -c "\\copy (same query) TO file CSV"`), runs as its own process and is timed whole
(interpreter start-up and imports included), in the same run; the order alternates (forward,
then reversed) between repetitions, and each figure is the median of the repetitions with
[min-max] beside it. The machine is shared, so compare ratios within one run only.

    .venv/bin/pip install "psycopg[binary]"   # for the psycopg3 route only
    .venv/bin/python bench/copy_routes.py --rows 5000000 --repeat 3 | tee bench/copy-routes-last-run.txt
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_to_parquet import COLUMNS, ensure_table, table_name  # noqa: E402 - the sibling script, by path

ROUTES = ["floor", "psql", "thread", "psycopg3"]
PART_ROWS = 100_000
BLOCK = 4 << 20  # the source's CSV block for a large fetch size


def copy_sql(rows: int) -> str:
    return f"COPY (SELECT {COLUMNS} FROM public.{table_name(rows)} ORDER BY id) TO STDOUT (FORMAT csv)"


def spec_for_bench() -> Any:
    from conduit_dagster.engine.spec import PostgresSourceSpec

    return PostgresSourceSpec(name="bench", host="127.0.0.1", port=5432, database="test", user="postgres")


def to_parquet(stream: Any, out: Path) -> int:
    """Parse the CSV stream with Arrow and write a Parquet file per ~PART_ROWS rows; the rows read."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    names = ["id", "cat", "n", "payload", "score", "ts"]
    types = {
        "id": pa.int64(),
        "cat": pa.string(),
        "n": pa.int64(),
        "payload": pa.string(),
        "score": pa.float64(),
        "ts": pa.timestamp("us", tz="UTC"),
    }
    reader = pacsv.open_csv(
        pa.PythonFile(stream, mode="r"),
        read_options=pacsv.ReadOptions(column_names=names, block_size=BLOCK),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )
    total, part, pending, pending_rows = 0, 0, [], 0
    for batch in reader:
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= PART_ROWS:
            pq.write_table(pa.Table.from_batches(pending), out / f"part-{part:05d}.parquet")
            part, total, pending, pending_rows = part + 1, total + pending_rows, [], 0
    if pending:
        pq.write_table(pa.Table.from_batches(pending), out / f"part-{part:05d}.parquet")
        total += pending_rows
    return total


def child(route: str, rows: int, out: Path) -> dict:
    from conduit_dagster.engine.pg import connect, connect_params, redact
    from conduit_dagster.engine.sources.pgcopy import PsqlCopy, ThreadCopy, psql_environment, psql_path

    spec = spec_for_bench()
    sql = copy_sql(rows).encode()
    if route == "psql":
        psql, env = psql_path(), psql_environment(spec)
        assert psql and env is not None
        producer: Any = PsqlCopy(psql, env, sql, lambda text: redact(text, spec))
    elif route == "thread":
        producer = ThreadCopy(connect(spec, "source"), sql)
    elif route == "psycopg3":
        import psycopg

        params = {k: v for k, v in connect_params(spec).items() if v != ""}
        conn = psycopg.connect(**params)
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def pump() -> None:
            try:
                with os.fdopen(write_fd, "wb", buffering=1 << 20) as sink, conn.cursor() as cur, cur.copy(sql) as copy:
                    for data in copy:
                        sink.write(data)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the reading thread
                failure.append(exc)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        stream = os.fdopen(read_fd, "rb", buffering=0)
        n = to_parquet(stream, out)
        thread.join()
        if failure:
            raise failure[0]
        return {"rows": n}
    else:
        raise SystemExit(f"unknown route {route}")
    n = to_parquet(producer.stream, out)
    producer.finish()
    producer.close()
    return {"rows": n}


def run_timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and standard output of one process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return wall, out.decode()


def measure(route: str, rows: int) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"bench-copy-{route}-"))
    try:
        if route == "floor":
            query = f"SELECT {COLUMNS} FROM public.{table_name(rows)} ORDER BY id"
            cmd = [
                "psql",
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-c",
                f"\\copy ({query}) TO '{out / 'f.csv'}' CSV",
            ]
            wall, _ = run_timed(cmd)
            return wall
        wall, text = run_timed([sys.executable, __file__, "--child", route, "--rows", str(rows), "--out", str(out)])
        got = json.loads(text.strip().splitlines()[-1])["rows"]
        if got != rows:
            raise SystemExit(f"{route} read {got} rows, not {rows}")
        return wall
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, Path(args.out))))
        return 0

    import psycopg2.extensions
    import pyarrow

    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    versions = f"pyarrow {pyarrow.__version__}, psycopg2 {psycopg2.__version__.split()[0]}"
    try:
        import psycopg

        versions += f", psycopg {psycopg.__version__} ({psycopg.pq.__impl__})"
    except ImportError:
        routes = [r for r in routes if r != "psycopg3"]
    psql_version = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{dt.date.today()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {versions}, {psql_version}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"load average at start (a shared machine inflates and scatters every figure): {os.getloadavg()[0]:.2f}")
    ensure_table(args.rows)
    walls: dict[str, list[float]] = {r: [] for r in routes}
    for rep in range(args.repeat):
        for route in routes if rep % 2 == 0 else list(reversed(routes)):
            wall = measure(route, args.rows)
            walls[route].append(wall)
            print(f"  rep {rep + 1} {route:9s} {wall:7.2f} s", flush=True)
    floor = statistics.median(walls["floor"]) if "floor" in walls else None
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.rows:,} rows, {args.repeat} repetitions, whole-process wall time, median [min-max]")
    print(f"{'route':10s} {'wall s':>20s} {'rows/s':>12s} {'x floor':>8s}")
    for route in routes:
        med = statistics.median(walls[route])
        ratio = f"{med / floor:.2f}" if floor else "-"
        spread = f"{med:.2f} [{min(walls[route]):.2f}-{max(walls[route]):.2f}]"
        print(f"{route:10s} {spread:>20s} {args.rows / med:>12,.0f} {ratio:>8s}")
    if "psql" in walls:
        psql_med = statistics.median(walls["psql"])
        for route in ("thread", "psycopg3"):
            if route in walls:
                print(f"{route} / psql: {statistics.median(walls[route]) / psql_med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
