"""The MySQL / MariaDB destination against the real server: the three modes end to end, a committed batch rolled
forward after a crash (never written twice), a crash at every step, the atomic replace swap, the table lock, types
from PostgreSQL value by value, the exact LOAD DATA encoding, values that do not fit, and `conduit validate`."""

import datetime as dt
import decimal
import json
import re
import struct
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore, MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.destinations.mysql import MySQLDestinationSpec, column_type, lock_name, staging_name
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, RunStarted, run_pipeline
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster.engine.spec import PostgresSourceSpec, ResourceSpec, Secret, SqliteSourceSpec, load_spec
from conduit_dagster_tests.conftest import MYSQL, mysql_connect, write_ingest
from conduit_dagster_tests.test_runner import Crash, Tripwire, Wrapped, tie_rows

CONDUIT = str(Path(sys.executable).with_name("conduit"))
SCHEMA = pa.schema([("id", pa.int64()), ("k", pa.int64()), ("note", pa.string())])


def dest(db: str, mode: str = "replace", *, table: str = "things", keys: tuple[str, ...] = ("id",)) -> MySQLDestinationSpec:
    password = str(MYSQL["password"])
    return MySQLDestinationSpec(
        name="wh",
        host=str(MYSQL["host"]),
        port=int(MYSQL["port"]),  # type: ignore[call-overload]
        database=db,
        user=str(MYSQL["user"]),
        password=Secret(password) if password else None,
        table=table,
        mode=mode,
        primary_key=keys if mode == "merge" else (),
    )


def memory_resource(
    tmp_path: Path, destination: MySQLDestinationSpec, *, column: str | None = "k", batch: int = 7, name: str = "things"
):
    return ResourceSpec(
        name=name,
        source=SqliteSourceSpec(name="mem", path=tmp_path / "unused.db"),
        destination=destination,
        query="q",
        batch_size=batch,
        resume=column is not None,
        checkpoint_column=column,
    )


def rows_of(db: str, query: str) -> list[tuple[Any, ...]]:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return list(cur.fetchall())
    finally:
        conn.close()


def tables_of(db: str) -> list[str]:
    return sorted(r[0] for r in rows_of(db, "SHOW TABLES"))


def run(res: ResourceSpec, store, source, destination=None) -> list:
    return list(run_pipeline(res, store, run_id=uuid.uuid4().hex, source=source, destination=destination))


# --- the modes end to end, from PostgreSQL -----------------------------------------------------------------------


def pg_fill(pg, schema: str, rows: list[tuple[int, str]]) -> None:
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {schema}.src (id int, note text)")
        cur.executemany(f"INSERT INTO {schema}.src VALUES (%s, %s)", rows)


def pg_resource(schema: str, destination: MySQLDestinationSpec, *, batch: int = 4, query: str = "SELECT id, note FROM src"):
    return ResourceSpec(
        name="things",
        source=PostgresSourceSpec(name="pg", database="test", user="postgres", schema=schema),
        destination=destination,
        query=query,
        batch_size=batch,
        resume=True,
        checkpoint_column="id",
    )


def test_replace_loads_then_replaces_the_whole_table(pg, pg_schema, mysql_db):
    pg_fill(pg, pg_schema, [(i, f"n{i}") for i in range(1, 26)])
    res = pg_resource(pg_schema, dest(mysql_db, "replace"))
    done = run(res, MemoryCheckpointStore(), None)[-1]
    assert isinstance(done, RunFinished) and (done.rows_this_run, done.batches) == (25, 7)
    assert Counter(rows_of(mysql_db, "SELECT id, note FROM things")) == Counter((i, f"n{i}") for i in range(1, 26))
    with pg.cursor() as cur:
        cur.execute(f"DELETE FROM {pg_schema}.src WHERE id > 10")
        cur.execute(f"UPDATE {pg_schema}.src SET note = 'changed' WHERE id = 3")
    run(res, MemoryCheckpointStore(), None)
    want = [(i, "changed" if i == 3 else f"n{i}") for i in range(1, 11)]
    assert Counter(rows_of(mysql_db, "SELECT id, note FROM things")) == Counter(want)
    assert tables_of(mysql_db) == ["_conduit_batches", "things"], "no staging or old table left"
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]
    comment = rows_of(
        mysql_db,
        f"SELECT TABLE_COMMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{mysql_db}' AND TABLE_NAME = 'things'",
    )
    assert comment[0][0].startswith("conduit-dagster pipeline things generation ")


def test_replace_refuses_a_table_it_did_not_create(pg, pg_schema, mysql_db):
    pg_fill(pg, pg_schema, [(1, "a")])
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE things (id INT, note TEXT)")
        cur.execute("INSERT INTO things VALUES (42, 'precious')")
    conn.close()
    with pytest.raises(
        DestinationError, match=rf"table {mysql_db}.things exists and was not created by conduit.*Nothing was changed"
    ):
        run(pg_resource(pg_schema, dest(mysql_db, "replace")), MemoryCheckpointStore(), None)
    assert rows_of(mysql_db, "SELECT id, note FROM things") == [(42, "precious")]


def test_append_adds_every_run_rows(pg, pg_schema, mysql_db):
    pg_fill(pg, pg_schema, [(i, f"n{i}") for i in range(1, 11)])
    res = pg_resource(pg_schema, dest(mysql_db, "append"))
    run(res, MemoryCheckpointStore(), None)
    run(res, MemoryCheckpointStore(), None)
    assert Counter(rows_of(mysql_db, "SELECT id, note FROM things")) == Counter([(i, f"n{i}") for i in range(1, 11)] * 2)


def test_merge_upserts_and_the_last_row_of_a_key_in_a_batch_wins(pg, pg_schema, mysql_db):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.src (seq int, id text, note text)")
        # keys differing only in case and trailing space are distinct keys (utf8mb4_bin); 'a' comes three times
        cur.executemany(
            f"INSERT INTO {pg_schema}.src VALUES (%s, %s, %s)",
            [(1, "a", "first"), (2, "A", "upper"), (3, "a ", "spaced"), (4, "a", "second"), (5, "b", "b1"), (6, "a", "third")],
        )
    res = ResourceSpec(
        **{
            **pg_resource(pg_schema, dest(mysql_db, "merge"), batch=10).__dict__,
            "query": "SELECT seq, id, note FROM src",
            "checkpoint_column": "seq",
        }
    )
    run(res, MemoryCheckpointStore(), None)
    assert sorted(rows_of(mysql_db, "SELECT id, note FROM things")) == [
        ("A", "upper"),
        ("a", "third"),
        ("a ", "spaced"),
        ("b", "b1"),
    ]
    with pg.cursor() as cur:
        cur.execute(f"UPDATE {pg_schema}.src SET note = note || '!' WHERE id = 'b'")
        cur.execute(f"INSERT INTO {pg_schema}.src VALUES (7, 'c', 'new')")
    run(res, MemoryCheckpointStore(), None)
    assert sorted(rows_of(mysql_db, "SELECT id, note FROM things")) == [
        ("A", "upper"),
        ("a", "third"),
        ("a ", "spaced"),
        ("b", "b1!"),
        ("c", "new"),
    ]
    create = rows_of(mysql_db, "SHOW CREATE TABLE things")[0][1]
    assert "`id` varchar(768)" in create and "PRIMARY KEY (`id`)" in create


