"""Benchmark: which Python driver should read MySQL/MariaDB into Parquet (issue 11, section 2).

Method. A table of N rows, `test.conduit_bench_N` (bigint id primary key, VARCHAR with 10 values,
bigint, 80-char VARCHAR, double, DATETIME(6) increasing with id, three rows per second: the
PostgreSQL bench's table, VARCHAR where PostgreSQL has text since a MySQL TEXT column is a BLOB
on disk) is created once with INSERT ... SELECT from MariaDB's `seq_1_to_N` engine and read warm
(one untimed full read before the first repetition). Every method reads
`SELECT id, cat, n, payload, score, ts FROM test.conduit_bench_N ORDER BY id` and runs as its own
whole process; methods alternate within each repetition (the listed order, then the reverse) and
every figure is the median over the repetitions with the range beside it. Wall time is measured
around the whole process (interpreter start-up and imports included); peak RSS comes from wait4()
on that process (the largest of it and its waited-for children, not their sum), which shows
whether the driver streams: a driver that held 5M rows would need well over a gigabyte.

- floor: `mysql --batch --quick -e 'SELECT ...' > file` (the client's unbuffered tab-separated
  text, no types, no Parquet);
- every other method writes one Parquet part per 100,000 rows with pyarrow (default compression),
  to the same Arrow schema (int64, string, int64, string, float64, timestamp[us]);
- pymysql: PyMySQL SSCursor (unbuffered: rows are read from the socket as fetched);
- mysqlclient: MySQLdb SSCursor (mysql_use_result);
- mysqlclient-raw: the same with conv={} (no Python conversion: the text protocol's bytes), each
  column cast by Arrow (string -> int64 / float64 / timestamp[us]) - the cheapest row-driver path;
- connector: mysql-connector-python, C extension, unbuffered cursor;
- mariadb: MariaDB Connector/Python, cursor(buffered=False);
- connectorx: connectorx.read_sql(..., return_type="arrow_stream", batch_size=100000), one query
  (no partitioning), record batches straight from Rust;
- dlt-pyarrow / dlt-connectorx: dlt `sql_table` (SQLAlchemy reflection over mysqlclient,
  chunk_size 100,000) into its filesystem destination as Parquet.

The row drivers turn each fetchmany(100000) into columns (zip(*rows)) and pa.array() per column.
The server is left as configured (here a 128 MB InnoDB buffer pool with O_DIRECT, so every scan
of the ~750 MB table reads its pages again); that cost is the same for every method. The floor is
bound by the mysql client's own text formatting (~5 s of its CPU for 5M rows), so an Arrow-native
reader can beat it.

The second section checks exactness value by value on a small table, `test.conduit_bench_exact`:
DECIMAL(65,30), DECIMAL(38,27), DECIMAL(20,6), BIGINT UNSIGNED above 2^63, DATETIME(6)
microseconds, BIT(64), JSON, BLOB (all 256 byte values), ENUM and SET, each read by each driver
as it returns them (mysqlclient-raw: after its Arrow casts; dlt: as it writes them to Parquet;
connectorx and dlt one column per query, so one failing type does not hide the others); "exact"
means the value read back is equal to the value stored, of the expected Python type once turned
into Python (BIT compared as its 64-bit integer, JSON as its text).

    .venv/bin/python bench/mysql_drivers.py --rows 5000000 --repeat 3
    .venv/bin/python bench/mysql_drivers.py --rows 100000 --repeat 1 --methods floor,mysqlclient

The drivers are not dependencies of conduit-dagster; install them into the venv by hand:
`apt-get install -y libmariadb-dev pkg-config` then `.venv/bin/pip install pymysql mysqlclient
mariadb connectorx 'mysql-connector-python==9.1.0' 'dlt[sql_database,parquet]'` (the 26.x wheels
of mysql-connector-python link their C extension against OpenSSL 3.2, newer than Debian 12's
3.0, and silently fall back to pure Python). Server: CONDUIT_BENCH_MYSQL_HOST/PORT/USER/PASSWORD
(127.0.0.1, 3306, root, empty), database `test`.
"""

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

