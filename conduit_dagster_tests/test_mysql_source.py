"""The MySQL/MariaDB source against the real server: every type exactly (value by value against PyMySQL), and a resume
that is exact whatever the checkpoint column's collation, precision or type, or refused up front."""

import dataclasses
import datetime as dt
import subprocess
import sys
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conduit_dagster.engine.sources.mysql as src_mod
from conduit_dagster.engine import mysql
from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.errors import ConduitError, OrderingError, SourceError, SpecError
from conduit_dagster.engine.runner import RunFinished, run_pipeline
from conduit_dagster.engine.sources.mysql import MySQLSource, MySQLSourceSpec, clean_query, uses_last_value
from conduit_dagster.engine.spec import LocalDestinationSpec, ResourceSpec, Secret, load_spec
from conduit_dagster_tests.conftest import MYSQL, mysql_connect, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, output_rows


def spec(db: str, **kw) -> MySQLSourceSpec:
    base = dict(
        name="my",
        host=str(MYSQL["host"]),
        port=int(MYSQL["port"]),
        database=db,
        user=str(MYSQL["user"]),
        password=Secret(str(MYSQL["password"])) if MYSQL["password"] else None,
    )
    base.update(kw)
    return MySQLSourceSpec(**base)


def resource(tmp_path, db: str, query: str, column: str | None = "id", batch: int = 3, **kw) -> ResourceSpec:
    return ResourceSpec(
        name="t",
        source=kw.pop("source", None) or spec(db),
        destination=kw.pop("destination", None) or LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query=query,
        batch_size=batch,
        resume=column is not None,
        checkpoint_column=column,
        **kw,
    )


def execute(db: str, *statements: str, params: list | None = None, session_zone: str = "+00:00") -> None:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET time_zone = '{session_zone}'")
            for statement in statements:
                if params is not None and "%s" in statement:
                    cur.executemany(statement, params)
                else:
                    cur.execute(statement)
    finally:
        conn.close()


def rows_of(db: str, sql: str) -> list[tuple]:
    conn = mysql_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return [tuple(r) for r in cur.fetchall()]
    finally:
        conn.close()


def crash_after(res: ResourceSpec, store: MemoryCheckpointStore, batches: int) -> None:
    """Run until ``batches`` batches are committed and checkpointed, then stop as a crash would."""
    run = run_pipeline(res, store, run_id="first")
    seen = 0
    for event in run:
        if type(event).__name__ == "BatchCommitted":
            seen += 1
            if seen == batches:
                break
    run.close()
    assert store.load("t") is not None, "the crash left a checkpoint"


def crash_and_resume(res: ResourceSpec, batches: int = 2) -> list[tuple]:
    store = MemoryCheckpointStore()
    crash_after(res, store, batches)
    events = list(run_pipeline(res, store, run_id="second"))
    assert events[0].resumed and isinstance(events[-1], RunFinished)
    return output_rows(res.destination.path / "t")


def read_all(db: str, query: str, column: str | None = None, fetch_size: int = 1000, **kw) -> pa.Table:
    src = MySQLSource(spec(db))
    try:
        chunks = list(src.read(query, column, kw.get("after"), resume=kw.get("resume", False), fetch_size=fetch_size))
    finally:
        src.close()
    return pa.Table.from_batches([c.data for c in chunks]) if chunks else pa.table({})


# --- 1. every type, value by value ---------------------------------------------------------------------------------

TYPES = """CREATE TABLE v (
    id INT PRIMARY KEY, u64 BIGINT UNSIGNED, d65 DECIMAL(65,30), d38 DECIMAL(38,27), du DECIMAL(10,2) UNSIGNED,
    bit1 BIT(1), bit64 BIT(64), en ENUM('a','b','c'), st SET('x','y','z'), js JSON, bl BLOB, bn BINARY(4),
    vb VARBINARY(10), t1 TINYINT(1), yr YEAR, tm TIME(6), d DATE, dt6 DATETIME(6), ts6 TIMESTAMP(6) NULL, fl FLOAT,
    db DOUBLE, s VARCHAR(20), l1 VARCHAR(20) CHARACTER SET latin1, i8 TINYINT, mu MEDIUMINT UNSIGNED, lt LONGTEXT
) CHARACTER SET utf8mb4"""
VALUES = [
    (
        1,
        2**64 - 1,
        "12345678901234567890123456789012345.123456789012345678901234567891",
        "1.123456789012345678901234567",
        "99999999.99",
        1,
        2**63 + 5,
        "b",
        "x,z",
        '{"a": 1.10, "s": "\\u00e9😀"}',
        bytes(range(256)),
        b"\x01\x02",
        b"\x00\xff",
        2,
        2155,
        "-838:59:59",
        "0001-01-01",
        "9999-12-31 23:59:59.999999",
        "2038-01-19 03:14:07.999999",
        1.1,
        0.1,
        "😀é\\'\"",
        "é€Ÿ",
        -128,
        16777215,
        "x" * 70000,
    ),
    (
        2,
        2**63 + 1,
        "-0.000000000000000000000000000001",
        "-0.000000000000000000000000001",
        "0.01",
        0,
        0,
        "a",
        "",
        "[1, 2.50]",
        b"",
        b"\xff\xff\xff\xff",
        b"",
        0,
        1901,
        "838:59:59",
        "9999-12-31",
        "1000-01-01 00:00:00.000001",
        "1970-01-01 00:00:01.000001",
        3.4e38,
        -1.7976931348623157e308,
        "",
        "",
        127,
        0,
        "",
    ),
    (3, *([None] * 25)),
    (
        4,
        0,
        "0",
        "0",
        "0",
        0,
        1,
        "c",
        "x,y,z",
        "null",
        b"\x00",
        b"\x00\x00\x00\x00",
        b"\x00",
        -1,
        2000,
        "-00:00:00.000001",
        "1970-01-01",
        "1969-12-31 23:59:59.999999",
        "2001-02-03 04:05:06",
        -0.0,
        5e-324,
        "a\tb\nc",
        "ÿ",
        0,
        1,
        "NULL",
    ),
]