def test_merge_into_a_table_without_that_key_is_refused(tmp_path, mysql_db):
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE things (id BIGINT, k BIGINT, note TEXT) ENGINE=InnoDB")
    conn.close()
    res = memory_resource(tmp_path, dest(mysql_db, "merge"))
    with pytest.raises(DestinationError, match=r"no PRIMARY KEY or UNIQUE index on exactly \(id\)"):
        run(res, MemoryCheckpointStore(), MemorySource(tie_rows(10), SCHEMA))


def test_append_into_a_non_transactional_table_is_refused(tmp_path, mysql_db):
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE things (id BIGINT, k BIGINT, note TEXT) ENGINE=MyISAM")
    conn.close()
    with pytest.raises(DestinationError, match=r"engine MyISAM; conduit writes only InnoDB tables"):
        run(memory_resource(tmp_path, dest(mysql_db, "append")), MemoryCheckpointStore(), MemorySource(tie_rows(10), SCHEMA))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]


# --- crashes -----------------------------------------------------------------------------------------------------


def crash_after_batch_1_committed(res: ResourceSpec, store, source=None) -> None:
    """Steps: the checkpoint before the first batch (save 1-2), batch 0 (write 3-4, save 5-6), batch 1 (write 7-8);
    step 9 is batch 1's checkpoint save: its rows are committed in MySQL, its checkpoint never written."""
    trip = Tripwire(9)
    inner = open_destination(res.destination, res.name)
    try:
        with pytest.raises(Crash, match="step 9: save"):
            list(
                run_pipeline(
                    res, Wrapped(store, trip, {"save"}), run_id="a", source=source, destination=Wrapped(inner, trip, {"write"})
                )
            )
    finally:
        inner.close()


@pytest.mark.parametrize("mode", ["replace", "append", "merge"])
def test_a_committed_batch_is_rolled_forward_not_replayed(pg, pg_schema, mysql_db, mode):
    """Ids 10..60, batch_size 2; batch 1 (30, 40) committed but not checkpointed; a late transaction commits 25;
    the rerun adopts batch 1 and reads past 40: 40 is not loaded twice, 25 not at all, nothing is lost."""
    pg_fill(pg, pg_schema, [(i, f"n{i}") for i in (10, 20, 30, 40, 50, 60)])
    res = pg_resource(pg_schema, dest(mysql_db, mode), batch=2)
    store = MemoryCheckpointStore()
    crash_after_batch_1_committed(res, store)
    before = store.load("things")
    assert (before.batches_committed, before.last_value, before.records_processed) == (1, 20, 2)
    pg_fill(pg, pg_schema, [(25, "late")])

    events = run_pipeline(res, store, run_id="b")
    started = next(events)
    assert isinstance(started, RunStarted) and started.resumed and started.resumed_from == 40
    adopted = store.load("things")
    assert (adopted.batches_committed, adopted.last_value, adopted.records_processed) == (2, 40, 4)
    rest = list(events)
    assert isinstance(rest[-1], RunFinished) and (rest[-1].records_processed, rest[-1].batches) == (6, 3)
    assert [e.index for e in rest if isinstance(e, BatchCommitted)] == [2]
    assert Counter(rows_of(mysql_db, "SELECT id FROM things")) == Counter([(i,) for i in (10, 20, 30, 40, 50, 60)])
    assert store.docs == {}
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]


def test_incremental_resume_rolls_forward_with_the_committed_batch_boundary(tmp_path, pg, pg_schema, mysql_db):
    """The rolled-forward batch ends on a tie (k = 40 twice): its boundary is what the incremental state keeps, so
    the next run (k >= 40) leaves those two rows out and loads only the new ones."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.ev (id int, k int, note text)")
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (1, 10, 'a'), (2, 20, 'b'), (3, 30, 'c'), (4, 40, 'd'), (5, 40, 'e')")
    text = f"""
sources:
  - name: pg
    type: postgresql
    database: test
    user: postgres
    schema: {pg_schema}
destinations:
  - name: wh
    type: mysql
    host: {MYSQL["host"]}
    port: {MYSQL["port"]}
    database: {mysql_db}
    user: {MYSQL["user"]}
    password: "{MYSQL["password"]}"
    mode: append
resources:
  - name: ev
    source: pg
    destination: wh
    batch_size: 2
    incremental_column: k
    initial_value: 0
    query: SELECT id, k, note FROM ev WHERE k >= :last_value
