"""The local checkpoint directory and output folder may be shared: a symlink planted in them must never make a run
truncate, overwrite, delete or publish anything outside them. And an incremental run whose staged batches vanished
before they were published refuses, instead of advancing its state past rows that are nowhere."""

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.errors import CheckpointError, ConduitError, DestinationError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, run_pipeline
from conduit_dagster.engine.spec import load_spec
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

CONDUIT = str(Path(sys.executable).with_name("conduit"))
EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}
ROWS = 50  # 5 batches of 10

INGEST = """
sources:
  - name: shop
    type: sqlite
    path: shop.db
destinations:
  - name: lake
    type: local
    path: lake
    format: {fmt}
resources:
  - name: orders
    source: shop
    destination: lake
    batch_size: 10
    resume: true
    checkpoint_column: id
    query: SELECT id, note FROM orders
  - name: events
    source: shop
    destination: lake
    batch_size: 10
    incremental_column: id
    initial_value: 0
    query: SELECT id, note FROM orders WHERE id > :last_value
"""

VICTIM_FILE = b"password_hash=not-yours\n"


def setup(tmp_path: Path, fmt: str = "parquet"):
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER, note TEXT)")
    conn.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"n{i}") for i in range(1, ROWS + 1)])
    conn.commit()
    conn.close()
    spec = load_spec(write_ingest(tmp_path, INGEST.format(fmt=fmt)))
    # someone else's file and folder, beside the shared folders
    (tmp_path / "victim.conf").write_bytes(VICTIM_FILE)
    victim = tmp_path / "victim"
    (victim / "orders.stale").mkdir(parents=True)
    (victim / "orders.stale" / "notes.txt").write_bytes(b"keep me\n")
    (victim / "orders.keep").write_bytes(b"keep me too\n")
    (victim / f"part-000004.{EXT[fmt]}").write_bytes(b"not a part conduit wrote\n")
    return spec, LocalCheckpointStore(tmp_path / ".checkpoints")


def snapshot(tmp_path: Path) -> dict[str, bytes | None]:
    """Every victim entry and its bytes (None for a folder)."""
    found: dict[str, bytes | None] = {"victim.conf": (tmp_path / "victim.conf").read_bytes()}
    for path in sorted((tmp_path / "victim").rglob("*")):
        found[str(path.relative_to(tmp_path))] = None if path.is_dir() else path.read_bytes()
    return found


def source_rows() -> list[tuple[int, str]]:
    return [(i, f"n{i}") for i in range(1, ROWS + 1)]


def run(resource, store):
    return list(run_pipeline(resource, store, run_id="r"))


def stop_after(resource, store, batches: int) -> None:
    """Run until ``batches`` batches are committed (written and checkpointed), then stop as a crash would."""
    events = run_pipeline(resource, store, run_id="stopped")
    for event in events:
        if isinstance(event, BatchCommitted) and event.index == batches - 1:
            break
    events.close()


def generation_dir(tmp_path: Path, pipeline: str) -> Path:
    (gen,) = (tmp_path / "lake" / "_conduit_staging").glob(f"{pipeline}.*")
    return gen


def refused(tmp_path, before, excinfo, path: Path) -> None:
    message = str(excinfo.value)
    assert f"{path} is a symlink; conduit does not follow links in its checkpoint/output folders; remove it" in message
    assert snapshot(tmp_path) == before, "the victim changed"


# --- links in the checkpoint directory -------------------------------------------------------------------------


def test_lock_file_link_is_refused_and_its_target_untouched(tmp_path):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / ".checkpoints").mkdir()
    lock = tmp_path / ".checkpoints" / ".orders.lock"
    lock.symlink_to(tmp_path / "victim.conf")
    with pytest.raises(CheckpointError) as excinfo:
        run(spec.resource("orders"), store)
    refused(tmp_path, before, excinfo, lock)
    assert not (tmp_path / "lake" / "orders").exists()
    lock.unlink()  # what the message says to do
    run(spec.resource("orders"), store)
    assert_same_rows(source_rows(), output_rows(tmp_path / "lake" / "orders"))


