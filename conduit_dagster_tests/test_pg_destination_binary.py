"""The PostgreSQL destination's COPY encodings against the real server: every value lands exactly as the same value
inserted as a bound parameter, whether the batch goes in binary or as CSV; values PostgreSQL cannot hold are refused,
never turned into something else (in binary, the extreme integers mean -infinity/infinity)."""

import datetime as dt
import math

import psycopg2
import pyarrow as pa
import pytest

from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.destinations.postgresql import _binary_plan
from conduit_dagster.engine.errors import DestinationError
from conduit_dagster.engine.spec import PostgresDestinationSpec

DSN = "host=127.0.0.1 dbname=test user=postgres"
UTC = dt.UTC
PARIS = dt.timezone(dt.timedelta(hours=1))


def typed(name: str, t: pa.DataType, pg_type: str | None = None) -> pa.Field:
    return pa.field(name, t, metadata={"conduit.pg_type": pg_type} if pg_type else None)


def values_table() -> pa.Table:
    """One row per case, a NULL in every column somewhere; values at the edges of each type."""
    ts = [
        dt.datetime(2000, 1, 1, tzinfo=UTC),  # PostgreSQL's zero
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(1, 1, 1, tzinfo=UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        None,
        dt.datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=UTC),
    ]
    columns = {
        typed("id", pa.int64()): [1, 2, 3, 4, 5, 6, 7],
        typed("flag", pa.bool_()): [True, False, None, True, False, True, False],
        typed("i8", pa.int8()): [-128, 127, 0, None, 1, -1, 5],
        typed("i16", pa.int16()): [-32768, 32767, None, 0, 1, -1, 5],
        typed("i32", pa.int32()): [-(2**31), 2**31 - 1, 0, None, 1, -1, 5],
        typed("i64", pa.int64()): [-(2**63), 2**63 - 1, 0, 1, None, -1, 9007199254740993],
        typed("u8", pa.uint8()): [0, 255, None, 1, 2, 3, 4],
        typed("u16", pa.uint16()): [0, 65535, 1, None, 2, 3, 4],
        typed("u32", pa.uint32()): [0, 2**32 - 1, 1, 2, None, 3, 4],
        typed("u64", pa.uint64()): [0, 2**63 - 1, 1, 2, 3, None, 4],
        typed("f32", pa.float32()): [0.1, -0.0, math.inf, -math.inf, math.nan, 1e-45, None],
        typed("f64", pa.float64()): [0.1, -0.0, math.inf, math.nan, 5e-324, 1.7976931348623157e308, None],
        typed("ts", pa.timestamp("us", tz="UTC")): ts,
        # (Python cannot show year 1 or 9999 in Paris: 0000 and 10000)
        typed("ts_paris", pa.timestamp("us", tz="Europe/Paris")): ts[:3] + [dt.datetime(1900, 1, 1, tzinfo=UTC)] * 2 + ts[5:],
        typed("naive", pa.timestamp("us")): [None if v is None else v.replace(tzinfo=None) for v in ts],
        typed("d", pa.date32()): [dt.date(2000, 1, 1), dt.date(1999, 12, 31), dt.date(1, 1, 1), dt.date(9999, 12, 31), None]
        + [dt.date(1970, 1, 1), dt.date(1969, 12, 31)],
        typed("t", pa.time64("us")): [dt.time(0), dt.time(23, 59, 59, 999999), None, dt.time(12, 0, 0, 1)] + [dt.time(1)] * 3,
        typed("s", pa.string()): ["", None, 'a,"b"\n\\c\r\nd', "é😀\u2028", "\t", "NULL", "\\N"],
        typed("ls", pa.large_string()): ["\\x00", "", None, "x" * 5000, " lead and trail ", ",", '"'],
        typed("by", pa.binary()): [b"", None, b"\x00\xff", b"\\x00", bytes(range(256)), b"\n", b","],
        typed("lby", pa.large_binary()): [None, b"", b"\x00", b"abc", b"\r\n", b"\xff" * 3, b"\\"],
        typed("j", pa.string(), "json"): ['{"b": 1, "a": [1, 2.50]}', None, "[]", '"x"', "null", "1e400", '{"a":1, "a":2}'],
        typed("jb", pa.string(), "jsonb"): ['{"b": 1, "a": [1, 2.50]}', "null", None, '"é"', "{}", "0.1", '{"a":1, "a":2}'],
        typed("v", pa.string(), "character varying"): ["v", None, "", "é", "x" * 100, "a b", "z"],
    }
    return pa.Table.from_arrays([pa.array(v, f.type) for f, v in columns.items()], schema=pa.schema(list(columns)))