"""
    res = load_spec(write_ingest(tmp_path, text)).resource("ev")
    store = MemoryCheckpointStore()
    crash_after_batch_1_committed(res, store)  # batch 0: k 10, 20; batch 1: k 30, 40, 40
    assert store.load("ev").last_value == 20
    done = list(run_pipeline(res, store, run_id="b"))[-1]
    assert isinstance(done, RunFinished) and (done.records_processed, done.batches, done.last_value) == (5, 2, 40)
    state = store.load_state("ev")
    assert state is not None and state.last_value == 40 and len(state.boundary) == 2
    with pg.cursor() as cur:
        cur.execute(f"INSERT INTO {pg_schema}.ev VALUES (7, 40, 'late at the stored value'), (8, 50, 'new')")
    assert list(run_pipeline(res, store, run_id="c"))[-1].rows_this_run == 2
    assert Counter(r[0] for r in rows_of(mysql_db, "SELECT id FROM ev")) == Counter([1, 2, 3, 4, 5, 7, 8])


@pytest.mark.parametrize("mode", ["replace", "append", "merge"])
def test_crash_at_every_step_then_rerun_is_exact(tmp_path, mysql_db, mode):
    """Crash before and after every write, checkpoint save and publish (ties on k, batches of 7); the rerun leaves
    exactly the expected rows, and a replace reader sees the previous table or the new one, never a mix."""
    rows = tie_rows(45)
    previous = [{"id": -1, "k": -1, "note": "old output"}]
    expected = Counter(tuple(r.values()) for r in rows)
    if mode != "replace":
        expected[tuple(previous[0].values())] += 1
    step = 1
    while True:
        table = f"t{step}"
        res = memory_resource(tmp_path, dest(mysql_db, mode, table=table))
        store = MemoryCheckpointStore()
        run(res, store, MemorySource(previous, SCHEMA, seed=step))  # the previous output
        trip = Tripwire(step)
        inner = open_destination(res.destination, "things")
        try:
            run(
                res,
                Wrapped(store, trip, {"save", "delete"}),
                MemorySource(rows, SCHEMA, seed=step + 1000),
                Wrapped(inner, trip, {"write", "publish"}),
            )
        except Crash as crash:
            inner.close()
            visible = Counter(rows_of(mysql_db, f"SELECT id, k, note FROM {table}"))
            if mode == "replace":
                assert visible in (Counter([tuple(previous[0].values())]), expected), "old or new table, never a mix"
            events = run(res, store, MemorySource(rows, SCHEMA, seed=step + 2000))
            assert isinstance(events[-1], RunFinished)
            want = Counter(expected)
            if mode == "append" and "delete (after)" in str(crash):  # the run had finished: the rerun is a new append
                want.update(tuple(r.values()) for r in rows)
            assert Counter(rows_of(mysql_db, f"SELECT id, k, note FROM {table}")) == want, f"{crash}"
            assert store.docs == {}
            step += 1
            continue
        inner.close()
        assert step > 2 * (45 // 7), "every step was crashed at least once"
        break
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]
    assert not [t for t in tables_of(mysql_db) if t.startswith(("_conduit_stage_", "_conduit_old_"))]


def test_a_staging_table_dropped_mid_run_is_an_error_naming_it(tmp_path, mysql_db):
    res = memory_resource(tmp_path, dest(mysql_db, "replace"))
    store = MemoryCheckpointStore()
    events = run_pipeline(res, store, run_id="a", source=MemorySource(tie_rows(60), SCHEMA))
    for event in events:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    (staging,) = [t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE {staging}")
    conn.close()
    with pytest.raises(DestinationError, match=f"staging table {mysql_db}.{staging} .*is missing") as info:
        list(events)
    assert "conduit clear-checkpoints --pipeline-name things" in str(info.value)
    assert store.load("things").destination["staging"] == staging
    assert "things" not in tables_of(mysql_db), "nothing was published"


def test_a_run_without_resume_drops_its_staging_table_when_it_fails(tmp_path, mysql_db):
    res = ResourceSpec(**{**memory_resource(tmp_path, dest(mysql_db, "replace")).__dict__, "resume": False})
    events = run_pipeline(res, MemoryCheckpointStore(), run_id="a", source=MemorySource(tie_rows(60), SCHEMA))
    for event in events:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    assert len([t for t in tables_of(mysql_db) if t.startswith("_conduit_stage_")]) == 1
    events.close()
    assert tables_of(mysql_db) == ["_conduit_batches"]
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]


def test_clear_checkpoints_names_the_staging_table_to_drop(tmp_path, mysql_db):
    res = memory_resource(tmp_path, dest(mysql_db, "replace"))
    store = LocalCheckpointStore(tmp_path / ".checkpoints")
    events = run_pipeline(res, store, run_id="a", source=MemorySource(tie_rows(60), SCHEMA))
    for event in events:
        if isinstance(event, BatchCommitted) and event.index == 1:
            break
    events.close()
    staging = store.load("things").destination["staging"]
    cleared = subprocess.run(
        [CONDUIT, "clear-checkpoints", "--pipeline-name", "things", "--dir", str(tmp_path / ".checkpoints")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert cleared.returncode == 0, cleared.stderr
    statement = f"DROP TABLE IF EXISTS `{mysql_db}`.`{staging}`;"
    assert statement in cleared.stdout
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute(statement)
    conn.close()
    assert tables_of(mysql_db) == ["_conduit_batches"]


# --- the swap and the lock ---------------------------------------------------------------------------------------


def test_replace_swap_is_atomic_for_readers(tmp_path, mysql_db):
    """A reader counting the table in a loop while runs of 300 and 500 rows replace it sees 300 or 500, never an
    empty, partial or missing table."""
    small, large = tie_rows(300), tie_rows(500, seed=2)
    res = memory_resource(tmp_path, dest(mysql_db, "replace"), batch=50)
    run(res, MemoryCheckpointStore(), MemorySource(small, SCHEMA))
    seen: Counter[Any] = Counter()
    stop = threading.Event()

    def read() -> None:
        conn = mysql_connect(mysql_db)
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    try:
                        cur.execute("SELECT COUNT(*) FROM things")
                        seen[cur.fetchone()[0]] += 1
                    except Exception as exc:  # noqa: BLE001 - a reader must never see the table missing
                        seen[repr(exc)] += 1
        finally:
            conn.close()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(6):
            run(res, MemoryCheckpointStore(), MemorySource(large if i % 2 == 0 else small, SCHEMA))
    finally:
        stop.set()
        reader.join()
    assert set(seen) <= {300, 500}, seen
    assert seen[300] and seen[500]


def test_a_second_writer_of_the_table_is_refused_while_the_first_holds_it(tmp_path, mysql_db):
    res = memory_resource(tmp_path, dest(mysql_db, "append"))
    first = run_pipeline(res, MemoryCheckpointStore(), run_id="a", source=MemorySource(tie_rows(40), SCHEMA))
    for event in first:
        if isinstance(event, BatchCommitted):
            break
    # another deployment (its own checkpoint store), another pipeline name, the same table
    other = memory_resource(tmp_path, dest(mysql_db, "append"), name="other")
    with pytest.raises(
        DestinationError,
        match=rf"table {mysql_db}.things is being written by another run \(MySQL connection \d+ of {MYSQL['user']}@",
    ) as info:
        run(other, MemoryCheckpointStore(), MemorySource(tie_rows(40), SCHEMA))
    assert lock_name(mysql_db, "things") in str(info.value) and "Wait for that run to finish" in str(info.value)
    assert isinstance(list(first)[-1], RunFinished)
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(40,)], "the refused run wrote nothing"
    assert isinstance(run(other, MemoryCheckpointStore(), MemorySource(tie_rows(40), SCHEMA))[-1], RunFinished)
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(80,)]


def test_lock_and_staging_names_fit_mysql_limits():
    name = lock_name("d" * 64, "t" * 64)
    assert len(name) == 64 and name.startswith("conduit:")
    assert lock_name("a.b", "c") != lock_name("a", "b.c")
    assert len(staging_name("p" * 200, "d" * 64, "t" * 64, uuid.uuid4().hex)) <= 64


# --- types and encoding ------------------------------------------------------------------------------------------

SPECIAL_TEXT = [
    "",
    "NULL",
    "null",
    "\\N",
    "\\\\N",
    "N",
    "\t",
    "a\tb",
    "line1\nline2",
    "cr\r\nlf",
    "\r",
    "back\\slash",
    "ends with \\",
    "\\t not a tab",
    "'single' \"double\" `back`",
    "😀 4-byte, 𝄞, 中文, é vs é",
    "trailing spaces   ",
    "   leading",
    "\x01\x1f\x7f control",
    "x" * 100_000,
]


def test_every_special_value_loads_exactly(tmp_path, mysql_db):
    """NULL vs '' vs 'NULL' vs '\\N', tabs, newlines, backslashes, NUL and other bytes, 4-byte UTF-8, binary, decimals,
    microseconds, booleans, unsigned 64-bit: every value read back equal."""
    texts = [*SPECIAL_TEXT, "nul\x00inside", None]
    binaries = [b"", None, bytes(range(256)), b"\\N", b"\t\n\\", b"\x00", b"NULL"]
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("txt", pa.string()),
            ("big", pa.large_string()),
            ("bin", pa.binary()),
            ("dec", pa.decimal128(38, 18)),
            ("wide", pa.decimal256(65, 30)),
            ("neg", pa.decimal128(5, -2)),
            ("ts", pa.timestamp("us")),
            ("tz", pa.timestamp("us", tz="Europe/Berlin")),
            ("d", pa.date32()),
            ("t", pa.time64("us")),
            ("ok", pa.bool_()),
            ("u64", pa.uint64()),
            ("i8", pa.int8()),
            ("f4", pa.float32()),
            ("f8", pa.float64()),
            ("lst", pa.list_(pa.string())),
            ("dur", pa.duration("us")),
            ("cat", pa.dictionary(pa.int32(), pa.string())),
        ]
    )
    n = max(len(texts), len(binaries))
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": i,
                "txt": texts[i % len(texts)],
                "big": texts[(i + 3) % len(texts)],
                "bin": binaries[i % len(binaries)],
                "dec": [
                    decimal.Decimal("-0.000000000000000001"),
                    decimal.Decimal("12345678901234567890.123456789012345678"),
                    None,
                    decimal.Decimal(0),
                ][i % 4],
                "wide": [decimal.Decimal("1E-30"), decimal.Decimal("-" + "9" * 35 + "." + "9" * 30), None][i % 3],
                "neg": [decimal.Decimal("12300"), None][i % 2],
                "ts": [dt.datetime(1000, 1, 1, 0, 0, 0, 1), dt.datetime(9999, 12, 31, 23, 59, 59, 999999), None][i % 3],
                "tz": [
                    dt.datetime(2038, 1, 19, 3, 14, 8, 123456, tzinfo=dt.UTC),
                    dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.UTC),
                    None,
                ][i % 3],
                "d": [dt.date(1, 1, 1), dt.date(9999, 12, 31), None][i % 3],
                "t": [dt.time(0, 0), dt.time(23, 59, 59, 999999), None][i % 3],
                "ok": [True, False, None][i % 3],
                "u64": [2**64 - 1, 0, None, 2**63][i % 4],
                "i8": [-128, 127, None][i % 3],
                "f4": [0.1, -3.4028234663852886e38, 1.401298464324817e-45, None][i % 4],
                "f8": [0.1, 5e-324, -1.7976931348623157e308, -0.0, None][i % 5],
                "lst": [["a\tb", None, "é"], [], None][i % 3],
                "dur": [dt.timedelta(days=-1, microseconds=1), None, dt.timedelta(hours=838, minutes=59, seconds=59.999999)][
                    i % 3
                ],
                "cat": ["x", "y\\z", None][i % 3],
            }
        )
    res = memory_resource(tmp_path, dest(mysql_db, "append"), column="id", batch=5)
    run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    # a FLOAT is read as CAST(... AS DOUBLE): MariaDB's text protocol shows only 6 digits of it
    shown = ", ".join("CAST(f4 AS DOUBLE)" if n == "f4" else f"`{n}`" for n in schema.names)
    got = {r[0]: r for r in rows_of(mysql_db, f"SELECT {shown} FROM things")}
    assert len(got) == n
    f32 = lambda v: None if v is None else struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    for row in rows:
        back = dict(zip(schema.names, got[row["id"]], strict=True))
        want = dict(row)
        want["ts"] = row["ts"]
        want["tz"] = None if row["tz"] is None else row["tz"].astimezone(dt.UTC).replace(tzinfo=None)
        want["t"] = (
            None
            if row["t"] is None
            else dt.timedelta(
                hours=row["t"].hour, minutes=row["t"].minute, seconds=row["t"].second, microseconds=row["t"].microsecond
            )
        )
        want["ok"] = None if row["ok"] is None else int(row["ok"])
        want["f4"] = f32(row["f4"])
        back["f4"] = f32(back["f4"])
        want["lst"] = None if row["lst"] is None else json.dumps(row["lst"], ensure_ascii=False)
        for name in schema.names:
            assert (
                back[name] == want[name]
                and type(back[name]) is type(want[name])
                or (back[name] == want[name] and name in ("dec", "wide", "neg"))
            ), f"row {row['id']} column {name}: sent {want[name]!r}, read back {back[name]!r}"


def test_types_from_postgresql_round_trip_value_by_value(pg, pg_schema, mysql_db):
    special = "".join(SPECIAL_TEXT[:-1])
    with pg.cursor() as cur:
        cur.execute(
            f"""CREATE TABLE {pg_schema}.src (
                id bigint, n65 numeric(65, 30), n38 numeric(38, 10), u64 numeric(20, 0), anynum numeric, i2 smallint,
                i4 integer, f4 real, f8 double precision, ok boolean, b bytea, tz timestamptz, ts timestamp, d date,
                t time, j jsonb, js json, txt text, vc varchar(20), ch char(5), uid uuid, arr int[], iv interval)"""
        )
        cur.execute(
            f"""INSERT INTO {pg_schema}.src VALUES
            (1, '{"9" * 35}.{"9" * 30}', '1234567890123456789012345678.0123456789', 18446744073709551615, 'NaN',
             -32768, 2147483647, 0.1, 1.7976931348623157e308, true, %s, '2038-01-19 03:14:08.123456+00',
             '1000-01-01 00:00:00.000001', '9999-12-31', '23:59:59.999999', %s, '{{"b": 1, "a": [1, 2.50]}}', %s,
             'x\ty', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{1,NULL,3}}', '1 day 02:03:04.5'),
            (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
             NULL, NULL, NULL, NULL, NULL),
            (3, '-0.000000000000000000000000000001', '0', 0, '123456789012345678901234567890.12345678901234567890',
             0, -1, 1.5, -0.5, false, '', '9999-12-31 23:59:59.999999+00',
             '2024-02-29 12:00:00', '0001-01-01', '00:00:00', '[]', '"s"', '', '', '', '00000000-0000-0000-0000-000000000000',
             '{{}}', '-3 mons')""",
            (bytes(range(256)), json.dumps({"tab": "\t", "nl": "\n", "bs": "\\", "emoji": "😀", "null": None}), special),
        )
    res = pg_resource(pg_schema, dest(mysql_db, "append"), batch=2, query="SELECT * FROM src")
    run(res, MemoryCheckpointStore(), None)
    cols = "id, n65, n38, u64, anynum, i2, i4, f4, f8, ok, b, tz, ts, d, t, j, js, txt, vc, ch, uid, arr, iv"
    with pg.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.execute(
            f"SELECT id, n65::text, n38, u64, anynum::text, i2, i4, f4, f8, ok, b, tz, ts, d, t, j::text, js::text, txt, "
            f"vc, ch, uid::text, arr, iv::text FROM {pg_schema}.src ORDER BY id"
        )
        source = cur.fetchall()
    back = rows_of(mysql_db, f"SELECT {cols.replace('f4', 'CAST(f4 AS DOUBLE)')} FROM things ORDER BY id")
    names = cols.split(", ")
    for want, got in zip(source, back, strict=True):
        for name, w, g in zip(names, want, got, strict=True):
            if w is None:
                assert g is None, f"id {want[0]} {name}: {g!r} instead of NULL"
                continue
            if name == "f4":
                w, g = struct.unpack("f", struct.pack("f", w))[0], struct.unpack("f", struct.pack("f", g))[0]
            elif name == "ok":
                w = int(w)
            elif name == "b":
                w = bytes(w)
            elif name == "tz":
                w = w.astimezone(dt.UTC).replace(tzinfo=None)
            elif name == "t":
                w = dt.timedelta(hours=w.hour, minutes=w.minute, seconds=w.second, microseconds=w.microsecond)
            elif name == "arr":
                w = json.dumps(w)
            assert g == w and (name in ("n38", "u64") or type(g) is type(w)), (
                f"id {want[0]} column {name}: PostgreSQL {w!r}, MySQL {g!r}"
            )
    create = rows_of(mysql_db, "SHOW CREATE TABLE things")[0][1]
    for fragment in (
        "`n65` longtext",
        "`n38` decimal(38,10)",
        "`u64` decimal(20,0)",
        "`i2` smallint(6)",
        "`f4` float",
        "`f8` double",
        "`ok` tinyint(1)",
        "`b` longblob",
        "`tz` datetime(6) DEFAULT NULL COMMENT 'UTC'",
        "`ts` datetime(6)",
        "`t` time(6)",
        "`txt` longtext",
        "COLLATE=utf8mb4_nopad_bin",
    ):
        assert fragment in create, f"{fragment!r} not in {create}"


def test_column_types_for_arrow_types():
    where = "destination 'wh'"
    assert column_type(pa.field("u", pa.uint64()), where) == "BIGINT UNSIGNED"
    assert column_type(pa.field("d", pa.decimal256(65, 30)), where) == "DECIMAL(65, 30)"
    assert column_type(pa.field("d", pa.decimal128(5, -2)), where) == "DECIMAL(7, 0)"
    assert column_type(pa.field("s", pa.string()), where) == "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
    text = "VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_0900_bin"
    assert column_type(pa.field("s", pa.string()), where, key_bytes=3072, collation="utf8mb4_0900_bin") == text
    assert column_type(pa.field("t", pa.timestamp("ns", tz="UTC")), where) == "DATETIME(6)"
    with pytest.raises(DestinationError, match=r"column 'd' is decimal256\(70, 10\), beyond MySQL's largest DECIMAL\(65, 30\)"):
        column_type(pa.field("d", pa.decimal256(70, 10)), where)
    with pytest.raises(DestinationError, match=r"column 'd' is decimal128\(38, 31\)"):
        column_type(pa.field("d", pa.decimal128(38, 31)), where)


# --- values that do not fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column_sql,fine,value,message",
    [
        ("note VARCHAR(3)", "abc", "abcd", r"Data too long for column 'note'|Data truncated for column 'note'"),
        ("note TINYINT", 127, 300, r"Out of range value for column 'note'"),  # text into an integer column is refused
        ("note DECIMAL(5, 2)", "1.23", "1.234", r"Data truncated for column 'note'"),
        ("note DATE", "2024-02-29", "2023-02-29", r"column 'note'|`note`"),
        ("note VARCHAR(10) CHARACTER SET latin1", "é", "😀", r"column 'note'|`note`"),
    ],
    ids=["too-long", "out-of-range", "rounded-decimal", "bad-date", "not-latin1"],
)
def test_a_value_the_column_cannot_hold_fails_its_batch_loudly(tmp_path, mysql_db, column_sql, fine, value, message):
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE things (id BIGINT, k BIGINT, {column_sql}) ENGINE=InnoDB")
    conn.close()
    rows = [{"id": i, "k": i, "note": value if i == 9 else fine} for i in range(1, 13)]
    res = memory_resource(tmp_path, dest(mysql_db, "append"), batch=4)
    store = MemoryCheckpointStore()
    schema = SCHEMA.set(2, pa.field("note", pa.int64())) if isinstance(fine, int) else SCHEMA
    with pytest.raises(DestinationError, match=message) as info:
        run(res, store, MemorySource(rows, schema))
    text = str(info.value)
    assert f"table {mysql_db}.things cannot hold a value of the batch (row 1 of the batch, k = 9)" in text
    assert "batch was rolled back and the checkpoint is unchanged" in text
    assert store.load("things").last_value == 8
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(8,)], "batches 0 and 1 only; nothing of batch 2"
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(2,)]


def test_nan_and_a_merge_key_longer_than_its_column_are_refused(tmp_path, mysql_db):
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])
    rows = [{"id": i, "x": float("nan") if i == 3 else 1.5} for i in range(5)]
    with pytest.raises(
        DestinationError, match=r"column 'x' holds nan \(row 4 of the batch, id = 3\), which a MySQL FLOAT or DOUBLE cannot store"
    ):
        run(memory_resource(tmp_path, dest(mysql_db, "append"), column="id"), MemoryCheckpointStore(), MemorySource(rows, schema))
    schema = pa.schema([("seq", pa.int64()), ("id", pa.string())])
    rows = [{"seq": 1, "id": "a" * 768}, {"seq": 2, "id": "é" * 769}]
    res = memory_resource(tmp_path, dest(mysql_db, "merge", table="keyed"), column="seq")
    with pytest.raises(DestinationError, match=r"\(row 2 of the batch, seq = 2\): Data truncated for column 'id'"):
        run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM keyed") == [(0,)]


# --- ingest.yml and `conduit validate` -------------------------------------------------------------------------------


def test_validate_reaches_it_and_never_shows_the_password(tmp_path, mysql_db):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "shop.db")
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.commit()
    conn.close()
    secret = "My-Sql-S3cret/:@x"
    host, port, user = MYSQL["host"], MYSQL["port"], MYSQL["user"]
    good_password = f'    password: "{MYSQL["password"]}"\n' if MYSQL["password"] else ""
    text = f"""
