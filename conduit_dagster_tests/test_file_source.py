"""The file source: CSV, JSON Lines and Parquet, local and on S3 (moto's real HTTP server), and exact resume
through the real engine. Files have no ORDER BY, so ordering is checked on every row, skipped ones included."""

import datetime as dt
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.errors import OrderingError, SourceError
from conduit_dagster.engine.runner import RunStarted, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.sources.files import FileSource
from conduit_dagster.engine.spec import FileSourceSpec, S3ConnectionSpec, load_spec_text
from conduit_dagster_tests.helpers import assert_same_rows, output_rows

Row = tuple[Any, ...]
T0 = dt.datetime(2024, 1, 1)


def rows_for(ids: list[int]) -> list[Row]:
    return [(i, f"name-{n}", n * 0.5, T0 + dt.timedelta(seconds=n)) for n, i in enumerate(ids)]


def csv_text(rows: list[Row]) -> str:
    lines = ["id,name,amount,ts"]
    lines += [f"{i},{name},{amount!r},{ts:%Y-%m-%d %H:%M:%S}" for i, name, amount, ts in rows]
    return "\n".join(lines) + "\n"


def jsonl_text(rows: list[Row]) -> str:
    docs = [{"id": i, "name": name, "amount": amount, "ts": f"{ts:%Y-%m-%d %H:%M:%S}"} for i, name, amount, ts in rows]
    return "".join(json.dumps(d) + "\n" for d in docs)


def parquet_bytes(rows: list[Row], row_group_size: int = 1000) -> bytes:
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.int64()),
            "name": [r[1] for r in rows],
            "amount": [r[2] for r in rows],
            "ts": pa.array([r[3] for r in rows], pa.timestamp("s")),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def encode(fmt: str, rows: list[Row]) -> bytes:
    if fmt == "csv":
        return csv_text(rows).encode()
    if fmt == "jsonl":
        return jsonl_text(rows).encode()
    return parquet_bytes(rows)


def write_parts(directory: Path, fmt: str, parts: list[list[Row]], suffix: str | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, rows in enumerate(parts, start=1):
        path = directory / f"part{n}.{suffix or fmt}"
        path.write_bytes(encode(fmt, rows))
        paths.append(path)
    return paths


def source(path: Any, fmt: str, s3_endpoint: str | None = None) -> FileSource:
    conn = S3ConnectionSpec(endpoint_url=s3_endpoint) if s3_endpoint else S3ConnectionSpec()
    return FileSource(FileSourceSpec(name="files", path=str(path), format=fmt, s3=conn))


def read(
    src: FileSource, column: str | None = "id", after: Any = None, fetch_size: int = 1000
) -> tuple[list[Row], list[int], pa.Schema | None]:
    rows: list[Row] = []
    sizes: list[int] = []
    schema = None
    try:
        for chunk in src.read("", column, after, resume=after is not None, fetch_size=fetch_size):
            schema = chunk.data.schema
            sizes.append(chunk.data.num_rows)
            rows.extend(tuple(r.values()) for r in chunk.data.to_pylist())
            if column is not None:
                assert isinstance(chunk.keys, pa.Array)
                assert chunk.keys.to_pylist() == chunk.data.column(column).to_pylist()
    finally:
        src.close()
    return rows, sizes, schema


PARTS = [rows_for(list(range(1, 11))), rows_for([10, 10, 11, 12, 12, 12, 13]), rows_for([13, 20, 21, 22])]
ALL = [r for part in PARTS for r in part]
EXPECTED_SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("amount", pa.float64()), ("ts", pa.timestamp("s"))])


def expected_schema(fmt: str) -> pa.Schema:
    """Parquet has no seconds unit: its writer stores timestamp[s] as milliseconds."""
    return EXPECTED_SCHEMA.set(3, pa.field("ts", pa.timestamp("ms"))) if fmt == "parquet" else EXPECTED_SCHEMA


# --- local files ---------------------------------------------------------------------------------------------


