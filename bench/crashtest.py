"""Crash-anywhere harness: SIGKILL a pipeline at random instants, run it again, count lost and duplicated rows.

Method. A PostgreSQL table of --rows rows (default 200,000) is created with six candidate
checkpoint columns: `id` (unique bigint, multiples of 10), `ts` (timestamptz, 40 rows share each
value), `code` (text, 25 rows share each value), `num` (unconstrained numeric: the first tenth
-Infinity, the last fortieth Infinity, in between values such as 5 and 5.00 that PostgreSQL holds
equal), `ch` (char(12), padded) and `ci` (citext, 'K0001' and 'k0001' equal to PostgreSQL, 50 rows
each). With --late-inserts a thread inserts rows between existing ids while each trial runs, with
the key values of an existing row, each in a transaction held open up to 0.4 s (it commits late,
often behind the reader); such a row may or may not be loaded, but never twice, and is deleted
after the trial. Each trial picks the next (destination, column) pair
in turn, writes an ingest.yml for it, and starts the pipeline as its own process group with
`python -m conduit_dagster.engine run` (the engine alone: the crash semantics are the engine's,
and skipping Dagster's start-up puts more kills inside the loop). After a random delay drawn
uniformly from [0, 1.2 x a clean run's duration] the whole group gets SIGKILL, so kills land in
start-up, reads, part-file writes, COPY into PostgreSQL, checkpoint writes and renames, and the
final publish. The pipeline is then run again, without kills, until it exits 0. Source and
destination are compared as multisets: each row is hashed from a canonical text form, and the
counts of every hash are compared, so a duplicated row is seen even when another is missing.

With --source mysql the table is in MariaDB/MySQL instead (database `conduit_crash_<pid>` on
127.0.0.1:3306, user root; CONDUIT_BENCH_MYSQL_HOST/PORT/USER/PASSWORD change that), with the
candidate checkpoint columns `id` (unique bigint, multiples of 10), `ts` (TIMESTAMP(6), 40 rows
share each value), `code` (varchar, 25 rows share each value), `dt6` (DATETIME(6), 40 rows share
each value, microseconds never zero, in an order unrelated to id's) and `ci` (varchar on the
case- and accent-insensitive, PAD SPACE collation utf8mb4_general_ci, which also holds every
character outside the BMP equal: 'e00000001😀', 'E00000001😁 ', 'é00000001😀  ', 'É00000001😁' ...
are one value to MySQL; 24 variants of a word, about 4 rows each, about 100 rows a word; every row
must still be loaded exactly once), beside a decimal, a text with NULLs,
newlines, trailing spaces and characters outside the BMP, and a varbinary with NULLs and
0x00/0xff bytes. The destinations mysql-replace, mysql-append and mysql-merge (on id) write
to the database `conduit_crash_<pid>_out`, from either source. Both databases (or schemas) are
dropped at the end unless --keep.

The canonical form compares rows exactly across PostgreSQL, MySQL and Parquet: datetimes to the
microsecond (a zone-aware value as its UTC wall time: MySQL has no zone-aware type, a TIMESTAMP
reads back as UTC wall time in conduit's UTC session), decimals normalized (1.50 = 1.5), text
as it is (case and trailing spaces count), bytes as hex, NULL as None.

    .venv/bin/python bench/crashtest.py --trials 50
    .venv/bin/python bench/crashtest.py --trials 6 --destinations parquet --columns ts
    .venv/bin/python bench/crashtest.py --trials 15 --destinations s3   # S3 Parquet + S3 checkpoints (moto_server)
    .venv/bin/python bench/crashtest.py --trials 60 --columns num,ch,ci --late-inserts
    .venv/bin/python bench/crashtest.py --source mysql --trials 60 --columns ci,dt6,id \\
        --destinations parquet,mysql-replace,mysql-append,mysql-merge --late-inserts
    .venv/bin/python bench/crashtest.py --trials 12 --columns id,ci --destinations mysql-append,mysql-merge

--aim-end waits instead until a run's log shows all but its last two batches committed, then kills
it within 0.5 s: most kills land in the last batches, the final publish (staging swap, manifest) and the
checkpoint's removal, which a uniform delay rarely hits.

Partitioned mode (--partitioned). The pipeline gets a ``partitions:`` block: --partition-scheme windows (the
default) cuts it into --partitions (default 4) daily windows of ts from 2025-01-01, and the source's ts values are
spread over those days (still 40 rows a value; the step between values divides a day, so 40 rows sit exactly on each
midnight, the lower bound of one window and the upper bound of another); --partition-scheme ranges cuts it into
--partitions key ranges of id, planned by the first run that needs the plan (the runs start together, so they race
for it). The checkpoint column is still the trial's column. Each trial starts every partition's run AT ONCE, each as
its own process group (``python -m conduit_dagster.engine run --pipeline crash --partition KEY``), picks a random
subset of them (at least one) and gives each its own kill instant: a delay drawn uniformly from [0, 1.2 x the wall
time of a clean run of the whole set at once], or with --aim-end the moment its own log shows all but its last two
batches committed, plus [0, 0.5] s. Runs that finished first, or that were killed after deleting their checkpoint
(they had finished), are not run again; every other partition is re-run, all at once again and without kills, until
each exits 0 (at most three rounds). Then the WHOLE output (every partition's: the Parquet files below
``out/crash/``, the manifests below ``crash/`` in S3, the whole table in PostgreSQL or MySQL) is compared with the
source as multisets, as above, so a row in two partitions, a partition published twice or a partition lost all
show. A partition run that fails without being killed (e.g. refused because another run holds a lock it needs) is
re-run like a killed one, and listed with its error under the summary.

    .venv/bin/python bench/crashtest.py --partitioned --trials 40 --destinations parquet,postgresql-replace,s3
    .venv/bin/python bench/crashtest.py --partitioned --partition-scheme ranges --partitions 6 --late-inserts
    .venv/bin/python bench/crashtest.py --partitioned --source mysql --destinations parquet,mysql-replace --aim-end

It prints a line per trial and a summary, and exits 1 if any row was lost or duplicated.
"""