sources:
  - name: shop
    type: sqlite
    path: shop.db
destinations:
  - name: good
    type: mysql
    host: {host}
    port: {port}
    database: {mysql_db}
    user: {user}
{good_password}    table: orders_copy
  - name: wrong_password
    type: mysql
    host: {host}
    port: {port}
    database: {mysql_db}
    user: {user}
    password: ${{CONDUIT_T_MYSQL_PW}}
  - name: wrong_url
    type: mysql
    url: mysql://{user}:${{CONDUIT_T_MYSQL_PW}}@{host}:{port}/{mysql_db}
  - name: no_such_db
    type: mysql
    url: mysql://{user}:${{CONDUIT_T_MYSQL_PW}}@{host}:{port}/nope_{mysql_db}
resources:
  - name: orders
    source: shop
    destination: good
    query: SELECT id FROM orders
"""
    path = write_ingest(tmp_path, text)
    env = {**__import__("os").environ, "CONDUIT_T_MYSQL_PW": secret}
    out = subprocess.run([CONDUIT, "validate", "--file", str(path)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert f"destination good: ok, mysql://{host}:{port}/{mysql_db} (replace), server " in out.stdout, out.stdout + out.stderr
    assert "LOAD DATA LOCAL on" in out.stdout
    for name in ("wrong_password", "wrong_url", "no_such_db"):
        assert f"destination {name}: FAILED:" in out.stdout
    everything = out.stdout + out.stderr
    assert "Access denied" in everything
    for form in (secret, __import__("urllib.parse").parse.quote(secret, safe="")):
        assert form not in everything
    assert out.returncode == 1


def test_ingest_yml_keys_are_checked(tmp_path):
    from conduit_dagster.engine.errors import SpecError

    base = """