HOST = os.environ.get("CONDUIT_BENCH_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("CONDUIT_BENCH_MYSQL_PORT", "3306"))
USER = os.environ.get("CONDUIT_BENCH_MYSQL_USER", "root")
PASSWORD = os.environ.get("CONDUIT_BENCH_MYSQL_PASSWORD", "")
DATABASE = "test"
BATCH = 100_000
COLUMNS = "id, cat, n, payload, score, ts"
ALL_METHODS = [
    "floor",
    "pymysql",
    "mysqlclient",
    "mysqlclient-raw",
    "connector",
    "mariadb",
    "connectorx",
    "dlt-pyarrow",
    "dlt-connectorx",
]
EXACT_TABLE = "conduit_bench_exact"


def table_name(rows: int) -> str:
    return f"conduit_bench_{rows}"


def select_sql(rows: int) -> str:
    return f"SELECT {COLUMNS} FROM {DATABASE}.{table_name(rows)} ORDER BY id"


def connect_mysqldb():
    import MySQLdb

    return MySQLdb.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, charset="utf8mb4")


def sqlalchemy_url(driver: str = "mysqldb") -> str:
    auth = USER + (f":{PASSWORD}" if PASSWORD else "")
    return f"mysql+{driver}://{auth}@{HOST}:{PORT}/{DATABASE}"


def connectorx_url() -> str:
    auth = USER + (f":{PASSWORD}" if PASSWORD else "")
    return f"mysql://{auth}@{HOST}:{PORT}/{DATABASE}"


def ensure_table(rows: int) -> None:
    name = table_name(rows)
    conn = connect_mysqldb()
    cur = conn.cursor()
    cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s", (DATABASE, name))
    if not cur.fetchone()[0]:
        print(f"creating {DATABASE}.{name} ({rows:,} rows)...", flush=True)
        t0 = time.monotonic()
        cur.execute(
            f"""
            CREATE TABLE {DATABASE}.{name} (
                id BIGINT NOT NULL PRIMARY KEY,
                cat VARCHAR(16) NOT NULL,
                n BIGINT NOT NULL,
                payload VARCHAR(96) NOT NULL,
                score DOUBLE NOT NULL,
                ts DATETIME(6) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
            """
        )
        cur.execute(
            f"""
            INSERT INTO {DATABASE}.{name} (id, cat, n, payload, score, ts)
            SELECT seq,
                   ELT(1 + seq % 10, 'alpha','beta','gamma','delta','epsilon','zeta','eta','theta','iota','kappa'),
                   seq * 7919 % 1000003,
                   CONCAT(MD5(seq), MD5(seq * 31), LEFT(MD5(seq * 17), 16)),
                   CAST(seq % 100000 AS DOUBLE) / 7.0e0,
                   TIMESTAMP '2025-01-01 00:00:00' + INTERVAL (seq DIV 3) SECOND
            FROM seq_1_to_{rows}
            """
        )
        conn.commit()
        cur.execute(f"ANALYZE TABLE {DATABASE}.{name}")
        cur.fetchall()
        print(f"  created in {time.monotonic() - t0:.1f} s", flush=True)
    conn.close()


def warm(rows: int) -> None:
    """One untimed full read through the floor, so every method reads from the buffer pool / page cache."""
    with open(os.devnull, "wb") as sink:
        subprocess.run(mysql_cmd(select_sql(rows)), stdout=sink, check=True)


def mysql_cmd(sql: str) -> list[str]:
    cmd = ["mysql", "--batch", "--quick", "-h", HOST, "-P", str(PORT), "-u", USER, DATABASE, "-e", sql]
    if PASSWORD:
        cmd.insert(-2, f"-p{PASSWORD}")
    return cmd


# --- the methods, each run in a child process ------------------------------------------


def bench_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.int64()),
            ("cat", pa.string()),
            ("n", pa.int64()),
            ("payload", pa.string()),
            ("score", pa.float64()),
            ("ts", pa.timestamp("us")),
        ]
    )


