"""File source: CSV, JSON Lines and Parquet files, local or on S3, streamed file by file in path order.

Files have no ORDER BY and no WHERE: resume is exact only because the rows already come sorted by the
checkpoint column. So every row read is checked, the ones skipped on resume too and across file boundaries,
and a row that goes backwards stops the run naming its file and row instead of silently losing or repeating
rows. One schema holds for the whole run (inferred from the first rows, then forced on every file), so every
part file the destination writes has the same columns and types, and a resumed run derives the same schema.
"""

import bisect
import csv
import dataclasses
import datetime as dt
import glob
import io
import json
import os
import re
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from conduit_dagster.engine.backends import SourceBackend, register_source_backend
from conduit_dagster.engine.errors import OrderingError, SourceError
from conduit_dagster.engine.s3 import (
    GLOB_CHARS,
    RangeReader,
    endpoint_of,
    explain,
    fixed_base,
    hidden_below,
    is_missing,
    is_precondition_failed,
    make_client,
    match_objects,
    split_url,
)
from conduit_dagster.engine.sources.base import Chunk, key_index
from conduit_dagster.engine.spec import (
    FORMAT_KINDS,
    FORMATS,
    S3_KEYS,
    ResourceSpec,
    S3ConnectionSpec,
    _Entry,
    bucket_name,
    entry_path,
    s3_connection,
)


@dataclass(frozen=True)
class FileSourceSpec:
    """CSV, JSON Lines or Parquet files: a local path or glob, or s3://bucket/key, a prefix (ending in /) or a glob."""

    name: str
    path: str
    format: str
    s3: S3ConnectionSpec = dataclasses.field(default_factory=S3ConnectionSpec)
    resume: bool = False
    checkpoint_column: str | None = None
    type: str = "file"

    @property
    def is_s3(self) -> bool:
        return self.path.startswith("s3://")


BLOCK_SIZE = 8 << 20  # bytes read and parsed at a time: memory stays flat whatever the file size
# Arrow's streaming CSV reader reads about 40 blocks ahead of its consumer (measured: peak Arrow memory 44 MB with
# 1 MiB blocks, 80 MB with 2 MiB, the whole file with 8 MiB blocks under 320 MB), so CSV blocks are small.
CSV_BLOCK_SIZE = 1 << 20
# A CSV row (or JSON line) must fit in one parse block: a file with a larger value is read again with blocks 8 times
# larger (only that file, and only then), up to this size.
MAX_BLOCK_SIZE = 512 << 20
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
_CSV_COLUMN_RE = re.compile(r"CSV column #(\d+)")


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


@dataclass(frozen=True)
class _File:
    url: str  # the local path or s3:// URL, for messages
    key: str  # the local path or S3 key, to open it
    size: int
    gzip: bool
    delimiter: str
    etag: str = ""  # the S3 version listed: every read of the file is of that version, or fails


@dataclass(frozen=True)
class _Skipped:
    """A Parquet row group left unread: its statistics prove its rows are all at or before the resume point."""

    rows: int
    last: Any


def _plain(schema: pa.Schema) -> pa.Schema:
    """Nullable fields and no metadata, with all-NULL columns typed as text: one schema every file can be cast to."""
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])


def _python_types(t: pa.DataType) -> tuple[type, ...] | None:
    if pa.types.is_integer(t):
        return (int,)
    if pa.types.is_floating(t):
        return (float, int)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return (str,)
    if pa.types.is_timestamp(t):
        return (dt.datetime,)
    if pa.types.is_date(t):
        return (dt.date,)
    if pa.types.is_decimal(t):
        return (Decimal,)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return (bytes,)
    return None


def _first_after(keys: pa.Array, after: Any) -> int:
    """Index of the first key > ``after`` in non-decreasing keys, compared in Python as the checkpoint is."""
    return bisect.bisect_right(range(len(keys)), after, key=lambda i: keys[i].as_py())


def _line_blocks(stream: Any) -> Iterator[bytes]:
    """Whole lines, about BLOCK_SIZE bytes at a time (a line longer than that is kept whole)."""
    rest = b""
    while True:
        data = stream.read(BLOCK_SIZE)
        if not data:
            if rest.strip():
                yield rest
            return
        data = rest + data
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block, rest = data[: cut + 1], data[cut + 1 :]
        if block.strip():
            yield block