def test_lock_file_hard_link_is_refused(tmp_path):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / ".checkpoints").mkdir()
    lock = tmp_path / ".checkpoints" / ".orders.lock"
    os.link(tmp_path / "victim.conf", lock)
    with pytest.raises(CheckpointError, match=f"{lock} has another hard link"):
        run(spec.resource("orders"), store)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_checkpoint_file_link_is_refused(tmp_path, dangling):
    spec, store = setup(tmp_path)
    stop_after(spec.resource("orders"), store, 2)
    before = snapshot(tmp_path)
    checkpoint = tmp_path / ".checkpoints" / "orders.json"
    checkpoint.unlink()
    checkpoint.symlink_to(tmp_path / ("nowhere.json" if dangling else "victim.conf"))
    with pytest.raises(CheckpointError) as excinfo:
        run(spec.resource("orders"), store)
    refused(tmp_path, before, excinfo, checkpoint)
    assert checkpoint.is_symlink() and not (tmp_path / "nowhere.json").exists()


def test_state_file_link_is_refused(tmp_path):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / ".checkpoints").mkdir()
    state = tmp_path / ".checkpoints" / "events.state.json"
    state.symlink_to(tmp_path / "victim.conf")
    with pytest.raises(CheckpointError) as excinfo:
        run(spec.resource("events"), store)
    refused(tmp_path, before, excinfo, state)


def test_state_file_replaced_by_a_link_mid_run_is_not_written_through(tmp_path):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    state = tmp_path / ".checkpoints" / "events.state.json"
    events = run_pipeline(spec.resource("events"), store, run_id="r")
    with pytest.raises(CheckpointError) as excinfo:
        for event in events:
            if isinstance(event, BatchCommitted) and event.index == 4:
                state.symlink_to(tmp_path / "victim.conf")  # planted before the run saves its state
    refused(tmp_path, before, excinfo, state)


def test_checkpoint_store_writes_no_file_through_a_link(tmp_path):
    """Each file the store writes: the link is refused, nothing is written through it, the message names it."""
    spec, store = setup(tmp_path)
    stop_after(spec.resource("orders"), store, 1)
    checkpoint = store.load("orders")
    assert checkpoint is not None
    before = snapshot(tmp_path)
    target = tmp_path / ".checkpoints" / "orders.json"
    target.unlink()
    target.symlink_to(tmp_path / "victim.conf")
    with pytest.raises(CheckpointError) as excinfo:
        store.save(checkpoint)
    refused(tmp_path, before, excinfo, target)
    store.delete("orders")  # deleting removes the link itself, never what it points to
    assert not os.path.lexists(target) and snapshot(tmp_path) == before


# --- links in the output folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_staging_folder_link_is_refused_and_nothing_deleted_through_it(tmp_path, fmt):
    spec, store = setup(tmp_path, fmt)
    before = snapshot(tmp_path)
    (tmp_path / "lake").mkdir()
    staging = tmp_path / "lake" / "_conduit_staging"
    staging.symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(DestinationError) as excinfo:
        run(spec.resource("orders"), store)
    refused(tmp_path, before, excinfo, staging)


@pytest.mark.parametrize("pipeline", ["orders", "events"])
def test_stale_generation_link_in_staging_is_refused(tmp_path, pipeline):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    stale = tmp_path / "lake" / "_conduit_staging" / f"{pipeline}.0123456789abcdef"
    stale.parent.mkdir(parents=True)
    stale.symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(DestinationError) as excinfo:
        run(spec.resource(pipeline), store)
    refused(tmp_path, before, excinfo, stale)


@pytest.mark.parametrize("pipeline", ["orders", "events"])
def test_generation_folder_swapped_for_a_link_is_refused(tmp_path, pipeline):
    """A resumed run would drop the uncommitted parts in the folder, write into it and publish it."""
    spec, store = setup(tmp_path)
    stop_after(spec.resource(pipeline), store, 2)
    gen = generation_dir(tmp_path, pipeline)
    # the link leads to a folder that looks like the generation (its marker copied), holding someone's files
    shutil.copy(gen / "_conduit_generation", tmp_path / "victim" / "_conduit_generation")
    before = snapshot(tmp_path)
    shutil.rmtree(gen)
    gen.symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(ConduitError) as excinfo:
        run(spec.resource(pipeline), store)
    refused(tmp_path, before, excinfo, gen)
    assert not (tmp_path / "lake" / pipeline).exists()