def write_rows(cursor, out: Path) -> int:
    """fetchmany(BATCH) -> columns -> one Parquet part per batch; the rows read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = bench_schema()
    total = part = 0
    while True:
        rows = cursor.fetchmany(BATCH)
        if not rows:
            break
        columns = list(zip(*rows, strict=True))
        batch = pa.record_batch([pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)], schema=schema)
        pq.write_table(pa.Table.from_batches([batch]), out / f"part-{part:05d}.parquet")
        total += len(rows)
        part += 1
    return total


def child_pymysql(rows: int, out: Path) -> int:
    import pymysql
    import pymysql.cursors

    conn = pymysql.connect(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        database=DATABASE,
        charset="utf8mb4",
        cursorclass=pymysql.cursors.SSCursor,
    )
    with conn.cursor() as cur:
        cur.execute(select_sql(rows))
        n = write_rows(cur, out)
    conn.close()
    return n


def child_mysqlclient(rows: int, out: Path) -> int:
    import MySQLdb.cursors

    conn = connect_mysqldb()
    cur = conn.cursor(MySQLdb.cursors.SSCursor)
    cur.execute(select_sql(rows))
    n = write_rows(cur, out)
    cur.close()
    conn.close()
    return n


def child_mysqlclient_raw(rows: int, out: Path) -> int:
    """mysqlclient with conv={}: every value arrives as the server's text (bytes), cast to the schema by Arrow."""
    import MySQLdb
    import MySQLdb.cursors
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = bench_schema()
    conn = MySQLdb.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, charset="utf8mb4", conv={})
    cur = conn.cursor(MySQLdb.cursors.SSCursor)
    cur.execute(select_sql(rows))
    total = part = 0
    while True:
        fetched = cur.fetchmany(BATCH)
        if not fetched:
            break
        values = zip(*fetched, strict=True)
        columns = [pa.array(col, type=pa.string()).cast(f.type) for col, f in zip(values, schema, strict=True)]
        pq.write_table(pa.Table.from_batches([pa.record_batch(columns, schema=schema)]), out / f"part-{part:05d}.parquet")
        total += len(fetched)
        part += 1
    cur.close()
    conn.close()
    return total


def child_connector(rows: int, out: Path) -> int:
    import mysql.connector

    assert mysql.connector.HAVE_CEXT, "mysql-connector-python C extension not loadable"
    conn = mysql.connector.connect(
        host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, charset="utf8mb4", use_pure=False
    )
    cur = conn.cursor(buffered=False)
    assert type(cur).__name__.startswith("CMySQL"), type(cur)
    cur.execute(select_sql(rows))
    n = write_rows(cur, out)
    cur.close()
    conn.close()
    return n


def child_mariadb(rows: int, out: Path) -> int:
    import mariadb

    conn = mariadb.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE)
    cur = conn.cursor(buffered=False)
    cur.execute(select_sql(rows))
    n = write_rows(cur, out)
    cur.close()
    conn.close()
    return n


def child_connectorx(rows: int, out: Path) -> int:
    import connectorx
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = connectorx.read_sql(connectorx_url(), select_sql(rows), return_type="arrow_stream", batch_size=BATCH)
    total = part = 0
    for batch in reader:
        if batch.num_rows == 0:
            continue
        pq.write_table(pa.Table.from_batches([batch]), out / f"part-{part:05d}.parquet")
        total += batch.num_rows
        part += 1
    return total


def dlt_run(table: str, out: Path, backend: str, columns: list[str] | None = None) -> Path:
    import dlt
    from dlt.sources.sql_database import sql_table

    source = sql_table(
        credentials=sqlalchemy_url(),
        table=table,
        schema=DATABASE,
        backend=backend,
        chunk_size=BATCH,
        included_columns=columns,
    )
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{backend}",
        pipelines_dir=str(out / "dlt_pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=(out / "dlt_out").as_uri()),
        dataset_name="bench",
    )
    pipeline.run(source, loader_file_format="parquet")
    return out / "dlt_out" / "bench" / table


