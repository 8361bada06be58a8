"""Benchmark: PostgreSQL table -> PostgreSQL table (destination `mode: replace`), against a `psql` pipe (the floor).

Method. The source table is bench/pg_to_parquet.py's (N rows: bigint id primary key, text with 10
values, bigint, ~80-char text, double, timestamptz increasing with id), created once and read warm.
Both methods copy it into the same server (a shared machine: one PostgreSQL, the readers and the
writers on the same CPUs):

- floor    `psql -c "\\copy (SELECT <columns> FROM <source> ORDER BY id) to stdout" | psql -c "\\copy
           floor from stdin"`: text format, one transaction, into an empty table `conduit_bench_out.floor`
           with the same column types and no primary key or index (conduit's replace-mode table has
           none either: it is created from the source's column types, without constraints). The table
           is dropped and created again before each run, untimed.
- conduit  `python -m conduit_dagster.engine run` of an ingest.yml with a postgresql source (resume:
           true, checkpoint_column: id) and a postgresql destination (schema conduit_bench_out, mode
           replace), at the default batch size unless --batch-size is given: COPY per batch into a
           staging table, each batch one transaction with its record in _conduit_batches, an fsync'd
           JSON checkpoint after each commit, the staging table swapped in at the end. Its previous
           output table is dropped before each run, untimed, so that neither method pays for dropping
           an old table.

Before every timed run the server is asked for a CHECKPOINT (untimed), so that neither method pays
for the other's dirty pages. Each method runs as its own process tree, timed whole (interpreter
start-up and imports included); methods alternate within each repetition (forward, then reversed),
and every figure is the median over the repetitions with [min-max] beside it. Peak RSS comes from
wait4(): the largest single process of the tree (for the floor the larger psql; for conduit the
Python process or its psql child), not their sum. After the last repetition both tables are checked
equal to the source (count, and sums over id, n, hashtext(payload), score and ts), untimed.

    .venv/bin/python bench/pg_to_pg.py --rows 5000000 --repeat 5 | tee bench/pg-to-pg-last-run.txt
    .venv/bin/python bench/pg_to_pg.py --rows 5000000 --repeat 3 --methods floor,conduit,conduit@100000

A method `conduit@N` is conduit with `batch_size: N` (plain `conduit`: --batch-size, else the default).
The method `before` is conduit run from another source tree, given by --before (an older commit's, say), in
the same alternation: a before/after comparison under the same load.

    git archive <commit> conduit_dagster | tar -x -C /tmp/before
    .venv/bin/python bench/pg_to_pg.py --repeat 5 --methods floor,before,conduit --before /tmp/before
"""

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_to_parquet import COLUMNS, DSN, URL, ensure_table, table_name  # noqa: E402 - the sibling script, by path

METHODS = ["floor", "conduit"]
OUT_SCHEMA = "conduit_bench_out"
FLOOR_TABLE = "floor"
CONDUIT_TABLE = "bench"
COLUMN_TYPES = "id bigint, cat text, n bigint, payload text, score double precision, ts timestamptz"
PSQL = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "test"]


def sql(statement: str) -> list:
    import psycopg2

    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def write_ingest(rows: int, out: Path, batch_size: int | None) -> Path:
    path = out / "ingest.yml"
    batch = f"    batch_size: {batch_size}\n" if batch_size else ""
    path.write_text(
        f"""sources:
  - name: pg
    type: postgresql
    url: {URL}
    resume: true
    checkpoint_column: id
destinations:
  - name: out
    type: postgresql
    database: test
    user: postgres
    schema: {OUT_SCHEMA}
    table: {CONDUIT_TABLE}
    mode: replace
resources:
  - name: bench
    source: pg
    destination: out
{batch}    query: SELECT {COLUMNS} FROM public.{table_name(rows)}
"""
    )
    return path


