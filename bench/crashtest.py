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

    .venv/bin/python bench/crashtest.py --trials 50
    .venv/bin/python bench/crashtest.py --trials 6 --destinations parquet --columns ts
    .venv/bin/python bench/crashtest.py --trials 15 --destinations s3   # S3 Parquet + S3 checkpoints (moto_server)
    .venv/bin/python bench/crashtest.py --trials 60 --columns num,ch,ci --late-inserts

It prints a line per trial and a summary, and exits 1 if any row was lost or duplicated.
"""

import argparse
import datetime as dt
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2

DSN = os.environ.get("CONDUIT_BENCH_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
SCHEMA = f"conduit_crash_{os.getpid()}"  # one per run: two harness runs at once do not collide
COLUMNS = "id, ts, code, amount, note, num, ch, ci"
BATCH = 5_000


def canonical(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, memoryview):
        return bytes(value).hex()
    return repr(value)


NUM = COLUMNS.split(", ").index("num")


def row_hashes(rows: Any) -> Counter[str]:
    def values(row: tuple[Any, ...]) -> Any:
        for i, v in enumerate(row):
            # an unconstrained numeric lands in Parquet as PostgreSQL's text ('-Infinity', '1.50')
            yield canonical(Decimal(v) if i == NUM and isinstance(v, str) else v)

    return Counter(hashlib.sha256("\x1f".join(values(tuple(row))).encode()).hexdigest() for row in rows)


LATE_SQL = """
INSERT INTO {schema}.src
SELECT %(id)s, s.ts, s.code, s.amount, 'late ' || %(id)s, s.num, s.ch, s.ci FROM {schema}.src AS s WHERE s.id = %(base)s
RETURNING {columns}
"""


class LateInserts:
    """Rows inserted while a trial runs, each in a transaction held open for a while (it commits late), with keys
    between existing ones: equal to rows already read, inside a batch being replayed, or ahead of the reader."""

    def __init__(self, rows: int, rng: random.Random) -> None:
        self.rows, self.rng = rows, random.Random(rng.random())
        self.hashes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = psycopg2.connect(DSN)
        used: set[int] = set()
        try:
            while not self.stop.is_set():
                base = self.rng.randrange(1, self.rows) * 10
                new_id = base + self.rng.randrange(1, 10)
                if new_id in used:
                    continue
                used.add(new_id)
                with conn.cursor() as cur:
                    cur.execute("SET TimeZone = 'UTC'")
                    cur.execute(LATE_SQL.format(schema=SCHEMA, columns=COLUMNS), {"id": new_id, "base": base})
                    row = cur.fetchone()
                    self.stop.wait(self.rng.uniform(0.0, 0.4))  # still uncommitted: the reader cannot see it yet
                conn.commit()
                self.hashes += row_hashes([row])
        finally:
            conn.close()

    def finish(self) -> Counter[str]:
        self.stop.set()
        self.thread.join()
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        conn.cursor().execute(f"DELETE FROM {SCHEMA}.src WHERE id % 10 <> 0")  # the next trial starts from the same rows
        conn.close()
        return self.hashes


def setup(rows: int) -> Counter[str]:
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
                   timestamptz '2025-01-01 00:00:00+00' + (g / 40) * interval '1 second' AS ts,
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


def ingest_yml(work: Path, destination: str, column: str) -> Path:
    head = ""
    if destination == "parquet":
        dest = f"  - name: out\n    type: local\n    path: {work / 'out'}\n"
    elif destination == "s3":  # S3 Parquet, with the checkpoints in S3 too
        dest = f"  - name: out\n    type: s3\n    bucket: {BUCKET}\n    prefix: {work.name}\n    endpoint_url: {S3['endpoint']}\n"
        head = (
            f"checkpoints:\n  type: s3\n  bucket: {BUCKET}\n  prefix: {work.name}/checkpoints\n  endpoint_url: {S3['endpoint']}\n"
        )
    else:  # postgresql-replace, postgresql-append, postgresql-merge
        table = f"t_{work.name.replace('-', '_')}"
        mode = destination.split("-", 1)[1]
        dest = (
            "  - name: out\n    type: postgresql\n    database: test\n    user: postgres\n"
            f"    schema: {SCHEMA}_out\n    table: {table}\n    mode: {mode}\n"
            + ("    primary_key: [id]\n" if mode == "merge" else "")
        )
    path = work / "ingest.yml"
    path.write_text(
        f"""{head}sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {SCHEMA}
    resume: true
    checkpoint_column: {column}