def child_dlt(rows: int, out: Path, backend: str) -> int:
    import pyarrow.parquet as pq

    folder = dlt_run(table_name(rows), out, backend)
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


CHILDREN = {
    "pymysql": child_pymysql,
    "mysqlclient": child_mysqlclient,
    "mysqlclient-raw": child_mysqlclient_raw,
    "connector": child_connector,
    "mariadb": child_mariadb,
    "connectorx": child_connectorx,
    "dlt-pyarrow": lambda rows, out: child_dlt(rows, out, "pyarrow"),
    "dlt-connectorx": lambda rows, out: child_dlt(rows, out, "connectorx"),
}


# --- exactness ---------------------------------------------------------------------------

DEC = "12345678901234567890123456789012345.123456789012345678901234567891"
EXPECTED = {
    "d65": [Decimal(DEC), Decimal("-0.000000000000000000000000000001")],
    "d38": [Decimal("1.123456789012345678901234567"), Decimal("-0.000000000000000000000000001")],
    "d20": [Decimal("12345678901234.567891"), Decimal("-0.000001")],
    "u64": [2**64 - 1, 2**63 + 1],
    "dt6": [dt.datetime(2025, 1, 2, 3, 4, 5, 123457), dt.datetime(9999, 12, 31, 23, 59, 59, 999999)],
    "bit64": [2**63 + 5, 1],
    "js": ['{"a": 1.10, "big": 12345678901234567890, "s": "\\u00e9"}', "[1, 2.50]"],
    "bl": [bytes(range(256)), b"\x00\xff\xfe"],
    "en": ["b", "a"],
    "st": ["x,z", ""],
}


def ensure_exact_table() -> None:
    conn = connect_mysqldb()
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {DATABASE}.{EXACT_TABLE}")
    cur.execute(
        f"""
        CREATE TABLE {DATABASE}.{EXACT_TABLE} (
            id INT PRIMARY KEY, d65 DECIMAL(65,30), d38 DECIMAL(38,27), d20 DECIMAL(20,6), u64 BIGINT UNSIGNED,
            dt6 DATETIME(6), bit64 BIT(64),
            js JSON, bl BLOB, en ENUM('a','b','c'), st SET('x','y','z')
        ) DEFAULT CHARSET=utf8mb4
        """
    )
    for i in range(2):
        cur.execute(
            f"INSERT INTO {DATABASE}.{EXACT_TABLE} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                i + 1,
                str(EXPECTED["d65"][i]),
                str(EXPECTED["d38"][i]),
                str(EXPECTED["d20"][i]),
                EXPECTED["u64"][i],
                EXPECTED["dt6"][i].isoformat(" "),
                EXPECTED["bit64"][i],
                EXPECTED["js"][i],
                EXPECTED["bl"][i],
                EXPECTED["en"][i],
                EXPECTED["st"][i],
            ),
        )
    conn.commit()
    conn.close()


def root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:110]}"


def arrow_column(method: str, column: str, out: Path):
    """One column of the exactness table, ordered by id, as the Arrow-based method returns it."""
    import pyarrow.parquet as pq

    if method == "connectorx":
        import connectorx

        sql = f"SELECT {column} FROM {DATABASE}.{EXACT_TABLE} ORDER BY id"
        return connectorx.read_sql(connectorx_url(), sql, return_type="arrow").column(0)
    folder = dlt_run(EXACT_TABLE, out / column, method.split("-", 1)[1], ["id", column])
    return pq.read_table(next(folder.glob("*.parquet"))).sort_by("id").column(column)


