"""Checkpoints: exact type round trips, atomic local files, and refusal of anything untrustworthy."""

import datetime as dt
import json
import math
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conduit_dagster.engine.checkpoint import Checkpoint, LocalCheckpointStore, MemoryCheckpointStore
from conduit_dagster.engine.errors import CheckpointError


def make(value, **kw) -> Checkpoint:
    base = dict(
        pipeline="orders",
        checkpoint_column="id",
        last_value=value,
        records_processed=30_000,
        batches_committed=3,
        run_id="run-1",
        query_sha256="ab" * 32,
        destination={"generation": "g1"},
    )
    base.update(kw)
    return Checkpoint(**base)


def roundtrip(value):
    store = MemoryCheckpointStore()
    store.save(make(value))
    loaded = store.load("orders")
    assert loaded is not None
    return loaded.last_value


VALUES = [
    0,
    -1,
    2**53 + 1,
    -(2**63),
    10**40 + 7,
    "",
    "x' OR '1'='1",
    'ünïcode ✓ \n\t"quoted"',
    0.1,
    -0.0,
    1e308,
    5e-324,
    float("inf"),
    Decimal("12345678901234567890.123456789"),
    Decimal("-0.00"),
    dt.date(1999, 12, 31),
    dt.datetime(2025, 1, 2, 3, 4, 5, 678901),
    dt.datetime(2025, 1, 2, 3, 4, 5),
    dt.datetime(2025, 1, 2, 3, 4, 5, 1, tzinfo=dt.UTC),
    dt.datetime(2025, 6, 2, 3, 4, 5, 999999, tzinfo=ZoneInfo("America/New_York")),
    dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    b"\x00\xffbytes",
]


@pytest.mark.parametrize("value", VALUES, ids=[f"{type(v).__name__}-{i}" for i, v in enumerate(VALUES)])
def test_checkpoint_value_roundtrip_exact(value):
    back = roundtrip(value)
    assert type(back) is type(value) or (isinstance(value, bytes) and isinstance(back, bytes))
    assert back == value
    if isinstance(value, float):
        assert math.copysign(1, back) == math.copysign(1, value)
        assert back.hex() == value.hex()
    if isinstance(value, Decimal):
        assert str(back) == str(value)
    if isinstance(value, dt.datetime):
        assert back.microsecond == value.microsecond
        assert (back.tzinfo is None) == (value.tzinfo is None)
        assert back.utcoffset() == value.utcoffset()


def test_checkpoint_nan_roundtrip():
    assert math.isnan(roundtrip(float("nan")))


@given(
    st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.datetimes(timezones=st.none() | st.timezones())
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False)
)
def test_checkpoint_roundtrip_property(value):
    back = roundtrip(value)
    assert type(back) is type(value)
    if isinstance(value, dt.datetime):
        # a named zone comes back as its fixed offset: the same wall clock, offset and instant (== between
        # different zones is False for times in a DST fold or gap, so compare the parts)
        assert back.replace(tzinfo=None) == value.replace(tzinfo=None)
        assert back.utcoffset() == value.utcoffset()
    else:
        assert back == value


def test_checkpoint_document_fields(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save(make(2**60))
    doc = json.loads((tmp_path / "orders.json").read_text())
    assert doc["format_version"] == 1
    assert doc["pipeline"] == "orders"
    assert doc["checkpoint_column"] == "id"
    assert doc["last_value"] == {"type": "int", "value": str(2**60)}
    assert doc["records_processed"] == 30_000
    assert doc["run_id"] == "run-1"
    assert dt.datetime.fromisoformat(doc["updated_at"]).tzinfo is not None
    assert store.list() == ["orders"]
    assert [p.name for p in tmp_path.iterdir()] == ["orders.json"], "no temp files may remain"
    store.delete("orders")
    assert store.load("orders") is None and store.list() == []
    store.delete("orders")  # deleting twice is fine


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("", "not valid JSON"),
        ('{"format_version": 1, "pipeline": "orders", "checkpoint_column": "id", "last_va', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format_version": 99}', "format_version 99"),
        (None, "damaged or hand-edited"),
    ],
)
def test_checkpoint_unreadable_names_file_and_way_out(tmp_path, content, fragment):
    store = LocalCheckpointStore(tmp_path)
    store.save(make(5))
    path = tmp_path / "orders.json"
    if content is None:
        doc = json.loads(path.read_text())
        doc["last_value"] = {"type": "int", "value": "five"}
        content = json.dumps(doc)
    path.write_text(content)
    with pytest.raises(CheckpointError) as info:
        store.load("orders")
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "conduit clear-checkpoints --pipeline-name orders" in message
    assert path.read_text() == content, "a bad checkpoint is left for the user to inspect"


def test_checkpoint_of_another_pipeline_refused(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    store.save(make(5, pipeline="customers"))
    (tmp_path / "customers.json").rename(tmp_path / "orders.json")
    with pytest.raises(CheckpointError, match="belongs to pipeline 'customers'"):
        store.load("orders")


def test_checkpoint_write_failure_is_clear(tmp_path):
    blocker = tmp_path / "cp"
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        LocalCheckpointStore(blocker).save(make(6))
    assert blocker.read_text().startswith("a file")
