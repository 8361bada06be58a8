"""Partitioned output on the local and S3 destinations (issue 12), against a real disk and a real S3 endpoint (moto's
server on 127.0.0.1): each partition under ``<path>/<resource>/<key>/`` published on its own, partitions written at the
same time by different processes, a republish replacing only its partition, a crash before publish leaving the
previous output visible, empty partitions, count(), readers of the whole ``<resource>/`` folder, a cleared
partition's leftover named by the CLI, and runs of a partitioned pipeline end to end through run_pipeline."""

import hashlib
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.destinations.local import LocalDestinationSpec
from conduit_dagster.engine.destinations.s3 import MANIFEST, S3DestinationSpec
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.partitions import Partition, resolve_partition
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import S3ConnectionSpec, load_spec_text
from conduit_dagster_tests.conftest import s3_keys
from conduit_dagster_tests.helpers import assert_same_rows, output_rows, s3_output_rows

CONDUIT = str(Path(sys.executable).with_name("conduit"))
HOUR = "2024-01-31-13:00"  # an hourly key holds ':'


def table(start: int, n: int) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "name": [f"row {i}" for i in range(start, start + n)]})


def rows(t: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in t.to_pylist()]


def part(key: str, pipeline: str = "orders") -> Partition:
    return Partition(pipeline, key, "id", None, None)


