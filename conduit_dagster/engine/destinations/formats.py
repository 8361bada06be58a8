"""Writing one batch as a part file (Parquet, CSV or JSON Lines) to a path or a binary file object, and
counting a part's rows; shared by the local and S3 destinations."""

import json
import math
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

EXTENSIONS = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def _json_row(row: dict[str, Any]) -> str:
    try:
        return json.dumps(row, default=json_default, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or infinity, which JSON cannot hold: written as the strings NaN, Infinity, -Infinity
        fixed = {k: _non_finite(v) for k, v in row.items()}
        return json.dumps(fixed, default=json_default, ensure_ascii=False, allow_nan=False)


def _non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def json_default(value: Any) -> Any:
    """A value JSON has no type for, in every JSON conduit writes (JSON Lines parts, lists and structs in database
    columns): bytes as lowercase hex (``str()`` would write Python's ``b'...'``), dates and times in ISO form, the rest
    (decimals) as their text."""
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def write_part(table: pa.Table, fmt: str, sink: "str | IO[bytes]") -> None:
    """Serialize ``table`` to ``sink`` (a path or a binary file object) in ``fmt``."""
    if fmt == "parquet":
        # A small dictionary page limit lets high-cardinality columns give up on dictionary encoding
        # early: a third less CPU per part than the default, and smaller files; low-cardinality
        # columns keep their dictionaries.
        pq.write_table(table, sink, compression="zstd", dictionary_pagesize_limit=64 * 1024)
    elif fmt == "csv":
        pacsv.write_csv(table, sink)
    else:
        f = open(sink, "wb") if isinstance(sink, str) else sink  # noqa: SIM115 - closed below when opened here
        try:
            for row in table.to_pylist():
                f.write(_json_row(row).encode("utf-8"))
                f.write(b"\n")
        finally:
            if isinstance(sink, str):
                f.close()


def count_rows(fmt: str, source: Any) -> int:
    """Rows in one part: a path or a readable (seekable, for Parquet) binary file object."""
    if fmt == "parquet":
        return int(pq.ParquetFile(source).metadata.num_rows)
    if fmt == "jsonl":
        if isinstance(source, str):
            with open(source, "rb") as f:
                return sum(1 for _ in f)
        return sum(1 for _ in source)
    # quoted newlines make line counts wrong for CSV: parse it
    return int(pacsv.read_csv(source, parse_options=pacsv.ParseOptions(newlines_in_values=True)).num_rows)