@pytest.mark.parametrize("pipeline", ["orders", "events"])
def test_output_folder_link_is_refused(tmp_path, pipeline):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / "lake").mkdir()
    visible = tmp_path / "lake" / pipeline
    visible.symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(DestinationError) as excinfo:
        run(spec.resource(pipeline), store)
    refused(tmp_path, before, excinfo, visible)
    assert visible.is_symlink()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_part_temp_file_link_planted_mid_run_is_not_written_through(tmp_path, fmt):
    spec, store = setup(tmp_path, fmt)
    before = snapshot(tmp_path)
    events = run_pipeline(spec.resource("orders"), store, run_id="r")
    with pytest.raises(DestinationError) as excinfo:
        for event in events:
            if isinstance(event, BatchCommitted) and event.index == 0:  # batch 1 is not submitted yet
                tmp = generation_dir(tmp_path, "orders") / f".part-000002.{EXT[fmt]}.tmp"
                tmp.symlink_to(tmp_path / "victim.conf")
    refused(tmp_path, before, excinfo, tmp)
    assert store.load("orders").batches_committed == 2, "the run stopped at the refused part, resumable"


@pytest.mark.parametrize("pipeline", ["orders", "events"])
def test_committed_part_swapped_for_a_link_is_never_published(tmp_path, pipeline):
    spec, store = setup(tmp_path)
    stop_after(spec.resource(pipeline), store, 2)
    before = snapshot(tmp_path)
    part = generation_dir(tmp_path, pipeline) / "part-000001.parquet"
    part.unlink()
    part.symlink_to(tmp_path / "victim.conf")
    with pytest.raises(DestinationError) as excinfo:
        run(spec.resource(pipeline), store)
    refused(tmp_path, before, excinfo, part)
    visible = tmp_path / "lake" / pipeline
    assert not visible.exists() or not [p for p in visible.iterdir() if p.is_symlink()]


@pytest.mark.parametrize("pipeline", ["orders", "events"])
def test_part_swapped_for_a_link_before_publish_is_never_published(tmp_path, pipeline):
    spec, store = setup(tmp_path)
    before = snapshot(tmp_path)
    events = run_pipeline(spec.resource(pipeline), store, run_id="r")
    with pytest.raises(DestinationError) as excinfo:
        for event in events:
            if isinstance(event, BatchCommitted) and event.index == 4:  # the last: publish comes next
                part = generation_dir(tmp_path, pipeline) / "part-000000.parquet"
                part.unlink()
                part.symlink_to(tmp_path / "victim.conf")
    refused(tmp_path, before, excinfo, part)
    visible = tmp_path / "lake" / pipeline
    assert not visible.exists() or not [p for p in visible.iterdir() if p.is_symlink()]


# --- an incremental run whose staged batches vanished --------------------------------------------------------


def clear(tmp_path: Path, pipeline: str) -> None:
    done = subprocess.run(
        [CONDUIT, "clear-checkpoints", "--pipeline-name", pipeline], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_incremental_rerun_refuses_when_its_unpublished_batches_were_deleted(tmp_path):
    spec, store = setup(tmp_path)
    res = spec.resource("events")
    stop_after(res, store, 3)
    gen = generation_dir(tmp_path, "events")
    shutil.rmtree(gen)  # someone cleans up "_" folders: 30 committed rows go with it
    with pytest.raises(CheckpointError) as excinfo:
        run(res, store)
    message = str(excinfo.value)
    assert f"unfinished output {gen} is missing" in message and "only 0 of its 3 committed parts" in message
    assert "conduit clear-checkpoints --pipeline-name events" in message
    assert store.load_state("events") is None, "the incremental state did not advance past the lost rows"
    assert store.load("events").batches_committed == 3, "the checkpoint is kept"
    clear(tmp_path, "events")  # the way out the message gives: the rows are read again from the stored state
    finished = run(res, store)[-1]
    assert isinstance(finished, RunFinished) and finished.rows_this_run == ROWS
    assert_same_rows(source_rows(), output_rows(tmp_path / "lake" / "events"))
    assert run(res, store)[-1].rows_this_run == 0


def test_incremental_rerun_refuses_when_a_half_published_generation_lost_its_folder(tmp_path):
    spec, store = setup(tmp_path)
    res = spec.resource("events")
    run(res, store)  # a first load: rows 1..50
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"n{i}") for i in range(ROWS + 1, ROWS + 41)])
    conn.commit()
    conn.close()
    stop_after(res, store, 4)
    gen = generation_dir(tmp_path, "events")
    visible = tmp_path / "lake" / "events"
    generation = gen.name.split(".")[1]
    for name in ("part-000000.parquet", "part-000001.parquet"):  # as a publish moves them, one by one
        os.rename(gen / name, visible / f"part-{generation[:12]}-{name.removeprefix('part-')}")
    shutil.rmtree(gen)
    with pytest.raises(CheckpointError) as excinfo:
        run(res, store)
    message = str(excinfo.value)
    assert "only 2 of its 4 committed parts" in message
    assert f"delete the 2 parts {visible}/part-{generation[:12]}-* that did arrive" in message
    assert store.load_state("events").last_value == ROWS, "the state did not advance"
    for part in visible.glob(f"part-{generation[:12]}-*"):
        part.unlink()
    clear(tmp_path, "events")
    run(res, store)
    assert_same_rows([(i, f"n{i}") for i in range(1, ROWS + 41)], output_rows(visible))