def test_csv_glob_reads_three_files_in_path_order_with_types(tmp_path):
    write_parts(tmp_path / "in", "csv", PARTS)
    (tmp_path / "in" / "_SUCCESS.csv").write_text("id\n999\n")
    (tmp_path / "in" / ".hidden.csv").write_text("id\n999\n")
    src = source(tmp_path / "in" / "*.csv", "csv")
    assert src.probe("", "id") == ["id", "name", "amount", "ts"]
    assert src.key_type("", "id") == (int,)
    assert src.key_type("", "ts") == (dt.datetime,)
    assert src.key_type("", "amount") == (float, int)
    assert src.count("") == len(ALL)
    assert src.count("", ("id", 12)) == sum(1 for r in ALL if r[0] <= 12)
    assert src.max_value("", "id") == 22
    assert src.describe() == str(tmp_path / "in" / "*.csv")
    rows, _, schema = read(src, fetch_size=4)
    assert rows == ALL
    assert schema == EXPECTED_SCHEMA


def test_directory_path_reads_every_file_below_it(tmp_path):
    write_parts(tmp_path / "in", "csv", PARTS[:2])
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "part3.csv").write_text(csv_text(PARTS[2]))  # "in/part2" < "in/sub/part3"
    (tmp_path / "in" / "_tmp").mkdir()
    (tmp_path / "in" / "_tmp" / ".part4.csv").write_text("id\n1\n")
    rows, _, _ = read(source(tmp_path / "in", "csv"), column=None)
    assert rows == ALL


def test_recursive_glob(tmp_path):
    for n, part in enumerate(PARTS):
        (tmp_path / "in" / f"day{n}").mkdir(parents=True)
        (tmp_path / "in" / f"day{n}" / "rows.csv").write_text(csv_text(part))
    rows, _, _ = read(source(tmp_path / "in" / "**" / "*.csv", "csv"))
    assert rows == ALL


def test_probe_rejects_an_unknown_checkpoint_column(tmp_path):
    write_parts(tmp_path / "in", "csv", PARTS)
    with pytest.raises(SourceError, match="checkpoint_column 'nope' is not a column.*id, name, amount, ts"):
        source(tmp_path / "in" / "*.csv", "csv").probe("", "nope")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_decrease_across_a_file_boundary_names_the_file_and_row(tmp_path, fmt):
    paths = write_parts(tmp_path / "in", fmt, [rows_for([1, 2, 3]), rows_for([2, 4])])
    with pytest.raises(OrderingError) as info:
        read(source(tmp_path / "in" / f"*.{fmt}", fmt))
    message = str(info.value)
    assert str(paths[1]) in message and "row 1" in message and "'id'" in message
    assert "2 comes after 3" in message and str(paths[0]) in message and "must be sorted by 'id'" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_decrease_inside_a_file_names_the_row(tmp_path, fmt):
    paths = write_parts(tmp_path / "in", fmt, [rows_for([1, 2, 3]), rows_for([4, 5, 6, 5, 7])])
    with pytest.raises(OrderingError, match=r"in .*part2\.\w+ at row 4: 5 comes after 6") as info:
        read(source(tmp_path / "in" / f"*.{fmt}", fmt))
    assert str(paths[1]) in str(info.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("after", [0, 3, 10, 12, 13, 21, 22, 99])
def test_resume_skips_exactly_the_rows_up_to_after(tmp_path, fmt, after):
    write_parts(tmp_path / "in", fmt, PARTS)
    rows, _, _ = read(source(tmp_path / "in" / f"*.{fmt}", fmt), after=after, fetch_size=3)
    assert rows == [r for r in ALL if r[0] > after]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_decrease_hidden_in_the_skipped_rows_is_still_reported(tmp_path, fmt):
    write_parts(tmp_path / "in", fmt, [rows_for([1, 2, 3, 4]), rows_for([5, 6, 2, 7]), rows_for([30, 31])])
    with pytest.raises(OrderingError, match=r"part2\.\w+ at row 3: 2 comes after 6"):
        read(source(tmp_path / "in" / f"*.{fmt}", fmt), after=20)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_null_checkpoint_value_is_an_ordering_error(tmp_path, fmt):
    path = tmp_path / "in" / f"part1.{fmt}"
    path.parent.mkdir()
    if fmt == "csv":
        path.write_text("id,name\n1,a\n,b\n3,c\n")
    elif fmt == "jsonl":
        path.write_text('{"id": 1, "name": "a"}\n{"id": null, "name": "b"}\n{"id": 3, "name": "c"}\n')
    else:
        pq.write_table(pa.table({"id": [1, None, 3], "name": ["a", "b", "c"]}), path)
    with pytest.raises(OrderingError, match=r"'id' is empty \(NULL\) in .*part1\.\w+ at row 2"):
        read(source(path, fmt))


def test_nan_checkpoint_value_is_an_ordering_error(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"v": [1.0, 2.0, float("nan")]}), path)
    with pytest.raises(OrderingError, match="holds NaN in .* at row 3"):
        read(source(path, "parquet"), column="v")


