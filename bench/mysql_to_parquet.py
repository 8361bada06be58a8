"""Benchmark: MySQL/MariaDB -> local Parquet with conduit, against the `mysql` client's floor and dlt (issue 11, part 2).

The table and two of the methods are bench/mysql_drivers.py's (imported; its MySQLdb connection is replaced by
PyMySQL's, since mysqlclient needs a C build): `test.conduit_bench_N` (bigint id primary key, a VARCHAR with 10 values,
bigint, 80-char VARCHAR, double, DATETIME(6) with repeats), read warm (one untimed floor read first). Each method runs
as its own whole process, alternated within each repetition (the listed order, then the reverse); every figure is the
median over the repetitions with [min-max]; wall time is the whole process (start-up and imports included), peak RSS
from wait4().

- floor: `mysql --batch --quick -e 'SELECT id, cat, n, payload, score, ts FROM ... ORDER BY id' > file` (the
  client's unbuffered tab-separated text: no types, no Parquet);
- dlt-connectorx: dlt 1.31 `sql_table` with its connectorx backend (its fastest MySQL backend in
  bench/mysql-drivers-last-run.txt) into its filesystem destination as Parquet, chunk_size 100,000;
- conduit: `python -m conduit_dagster.engine run` on an ingest.yml: a `type: mysql` source, `resume: true`,
  `checkpoint_column: id`, the same SELECT, a local Parquet destination, the default batch size (10,000 rows: a
  Parquet part and a checkpoint per batch), checkpoints in a fresh directory.

    .venv/bin/python bench/mysql_to_parquet.py --rows 5000000 --repeat 3

Server: CONDUIT_BENCH_MYSQL_HOST/PORT/USER/PASSWORD (127.0.0.1, 3306, root, empty), database `test`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mysql_drivers as md  # noqa: E402 - the sibling benchmark's table and runners

METHODS = ["floor", "dlt-connectorx", "conduit"]


def _pymysql():
    import pymysql

    return pymysql.connect(
        host=md.HOST, port=md.PORT, user=md.USER, password=md.PASSWORD, database=md.DATABASE, charset="utf8mb4"
    )


md.connect_mysqldb = _pymysql  # the table builder, over PyMySQL
_sqlalchemy_url = md.sqlalchemy_url
md.sqlalchemy_url = lambda driver="pymysql": _sqlalchemy_url(driver)  # dlt reflects over PyMySQL, reads with ConnectorX


def ingest_yml(rows: int, out: Path) -> Path:
    password = "    password: ${CONDUIT_BENCH_MYSQL_PASSWORD}\n" if md.PASSWORD else ""
    path = out / "ingest.yml"
    path.write_text(
        "sources:\n"
        f"  - name: bench\n    type: mysql\n    host: {md.HOST}\n    port: {md.PORT}\n    database: {md.DATABASE}\n"
        f"    user: {md.USER}\n{password}    resume: true\n    checkpoint_column: id\n"
        "destinations:\n  - name: lake\n    type: local\n    path: lake\n    format: parquet\n"
        f"resources:\n  - name: bench\n    source: bench\n    destination: lake\n    query: {md.select_sql(rows)}\n",
        encoding="utf-8",
    )
    return path


def measure(method: str, rows: int) -> dict:
    if method == "floor":
        return md.measure("floor", rows)
    out = Path(tempfile.mkdtemp(prefix=f"bench-mysql-parquet-{method}-"))
    try:
        if method == "conduit":
            path = ingest_yml(rows, out)
            cmd = [
                sys.executable,
                "-m",
                "conduit_dagster.engine",
                "run",
                "--file",
                str(path),
                "--checkpoint-dir",
                str(out / "cp"),
            ]
            wall, rss, _ = md.run_measured(cmd, stdout=subprocess.DEVNULL)
            import pyarrow.parquet as pq

            written = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "lake" / "bench").glob("*.parquet"))
            return {"wall": wall, "rss": rss, "rows": written}
        cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows), "--out", str(out)]
        wall, rss, text = md.run_measured(cmd)
        return {"wall": wall, "rss": rss, "rows": json.loads(text.strip().splitlines()[-1])["rows_out"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"rows_out": md.CHILDREN[args.child](args.rows, Path(args.out))}))
        return 0

    from importlib.metadata import version

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    server = subprocess.run(md.mysql_cmd("SELECT VERSION()"), capture_output=True, text=True).stdout.split()[-1]
    versions = ", ".join(f"{n} {version(n)}" for n in ("PyMySQL", "connectorx", "dlt", "pyarrow"))
    print(f"server {server}; Python {sys.version.split()[0]}; {versions}")
    load = os.getloadavg()
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f}\n")
    md.ensure_table(args.rows)
    md.warm(args.rows)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeat):
        for method in methods if rep % 2 == 0 else list(reversed(methods)):
            r = measure(method, args.rows)
            assert r["rows"] == args.rows, f"{method} wrote {r['rows']} rows, not {args.rows}"
            results[method].append(r)
            print(
                f"  rep {rep + 1} {method:15s} {r['wall']:7.2f} s  {r['rss']:5d} MB  (load {os.getloadavg()[0]:.1f})", flush=True
            )
    floor = statistics.median(r["wall"] for r in results["floor"]) if results.get("floor") else None
    print(f"\n{args.rows:,} rows, {args.repeat} repetitions, median [min-max]")
    print(f"{'method':16s} {'wall s':>22s} {'rows/s':>28s} {'x floor':>8s} {'peak RSS MB':>16s}")
    for method in methods:
        walls = [r["wall"] for r in results[method]]
        ratio = f"{statistics.median(walls) / floor:.2f}" if floor else "-"
        print(
            f"{method:16s} {md.summary(walls):>22s} {md.summary([args.rows / w for w in walls], '{:,.0f}'):>28s} "
            f"{ratio:>8s} {md.summary([float(r['rss']) for r in results[method]], '{:.0f}'):>16s}"
        )
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
