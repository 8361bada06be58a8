"""Benchmark: PostgreSQL table -> local Parquet, against `psql \\copy` (the floor) and dlt.

Method. A table of N rows (bigint id primary key, text with 10 values, bigint, ~80-char text,
double, timestamptz increasing with id, three rows per second) is created once per size and
read warm. Each method runs as its own process, methods alternate within each repetition
(floor, engine, engine-pg, dagster, dagster-startup, dlt-pyarrow, dlt-connectorx, then the
reverse), and every figure is the median over the repetitions with the range beside it. Wall
time is measured around the whole process (start-up included); peak RSS comes from wait4() on
that process: the largest of the process and its waited-for children (for our engine, the psql
child holds ~12 MB), not their sum. Every pipeline writes one Parquet part per 100,000 rows;
ours also saves an fsync'd JSON checkpoint after each part, and reports the time those saves
took. engine-pg is the engine loading the same rows into a PostgreSQL table (replace mode: COPY
per batch into a staging table, swapped in at the end) on the same server.

    .venv/bin/python bench/pg_to_parquet.py --rows 5000000 --repeat 3
    .venv/bin/python bench/pg_to_parquet.py --rows 1000000,5000000 --methods floor,engine

dlt is a bench-only extra: `.venv/bin/pip install -e '.[bench]'`.
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

DSN = os.environ.get("CONDUIT_BENCH_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
URL = os.environ.get("CONDUIT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BATCH = 100_000
ALL_METHODS = ["floor", "engine", "engine-pg", "dagster", "dagster-startup", "dlt-pyarrow", "dlt-connectorx"]
COLUMNS = "id, cat, n, payload, score, ts"


def table_name(rows: int) -> str:
    return f"conduit_bench_{rows}"


def ensure_table(rows: int) -> None:
    import psycopg2

    name = table_name(rows)
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{name}",))
        if not cur.fetchone()[0]:
            print(f"creating public.{name} ({rows:,} rows)...", flush=True)
            cur.execute(
                f"""
                CREATE TABLE public.{name} AS
                SELECT g::bigint AS id,
                       (ARRAY['alpha','beta','gamma','delta','epsilon','zeta','eta','theta','iota','kappa'])[1 + g % 10] AS cat,
                       (g::bigint * 7919 % 1000003) AS n,
                       md5(g::text) || md5((g * 31)::text) || left(md5((g * 17)::text), 16) AS payload,
                       (g % 100000) / 7.0::double precision AS score,
                       timestamptz '2025-01-01 00:00:00+00' + (g / 3) * interval '1 second' AS ts
                FROM generate_series(1, {rows}) AS g
                """
            )
            cur.execute(f"ALTER TABLE public.{name} ADD PRIMARY KEY (id)")
            cur.execute(f"VACUUM ANALYZE public.{name}")
        cur.execute(f"SELECT count(*) FROM public.{name}")  # warm the cache
    conn.close()


# --- the methods, each run in a child process ------------------------------------------


def child_engine(rows: int, out: Path, *, to_postgres: bool = False) -> dict:
    from conduit_dagster.engine.checkpoint import LocalCheckpointStore
    from conduit_dagster.engine.runner import RunFinished, run_pipeline
    from conduit_dagster.engine.spec import load_spec

    spec = load_spec(write_ingest(rows, out, to_postgres=to_postgres))
    finished = None
    for event in run_pipeline(spec.resources[0], LocalCheckpointStore(out / "checkpoints"), run_id="bench"):
        if isinstance(event, RunFinished):
            finished = event
    assert finished is not None and finished.rows_this_run == rows
    return {"rows": finished.rows_this_run, "loop_s": finished.duration_s, "checkpoint_s": finished.checkpoint_s}


def child_dlt(rows: int, out: Path, backend: str) -> dict:
    import dlt
    from dlt.sources.sql_database import sql_table

    # SQLAlchemy 2.1 defaults to psycopg 3 for postgresql://; dlt reflects through SQLAlchemy with psycopg2.
    source = sql_table(
        credentials=URL.replace("postgresql://", "postgresql+psycopg2://", 1),
        table=table_name(rows),
        schema="public",
        backend=backend,
        chunk_size=BATCH,
    )
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{backend}",
        pipelines_dir=str(out / "dlt_pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=(out / "dlt_out").as_uri()),
        dataset_name="bench",
    )
    pipeline.run(source, loader_file_format="parquet")
    return {"rows": rows}


def write_ingest(
    rows: int, out: Path, *, empty: bool = False, to_postgres: bool = False, destination: str = "", head: str = ""
) -> Path:
    """The benchmark's ingest.yml; ``destination`` (the destination's keys) and ``head`` (text before
    ``sources:``) let bench/pg_to_s3.py reuse it."""
    path = out / "ingest.yml"
    if to_postgres:  # PostgreSQL -> PostgreSQL: a replace-mode table in schema conduit_bench_out
        destination = "    type: postgresql\n    database: test\n    user: postgres\n    schema: conduit_bench_out\n"
    destination = destination or f"    type: local\n    path: {out / 'lake'}\n"
    path.write_text(
        f"""{head}