import argparse
import datetime as dt
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2

DSN = os.environ.get("CONDUIT_BENCH_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
SCHEMA = f"conduit_crash_{os.getpid()}"  # one per run: two harness runs at once do not collide
COLUMNS = "id, ts, code, amount, note, num, ch, ci"
BATCH = 5_000

MYSQL: dict[str, Any] = {
    "host": os.environ.get("CONDUIT_BENCH_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("CONDUIT_BENCH_MYSQL_PORT", "3306")),
    "user": os.environ.get("CONDUIT_BENCH_MYSQL_USER", "root"),
    "password": os.environ.get("CONDUIT_BENCH_MYSQL_PASSWORD", ""),
}
MYSQL_DB = f"conduit_crash_{os.getpid()}"  # the source table's database; the mysql-* destinations write to {MYSQL_DB}_out
MYSQL_COLUMNS = "id, ts, code, amount, note, dt6, ci, raw"


def canonical(value: Any) -> str:
    if isinstance(value, dt.datetime):
        # MySQL has no zone-aware type: an instant is compared as its UTC wall time, to the microsecond
        return (value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value).isoformat(timespec="microseconds")
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    return repr(value)


PLAIN = (str, int, type(None))  # repr is their canonical form: the common case, taken without the checks above


def row_hashes(rows: Iterable[Sequence[Any]], columns: str = COLUMNS) -> Counter[str]:
    num = columns.split(", ").index("num") if "num" in columns.split(", ") else -1

    def value(i: int, v: Any) -> str:
        if type(v) in PLAIN and i != num:
            return repr(v)
        # an unconstrained numeric lands in Parquet (and MySQL) as PostgreSQL's text ('-Infinity', '1.50')
        return canonical(Decimal(v) if i == num and isinstance(v, str) else v)

    sha = hashlib.sha256
    return Counter(sha("\x1f".join([value(i, v) for i, v in enumerate(row)]).encode()).hexdigest() for row in rows)


def mysql_connect(database: str | None, *, autocommit: bool = True) -> Any:
    """A PyMySQL connection to the harness's server, in conduit's session shape (UTC, utf8mb4)."""
    import pymysql

    return pymysql.connect(
        **MYSQL, database=database, charset="utf8mb4", autocommit=autocommit, init_command="SET time_zone = '+00:00'"
    )


class PostgresSource:
    """The source table in PostgreSQL: {SCHEMA}.src."""

    columns = COLUMNS
    where = f"{SCHEMA}.src"

    LATE_SQL = """
INSERT INTO {schema}.src
SELECT %(id)s, s.ts, s.code, s.amount, 'late ' || %(id)s, s.num, s.ch, s.ci FROM {schema}.src AS s WHERE s.id = %(base)s
RETURNING {columns}
"""

    def setup(self, rows: int, ts_step: int = 1) -> Counter[str]:
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS citext")
            cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            cur.execute(f"CREATE SCHEMA {SCHEMA}")
            # ids are multiples of 10, so that --late-inserts can add rows between them
            cur.execute(
                f"""
                CREATE TABLE {SCHEMA}.src AS
                SELECT (g * 10)::bigint AS id,
                       timestamptz '2025-01-01 00:00:00+00' + (g / 40) * interval '{ts_step} second' AS ts,
                       'k' || lpad(((g * 7919) % ({rows} / 25 + 1))::text, 8, '0') AS code,
                       round((g * 1.7)::numeric, 2)::numeric(12, 2) AS amount,
                       CASE WHEN g % 9 = 0 THEN NULL ELSE 'note, "' || g || E'"\\nend' END AS note,
                       CASE WHEN g <= {rows} / 10 THEN '-Infinity'::numeric
                            WHEN g > {rows} - {rows} / 40 THEN 'Infinity'::numeric
                            WHEN g % 2 = 0 THEN (g / 20)::numeric
                            ELSE round((g / 20)::numeric, 2) END AS num,
                       ('c' || lpad(((g * 7919) % ({rows} / 25 + 1))::text, 8, '0'))::char(12) AS ch,
                       (CASE WHEN g % 2 = 0 THEN 'K' ELSE 'k' END || lpad(((g * 7919) % ({rows} / 50 + 1))::text, 8, '0'))::citext
                           AS ci
                FROM generate_series(1, {rows}) AS g
                """
            )
            cur.execute(f"SET TimeZone = 'UTC'; SELECT {COLUMNS} FROM {SCHEMA}.src")
            source = row_hashes(cur.fetchall())
        conn.close()
        return source

    def yml(self, column: str) -> str:
        return f"""  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {SCHEMA}
    resume: true
    checkpoint_column: {column}
"""

    def late_connect(self) -> Any:
        return psycopg2.connect(DSN)

    def late_insert(self, conn: Any, new_id: int, base: int) -> tuple[Any, ...]:
        """Insert a copy of row ``base`` as ``new_id`` in an open transaction; the row as stored."""
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute(self.LATE_SQL.format(schema=SCHEMA, columns=COLUMNS), {"id": new_id, "base": base})
            return cur.fetchone()

    def delete_late(self) -> None:
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        conn.cursor().execute(f"DELETE FROM {SCHEMA}.src WHERE id % 10 <> 0")  # the next trial starts from the same rows
        conn.close()

    def drop(self) -> None:
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        conn.cursor().execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.close()


class MySQLSource:
    """The source table in MariaDB/MySQL: {MYSQL_DB}.src (InnoDB, primary key id)."""

    columns = MYSQL_COLUMNS
    where = f"{MYSQL_DB}.src"

    def setup(self, rows: int, ts_step: int = 1) -> Counter[str]:
        conn = mysql_connect(None)
        # ci: about 100 rows a word, in 24 variants (case and accent, two characters outside the BMP, trailing spaces)
        words = rows // 100 + 1
        digits = len(str(rows))
        g = " + ".join(f"d{i}.d * {10**i}" for i in range(digits)) + " + 1"
        product = " CROSS JOIN ".join(f"digits AS d{i}" for i in range(digits))
        dt6_group = f"((g * 104729) % ({rows} DIV 40 + 1))"  # about 40 rows a value, not in id order
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{MYSQL_DB}`")
            cur.execute(f"CREATE DATABASE `{MYSQL_DB}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
            cur.execute(f"USE `{MYSQL_DB}`")
            cur.execute("CREATE TABLE digits (d INT NOT NULL)")
            cur.execute("INSERT INTO digits VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9)")
            cur.execute(
                """
                CREATE TABLE src (
                    id BIGINT NOT NULL PRIMARY KEY,
                    ts TIMESTAMP(6) NULL,
                    code VARCHAR(16) NOT NULL,
                    amount DECIMAL(12, 2) NOT NULL,
                    note TEXT NULL,
                    dt6 DATETIME(6) NOT NULL,
                    ci VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL,
                    raw VARBINARY(16) NULL
                ) ENGINE = InnoDB
                """
            )
            # ids are multiples of 10, so that --late-inserts can add rows between them
            cur.execute(
                f"""
                INSERT INTO src
                SELECT g * 10,
                       TIMESTAMP('2025-01-01 00:00:00') + INTERVAL (g DIV 40) * {ts_step} SECOND,
                       CONCAT('k', LPAD((g * 7919) % ({rows} DIV 25 + 1), 8, '0')),
                       ROUND(g * 1.7, 2),
                       IF(g % 9 = 0, NULL, CONCAT('note, "', g, '"', CHAR(10), 'end', IF(g % 3 = 0, ' é😀 ', ''))),
                       TIMESTAMP('2025-01-01 00:00:00') + INTERVAL {dt6_group} SECOND
                           + INTERVAL (1 + {dt6_group} * 7919 % 999999) MICROSECOND,
                       CONCAT(ELT((g DIV {words}) % 4 + 1, 'e', 'E', 'é', 'É'), LPAD((g * 7919) % {words}, 8, '0'),
                              ELT((g DIV {words}) DIV 4 % 2 + 1, '😀', '😁'), ELT((g DIV {words}) DIV 8 % 3 + 1, '', ' ', '  ')),
                       IF(g % 7 = 0, NULL, CONCAT(X'00FF', UNHEX(LPAD(HEX(g), 8, '0'))))
                FROM (SELECT {g} AS g FROM {product}) AS s
                WHERE g <= {rows}
                """
            )
            cur.execute("DROP TABLE digits")
            cur.execute(f"SELECT {MYSQL_COLUMNS} FROM src")
            source = row_hashes(cur.fetchall(), MYSQL_COLUMNS)
        conn.close()
        return source

    def yml(self, column: str) -> str:
        return f"""  - name: my
    type: mysql
{mysql_keys(MYSQL_DB)}    resume: true
    checkpoint_column: {column}
"""

    def late_connect(self) -> Any:
        return mysql_connect(MYSQL_DB, autocommit=False)

    def late_insert(self, conn: Any, new_id: int, base: int) -> tuple[Any, ...]:
        names = MYSQL_COLUMNS.split(", ")
        with conn.cursor() as cur:
            cur.execute(f"SELECT {MYSQL_COLUMNS} FROM src WHERE id = %s", (base,))
            row = dict(zip(names, cur.fetchone(), strict=True))
            row.update(id=new_id, note=f"late {new_id}")
            cur.execute(f"INSERT INTO src ({MYSQL_COLUMNS}) VALUES ({', '.join(['%s'] * len(names))})", [row[n] for n in names])
            cur.execute(f"SELECT {MYSQL_COLUMNS} FROM src WHERE id = %s", (new_id,))  # as MySQL holds it
            return cur.fetchone()

    def delete_late(self) -> None:
        conn = mysql_connect(MYSQL_DB)
        conn.cursor().execute("DELETE FROM src WHERE id % 10 <> 0")  # the next trial starts from the same rows
        conn.close()

    def drop(self) -> None:
        conn = mysql_connect(None)
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{MYSQL_DB}`")
        conn.close()


def mysql_keys(database: str) -> str:
    """The connection keys of a `type: mysql` entry (the password, if any, through the environment)."""
    keys = f"    host: {MYSQL['host']}\n    port: {MYSQL['port']}\n    database: {database}\n    user: {MYSQL['user']}\n"
    return keys + ("    password: ${CONDUIT_BENCH_MYSQL_PASSWORD}\n" if MYSQL["password"] else "")


SOURCES: dict[str, PostgresSource | MySQLSource] = {"postgresql": PostgresSource(), "mysql": MySQLSource()}
DEFAULT_DESTINATIONS = {
    "postgresql": "parquet,postgresql-replace,postgresql-append,postgresql-merge,s3",
    "mysql": "parquet,mysql-replace,mysql-append,mysql-merge,s3",
}


class LateInserts:
    """Rows inserted while a trial runs, each in a transaction held open for a while (it commits late), with keys
    between existing ones: equal to rows already read, inside a batch being replayed, or ahead of the reader."""

    def __init__(self, source: PostgresSource | MySQLSource, rows: int, rng: random.Random) -> None:
        self.source, self.rows, self.rng = source, rows, random.Random(rng.random())
        self.hashes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = self.source.late_connect()
        used: set[int] = set()
        try:
            while not self.stop.is_set():
                base = self.rng.randrange(1, self.rows) * 10
                new_id = base + self.rng.randrange(1, 10)
                if new_id in used:
                    continue
                used.add(new_id)
                row = self.source.late_insert(conn, new_id, base)
                self.stop.wait(self.rng.uniform(0.0, 0.4))  # still uncommitted: the reader cannot see it yet
                conn.commit()
                self.hashes += row_hashes([row], self.source.columns)
        finally:
            conn.close()

    def finish(self) -> Counter[str]:
        self.stop.set()
        self.thread.join()
        self.source.delete_late()
        return self.hashes


S3: dict[str, str] = {}  # the endpoint of the moto_server this harness starts when an s3 destination is asked for
BUCKET = "conduit-crash"


def start_s3() -> subprocess.Popen:
    """moto's S3 server as its own process on 127.0.0.1 (it survives the kills, as a real S3 would)."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    S3["endpoint"] = f"http://127.0.0.1:{port}"
    for name, value in (("AWS_ACCESS_KEY_ID", "crash"), ("AWS_SECRET_ACCESS_KEY", "crash"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=S3["endpoint"]).create_bucket(Bucket=BUCKET)
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def s3_client():  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.client("s3", endpoint_url=S3["endpoint"])


def out_table(work: Path) -> str:
    return f"t_{work.name.replace('-', '_')}"


def ingest_yml(work: Path, destination: str, column: str, source: PostgresSource | MySQLSource, partitions: str = "") -> Path:
    """The trial's ingest.yml; ``partitions`` is the resource's ``partitions:`` block (partitioned mode)."""
    head = ""
    if destination == "parquet":
        dest = f"  - name: out\n    type: local\n    path: {work / 'out'}\n"
    elif destination == "s3":  # S3 Parquet, with the checkpoints in S3 too
        dest = f"  - name: out\n    type: s3\n    bucket: {BUCKET}\n    prefix: {work.name}\n    endpoint_url: {S3['endpoint']}\n"
        head = (
            f"checkpoints:\n  type: s3\n  bucket: {BUCKET}\n  prefix: {work.name}/checkpoints\n  endpoint_url: {S3['endpoint']}\n"
        )
    elif destination.startswith("mysql-"):  # mysql-replace, mysql-append, mysql-merge
        mode = destination.split("-", 1)[1]
        dest = (
            f"  - name: out\n    type: mysql\n{mysql_keys(MYSQL_DB + '_out')}    table: {out_table(work)}\n    mode: {mode}\n"
            + ("    primary_key: [id]\n" if mode == "merge" else "")
        )
    else:  # postgresql-replace, postgresql-append, postgresql-merge
        mode = destination.split("-", 1)[1]
        dest = (
            "  - name: out\n    type: postgresql\n    database: test\n    user: postgres\n"
            f"    schema: {SCHEMA}_out\n    table: {out_table(work)}\n    mode: {mode}\n"
            + ("    primary_key: [id]\n" if mode == "merge" else "")
        )
    path = work / "ingest.yml"
    path.write_text(
        f"""{head}sources:
{source.yml(column)}destinations:
{dest}resources:
  - name: crash
    source: {"pg" if isinstance(source, PostgresSource) else "my"}
    destination: out
    batch_size: {BATCH}
    query: SELECT {source.columns} FROM src
{partitions}"""
    )
    return path


def destination_rows(work: Path, destination: str, columns: str) -> Counter[str]:
    names = columns.split(", ")
    if destination == "parquet":
        import pyarrow.dataset as ds

        out = work / "out" / "crash"
        if not out.exists():
            return Counter()
        table = ds.dataset(out, format="parquet").to_table(columns=names)
        return row_hashes((tuple(r.values()) for r in table.to_pylist()), columns)
    if destination == "s3":
        import io
        import json

        import pyarrow.parquet as pq

        client = s3_client()
        # the visible output: the parts its manifest lists (one manifest for the pipeline, or one per partition in
        # <prefix>/crash/<key>/); parts of runs in progress or left by killed runs are listed by none
        manifests = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{work.name}/crash/")
            for obj in page.get("Contents", [])
            if obj["Key"].endswith("/_conduit_manifest.json")
        ]
        rows: list[tuple[Any, ...]] = []
        for manifest in manifests:
            folder = manifest.rsplit("/", 1)[0]
            for part in json.loads(client.get_object(Bucket=BUCKET, Key=manifest)["Body"].read())["parts"]:
                data = client.get_object(Bucket=BUCKET, Key=f"{folder}/{part}")["Body"].read()
                rows.extend(tuple(r.values()) for r in pq.read_table(io.BytesIO(data), columns=names).to_pylist())
        return row_hashes(rows, columns)
    if destination.startswith("mysql-"):
        conn = mysql_connect(MYSQL_DB + "_out")
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT {columns} FROM `{out_table(work)}`")
                return row_hashes(cur.fetchall(), columns)
        finally:
            conn.close()
    conn = psycopg2.connect(DSN)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute(f"SELECT {columns} FROM {SCHEMA}_out.{out_table(work)}")
            return row_hashes(cur.fetchall(), columns)
    finally:
        conn.close()


RUN_LINE = re.compile(r"^crash\S*: ")  # a line of the engine CLI about the pipeline (or one partition of it: crash[.key])


def kill_phase(log: str) -> str:
    """Where the killed run was, from its own output: start-up, the batch loop (after which batch), or the end."""
    lines = [line for line in log.splitlines() if RUN_LINE.match(line)]
    if any(" done, " in line for line in lines):
        return "end (after the last batch: publishing, cleaning up, exiting)"
    committed = [line for line in lines if " committed, " in line]
    if not committed:
        return "start-up (connecting, first batch, no batch committed yet)"
    return f"loop (last committed: {RUN_LINE.sub('', committed[-1]).split(' committed')[0]})"


def aim_at_end(proc: subprocess.Popen, log: Path, rows: int, rng: random.Random, offset: int = 0) -> float:
    """Wait until the run's log shows all but the last two batches' rows committed (or the run is done), then a
    random [0, 0.5] s more: the kill lands in the last batches, the final publish (staging swap, manifest), the
    checkpoint's removal or the exit. The time since the start."""
    t0 = time.monotonic()
    while proc.poll() is None:
        text = log.read_text()[offset:]
        totals = [int(m) for m in re.findall(r"^crash\S*: batch \d+ committed, \d+ rows, (\d+) in total", text, re.M)]
        if (totals and totals[-1] >= rows - 2 * BATCH) or re.search(r"^crash\S*: done, ", text, re.M):
            time.sleep(rng.uniform(0.0, 0.5))
            break
        time.sleep(0.005)
    return time.monotonic() - t0


def start(ingest: Path, log: Path, partition: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conduit_dagster.engine", "run", "--file", str(ingest)]
    if partition is not None:
        cmd += ["--pipeline", "crash", "--partition", partition]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), default="postgresql", help="where the source table is")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument(
        "--destinations",
        default=None,
        help=f"default {DEFAULT_DESTINATIONS['postgresql']} (with --source mysql: {DEFAULT_DESTINATIONS['mysql']})",
    )
    parser.add_argument("--columns", default="id,ts,code")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--aim-end",
        action="store_true",
        help="kill in a run's last moments: once its log shows the last two batches' rows committed, after [0, 0.5] s more",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folders and the source and destination tables")
    parser.add_argument(
        "--late-inserts",
        action="store_true",
        help="insert rows between existing keys while each trial runs, in transactions that commit late",
    )
    parser.add_argument(
        "--partitioned",
        action="store_true",
        help="a partitioned pipeline: each trial runs its partitions at once and kills a random subset of them",
    )
    parser.add_argument(
        "--partition-scheme",
        choices=("windows", "ranges"),
        default="windows",
        help="windows: one partition a day of ts; ranges: key ranges of id planned by the first run (default windows)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the pipeline (default 4)")
    args = parser.parse_args()
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    source = SOURCES[args.source]
    destinations = (args.destinations or DEFAULT_DESTINATIONS[args.source]).split(",")
    known = {"parquet", "s3"} | {f"{db}-{mode}" for db in ("postgresql", "mysql") for mode in ("replace", "append", "merge")}
    if unknown := [d for d in destinations if d not in known]:
        parser.error(f"unknown destination(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}; creating {source.where} with {args.rows:,} rows", flush=True)
    uses_mysql_out = any(d.startswith("mysql-") for d in destinations)
    uses_pg_out = any(d.startswith("postgresql-") for d in destinations)
    moto = None
    root = Path(tempfile.mkdtemp(prefix="conduit-crash-"))
    try:
        # partitioned by day of ts: its values spread over the --partitions days (still 40 rows a value)
        source_rows = source.setup(args.rows, ts_step(args.rows, args.partitions) if args.partitioned else 1)
        if uses_mysql_out:
            conn = mysql_connect(None)
            conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{MYSQL_DB}_out` CHARACTER SET utf8mb4")
            conn.close()
        moto = start_s3() if "s3" in destinations else None
        if args.partitioned:
            return partitioned_trials(args, source, source_rows, destinations, rng, root)
        return trials(args, source, source_rows, destinations, rng, root)
    finally:
        if not args.keep:
            source.drop()
            if uses_pg_out:
                conn = psycopg2.connect(DSN)
                conn.autocommit = True
                conn.cursor().execute(f"DROP SCHEMA IF EXISTS {SCHEMA}_out CASCADE")
                conn.close()
            if uses_mysql_out:
                conn = mysql_connect(None)
                conn.cursor().execute(f"DROP DATABASE IF EXISTS `{MYSQL_DB}_out`")
                conn.close()
            shutil.rmtree(root, ignore_errors=True)
        if moto is not None:
            moto.kill()


def trials(
    args: argparse.Namespace,
    source: PostgresSource | MySQLSource,
    source_rows: Counter[str],
    destinations: list[str],
    rng: random.Random,
    root: Path,
) -> int:
    total = sum(source_rows.values())
    pairs = [(d, c) for d in destinations for c in args.columns.split(",")]
    clean_runtime: dict[tuple[str, str], float] = {}
    kills = lost_total = dup_total = 0
    phases: dict[str, int] = {}
    failed_trials = []
    for trial in range(1, args.trials + 1):
        destination, column = pairs[(trial - 1) % len(pairs)]
        work = root / f"trial-{trial}"
        work.mkdir()
        ingest = ingest_yml(work, destination, column, source)
        log = work / "run.log"
        if not args.aim_end and (destination, column) not in clean_runtime:  # calibrate once per pair on a throwaway folder
            probe = root / f"probe-{destination}-{column}"
            probe.mkdir()
            t0 = time.monotonic()
            if start(ingest_yml(probe, destination, column, source), probe / "run.log").wait() != 0:
                print((probe / "run.log").read_text()[-3000:])
                return 2
            clean_runtime[(destination, column)] = time.monotonic() - t0
        delay = 0.0 if args.aim_end else rng.uniform(0, 1.2 * clean_runtime[(destination, column)])
        late = LateInserts(source, args.rows, rng) if args.late_inserts else None
        proc = start(ingest, log)
        if args.aim_end:
            delay = aim_at_end(proc, log, total, rng)
        else:
            time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        killed_output = log.read_text()
        phase = kill_phase(killed_output) if killed else "finished first"
        phases[phase.split(" ")[0]] = phases.get(phase.split(" ")[0], 0) + 1
        # A run that got as far as deleting its checkpoint had finished: running it "again" would be a new run
        # (in append mode, a second copy of every row, by design). Otherwise it is resumed until it succeeds.
        if destination == "s3":
            listed = s3_client().list_objects_v2(Bucket=BUCKET, Prefix=f"{work.name}/checkpoints/crash.json")
            checkpoint_gone = not listed.get("KeyCount")
        else:
            checkpoint_gone = not (work / ".checkpoints" / "crash.json").exists()
        finished = proc.returncode == 0 or (checkpoint_gone and " committed, " in killed_output)
        reruns = 0
        while not finished:
            reruns += 1
            if start(ingest, log).wait() == 0:
                finished = True
                break
            if reruns >= 3:
                print(f"trial {trial}: the rerun keeps failing:\n{log.read_text()[-3000:]}")
                if late:
                    late.finish()
                return 2
        got = destination_rows(work, destination, source.columns)
        late_rows: Counter[str] = late.finish() if late else Counter()
        lost = sum((source_rows - got).values())
        # a row inserted during the run may or may not be loaded (keyset reading never looks behind itself), never twice
        dup = sum((got - (source_rows + late_rows)).values())
        late_loaded = sum((got & late_rows).values())
        lost_total += lost
        dup_total += dup
        if lost or dup:
            failed_trials.append(trial)
        state = f"SIGKILL at {delay:.3f} s, {phase}" if killed else f"no kill: done before {delay:.3f} s"
        print(
            f"trial {trial:3d} {destination:18s} {column:4s} {state:46s} reruns {reruns}  rows {sum(got.values()):,}  "
            f"lost {lost}  duplicated {dup}" + (f"  late rows {sum(late_rows.values())} (loaded {late_loaded})" if late else ""),
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwhere the kills landed: {', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}")
    print(
        f"summary: {args.trials} trials, {kills} kills, {total:,} source rows, rows lost {lost_total}, "
        f"rows duplicated {dup_total}" + (f", failing trials {failed_trials}" if failed_trials else "")
    )
    return 1 if lost_total or dup_total else 0


# --- partitioned mode ----------------------------------------------------------------------------------------------

DAY = 86_400
FIRST_DAY = dt.date(2025, 1, 1)  # the source's first ts


def ts_step(rows: int, days: int) -> int:
    """Seconds between neighbouring ts values (40 rows each) so that all rows fall in the first ``days`` days: the
    largest divisor of a day that fits, so rows land exactly on every midnight (a window's lower bound, inclusive)."""
    fit = max(1, (days * DAY * 40 - 1) // rows)
    return max(d for d in range(1, min(fit, DAY) + 1) if DAY % d == 0)


def partition_keys(scheme: str, n: int) -> list[str]:
    """The partition keys conduit gives the pipeline: Dagster's daily keys, or r00 .. r<n-1> for key ranges."""
    if scheme == "windows":
        return [(FIRST_DAY + dt.timedelta(days=i)).isoformat() for i in range(n)]
    width = max(2, len(str(n - 1)))
    return [f"r{i:0{width}d}" for i in range(n)]


def partitions_yml(scheme: str, n: int) -> str:
    if scheme == "windows":
        end = FIRST_DAY + dt.timedelta(days=n)
        return f'    partitions:\n      column: ts\n      every: day\n      start: "{FIRST_DAY}"\n      end: "{end}"\n'
    return f"    partitions:\n      column: id\n      ranges: {n}\n"


def checkpoint_exists(work: Path, destination: str, unit: str) -> bool:
    if destination == "s3":
        return bool(s3_client().list_objects_v2(Bucket=BUCKET, Prefix=f"{work.name}/checkpoints/{unit}.json").get("KeyCount"))
    return (work / ".checkpoints" / f"{unit}.json").exists()


def start_set(ingest: Path, work: Path, keys: list[str]) -> dict[str, tuple[subprocess.Popen, int]]:
    """Every partition's run at once, each its own process group; per key (process, where its log's text starts)."""
    procs = {}
    for key in keys:
        log = work / f"run-{key}.log"
        offset = len(log.read_text()) if log.exists() else 0
        procs[key] = (start(ingest, log, key), offset)
    return procs


def kill_one(
    run: tuple[subprocess.Popen, int],
    log: Path,
    when: tuple[float, random.Random],
    aim_rows: int | None,
    t0: float,
    killed_at: dict[str, float],
    key: str,
) -> None:
    """SIGKILL one partition's run (its whole process group) at its instant: ``when``'s delay after ``t0``, or with
    ``aim_rows`` (--aim-end) once its log shows all but its last two batches of ``aim_rows`` rows committed."""
    proc, offset = run
    delay, rng = when
    if aim_rows is not None:
        aim_at_end(proc, log, aim_rows, rng, offset)
    else:
        time.sleep(max(0.0, delay - (time.monotonic() - t0)))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at[key] = time.monotonic() - t0


def first_error(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith(("error: ", "Traceback"))]
    return (errors[-1] if errors else text.strip().splitlines()[-1] if text.strip() else "no output")[:300]


def partitioned_trials(
    args: argparse.Namespace,
    source: PostgresSource | MySQLSource,
    source_rows: Counter[str],
    destinations: list[str],
    rng: random.Random,
    root: Path,
) -> int:
    """Each trial starts every partition's run at once, SIGKILLs a random subset of them at random instants, re-runs
    the unfinished partitions (at once again, without kills) until each exits 0, and compares the whole output."""
    total = sum(source_rows.values())
    keys = partition_keys(args.partition_scheme, args.partitions)
    block = partitions_yml(args.partition_scheme, args.partitions)
    what = f"{len(keys)} daily windows of ts" if args.partition_scheme == "windows" else f"{len(keys)} key ranges of id"
    print(f"partitioned: {what} ({', '.join(keys)}), all started at once in each trial", flush=True)
    pairs = [(d, c) for d in destinations for c in args.columns.split(",")]
    clean: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}  # the set's wall time, rows per partition
    kills = runs = lost_total = dup_total = 0
    phases: dict[str, int] = {}
    failed_trials: list[int] = []
    unkilled_failures: list[str] = []
    for trial in range(1, args.trials + 1):
        destination, column = pairs[(trial - 1) % len(pairs)]
        if (destination, column) not in clean:  # calibrate once per pair: every partition at once, no kills
            probe = root / f"probe-{destination}-{column}"
            probe.mkdir()
            ingest = ingest_yml(probe, destination, column, source, block)
            t0 = time.monotonic()
            procs = start_set(ingest, probe, keys)
            codes = {key: proc.wait() for key, (proc, _) in procs.items()}
            wall = time.monotonic() - t0
            if any(codes.values()):
                bad = [key for key, code in codes.items() if code]
                print(f"the clean run of partitions {bad} failed:\n{(probe / f'run-{bad[0]}.log').read_text()[-3000:]}")
                return 2
            sizes = {}
            for key in keys:
                done = re.findall(r"^crash\S*: done, (\d+) rows this run", (probe / f"run-{key}.log").read_text(), re.M)
                sizes[key] = int(done[-1]) if done else 0
            clean[(destination, column)] = (wall, sizes)
            print(
                f"clean run {destination} {column}: {wall:.2f} s for the set; rows a partition "
                + ", ".join(f"{k} {v:,}" for k, v in sizes.items()),
                flush=True,
            )
        wall, sizes = clean[(destination, column)]
        work = root / f"trial-{trial}"
        work.mkdir()
        ingest = ingest_yml(work, destination, column, source, block)
        # a random subset of the partitions (at least one) is killed, each at its own instant
        victims = rng.sample(keys, rng.randint(1, len(keys)))
        plan = {key: (rng.uniform(0, 1.2 * wall), random.Random(rng.random())) for key in victims}
        late = LateInserts(source, args.rows, rng) if args.late_inserts else None
        procs = start_set(ingest, work, keys)
        t0 = time.monotonic()
        killed_at: dict[str, float] = {}
        threads = [
            threading.Thread(
                target=kill_one,
                args=(procs[key], work / f"run-{key}.log", plan[key], sizes[key] if args.aim_end else None, t0, killed_at, key),
            )
            for key in victims
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = {key: proc.wait() for key, (proc, _) in procs.items()}
        runs += len(keys)
        finished: dict[str, bool] = {}
        notes = []
        for key in keys:
            text = (work / f"run-{key}.log").read_text()[procs[key][1] :]
            if key in killed_at:
                kills += 1
                phase = kill_phase(text)
                phases[phase.split(" ")[0]] = phases.get(phase.split(" ")[0], 0) + 1
                notes.append(f"{key}@{killed_at[key]:.2f}s {phase.split(' ')[0]}")
            elif codes[key] != 0:
                unkilled_failures.append(f"trial {trial} {key}: exit {codes[key]}: {first_error(text)}")
            # A partition whose run got as far as deleting its checkpoint had finished: running it "again" would be a
            # new run (in append mode, a second copy of its rows, by design). Otherwise it is resumed until it succeeds.
            gone = not checkpoint_exists(work, destination, f"crash.{key}")
            finished[key] = codes[key] == 0 or (key in killed_at and gone and " committed, " in text)
        rounds = 0
        while not all(finished.values()):
            rounds += 1
            if rounds > 3:
                bad = [key for key, ok in finished.items() if not ok]
                print(f"trial {trial}: the reruns of {bad} keep failing:\n{(work / f'run-{bad[0]}.log').read_text()[-3000:]}")
                if late:
                    late.finish()
                return 2
            again = start_set(ingest, work, [key for key, ok in finished.items() if not ok])
            for key, (proc, _) in again.items():
                finished[key] = proc.wait() == 0
                runs += 1
        got = destination_rows(work, destination, source.columns)
        late_rows: Counter[str] = late.finish() if late else Counter()
        lost = sum((source_rows - got).values())
        dup = sum((got - (source_rows + late_rows)).values())  # a late row may or may not be loaded, never twice
        late_loaded = sum((got & late_rows).values())
        lost_total += lost
        dup_total += dup
        if lost or dup:
            failed_trials.append(trial)
        state = f"killed {len(killed_at)}/{len(keys)}: " + (", ".join(notes) if notes else "all done first")
        print(
            f"trial {trial:3d} {destination:18s} {column:4s} {state:60s} rerun rounds {rounds}  rows {sum(got.values()):,}  "
            f"lost {lost}  duplicated {dup}" + (f"  late rows {sum(late_rows.values())} (loaded {late_loaded})" if late else ""),
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwhere the kills landed: {', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}")
    if unkilled_failures:
        print(f"partition runs that failed without a kill ({len(unkilled_failures)}), then resumed:")
        for line in unkilled_failures:
            print(f"  {line}")
    print(
        f"summary: {args.trials} trials, {kills} kills, {total:,} source rows, rows lost {lost_total}, "
        f"rows duplicated {dup_total}, {runs} partition runs ({what}), {len(unkilled_failures)} failed without a kill"
        + (f", failing trials {failed_trials}" if failed_trials else "")
    )
    return 1 if lost_total or dup_total else 0


if __name__ == "__main__":
    sys.exit(main())