class _Order:
    """The checkpoint column must never go backwards, in file order, across files: that is what makes
    skipping the rows up to the checkpoint exact."""

    def __init__(self, source: str, column: str) -> None:
        self.source, self.column = source, column
        self.prev: Any = None
        self.prev_url: str | None = None

    def _fix(self) -> str:
        return (
            f"the files must be sorted by {self.column!r} (the rows of each file, and the files in path order), "
            "or pick another checkpoint_column"
        )

    def _backwards(self, url: str, row: int, prev: Any, value: Any) -> OrderingError:
        origin = f" (the last value of {self.prev_url})" if row == 1 and self.prev_url not in (None, url) else ""
        return OrderingError(
            f"{self.source}: checkpoint column {self.column!r} goes backwards in {url} at row {row}: {value!r} comes "
            f"after {prev!r}{origin}; {self._fix()}"
        )

    def check(self, keys: pa.Array, url: str, first_row: int) -> None:
        """``first_row``: how many data rows of the file come before ``keys`` (row numbers are 1-based)."""
        n = len(keys)
        if n == 0:
            return
        if keys.null_count:
            i = int(pc.index(pc.is_null(keys), True).as_py())
            raise OrderingError(
                f"{self.source}: checkpoint column {self.column!r} is empty (NULL) in {url} at row {first_row + i + 1}; "
                f"every row needs a value to resume by: fill it in, or pick another checkpoint_column"
            )
        if pa.types.is_floating(keys.type) and pc.any(pc.is_nan(keys)).as_py():
            i = int(pc.index(pc.is_nan(keys), True).as_py())
            raise OrderingError(
                f"{self.source}: checkpoint column {self.column!r} holds NaN in {url} at row {first_row + i + 1}; "
                "NaN cannot be ordered for resume: fix the file, or pick another checkpoint_column"
            )
        first = keys[0].as_py()
        try:
            backwards = self.prev is not None and first < self.prev
        except TypeError:
            raise OrderingError(
                f"{self.source}: checkpoint column {self.column!r} mixes types ({self.prev!r} then {first!r} in {url} "
                f"at row {first_row + 1}); give it one type in every file"
            ) from None
        if backwards:
            raise self._backwards(url, first_row + 1, self.prev, first)
        if n > 1:
            back = pc.less(keys.slice(1), keys.slice(0, n - 1))
            if pc.any(back).as_py():
                i = int(pc.index(back, True).as_py())
                raise self._backwards(url, first_row + i + 2, keys[i].as_py(), keys[i + 1].as_py())
        self.prev, self.prev_url = keys[n - 1].as_py(), url

    def passed(self, last: Any, url: str) -> None:
        self.prev, self.prev_url = last, url


