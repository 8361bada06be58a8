"""The short version of the crash-anywhere harness (bench/crashtest.py), on the real PostgreSQL and MariaDB/MySQL."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_crash_harness_short_run_loses_and_duplicates_nothing(postgres_dsn):
    out = subprocess.run(
        # 10 trials: each destination (Parquet; PostgreSQL replace, append, merge; S3 Parquet with S3 checkpoints, on
        # moto_server) with a unique and a repeating column
        [sys.executable, str(ROOT / "bench" / "crashtest.py"), "--trials", "10", "--rows", "200000", "--columns", "id,ts"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    summary = re.search(r"summary: 10 trials, (\d+) kills, 200,000 source rows, rows lost 0, rows duplicated 0", out.stdout)
    assert summary, out.stdout[-3000:]
    assert len(re.findall(r"^trial ", out.stdout, flags=re.M)) == 10
    for destination in ("parquet", "postgresql-replace", "postgresql-append", "postgresql-merge", "s3 "):
        assert destination in out.stdout


def test_crash_harness_new_key_shapes_with_late_inserts_lose_and_duplicate_nothing(postgres_dsn):
    """Numeric ±Infinity, char(12) and citext checkpoint columns, while rows are inserted between keys in transactions
    that commit late: every source row once, no late row twice."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "crashtest.py"),
            "--trials",
            "8",
            "--rows",
            "100000",
            "--columns",
            "num,ch,ci,id",
            "--destinations",
            "postgresql-append,parquet",
            "--late-inserts",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert re.search(r"summary: 8 trials, (\d+) kills, 100,000 source rows, rows lost 0, rows duplicated 0", out.stdout), (
        out.stdout[-3000:]
    )
    for column in ("num ", "ch ", "ci ", "id "):
        assert f"postgresql-append  {column}" in out.stdout
    assert "late rows" in out.stdout


def _mysql_env(mysql_server: dict[str, object]) -> dict[str, str]:
    """The harness's environment, pointed at the tests' MariaDB/MySQL server."""
    env = dict(os.environ)
    for key in ("host", "port", "user", "password"):
        env[f"CONDUIT_BENCH_MYSQL_{key.upper()}"] = str(mysql_server[key])
    return env


def test_crash_harness_mysql_source_loses_and_duplicates_nothing(mysql_server):
    """A MariaDB/MySQL source checkpointed on a utf8mb4_general_ci text (case, accent, trailing-space and non-BMP
    variants of one word, equal to MySQL), a DATETIME(6) with 40 rows a value, and a unique id, into MySQL append,
    replace and merge and into Parquet, while rows are inserted between keys in transactions that commit late: every
    source row once."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "crashtest.py"),
            "--source",
            "mysql",
            "--trials",
            "10",
            "--rows",
            "100000",
            "--columns",
            "ci,dt6,id",
            "--destinations",
            "mysql-append,mysql-replace,mysql-merge,parquet",
            "--late-inserts",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_mysql_env(mysql_server),
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert re.search(r"summary: 10 trials, (\d+) kills, 100,000 source rows, rows lost 0, rows duplicated 0", out.stdout), (
        out.stdout[-3000:]
    )
    assert len(re.findall(r"^trial ", out.stdout, flags=re.M)) == 10
    for destination in ("mysql-append", "mysql-replace", "mysql-merge", "parquet"):
        assert re.search(rf"^trial +\d+ {destination} ", out.stdout, flags=re.M), destination
    for column in ("ci", "dt6", "id"):
        assert re.search(rf"^trial +\d+ \S+ +{column} ", out.stdout, flags=re.M), column
    assert "late rows" in out.stdout


def test_crash_harness_postgresql_source_into_mysql_loses_and_duplicates_nothing(postgres_dsn, mysql_server):
    """PostgreSQL rows (timestamptz, numeric ±Infinity, char(12), citext) into MySQL append, replace and merge tables
    created from PostgreSQL's column types, checkpointed on a timestamptz and a citext: every source row once."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "crashtest.py"),
            "--trials",
            "6",
            "--rows",
            "50000",
            "--columns",
            "ts,ci",
            "--destinations",
            "mysql-append,mysql-replace,mysql-merge",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_mysql_env(mysql_server),
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert re.search(r"summary: 6 trials, (\d+) kills, 50,000 source rows, rows lost 0, rows duplicated 0", out.stdout), (
        out.stdout[-3000:]
    )
    for destination in ("mysql-append", "mysql-replace", "mysql-merge"):
        for column in ("ts", "ci"):
            assert re.search(rf"^trial +\d+ {destination} +{column} ", out.stdout, flags=re.M), (destination, column)


def test_crash_harness_partitioned_runs_killed_at_once_lose_and_duplicate_nothing(postgres_dsn):
    """A pipeline in 4 daily windows of ts whose partition runs start at once; a random subset is SIGKILLed at random
    instants and re-run: the whole output (every partition's Parquet files, or the one PostgreSQL replace table all
    partitions publish into) holds every source row once, rows on a window's lower bound included."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "crashtest.py"),
            "--partitioned",
            "--partitions",
            "4",
            "--trials",
            "6",
            "--rows",
            "100000",
            "--columns",
            "id,ts",
            "--destinations",
            "parquet,postgresql-replace",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    summary = re.search(
        r"summary: 6 trials, (\d+) kills, 100,000 source rows, rows lost 0, rows duplicated 0, (\d+) partition runs "
        r"\(4 daily windows of ts\)",
        out.stdout,
    )
    assert summary, out.stdout[-3000:]
    assert int(summary.group(1)) > 0, out.stdout[-3000:]
    assert int(summary.group(2)) > 24, out.stdout[-3000:]  # the killed partitions were run again
    assert len(re.findall(r"^trial ", out.stdout, flags=re.M)) == 6
    for destination in ("parquet", "postgresql-replace"):
        for column in ("id", "ts"):
            line = rf"^trial +\d+ {destination} +{column} +killed [0-4]/4"
            assert re.search(line, out.stdout, flags=re.M), (destination, column)