sources:
  - name: pg
    type: postgresql
    url: {URL}
    resume: true
    checkpoint_column: id
destinations:
  - name: lake
{destination}resources:
  - name: bench
    source: pg
    destination: lake
    batch_size: {BATCH}
    query: SELECT {COLUMNS} FROM public.{table_name(rows)}{" WHERE false" if empty else ""}
"""
    )
    return path


# --- the parent: alternate, repeat, measure ----------------------------------------------


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MB (wait4), and stdout of one process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss // 1024, out


def measure(method: str, rows: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    try:
        if method == "floor":
            sql = f"\\copy (SELECT {COLUMNS} FROM public.{table_name(rows)} ORDER BY id) TO '{out / 'floor.csv'}' CSV"
            wall, rss, _ = run_measured(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c", sql])
            return {"wall": wall, "rss": rss}
        if method in ("dagster", "dagster-startup"):
            # dagster-startup: the same job over zero rows, i.e. Dagster's fixed start-up cost
            write_ingest(rows, out, empty=method == "dagster-startup")
            home = out / "dagster_home"
            home.mkdir()
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            env = dict(
                os.environ,
                CONDUIT_INGEST_FILE=str(out / "ingest.yml"),
                DAGSTER_HOME=str(home),
                CONDUIT_CHECKPOINT_DIR=str(out / "checkpoints"),
            )
            dagster = str(Path(sys.executable).with_name("dagster"))
            wall, rss, _ = run_measured(
                [dagster, "job", "execute", "-m", "conduit_dagster.definitions", "-j", "ingest_bench"], env
            )
            return {"wall": wall, "rss": rss}
        wall, rss, text = run_measured([sys.executable, __file__, "--child", method, "--rows", str(rows), "--out", str(out)])
        result = json.loads(text.strip().splitlines()[-1])
        return {"wall": wall, "rss": rss, **result}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summary(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5000000", help="table sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        rows, out = int(args.rows), Path(args.out)
        if args.child in ("engine", "engine-pg"):
            result = child_engine(rows, out, to_postgres=args.child == "engine-pg")
        else:
            result = child_dlt(rows, out, args.child.split("-", 1)[1])
        print(json.dumps(result))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for size in [int(r) for r in args.rows.split(",")]:
        ensure_table(size)
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeat):
            for method in methods if rep % 2 == 0 else list(reversed(methods)):
                r = measure(method, size)
                results[method].append(r)
                print(f"  rep {rep + 1} {method:15s} {r['wall']:7.2f} s  {r['rss']:5d} MB", flush=True)
        floor = statistics.median(r["wall"] for r in results["floor"]) if "floor" in results else None
        print(f"\n{size:,} rows, {args.repeat} repetitions, median [min-max]")
        print(f"{'method':16s} {'wall s':>22s} {'rows/s':>24s} {'x floor':>8s} {'peak RSS MB':>18s} {'checkpoint share':>17s}")
        for method in methods:
            walls = [r["wall"] for r in results[method]]
            rates = [size / w for w in walls]
            ratio = f"{statistics.median(walls) / floor:.2f}" if floor else "-"
            cp = [r["checkpoint_s"] / r["wall"] for r in results[method] if "checkpoint_s" in r]
            cp_text = summary([c * 100 for c in cp], "{:.2f}") + " %" if cp else ""
            print(
                f"{method:16s} {summary(walls):>22s} {summary(rates, '{:,.0f}'):>24s} {ratio:>8s} "
                f"{summary([float(r['rss']) for r in results[method]], '{:.0f}'):>18s} {cp_text:>17s}"
            )
        if "engine" in results:
            ours = statistics.median(r["wall"] for r in results["engine"])
            if "dagster" in results and "dagster-startup" in results:
                through = statistics.median(r["wall"] for r in results["dagster"])
                fixed = statistics.median(r["wall"] for r in results["dagster-startup"])
                print(
                    f"dagster job execute: {through:.2f} s = {fixed:.2f} s fixed start-up + {through - fixed:.2f} s "
                    f"(engine alone: {ours:.2f} s)"
                )
            for peer in ("dlt-pyarrow", "dlt-connectorx"):
                if peer in results:
                    print(f"engine is {statistics.median(r['wall'] for r in results[peer]) / ours:.2f}x faster than {peer}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