def test_jsonl_reads_in_order_with_types(tmp_path):
    write_parts(tmp_path / "in", "jsonl", PARTS)
    src = source(tmp_path / "in" / "*.jsonl", "jsonl")
    assert src.key_type("", "id") == (int,)
    assert src.count("") == len(ALL)
    assert src.count("", ("id", 10)) == 12
    assert src.max_value("", "id") == 22
    rows, _, schema = read(src, fetch_size=5)
    assert rows == ALL
    assert schema == EXPECTED_SCHEMA


def test_jsonl_value_that_does_not_fit_names_file_row_and_column(tmp_path):
    paths = write_parts(tmp_path / "in", "jsonl", [rows_for([1, 2]), rows_for([3, 4, 5])])
    lines = paths[1].read_text().splitlines()
    lines[1] = lines[1].replace('"id": 4', '"id": "four"')
    paths[1].write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"part2\.jsonl row 2: column 'id' holds 'four', which does not fit type int64"):
        read(source(tmp_path / "in" / "*.jsonl", "jsonl"))


def test_jsonl_malformed_line_names_the_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3,\n{"id": 4}\n')
    with pytest.raises(SourceError, match=r"t\.jsonl row 3 is not valid JSON"):
        read(source(path, "jsonl"))


def test_jsonl_extra_field_is_a_column_mismatch(tmp_path):
    paths = write_parts(tmp_path / "in", "jsonl", [rows_for([1, 2])])
    (tmp_path / "in" / "part2.jsonl").write_text(
        '{"id": 3, "name": "x", "amount": 1.0, "ts": "2024-01-01 00:00:00", "extra": 1}\n'
    )
    with pytest.raises(SourceError, match=r"part2\.jsonl has columns \[id, name, amount, ts, extra\], but .*part1") as info:
        read(source(tmp_path / "in" / "*.jsonl", "jsonl"))
    assert str(paths[0]) in str(info.value)


def test_parquet_reads_in_order_and_casts_later_files(tmp_path):
    write_parts(tmp_path / "in", "parquet", PARTS[:2])
    narrow = pa.table(
        {
            "ts": pa.array([r[3] for r in PARTS[2]], pa.timestamp("s")),  # another column order
            "id": pa.array([r[0] for r in PARTS[2]], pa.int32()),  # a narrower type
            "name": [r[1] for r in PARTS[2]],
            "amount": [r[2] for r in PARTS[2]],
        }
    )
    pq.write_table(narrow, tmp_path / "in" / "part3.parquet")
    src = source(tmp_path / "in" / "*.parquet", "parquet")
    assert src.count("") == len(ALL)
    assert src.count("", ("id", 12)) == sum(1 for r in ALL if r[0] <= 12)
    assert src.max_value("", "id") == 22
    rows, _, schema = read(src, fetch_size=4)
    assert rows == ALL
    assert schema == expected_schema("parquet")


def test_parquet_value_that_does_not_cast_names_file_and_column(tmp_path):
    write_parts(tmp_path / "in", "parquet", PARTS[:1])
    pq.write_table(
        pa.table({"id": ["x"], "name": ["n"], "amount": [1.0], "ts": pa.array([T0], pa.timestamp("s"))}),
        tmp_path / "in" / "part2.parquet",
    )
    with pytest.raises(SourceError, match=r"part2\.parquet: column 'id' is string there but int64"):
        read(source(tmp_path / "in" / "*.parquet", "parquet"))