class FileSource:
    """Rows of every file a path matches, in path order, then in file order within each file."""

    def __init__(self, spec: FileSourceSpec) -> None:
        if spec.format not in ("csv", "jsonl", "parquet"):
            raise SourceError(f"source {spec.name!r}: unknown file format {spec.format!r}; use csv, jsonl or parquet")
        self.spec = spec
        self.where = f"source {spec.name!r}"
        self.client: Any = make_client(spec.s3) if spec.is_s3 else None
        self.bucket = split_url(spec.path)[0] if spec.is_s3 else ""
        self._files: list[_File] | None = None
        self._schema: pa.Schema | None = None
        self._schema_url = ""
        self._open: set[Any] = set()

    # --- the protocol -------------------------------------------------------------------------------------

    def describe(self) -> str:
        return self.spec.path

    def bind(self, params: dict[str, Any]) -> None:
        """Files have no query to bind values in."""

    def probe(self, query: str, column: str | None) -> list[str]:
        names = list(self.schema().names)
        if column is not None:
            key_index(names, column, self.where)
        return names

    def key_type(self, query: str, column: str) -> tuple[type, ...] | None:
        schema = self.schema()
        if column not in schema.names:
            return None
        return _python_types(schema.field(column).type)

    def read(self, query: str, column: str | None, after: Any, *, resume: bool, fetch_size: int) -> Iterator[Chunk]:
        schema = self.schema()
        idx = key_index(schema.names, column, self.where) if column is not None else None
        order = _Order(self.where, column) if column is not None else None
        skipping = resume and after is not None and column is not None
        key_types = _python_types(schema.field(column).type) if column is not None else None

        def can_skip(stats: Any) -> bool:
            """A row group may go unread only if its statistics prove it is sorted after what came before and
            wholly at or before the resume point (its inner order was checked when the earlier run read it)."""
            if not skipping or order is None or key_types is None or column is None:
                return False
            if pa.types.is_floating(schema.field(column).type):
                return False  # statistics leave NaN out
            if not (stats.has_min_max and stats.has_null_count and stats.null_count == 0):
                return False
            lo, hi = stats.min, stats.max
            if not (isinstance(lo, key_types) and isinstance(hi, key_types)):
                return False
            try:
                return bool(hi <= after and (order.prev is None or lo >= order.prev))
            except TypeError:
                return False

        for f in self.files():
            row = 0
            with closing(self._batches(f, schema, fetch_size, None, can_skip if skipping else None, column)) as batches:
                for item in batches:
                    if isinstance(item, _Skipped):
                        row += item.rows
                        if order is not None:
                            order.passed(item.last, f.url)
                        continue
                    batch = item
                    keys = self._keys(batch.column(idx), f.url) if idx is not None else None
                    if keys is not None and order is not None:
                        order.check(keys, f.url, row)
                    row += batch.num_rows
                    if skipping and keys is not None:
                        start = _first_after(keys, after)
                        if start == batch.num_rows:
                            continue
                        skipping = False  # sorted: every later row is past the checkpoint too
                        batch, keys = batch.slice(start), keys.slice(start)
                    for offset in range(0, batch.num_rows, fetch_size):
                        part = batch.slice(offset, fetch_size)
                        yield Chunk(part, keys.slice(offset, fetch_size) if keys is not None else None)

    def _keys(self, keys: pa.Array, url: str) -> pa.Array:
        """Checkpoint values as the checkpoint keeps them: nanosecond timestamps go to microseconds (Python's
        datetime), refused when that would round a value, since two values would then compare equal or resume
        would skip a row. Timestamps with a time zone are compared in UTC: Python compares two datetimes of one
        zone by their wall clock, fold ignored, so across a DST fall-back (02:45 CEST, then 02:00 CET) sorted rows
        looked backwards, and rows that really went backwards there passed the check."""
        t = keys.type
        if not pa.types.is_timestamp(t) or (t.unit != "ns" and t.tz in (None, "UTC")):
            return keys
        try:
            return pc.cast(keys, pa.timestamp("us" if t.unit == "ns" else t.unit, "UTC" if t.tz else None), safe=True)
        except pa.ArrowInvalid:
            raise SourceError(
                f"{self.where}: {url}: checkpoint column holds timestamps with nanoseconds, which a checkpoint (and "
                "Python) keeps only to the microsecond; write the column in microseconds, or pick another column"
            ) from None

    def count(self, query: str, upto: tuple[str, Any] | None = None) -> int:
        schema = self.schema()
        column = upto[0] if upto is not None else None
        if column is not None:
            key_index(schema.names, column, self.where)
        total = 0
        for f in self.files():
            if self.spec.format == "parquet":
                total += self._parquet_count(f, schema, upto)
                continue
            columns = [column or schema.names[0]] if schema.names else None
            with closing(self._batches(f, schema, BLOCK_SIZE, columns, None, None)) as batches:
                for batch in batches:
                    assert isinstance(batch, pa.RecordBatch)
                    total += batch.num_rows if upto is None else _count_upto(batch.column(0), upto[1])
        return total

    def max_value(self, query: str, column: str) -> Any:
        schema = self.schema()
        key_index(schema.names, column, self.where)
        best: Any = None

        def consider(value: Any) -> None:
            nonlocal best
            if value is not None and (best is None or value > best):
                best = value

        key_types = _python_types(schema.field(column).type) or (object,)
        for f in self.files():
            if self.spec.format == "parquet":
                with self._parquet(f) as pf:
                    leaf = _leaf_index(pf, column)
                    for i in range(pf.num_row_groups):
                        rg = pf.metadata.row_group(i)
                        stats = rg.column(leaf).statistics if leaf is not None else None
                        if stats is not None and stats.has_min_max and isinstance(stats.max, key_types):
                            consider(stats.max)
                            continue
                        for batch in pf.iter_batches(batch_size=65536, row_groups=[i], columns=[column]):
                            consider(_max(self._conform(batch, _sub(schema, [column]), f).column(0)))
                continue
            with closing(self._batches(f, schema, BLOCK_SIZE, [column], None, None)) as batches:
                for batch in batches:
                    assert isinstance(batch, pa.RecordBatch)
                    consider(_max(batch.column(0)))
        return best

    def restrict(self, partition: Any) -> None:
        """Files have no query to filter by a partition's bounds: refused (ingest.yml refuses it too)."""
        raise SourceError(f"pipeline {partition.pipeline!r}: {self.where} {PARTITIONS_REFUSED}")

    def scan_column(self, query: str, column: str) -> Iterator[pa.Array]:
        raise SourceError(f"{self.where} {PARTITIONS_REFUSED}")

    def close(self) -> None:
        self._release(list(self._open))
        close = getattr(self.client, "close", None)  # the HTTP connection pool
        if close is not None:
            close()

    # --- files and schema ---------------------------------------------------------------------------------

    def _no_files(self) -> SourceError:
        return SourceError(
            f"{self.where}: no file matches {self.spec.path}; fix `path` in ingest.yml (a file, a glob such as "
            "/data/*.csv, or s3://bucket/prefix/ with a trailing /), or add the files"
        )

    def _s3_error(self, url: str, exc: BaseException) -> SourceError:
        bucket = split_url(url)[0] if url.startswith("s3://") else self.bucket
        if is_precondition_failed(exc):
            return SourceError(
                f"{self.where}: {url} changed while this run read it (its ETag is no longer the one listed), so the run "
                "stopped rather than mix two versions of it. Run again (a resumed run reads the files as they are "
                "then), and write new data under new names rather than overwrite a file a run may be reading"
            )
        return SourceError(f"{self.where}: cannot read {url}: {explain(exc, bucket=bucket, endpoint=endpoint_of(self.client))}")

    def files(self) -> list[_File]:
        """The matching files, sorted by path, listed once per source (one run sees one list)."""
        if self._files is not None:
            return self._files
        path = self.spec.path
        found: list[tuple[str, str, int, str]] = []  # (url, key, size, etag)
        if self.spec.is_s3:
            try:
                objects = match_objects(self.client, path)
            except _s3_errors() as exc:
                if not is_missing(exc):
                    raise self._s3_error(path, exc) from None
                try:  # a HEAD of a missing key says 404 whether the key or the whole bucket is missing: tell which
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                except _s3_errors() as bucket_exc:
                    raise self._s3_error(path, bucket_exc) from None
                raise self._no_files() from None
            found = [(f"s3://{self.bucket}/{o.key}", o.key, o.size, o.etag) for o in objects]
        else:
            base = ""
            if any(c in path for c in GLOB_CHARS):
                names = glob.glob(path, recursive=True)
                base = fixed_base(path)
            elif os.path.isdir(path):  # every file below it, as under an S3 prefix
                names = [os.path.join(top, n) for top, _, files in os.walk(path) for n in files]
                base = path.rstrip("/") + "/"
            else:
                names = [path]
            names = sorted(n for n in names if os.path.isfile(n) and not (base and hidden_below(base, n)))
            found = [(n, n, os.path.getsize(n), "") for n in names]
        if not found:
            raise self._no_files()
        self._files = []
        for url, key, size, etag in found:
            stem = key.lower()
            gz = stem.endswith(".gz") and self.spec.format != "parquet"
            stem = stem.removesuffix(".gz")
            self._files.append(_File(url, key, size, gz, "\t" if stem.endswith(".tsv") else ",", etag))
        return self._files

    def schema(self) -> pa.Schema:
        """The run's one schema: from the first file (Parquet), or the first rows of the first file that has rows."""
        if self._schema is not None:
            return self._schema
        files = self.files()
        schema: pa.Schema | None = None
        source = files[0]
        if self.spec.format == "parquet":
            with self._parquet(source) as pf:
                schema = pf.schema_arrow
        else:
            for f in files:
                found = self._infer(f)
                if found is None:
                    continue
                fschema, has_rows = found
                if schema is None or has_rows:
                    schema, source = fschema, f
                if has_rows:
                    break
        self._schema = _plain(schema if schema is not None else pa.schema([]))
        self._schema_url = source.url
        return self._schema

    def _infer(self, f: _File) -> tuple[pa.Schema, bool] | None:
        """The types the first block of a CSV or JSON Lines file shows, and whether it has rows (None: empty file)."""
        if self.spec.format == "csv":
            block_size = CSV_BLOCK_SIZE
            while True:
                with self._reading(f) as stream:
                    try:
                        reader = pacsv.open_csv(
                            stream, read_options=_csv_read_options(block_size), parse_options=_csv_parse_options(f)
                        )
                        first = reader.read_next_batch()
                    except StopIteration:
                        return reader.schema, False
                    except _ARROW_ERRORS as exc:
                        if "Empty CSV" in str(exc):
                            return None
                        if not _larger_block_helps(exc, block_size, f):
                            raise SourceError(f"{self.where}: cannot parse {f.url} as CSV: {_why(exc)}; fix the file") from None
                        self._check_quotes(f)
                        block_size *= 8
                        continue
                    return reader.schema, first.num_rows > 0
        with self._reading(f) as stream:
            for block in _line_blocks(stream):
                try:
                    table = _read_json(block, None, "infer")
                except _ARROW_ERRORS as exc:
                    raise self._json_error(f, block, None, 0, exc) from None
                return table.schema, table.num_rows > 0
            return None

    # --- reading one file ---------------------------------------------------------------------------------

    def _release(self, handles: list[Any]) -> None:
        for handle in reversed(handles):
            self._open.discard(handle)
            with suppress(Exception):  # closing after a failure must not hide it
                handle.close()

    @contextmanager
    def _reading(self, f: _File) -> Iterator[Any]:
        """A binary stream of the file's bytes (gunzipped), closed afterwards; S3 and OS errors become SourceErrors."""
        handles: list[Any] = []
        try:
            if self.spec.is_s3:
                condition = {"IfMatch": f.etag} if f.etag else {}
                raw = self.client.get_object(Bucket=self.bucket, Key=f.key, **condition)["Body"]
            else:
                raw = pa.OSFile(f.key, "rb")
            handles.append(raw)
            stream = raw
            if f.gzip:
                stream = pa.CompressedInputStream(raw, "gzip")
                handles.append(stream)
            self._open.update(handles)
            yield stream
        except _s3_errors() as exc:
            raise self._s3_error(f.url, exc) from None
        except OSError as exc:
            raise SourceError(f"{self.where}: cannot read {f.url}: {exc}; check the file (a truncated .gz?)") from None
        finally:
            self._release(handles)

    @contextmanager
    def _parquet(self, f: _File) -> Iterator[pq.ParquetFile]:
        handles: list[Any] = []
        try:
            if self.spec.is_s3:
                raw: Any = io.BufferedReader(RangeReader(self.client, self.bucket, f.key, f.size, f.etag), buffer_size=BLOCK_SIZE)
            else:
                raw = pa.OSFile(f.key, "rb")
            handles.append(raw)
            self._open.add(raw)
            try:
                pf = pq.ParquetFile(raw)
            except _ARROW_ERRORS as exc:
                raise SourceError(f"{self.where}: cannot read {f.url} as Parquet: {exc}; fix the file or `format`") from None
            yield pf
        except _s3_errors() as exc:
            raise self._s3_error(f.url, exc) from None
        except OSError as exc:
            raise SourceError(f"{self.where}: cannot read {f.url}: {exc}") from None
        except _ARROW_ERRORS as exc:
            raise SourceError(f"{self.where}: cannot read {f.url} as Parquet: {exc}; fix the file") from None
        finally:
            self._release(handles)

    def _batches(
        self,
        f: _File,
        schema: pa.Schema,
        fetch_size: int,
        columns: list[str] | None,
        can_skip: Callable[[Any], bool] | None,
        column: str | None,
    ) -> Generator[pa.RecordBatch | _Skipped, None, None]:
        """The file's rows in the run's schema (only ``columns`` if given), in file order."""
        target = _sub(schema, columns) if columns is not None else schema
        if self.spec.format == "parquet":
            with self._parquet(f) as pf:
                if columns is None:
                    self._check_names(f, pf.schema_arrow.names, schema)
                leaf = _leaf_index(pf, column) if can_skip is not None and column is not None else None
                for i in range(pf.num_row_groups):
                    rg = pf.metadata.row_group(i)
                    if can_skip is not None and leaf is not None:
                        stats = rg.column(leaf).statistics
                        if stats is not None and can_skip(stats):
                            yield _Skipped(rg.num_rows, stats.max)
                            continue
                    for batch in pf.iter_batches(batch_size=fetch_size, row_groups=[i], columns=columns):
                        yield self._conform(batch, target, f)
            return
        if self.spec.format == "csv":
            yield from self._csv_batches(f, schema, columns)
            return
        yield from self._jsonl_batches(f, schema, target, columns)

    def _csv_batches(self, f: _File, schema: pa.Schema, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        convert = pacsv.ConvertOptions(column_types=dict(zip(schema.names, schema.types, strict=True)), include_columns=columns)
        target = _sub(schema, columns) if columns is not None else schema
        block_size = CSV_BLOCK_SIZE
        done = 0  # rows of this file given already: a read again with larger blocks (a value over a block) skips them
        while True:
            with self._reading(f) as stream:
                try:
                    reader = pacsv.open_csv(
                        stream,
                        read_options=_csv_read_options(block_size),
                        parse_options=_csv_parse_options(f),
                        convert_options=convert,
                    )
                except _ARROW_ERRORS as exc:
                    if "Empty CSV" in str(exc):
                        return
                    if not _larger_block_helps(exc, block_size, f):
                        raise self._csv_error(f, exc, schema) from None
                    self._check_quotes(f)
                    block_size *= 8
                    continue
                if columns is None:
                    self._check_names(f, reader.schema.names, schema)
                skip = done
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        return
                    except _ARROW_ERRORS as exc:
                        if not _larger_block_helps(exc, block_size, f):
                            raise self._csv_error(f, exc, schema) from None
                        self._check_quotes(f)
                        break
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip), 0
                    done += batch.num_rows
                    yield self._conform(batch, target, f)
            block_size *= 8

    def _check_quotes(self, f: _File) -> None:
        """Before reading a file again with larger blocks: a row over a block is a large value, or a quote never closed,
        which Arrow would take as one value running to the end of the file (the rows after it swallowed into it). In
        valid CSV every quote is closed or doubled, so the file holds an even number of them."""
        quotes = 0
        with self._reading(f) as stream:
            while data := stream.read(BLOCK_SIZE):
                quotes += data.count(b'"')
        if quotes % 2:
            raise SourceError(
                f"{self.where}: {f.url} has a quote that is never closed (an odd number of '\"' in the file): the rest "
                "of the file would be read as one value; fix the file"
            )

    def _csv_error(self, f: _File, exc: Exception, schema: pa.Schema) -> SourceError:
        """Name the column a CSV value does not fit (Arrow only gives its position in the file)."""
        header = self._csv_header(f)
        if header is not None and sorted(header) != sorted(schema.names):
            return self._names_error(f, header, schema)
        found = _CSV_COLUMN_RE.search(str(exc))
        if found and header is not None and int(found.group(1)) < len(header):
            name = header[int(found.group(1))]
            wanted = schema.field(name).type if name in schema.names else "?"
            return SourceError(
                f"{self.where}: {f.url}: column {name!r} holds a value that does not fit type {wanted} ({exc}); the type "
                f"comes from the first rows of {self._schema_url}: fix the value in the file (or make the first rows show "
                "the column's real type, e.g. 1.0 for a decimal column)"
            )
        return SourceError(f"{self.where}: cannot parse {f.url} as CSV: {_why(exc)}; fix the file")

    def _csv_header(self, f: _File) -> list[str] | None:
        try:
            with self._reading(f) as stream:
                head = stream.read(1 << 20).decode("utf-8", errors="replace")
            return next(csv.reader(io.StringIO(head), delimiter=f.delimiter))
        except (SourceError, StopIteration, csv.Error):
            return None

    def _jsonl_batches(
        self, f: _File, schema: pa.Schema, target: pa.Schema, columns: list[str] | None
    ) -> Iterator[pa.RecordBatch]:
        with self._reading(f) as stream:
            row = 0
            for block in _line_blocks(stream):
                try:
                    table = _read_json(block, schema, "infer")
                except _ARROW_ERRORS as exc:
                    raise self._json_error(f, block, schema, row, exc) from None
                if columns is None:
                    self._check_names(f, table.schema.names, schema)
                row += table.num_rows
                table = table.select(target.names)
                for batch in table.to_batches():
                    yield self._conform(batch, target, f)

    def _json_error(self, f: _File, block: bytes, schema: pa.Schema | None, row0: int, exc: Exception) -> SourceError:
        """Find the row and column of a failed block by bisecting it (a bad value or line fails on its own)."""
        lines = [line for line in block.split(b"\n") if line.strip()]

        def fails(part: list[bytes], fields: pa.Schema | None = schema) -> bool:
            try:
                _read_json(b"\n".join(part), fields, "ignore")
            except _ARROW_ERRORS:
                return True
            return False

        generic = SourceError(f"{self.where}: cannot parse {f.url} as JSON Lines: {exc}; fix the file")
        if not lines or not fails(lines):
            return generic
        lo, hi = 0, len(lines)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fails(lines[lo:mid]):
                hi = mid
            else:
                lo = mid
        line, row = lines[lo], row0 + lo + 1
        if not fails([line]):
            return generic
        try:
            doc = json.loads(line)
        except ValueError as bad:
            return SourceError(f"{self.where}: {f.url} row {row} is not valid JSON ({bad}); fix the file")
        for field in schema or []:
            if fails([line], pa.schema([field])):
                value = doc.get(field.name) if isinstance(doc, dict) else doc
                return SourceError(
                    f"{self.where}: {f.url} row {row}: column {field.name!r} holds {value!r}, which does not fit type "
                    f"{field.type} (taken from the first rows of {self._schema_url}); fix the value in the file (or make "
                    "the first rows show the column's real type, e.g. 1.0 for a decimal column)"
                )
        return SourceError(f"{self.where}: {f.url} row {row} cannot be read ({exc}); fix the file")

    def _parquet_count(self, f: _File, schema: pa.Schema, upto: tuple[str, Any] | None) -> int:
        with self._parquet(f) as pf:
            if upto is None:
                return int(pf.metadata.num_rows)
            column, value = upto
            leaf = _leaf_index(pf, column)
            key_types = _python_types(schema.field(column).type) or (object,)
            total = 0
            for i in range(pf.num_row_groups):
                rg = pf.metadata.row_group(i)
                stats = rg.column(leaf).statistics if leaf is not None else None
                if (
                    stats is not None
                    and stats.has_min_max
                    and stats.has_null_count
                    and isinstance(stats.min, key_types)
                    and isinstance(stats.max, key_types)
                ):
                    try:
                        if stats.max <= value:
                            total += rg.num_rows - stats.null_count
                            continue
                        if stats.min > value:
                            continue
                    except TypeError:
                        pass
                for batch in pf.iter_batches(batch_size=65536, row_groups=[i], columns=[column]):
                    total += _count_upto(self._conform(batch, _sub(schema, [column]), f).column(0), value)
            return total

    # --- one schema ---------------------------------------------------------------------------------------

    def _names_error(self, f: _File, names: list[str], schema: pa.Schema) -> SourceError:
        return SourceError(
            f"{self.where}: {f.url} has columns [{', '.join(names)}], but {self._schema_url} has "
            f"[{', '.join(schema.names)}]; every file must have the same columns: fix the file, or narrow `path`"
        )

    def _check_names(self, f: _File, names: list[str], schema: pa.Schema) -> None:
        if sorted(names) != sorted(schema.names):
            raise self._names_error(f, list(names), schema)

    def _conform(self, batch: pa.RecordBatch, schema: pa.Schema, f: _File) -> pa.RecordBatch:
        """The batch with the run's column order and types; a value that cannot be cast names its file and column."""
        if batch.schema.equals(schema):
            return batch
        if batch.schema.names != schema.names:
            if sorted(batch.schema.names) != sorted(schema.names):
                raise self._names_error(f, batch.schema.names, schema)
            batch = batch.select(schema.names)
        arrays = []
        for field, array in zip(schema, batch.columns, strict=True):
            if array.type != field.type:
                try:
                    array = pc.cast(array, field.type)
                except _ARROW_ERRORS as exc:
                    raise SourceError(
                        f"{self.where}: {f.url}: column {field.name!r} is {array.type} there but {field.type} in "
                        f"{self._schema_url}, and a value does not convert ({exc}); fix the file so every file has the "
                        "same column types"
                    ) from None
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _sub(schema: pa.Schema, columns: list[str] | None) -> pa.Schema:
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


