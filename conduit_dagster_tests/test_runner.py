"""The batch loop without Dagster: tie handling, ordering errors, and a crash at every step."""

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from conduit_dagster.engine.checkpoint import MemoryCheckpointStore
from conduit_dagster.engine.destinations import open_destination
from conduit_dagster.engine.errors import CheckpointError, DestinationError, OrderingError
from conduit_dagster.engine.runner import BatchCommitted, RunFinished, cut_batches, run_pipeline
from conduit_dagster.engine.sources.base import Chunk
from conduit_dagster.engine.sources.memory import MemorySource
from conduit_dagster.engine.spec import LocalDestinationSpec, ResourceSpec, SqliteSourceSpec
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

SCHEMA = pa.schema([("id", pa.int64()), ("k", pa.int64()), ("note", pa.string())])


def tie_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows, k = [], 0
    long_run = range(n // 2, n // 2 + 40)  # one run of equal values longer than a batch
    for i in range(n):
        if i == long_run.start or (i not in long_run and rng.random() < 0.2):
            k += 1
        rows.append({"id": i, "k": k, "note": f"row {i}"})
    return rows


def resource(tmp_path: Path, column: str | None = "k", batch: int = 7, resume: bool = True, query: str = "q") -> ResourceSpec:
    return ResourceSpec(
        name="things",
        source=SqliteSourceSpec(name="mem", path=tmp_path / "unused.db"),
        destination=LocalDestinationSpec(name="out", path=tmp_path / "out"),
        query=query,
        batch_size=batch,
        resume=resume,
        checkpoint_column=column,
    )


def chunks_of(rows: list[dict[str, Any]], size: int, column: str = "k", arrow: bool = False):
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        batch = pa.RecordBatch.from_pylist(part, schema=SCHEMA)
        yield Chunk(batch, batch.column(column) if arrow else [r[column] for r in part])


@pytest.mark.parametrize("arrow", [False, True], ids=["python-keys", "arrow-keys"])
@pytest.mark.parametrize("fetch", [1, 3, 7, 50])
def test_cut_batches_never_splits_ties(fetch, arrow):
    rows = tie_rows(200)
    batches = list(cut_batches(chunks_of(rows, fetch, arrow=arrow), 7, "k", None))
    assert sum(t.num_rows for t, _ in batches) == 200
    seen_last: list[int] = []
    for table, last in batches:
        ks = table.column("k").to_pylist()
        assert ks[-1] == last
        assert len(ks) >= 7 or table is batches[-1][0]
        seen_last.append(last)
    assert len(set(seen_last)) == len(seen_last), "each tie group ends in exactly one batch"
    for (a, _), (b, _) in zip(batches, batches[1:], strict=False):
        assert a.column("k").to_pylist()[-1] < b.column("k").to_pylist()[0]


def test_cut_batches_exact_sizes_without_ties():
    rows = [{"id": i, "k": i, "note": None} for i in range(25)]
    sizes = [t.num_rows for t, _ in cut_batches(chunks_of(rows, 4), 10, "k", None)]
    assert sizes == [10, 10, 5]


@pytest.mark.parametrize("arrow", [False, True], ids=["python-keys", "arrow-keys"])
def test_cut_batches_group_bigger_than_batch_stays_whole(arrow):
    rows = [{"id": i, "k": 1 if i < 30 else 2, "note": None} for i in range(35)]
    batches = list(cut_batches(chunks_of(rows, 4, arrow=arrow), 10, "k", None))
    assert [(t.num_rows, last) for t, last in batches] == [(30, 1), (5, 2)]


@pytest.mark.parametrize(
    "keys,fragment",
    [
        ([1, 2, 3, 2], "went backwards: 2 came after 3"),
        ([1, None, 3], "NULL after value 1"),
        ([5, 6], "5 came after 7"),
    ],
)
def test_ordering_errors_with_arrow_keys(keys, fragment):
    batch = pa.RecordBatch.from_pylist([{"id": i, "k": k, "note": None} for i, k in enumerate(keys)], schema=SCHEMA)
    with pytest.raises(OrderingError, match=fragment):
        list(cut_batches(iter([Chunk(batch, batch.column("k"))]), 10, "k", 7 if keys == [5, 6] else None))


def test_arrow_nan_key_is_an_error():
    arr = pa.array([1.0, float("nan")])
    batch = pa.RecordBatch.from_arrays([arr], names=["k"])
    with pytest.raises(OrderingError, match="'k' holds NaN after value 1.0"):
        list(cut_batches(iter([Chunk(batch, arr)]), 10, "k", None))


@pytest.mark.parametrize(
    "keys,fragment",
    [
        ([1, 2, 3, 2], "went backwards: 2 came after 3"),
        ([1, None, 3], "NULL after value 1"),
        ([1, "2"], "mixes types"),
    ],
)
def test_ordering_errors_name_column_and_value(keys, fragment):
    rows = [{"id": i, "k": k, "note": None} for i, k in enumerate(keys)]
    chunk = Chunk(pa.RecordBatch.from_pylist([{"id": r["id"], "k": None, "note": None} for r in rows], schema=SCHEMA), keys)
    with pytest.raises(OrderingError, match=fragment) as info:
        list(cut_batches(iter([chunk]), 10, "k", None))
    assert "'k'" in str(info.value)


def test_ordering_error_when_first_value_not_past_checkpoint():
    chunk = Chunk(pa.RecordBatch.from_pylist([{"id": 1, "k": 3, "note": None}], schema=SCHEMA), [3])
    with pytest.raises(OrderingError, match="3 came after 5"):
        list(cut_batches(iter([chunk]), 10, "k", 5))


def run(res: ResourceSpec, store, source, destination=None) -> list:
    return list(run_pipeline(res, store, run_id="r", source=source, destination=destination))


def test_run_full_then_refresh_replaces_output(tmp_path):
    rows = tie_rows(100)
    store = MemoryCheckpointStore()
    events = run(resource(tmp_path), store, MemorySource(rows, SCHEMA))
    done = events[-1]
    assert isinstance(done, RunFinished) and done.rows_this_run == 100 and not done.resumed
    assert_same_rows([tuple(r.values()) for r in rows], output_rows(tmp_path / "out" / "things"))
    assert store.docs == {}
    fewer = rows[:40]
    run(resource(tmp_path), store, MemorySource(fewer, SCHEMA))
    assert_same_rows([tuple(r.values()) for r in fewer], output_rows(tmp_path / "out" / "things"))
    assert not list((tmp_path / "out" / "_conduit_staging").iterdir()), "no staging left behind"


class Crash(Exception):
    pass


class Tripwire:
    """Counts side-effecting calls on the destination and the store; raises at call number N."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0

    def tick(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise Crash(f"crash at step {self.at}: {what}")


class Wrapped:
    def __init__(self, inner, trip: Tripwire, methods: set[str]) -> None:
        self._inner, self._trip, self._methods = inner, trip, methods

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def call(*args, **kwargs):
            self._trip.tick(name)
            result = attr(*args, **kwargs)
            self._trip.tick(name + " (after)")
            return result

        return call


@pytest.mark.parametrize("column,batch", [("k", 7), ("id", 9)])
def test_crash_at_every_step_then_rerun_is_exact(tmp_path, column, batch):
    """Crash before and after every write, checkpoint save, publish and delete; the rerun is exact."""
    rows = tie_rows(120)
    previous = [{"id": -1, "k": -1, "note": "old output"}]
    expected = [tuple(r.values()) for r in rows]
    res = resource(tmp_path, column=column, batch=batch)
    step = 1
    while True:
        out = tmp_path / f"case{step}"
        res_case = ResourceSpec(**{**res.__dict__, "destination": LocalDestinationSpec(name="out", path=out)})
        store = MemoryCheckpointStore()
        run(res_case, store, MemorySource(previous, SCHEMA, seed=step))  # the previous complete output
        trip = Tripwire(step)
        dest = Wrapped(open_destination(res_case.destination, "things"), trip, {"write", "publish"})
        wrapped_store = Wrapped(store, trip, {"save", "delete"})
        try:
            run(res_case, wrapped_store, MemorySource(rows, SCHEMA, seed=step + 1000), dest)
        except Crash:
            visible = Counter(output_rows(out / "things"))
            assert visible in (Counter([tuple(previous[0].values())]), Counter(expected)), "old or new output, never a mix"
            events = run(res_case, store, MemorySource(rows, SCHEMA, seed=step + 2000))
            assert_same_rows(expected, output_rows(out / "things"))
            assert store.docs == {}
            assert isinstance(events[-1], RunFinished)
            step += 1
            continue
        assert step > 2 * (120 // batch), "every step was crashed at least once"
        break


def crash_at(step: int, res: ResourceSpec, store, rows) -> None:
    """Run ``res`` until its ``step``-th write or checkpoint save (counting before and after each) raises."""
    trip = Tripwire(step)
    with pytest.raises(Crash):
        run(
            res,
            Wrapped(store, trip, {"save"}),
            MemorySource(rows, SCHEMA),
            Wrapped(open_destination(res.destination, "things"), trip, {"write"}),
        )


def test_resume_drops_parts_written_after_checkpoint(tmp_path):
    rows = [{"id": i, "k": i, "note": None} for i in range(50)]
    res = resource(tmp_path, column="id", batch=10)
    store = MemoryCheckpointStore()
    # ticks: initial save 1-2, write0 3-4, save0 5-6, write1 7-8, save1 9-10, write2 11-12: part 2 written, not checkpointed
    crash_at(12, res, store, rows)
    assert store.load("things").batches_committed == 2
    assert len(list((tmp_path / "out" / "_conduit_staging").glob("things.*/part-000002.parquet"))) == 1
    # the source lost rows meanwhile: a stale part beyond the checkpoint must not survive
    remaining = [r for r in rows if r["id"] < 20]
    run(res, store, MemorySource(remaining, SCHEMA))
    assert_same_rows([tuple(r.values()) for r in remaining], output_rows(tmp_path / "out" / "things"))


def test_checkpoint_for_other_column_or_query_refused(tmp_path):
    rows = [{"id": i, "k": i, "note": None} for i in range(30)]
    store = MemoryCheckpointStore()
    res = resource(tmp_path, column="id", batch=10)
    crash_at(5, res, store, rows)
    with pytest.raises(
        CheckpointError, match="checkpoint_column 'id', but ingest.yml now says 'k'.*clear-checkpoints --pipeline-name things"
    ):
        run(resource(tmp_path, column="k", batch=10), store, MemorySource(rows, SCHEMA))
    with pytest.raises(CheckpointError, match="different query"):
        run(resource(tmp_path, column="id", batch=10, query="other"), store, MemorySource(rows, SCHEMA))
    assert "things" in store.docs, "a refused checkpoint is kept"
    events = run(res, store, MemorySource(rows, SCHEMA))
    assert events[0].resumed and events[-1].records_processed == 30


def test_without_resume_no_checkpoint_and_full_output(tmp_path):
    rows = tie_rows(60)
    store = MemoryCheckpointStore()
    events = run(resource(tmp_path, resume=False), store, MemorySource(rows, SCHEMA))
    assert store.docs == {}
    assert [e.index for e in events if isinstance(e, BatchCommitted)] == list(
        range(len([e for e in events if isinstance(e, BatchCommitted)]))
    )
    assert Counter(output_rows(tmp_path / "out" / "things")) == Counter(tuple(r.values()) for r in rows)


def test_no_checkpoint_column_reads_as_is(tmp_path):
    rows = [{"id": i, "k": 0, "note": None} for i in range(23)]
    events = run(resource(tmp_path, column=None, resume=False, batch=10), MemoryCheckpointStore(), MemorySource(rows, SCHEMA))
    assert [e.rows for e in events if isinstance(e, BatchCommitted)] == [10, 10, 3]


@pytest.mark.parametrize("bad", [float("nan"), __import__("decimal").Decimal("NaN")])
def test_nan_checkpoint_value_is_an_error(bad):
    chunk = Chunk(pa.RecordBatch.from_pylist([{"id": 1, "k": None, "note": None}] * 2, schema=SCHEMA), [1, bad])
    with pytest.raises(OrderingError, match="'k' holds NaN after value 1"):
        list(cut_batches(iter([chunk]), 10, "k", None))


def test_resume_refuses_changed_destination_format(tmp_path):
    rows = [{"id": i, "k": i, "note": None} for i in range(30)]
    store = MemoryCheckpointStore()
    res = resource(tmp_path, column="id", batch=10)
    crash_at(5, res, store, rows)
    csv = ResourceSpec(**{**res.__dict__, "destination": LocalDestinationSpec(name="out", path=tmp_path / "out", format="csv")})
    with pytest.raises(
        CheckpointError, match=r"written for destination 'local:.*\?format=parquet', but ingest.yml now says .*format=csv"
    ):
        run(csv, store, MemorySource(rows, SCHEMA))


def test_publish_never_replaces_a_directory_conduit_did_not_write(tmp_path):
    foreign = tmp_path / "out" / "things"
    foreign.mkdir(parents=True)
    (foreign / "precious.db").write_text("keep me")
    with pytest.raises(DestinationError, match="holds files conduit did not write.*Nothing was changed"):
        run(resource(tmp_path), MemoryCheckpointStore(), MemorySource(tie_rows(20), SCHEMA))
    assert (foreign / "precious.db").read_text() == "keep me"
    assert [p.name for p in foreign.iterdir()] == ["precious.db"]


def test_jsonl_output_is_valid_json_with_non_finite_floats(tmp_path):
    import json

    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])
    rows = [{"id": 1, "x": float("nan")}, {"id": 2, "x": float("inf")}, {"id": 3, "x": 1.5}]
    res = ResourceSpec(
        **{
            **resource(tmp_path, column="id").__dict__,
            "destination": LocalDestinationSpec(name="out", path=tmp_path / "out", format="jsonl"),
        }
    )
    run(res, MemoryCheckpointStore(), MemorySource(rows, schema))
    lines = (tmp_path / "out" / "things" / "part-000000.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}")) for line in lines]
    assert parsed == [{"id": 1, "x": "NaN"}, {"id": 2, "x": "Infinity"}, {"id": 3, "x": 1.5}]


def test_a_backwards_error_on_long_keys_shows_them_cut_and_says_why_it_can_happen() -> None:
    """Two 1 KB text keys out of order (a source that sorts on a prefix only): the message stays short and names the
    likely cause, for both the list and the Arrow checks."""
    import pyarrow as pa

    from conduit_dagster.engine.errors import OrderingError
    from conduit_dagster.engine.keys import check_keys

    long_a, long_b = "k" * 1030 + "b", "k" * 1030 + "a"
    for keys in ([long_a, long_b], pa.array([long_a, long_b])):
        with pytest.raises(OrderingError) as exc:
            check_keys(keys, None, "k")
        message = str(exc.value)
        assert "went backwards" in message and "max_sort_length" in message
        assert "(1033 characters)" in message and len(message) < 600
