"""Benchmark: MySQL/MariaDB table -> MySQL/MariaDB table (destination `type: mysql`, `mode: replace`), against a
`mysql | mysql` pipe (the floor). Issue 11, part 5.

Method. The source table is bench/mysql_drivers.py's `test.conduit_bench_N` (N rows: BIGINT id primary key,
VARCHAR(16) with 10 values, BIGINT, VARCHAR(96) of ~80 characters, DOUBLE, DATETIME(6) increasing with id, three rows
a second), created once (INSERT ... SELECT from MariaDB's seq engine) and read warm. With --source postgresql the
source is bench/pg_to_parquet.py's table of the same shape in PostgreSQL (text, timestamptz) instead. Both methods
copy it into database `conduit_bench_out` of the same MariaDB server (a shared machine: one server, the readers and
the writers on the same CPUs):

- floor    `mysql --batch --quick -N -e 'SELECT <columns> FROM <source> ORDER BY id' | mysql --local-infile=1 -e
           "LOAD DATA LOCAL INFILE '/dev/stdin' INTO TABLE floor CHARACTER SET utf8mb4"`: the client's tab-separated
           text, one statement (one transaction, autocommit), into an empty InnoDB table `floor` with the source's
           column types and no key or index (conduit's replace-mode table has none either: it is created from the
           source's column types, without keys). With --source postgresql the reader is `psql -c "\\copy (SELECT ...
           ts AT TIME ZONE 'UTC' ...) to stdout"` (PostgreSQL's text format is LOAD DATA's default format) and the
           table's text columns are LONGTEXT. The table is dropped and created again before each run, untimed.
- conduit  `python -m conduit_dagster.engine run` of an ingest.yml with a `type: mysql` (or postgresql) source
           (resume: true, checkpoint_column: id) and a `type: mysql` destination (mode replace): per batch one
           transaction holding the batch's row in _conduit_batches and a LOAD DATA LOCAL INFILE streamed through a
           pipe into a staging table; an fsync'd JSON checkpoint after each commit; one RENAME TABLE at the end. Its
           previous output table is dropped before each run, untimed, so that neither method pays for dropping one.

Before every timed run the script waits (untimed, up to 120 s) until InnoDB has flushed its dirty pages, so that
neither method pays for the other's writes. Each method runs as its own process tree, timed whole (interpreter
start-up and imports included); methods alternate within each repetition (forward, then reversed), and every figure
is the median over the repetitions with [min-max] beside it. Peak RSS comes from wait4(): the largest single process
of the tree (for the floor the larger mysql client; for conduit the Python process), not their sum; CPU is the
client processes' user+system seconds (the server's own work is not in it). After the last repetition both tables
are checked equal to the source (count, and sums over id, n, CRC32 of cat and payload, score and ts), untimed.

    .venv/bin/python bench/mysql_to_mysql.py --rows 5000000 --repeat 3 --batch-size 100000 | tee bench/mysql-to-mysql-last-run.txt
    .venv/bin/python bench/mysql_to_mysql.py --rows 1000000 --repeat 1 --source postgresql

Server: CONDUIT_BENCH_MYSQL_HOST/PORT/USER/PASSWORD (127.0.0.1, 3306, root, empty).
"""

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = os.environ.get("CONDUIT_BENCH_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("CONDUIT_BENCH_MYSQL_PORT", "3306"))
USER = os.environ.get("CONDUIT_BENCH_MYSQL_USER", "root")
PASSWORD = os.environ.get("CONDUIT_BENCH_MYSQL_PASSWORD", "")
SOURCE_DB = "test"
OUT_DB = "conduit_bench_out"
FLOOR_TABLE = "floor"
CONDUIT_TABLE = "bench"
COLUMNS = "id, cat, n, payload, score, ts"
METHODS = ["floor", "conduit"]
FLOOR_TYPES = {
    "mysql": "id BIGINT NOT NULL, cat VARCHAR(16) NOT NULL, n BIGINT NOT NULL, payload VARCHAR(96) NOT NULL, "
    "score DOUBLE NOT NULL, ts DATETIME(6) NOT NULL",
    "postgresql": "id BIGINT, cat LONGTEXT, n BIGINT, payload LONGTEXT, score DOUBLE, ts DATETIME(6)",
}
PG_DSN = os.environ.get("CONDUIT_BENCH_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
PG_URL = os.environ.get("CONDUIT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def table_name(rows: int) -> str:
    return f"conduit_bench_{rows}"


def connect(database: str | None = None):  # noqa: ANN201 - a pymysql connection
    import pymysql

    return pymysql.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=database, autocommit=True)


def sql(statement: str, database: str | None = None) -> list:
    conn = connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def mysql_client(*args: str) -> str:
    """A shell command line running the mysql client with ``args``."""
    return shlex.join(["mysql", "-h", HOST, "-P", str(PORT), "-u", USER, *([f"-p{PASSWORD}"] if PASSWORD else []), *args])


def ensure_mysql_table(rows: int) -> None:
    """bench/mysql_drivers.py's table, made the same way."""
    name = table_name(rows)
    if sql(f"SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{SOURCE_DB}' AND TABLE_NAME = '{name}'")[0][0]:
        return
    print(f"creating {SOURCE_DB}.{name} ({rows:,} rows)...", flush=True)
    sql(
        f"CREATE TABLE {SOURCE_DB}.{name} (id BIGINT NOT NULL PRIMARY KEY, cat VARCHAR(16) NOT NULL, n BIGINT NOT NULL, "
        "payload VARCHAR(96) NOT NULL, score DOUBLE NOT NULL, ts DATETIME(6) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    )
    sql(
        f"INSERT INTO {SOURCE_DB}.{name} (id, cat, n, payload, score, ts) SELECT seq, "
        "ELT(1 + seq % 10, 'alpha','beta','gamma','delta','epsilon','zeta','eta','theta','iota','kappa'), "
        "seq * 7919 % 1000003, CONCAT(MD5(seq), MD5(seq * 31), LEFT(MD5(seq * 17), 16)), "
        "CAST(seq % 100000 AS DOUBLE) / 7.0e0, TIMESTAMP '2025-01-01 00:00:00' + INTERVAL (seq DIV 3) SECOND "
        f"FROM seq_1_to_{rows}",
        SOURCE_DB,
    )


def write_ingest(source: str, rows: int, out: Path, batch_size: int | None) -> Path:
    path = out / "ingest.yml"
    batch = f"    batch_size: {batch_size}\n" if batch_size else ""
    password = f"    password: {PASSWORD}\n" if PASSWORD else ""
    if source == "mysql":
        source_entry = (
            f"  - name: src\n    type: mysql\n    host: {HOST}\n    port: {PORT}\n    database: {SOURCE_DB}\n"
            f"    user: {USER}\n{password}    resume: true\n    checkpoint_column: id\n"
        )
        query = f"SELECT {COLUMNS} FROM {SOURCE_DB}.{table_name(rows)}"
    else:
        source_entry = f"  - name: src\n    type: postgresql\n    url: {PG_URL}\n    resume: true\n    checkpoint_column: id\n"
        query = f"SELECT {COLUMNS} FROM public.{table_name(rows)}"
    path.write_text(
        f"""sources:
{source_entry}destinations:
  - name: out
    type: mysql
    host: {HOST}
    port: {PORT}
    database: {OUT_DB}
    user: {USER}
{password}    table: {CONDUIT_TABLE}
    mode: replace
resources:
  - name: bench
    source: src
    destination: out
{batch}    query: {query}
"""
    )
    return path


def server_cpu() -> float | None:
    """User+system CPU seconds the server process (mariadbd / mysqld on this machine) has used so far, if visible."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except (OSError, IndexError):
            continue
        if name in ("mariadbd", "mysqld"):
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def run_waited(cmd: list[str]) -> tuple[float, int, float, str]:
    """Wall seconds, peak RSS MB of the largest process, client CPU seconds, stdout; reaped with wait4()."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[:4]} failed ({code}):\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss // 1024, usage.ru_utime + usage.ru_stime, out.decode()


def settle(limit_s: float = 120.0) -> None:
    """Wait until InnoDB has written its dirty pages (untimed)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ((_, dirty),) = sql("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
        if int(dirty) < 200:
            return
        time.sleep(1)


def measure(method: str, source: str, rows: int, batch_size: int | None) -> dict:
    sql(f"CREATE DATABASE IF NOT EXISTS {OUT_DB}")
    if method == "floor":
        sql(f"DROP TABLE IF EXISTS {OUT_DB}.{FLOOR_TABLE}")
        sql(f"CREATE TABLE {OUT_DB}.{FLOOR_TABLE} ({FLOOR_TYPES[source]}) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")
        settle()
        if source == "mysql":
            select = f"SELECT {COLUMNS} FROM {SOURCE_DB}.{table_name(rows)} ORDER BY id"
            reader = mysql_client("--batch", "--quick", "-N", "-e", select)
        else:
            select = f"SELECT id, cat, n, payload, score, ts AT TIME ZONE 'UTC' FROM public.{table_name(rows)} ORDER BY id"
            psql = ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "test"]
            reader = shlex.join([*psql, "-c", f"\\copy ({select}) to stdout"])
        load = f"LOAD DATA LOCAL INFILE '/dev/stdin' INTO TABLE {FLOOR_TABLE} CHARACTER SET utf8mb4"
        writer = mysql_client("--local-infile=1", OUT_DB, "-e", load)
        before = server_cpu()
        wall, rss, cpu, _ = run_waited(["bash", "-o", "pipefail", "-c", f"{reader} | {writer}"])
        after = server_cpu()
        return {"wall": wall, "rss": rss, "cpu": cpu, "server": after - before if after and before else None}
    out = Path(tempfile.mkdtemp(prefix="bench-mysql-to-mysql-"))
    try:
        ingest = write_ingest(source, rows, out, batch_size)
        sql(f"DROP TABLE IF EXISTS {OUT_DB}.{CONDUIT_TABLE}")
        settle()
        cmd = [sys.executable, "-m", "conduit_dagster.engine", "run", "--file", str(ingest), "--checkpoint-dir", str(out / "cp")]
        before = server_cpu()
        wall, rss, cpu, text = run_waited(cmd)
        after = server_cpu()
        done = [line for line in text.splitlines() if ": done, " in line]
        if not done or f"done, {rows} rows this run" not in done[-1]:
            raise SystemExit(f"conduit did not load {rows} rows:\n{text[-2000:]}")
        batches = sum(1 for line in text.splitlines() if " committed, " in line)
        return {"wall": wall, "rss": rss, "cpu": cpu, "server": after - before if after and before else None, "batches": batches}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fingerprint(table: str) -> tuple:
    (row,) = sql(
        "SELECT COUNT(*), SUM(id), SUM(n), SUM(CRC32(cat)), SUM(CRC32(payload)), SUM(score), "
        f"SUM(TIMESTAMPDIFF(MICROSECOND, '2000-01-01', ts)) FROM {table}"
    )
    return tuple(None if v is None else round(float(v), 1) for v in row)


def pg_fingerprint(rows: int) -> tuple:
    import psycopg2

    conn = psycopg2.connect(PG_DSN)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), sum(id), sum(n), NULL, NULL, sum(score), "
            "sum((extract(epoch FROM ts - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint) "
            f"FROM public.{table_name(rows)}"
        )
        row = cur.fetchone()
    conn.close()
    return tuple(None if v is None else round(float(v), 1) for v in row)


def summary(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--source", choices=("mysql", "postgresql"), default="mysql")
    parser.add_argument("--batch-size", type=int, default=None, help="conduit's batch_size (default: conduit's default)")
    args = parser.parse_args()

    import pyarrow
    import pymysql

    from conduit_dagster.engine.spec import DEFAULT_BATCH_SIZE

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    client = subprocess.run(["mysql", "--version"], capture_output=True, text=True).stdout.strip()
    variables = ("innodb_buffer_pool_size", "innodb_flush_log_at_trx_commit", "innodb_log_file_size", "innodb_flush_method")
    settings = dict(sql("SHOW GLOBAL VARIABLES WHERE Variable_name IN (" + ", ".join(f"'{v}'" for v in variables) + ")"))
    print(
        f"{dt.date.today()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, pyarrow {pyarrow.__version__}, "
        f"PyMySQL {pymysql.__version__}, {client}, server {sql('SELECT VERSION()')[0][0]} "
        f"({', '.join(f'{k}={settings.get(k)}' for k in variables)})"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"source: {args.source}; conduit batch_size: {args.batch_size or f'default ({DEFAULT_BATCH_SIZE})'}")
    print(f"load average at start (a shared machine inflates and scatters every figure): {os.getloadavg()[0]:.2f}")
    if args.source == "mysql":
        ensure_mysql_table(args.rows)
        warm = mysql_client("--batch", "--quick", "-N", "-e", f"SELECT * FROM {SOURCE_DB}.{table_name(args.rows)}")
        with open(os.devnull, "wb") as sink:  # one untimed full read
            subprocess.run(
                ["bash", "-c", warm],
                stdout=sink,
                check=True,
            )
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pg_to_parquet import ensure_table  # the sibling script, by path

        ensure_table(args.rows)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeat):
        for method in methods if rep % 2 == 0 else list(reversed(methods)):
            r = measure(method, args.source, args.rows, args.batch_size)
            results[method].append(r)
            extra = f"  {r['batches']} batches" if "batches" in r else ""
            print(
                f"  rep {rep + 1} {method:8s} {r['wall']:7.2f} s  {r['rss']:5d} MB  cpu {r['cpu']:6.2f} s  "
                f"server cpu {r['server'] or 0:6.2f} s  "
                f"load {os.getloadavg()[0]:.2f}{extra}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.source == "mysql":
        expected = fingerprint(f"{SOURCE_DB}.{table_name(args.rows)}")
    else:
        expected = pg_fingerprint(args.rows)
    for method, table in (("floor", FLOOR_TABLE), ("conduit", CONDUIT_TABLE)):
        if method in results:
            got = fingerprint(f"{OUT_DB}.{table}")
            if args.source == "postgresql":
                got = tuple(None if i in (3, 4) else v for i, v in enumerate(got))
            verdict = "yes" if got == expected else f"NO {got} {expected}"
            print(f"{method} output equals the source (count and column sums): {verdict}")
    floor = statistics.median(r["wall"] for r in results["floor"]) if "floor" in results else None
    print(f"\n{args.rows:,} rows, {args.repeat} repetitions, whole-process wall time, median [min-max]")
    print(
        f"{'method':8s} {'wall s':>22s} {'rows/s':>30s} {'x floor':>8s} {'peak RSS MB':>16s} {'client CPU s':>22s} "
        f"{'server CPU s':>22s}"
    )
    for method in methods:
        walls = [r["wall"] for r in results[method]]
        ratio = f"{statistics.median(walls) / floor:.2f}" if floor else "-"
        print(
            f"{method:8s} {summary(walls):>22s} {summary([args.rows / w for w in walls], '{:,.0f}'):>30s} {ratio:>8s} "
            f"{summary([float(r['rss']) for r in results[method]], '{:.0f}'):>16s} "
            f"{summary([r['cpu'] for r in results[method]]):>22s} {summary([r['server'] or 0 for r in results[method]]):>22s}"
        )
    for table in (FLOOR_TABLE, CONDUIT_TABLE):
        sql(f"DROP TABLE IF EXISTS {OUT_DB}.{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