def test_parquet_resume_skips_row_groups_by_statistics_only_when_ordered(tmp_path, monkeypatch):
    ids = list(range(1, 101))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part1.parquet").write_bytes(parquet_bytes(rows_for(ids), row_group_size=10))
    read_groups: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        read_groups.extend(kwargs.get("row_groups") or [])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows, _, _ = read(source(tmp_path / "in" / "part1.parquet", "parquet"), after=55, fetch_size=7)
    assert [r[0] for r in rows] == list(range(56, 101))
    assert read_groups == [5, 6, 7, 8, 9]  # groups 0-4 (ids 1-50) proven <= 55 and in order: never read

    # A group whose minimum is below the last value seen must be read, so the decrease is reported.
    read_groups.clear()
    broken = list(range(1, 21)) + list(range(5, 15)) + list(range(30, 60))
    (tmp_path / "in" / "part1.parquet").write_bytes(parquet_bytes(rows_for(broken), row_group_size=10))
    with pytest.raises(OrderingError, match="at row 21: 5 comes after 20"):
        read(source(tmp_path / "in" / "part1.parquet", "parquet"), after=40)
    assert read_groups == [2]


def test_gzip_csv_and_jsonl(tmp_path):
    (tmp_path / "in").mkdir()
    for n, part in enumerate(PARTS, start=1):
        (tmp_path / "in" / f"part{n}.csv.gz").write_bytes(gzip.compress(csv_text(part).encode()))
    rows, _, schema = read(source(tmp_path / "in" / "*.csv.gz", "csv"), after=10)
    assert rows == [r for r in ALL if r[0] > 10]
    assert schema == EXPECTED_SCHEMA
    (tmp_path / "j.jsonl.gz").write_bytes(gzip.compress(jsonl_text(ALL).encode()))
    assert read(source(tmp_path / "j.jsonl.gz", "jsonl"))[0] == ALL