def test_incremental_generation_published_before_a_crash_is_not_loaded_again(tmp_path):
    """The other side of the check: the folder went because its parts were all published."""
    spec, store = setup(tmp_path)
    res = spec.resource("events")
    events = run_pipeline(res, store, run_id="r")
    for event in events:
        if isinstance(event, BatchCommitted) and event.index == 4:
            break
    events.close()
    gen = generation_dir(tmp_path, "events")
    visible = tmp_path / "lake" / "events"
    visible.mkdir()
    (visible / "_conduit_generation").write_text("accumulating output\n")
    generation = gen.name.split(".")[1]
    for part in sorted(gen.glob("part-*")):  # what publish does before the crash
        os.rename(part, visible / f"part-{generation[:12]}-{part.name.removeprefix('part-')}")
    shutil.rmtree(gen)
    finished = run(res, store)[-1]
    assert isinstance(finished, RunFinished) and finished.rows_this_run == 0
    assert store.load_state("events").last_value == ROWS and store.load("events") is None
    assert_same_rows(source_rows(), output_rows(visible))


def test_non_incremental_rerun_refuses_when_its_unpublished_batches_were_deleted(tmp_path):
    spec, store = setup(tmp_path)
    stop_after(spec.resource("orders"), store, 3)
    gen = generation_dir(tmp_path, "orders")
    shutil.rmtree(gen)
    with pytest.raises(CheckpointError, match=f"unfinished output {gen} is missing"):
        run(spec.resource("orders"), store)


def test_incremental_output_folder_made_empty_by_someone_gets_a_marker(tmp_path):
    """An empty output folder (made by hand, or by a publish that crashed before writing the marker) is adopted,
    and marked: otherwise the next run finds parts without a marker and refuses them as someone else's."""
    spec, store = setup(tmp_path)
    res = spec.resource("events")
    (tmp_path / "lake" / "events").mkdir(parents=True)
    run(res, store)
    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("INSERT INTO orders VALUES (51, 'n51')")
    conn.commit()
    conn.close()
    assert run(res, store)[-1].rows_this_run == 1
    assert_same_rows([*source_rows(), (51, "n51")], output_rows(tmp_path / "lake" / "events"))


def test_publish_without_an_atomic_swap_replaces_the_output_and_follows_no_link(tmp_path, monkeypatch):
    """Where renameat2 cannot swap (another kernel or file system), publish renames the old output away first."""
    from conduit_dagster.engine.destinations import local

    monkeypatch.setattr(local, "_exchange", lambda *args: False)  # the platform without the swap
    spec, store = setup(tmp_path)
    res = spec.resource("orders")
    run(res, store)
    run(res, store)  # the second publish replaces the first output
    assert_same_rows(source_rows(), output_rows(tmp_path / "lake" / "orders"))
    assert not list((tmp_path / "lake" / "_conduit_staging").iterdir()), "the old output was removed"
    stop_after(res, store, 5)  # every batch committed; publish comes next
    gen = generation_dir(tmp_path, "orders")
    old = gen.parent / f"orders.old{gen.name.split('.')[1]}"
    old.symlink_to(tmp_path / "victim", target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(DestinationError) as excinfo:
        run(res, store)
    refused(tmp_path, before, excinfo, old)
    assert_same_rows(source_rows(), output_rows(tmp_path / "lake" / "orders"))