def test_every_type_is_read_exactly(mysql_db):
    execute(mysql_db, TYPES, "INSERT INTO v VALUES (" + ", ".join(["%s"] * 26) + ")", params=VALUES)
    table = read_all(mysql_db, "SELECT * FROM v", "id")
    schema = table.schema
    expected_types = {
        "u64": pa.uint64(),
        "d65": pa.decimal256(65, 30),
        "d38": pa.decimal128(38, 27),
        "du": pa.decimal128(10, 2),
        "bit64": pa.binary(),
        "bl": pa.binary(),
        "tm": pa.duration("us"),
        "d": pa.date32(),
        "dt6": pa.timestamp("us"),
        "ts6": pa.timestamp("us", tz="UTC"),
        "fl": pa.float32(),
        "db": pa.float64(),
        "t1": pa.int8(),
        "yr": pa.int16(),
        "mu": pa.uint32(),
        "js": pa.string(),
        "en": pa.string(),
    }
    for name, t in expected_types.items():
        assert schema.field(name).type == t, name
    got = {r["id"]: r for r in table.to_pylist()}
    names = schema.names
    # PyMySQL's values (text protocol), except FLOAT, whose text has 6 digits: its exact value as a DOUBLE
    select = ", ".join("CAST(fl AS DOUBLE)" if n == "fl" else n for n in names)
    for row in rows_of(mysql_db, f"SELECT {select} FROM v ORDER BY id"):
        mine = got[row[0]]
        for name, want in zip(names, row, strict=True):
            have = mine[name]
            if name == "ts6" and want is not None:
                want = want.replace(tzinfo=dt.UTC)
            if isinstance(want, bytearray):
                want = bytes(want)
            assert type(have) is type(want), (name, have, want)
            assert have == want, (name, have, want)
            if isinstance(want, Decimal):
                assert str(have) == str(want), (name, have, want)  # the same digits, the scale kept
            if isinstance(want, float):
                assert repr(have) == repr(want), (name, have, want)  # -0.0 stays -0.0


def test_both_routes_read_every_column_the_same(mysql_db):
    """Without a checkpoint column the read is one statement through PyMySQL's unbuffered cursor (ConnectorX's stream
    cannot be paged then): the same Arrow types and values as the paged ConnectorX read, in batches of fetch_size."""
    execute(mysql_db, TYPES, "INSERT INTO v VALUES (" + ", ".join(["%s"] * 26) + ")", params=VALUES)
    paged = read_all(mysql_db, "SELECT * FROM v", "id")
    src = MySQLSource(spec(mysql_db))
    try:
        chunks = list(src.read("SELECT * FROM v", None, None, resume=False, fetch_size=3))
    finally:
        src.close()
    assert [c.data.num_rows for c in chunks] == [3, 1] and all(c.keys is None for c in chunks)
    unordered = pa.Table.from_batches([c.data for c in chunks]).sort_by("id")
    assert unordered.schema == paged.schema
    assert unordered.to_pylist() == paged.to_pylist()


def test_timestamp_lands_in_utc_whatever_the_session_zone(mysql_db):
    """A TIMESTAMP is an instant: written from a +05:00 session, it reads as its UTC time; the read's session is UTC."""
    execute(
        mysql_db,
        "CREATE TABLE v (id INT, ts TIMESTAMP(6) NULL, d DATETIME(6))",
        "INSERT INTO v VALUES (1, '2025-03-30 03:30:00.000001', '2025-03-30 03:30:00.000001')",
        session_zone="+05:00",
    )
    table = read_all(mysql_db, "SELECT id, ts, d, @@session.time_zone AS tz, @@session.character_set_results AS cs FROM v")
    (row,) = table.to_pylist()
    assert row["ts"] == dt.datetime(2025, 3, 29, 22, 30, 0, 1, tzinfo=dt.UTC)
    assert row["d"] == dt.datetime(2025, 3, 30, 3, 30, 0, 1)  # a DATETIME has no zone: as written
    assert (row["tz"], row["cs"]) == ("+00:00", "utf8mb4")


# --- 2. text keys: collations that are case- and accent-insensitive and PAD SPACE ----------------------------------

TEXTS = ["ABC", "abc", "x", "x ", "á", "a", "A", "é", "e", "€", "😀", "b"]


@pytest.mark.parametrize(
    "coltype",
    [
        "VARCHAR(10) COLLATE utf8mb4_general_ci",
        "VARCHAR(10) COLLATE utf8mb4_unicode_ci",
        "TEXT COLLATE utf8mb4_bin",
        "VARCHAR(10) CHARACTER SET latin1",
    ],
)
def test_text_keys_resume_exactly_whatever_the_collation(tmp_path, mysql_db, coltype):
    """'a' = 'A' = 'á' and 'x' = 'x ' in these collations: compared as they are, a cut between two of them resumed past
    both. Every value is loaded once (three rows each), across a crash after two batches of 2."""
    values = [v for v in TEXTS if "latin1" not in coltype or v not in ("😀",)]
    execute(
        mysql_db,
        f"CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k {coltype})",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(v,) for v in values for _ in range(3)],
    )
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=2), batches=2)
    assert_same_rows(rows_of(mysql_db, "SELECT i, k FROM v"), got)
    assert sorted({k for _, k in got}) == sorted(set(values))  # 'x ' kept its space, 'á' is not 'a'