def exact_rows(method: str) -> tuple[list[tuple], list[str]]:
    """The exactness table's rows as the row driver returns them, and a type name per column."""
    sql = f"SELECT {', '.join(EXPECTED)} FROM {DATABASE}.{EXACT_TABLE} ORDER BY id"
    if method == "pymysql":
        import pymysql

        conn = pymysql.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, charset="utf8mb4")
    elif method == "mysqlclient":
        conn = connect_mysqldb()
    elif method == "connector":
        import mysql.connector

        conn = mysql.connector.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, use_pure=False)
    elif method == "mariadb":
        import mariadb

        conn = mariadb.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE)
    else:
        raise ValueError(method)
    cur = conn.cursor()
    cur.execute(sql)
    rows = [tuple(r) for r in cur.fetchall()]
    conn.close()
    return rows, [type(v).__name__ for v in rows[0]]


def same(column: str, got, want) -> bool:
    if column == "bit64" and isinstance(got, (bytes, bytearray)):
        got = int.from_bytes(got, "big")
    if column == "dt6" and isinstance(got, dt.datetime) and got.tzinfo is not None:
        got = got.replace(tzinfo=None)
    if column in ("js", "en", "st") and isinstance(got, (bytes, bytearray)):
        got = bytes(got).decode()
    if column == "bl" and isinstance(got, bytearray):
        got = bytes(got)
    if column == "st" and isinstance(got, set):
        got = ",".join(sorted(got))
    return type(got) is type(want) and got == want


def raw_columns() -> dict:
    """mysqlclient-raw's path: conv={} (bytes as sent), each column cast by Arrow to its type."""
    import MySQLdb
    import pyarrow as pa

    conn = MySQLdb.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DATABASE, charset="utf8mb4", conv={})
    cur = conn.cursor()
    cur.execute(f"SELECT {', '.join(EXPECTED)} FROM {DATABASE}.{EXACT_TABLE} ORDER BY id")
    rows = cur.fetchall()
    conn.close()
    types = {
        "d65": pa.decimal256(65, 30),
        "d38": pa.decimal128(38, 27),
        "d20": pa.decimal128(20, 6),
        "u64": pa.uint64(),
        "dt6": pa.timestamp("us"),
        "bit64": pa.binary(),
        "js": pa.string(),
        "bl": pa.binary(),
        "en": pa.string(),
        "st": pa.string(),
    }
    arrays = {}
    for column, values in zip(EXPECTED, zip(*rows, strict=True), strict=True):
        kind = pa.binary() if types[column] == pa.binary() else pa.string()
        arrays[column] = pa.array(values, type=kind).cast(types[column])
    return arrays


def child_exact(method: str, out: Path) -> dict:
    verdict = {}
    if method == "mysqlclient-raw":
        for column, array in raw_columns().items():
            bad = [repr(v)[:60] for v, w in zip(array.to_pylist(), EXPECTED[column], strict=True) if not same(column, v, w)]
            verdict[column] = {"type": str(array.type), "exact": not bad, "got": bad[:1]}
        return verdict
    if method in ("connectorx", "dlt-pyarrow", "dlt-connectorx"):
        for column in EXPECTED:
            try:
                array = arrow_column(method, column, out)
            except BaseException as exc:  # noqa: BLE001 - an unsupported type is a finding (pyo3 panics are BaseException)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                verdict[column] = {"type": "-", "exact": False, "got": ["ERROR " + root_cause(exc)]}
                continue
            values = array.to_pylist()
            bad = [repr(v)[:60] for v, want in zip(values, EXPECTED[column], strict=True) if not same(column, v, want)]
            verdict[column] = {"type": str(array.type), "exact": not bad, "got": bad[:1]}
        return verdict
    rows, types = exact_rows(method)
    for j, column in enumerate(EXPECTED):
        bad = [repr(r[j])[:60] for i, r in enumerate(rows) if not same(column, r[j], EXPECTED[column][i])]
        verdict[column] = {"type": types[j], "exact": not bad, "got": bad[:1]}
    return verdict


# --- the parent: alternate, repeat, measure ----------------------------------------------