def _csv_read_options(block_size: int = CSV_BLOCK_SIZE) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=block_size)


def _straddles(exc: Exception) -> bool:
    """Arrow's error for a row (a CSV row with its quoted newlines, or a JSON line) longer than its parse block."""
    return "straddling object straddles two block boundaries" in str(exc)


def _larger_block_helps(exc: Exception, block_size: int, f: _File) -> bool:
    """A row over a block boundary, and a larger block could hold it (a block as large as the file holds any row)."""
    return _straddles(exc) and block_size < MAX_BLOCK_SIZE and (f.gzip or block_size <= f.size)


def _why(exc: Exception) -> str:
    if _straddles(exc):
        return f"a row is longer than {MAX_BLOCK_SIZE >> 20} MiB, or a quote is never closed"
    return str(exc)


def _csv_parse_options(f: _File) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=f.delimiter, newlines_in_values=True)


def _read_json(block: bytes, schema: pa.Schema | None, unexpected: str) -> pa.Table:
    """Parse whole lines; without a schema, infer one."""
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior=unexpected)
    try:
        return pajson.read_json(io.BytesIO(block), read_options=pajson.ReadOptions(block_size=1 << 20), parse_options=parse)
    except pa.ArrowInvalid as exc:
        if not _straddles(exc):
            raise
    # a line over 1 MiB (one large value): the block is whole lines and already in memory, so parse it as one block
    return pajson.read_json(io.BytesIO(block), read_options=pajson.ReadOptions(block_size=len(block) + 1), parse_options=parse)