def test_char_key_reads_without_its_trailing_spaces(tmp_path, mysql_db):
    """CHAR(n) gives its values without trailing spaces, so 'x' and 'x ' are one value: loaded as two rows 'x'."""
    execute(
        mysql_db,
        "CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k CHAR(5))",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(v,) for v in ["x", "x ", "X", "a", "a ", "b", "x", "c"]],
    )
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=2), batches=1)
    assert_same_rows(rows_of(mysql_db, "SELECT i, k FROM v"), got)
    assert sorted(k for _, k in got) == ["X", "a", "a", "b", "c", "x", "x", "x"]


# --- 3. dates and timestamps: microseconds, ties, precision of the bound ---------------------------------------------


@pytest.mark.parametrize("coltype", ["DATETIME(6)", "TIMESTAMP(6)", "DATETIME", "DATE"])
def test_temporal_keys_with_repeats_resume_exactly(tmp_path, mysql_db, coltype):
    base = dt.datetime(2025, 1, 1)
    steps = [dt.timedelta(microseconds=m) for m in (0, 1, 1, 2, 999999, 1000000)] + [dt.timedelta(days=d) for d in (1, 2)]
    execute(
        mysql_db,
        f"CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k {coltype} NULL)",
        "INSERT INTO v (k) VALUES (%s)",
        params=[((base + s).isoformat(" "),) for s in steps for _ in range(3)],
    )
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=4), batches=2)
    want = rows_of(mysql_db, "SELECT i, k FROM v")
    if coltype.startswith("TIMESTAMP"):
        want = [(i, k.replace(tzinfo=dt.UTC)) for i, k in want]
    assert_same_rows(want, got)


@pytest.mark.parametrize("coltype", ["DATETIME", "DATETIME(3)", "TIMESTAMP NULL"])
def test_a_bound_more_precise_than_the_column_is_never_rounded(mysql_db, coltype):
    """Cast to the column's precision, '00:00:00.5' truncates to '00:00:00' (then `k >= :last_value` loads the row at
    00:00:00 again) or, with TIME_ROUND_FRACTIONAL, rounds to '00:00:01' (then `k > ...` loses the row at 00:00:01)."""
    execute(
        mysql_db,
        f"CREATE TABLE v (i INT, k {coltype})",
        "INSERT INTO v VALUES (1, '2025-01-01 00:00:00'), (2, '2025-01-01 00:00:01'), (3, '2025-01-01 00:00:02')",
    )
    after = dt.datetime(2025, 1, 1, 0, 0, 0, 500000)
    table = read_all(mysql_db, "SELECT i, k FROM v", "k", after=after, resume=True)
    assert table.column("i").to_pylist() == [2, 3]
    src = MySQLSource(spec(mysql_db))
    try:
        src.bind({"last_value": after})
        chunks = list(src.read("SELECT i, k FROM v WHERE k >= :last_value", "k", None, resume=False, fetch_size=10))
        assert [i for c in chunks for i in c.data.column("i").to_pylist()] == [2, 3]
        with src.conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',TIME_ROUND_FRACTIONAL')")
        assert src.count("SELECT i, k FROM v", ("k", after)) == 1
        src.bind({"last_value": after})
        assert src.count("SELECT i, k FROM v WHERE k > :last_value") == 2
    finally:
        src.close()


# --- 4. NULL, zero dates, NaN ---------------------------------------------------------------------------------------


def test_null_key_refused_before_any_row_is_written(tmp_path, mysql_db):
    execute(mysql_db, "CREATE TABLE v (i INT, k INT)", "INSERT INTO v VALUES (1, 1), (2, 2), (3, NULL), (4, 4)")
    with pytest.raises(OrderingError, match=r"checkpoint column 'k' holds NULL.*WHERE k IS NOT NULL"):
        list(run_pipeline(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=1), MemoryCheckpointStore()))
    assert not (tmp_path / "out" / "t").exists()


def test_null_key_that_appears_below_the_checkpoint_stops_the_resume(tmp_path, mysql_db):
    """NULL sorts first: a resumed read past 2 would never meet it; the resumed read asks for NULLs too."""
    execute(mysql_db, "CREATE TABLE v (i INT, k INT)", "INSERT INTO v VALUES (1, 1), (2, 2), (3, 3), (4, 4)")
    res = resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=2)
    store = MemoryCheckpointStore()
    crash_after(res, store, 1)
    execute(mysql_db, "INSERT INTO v VALUES (5, NULL)")
    with pytest.raises(OrderingError, match=r"'k' holds NULL"):
        list(run_pipeline(res, store, run_id="second"))


@pytest.mark.parametrize("zero", ["0000-00-00 00:00:00", "2025-00-10 00:00:00", "2025-02-00 12:00:00"])
def test_zero_date_key_refused_before_any_row_is_written(tmp_path, mysql_db, zero):
    """A zero-in-date sorts among the others ('2025-00-10' between 2024 and 2025-01-01): found by the read, it would
    stop the run after the rows before it were written. Found first, on a second connection."""
    execute(mysql_db, "SET SESSION sql_mode = ''", "CREATE TABLE v (i INT, k DATETIME)")
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = ''")
        cur.executemany("INSERT INTO v VALUES (%s, %s)", [(i, f"2024-{i:02d}-01") for i in range(1, 13)])
        cur.execute("INSERT INTO v VALUES (99, %s)", (zero,))
    conn.close()
    with pytest.raises(SourceError, match=rf"checkpoint column 'k' holds '{zero[:10]}.*nothing was written"):
        list(run_pipeline(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=2), MemoryCheckpointStore()))
    assert not (tmp_path / "out" / "t").exists()