sources:
  - name: shop
    type: sqlite
    path: shop.db
destinations:
  - name: wh
    type: mysql
    database: shop
    {extra}
resources:
  - name: orders
    source: shop
    destination: wh
    query: SELECT 1 AS id
"""
    for extra, message in (
        ("mode: merge", "mode merge needs `primary_key"),
        ("table: " + "t" * 65, "longer than MySQL's 64 characters"),
        ("table: _conduit_batches", "starts with _conduit_"),
        ("schema: x", "unknown key 'schema'"),
        ("mode: append", "appends, which is exact after a crash only with resume: true"),
    ):
        with pytest.raises(SpecError, match=message):
            load_spec(write_ingest(tmp_path, base.format(extra=extra)))
    spec = load_spec(write_ingest(tmp_path, base.format(extra="table: orders_copy")))
    d = spec.resource("orders").destination
    assert isinstance(d, MySQLDestinationSpec) and (d.table, d.mode, d.host, d.port) == (
        "orders_copy",
        "replace",
        "127.0.0.1",
        3306,
    )


def test_the_server_can_ask_for_a_local_file_only_during_conduits_own_load(tmp_path, mysql_db):
    """LOAD DATA LOCAL lets the server name the file the client sends; outside conduit's own load the destination's
    connection refuses such a request (a compromised server cannot read the machine's files)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send\n")
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE stolen (line TEXT)")
    conn.close()
    destination = open_destination(dest(mysql_db, "append"), "things")
    try:
        with pytest.raises(RuntimeError, match="local_infile option is false"), destination.conn.cursor() as cur:
            cur.execute(f"LOAD DATA LOCAL INFILE '{secret}' INTO TABLE stolen")
    finally:
        destination.close()
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM stolen") == [(0,)]


def test_a_duration_beyond_mysql_time_fails_loudly(tmp_path, mysql_db):
    schema = pa.schema([("id", pa.int64()), ("took", pa.duration("us"))])
    rows = [{"id": 1, "took": dt.timedelta(hours=838)}, {"id": 2, "took": dt.timedelta(hours=839)}]
    with pytest.raises(DestinationError, match=r"\(row 2 of the batch, id = 2\): .*'took'"):
        run(
            memory_resource(tmp_path, dest(mysql_db, "append"), column="id", batch=10),
            MemoryCheckpointStore(),
            MemorySource(rows, schema),
        )
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]