def reference_text(pg, schema: str, table: pa.Table, like: str) -> list[tuple]:
    """The rows as text after inserting ``table``'s values as bound parameters into a table like ``like``."""
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {schema}.ref (LIKE {like})")
        names = table.schema.names
        cur.executemany(
            f"INSERT INTO {schema}.ref ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})",
            [tuple(parameter(v) for v in row.values()) for row in table.to_pylist()],
        )
    return text_rows(pg, f"{schema}.ref", names)


def parameter(value):
    """A bound parameter for ``value``: floats as their shortest text, which PostgreSQL reads back exactly (psycopg2's
    literal -0.0 would be numeric zero negated: 0)."""
    if isinstance(value, bytes):
        return psycopg2.Binary(value)
    return repr(value) if isinstance(value, float) else value


def text_rows(pg, relation: str, names: list[str]) -> list[tuple]:
    with pg.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'")
        cur.execute(f"SELECT {', '.join(f'{n}::text' for n in names)} FROM {relation} ORDER BY id")
        return cur.fetchall()


def load(schema: str, table: pa.Table, mode: str = "replace", name: str = "out", batch: int = 0) -> None:
    spec = PostgresDestinationSpec(
        name="wh", database="test", user="postgres", schema=schema, table=name, mode=mode, primary_key=("id",)
    )
    dest = open_destination(spec, "p")
    try:
        dest.start(None)
        dest.write(batch, table, "id", table.column("id")[-1].as_py())
        dest.publish(batch + 1)
    finally:
        dest.close()


def column_oids(pg, relation: str, names: list[str]) -> list[int]:
    with pg.cursor() as cur:
        cur.execute(
            "SELECT attname, atttypid::bigint FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0",
            (relation,),
        )
        found = dict(cur.fetchall())
    return [found[n] for n in names]


@pytest.mark.parametrize("route", ["binary", "csv"])
def test_every_value_lands_as_the_same_value_inserted_as_a_parameter(pg, pg_schema, route):
    table = values_table()
    if route == "csv":  # a numeric column sends the batch as CSV
        table = table.append_column(typed("dec", pa.decimal128(20, 4)), pa.array([None] * table.num_rows, pa.decimal128(20, 4)))
    load(pg_schema, table)
    relation = f"{pg_schema}.out"
    plan = _binary_plan(table, column_oids(pg, relation, table.schema.names))
    assert (plan is not None) == (route == "binary")  # the route this case is meant to take
    got = text_rows(pg, relation, table.schema.names)
    assert got == reference_text(pg, pg_schema, table, relation)
    assert len(got) == table.num_rows


def test_merge_and_append_load_in_binary_too(pg, pg_schema):
    table = values_table()
    load(pg_schema, table, mode="merge", name="merged")
    load(pg_schema, table, mode="append", name="appended")
    want = reference_text(pg, pg_schema, table, f"{pg_schema}.merged")
    assert text_rows(pg, f"{pg_schema}.merged", table.schema.names) == want
    assert text_rows(pg, f"{pg_schema}.appended", table.schema.names) == want


def test_a_table_of_other_column_types_is_loaded_through_text(pg, pg_schema):
    """Appending to a table someone else created: where a column's type is not the one binary writes for the Arrow
    type, the batch goes as CSV and PostgreSQL converts the text as it always did."""
    with pg.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {pg_schema}.theirs (id numeric, f32 float8, ts timestamp, small smallint, note varchar(3), "
            "extra text DEFAULT 'kept')"
        )
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "f32": pa.array([0.1, None], pa.float32()),
            "ts": pa.array([dt.datetime(2020, 1, 1, 12, tzinfo=PARIS), None], pa.timestamp("us", tz="UTC")),
            "small": pa.array([300, -5], pa.int64()),
            "note": pa.array(["ab", "abc  "], pa.string()),
        }
    )
    load(pg_schema, table, mode="append", name="theirs")
    rows = text_rows(pg, f"{pg_schema}.theirs", ["id", "f32", "ts", "small", "note", "extra"])
    assert rows == [("1", "0.1", "2020-01-01 11:00:00", "300", "ab", "kept"), ("2", None, None, "-5", "abc", "kept")]