def _leaf_index(pf: pq.ParquetFile, column: str | None) -> int | None:
    """The index of a top-level column among the file's leaf columns (where its statistics are)."""
    if column is None or pf.metadata.num_row_groups == 0:
        return None
    rg = pf.metadata.row_group(0)
    for i in range(rg.num_columns):
        if rg.column(i).path_in_schema == column:
            return i
    return None


def _max(keys: pa.Array) -> Any:
    if len(keys) == 0 or keys.null_count == len(keys):
        return None
    try:
        return pc.max(keys).as_py()
    except _ARROW_ERRORS:
        return max(v for v in keys.to_pylist() if v is not None)


def _count_upto(keys: pa.Array, value: Any) -> int:
    """How many keys are <= value, compared as Python compares them (Arrow's kernel when the value converts exactly)."""
    try:
        scalar = pa.scalar(value, type=keys.type)
        exact = scalar.as_py() == value
    except (*_ARROW_ERRORS, TypeError, OverflowError):
        exact = False
    if exact:
        return int(pc.sum(pc.less_equal(keys, scalar)).as_py() or 0)
    return sum(1 for v in keys.to_pylist() if v is not None and v <= value)


# --- the backend: ingest.yml `type: file` ------------------------------------------------------------------------

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _parse(e: _Entry, file: Path, name: str, resume: bool, column: str | None) -> FileSourceSpec:
    raw = e.text("path", required=True)
    assert raw is not None
    if raw.startswith("s3://"):
        bucket, _, key = raw.removeprefix("s3://").partition("/")
        bucket_name(e, bucket, "path")
        path = raw
        s3 = s3_connection(e)
    else:
        for key in S3_KEYS:
            if e.data.get(key) is not None:
                raise e.fail(key, f"{key} applies to s3:// paths only; remove it")
        path = str(entry_path(e, file.parent))
        key = path
        s3 = S3ConnectionSpec()
    fmt = e.text("format")
    if fmt is None:
        stem = key.removesuffix(".gz")
        fmt = next((f for ext, f in _EXTENSIONS.items() if stem.lower().endswith(ext)), None)
        if fmt is None:
            raise e.fail("path", "cannot tell the file format from the path; add `format: csv`, `jsonl` or `parquet`")
    elif fmt not in FORMATS:
        raise e.fail("format", f"unknown value {e.show('format', fmt)}; use one of: {', '.join(FORMATS)}")
    e.finish(_KEYS)
    return FileSourceSpec(name=name, path=path, format=fmt, s3=s3, resume=resume, checkpoint_column=column)