@pytest.mark.parametrize(
    "coltype,zero", [("DATE", "0000-00-00"), ("DATETIME(6)", "2025-00-01 00:00:00"), ("TIMESTAMP NULL", "0")]
)
def test_zero_date_in_another_column_is_an_error_naming_it(tmp_path, mysql_db, coltype, zero):
    """ConnectorX panics on a zero date, and NULL in its place would be a silent change: refused, naming the column and
    the value, before the batch holding it is written; NULLs in the same column are fine."""
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = ''")
        cur.execute(f"CREATE TABLE v (i INT, d {coltype})")
        cur.execute("INSERT INTO v VALUES (1, NULL), (2, '2025-01-01'), (3, %s), (4, '2025-01-02')", (zero,))
    conn.close()
    with pytest.raises(SourceError, match=r"column 'd' holds '0000-00-00|column 'd' holds '2025-00-01"):
        list(run_pipeline(resource(tmp_path, mysql_db, "SELECT i, d FROM v", "i", batch=10), MemoryCheckpointStore()))
    assert not (tmp_path / "out" / "t").exists()
    table = read_all(mysql_db, "SELECT i, d FROM v WHERE i <> 3", "i")
    assert table.column("d").null_count == 1


def test_nan_cannot_reach_a_double_key(mysql_db):
    """MySQL cannot store NaN, and its math gives NULL instead (SQRT(-1), 0e0/0e0): a NULL key, refused as such."""
    assert rows_of(mysql_db, "SELECT SQRT(-1), 0e0/0e0") == [(None, None)]
    with pytest.raises(OrderingError, match="holds NULL"):
        read_all(mysql_db, "SELECT 1 AS i, SQRT(-1) AS k", "k")


# --- 5. key types: exact ones resume, others are refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    "coltype,values",
    [
        ("BIGINT UNSIGNED", [0, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1]),
        ("DECIMAL(65,30)", ["-1.000000000000000000000000000001", "0", "1e-30", "2e-30", "99999999999999999999999999999999999"]),
        ("DOUBLE", [-1.7976931348623157e308, -0.0, 5e-324, 0.1, 0.30000000000000004]),
        ("VARBINARY(10)", [b"", b"\x00", b"\x00\x00", b"A", b"a", b"a\x00", b"\xff"]),
        ("YEAR", [1901, 2000, 2155]),
    ],
)
def test_exact_key_types_resume_exactly(tmp_path, mysql_db, coltype, values):
    execute(
        mysql_db,
        f"CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k {coltype})",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(v,) for v in values for _ in range(2)],
    )
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=3), batches=1)
    want = rows_of(mysql_db, "SELECT i, k FROM v")
    assert_same_rows([(i, bytes(k) if isinstance(k, bytearray) else k) for i, k in want], got)


@pytest.mark.parametrize(
    "coltype,value,why,fix",
    [
        ("FLOAT", "1.5", "single precision", r"CAST\(k AS DOUBLE\) AS k"),
        ("TIME", "'10:00:00'", "TIME", r"TIME_TO_SEC\(k\) AS k"),
        ("BIT(8)", "1", "BIT compares as a number", r"CAST\(k AS UNSIGNED\) AS k"),
        ("GEOMETRY", None, "spatial", "another column"),
    ],
)
def test_inexact_key_types_are_refused(tmp_path, mysql_db, coltype, value, why, fix):
    execute(mysql_db, f"CREATE TABLE v (i INT, k {coltype})")
    if value is not None:
        execute(mysql_db, f"INSERT INTO v VALUES (1, {value})")
    res = resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k")
    with pytest.raises(SourceError, match=rf"checkpoint column 'k' has MySQL type .*{why}.*{fix}"):
        list(run_pipeline(res, MemoryCheckpointStore()))
    assert not (tmp_path / "out" / "t").exists()


def test_float_key_cast_to_double_resumes_exactly(tmp_path, mysql_db):
    """The way out the refusal names: the stored single-precision values, widened exactly."""
    execute(
        mysql_db,
        "CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k FLOAT)",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(v,) for v in (1.1, 1.1, 2.2, 3.3, 3.3, 1e30, 1e30)],
    )
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, CAST(k AS DOUBLE) AS k FROM v", "k", batch=2), batches=1)
    assert_same_rows(rows_of(mysql_db, "SELECT i, CAST(k AS DOUBLE) FROM v"), got)


# --- 6. :last_value, sensors, asset checks --------------------------------------------------------------------------


def test_incremental_on_a_case_insensitive_text_key_is_refused(tmp_path, mysql_db):
    """`k >= :last_value` under utf8mb4_general_ci lets 'a' through after 'B' and drops 'x ' after 'x'."""
    execute(mysql_db, "CREATE TABLE v (i INT, k VARCHAR(10))", "INSERT INTO v VALUES (1, 'a'), (2, 'B')")
    res = dataclasses.replace(
        resource(tmp_path, mysql_db, "SELECT i, k FROM v WHERE k >= :last_value", "k"),
        incremental_column="k",
        initial_value="",
    )
    with pytest.raises(SourceError, match=r"incremental column 'k' is text with collation utf8mb4_general_ci.*nopad_bin"):
        list(run_pipeline(res, MemoryCheckpointStore()))
    assert not (tmp_path / "out" / "t").exists()
    # the way out the error names
    fixed = "CONVERT(k USING utf8mb4) COLLATE utf8mb4_nopad_bin"
    res = dataclasses.replace(res, query=f"SELECT i, {fixed} AS k FROM v WHERE {fixed} >= :last_value")
    list(run_pipeline(res, MemoryCheckpointStore()))
    assert sorted(output_rows(tmp_path / "out" / "t")) == [(1, "a"), (2, "B")]