def test_broken_files_are_source_errors_naming_the_file(tmp_path):
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(csv_text(ALL).encode())[:60])
    with pytest.raises(SourceError, match=r"cut\.csv\.gz"):
        read(source(tmp_path / "cut.csv.gz", "csv"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"cannot read .*junk\.parquet as Parquet"):
        read(source(tmp_path / "junk.parquet", "parquet"))


def test_tsv_is_tab_separated(tmp_path):
    (tmp_path / "t.tsv").write_text("id\tname\n1\ta,b\n2\tc\n")
    assert read(source(tmp_path / "t.tsv", "csv"))[0] == [(1, "a,b"), (2, "c")]


def test_csv_quoted_newlines_and_an_empty_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text('id,note\n1,"two\nlines"\n2,plain\n')
    (tmp_path / "in" / "b.csv").write_text("")
    (tmp_path / "in" / "c.csv").write_text("id,note\n")
    (tmp_path / "in" / "d.csv").write_text("id,note\n3,x\n")
    src = source(tmp_path / "in" / "*.csv", "csv")
    assert src.count("") == 3
    assert read(src)[0] == [(1, "two\nlines"), (2, "plain"), (3, "x")]


def test_all_null_column_in_the_first_rows_becomes_text(tmp_path):
    write_parts(tmp_path / "in", "csv", [])
    (tmp_path / "in" / "a.csv").write_text("id,note\n1,\n2,\n")
    (tmp_path / "in" / "b.csv").write_text("id,note\n3,hello\n")
    rows, _, schema = read(source(tmp_path / "in" / "*.csv", "csv"))
    assert schema == pa.schema([("id", pa.int64()), ("note", pa.string())])
    assert rows == [(1, ""), (2, ""), (3, "hello")]


def test_csv_value_that_does_not_fit_names_the_file_and_column(tmp_path):
    write_parts(tmp_path / "in", "csv", [rows_for([1, 2])])
    (tmp_path / "in" / "part2.csv").write_text("id,name,amount,ts\n3,x,1.5,2024-01-01 00:00:00\n4,y,lots,2024-01-01 00:00:00\n")
    with pytest.raises(
        SourceError, match=r"part2\.csv: column 'amount' holds a value that does not fit type double.*fix the value"
    ):
        read(source(tmp_path / "in" / "*.csv", "csv"))


def test_csv_with_other_columns_names_both_lists(tmp_path):
    write_parts(tmp_path / "in", "csv", [rows_for([1, 2])])
    (tmp_path / "in" / "part2.csv").write_text("id,label\n3,x\n")
    with pytest.raises(SourceError, match=r"part2\.csv has columns \[id, label\], but .*part1\.csv has \[id, name, amount, ts\]"):
        read(source(tmp_path / "in" / "*.csv", "csv"))


def test_no_matching_file_names_the_source_and_path(tmp_path):
    pattern = tmp_path / "missing" / "*.csv"
    with pytest.raises(SourceError, match=r"source 'files': no file matches .*missing/\*\.csv; fix `path`"):
        source(pattern, "csv").probe("", None)
    with pytest.raises(SourceError, match="no file matches"):
        list(source(tmp_path / "nope.csv", "csv").read("", None, None, resume=False, fetch_size=10))


def test_a_big_csv_streams_in_chunks_of_at_most_fetch_size(tmp_path):
    n = 300_000
    path = tmp_path / "big.csv"
    with path.open("w") as out:
        out.write("id,payload\n")
        for i in range(n):
            out.write(f"{i},row-{i:08d}-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n")
    src = source(path, "csv")
    total = 0
    expected_next = 0
    sizes = []
    for chunk in src.read("", "id", None, resume=False, fetch_size=7_000):
        sizes.append(chunk.data.num_rows)
        ids = chunk.data.column("id")
        assert ids[0].as_py() == expected_next
        expected_next = ids[-1].as_py() + 1
        total += chunk.data.num_rows
    src.close()
    assert total == n
    assert max(sizes) <= 7_000 and len(sizes) >= n // 7_000


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_on_s3_is_read_in_blocks_and_never_held_whole(s3, bucket, s3_endpoint, fmt):
    """A 120 MB object: every read of its body asks for at most one block, and Arrow's memory stays well under the
    file's size while its rows stream by (it does not grow with the file: a 5 GB file behaves the same, only longer)."""
    from conduit_dagster.engine.sources import files

    n = 1_500_000
    line = "{i},row-{i:08d}-" + "x" * 60 if fmt == "csv" else '{{"id": {i}, "payload": "row-{i:08d}-' + "x" * 45 + '"}}'
    header = "id,payload\n" if fmt == "csv" else ""
    body = (header + "\n".join(line.format(i=i) for i in range(n)) + "\n").encode()
    size = len(body)
    assert size > 110_000_000
    s3.put_object(Bucket=bucket, Key=f"big/all.{fmt}", Body=body)
    del body
    src = source(f"s3://{bucket}/big/all.{fmt}", fmt, s3_endpoint)
    reads: list[int | None] = []
    real_get = src.client.get_object

    def spying_get(**kw):
        response = real_get(**kw)
        stream = response["Body"]
        real_read = stream.read

        def read(amt=None):
            reads.append(amt)
            return real_read(amt)

        stream.read = read
        return response

    src.client.get_object = spying_get
    peak = total = 0
    for chunk in src.read("", "id", None, resume=False, fetch_size=10_000):
        total += chunk.data.num_rows
        peak = max(peak, pa.total_allocated_bytes())
    src.close()
    assert total == n
    assert reads and None not in reads and max(r for r in reads if r is not None) <= files.BLOCK_SIZE, reads[:5]
    assert peak < size / 2, f"Arrow held {peak:,} bytes at once for a {size:,}-byte file"


def test_open_source_builds_a_file_source(tmp_path):
    write_parts(tmp_path / "in", "csv", PARTS)
    src = open_source(FileSourceSpec(name="files", path=str(tmp_path / "in" / "*.csv"), format="csv"))
    assert isinstance(src, FileSource)
    src.close()


# --- S3 (moto's server over HTTP) ----------------------------------------------------------------------------


def upload(s3: Any, bucket: str, prefix: str, fmt: str, parts: list[list[Row]]) -> list[str]:
    keys = []
    for n, rows in enumerate(parts, start=1):
        key = f"{prefix}part{n}.{fmt}"
        s3.put_object(Bucket=bucket, Key=key, Body=encode(fmt, rows))
        keys.append(key)
    return keys


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_s3_prefix_and_glob(s3, bucket, s3_endpoint, fmt):
    upload(s3, bucket, "in/", fmt, PARTS)
    s3.put_object(Bucket=bucket, Key="in/_SUCCESS", Body=b"")
    rows, _, schema = read(source(f"s3://{bucket}/in/", fmt, s3_endpoint), fetch_size=4)
    assert rows == ALL
    assert schema == expected_schema(fmt)
    s3.put_object(Bucket=bucket, Key=f"in/sub/part9.{fmt}", Body=b"id\n1\n")  # a glob stays within one level
    src = source(f"s3://{bucket}/in/part*.{fmt}", fmt, s3_endpoint)
    assert src.count("") == len(ALL)
    assert src.max_value("", "id") == 22
    assert read(src, after=12)[0] == [r for r in ALL if r[0] > 12]
    with pytest.raises(OrderingError, match=rf"s3://{bucket}/in/part2\.{fmt} at row 1"):
        upload(s3, bucket, "in/", fmt, [rows_for([5, 6]), rows_for([1])])
        read(source(f"s3://{bucket}/in/part*.{fmt}", fmt, s3_endpoint))


def test_s3_parquet_uses_ranged_reads(s3, bucket, s3_endpoint, monkeypatch):
    s3.put_object(Bucket=bucket, Key="p/one.parquet", Body=parquet_bytes(rows_for(list(range(500))), row_group_size=50))
    src = source(f"s3://{bucket}/p/one.parquet", "parquet", s3_endpoint)
    ranges: list[str | None] = []
    original = src.client.get_object

    def spy(**kwargs: Any) -> Any:
        ranges.append(kwargs.get("Range"))
        return original(**kwargs)

    monkeypatch.setattr(src.client, "get_object", spy)
    rows, _, _ = read(src, after=249, fetch_size=64)
    assert [r[0] for r in rows] == list(range(250, 500))
    assert ranges and all(r is not None and r.startswith("bytes=") for r in ranges)


def test_s3_gzip_csv(s3, bucket, s3_endpoint):
    s3.put_object(Bucket=bucket, Key="z/all.csv.gz", Body=gzip.compress(csv_text(ALL).encode()))
    assert read(source(f"s3://{bucket}/z/all.csv.gz", "csv", s3_endpoint))[0] == ALL


def test_s3_missing_key_bucket_and_endpoint(s3, bucket, s3_endpoint):
    with pytest.raises(SourceError, match=rf"no file matches s3://{bucket}/none\.csv"):
        source(f"s3://{bucket}/none.csv", "csv", s3_endpoint).probe("", None)
    with pytest.raises(SourceError, match=rf"no file matches s3://{bucket}/none/"):
        source(f"s3://{bucket}/none/", "csv", s3_endpoint).probe("", None)
    with pytest.raises(
        SourceError, match=r"cannot read s3://no-such-bucket-here/x/: bucket 'no-such-bucket-here'.*does not exist"
    ):
        source("s3://no-such-bucket-here/x/", "csv", s3_endpoint).probe("", None)
    with pytest.raises(
        SourceError, match=r"cannot read s3://no-such-bucket-here/x\.csv: bucket 'no-such-bucket-here'.*does not exist"
    ):
        source("s3://no-such-bucket-here/x.csv", "csv", s3_endpoint).probe("", None)
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint") as info:
        source(f"s3://{bucket}/x/", "csv", "http://127.0.0.1:9").probe("", None)
    assert "conduit-test-secret" not in str(info.value)


def test_folders_and_files_named_with_underscore_or_dot_are_skipped(tmp_path, s3, bucket, s3_endpoint):
    """Bookkeeping below a prefix (conduit's own _conduit_staging, Spark's _temporary, .hidden) is never read: it
    would hold in-flight or crashed copies of the same rows."""
    text = csv_text(ALL)
    for rel in ("data/a.csv", "data/_conduit_staging/orders/g1/part-000000.csv", "data/.hidden/b.csv", "data/_c.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
        s3.put_object(Bucket=bucket, Key=rel, Body=text.encode())
    for path in (str(tmp_path / "data"), str(tmp_path / "data" / "*.csv"), f"s3://{bucket}/data/", f"s3://{bucket}/data/*.csv"):
        got = source(path, "csv", s3_endpoint if path.startswith("s3://") else None)
        assert [f.url.rsplit("/", 1)[-1] for f in got.files()] == ["a.csv"], path


def test_s3_wrong_credentials_are_named_without_revealing_them(s3, bucket, s3_endpoint):
    from conduit_dagster.engine.spec import Secret
    from conduit_dagster_tests.test_s3_checkpoints import moto_checks_credentials

    s3.put_object(Bucket=bucket, Key="in/a.csv", Body=csv_text(ALL).encode())
    conn = S3ConnectionSpec(
        endpoint_url=s3_endpoint, access_key_id=Secret("AKIAWRONGKEY0000001"), secret_access_key=Secret("never-print-me-42")
    )
    with moto_checks_credentials(s3_endpoint):
        with pytest.raises(SourceError) as info:
            FileSource(FileSourceSpec(name="landed", path=f"s3://{bucket}/in/", format="csv", s3=conn)).probe("", "id")
    message = str(info.value)
    assert "source 'landed'" in message and "credentials were rejected" in message, message
    assert "never-print-me-42" not in message and "AKIAWRONGKEY0000001" not in message


# --- end to end through the engine ---------------------------------------------------------------------------

INGEST = """
sources:
  - name: files
    type: file
    path: s3://{bucket}/in/
    format: {fmt}
    endpoint_url: {endpoint}
    resume: true
    checkpoint_column: id
destinations:
  - name: out
    type: local
    path: out
resources:
  - name: events
    source: files
    destination: out
    batch_size: 200
"""


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_s3_files_resume_exactly_after_a_bad_file_is_fixed(tmp_path, s3, bucket, s3_endpoint, fmt):
    ids = sorted([i // 3 for i in range(3000)])  # ties of three, sometimes across a file boundary
    parts = [rows_for(ids[:1000]), rows_for(ids[1000:2001]), rows_for(ids[2001:])]
    expected = [r for part in parts for r in part]
    upload(s3, bucket, "in/", fmt, parts[:2])
    broken = parts[2][:500] + [rows_for([1])[0]] + parts[2][500:]  # one row goes backwards
    s3.put_object(Bucket=bucket, Key=f"in/part3.{fmt}", Body=encode(fmt, broken))

    spec = load_spec_text(INGEST.format(bucket=bucket, fmt=fmt, endpoint=s3_endpoint), tmp_path / "ingest.yml")
    resource = spec.resources[0]
    store = LocalCheckpointStore(tmp_path / "checkpoints")
    with pytest.raises(OrderingError, match=rf"s3://{bucket}/in/part3\.{fmt} at row 501: 1 comes after"):
        list(run_pipeline(resource, store, run_id="first"))
    checkpoint = store.load("events")
    assert checkpoint is not None and checkpoint.batches_committed > 0
    assert (tmp_path / "checkpoints" / "events.json").exists()

    s3.put_object(Bucket=bucket, Key=f"in/part3.{fmt}", Body=encode(fmt, parts[2]))
    events = list(run_pipeline(resource, store, run_id="second"))
    started = [e for e in events if isinstance(e, RunStarted)]
    assert started and started[0].resumed is True and started[0].resumed_from == checkpoint.last_value
    out = output_rows(tmp_path / "out" / "events")
    assert len(out) == len(expected)
    assert_same_rows(expected, out)
    assert not (tmp_path / "checkpoints" / "events.json").exists()


def test_nanosecond_timestamps_resume_exactly_or_are_refused(tmp_path):
    """Parquet timestamp[ns] as the checkpoint column: whole microseconds work like any timestamp (the checkpoint keeps
    microseconds); values with nanoseconds would round, so they are refused with the file and the fix named."""
    import datetime as dt

    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    whole = pa.array([base + dt.timedelta(microseconds=i // 2) for i in range(10)], pa.timestamp("us", "UTC")).cast(
        pa.timestamp("ns", "UTC")
    )
    pq.write_table(pa.table({"ts": whole, "id": list(range(10))}), tmp_path / "a.parquet")
    src = source(tmp_path / "a.parquet", "parquet")
    after = base + dt.timedelta(microseconds=2)  # rows 4 and 5 carry it: resume after it leaves ids 6..9
    got = [r["id"] for c in src.read("", "ts", after, resume=True, fetch_size=3) for r in c.data.to_pylist()]
    assert got == [6, 7, 8, 9]
    keys = next(iter(source(tmp_path / "a.parquet", "parquet").read("", "ts", None, resume=False, fetch_size=3))).keys
    assert isinstance(keys[0].as_py(), dt.datetime) and type(keys[0].as_py()) is dt.datetime
    nanos = pa.array([1_700_000_000_000_000_001 + i for i in range(3)], pa.timestamp("ns", "UTC"))
    pq.write_table(pa.table({"ts": nanos, "id": [1, 2, 3]}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match=r"b\.parquet: checkpoint column holds timestamps with nanoseconds"):
        list(source(tmp_path / "b.parquet", "parquet").read("", "ts", None, resume=False, fetch_size=3))
