"""The short version of the crash-anywhere harness (bench/crashtest.py), on the real PostgreSQL."""

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