def _resource_query(e: _Entry, source: FileSourceSpec, source_name: str) -> str:
    """Files have no query: a resource that gives one is refused."""
    if e.data.get("query") is not None:
        raise e.fail("query", f"source {source_name!r} reads files, which have no query; remove `query`")
    return ""


PARTITIONS_REFUSED = (
    "reads files, which cannot be split into partitions (there is no query to select one partition's rows by); "
    "remove `partitions:`, or load the files into a database and partition a SQL source (postgresql, mysql, sqlite, "
    "sqlalchemy)"
)


def _check_resource(e: _Entry, source: FileSourceSpec, incremental_column: str | None) -> None:
    if incremental_column is not None:
        raise e.fail(
            "incremental_column",
            "file sources have no query to bind :last_value in; drop incremental_column (resume: true with a "
            "checkpoint_column resumes a crashed run)",
        )
    if e.data.get("partitions") is not None:
        raise e.fail("partitions", f"source {source.name!r} {PARTITIONS_REFUSED}")


def _identity(s: FileSourceSpec) -> str:
    return f"file:{s.path}?endpoint={s.s3.endpoint_url or ''}" if s.is_s3 else f"file:{s.path}"


def _selection(resource: ResourceSpec) -> str:
    """What a checkpoint's rows were selected by: the files and their format."""
    s = cast(FileSourceSpec, resource.source)
    return f"files {s.format} {s.path}"


def _describe(resource: ResourceSpec) -> str:
    s = cast(FileSourceSpec, resource.source)
    return f"{s.format} files: `{s.path}`"


_KEYS = frozenset({"name", "type", "resume", "checkpoint_column", "path", "format"} | S3_KEYS)
BACKEND = register_source_backend(
    SourceBackend(
        type="file",
        keys=_KEYS,
        parse=_parse,
        open=FileSource,
        identity=_identity,
        kinds=lambda s: {"s3" if s.is_s3 else "file", FORMAT_KINDS[s.format]},
        selection=_selection,
        describe=_describe,
        resource_query=_resource_query,
        check_resource=_check_resource,
        uses_s3=lambda s: s.is_s3,
    )
)