@pytest.fixture
def mysql_out(mysql_db):
    """A second fresh database, for MySQL -> MySQL."""
    name = f"{mysql_db}_out"
    conn = mysql_connect(None)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def test_types_from_a_mysql_source_round_trip_value_by_value(mysql_db, mysql_out):
    from conduit_dagster.engine.sources.mysql import MySQLSourceSpec

    special = "".join(SPECIAL_TEXT[:-1])
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute(
            """CREATE TABLE src (id BIGINT PRIMARY KEY, d65 DECIMAL(65, 30), d20 DECIMAL(20, 6), u64 BIGINT UNSIGNED,
            i8 TINYINT, f4 FLOAT, f8 DOUBLE, dt6 DATETIME(6), ts6 TIMESTAMP(6) NULL, d DATE, t TIME(6), y YEAR,
            bits BIT(64), js JSON, bl BLOB, en ENUM('a', 'b c'), st SET('x', 'y', 'z'), vc VARCHAR(200), ci VARCHAR(10)
            COLLATE utf8mb4_general_ci, tx LONGTEXT) DEFAULT CHARSET=utf8mb4"""
        )
        cur.execute(
            "INSERT INTO src VALUES (1, %s, '-12345678901234.123456', 18446744073709551615, -128, 0.1, "
            "1.7976931348623157e308, '9999-12-31 23:59:59.999999', '2038-01-19 03:14:07.999999', '1000-01-01', "
            "'-838:59:59.000000', 2155, b'1111111111111111111111111111111111111111111111111111111111111111', "
            "'{\"a\": [1, \"\\\\t\"]}', %s, 'b c', 'x,z', %s, 'Ab ', %s), "
            "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
            "NULL, NULL), "
            "(3, '0.000000000000000000000000000001', 0, 0, 127, -1.5, -0.5, '1000-01-01 00:00:00.000001', "
            "'1970-01-01 00:00:01', '9999-12-31', '838:59:59.999999', 1901, b'0', '[]', '', 'a', '', '', '', '')",
            ("9" * 35 + "." + "9" * 30, bytes(range(256)), special[:200], special),
        )
    conn.close()
    password = str(MYSQL["password"])
    source = MySQLSourceSpec(
        name="my",
        host=str(MYSQL["host"]),
        port=int(MYSQL["port"]),  # type: ignore[call-overload]
        database=mysql_db,
        user=str(MYSQL["user"]),
        password=Secret(password) if password else None,
    )
    res = ResourceSpec(
        name="things",
        source=source,
        destination=dest(mysql_out, "append"),
        query="SELECT * FROM src",
        batch_size=2,
        resume=True,
        checkpoint_column="id",
    )
    run(res, MemoryCheckpointStore(), None)
    cols = "id, d65, d20, u64, i8, CAST(f4 AS DOUBLE), f8, dt6, ts6, d, t, y, bits, js, bl, en, st, vc, ci, tx"
    want = rows_of(mysql_db, f"SELECT {cols} FROM src ORDER BY id")
    got = rows_of(mysql_out, f"SELECT {cols} FROM things ORDER BY id")
    names = cols.split(", ")
    for w_row, g_row in zip(want, got, strict=True):
        for name, w, g in zip(names, w_row, g_row, strict=True):
            assert g == w, f"id {w_row[0]} column {name}: source {w!r}, destination {g!r}"
    create = rows_of(mysql_out, "SHOW CREATE TABLE things")[0][1]
    for fragment in ("`d65` decimal(65,30)", "`u64` bigint(20) unsigned", "`t` time(6)", "`bits` longblob", "`ts6` datetime(6)"):
        assert fragment in create, f"{fragment!r} not in {create}"


def test_escaping_looks_only_at_the_values_of_a_slice():
    from conduit_dagster.engine.destinations.mysql import _escape

    values = pa.array(["a\tb", "plain", "back\\slash", "x"], pa.large_string())
    assert _escape(values.slice(1, 1)).to_pylist() == ["plain"]
    assert _escape(values.slice(3, 1)).to_pylist() == ["x"]
    assert _escape(values.slice(1, 2)).to_pylist() == ["plain", "back\\\\slash"]
    assert _escape(values.slice(0, 1)).to_pylist() == ["a\\tb"]
    assert _escape(pa.array([None, ""], pa.large_string())).to_pylist() == [None, ""]


def test_a_replace_run_with_no_rows_publishes_an_empty_table(tmp_path, mysql_db):
    res = memory_resource(tmp_path, dest(mysql_db, "replace"))
    run(res, MemoryCheckpointStore(), MemorySource(tie_rows(20), SCHEMA))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(20,)]
    done = run(res, MemoryCheckpointStore(), MemorySource([], SCHEMA))[-1]
    assert isinstance(done, RunFinished) and done.rows_this_run == 0
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]
    assert tables_of(mysql_db) == ["_conduit_batches", "things"]
    assert [r[0] for r in rows_of(mysql_db, "SHOW COLUMNS FROM things")] == ["id", "k", "note"], "the previous table's columns"


