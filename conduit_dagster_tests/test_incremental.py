"""Incremental loads with :last_value: only new rows each run, state advanced once at the end, exact
through crashes, and rows equal to the stored value neither lost nor loaded twice."""

import sqlite3
from collections import Counter

import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.spec import load_spec
from conduit_dagster_tests.conftest import write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows
from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped

INGEST = """
sources:
  - name: lite
    type: sqlite
    path: events.db
destinations:
  - name: out
    type: local
    path: out
resources:
  - name: events
    source: lite
    destination: out
    batch_size: 7
    incremental_column: ts
    initial_value: "2025-01-01 00:00:00"
    query: SELECT id, ts, note FROM events WHERE ts >= :last_value  -- >= so that late rows at the boundary count
"""


def add(db, rows):
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER, ts TEXT, note TEXT)")
    conn.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()


def all_rows(db):
    conn = sqlite3.connect(db)
    rows = list(conn.execute("SELECT id, ts, note FROM events"))
    conn.close()
    return rows


def ts(i: int) -> str:
    return f"2025-01-01 00:{i // 60:02d}:{i % 60:02d}"


def rows_between(a: int, b: int, every: int = 3):
    # every `every` rows share a timestamp: ties cross batch boundaries
    return [(i, ts(i // every), f"n{i}") for i in range(a, b)]


def run(resource, store, **kw):
    return list(run_pipeline(resource, store, run_id="r", **kw))


def test_incremental_loads_only_new_rows_including_late_rows_at_the_boundary(tmp_path):
    db = tmp_path / "events.db"
    add(db, rows_between(0, 40))
    res = load_spec(write_ingest(tmp_path, INGEST)).resource("events")
    store = MemoryCheckpointStore()
    first = run(res, store)[-1]
    assert isinstance(first, RunFinished) and first.rows_this_run == 40
    state = store.load_state("events")
    assert state is not None and state.last_value == ts(39 // 3) and len(state.boundary) == 1  # row 39 alone at 00:00:13
    # late rows: two with the stored value (same ts as the last loaded one), and newer ones
    add(db, [(100, ts(13), "late, same ts"), (101, ts(13), "late, same ts too")] + rows_between(42, 60))
    second = run(res, store)[-1]
    assert second.rows_this_run == 2 + 18
    assert_same_rows(all_rows(db), output_rows(tmp_path / "out" / "events"))
    third = run(res, store)[-1]
    assert third.rows_this_run == 0, "nothing new: nothing loaded, the state stays"
    from conduit_dagster.engine.checkpoint import LocalCheckpointStore

    local = LocalCheckpointStore(tmp_path / ".checkpoints")
    local.save_state(store.load_state("events"))
    import subprocess
    import sys
    from pathlib import Path

    conduit = str(Path(sys.executable).with_name("conduit"))
    listed = subprocess.run([conduit, "checkpoints"], cwd=tmp_path, capture_output=True, text=True)
    assert "events (incremental state)" in listed.stdout and ts(59 // 3) in listed.stdout
    cleared = subprocess.run([conduit, "clear-checkpoints", "--state"], cwd=tmp_path, capture_output=True, text=True)
    assert "cleared the incremental state of events" in cleared.stdout and local.load_state("events") is None
    assert Counter(output_rows(tmp_path / "out" / "events")) == Counter(all_rows(db))
    assert store.docs == {}


def test_incremental_crash_at_every_step_is_exact_and_advances_once(tmp_path):
    db = tmp_path / "events.db"
    add(db, rows_between(0, 30))
    res = load_spec(write_ingest(tmp_path, INGEST)).resource("events")
    store = MemoryCheckpointStore()
    run(res, store)  # the first load
    add(db, [(200, ts(9), "late at the boundary")] + rows_between(30, 75))
    step = 1
    base_state = store.states.copy()
    while True:
        out_before = sorted((tmp_path / "out" / "events").glob("part-*"))
        store.states = base_state.copy()
        trip = Tripwire(step)
        dest = Wrapped(open_destination(res.destination, "events", accumulate=True), trip, {"write", "publish"})
        try:
            run(res, Wrapped(store, trip, {"save", "delete", "save_state"}), destination=dest)
        except Crash as crash:
            if "delete (after)" not in str(crash):
                run(res, store)
            assert_same_rows(all_rows(db), output_rows(tmp_path / "out" / "events"))
            assert run(res, store)[-1].rows_this_run == 0, "the state advanced to the end"
            # undo this attempt's output to try the next crash point from the same start
            for part in sorted((tmp_path / "out" / "events").glob("part-*")):
                if part not in out_before:
                    part.unlink()
            step += 1
            continue
        assert step > 2 * (46 // 7)
        break


def test_incremental_spec_errors(tmp_path):
    bad = INGEST.replace("WHERE ts >= :last_value", "WHERE ts >= '2025'")
    with pytest.raises(SpecError, match="needs both `incremental_column:` and `:last_value`"):
        load_spec(write_ingest(tmp_path, bad))
    bad = INGEST.replace('    initial_value: "2025-01-01 00:00:00"\n', "")
    with pytest.raises(SpecError, match="needs `initial_value:`"):
        load_spec(write_ingest(tmp_path, bad))
    bad = INGEST.replace("    incremental_column: ts\n", "    incremental_column: ts\n    checkpoint_column: id\n")
    with pytest.raises(SpecError, match="checkpoints on its incremental_column 'ts'"):
        load_spec(write_ingest(tmp_path, bad))
    bad = INGEST.replace("    type: local\n    path: out", "    type: postgresql\n    database: test")
    with pytest.raises(SpecError, match="replaces its table on every run"):
        load_spec(write_ingest(tmp_path, bad))


def test_incremental_postgres_to_postgres_append(tmp_path, pg, pg_schema):
    from conduit_dagster_tests.helpers import pg_rows

    dsn = "host=127.0.0.1 dbname=test user=postgres"
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.ev (id int, at timestamptz, note text)")
        cur.execute(
            f"INSERT INTO {pg_schema}.ev SELECT g, timestamptz '2025-01-01 00:00:00+00' + (g / 4) * interval '1 minute', "
            "'n' || g FROM generate_series(1, 200) g"
        )
    text = f"""
sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}
destinations:
  - name: wh
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}_out
    mode: append
resources:
  - name: ev
    source: pg
    destination: wh
    batch_size: 30
    incremental_column: at
    initial_value: 2024-01-01T00:00:00+00:00
    query: SELECT id, at, note FROM ev WHERE at >= :last_value AND note NOT LIKE '%skip%'
"""
    res = load_spec(write_ingest(tmp_path, text)).resource("ev")
    store = MemoryCheckpointStore()
    try:
        assert run(res, store)[-1].rows_this_run == 200
        with pg.cursor() as cur:  # a late row at the stored value, and newer rows
            cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (999, timestamptz '2025-01-01 00:50:00+00', 'late')")
            cur.execute(
                f"INSERT INTO {pg_schema}.ev SELECT g, timestamptz '2025-01-01 01:00:00+00' + g * interval '1 second', "
                "'new' FROM generate_series(201, 260) g"
            )
        crash_at = Tripwire(7)  # saves: initial 1-2, batch 0 3-4, batch 1 5-6; 7: batch 2 committed, not checkpointed
        with pytest.raises(Crash):
            run(res, Wrapped(store, crash_at, {"save"}))
        run(res, store)
        want = pg_rows(dsn, f"SELECT id, at, note FROM {pg_schema}.ev")
        got = pg_rows(dsn, f"SELECT id, at, note FROM {pg_schema}_out.ev")
        assert_same_rows(want, got)
        assert run(res, store)[-1].rows_this_run == 0
    finally:
        with pg.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {pg_schema}_out CASCADE")


def simple(tmp_path, query="SELECT id, ts, note FROM events WHERE ts >= :last_value", extra=""):
    text = INGEST.replace(
        "    query: SELECT id, ts, note FROM events WHERE ts >= :last_value  -- >= so that late rows at the boundary count",
        f"    query: {query}{extra}",
    )
    return load_spec(write_ingest(tmp_path, text)).resource("events")


def test_incremental_identical_rows_at_the_boundary_are_each_loaded(tmp_path):
    db = tmp_path / "events.db"
    add(db, [(1, ts(5), "x")])
    res = simple(tmp_path)
    store = MemoryCheckpointStore()
    run(res, store)
    add(db, [(1, ts(5), "x")])  # an exact copy, at the stored value: a log table without a key
    assert run(res, store)[-1].rows_this_run == 1
    assert_same_rows(all_rows(db), output_rows(tmp_path / "out" / "events"))
    assert run(res, store)[-1].rows_this_run == 0


def test_incremental_key_makes_volatile_columns_safe(tmp_path):
    db = tmp_path / "events.db"
    add(db, [(1, ts(1), "a"), (2, ts(2), "b")])
    res = simple(tmp_path, "SELECT id, ts, random() AS r FROM events WHERE ts >= :last_value", "\n    incremental_key: [id]")
    store = MemoryCheckpointStore()
    for _ in range(3):
        run(res, store)
    assert sorted(r[0] for r in output_rows(tmp_path / "out" / "events")) == [1, 2]


def test_incremental_crash_after_an_empty_publish_resumes_by_itself(tmp_path):
    db = tmp_path / "events.db"
    add(db, rows_between(0, 10))
    res = simple(tmp_path)
    store = MemoryCheckpointStore()
    run(res, store)
    trip = Tripwire(1)  # the checkpoint delete of a run with nothing new
    with pytest.raises(Crash):
        run(res, Wrapped(store, trip, {"delete"}))
    assert "events" in store.docs
    run(res, store)
    assert store.docs == {} and run(res, store)[-1].rows_this_run == 0
    assert_same_rows(all_rows(db), output_rows(tmp_path / "out" / "events"))


def test_incremental_state_of_another_query_is_refused(tmp_path):
    from conduit_dagster.engine.errors import CheckpointError

    db = tmp_path / "events.db"
    add(db, rows_between(0, 10))
    store = MemoryCheckpointStore()
    run(simple(tmp_path), store)
    other = simple(tmp_path, "SELECT id, ts, note FROM events WHERE ts >= :last_value AND id > 0")
    with pytest.raises(CheckpointError, match="incremental state was stored for another query.*--state"):
        run(other, store)


def test_incremental_text_column_with_a_linguistic_collation(tmp_path, pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f'CREATE TABLE {pg_schema}.txt (id int, k text COLLATE "en-US-x-icu")')
        cur.execute(f"INSERT INTO {pg_schema}.txt VALUES (1, 'B'), (2, 'a')")
    text = f"""
sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}
destinations:
  - name: out
    type: local
    path: out
resources:
  - name: txt
    source: pg
    destination: out
    incremental_column: k
    initial_value: ""
    query: SELECT id, k FROM txt WHERE k >= :last_value
"""
    res = load_spec(write_ingest(tmp_path, text)).resource("txt")
    store = MemoryCheckpointStore()
    run(res, store)
    assert run(res, store)[-1].rows_this_run == 0
    with pg.cursor() as cur:
        cur.execute(f"INSERT INTO {pg_schema}.txt VALUES (3, 'b'), (4, 'A')")
    run(res, store)
    assert sorted(r[0] for r in output_rows(tmp_path / "out" / "txt")) == [1, 2, 3]  # 'A' sorts before 'a' in "C"


def test_incremental_row_count_check_compares_the_loaded_range(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from conduit_dagster.definitions import build_definitions

    monkeypatch.delenv("CONDUIT_CHECKPOINT_DIR", raising=False)
    db = tmp_path / "events.db"
    add(db, rows_between(0, 30))
    defs = build_definitions(write_ingest(tmp_path, INGEST))
    job = defs.resolve_job_def("ingest_events")

    def evaluation(result):
        (found,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        return found

    with DagsterInstance.ephemeral() as instance:
        first = evaluation(job.execute_in_process(instance=instance))
        assert first.passed and first.metadata["conduit/source_rows"].value == 30
        add(db, rows_between(30, 45))  # new rows after the run: not in the loaded range, not a failure
        add(db, [(999, ts(9), "late")])
        second = evaluation(job.execute_in_process(instance=instance))
        assert second.passed and second.metadata["conduit/destination_rows"].value == 46
        next(iter(sorted((tmp_path / "out" / "events").glob("part-*")))).unlink()  # lose a part
        third = evaluation(job.execute_in_process(instance=instance))
        assert not third.passed
        assert third.metadata["conduit/source_rows"].value > third.metadata["conduit/destination_rows"].value