def run_waited(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MB and standard output of one process tree (reaped with wait4(): the rusage covers
    the process and its waited-for children)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss // 1024, out.decode()


def measure(method: str, rows: int, batch_size: int | None, before: str | None = None) -> dict:
    if "@" in method:
        method, size = method.split("@", 1)
        batch_size = int(size)
    env = None
    if method == "before":
        if not before:
            raise SystemExit("the method `before` needs --before DIR (a source tree holding conduit_dagster/)")
        env = dict(os.environ, PYTHONPATH=before)  # found before the installed (editable) conduit_dagster
    sql(f"CREATE SCHEMA IF NOT EXISTS {OUT_SCHEMA}")
    if method == "floor":
        sql(f"DROP TABLE IF EXISTS {OUT_SCHEMA}.{FLOOR_TABLE}")
        sql(f"CREATE TABLE {OUT_SCHEMA}.{FLOOR_TABLE} ({COLUMN_TYPES})")
        sql("CHECKPOINT")
        query = f"SELECT {COLUMNS} FROM public.{table_name(rows)} ORDER BY id"
        reader = " ".join(PSQL) + f" -c '\\copy ({query}) to stdout'"
        writer = " ".join(PSQL) + f" -c '\\copy {OUT_SCHEMA}.{FLOOR_TABLE} from stdin'"
        wall, rss, _ = run_waited(["bash", "-o", "pipefail", "-c", f"{reader} | {writer}"])
        return {"wall": wall, "rss": rss}
    out = Path(tempfile.mkdtemp(prefix="bench-pg-to-pg-"))
    try:
        ingest = write_ingest(rows, out, batch_size)
        sql(f"DROP TABLE IF EXISTS {OUT_SCHEMA}.{CONDUIT_TABLE}")
        sql("CHECKPOINT")
        cmd = [sys.executable, "-m", "conduit_dagster.engine", "run", "--file", str(ingest), "--checkpoint-dir", str(out / "cp")]
        wall, rss, text = run_waited(cmd, env=env, cwd=str(out))  # not from a checkout's folder, which -m would import
        done = [line for line in text.splitlines() if ": done, " in line]
        if not done or f"done, {rows} rows this run" not in done[-1]:
            raise SystemExit(f"conduit did not load {rows} rows:\n{text[-2000:]}")
        batches = sum(1 for line in text.splitlines() if " committed, " in line)
        return {"wall": wall, "rss": rss, "batches": batches}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fingerprint(table: str) -> tuple:
    return tuple(
        sql(
            "SELECT count(*), sum(id), sum(n), sum(hashtext(payload)::bigint), sum(hashtext(cat)::bigint), "
            f"sum(score::numeric), sum(extract(epoch FROM ts)) FROM {table}"
        )[0]
    )


def summary(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=None, help="conduit's batch_size (default: conduit's default)")
    parser.add_argument("--before", help="a source tree holding conduit_dagster/, for the method `before`")
    args = parser.parse_args()

    import psycopg2
    import pyarrow

    from conduit_dagster.engine.spec import DEFAULT_BATCH_SIZE

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    psql_version = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    server = sql("SHOW server_version")[0][0]
    settings = ", ".join(f"{name}={sql(f'SHOW {name}')[0][0]}" for name in ("synchronous_commit", "fsync", "wal_level"))
    print(
        f"{dt.date.today()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, pyarrow {pyarrow.__version__}, "
        f"psycopg2 {psycopg2.__version__.split()[0]}, {psql_version}, server {server} ({settings})"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    here = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"conduit: {here} at {commit.stdout.strip() or '?'}" + (f"; before: {args.before}" if args.before else ""))
    print(f"conduit batch_size: {args.batch_size or f'default ({DEFAULT_BATCH_SIZE})'}")
    print(f"load average at start (a shared machine inflates and scatters every figure): {os.getloadavg()[0]:.2f}")
    ensure_table(args.rows)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeat):
        for method in methods if rep % 2 == 0 else list(reversed(methods)):
            r = measure(method, args.rows, args.batch_size, args.before)
            results[method].append(r)
            extra = f"  {r['batches']} batches" if "batches" in r else ""
            print(f"  rep {rep + 1} {method:16s} {r['wall']:7.2f} s  {r['rss']:5d} MB{extra}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    expected = fingerprint(f"public.{table_name(args.rows)}")
    for method, table in (("floor", FLOOR_TABLE), ("conduit", CONDUIT_TABLE)):
        if any(m.split("@")[0] in ((method, "before") if method == "conduit" else (method,)) for m in results):
            got = fingerprint(f"{OUT_SCHEMA}.{table}")
            verdict = "yes" if got == expected else f"NO {got}"
            print(f"{method} output (last run) equals the source (count and column sums): {verdict}")
    floor = statistics.median(r["wall"] for r in results["floor"]) if "floor" in results else None
    print(f"\n{args.rows:,} rows, {args.repeat} repetitions, whole-process wall time, median [min-max]")
    print(f"{'method':16s} {'wall s':>22s} {'rows/s':>30s} {'x floor':>8s} {'peak RSS MB':>16s}")
    for method in methods:
        walls = [r["wall"] for r in results[method]]
        ratio = f"{statistics.median(walls) / floor:.2f}" if floor else "-"
        print(
            f"{method:16s} {summary(walls):>22s} {summary([args.rows / w for w in walls], '{:,.0f}'):>30s} {ratio:>8s} "
            f"{summary([float(r['rss']) for r in results[method]], '{:.0f}'):>16s}"
        )
    for table in (FLOOR_TABLE, CONDUIT_TABLE):
        sql(f"DROP TABLE IF EXISTS {OUT_SCHEMA}.{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