def test_a_run_whose_lock_session_dies_stops_before_its_next_batch(tmp_path, mysql_db):
    res = memory_resource(tmp_path, dest(mysql_db, "append"))
    store = MemoryCheckpointStore()
    inner = open_destination(res.destination, "things")
    try:
        events = run_pipeline(res, store, run_id="a", source=MemorySource(tie_rows(60), SCHEMA), destination=inner)
        for event in events:
            if isinstance(event, BatchCommitted):
                break
        conn = mysql_connect(None)
        with conn.cursor() as cur:
            cur.execute(f"KILL {inner._lock.thread_id()}")
        conn.close()
        with pytest.raises(DestinationError, match=r"lost its lock on table .*things.*it resumes from its checkpoint"):
            list(events)
    finally:
        inner.close()
    committed = store.load("things").batches_committed
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(committed,)]
    done = run(res, store, MemorySource(tie_rows(60), SCHEMA))[-1]
    assert isinstance(done, RunFinished) and done.resumed
    assert Counter(rows_of(mysql_db, "SELECT id, k, note FROM things")) == Counter(tuple(r.values()) for r in tie_rows(60))


# --- existing tables: what merge upserts on, and columns narrower than the rows ---------------------------------------


def create(db: str, *statements: str) -> None:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


KEYED = pa.schema([("seq", pa.int64()), ("k", pa.int64()), ("email", pa.string())])


def test_merge_refuses_a_table_whose_other_unique_index_would_catch_rows(tmp_path, mysql_db):
    """ON DUPLICATE KEY UPDATE fires on any unique index: a new row sharing an email with another row overwrote that
    row and was lost. Now such a table is refused naming the index, and nothing changes."""
    create(
        mysql_db,
        "CREATE TABLE things (seq BIGINT, k BIGINT PRIMARY KEY, email VARCHAR(50), UNIQUE KEY by_email (email)) ENGINE=InnoDB",
        "INSERT INTO things VALUES (0, 1, 'alice@x')",
    )
    res = memory_resource(tmp_path, dest(mysql_db, "merge", keys=("k",)), column="seq")
    with pytest.raises(DestinationError, match=r"the unique index 'by_email' on \(email\) besides the one on \(k\)") as info:
        run(res, MemoryCheckpointStore(), MemorySource([{"seq": 1, "k": 2, "email": "alice@x"}], KEYED))
    assert "ALTER TABLE `things` DROP INDEX `by_email`" in str(info.value)
    assert rows_of(mysql_db, "SELECT seq, k, email FROM things") == [(0, 1, "alice@x")]
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]


def test_merge_refuses_a_key_index_on_a_prefix_and_null_keys(tmp_path, mysql_db):
    # UNIQUE (k(3)) fires on 'abcd' and 'abce' alike: it is no index on k
    text = "VARCHAR(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
    create(mysql_db, f"CREATE TABLE things (seq BIGINT, k {text} NOT NULL, UNIQUE KEY (k(3))) ENGINE=InnoDB")
    schema = pa.schema([("seq", pa.int64()), ("k", pa.string())])
    res = memory_resource(tmp_path, dest(mysql_db, "merge", keys=("k",)), column="seq")
    with pytest.raises(DestinationError, match=r"no PRIMARY KEY or UNIQUE index on exactly \(k\) \(whole columns, not a prefix"):
        run(res, MemoryCheckpointStore(), MemorySource([{"seq": 1, "k": "abcd"}, {"seq": 2, "k": "abce"}], schema))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]
    # a nullable unique key holds NULLs apart: a NULL key would be added again by every run
    create(mysql_db, "DROP TABLE things", "CREATE TABLE things (seq BIGINT, k BIGINT NULL, UNIQUE KEY (k)) ENGINE=InnoDB")
    schema = pa.schema([("seq", pa.int64()), ("k", pa.int64())])
    rows = [{"seq": 1, "k": 1}, {"seq": 2, "k": None}]
    with pytest.raises(DestinationError, match=r"primary_key column 'k' is NULL \(row 2 of the batch, seq = 2\)"):
        run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]


def test_merge_beside_an_auto_increment_primary_key_upserts_on_the_unique_key(tmp_path, mysql_db):
    """The usual shape: a surrogate AUTO_INCREMENT id the rows do not carry, and a unique business key (an index that
    holds every key column, here (k, email), cannot clash where the key does not)."""
    create(
        mysql_db,
        "CREATE TABLE things (id BIGINT AUTO_INCREMENT PRIMARY KEY, seq BIGINT, k BIGINT NOT NULL, email VARCHAR(50), "
        "UNIQUE KEY by_k (k), UNIQUE KEY by_k_email (k, email)) ENGINE=InnoDB",
        "INSERT INTO things (seq, k, email) VALUES (0, 1, 'x')",
    )
    res = memory_resource(tmp_path, dest(mysql_db, "merge", keys=("k",)), column="seq")
    rows = [{"seq": 1, "k": 1, "email": "y"}, {"seq": 2, "k": 2, "email": "x"}, {"seq": 3, "k": 2, "email": "z"}]
    run(res, MemoryCheckpointStore(), MemorySource(rows, KEYED))
    assert rows_of(mysql_db, "SELECT k, seq, email FROM things ORDER BY k") == [(1, 1, "y"), (2, 3, "z")]
    assert rows_of(mysql_db, "SELECT id FROM things WHERE k = 1") == [(1,)], "the existing row keeps its id"
    # rows that carry the id could clash on it with another row
    schema = pa.schema([("id", pa.int64()), ("seq", pa.int64()), ("k", pa.int64())])
    with pytest.raises(DestinationError, match=r"holds id, the AUTO_INCREMENT column\(s\) of another unique index"):
        run(res, MemoryCheckpointStore(), MemorySource([{"id": 1, "seq": 4, "k": 5}], schema))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(2,)]


@pytest.mark.parametrize("collation", ["utf8mb4_general_ci", "utf8mb4_bin"])
def test_merge_refuses_a_key_column_that_ignores_case_or_trailing_spaces(tmp_path, mysql_db, collation):
    """'a', 'A' and 'a ' were one key in a utf8mb4_general_ci column ('a' and 'a ' in utf8mb4_bin, PAD SPACE): two
    source rows were lost. Refused naming the column; the ALTER the error names makes the merge exact."""
    create(
        mysql_db,
        f"CREATE TABLE things (seq BIGINT, k VARCHAR(20) CHARACTER SET utf8mb4 COLLATE {collation} PRIMARY KEY, v TEXT) "
        "ENGINE=InnoDB",
    )
    schema = pa.schema([("seq", pa.int64()), ("k", pa.string()), ("v", pa.string())])
    rows = [{"seq": 1, "k": "a", "v": "1"}, {"seq": 2, "k": "A", "v": "2"}, {"seq": 3, "k": "a ", "v": "3"}]
    res = memory_resource(tmp_path, dest(mysql_db, "merge", keys=("k",)), column="seq")
    with pytest.raises(DestinationError, match=rf"merge key column 'k' of table .*things has the collation {collation}") as info:
        run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]
    alter = re.search(r"ALTER TABLE .*? NOT NULL", str(info.value))
    assert alter is not None, str(info.value)
    create(mysql_db, alter.group(0))
    run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    assert sorted(rows_of(mysql_db, "SELECT k, v FROM things")) == [("A", "2"), ("a", "1"), ("a ", "3")]