destinations:
{dest}resources:
  - name: crash
    source: pg
    destination: out
    batch_size: {BATCH}
    query: SELECT {COLUMNS} FROM src
"""
    )
    return path


def destination_rows(work: Path, destination: str) -> Counter[str]:
    if destination == "parquet":
        import pyarrow.dataset as ds

        out = work / "out" / "crash"
        if not out.exists():
            return Counter()
        table = ds.dataset(out, format="parquet").to_table(columns=COLUMNS.split(", "))
        return row_hashes(tuple(r.values()) for r in table.to_pylist())
    if destination == "s3":
        import io
        import json

        import pyarrow.parquet as pq

        client = s3_client()
        try:
            body = client.get_object(Bucket=BUCKET, Key=f"{work.name}/crash/_conduit_manifest.json")["Body"].read()
        except client.exceptions.NoSuchKey:
            return Counter()
        rows: list[tuple[Any, ...]] = []
        for part in json.loads(body)["parts"]:
            data = client.get_object(Bucket=BUCKET, Key=f"{work.name}/crash/{part}")["Body"].read()
            rows.extend(tuple(r.values()) for r in pq.read_table(io.BytesIO(data), columns=COLUMNS.split(", ")).to_pylist())
        return row_hashes(rows)
    conn = psycopg2.connect(DSN)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute(f"SELECT {COLUMNS} FROM {SCHEMA}_out.t_{work.name.replace('-', '_')}")
            return row_hashes(cur.fetchall())
    finally:
        conn.close()


def kill_phase(log: str) -> str:
    """Where the killed run was, from its own output: start-up, the batch loop (after which batch), or the end."""
    lines = [line for line in log.splitlines() if line.startswith("crash: ")]
    if any(" done, " in line for line in lines):
        return "end (after the last batch: publishing, cleaning up, exiting)"
    committed = [line for line in lines if " committed, " in line]
    if not committed:
        return "start-up (connecting, first batch, no batch committed yet)"
    return f"loop (last committed: {committed[-1].removeprefix('crash: ').split(' committed')[0]})"


def start(ingest: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conduit_dagster.engine", "run", "--file", str(ingest)]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--destinations", default="parquet,postgresql-replace,postgresql-append,postgresql-merge,s3")
    parser.add_argument("--columns", default="id,ts,code")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument(
        "--late-inserts",
        action="store_true",
        help="insert rows between existing keys while each trial runs, in transactions that commit late",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}; creating {SCHEMA}.src with {args.rows:,} rows", flush=True)
    source = setup(args.rows)
    total = sum(source.values())
    pairs = [(d, c) for d in args.destinations.split(",") for c in args.columns.split(",")]
    moto = start_s3() if "s3" in args.destinations.split(",") else None
    root = Path(tempfile.mkdtemp(prefix="conduit-crash-"))
    clean_runtime: dict[tuple[str, str], float] = {}
    kills = lost_total = dup_total = 0
    phases: dict[str, int] = {}
    failed_trials = []
    for trial in range(1, args.trials + 1):
        destination, column = pairs[(trial - 1) % len(pairs)]
        work = root / f"trial-{trial}"
        work.mkdir()
        ingest = ingest_yml(work, destination, column)
        log = work / "run.log"
        if (destination, column) not in clean_runtime:  # calibrate once per pair on a throwaway folder
            probe = root / f"probe-{destination}-{column}"
            probe.mkdir()
            t0 = time.monotonic()
            if start(ingest_yml(probe, destination, column), probe / "run.log").wait() != 0:
                print((probe / "run.log").read_text()[-3000:])
                return 2
            clean_runtime[(destination, column)] = time.monotonic() - t0
        delay = rng.uniform(0, 1.2 * clean_runtime[(destination, column)])
        late = LateInserts(args.rows, rng) if args.late_inserts else None
        proc = start(ingest, log)
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
                return 2
        got = destination_rows(work, destination)
        late_rows: Counter[str] = late.finish() if late else Counter()
        lost = sum((source - got).values())
        # a row inserted during the run may or may not be loaded (keyset reading never looks behind itself), never twice
        dup = sum((got - (source + late_rows)).values())
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
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    conn.cursor().execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; DROP SCHEMA IF EXISTS {SCHEMA}_out CASCADE")
    conn.close()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if moto is not None:
        moto.kill()
    return 1 if lost_total or dup_total else 0


if __name__ == "__main__":
    sys.exit(main())
