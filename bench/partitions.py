"""Benchmark: partitioned pipelines on a 5M-row PostgreSQL table -> local Parquet (issue 12's figures).

Method. The table is bench/pg_to_parquet.py's (created by its ``ensure_table`` if missing: bigint id primary key,
a text of 10 values, a bigint, an ~80-char text, a double, a timestamptz rising with id, three rows a second, so
5M rows span 2025-01-01 .. 2025-01-20), plus an index on ts (added here if missing, read by nothing else) so that a
time window with no rows is found through the index, as it would be on a table partitioned by time. One ingest.yml
holds every pipeline, all on the same query (``SELECT id, cat, n, payload, score, ts FROM <table>``, checkpoint
column id, batch_size 100,000, local Parquet): ``bench_single`` unpartitioned; ``bench_days`` in daily windows of
ts from 2024-12-01 to 2025-02-01 (its first key, 2024-12-01, holds no row); ``bench_r4``, ``bench_r8`` and
``bench_r16`` in 4, 8 and 16 key ranges of id. The key ranges are planned once, before any timing, in a checkpoint
directory every run shares (a plan is computed once in a pipeline's life; its cost is measured on its own, below),
and every run's output folder is deleted after it. Every run is its own process (or set of processes); its wall time
is taken around the whole process, start-up included. Within each experiment the methods alternate run by run
(forward in odd repetitions, reversed in even ones), and every figure is the median over --repeat repetitions with
the range beside it. Experiments:

- fixed: the cost of one partition run that loads nothing (the empty window 2024-12-01): ``engine-empty`` is
  ``python -m conduit_dagster.engine run --pipeline bench_days --partition 2024-12-01``; ``dagster-empty`` is the same
  partition as a Dagster run, ``dagster asset materialize -m conduit_dagster.definitions --select bench_days
  --partition 2024-12-01`` (Dagster 1.13's CLI takes a partition there; ``dagster job execute`` has no partition
  option, only ``--tags '{"dagster/partition": ...}'``, measured as ``dagster-empty-job``); ``dagster-trivial``
  materializes one partition of a one-asset daily-partitioned Dagster project whose asset returns None (Dagster's own
  floor); ``python`` is ``python -c pass``. The Dagster runs share one DAGSTER_HOME (SQLite, migrated before the
  timing), as runs of one deployment do.
- backfill: the whole table as one stream (``single``: the engine CLI on bench_single) against the backfill of its
  N = 8 and 16 key ranges, one process per partition, one after another (``seq8``, ``seq16``), which is what Dagster's
  default ``multi_run`` backfill on one run worker does; and the same through Dagster (``dagster-single``: one
  ``dagster asset materialize`` of bench_single; ``dagster-seq8``: eight, one per partition).
- parallel: bench_r4's 4 partitions run by W = 1, 2 or 4 workers at once (``parts-w1/w2/w4``: a worker starts the
  next partition's engine CLI run as soon as its previous one exits; the figure is the wall time of the whole set),
  against the source's own limit in the same repetitions: ``copy-w1/w2/w4`` runs the same 4 id ranges as
  ``psql -c "\\copy (SELECT <columns> FROM <table> WHERE id >= lo AND id < hi ORDER BY id) TO STDOUT WITH (FORMAT
  csv)"`` into /dev/null, W at once (the statement shape the PostgreSQL source sends). rows/s = table rows / wall.
- plan: ``conduit plan --pipeline bench_r16`` (16 key ranges) in a fresh checkpoint directory each time, while a
  thread samples pg_stat_activity for the statement it runs; the statement's SELECT is then run under EXPLAIN
  (ANALYZE), which shows whether the server sorts. ``column-copy`` times the floor of one pass over the column,
  ``psql \\copy (SELECT id FROM <table>) TO STDOUT`` into /dev/null.

The scaling model, with the constants this run measured, is printed at the end (and written up in
bench/partitions-model.md): the wall time of a backfill of P partitions of R rows on W run workers on separate
machines is about

    T(P, W) = F * ceil(P / W) + R / min(W * r, C)

F: the fixed cost of one partition run, taken from the backfill as (seq16 - single) / 15 (16 runs are 15 runs more
than the single stream's one), with ``engine-empty`` as its floor; as a Dagster run, (dagster-seq8 - dagster-single) / 7;
r: one run's own throughput, R / (single - F); C: what the source database can COPY out, all readers together (the best
of copy-w1/w2/w4). seq8 and the parallel sets are predicted from those constants and printed beside their
measurements. On this 2-core machine the runs and the PostgreSQL server share the two cores, so more runs at once
cannot add CPU: the model is also printed with the machine's own cap, C_box = cores / (the pipeline's CPU a row, from
single's CPU less engine-empty's + the server's CPU a row, from copy-w2's busy core-seconds less psql's CPU). What
separate run workers buy is the W * r term, bounded by the database's C.

    .venv/bin/python bench/partitions.py --repeat 3 | tee bench/partitions-last-run.txt
    .venv/bin/python bench/partitions.py --repeat 1 --experiments fixed,plan
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_to_parquet import COLUMNS, DSN, URL, ensure_table, table_name  # noqa: E402 - bench/ is not a package

BATCH = 100_000
EMPTY_KEY = "2024-12-01"  # bench_days' first window: before the table's first ts
PSQL = ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "test"]
EXPERIMENTS = ("fixed", "backfill", "parallel", "plan")
PY = sys.executable
BIN = Path(sys.executable).parent

TRIVIAL = """import dagster as dg


@dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2024-12-01", end_date="2025-02-01"))
def trivial() -> None:
    return None


defs = dg.Definitions(assets=[trivial])
"""


def write_ingest(work: Path, rows: int) -> Path:
    table = f"public.{table_name(rows)}"
    pipelines = {
        "bench_single": "",
        "bench_days": '    partitions:\n      column: ts\n      every: day\n      start: "2024-12-01"\n      end: "2025-02-01"\n',
        **{f"bench_r{n}": f"    partitions:\n      column: id\n      ranges: {n}\n" for n in (4, 8, 16)},
    }
    resources = "".join(
        f"  - name: {name}\n    source: pg\n    destination: lake\n    batch_size: {BATCH}\n"
        f"    query: SELECT {COLUMNS} FROM {table}\n{block}"
        for name, block in pipelines.items()
    )
    path = work / "ingest.yml"
    path.write_text(
        f"""sources:
  - name: pg
    type: postgresql
    url: {URL}
    resume: true
    checkpoint_column: id
destinations:
  - name: lake
    type: local
    path: {work / "lake"}
resources:
{resources}"""
    )
    return path


class Bench:
    """The commands of every method, their environment, and the runs' bookkeeping."""

    def __init__(self, work: Path, rows: int) -> None:
        self.work, self.rows = work, rows
        self.ingest = write_ingest(work, rows)
        self.checkpoints = work / "checkpoints"
        home = work / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
        (work / "trivial").mkdir()
        (work / "trivial" / "trivial_defs.py").write_text(TRIVIAL)
        self.env = dict(
            os.environ,
            CONDUIT_INGEST_FILE=str(self.ingest),
            CONDUIT_CHECKPOINT_DIR=str(self.checkpoints),
            DAGSTER_HOME=str(home),
        )
        self.logs = work / "logs"
        self.logs.mkdir()
        self.count = 0
        self.last: dict[str, float] = {}

    # --- commands ---

    def engine(self, pipeline: str, partition: str | None = None) -> list[str]:
        cmd = [PY, "-m", "conduit_dagster.engine", "run", "--file", str(self.ingest), "--pipeline", pipeline]
        cmd += ["--checkpoint-dir", str(self.checkpoints)]
        return cmd + (["--partition", partition] if partition is not None else [])

    def materialize(self, asset: str, partition: str | None = None) -> list[str]:
        cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "conduit_dagster.definitions", "--select", asset]
        return cmd + (["--partition", partition] if partition is not None else [])

    def job(self, pipeline: str, partition: str) -> list[str]:
        tags = json.dumps({"dagster/partition": partition})
        return [str(BIN / "dagster"), "job", "execute", "-m", "conduit_dagster.definitions", "-j", f"ingest_{pipeline}"] + [
            "--tags",
            tags,
        ]

    def trivial(self) -> list[str]:
        path = str(self.work / "trivial" / "trivial_defs.py")
        return [str(BIN / "dagster"), "asset", "materialize", "-f", path, "--select", "trivial", "--partition", EMPTY_KEY]

    def plan(self, pipeline: str, checkpoints: Path) -> list[str]:
        return [str(BIN / "conduit"), "plan", "--file", str(self.ingest), "--pipeline", pipeline, "--dir", str(checkpoints)]

    def copy(self, select: str) -> list[str]:
        return [*PSQL, "-c", f"\\copy ({select}) TO STDOUT WITH (FORMAT csv)"]

    # --- running ---

    def run_set(self, cmds: list[list[str]], workers: int = 1) -> float:
        """Run ``cmds`` with at most ``workers`` at once (the next starts when one exits); the wall time of the set.
        Output goes to files (a pipe left unread could stall a run); any failure stops the benchmark. ``self.last``
        keeps the set's CPU figures: the commands' own user+system seconds (wait4, their waited-for children
        included) and how busy the whole machine's cores were (/proc/stat), which includes the PostgreSQL server."""
        pending = list(cmds)
        running: list[tuple[subprocess.Popen, Path, list[str]]] = []
        cpu = 0.0
        busy0 = machine_busy()
        t0 = time.monotonic()
        while pending or running:
            while pending and len(running) < workers:
                cmd = pending.pop(0)
                self.count += 1
                log = self.logs / f"{self.count:05d}.log"
                with log.open("wb") as out:
                    running.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env), log, cmd))
            pid, status, usage = os.wait3(0)
            cpu += usage.ru_utime + usage.ru_stime
            for i, (proc, log, cmd) in enumerate(running):
                if proc.pid == pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        for other, _, _ in running:
                            if other.poll() is None:
                                other.kill()
                        raise SystemExit(f"{' '.join(cmd)[:300]} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
                    del running[i]
                    break
        wall = time.monotonic() - t0
        busy1 = machine_busy()
        self.last = {"cpu": cpu, "busy": (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])}
        shutil.rmtree(self.work / "lake", ignore_errors=True)  # the next run starts from no output
        return wall

    def ranges(self, n: int) -> list[tuple[int, int]]:
        """``n`` id ranges [lo, hi) of equal width over 1..rows (ids are 1..rows, one each)."""
        edges = [1 + (self.rows * i) // n for i in range(n)] + [self.rows + 1]
        return list(zip(edges[:-1], edges[1:], strict=True))


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every core since boot, from /proc/stat (busy: all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


def keys(n: int) -> list[str]:
    return [f"r{i:02d}" for i in range(n)]


CPU: dict[str, list[dict[str, float]]] = {}  # per method, each run's CPU figures (Bench.last)


def alternate(b: Bench, name: str, methods: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(repeat):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))
        for method in order:
            wall = methods[method]()
            results[method].append(wall)
            CPU.setdefault(method, []).append(b.last)
            print(
                f"  {name} rep {rep + 1} {method:18s} {wall:8.2f} s  (commands' CPU {b.last['cpu']:6.2f} s, "
                f"cores busy {100 * b.last['busy']:3.0f} %)",
                flush=True,
            )
    return results


def med(values: list[float]) -> float:
    return statistics.median(values)


def show(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(med(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def table(results: dict[str, list[float]], rows: int | None = None) -> None:
    head = f"  {'method':18s} {'wall s, median [min-max]':>28s}"
    print(head + (f" {'rows/s, median [min-max]':>32s}" if rows else "") + f" {'commands CPU s':>15s} {'cores busy':>11s}")
    for method, walls in results.items():
        line = f"  {method:18s} {show(walls):>28s}"
        if rows:
            line += f" {show([rows / w for w in walls], '{:,.0f}'):>32s}"
        cpu = CPU.get(method, [])
        if cpu:
            line += f" {med([c['cpu'] for c in cpu]):15.2f} {100 * med([c['busy'] for c in cpu]):10.0f}%"
        print(line)


# --- experiments -------------------------------------------------------------------------------------------------


def fixed(b: Bench, repeat: int) -> dict[str, list[float]]:
    print("\nfixed: one partition run that loads nothing (bench_days, window 2024-12-01)", flush=True)
    methods = {
        "python": lambda: b.run_set([[PY, "-c", "pass"]]),
        "engine-empty": lambda: b.run_set([b.engine("bench_days", EMPTY_KEY)]),
        "dagster-empty": lambda: b.run_set([b.materialize("bench_days", EMPTY_KEY)]),
        "dagster-empty-job": lambda: b.run_set([b.job("bench_days", EMPTY_KEY)]),
        "dagster-trivial": lambda: b.run_set([b.trivial()]),
    }
    results = alternate(b, "fixed", methods, repeat)
    table(results)
    return results


def backfill(b: Bench, repeat: int) -> dict[str, list[float]]:
    print(f"\nbackfill: the whole table ({b.rows:,} rows) as one stream against N partitions one after another", flush=True)
    methods = {
        "single": lambda: b.run_set([b.engine("bench_single")]),
        "seq8": lambda: b.run_set([b.engine("bench_r8", k) for k in keys(8)]),
        "seq16": lambda: b.run_set([b.engine("bench_r16", k) for k in keys(16)]),
        "dagster-single": lambda: b.run_set([b.materialize("bench_single")]),
        "dagster-seq8": lambda: b.run_set([b.materialize("bench_r8", k) for k in keys(8)]),
    }
    results = alternate(b, "backfill", methods, repeat)
    table(results, b.rows)
    single = med(results["single"])
    # the single stream is one run too: N partition runs are N - 1 runs more
    for method, n in (("seq8", 8), ("seq16", 16)):
        extra = med(results[method]) - single
        print(f"  {method}: {extra:+.2f} s over single ({100 * extra / single:+.0f} %), {extra / (n - 1):+.2f} s a run more")
    extra = med(results["dagster-seq8"]) - med(results["dagster-single"])
    print(
        f"  dagster-seq8: {extra:+.2f} s over dagster-single ({100 * extra / med(results['dagster-single']):+.0f} %), "
        f"{extra / 7:+.2f} s a run more"
    )
    return results


def parallel(b: Bench, repeat: int) -> dict[str, list[float]]:
    print(f"\nparallel: bench_r4's 4 partitions ({b.rows:,} rows) on W workers at once; COPY of the same ranges", flush=True)
    table_ = f"public.{table_name(b.rows)}"
    copies = [b.copy(f"SELECT {COLUMNS} FROM {table_} WHERE id >= {lo} AND id < {hi} ORDER BY id") for lo, hi in b.ranges(4)]
    parts = [b.engine("bench_r4", k) for k in keys(4)]

    def at_once(cmds: list[list[str]], w: int) -> Callable[[], float]:
        return lambda: b.run_set(cmds, w)

    methods: dict[str, Callable[[], float]] = {}
    for w in (1, 2, 4):
        methods[f"parts-w{w}"] = at_once(parts, w)
        methods[f"copy-w{w}"] = at_once(copies, w)
    results = alternate(b, "parallel", methods, repeat)
    table(results, b.rows)
    return results


def plan(b: Bench, repeat: int) -> dict[str, list[float]]:
    print(f"\nplan: conduit plan --pipeline bench_r16 (16 key ranges of id over {b.rows:,} rows)", flush=True)
    seen: list[str] = []
    table_ = table_name(b.rows)

    def planned() -> float:
        folder = Path(tempfile.mkdtemp(prefix="plan-", dir=b.work))
        stop = threading.Event()
        sampler = threading.Thread(target=sample_statements, args=(table_, stop, seen), daemon=True)
        sampler.start()
        try:
            wall = b.run_set([b.plan("bench_r16", folder)])
        finally:
            stop.set()
            sampler.join()
        shutil.rmtree(folder)
        return wall

    methods = {
        "conduit-plan": planned,
        "column-copy": lambda: b.run_set([b.copy(f"SELECT id FROM public.{table_}")]),
    }
    results = alternate(b, "plan", methods, repeat)
    table(results, b.rows)
    statements = sorted(set(seen), key=len)
    if not statements:
        print("  no statement on the table was seen in pg_stat_activity while planning")
        return results
    statement = " ".join(statements[-1].split())
    print(f"  the statement the plan runs (from pg_stat_activity): {statement}")
    select = re.sub(r"^\s*COPY\s*\((.*)\)\s*TO\s+STDOUT.*$", r"\1", statement, flags=re.S | re.I)
    conn = psycopg2.connect(DSN)
    try:
        with conn.cursor() as cur:
            cur.execute(f"EXPLAIN (ANALYZE, TIMING OFF) {select}")
            lines = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    print("  EXPLAIN (ANALYZE, TIMING OFF) of its SELECT:")
    for line in lines:
        print(f"    {line}")
    sorts = [line for line in lines if re.search(r"\bSort\b", line)]
    print(f"  the server sorts: {'yes: ' + sorts[0].strip() if sorts else 'no (no Sort node)'}")
    return results


def sample_statements(table_: str, stop: threading.Event, seen: list[str]) -> None:
    """The active statements that read ``table_``, sampled every 20 ms until ``stop``."""
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(
                    "SELECT query FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE %s",
                    (f"%{table_}%",),
                )
                seen.extend(r[0] for r in cur.fetchall())
                stop.wait(0.02)
    finally:
        conn.close()


# --- the model ---------------------------------------------------------------------------------------------------


def model(rows: int, results: dict[str, dict[str, list[float]]]) -> None:
    """The model's constants from this run's medians, and its predictions beside what was measured."""
    fx, bf, par = results.get("fixed"), results.get("backfill"), results.get("parallel")
    if not (fx and bf and par):
        return
    cores = os.cpu_count() or 1
    single = med(bf["single"])
    f_empty = med(fx["engine-empty"])
    # F: what one more partition run costs, from the 16-partition backfill against the single stream (15 runs more);
    # an empty partition's run is its floor (a run that loads rows also opens a Parquet writer, publishes, fsyncs)
    f = (med(bf["seq16"]) - single) / 15
    f_dagster = (med(bf["dagster-seq8"]) - med(bf["dagster-single"])) / 7
    r = rows / (single - f)
    copy = {w: rows / med(par[f"copy-w{w}"]) for w in (1, 2, 4)}
    c = max(copy.values())
    # This machine's own ceiling: its cores over the CPU a row costs the pipeline (the single stream's CPU less an empty
    # run's) plus what it costs the server (copy-w2: the cores' busy time less psql's own CPU)
    client_us = 1e6 * (med([x["cpu"] for x in CPU["single"]]) - med([x["cpu"] for x in CPU["engine-empty"]])) / rows
    w2 = CPU["copy-w2"]
    server_us = 1e6 * med([x["busy"] * cores * wall - x["cpu"] for x, wall in zip(w2, par["copy-w2"], strict=True)]) / rows
    c_box = cores * 1e6 / (client_us + server_us)
    print("\nmodel: T(P, W) = F * ceil(P / W) + R / min(W * r, C)")
    print(f"  R = {rows:,} rows")
    print(f"  F = {f:.2f} s a partition run with the engine CLI ((seq16 - single) / 15; an empty one: {f_empty:.2f} s)")
    print(
        f"      {f_dagster:.2f} s a partition run as a Dagster run ((dagster-seq8 - dagster-single) / 7; an empty one: "
        f"{med(fx['dagster-empty']):.2f} s; Dagster's trivial asset: {med(fx['dagster-trivial']):.2f} s)"
    )
    print(f"  r = R / (single - F) = {r:,.0f} rows/s (one run's own rate)")
    print(
        f"  C = {c:,.0f} rows/s: the best of COPY with 1, 2, 4 readers at once here ("
        + ", ".join(f"W={w}: {v:,.0f}" for w, v in copy.items())
        + ")"
    )
    print(
        f"  this machine: a row costs the pipeline {client_us:.2f} us of CPU and the server about {server_us:.2f} us, so "
        f"{cores} cores carry at most C_box = {c_box:,.0f} rows/s of pipelines and server together"
    )

    def predict(p: int, w: int, fixed_s: float, cap: float) -> float:
        return fixed_s * math.ceil(p / w) + rows / min(w * r, cap)

    print(f"  {'case':40s} {'model, C':>9s} {'model, min(C, C_box)':>21s} {'measured s':>11s}")
    for label, p, w, fixed_s, got in (
        ("seq8 (P=8, W=1, engine)", 8, 1, f, med(bf["seq8"])),
        ("seq16 (P=16, W=1, engine; F fitted)", 16, 1, f, med(bf["seq16"])),
        ("parts-w1 (P=4, W=1, engine)", 4, 1, f, med(par["parts-w1"])),
        ("parts-w2 (P=4, W=2, engine)", 4, 2, f, med(par["parts-w2"])),
        ("parts-w4 (P=4, W=4, engine)", 4, 4, f, med(par["parts-w4"])),
    ):
        print(f"  {label:40s} {predict(p, w, fixed_s, c):9.2f} {predict(p, w, fixed_s, min(c, c_box)):21.2f} {got:11.2f}")
    best = min((med(par[f"parts-w{w}"]), w) for w in (1, 2, 4))
    print(
        f"  partition runs at once here: at best {rows / best[0]:,.0f} rows/s (W={best[1]}), {rows / best[0] / r:.2f} x one "
        f"run's r; COPY alone: at best {c:,.0f} rows/s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints, plans)")
    args = parser.parse_args()
    chosen = [e.strip() for e in args.experiments.split(",") if e.strip()]
    if unknown := [e for e in chosen if e not in EXPERIMENTS]:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    ensure_table(args.rows)
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE INDEX IF NOT EXISTS {table_name(args.rows)}_ts ON public.{table_name(args.rows)} (ts)")
        cur.execute("SELECT version()")
        version = str((cur.fetchone() or ("?",))[0])
    conn.close()
    print(f"{args.rows:,} rows in public.{table_name(args.rows)}; {os.cpu_count()} cores; {version.split(',')[0]}")
    print(f"repetitions: {args.repeat}; methods alternate run by run; figures are medians [min-max]", flush=True)
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="conduit-partitions-"))
    try:
        b = Bench(work, args.rows)
        # before any timing: the key-range plans every run shares, Dagster's instance storage, warm caches
        for n in (4, 8, 16):
            b.run_set([b.plan(f"bench_r{n}", b.checkpoints)])
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=b.env, check=True, capture_output=True)
        b.run_set([b.trivial()])
        b.run_set([b.engine("bench_single")])
        results = {}
        runners = {"fixed": fixed, "backfill": backfill, "parallel": parallel, "plan": plan}
        for name in chosen:
            results[name] = runners[name](b, args.repeat)
        model(args.rows, results)
        print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