@pytest.mark.parametrize(
    ("column", "why"),
    [
        # binary would read these as -infinity: PostgreSQL refuses their text
        (pa.array([-(2**31) + 10_957], pa.date32()), "out of range"),
        (pa.array([-(2**63) + 946_684_800_000_000], pa.timestamp("us")), "out of range"),
        (pa.array([-(2**63) + 946_684_800_000_000], pa.timestamp("us", tz="UTC")), "out of range"),
        (pa.array([2**31 - 1], pa.date32()), "out of range"),
        (pa.array([2**63], pa.uint64()), "out of range"),
    ],
)
def test_a_value_postgresql_cannot_hold_is_refused(pg, pg_schema, column, why):
    table = pa.table({"id": pa.array([1], pa.int64()), "x": column})
    with pytest.raises(DestinationError, match=why):
        load(pg_schema, table)
    with pg.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{pg_schema}.out",))
        assert cur.fetchone() == (None,)  # nothing published


def test_a_value_too_large_for_the_existing_column_is_refused(pg, pg_schema):
    with pg.cursor() as cur:
        cur.execute(f"CREATE TABLE {pg_schema}.theirs (id bigint, small smallint)")
    table = pa.table({"id": pa.array([1, 2], pa.int64()), "small": pa.array([1, 40_000], pa.int64())})
    with pytest.raises(DestinationError, match="out of range for type smallint"):
        load(pg_schema, table, mode="append", name="theirs")
    assert text_rows(pg, f"{pg_schema}.theirs", ["id", "small"]) == []


@pytest.mark.parametrize("route", ["binary", "csv"])
def test_timestamps_of_any_year_postgresql_holds_land_by_either_route(pg, pg_schema, route):
    """PostgreSQL holds timestamps from 4714 BC to 294276 AD; Arrow writes zoned ones past the year 32767 with a
    wrong year (287168 as 24855), and naive ones only for the years 0 to 32767."""
    columns = {
        "id": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
        "ts": pa.array(
            [
                9_000_000_000_000_000_000,
                -62_135_596_800_000_000,  # 0001-01-01
                -62_135_596_800_000_001,  # a microsecond earlier: 1 BC
                -210_866_803_200_000_000,  # PostgreSQL's first instant
                None,
                253_402_300_800_000_000,  # 10000-01-01
            ],
            pa.timestamp("us", tz="UTC"),
        ),
    }
    if route == "csv":
        columns["dec"] = pa.array([None] * 6, pa.decimal128(5, 1))
    load(pg_schema, pa.table(columns))
    assert text_rows(pg, f"{pg_schema}.out", ["id", "ts"]) == [
        ("1", "287168-08-24 16:00:00+00"),
        ("2", "0001-01-01 00:00:00+00"),
        ("3", "0001-12-31 23:59:59.999999+00 BC"),
        ("4", "4714-11-24 00:00:00+00 BC"),
        ("5", None),
        ("6", "10000-01-01 00:00:00+00"),
    ]


def test_binary_and_dates_inside_lists_and_structs_land_as_json_with_hex_and_iso_text(pg, pg_schema):
    """Lists and structs go as JSON text: bytes inside them as lowercase hex and dates in ISO form, as JSON Lines parts
    and the MySQL destination write them (never Python's b'...' repr)."""
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "blobs": pa.array([[b"\x00\x01", b"\xff"], None], pa.list_(pa.binary())),
            "meta": pa.array([{"at": dt.date(2024, 2, 29), "raw": b"\x10"}, None]),
        }
    )
    load(pg_schema, table)
    with pg.cursor() as cur:
        cur.execute(f"SELECT blobs::text, meta::text FROM {pg_schema}.out ORDER BY id")
        rows = cur.fetchall()
    assert rows == [('["0001", "ff"]', '{"at": "2024-02-29", "raw": "10"}'), (None, None)]