def test_incremental_on_a_code_point_collation_compares_exactly(mysql_db):
    execute(
        mysql_db,
        "CREATE TABLE v (i INT, k VARCHAR(10) COLLATE utf8mb4_nopad_bin)",
        "INSERT INTO v VALUES (1, 'B'), (2, 'a'), (3, 'x'), (4, 'x '), (5, 'X')",
    )
    src = MySQLSource(spec(mysql_db))
    try:
        src.bind({"last_value": "x"})
        chunks = list(src.read("SELECT i, k FROM v WHERE k >= :last_value", "k", None, resume=False, fetch_size=10))
        assert [k for c in chunks for k in c.keys.to_pylist()] == ["x", "x "]
    finally:
        src.close()


def test_incremental_datetime_key_loads_late_rows_at_the_boundary_once(tmp_path, mysql_db):
    execute(
        mysql_db,
        "CREATE TABLE v (i INT, k DATETIME(6))",
        "INSERT INTO v VALUES (1, '2025-01-01 00:00:00.000001'), (2, '2025-01-02 00:00:00.000001')",
    )
    res = dataclasses.replace(
        resource(tmp_path, mysql_db, "SELECT i, k FROM v WHERE k >= :last_value", "k"),
        incremental_column="k",
        initial_value=dt.datetime(2025, 1, 1, 0, 0, 0, 1),
    )
    store = MemoryCheckpointStore()
    list(run_pipeline(res, store, run_id="one"))
    execute(mysql_db, "INSERT INTO v VALUES (3, '2025-01-02 00:00:00.000001'), (4, '2025-01-02 00:00:00.000002')")
    list(run_pipeline(res, store, run_id="two"))
    assert sorted(output_rows(tmp_path / "out" / "t")) == sorted(rows_of(mysql_db, "SELECT i, k FROM v"))


def test_max_value_and_count_use_the_resume_order(mysql_db):
    """Byte-wise: 'a' > 'B' (the collation's own max() says 'B'), and 'x ' > 'x'; a TIMESTAMP as the read gives it."""
    execute(
        mysql_db,
        "CREATE TABLE v (i INT, k VARCHAR(10), ts TIMESTAMP(6) NULL)",
        "INSERT INTO v VALUES (1, 'a', '2025-01-01 00:00:00.5'), (2, 'B', NULL), (3, 'x', NULL), (4, 'x ', NULL), "
        "(5, NULL, NULL)",
    )
    src = MySQLSource(spec(mysql_db))
    try:
        assert src.max_value("SELECT i, k FROM v", "k") == "x "
        assert src.max_value("SELECT i, k FROM v WHERE k < 'b'", "k") == "a"
        assert src.count("SELECT i, k FROM v", ("k", "B")) == 1
        assert src.count("SELECT i, k FROM v", ("k", "x")) == 3
        assert src.count("SELECT i, k FROM v") == 5
        assert src.max_value("SELECT ts FROM v", "ts") == dt.datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=dt.UTC)
        assert src.max_value("SELECT i, k FROM v WHERE i > 10", "k") is None
        assert src.key_type("SELECT i, k FROM v", "k") == (str,)
        assert src.key_type("SELECT ts FROM v", "ts") == (dt.datetime,)
    finally:
        src.close()


# --- 7. the query: wrapped whatever its form; errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT i, k FROM v ORDER BY k DESC;",
        "SELECT i, k FROM v -- a comment ; with a semicolon",
        "SELECT i, k FROM v # a hash comment 'with a quote",
        "SELECT i, k FROM v /* a block ; */ ;",
        "SELECT i, k, 'it\\'s -- not a comment; ' AS s FROM v;",
        'SELECT i, k, "say \\"hi\\"; -- " AS s FROM v',
        "SELECT i, k, '100%' AS s FROM v WHERE k LIKE '%'",
        "WITH w AS (SELECT i, k FROM v) SELECT i, k FROM w",
        "SELECT i, k, 5--1 AS s FROM v",
    ],
)
def test_any_select_is_wrapped(mysql_db, query):
    execute(mysql_db, "CREATE TABLE v (i INT, k INT)", "INSERT INTO v VALUES (1, 3), (2, 1), (3, 2)")
    table = read_all(mysql_db, query + "\n-- trailing comment", "k")
    assert table.column("k").to_pylist() == [1, 2, 3]
    direct = rows_of(mysql_db, clean_query(query))
    assert sorted(tuple(r.values()) for r in table.to_pylist()) == sorted(direct)


def test_query_text_is_read_as_mysql_reads_it():
    assert clean_query("SELECT 'a\\'b' AS x; -- end") == "SELECT 'a\\'b' AS x"
    assert clean_query("SELECT 1 # c ; \n ;") == "SELECT 1"
    assert clean_query("SELECT 5--1") == "SELECT 5--1"  # no comment without a space after --
    assert not uses_last_value("SELECT 1 # :last_value")
    assert not uses_last_value("SELECT ':last_value'")
    assert uses_last_value("SELECT 1 FROM t WHERE k >= :last_value")
    with pytest.raises(SpecError, match="more than one statement"):
        clean_query("SELECT 1; SELECT 2")
    with pytest.raises(SpecError, match="unterminated"):
        clean_query("SELECT 'a\\'")


def test_a_hostile_checkpoint_value_is_bound_not_pasted(tmp_path, mysql_db):
    """A checkpoint value is bound as a literal by PyMySQL's escaping (text as X'...' bytes), never formatted into the SQL."""
    execute(
        mysql_db,
        "CREATE TABLE v (i INT, k VARCHAR(40))",
        "INSERT INTO v VALUES (%s, %s)",
        params=[(1, "a"), (2, "b'; DROP TABLE v; -- \\"), (3, "c%s%%"), (4, "d")],
    )
    table = read_all(mysql_db, "SELECT i, k FROM v", "k", after="b'; DROP TABLE v; -- \\", resume=True)
    assert table.column("i").to_pylist() == [3, 4]
    read_all(mysql_db, "SELECT i, k FROM v", "i", after="1 OR 1=1", resume=True)  # the wrong type: compared, no harm
    assert rows_of(mysql_db, "SELECT COUNT(*) FROM v") == [(4,)]