@dataclass
class Target:
    """One destination (local or S3) and the ways a reader sees its output."""

    kind: str
    spec: Any
    tmp: Path
    s3: Any = None
    bucket: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.spec.prefix}/orders/" if self.kind == "s3" else ""

    def open(self, key: str | None, pipeline: str = "orders") -> Any:
        return open_destination(self.spec, pipeline, partition=None if key is None else part(key, pipeline))

    def where(self, key: str) -> str:
        return str(self.tmp / "lake" / "orders" / key) if self.kind == "local" else f"s3://{self.bucket}/{self.prefix}{key}/"

    def rows(self, key: str) -> list[tuple]:
        """A partition's visible rows, read as a reader of its folder or prefix reads them."""
        if self.kind == "local":
            folder = self.tmp / "lake" / "orders" / key
            return [tuple(r.values()) for r in ds.dataset(folder, format="parquet").to_table().to_pylist()]
        return s3_output_rows(self.s3, self.bucket, f"{self.prefix}{key}/")

    def all_rows(self) -> list[tuple]:
        """Every row a reader of the whole ``<resource>/`` folder sees (a recursive glob / a folder read)."""
        if self.kind == "local":
            import duckdb

            folder = self.tmp / "lake" / "orders"
            by_pyarrow = [tuple(r.values()) for r in ds.dataset(folder, format="parquet").to_table().to_pylist()]
            by_duckdb: list[tuple] = []
            if any(folder.glob("*/*.parquet")):  # the glob the module docstring gives (DuckDB refuses one matching nothing)
                relation = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*/*.parquet')")
                assert relation is not None
                by_duckdb = relation.fetchall()
            assert sorted(by_pyarrow) == sorted(by_duckdb)
            return by_pyarrow
        from conduit_dagster.engine.sources.files import FileSource
        from conduit_dagster.engine.spec import FileSourceSpec

        src = FileSource(FileSourceSpec(name="lake", path=f"s3://{self.bucket}/{self.prefix}", format="parquet", s3=self.spec.s3))
        try:
            chunks = src.read("", None, None, resume=False, fetch_size=1000)  # partitions in any order
            return [tuple(r.values()) for c in chunks for r in c.data.to_pylist()]
        finally:
            src.close()

    def fingerprint(self, key: str) -> dict[str, str]:
        """Name -> content hash of every file or object of a partition's output."""
        if self.kind == "local":
            folder = self.tmp / "lake" / "orders" / key
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
        out = {}
        for k in s3_keys(self.s3, self.bucket, f"{self.prefix}{key}/"):
            out[k] = hashlib.sha256(self.s3.get_object(Bucket=self.bucket, Key=k)["Body"].read()).hexdigest()
        return out

    def staged(self) -> list[str]:
        """Everything in the staging area (runs in progress and their leftovers)."""
        if self.kind == "local":
            staging = self.tmp / "lake" / "_conduit_staging"
            return sorted(str(p.relative_to(staging)) for p in staging.rglob("*")) if staging.exists() else []
        return s3_keys(self.s3, self.bucket, "raw/_conduit_staging/")


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> Target:
    if request.param == "local":
        return Target("local", LocalDestinationSpec(name="lake", path=tmp_path / "lake"), tmp_path)
    s3 = request.getfixturevalue("s3")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    spec = S3DestinationSpec(name="lake", bucket=bucket, prefix="raw", s3=S3ConnectionSpec(endpoint_url=endpoint))
    return Target("s3", spec, tmp_path, s3, bucket)


def fenced(dest: Any) -> Any:
    """As the runner sets it: this run owns its unit (the S3 destination then also removes old leftovers)."""
    if hasattr(dest, "set_fence"):
        dest.set_fence(lambda: None)
    return dest


def test_each_partition_publishes_alone_and_a_republish_replaces_only_its_own(target):
    a, b = fenced(target.open("r00")), fenced(target.open(HOUR))
    a.start(None)
    b.start(None)  # starting a partition clears its own dead runs' leftovers, never another partition's staged parts
    a.write(0, table(0, 10))
    b.write(0, table(100, 10))
    b.write(1, table(110, 5))
    a.write(1, table(10, 10))
    b.publish(2)
    assert a.count() is None  # nothing published for r00 yet
    assert_same_rows(rows(table(100, 15)), target.rows(HOUR))
    assert_same_rows(rows(table(100, 15)), target.all_rows())  # r00's staged parts are invisible
    a.publish(2)
    assert_same_rows(rows(table(0, 20)), target.rows("r00"))
    assert_same_rows(rows(table(0, 20)) + rows(table(100, 15)), target.all_rows())
    assert (a.count(), b.count()) == (20, 15)
    assert a.describe().rstrip("/") == target.where("r00").rstrip("/")
    assert b.describe().rstrip("/") == target.where(HOUR).rstrip("/")
    other = target.fingerprint(HOUR)

    # r00 again, with other and fewer rows: exactly those, and HOUR's files are the very same bytes
    again = fenced(target.open("r00"))
    again.start(None)
    again.write(0, table(500, 3))
    assert_same_rows(rows(table(0, 20)), target.rows("r00"))  # the old output until the publish
    again.publish(1)
    assert_same_rows(rows(table(500, 3)), target.rows("r00"))
    assert again.count() == 3
    assert target.fingerprint(HOUR) == other
    assert_same_rows(rows(table(500, 3)) + rows(table(100, 15)), target.all_rows())
    if target.kind == "local":
        assert target.staged() == ["orders"]  # every generation folder gone
    else:
        assert target.staged() == []


def _write_partition(kind: str, spec: Any, key: str, start: int, batches: int, barrier: Any) -> None:
    """A partition run in its own process: start, write, publish, meeting the other processes between steps."""
    dest = fenced(open_destination(spec, "orders", partition=part(key)))
    barrier.wait(timeout=120)
    dest.start(None)
    barrier.wait(timeout=120)  # every partition has started (and cleaned up its own leftovers) before any writes
    for i in range(batches):
        dest.write(i, table(start + i * 7, 7))
    barrier.wait(timeout=120)  # every partition has staged its parts before any publishes
    dest.publish(batches)


def test_partitions_written_at_the_same_time_by_different_processes(target):
    ctx = multiprocessing.get_context("spawn")
    keys = ["r00", "r01", "r02", HOUR]
    barrier = ctx.Barrier(len(keys))
    procs = [
        ctx.Process(target=_write_partition, args=(target.kind, target.spec, key, 1000 * n, 3, barrier))
        for n, key in enumerate(keys)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * len(keys)
    for n, key in enumerate(keys):
        assert_same_rows(rows(table(1000 * n, 21)), target.rows(key))
    assert_same_rows([r for n in range(len(keys)) for r in rows(table(1000 * n, 21))], target.all_rows())

    # two of them republished at once with other rows: exact; the other two untouched
    kept = {key: target.fingerprint(key) for key in ("r01", HOUR)}
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_write_partition, args=(target.kind, target.spec, key, start, batches, barrier))
        for key, start, batches in (("r00", 50_000, 1), ("r02", 60_000, 4))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_same_rows(rows(table(50_000, 7)), target.rows("r00"))
    assert_same_rows(rows(table(60_000, 28)), target.rows("r02"))
    assert {key: target.fingerprint(key) for key in kept} == kept
    expected = rows(table(50_000, 7)) + rows(table(1000, 21)) + rows(table(60_000, 28)) + rows(table(3000, 21))
    assert_same_rows(expected, target.all_rows())


def test_partitions_in_threads_each_see_only_their_own_output(target):
    """Many partitions at once in one process (as a single_run backfill's threads would), republished twice."""
    keys = [f"r{i:02d}" for i in range(6)]
    errors: list[BaseException] = []

    def run(key: str, start: int) -> None:
        try:
            dest = fenced(target.open(key))
            dest.start(None)
            for i in range(2):
                dest.write(i, table(start + i * 5, 5))
            dest.publish(2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for round_ in range(2):
        threads = [threading.Thread(target=run, args=(key, 10_000 * round_ + 100 * n)) for n, key in enumerate(keys)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for n, key in enumerate(keys):
            assert_same_rows(rows(table(10_000 * round_ + 100 * n, 10)), target.rows(key))
            assert target.open(key).count() == 10


def test_a_crash_before_publish_leaves_the_partitions_previous_output(target):
    first = fenced(target.open("r00"))
    first.start(None)
    first.write(0, table(0, 8))
    first.publish(1)
    neighbour = fenced(target.open("r01"))
    neighbour.start(None)
    neighbour.write(0, table(900, 4))
    neighbour.publish(1)

    # a run that writes three batches, is checkpointed after two, and dies before publishing
    dead = fenced(target.open("r00"))
    state = dead.start(None).state
    for i in range(3):
        dead.write(i, table(100 + 10 * i, 10))
    assert_same_rows(rows(table(0, 8)), target.rows("r00"))
    assert target.open("r00").count() == 8
    assert_same_rows(rows(table(0, 8)) + rows(table(900, 4)), target.all_rows())

    # the resumed run keeps parts 0 and 1, drops part 2 (past the checkpoint) and writes it again with fewer rows
    resumed = fenced(target.open("r00"))
    assert not resumed.start(state, 2).already_published
    resumed.write(2, table(120, 3))
    assert_same_rows(rows(table(0, 8)), target.rows("r00"))
    resumed.publish(3)
    assert_same_rows(rows(table(100, 23)), target.rows("r00"))
    assert_same_rows(rows(table(900, 4)), target.rows("r01"))
    assert resumed.count() == 23

    # crashed after publishing, before the checkpoint went: the next run only finishes the clean-up
    finished = fenced(target.open("r00"))
    assert finished.start(state, 3).already_published
    assert_same_rows(rows(table(100, 23)), target.rows("r00"))
    assert target.staged() == (["orders"] if target.kind == "local" else [])


def test_an_empty_partition_publishes_an_empty_output(target):
    for key, start in (("r00", 0), ("r01", 50)):
        dest = fenced(target.open(key))
        dest.start(None)
        dest.write(0, table(start, 6))
        dest.publish(1)
    kept = target.fingerprint("r01")

    empty = fenced(target.open("r00"))
    empty.start(None)
    empty.publish(0)  # the partition has no rows now
    assert empty.count() == 0
    assert target.rows("r00") == []
    assert target.fingerprint("r01") == kept
    assert_same_rows(rows(table(50, 6)), target.all_rows())

    # a partition that never had rows: an empty output too (count 0, not "no output")
    never = fenced(target.open("r02"))
    never.start(None)
    never.publish(0)
    assert never.count() == 0 and target.rows("r02") == []
    if target.kind == "s3":
        import json

        manifest = json.loads(target.s3.get_object(Bucket=target.bucket, Key=f"raw/orders/r02/{MANIFEST}")["Body"].read())
        assert manifest["parts"] == [] and manifest["partition"] == "r02"
    else:
        assert [p.name for p in (target.tmp / "lake" / "orders" / "r02").iterdir()] == ["_conduit_generation"]


def test_a_partitions_clean_up_removes_only_its_own_leftovers(target):
    """Runs that died before their first checkpoint leave generations behind: the next run of that partition removes
    its own, never another partition's, nor the staged output of the pipeline's unpartitioned layout."""
    for key in ("r00", "r01"):
        dead = target.open(key)
        dead.start(None)
        dead.write(0, table(0, 3))
    other = target.open(None, pipeline="orders_2")  # another pipeline whose name begins the same
    other.start(None)
    other.write(0, table(0, 3))
    before = target.staged()

    run = fenced(target.open("r00"))
    run.start(None)
    run.write(0, table(10, 2))
    run.publish(1)
    after = target.staged()
    gone = sorted(set(before) - set(after))
    assert gone and all(("orders/r00." if target.kind == "local" else "_conduit_staging/orders.r00/") in g for g in gone)
    assert [s for s in before if "r01" in s or "orders_2" in s] == [s for s in after if "r01" in s or "orders_2" in s]
    assert_same_rows(rows(table(10, 2)), target.rows("r00"))


def test_partitioned_and_unpartitioned_outputs_are_not_mixed(target):
    whole = fenced(target.open(None))
    whole.start(None)
    whole.write(0, table(0, 5))
    whole.publish(1)
    with pytest.raises(DestinationError, match="holds the output of an unpartitioned run of 'orders'") as info:
        target.open("r00").start(None)
    assert "Nothing was changed" in str(info.value)
    if target.kind == "local":  # the unpartitioned output is intact, and no partition folder appeared next to it
        assert_same_rows(rows(table(0, 5)), output_rows(target.tmp / "lake" / "orders"))
        assert [p.name for p in (target.tmp / "lake" / "orders").iterdir() if p.is_dir()] == []
    else:
        assert_same_rows(rows(table(0, 5)), s3_output_rows(target.s3, target.bucket, "raw/orders/"))

    other = Target(target.kind, _other_place(target), target.tmp / "other", target.s3, target.bucket)
    if target.kind == "local":
        other.tmp.mkdir()
    p = fenced(other.open("r00"))
    p.start(None)
    p.write(0, table(0, 5))
    p.publish(1)
    with pytest.raises(DestinationError, match=r"holds the partitions of a partitioned run of 'orders' \(r00\)"):
        other.open(None).start(None)
    assert_same_rows(rows(table(0, 5)), other.rows("r00"))


def _other_place(target: Target) -> Any:
    if target.kind == "local":
        return LocalDestinationSpec(name="lake", path=target.tmp / "other" / "lake")
    return S3DestinationSpec(name="lake", bucket=target.bucket, prefix="other/raw", s3=target.spec.s3)


# --- end to end: a partitioned pipeline run by run_pipeline from SQLite ------------------------------------------


def _shop(path: Path, ids: list[int]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER, name TEXT)")
    conn.execute("DELETE FROM orders")
    conn.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"row {i}") for i in ids])
    conn.commit()
    conn.close()


def _ingest(target: Target, ranges: int = 3) -> str:
    if target.kind == "local":
        dest = f"type: local\n    path: {target.tmp / 'lake'}"
    else:
        dest = f"type: s3\n    bucket: {target.bucket}\n    prefix: raw\n    endpoint_url: {target.spec.s3.endpoint_url}"
    return f"""
sources:
  - name: shop
    type: sqlite
    path: shop.db
    resume: true
    checkpoint_column: id
destinations:
  - name: lake
    {dest}
resources:
  - name: orders
    source: shop
    destination: lake
    batch_size: 25
    query: SELECT id, name FROM orders
    partitions:
      column: id
      ranges: {ranges}
"""


def test_a_partitioned_pipeline_end_to_end(target):
    _shop(target.tmp / "shop.db", list(range(1, 301)))
    (target.tmp / "ingest.yml").write_text(_ingest(target))
    resource = load_spec_text(_ingest(target), target.tmp / "ingest.yml").resource("orders")
    store = LocalCheckpointStore(target.tmp / ".checkpoints")

    def partition(key: str) -> Partition:
        return resolve_partition(resource, key, store, lambda: open_source(resource.source))

    keys = ["r00", "r01", "r02"]
    parts = {key: partition(key) for key in keys}
    finished: dict[str, RunFinished] = {}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            events = list(run_pipeline(resource, store, run_id=f"run-{key}", partition=parts[key]))
            assert isinstance(events[-1], RunFinished)
            finished[key] = events[-1]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = [(i, f"row {i}") for i in range(1, 301)]
    assert_same_rows(expected, target.all_rows())
    assert sum(f.records_processed for f in finished.values()) == 300
    for key in keys:
        lo, hi = parts[key].lo, parts[key].hi
        want = [r for r in expected if (lo is None or r[0] >= lo) and (hi is None or r[0] < hi)]
        assert_same_rows(want, target.rows(key))
        assert finished[key].destination.rstrip("/") == target.where(key).rstrip("/")
    assert store.list() == []

    # the source changes inside r01 only; r01 is rematerialized: the whole output is the source again, r00/r02 as were
    lo, hi = parts["r01"].lo, parts["r01"].hi
    now = [i for i in range(1, 301) if not (lo <= i < hi and i % 2)] + [lo, lo]  # r01 loses its odd ids, lo twice more
    _shop(target.tmp / "shop.db", now)
    kept = {key: target.fingerprint(key) for key in ("r00", "r02")}
    list(run_pipeline(resource, store, run_id="run-r01-again", partition=parts["r01"]))
    assert_same_rows([(i, f"row {i}") for i in now], target.all_rows())
    assert {key: target.fingerprint(key) for key in kept} == kept

    # r01's source is emptied: r01 publishes an empty output
    _shop(target.tmp / "shop.db", [i for i in now if not lo <= i < hi])
    events = list(run_pipeline(resource, store, run_id="run-r01-empty", partition=parts["r01"]))
    assert events[-1].records_processed == 0
    assert target.rows("r01") == []
    assert open_destination(resource.destination, "orders", partition=parts["r01"]).count() == 0
    assert_same_rows([(i, f"row {i}") for i in now if not lo <= i < hi], target.all_rows())


def test_clearing_a_partitions_checkpoint_names_its_leftover(target):
    _shop(target.tmp / "shop.db", list(range(1, 301)))
    (target.tmp / "ingest.yml").write_text(_ingest(target, ranges=2))
    resource = load_spec_text(_ingest(target, ranges=2), target.tmp / "ingest.yml").resource("orders")
    store = LocalCheckpointStore(target.tmp / ".checkpoints")
    r01 = resolve_partition(resource, "r01", store, lambda: open_source(resource.source))
    run = run_pipeline(resource, store, run_id="run-a", partition=r01)
    for event in run:  # stop after two committed batches, as a crash would
        if getattr(event, "index", None) == 1:
            break
    run.close()
    assert store.list() == ["orders.r01"]
    checkpoint = store.load("orders.r01")
    assert checkpoint is not None and checkpoint.batches_committed >= 2
    generation, committed = checkpoint.destination["generation"], checkpoint.batches_committed

    cleared = subprocess.run(
        [CONDUIT, "checkpoints", "clear", "--pipeline", "orders", "--partition", "r01"],
        cwd=target.tmp,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared orders partition r01" in cleared.stdout
    if target.kind == "local":
        staged = target.tmp / "lake" / "_conduit_staging" / "orders" / f"r01.{generation}"
        assert f"its unfinished output stays in {staged} until partition r01 runs again" in cleared.stdout
        assert f"rm -rf {staged}" in cleared.stdout
        assert len(list(staged.glob("part-*.parquet"))) == committed
    else:
        staged_key = f"raw/_conduit_staging/orders.r01/{generation}/"
        assert f"aws s3 rm --recursive s3://{target.bucket}/{staged_key}" in cleared.stdout
        assert len(s3_keys(target.s3, target.bucket, staged_key)) == committed
    assert store.list() == []

    # the partition's next run loads it in full and removes the leftover
    events = list(run_pipeline(resource, store, run_id="run-b", partition=r01))
    assert not events[0].resumed
    want = [(i, f"row {i}") for i in range(1, 301) if i >= r01.lo]
    assert_same_rows(want, target.rows("r01"))
    assert target.staged() == (["orders"] if target.kind == "local" else [])


def test_leftover_is_not_reported_for_an_unpartitioned_checkpoint_nor_another_backends(target):
    from conduit_dagster.engine.backends import destination_backend
    from conduit_dagster.engine.runner import destination_identity

    resource = load_spec_text(_ingest(target), target.tmp / "ingest.yml").resource("orders")
    backend = destination_backend(resource.destination)
    identity = destination_identity(resource)
    state = {"generation": "ab" * 16}
    assert backend.leftover(identity, state, "orders") is None  # its next run removes it, as before partitions
    assert backend.leftover("postgresql://h/db/public.orders?mode=replace", state, "orders.r00") is None
    assert backend.leftover(identity, {"generation": "../x"}, "orders.r00") is None
    assert backend.leftover(identity, state, "orders.r00")