@pytest.mark.parametrize(
    "column_sql,arrow,value,message",
    [
        ("DATETIME", pa.timestamp("us"), dt.datetime(2024, 1, 1, 0, 0, 0, 500000), r"carry 6 digits of a second, .*rounds to 0"),
        ("TIMESTAMP(0) NULL", pa.timestamp("us"), dt.datetime(2024, 1, 1, 0, 0, 0, 999999), r"6 digits of a second"),
        ("DATETIME(3)", pa.string(), "2024-01-01 00:00:00.0005", r"6 digits of a second, which MySQL rounds to 3"),
        ("TIME(3)", pa.duration("us"), dt.timedelta(microseconds=1), r"6 digits of a second, which MySQL rounds to 3"),
        ("INT", pa.float64(), 1.5, r"convert float values to INT"),
        ("INT", pa.string(), "1.5", r"convert text values to INT"),
        ("FLOAT", pa.float64(), 0.1, r"rounded to a FLOAT's single precision"),
        ("DOUBLE", pa.int64(), 2**53 + 1, r"64-bit integers above 2\^53 would be rounded"),
        ("DOUBLE", pa.decimal128(30, 20), decimal.Decimal("0.10000000000000000001"), r"convert decimal values to DOUBLE"),
        ("DECIMAL(10, 2)", pa.decimal128(10, 3), decimal.Decimal("1.000"), r"its 3 digits after the point would be rounded to 2"),
        ("VARCHAR(5)", pa.bool_(), True, r"convert bool values to VARCHAR"),
        ("BIT(8)", pa.int64(), 5, r"convert int values to BIT"),
        ("SET('a','b')", pa.string(), "b,a", r"convert text values to SET"),
        ("ENUM('a','b')", pa.string(), "A", r"value 'A' \(row 1 of the batch, k = 1\) is not exactly one of its values"),
        ("ENUM('a','b')", pa.string(), "2", r"value '2' .*is not exactly one of its values"),
        ("CHAR(5)", pa.string(), "ab  ", r"value 'ab  ' .*ends with a space, which a CHAR column drops"),
        ("BINARY(4)", pa.binary(), b"ab", r"value b'ab' .*is not 4 bytes long, and a BINARY\(4\) column pads it"),
        ("YEAR", pa.int64(), 5, r"value 5 .*is outside 1901-2155"),
    ],
)
def test_a_column_narrower_than_the_rows_is_refused_before_a_row_is_written(
    tmp_path, mysql_db, column_sql, arrow, value, message
):
    """Each of these landed changed and without a warning (00:00:00.5 as 00:00:00, 1.5 as 2, 'A' as 'a', ...)."""
    create(mysql_db, f"CREATE TABLE things (id BIGINT, k BIGINT, v {column_sql}) ENGINE=InnoDB")
    schema = pa.schema([("id", pa.int64()), ("k", pa.int64()), ("v", arrow)])
    res = memory_resource(tmp_path, dest(mysql_db, "append"))
    with pytest.raises(DestinationError, match=message) as info:
        run(res, MemoryCheckpointStore(), MemorySource([{"id": 1, "k": 1, "v": value}], schema))
    assert f"column 'v' of table {mysql_db}.things is " in str(info.value)
    assert "Nothing of the batch was written and the checkpoint is unchanged" in str(info.value)
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM things") == [(0,)]
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM _conduit_batches") == [(0,)]


def test_columns_as_wide_as_the_rows_or_wider_load_exactly(tmp_path, mysql_db):
    create(
        mysql_db,
        "CREATE TABLE things (id BIGINT, k BIGINT, i BIGINT, ts DATETIME(6), ms DATETIME(3), t TIME(6), d DECIMAL(12, 4), "
        "f DOUBLE, f4 DOUBLE, e ENUM('a','it''s','b\\\\c'), c CHAR(3), b BINARY(2), y YEAR, txt VARCHAR(10), day DATETIME) "
        "ENGINE=InnoDB",
    )
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("k", pa.int64()),
            ("i", pa.int32()),
            ("ts", pa.timestamp("us")),
            ("ms", pa.timestamp("ms")),
            ("t", pa.time64("us")),
            ("d", pa.decimal128(10, 2)),
            ("f", pa.int32()),
            ("f4", pa.float32()),
            ("e", pa.dictionary(pa.int8(), pa.string())),
            ("c", pa.string()),
            ("b", pa.binary()),
            ("y", pa.int16()),
            ("txt", pa.string()),
            ("day", pa.date32()),
        ]
    )
    rows = [
        {
            "id": i,
            "k": i,
            "i": -(2**31),
            "ts": dt.datetime(2024, 1, 1, 0, 0, 0, 500001),
            "ms": dt.datetime(2024, 1, 1, 0, 0, 0, 123000),
            "t": dt.time(23, 59, 59, 999999),
            "d": decimal.Decimal("12345678.91"),
            "f": 2**31 - 1,
            "f4": 0.1,
            "e": ["a", "it's", "b\\c"][i],
            "c": " ab",
            "b": b"\x00\xff",
            "y": 2155,
            "txt": "x ",
            "day": dt.date(2024, 2, 29),
        }
        for i in range(3)
    ]
    run(memory_resource(tmp_path, dest(mysql_db, "append")), MemoryCheckpointStore(), MemorySource(rows, schema))
    back = rows_of(mysql_db, "SELECT id, i, ts, ms, t, d, f, CAST(f4 AS DOUBLE), e, c, b, y, txt, day FROM things ORDER BY id")
    assert [r[8] for r in back] == ["a", "it's", "b\\c"]
    assert back[0][1:8] == (
        -(2**31),
        dt.datetime(2024, 1, 1, 0, 0, 0, 500001),
        dt.datetime(2024, 1, 1, 0, 0, 0, 123000),
        dt.timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
        decimal.Decimal("12345678.9100"),
        2**31 - 1,
        struct.unpack("f", struct.pack("f", 0.1))[0],
    )
    assert back[0][9:] == (" ab", b"\x00\xff", 2155, "x ", dt.datetime(2024, 2, 29))


def test_binary_inside_a_list_or_struct_is_written_as_hex(tmp_path, mysql_db):
    """It was written as Python's repr text ("b'\\x00\\x01'")."""
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("k", pa.int64()),
            ("l", pa.list_(pa.binary())),
            ("s", pa.struct([("b", pa.large_binary()), ("n", pa.int64())])),
        ]
    )
    rows = [{"id": 1, "k": 1, "l": [b"\x00\x01", None, b""], "s": {"b": b"\xff\\", "n": 2}}]
    run(memory_resource(tmp_path, dest(mysql_db, "append")), MemoryCheckpointStore(), MemorySource(rows, schema))
    assert rows_of(mysql_db, "SELECT l, s FROM things") == [('["0001", null, ""]', '{"b": "ff5c", "n": 2}')]