def test_a_query_without_the_checkpoint_column_is_a_clear_error(mysql_db):
    src = MySQLSource(spec(mysql_db))
    try:
        with pytest.raises(SourceError, match=r"checkpoint_column 'id' is not a column of the query's result \(columns: x\)"):
            src.probe("SELECT 1 AS x", "id")
        with pytest.raises(SourceError, match=r"query failed: \(1146, \"Table .*nope' doesn't exist"):
            src.probe("SELECT * FROM nope", None)
    finally:
        src.close()


def test_a_read_error_passes_through_redaction(mysql_db):
    """An error ConnectorX raises mid-read says what failed, never the URL it connected with."""
    execute(mysql_db, "CREATE TABLE v (i INT)", "INSERT INTO v VALUES (1)")
    src = MySQLSource(spec(mysql_db))
    try:
        with pytest.raises(SourceError, match=r"read failed") as info:
            # valid for the probe (zero rows), fails when rows are read
            list(src.read("SELECT i, (SELECT 1 UNION SELECT 2) AS two FROM v", None, None, resume=False, fetch_size=10))
    finally:
        src.close()
    assert "root@" not in str(info.value) and "mysql://" in str(info.value)


def test_connection_errors_never_show_the_password(tmp_path, mysql_db):
    bad = spec(mysql_db, password=Secret("s3cr3t-pw"), user="conduit_nobody")
    with pytest.raises(SourceError) as info:
        MySQLSource(bad)
    assert "s3cr3t-pw" not in str(info.value) and "cannot connect" in str(info.value)
    url = spec(mysql_db, url=Secret("mysql://conduit_nobody:s3cr3t%2Fpw@127.0.0.1:3306/x"), host="h", user=None)
    with pytest.raises(SourceError) as info:
        MySQLSource(url)
    assert "s3cr3t" not in str(info.value)
    assert mysql.describe(url) == "mysql://127.0.0.1:3306/x"


def test_pages_never_split_or_repeat_a_tie(mysql_db, monkeypatch):
    """With pages of a few rows, ties longer than a page and ties straddling a page's end are read whole, once."""
    monkeypatch.setattr(src_mod, "FIRST_PAGE_ROWS", 4)
    monkeypatch.setattr(src_mod, "PAGE_BYTES", 64)
    monkeypatch.setattr(src_mod, "MIN_PAGE_ROWS", 3)
    keys = [1] * 9 + [2, 3, 3, 3, 4, 5, 5, 6, 7, 7, 7, 7, 7, 8]
    execute(
        mysql_db,
        "CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k VARCHAR(3))",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(str(k),) for k in keys],
    )
    src = MySQLSource(spec(mysql_db))
    try:
        chunks = list(src.read("SELECT i, k FROM v", "k", None, resume=False, fetch_size=1))
        resumed = list(src.read("SELECT i, k FROM v", "k", "3", resume=True, fetch_size=1))
    finally:
        src.close()
    rows = [r for c in chunks for r in c.data.to_pylist()]
    assert sorted(r["i"] for r in rows) == list(range(1, len(keys) + 1))
    assert [r["k"] for r in rows] == sorted(str(k) for k in keys)
    assert sorted(r["k"] for c in resumed for r in c.data.to_pylist()) == [str(k) for k in keys if k > 3]


# --- 8. ingest.yml, validate, describe -------------------------------------------------------------------------------


def _yaml_source(db: str, extra: str = "") -> str:
    password = f"    password: {MYSQL['password']}\n" if MYSQL["password"] else ""
    return (
        f"sources:\n  - name: shop\n    type: mysql\n    host: {MYSQL['host']}\n    port: {MYSQL['port']}\n"
        f"    database: {db}\n    user: {MYSQL['user']}\n{password}{extra}"
    )