def run_measured(cmd: list[str], stdout=subprocess.PIPE) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MB (wait4), and stdout of one process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    out = proc.stdout.read().decode() if proc.stdout is not None else ""
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({code}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss // 1024, out


def measure(method: str, rows: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-mysql-{method}-"))
    try:
        if method == "floor":
            with open(out / "floor.tsv", "wb") as sink:
                wall, rss, _ = run_measured(mysql_cmd(select_sql(rows)), stdout=sink)
            lines = sum(1 for _ in open(out / "floor.tsv", "rb")) - 1  # minus the header
            return {"wall": wall, "rss": rss, "rows": lines}
        cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows), "--out", str(out)]
        wall, rss, text = run_measured(cmd)
        return {"wall": wall, "rss": rss, **json.loads(text.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summary(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def print_exactness(methods: list[str]) -> None:
    ensure_exact_table()
    print("exactness (test.conduit_bench_exact, 2 rows, value by value): type returned, 'ok' or the first wrong value")
    for method in methods:
        if method == "floor":
            continue
        out = Path(tempfile.mkdtemp(prefix=f"bench-mysql-exact-{method}-"))
        try:
            _, _, text = run_measured([sys.executable, __file__, "--child", "exact-" + method, "--out", str(out)])
            verdict = json.loads(text.strip().splitlines()[-1])
        except RuntimeError as exc:
            verdict = {"error": str(exc).splitlines()[-1][:200]}
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if "error" in verdict:
            print(f"  {method:15s} ERROR {verdict['error']}")
            continue
        cells = []
        for column, v in verdict.items():
            text = "ok" if v["exact"] else ("" if v["got"][0].startswith("ERROR") else "WRONG ") + v["got"][0]
            cells.append(f"{column}={v['type']}:{text}")
        print(f"  {method:15s} " + "  ".join(cells))
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5000000", help="table sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--no-exact", action="store_true", help="skip the exactness section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        out = Path(args.out)
        if args.child.startswith("exact-"):
            print(json.dumps(child_exact(args.child.removeprefix("exact-"), out)))
        else:
            print(json.dumps({"rows_out": CHILDREN[args.child](int(args.rows), out)}))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for name in ["PyMySQL", "mysqlclient", "mysql-connector-python", "mariadb", "connectorx", "dlt", "pyarrow"]:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} not installed")
    server = subprocess.run(mysql_cmd("SELECT VERSION()"), capture_output=True, text=True).stdout.split()[-1]
    print(f"server {server}; Python {sys.version.split()[0]}; " + ", ".join(versions))
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs\n", flush=True)

    for size in [int(r) for r in args.rows.split(",")]:
        ensure_table(size)
        warm(size)
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeat):
            for method in methods if rep % 2 == 0 else list(reversed(methods)):
                try:
                    r = measure(method, size)
                except RuntimeError as exc:
                    print(f"  rep {rep + 1} {method:15s} FAILED {str(exc).splitlines()[-1][:200]}", flush=True)
                    continue
                n = r.get("rows_out", r.get("rows"))
                assert n == size, f"{method} read {n} rows, not {size}"
                results[method].append(r)
                print(f"  rep {rep + 1} {method:15s} {r['wall']:7.2f} s  {r['rss']:5d} MB", flush=True)
        floor = statistics.median(r["wall"] for r in results["floor"]) if results.get("floor") else None
        print(f"\n{size:,} rows, {args.repeat} repetitions, median [min-max]")
        print(f"{'method':16s} {'wall s':>22s} {'rows/s':>28s} {'x floor':>8s} {'peak RSS MB':>16s}")
        for method in methods:
            if not results[method]:
                print(f"{method:16s} {'failed':>22s}")
                continue
            walls = [r["wall"] for r in results[method]]
            ratio = f"{statistics.median(walls) / floor:.2f}" if floor else "-"
            print(
                f"{method:16s} {summary(walls):>22s} {summary([size / w for w in walls], '{:,.0f}'):>28s} {ratio:>8s} "
                f"{summary([float(r['rss']) for r in results[method]], '{:.0f}'):>16s}"
            )
        print(flush=True)
    if not args.no_exact:
        print_exactness(methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