def test_ingest_yml_run_and_validate(tmp_path, mysql_db):
    execute(mysql_db, "CREATE TABLE v (id INT, s VARCHAR(5))", "INSERT INTO v VALUES (1, 'a'), (2, 'it''s')")
    path = write_ingest(
        tmp_path,
        _yaml_source(mysql_db, "    resume: true\n    checkpoint_column: id\n")
        + "destinations:\n  - name: lake\n    type: local\n    path: out\n"
        + "resources:\n  - name: t\n    source: shop\n    destination: lake\n"
        + "    query: SELECT id, s, 'a\\'b' AS q FROM v;  # MySQL's own comment\n",
    )
    spec_ = load_spec(path)
    (res,) = spec_.resources
    assert res.source.type == "mysql" and res.checkpoint_column == "id"
    out = subprocess.run(
        [sys.executable, "-m", "conduit_dagster.cli", "validate", "--file", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"source shop: ok, mysql://{MYSQL['host']}:{MYSQL['port']}/{mysql_db}" in out.stdout
    assert "resource t: ok" in out.stdout and "3 columns" in out.stdout
    events = list(run_pipeline(res, MemoryCheckpointStore()))
    assert events[-1].rows_this_run == 2
    assert pq.read_table(tmp_path / "out" / "t").column("q").to_pylist() == ["a'b", "a'b"]


def test_validate_reports_a_refused_key_and_hides_the_url(tmp_path, mysql_db):
    execute(mysql_db, "CREATE TABLE v (id FLOAT)")
    auth = f"{MYSQL['user']}:{MYSQL['password']}" if MYSQL["password"] else f"{MYSQL['user']}:"
    path = write_ingest(
        tmp_path,
        f"sources:\n  - name: shop\n    type: mysql\n    url: mysql://{auth}@{MYSQL['host']}:{MYSQL['port']}/{mysql_db}\n"
        "destinations:\n  - name: lake\n    type: local\n    path: out\n"
        "resources:\n  - name: t\n    source: shop\n    destination: lake\n    resume: true\n    checkpoint_column: id\n"
        "    query: SELECT id FROM v\n",
    )
    out = subprocess.run(
        [sys.executable, "-m", "conduit_dagster.cli", "validate", "--file", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "resource t: FAILED" in out.stdout and "single precision" in out.stdout
    assert f"{auth}@" not in out.stdout + out.stderr


def test_errors_are_conduit_errors(mysql_db):
    src = MySQLSource(spec(mysql_db))
    try:
        with pytest.raises(ConduitError):
            src.count("SELECT * FROM nope")
        with pytest.raises(ConduitError):
            src.max_value("SELECT 1 AS k FROM nope", "k")
    finally:
        src.close()


def test_odd_column_names_empty_results_and_enum_keys(tmp_path, mysql_db):
    execute(
        mysql_db,
        "CREATE TABLE v (i INT, `we``ird k` VARCHAR(5), e ENUM('b', 'a', 'C'))",
        "INSERT INTO v VALUES (1, 'b', 'b'), (2, 'a', 'a'), (3, 'C', 'C'), (4, 'a', 'a'), (5, 'b', 'b')",
    )
    table = read_all(mysql_db, "SELECT i, `we``ird k` FROM v", "we`ird k")
    assert table.column("we`ird k").to_pylist() == ["C", "a", "a", "b", "b"]  # byte-wise: 'C' < 'a'
    assert read_all(mysql_db, "SELECT i, e FROM v WHERE i > 99", "e").num_rows == 0
    assert read_all(mysql_db, "SELECT i, e FROM v WHERE i > 99").num_rows == 0
    # an ENUM is ordered by its declaration ('b' < 'a'); as a checkpoint column, by its text
    got = crash_and_resume(resource(tmp_path, mysql_db, "SELECT i, e FROM v", "e", batch=1), batches=2)
    assert_same_rows(rows_of(mysql_db, "SELECT i, e FROM v"), got)


@pytest.fixture
def mysql_user(mysql_db):
    """A user with a password full of URL delimiters, allowed to read ``mysql_db``."""
    import uuid

    name, password = f"conduit_u_{uuid.uuid4().hex[:8]}", "p@ss:w/rd#?%&x y"
    conn = mysql_connect(None)
    with conn.cursor() as cur:
        cur.execute(f"CREATE USER '{name}'@'%%' IDENTIFIED BY %s", (password,))
        cur.execute(f"GRANT SELECT ON `{mysql_db}`.* TO '{name}'@'%'")
    yield name, password
    with conn.cursor() as cur:
        cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
    conn.close()


def test_a_password_with_url_delimiters_reaches_connectorx_and_never_shows(mysql_db, mysql_user):
    user, password = mysql_user
    execute(mysql_db, "CREATE TABLE v (i INT)", "INSERT INTO v VALUES (1), (2)")
    src = MySQLSource(spec(mysql_db, user=user, password=Secret(password)))
    try:
        chunks = list(src.read("SELECT i FROM v", "i", None, resume=False, fetch_size=10))
        assert [i for c in chunks for i in c.data.column("i").to_pylist()] == [1, 2]
        with pytest.raises(SourceError) as info:
            list(src.read("SELECT i, (SELECT 1 UNION SELECT 2) AS two FROM v", "i", None, resume=False, fetch_size=10))
        with pytest.raises(SourceError) as denied:
            src.probe("SELECT * FROM mysql.user", None)
    finally:
        src.close()
    for exc in (info.value, denied.value):
        text = str(exc)
        assert password not in text and "p%40ss" not in text and "w%2Frd" not in text, text


def test_text_keys_longer_than_the_servers_sort_prefix_are_exact_or_refused(tmp_path, mysql_db, monkeypatch):
    """The server orders text on its first max_sort_length bytes only: 'P..a', 'P..c', 'P..b' (sharing 70 bytes) come
    back in any order. A page of 'P..a', 'P..c' that went on from 'P..c' lost 'P..b' silently; the page now holds back
    every row sharing the prefix, and the order within them is checked: the run is exact or stops saying so."""
    monkeypatch.setattr(src_mod, "SOURCE_SESSION", (*src_mod.SOURCE_SESSION, "SET SESSION max_sort_length = 64"))
    monkeypatch.setattr(src_mod, "FIRST_PAGE_ROWS", 2)
    monkeypatch.setattr(src_mod, "MIN_PAGE_ROWS", 2)
    prefix = "p" * 70
    execute(
        mysql_db,
        "CREATE TABLE v (i INT AUTO_INCREMENT PRIMARY KEY, k VARCHAR(100))",
        "INSERT INTO v (k) VALUES (%s)",
        params=[(prefix + s,) for s in "bcda"],  # MariaDB 10.11 answers LIMIT 2 with ..a, ..c
    )
    res = resource(tmp_path, mysql_db, "SELECT i, k FROM v", "k", batch=1)
    try:
        list(run_pipeline(res, MemoryCheckpointStore()))
    except OrderingError as exc:
        assert "went backwards" in str(exc)
        return
    assert_same_rows(rows_of(mysql_db, "SELECT i, k FROM v"), output_rows(tmp_path / "out" / "t"))


def test_max_value_compares_whole_text_beyond_the_sort_prefix(mysql_db, monkeypatch):
    monkeypatch.setattr(src_mod, "SOURCE_SESSION", (*src_mod.SOURCE_SESSION, "SET SESSION max_sort_length = 64"))
    prefix = "p" * 70
    execute(
        mysql_db,
        "CREATE TABLE v (k TEXT, b BLOB)",
        "INSERT INTO v VALUES (%s, %s)",
        params=[(prefix + s, (prefix + s).encode()) for s in "azmb"],
    )
    src = MySQLSource(spec(mysql_db))
    try:
        assert src.max_value("SELECT k FROM v", "k") == prefix + "z"
        assert src.max_value("SELECT b FROM v", "b") == (prefix + "z").encode()
    finally:
        src.close()


@pytest.mark.parametrize("column", ["i", None])
def test_a_connection_killed_mid_read_fails_instead_of_ending_short(mysql_db, column):
    """Both routes (ConnectorX pages, PyMySQL's unbuffered cursor): a read whose connection dies raises, never ends as if
    the rows were all there."""
    execute(
        mysql_db,
        "CREATE TABLE v (i INT PRIMARY KEY, p VARCHAR(100))",
        "INSERT INTO v SELECT seq, REPEAT('x', 100) FROM seq_1_to_300000",
    )
    src = MySQLSource(spec(mysql_db))
    killer = mysql_connect(None)
    seen = 0
    try:
        with pytest.raises(SourceError, match="read failed"):
            for chunk in src.read("SELECT i, p, 'conduit-kill-me' AS tag FROM v", column, None, resume=False, fetch_size=1000):
                if seen == 0:
                    with killer.cursor() as cur:
                        cur.execute(
                            "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND INFO NOT LIKE %s",
                            ("%conduit-kill-me%", "%PROCESSLIST%"),
                        )
                        for (pid,) in cur.fetchall():
                            cur.execute(f"KILL {int(pid)}")
                seen += chunk.data.num_rows
    finally:
        src.close()
        killer.close()
    assert seen < 300000


def test_dagster_job_row_count_check_and_sensor_on_a_text_key(tmp_path, mysql_db, monkeypatch):
    """Through Dagster: the asset's kinds, the row-count check, and a sensor whose checkpoint column is text on a
    case-insensitive, PAD SPACE collation: 'á ' after 'á' is a newer value (the collation's own max() sees none)."""
    from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context

    from conduit_dagster.definitions import build_definitions

    execute(
        mysql_db,
        "CREATE TABLE v (i INT, k VARCHAR(10))",
        "INSERT INTO v VALUES (%s, %s)",
        params=[(i, k) for i, k in enumerate(["A", "a", "á", "b", "x"])],
    )
    path = write_ingest(
        tmp_path,
        _yaml_source(mysql_db, "    resume: true\n    checkpoint_column: k\n")
        + "destinations:\n  - name: lake\n    type: local\n    path: lake\n"
        + "resources:\n  - name: words\n    source: shop\n    destination: lake\n    batch_size: 2\n    sensor: true\n"
        + "    query: SELECT i, k FROM v\n",
    )
    monkeypatch.setenv("CONDUIT_CHECKPOINT_DIR", str(tmp_path / "cps"))
    defs = build_definitions(path)
    asset = next(iter(defs.resolve_all_asset_specs()))
    assert "mysql" in asset.kinds
    (sensor,) = defs.sensors or []
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_words").execute_in_process(instance=instance)
        assert result.success
        (check,) = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        evaluation = check.event_specific_data
        assert evaluation.passed and evaluation.metadata["conduit/source_rows"].value == 5
        quiet = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(quiet, SkipReason) and "no rows beyond k = 'á'" in quiet.skip_message
        execute(mysql_db, "INSERT INTO v VALUES (5, 'á ')")
        again = sensor(build_sensor_context(instance=instance, resources=defs.resources))
        assert isinstance(again, RunRequest) and again.tags["conduit/newest"] == "á "
    assert sorted(output_rows(tmp_path / "lake" / "words")) == sorted(rows_of(mysql_db, "SELECT i, k FROM v WHERE i < 5"))


def test_expressions_spatial_and_mariadb_types_read_as_pymysql_reads_them(mysql_db):
    query = (
        "SELECT 1 AS i, POINT(1, 2) AS g, JSON_OBJECT('a', 1.10) AS j, NULL AS n, 1.5e0 AS d, 2 / 3 AS q, "
        "CAST('::1' AS INET6) AS ip, CAST('123e4567-e89b-12d3-a456-426614174000' AS UUID) AS u, "
        "SUM(1) AS s, b'101' AS bits, _latin1 x'80' AS euro"
    )
    table = read_all(mysql_db, query, "i")
    (row,) = table.to_pylist()
    (want,) = rows_of(mysql_db, query)
    assert table.schema.field("g").type == pa.binary()  # MariaDB's own bytes (SRID + WKB), as PyMySQL gives them
    assert table.schema.field("q").type == pa.decimal128(5, 4) and table.schema.field("s").type == pa.decimal128(23, 0)
    assert list(row.values()) == [bytes(v) if isinstance(v, bytearray) else v for v in want]


def test_zero_date_in_a_not_null_column_and_the_named_way_out(tmp_path, mysql_db):
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = ''")
        cur.execute("CREATE TABLE v (i INT, d DATETIME NOT NULL, t TIMESTAMP NOT NULL DEFAULT '0000-00-00 00:00:00')")
        cur.execute("INSERT INTO v (i, d, t) VALUES (1, '2025-01-01', '2025-01-01'), (2, '0000-00-00', '2025-01-01')")
    conn.close()
    with pytest.raises(SourceError, match=r"column 'd' holds '0000-00-00 00:00:00'.*IF\(TO_DAYS\(d\) IS NULL, NULL, d\) AS d"):
        read_all(mysql_db, "SELECT i, d, t FROM v", "i")
    with pytest.raises(SourceError, match=r"column 'd' holds"):
        read_all(mysql_db, "SELECT i, d, t FROM v")  # the unordered route too
    table = read_all(mysql_db, "SELECT i, IF(TO_DAYS(d) IS NULL, NULL, d) AS d, t FROM v", "i")
    assert table.column("d").to_pylist() == [dt.datetime(2025, 1, 1), None]
