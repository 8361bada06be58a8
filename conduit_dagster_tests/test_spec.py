"""ingest.yml parsing: the happy path and every error, each naming file, line/key and fix."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.spec import LocalDestinationSpec, PostgresSourceSpec, Secret, SqliteSourceSpec, load_spec

GOOD = """
sources:
  - name: pg
    type: postgresql
    host: db.internal
    port: ${PGPORT:-6543}
    database: prod
    user: etl
    password: ${PG_PASSWORD}
    schema: sales
    resume: true
    checkpoint_column: updated_at
  - name: lite
    type: sqlite
    path: data/shop.db
destinations:
  - name: lake
    type: local
    path: out
    format: csv
resources:
  - name: orders
    source: pg
    destination: lake
    query: SELECT * FROM orders
  - name: customers
    source: pg
    destination: lake
    checkpoint_column: id
    batch_size: 500
    description: all customers
    query: SELECT * FROM customers
  - name: items
    source: lite
    destination: lake
    query: SELECT * FROM items
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ingest.yml"
    p.write_text(textwrap.dedent(text))
    return p


def test_spec_parses_sources_destinations_resources(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "s3cr3t-pw")
    monkeypatch.delenv("PGPORT", raising=False)
    spec = load_spec(write(tmp_path, GOOD))
    pg, lite = spec.sources
    assert isinstance(pg, PostgresSourceSpec) and pg.port == 6543 and pg.schema == "sales"
    assert pg.password == Secret("s3cr3t-pw")
    assert "s3cr3t-pw" not in repr(spec)
    assert isinstance(lite, SqliteSourceSpec) and lite.path == (tmp_path / "data" / "shop.db").resolve()
    (lake,) = spec.destinations
    assert isinstance(lake, LocalDestinationSpec) and lake.path == (tmp_path / "out").resolve() and lake.format == "csv"
    orders, customers, items = spec.resources
    assert (orders.resume, orders.checkpoint_column, orders.batch_size) == (True, "updated_at", 10_000)
    # the resource's own checkpoint_column wins over the source's
    assert (customers.resume, customers.checkpoint_column, customers.batch_size) == (True, "id", 500)
    assert customers.description == "all customers"
    assert (items.resume, items.checkpoint_column) == (False, None)


def test_spec_resource_can_turn_resume_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "x")
    text = GOOD.replace("    query: SELECT * FROM orders", "    resume: false\n    query: SELECT * FROM orders")
    assert load_spec(write(tmp_path, text)).resource("orders").resume is False


def test_spec_env_default_used_and_env_value_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "x")
    monkeypatch.setenv("PGPORT", "7000")
    assert load_spec(write(tmp_path, GOOD)).sources[0].port == 7000


def test_spec_env_value_cannot_change_structure(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "a\nresume: false\n")
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.sources[0].resume is True
    assert spec.sources[0].password == Secret("a\nresume: false\n")


MINIMAL = """
sources:
  - name: s
    type: sqlite
    path: x.db
destinations:
  - name: d
    type: local
    path: out
resources:
  - name: r
    source: s
    destination: d
    query: SELECT 1
"""

ERRORS = [
    # (change, expected fragments of the message)
    (("path: x.db", "path: ${NOPE_VAR}"), [":5:", "sources[0].path", "NOPE_VAR is not set", "export it"]),
    (
        ("    query: SELECT 1", "    query: SELECT 1\n    bacth_size: 5"),
        [":15:", "resources[0].bacth_size", "unknown key", "batch_size"],
    ),
    (("    query: SELECT 1", "    query: SELECT 1\n    batch_size: lots"), [":15:", "resources[0].batch_size", "whole number"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    batch_size: 0"), ["resources[0].batch_size", "between 1 and 10000000"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    resume: maybe"), ["resources[0].resume", "true or false"]),
    (("    source: s", "    source: nope"), [":12:", "resources[0].source", "unknown source 'nope'", "declared sources: s"]),
    (
        ("    destination: d\n    query", "    destination: dd\n    query"),
        ["resources[0].destination", "unknown destination 'dd'"],
    ),
    (("  - name: r", "  - name: 9lives"), [":11:", "resources[0].name", "not a valid name"]),
    (("  - name: r", "  - name: ../etc"), ["resources[0].name", "not a valid name"]),
    (("  - name: r", "  - name: a-b"), ["resources[0].name", "not a valid name"]),
    (("  - name: r", "  - name: _conduit_staging"), ["resources[0].name", "starts with _"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    schedule: every day"), [":15:", "resources[0].schedule", "5-field cron"]),
    (
        ("    query: SELECT 1", '    query: SELECT 1\n    schedule: {cron: "0 3 * * *", timezone: Mars/Olympus}'),
        ["resources[0].schedule.timezone", "unknown time zone"],
    ),
    (
        ("    query: SELECT 1", '    query: SELECT 1\n    schedule: {cron: "0 3 * * *", tz: UTC}'),
        ["resources[0].schedule.tz", "unknown key"],
    ),
    (("    query: SELECT 1", "    query: SELECT 1\n    retries: -1"), ["resources[0].retries", "between 0 and 100"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    sensor: true"), ["resources[0].sensor", "set checkpoint_column"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    sensor: often"), ["resources[0].sensor", "expected true"]),
    (("  - name: r", "  - name: _hidden"), ["resources[0].name", "starts with _"]),
    (("    query: SELECT 1", "    query: SELECT 1; DROP TABLE x"), [":14:", "resources[0].query", "more than one statement"]),
    (("    query: SELECT 1", "    query: SELECT 1 /* open"), [":14:", "resources[0].query", "unterminated /*"]),
    (("    query: SELECT 1", "    query: -- only a comment"), ["resources[0].query", "empty"]),
    (
        ("resources:\n  - name: r\n    source: s\n    destination: d\n    query: SELECT 1\n", "resources: []\n"),
        ["resources: the list is empty"],
    ),
    (("  - name: s\n    type: sqlite\n    path: x.db\n", "  - [s]\n"), ["sources[0]: expected a mapping", "got a list"]),
    (("    type: sqlite", "    type: oracle"), ["sources[0].type", "unknown value 'oracle'", "postgresql, sqlite"]),
    (("    type: local", "    type: local\n    format: xlsx"), ["destinations[0].format", "parquet, csv, jsonl"]),
    (("    query: SELECT 1", "    query: SELECT 1\n    resume: true"), ["resources[0]", "checkpoint_column"]),
    (("    query: SELECT 1", "    query: ''"), ["resources[0].query", "empty"]),
    (("    query: SELECT 1", ""), ["resources[0]", "missing required key 'query'"]),
    (("sources:", "sauces:"), ["unknown top-level key 'sauces'"]),
    (("  - name: s\n", "  - name: s\n    name: t\n"), [":4:", "appears twice"]),
    (("    path: out", "    path: out\n    path: out2"), ["appears twice"]),
    (
        ("resources:\n  - name: r\n    source: s\n    destination: d\n    query: SELECT 1\n", "resources: 5\n"),
        [":10:", "resources: expected a list"],
    ),
    (("    type: sqlite\n", "    type: sqlite\n   bad: [\n"), ["not valid YAML"]),
]


@pytest.mark.parametrize("change,fragments", ERRORS, ids=[f[0] for _, f in ERRORS])
def test_spec_errors_name_file_key_and_fix(tmp_path, change, fragments):
    old, new = change
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path.resolve()) in message
    for fragment in fragments:
        assert fragment in message, message


def test_spec_duplicate_names_are_errors(tmp_path):
    text = MINIMAL + "  - name: r\n    source: s\n    destination: d\n    query: SELECT 2\n"
    with pytest.raises(SpecError, match=r":15: resources\[1\].name: duplicate resource name 'r'"):
        load_spec(write(tmp_path, text))
    text = MINIMAL.replace("destinations:", "  - name: s\n    type: sqlite\n    path: y.db\ndestinations:")
    with pytest.raises(SpecError, match=r"sources\[1\].name: duplicate source name 's'"):
        load_spec(write(tmp_path, text))


def test_spec_missing_file_and_empty_file(tmp_path):
    with pytest.raises(SpecError, match="file not found.*CONDUIT_INGEST_FILE"):
        load_spec(tmp_path / "nope.yml")
    with pytest.raises(SpecError, match="empty"):
        load_spec(write(tmp_path, ""))


def test_spec_postgres_url_or_parts_not_both(tmp_path):
    text = MINIMAL.replace(
        "    type: sqlite\n    path: x.db", "    type: postgresql\n    url: postgresql://u:pw@h/db\n    host: h"
    )
    with pytest.raises(SpecError, match=r"sources\[0\].url: give either `url` or host, not both") as info:
        load_spec(write(tmp_path, text))
    assert "pw" not in str(info.value).replace("postgresql", "")


def test_spec_port_range_and_env_values_not_echoed(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", "x")
    monkeypatch.setenv("PGPORT", "S3cr3tPW")
    with pytest.raises(SpecError, match="sources.0..port: expected a whole number, got a value from the environment") as info:
        load_spec(write(tmp_path, GOOD))
    assert "S3cr3tPW" not in str(info.value)
    monkeypatch.setenv("PGPORT", "99999")
    with pytest.raises(SpecError, match="between 1 and 65535"):
        load_spec(write(tmp_path, GOOD))


def test_spec_missing_secret_variable_message_has_no_value(tmp_path, monkeypatch):
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    with pytest.raises(SpecError, match=r"sources\[0\].password: environment variable PG_PASSWORD is not set"):
        load_spec(write(tmp_path, GOOD))


def test_engine_never_imports_dagster():
    code = "import sys, conduit_dagster.engine, conduit_dagster.engine.runner; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


S3_SPEC = """
checkpoints:
  type: s3
  bucket: ops-bucket
  prefix: /conduit/cp/
  endpoint_url: http://127.0.0.1:9000
  lease_seconds: 30
sources:
  - name: landed
    type: file
    path: s3://landing/events/2026-*.jsonl.gz
    aws_access_key_id: ${KEY_ID}
    aws_secret_access_key: ${SECRET_KEY}
    resume: true
    checkpoint_column: id
  - name: local_files
    type: file
    path: data/*.parquet
destinations:
  - name: data_lake_s3
    type: s3
    bucket: data-lake
    prefix: raw/shop
    region: eu-central-1
resources:
  - name: events
    source: landed
    destination: data_lake_s3
  - name: snapshots
    source: local_files
    destination: data_lake_s3
"""


def test_spec_s3_destination_file_sources_and_checkpoints(tmp_path, monkeypatch):
    from conduit_dagster.engine.spec import FileSourceSpec, S3DestinationSpec, load_spec_text

    monkeypatch.setenv("KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("SECRET_KEY", "s3cr3t-value")
    spec = load_spec_text(S3_SPEC, tmp_path / "ingest.yml")
    assert spec.checkpoints is not None
    assert (spec.checkpoints.type, spec.checkpoints.bucket, spec.checkpoints.prefix) == ("s3", "ops-bucket", "conduit/cp")
    assert spec.checkpoints.s3.endpoint_url == "http://127.0.0.1:9000" and spec.checkpoints.lease_seconds == 30
    landed, local_files = spec.sources
    assert isinstance(landed, FileSourceSpec) and landed.is_s3 and landed.format == "jsonl"
    assert landed.s3.secret_access_key is not None and landed.s3.secret_access_key.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(landed)
    assert isinstance(local_files, FileSourceSpec) and local_files.path == str(tmp_path / "data" / "*.parquet")
    assert local_files.format == "parquet" and not local_files.is_s3
    (dest,) = spec.destinations
    assert isinstance(dest, S3DestinationSpec) and dest.uri("events") == "s3://data-lake/raw/shop/events/"
    assert dest.s3.region == "eu-central-1"
    events = spec.resource("events")
    assert events.query == "" and events.resume and events.checkpoint_column == "id"


@pytest.mark.parametrize(
    "change,fragments",
    [
        (("bucket: data-lake", "bucket: Data_Lake"), ["destinations[0].bucket", "not a valid S3 bucket name", "lowercase"]),
        (("prefix: raw/shop", "prefix: raw//shop"), ["destinations[0].prefix", "not a clean key prefix"]),
        (("path: data/*.parquet", "path: data/files"), ["sources[1].path", "cannot tell the file format", "format: csv"]),
        (
            (
                "    destination: data_lake_s3\n  - name: snapshots",
                "    destination: data_lake_s3\n    query: SELECT 1\n  - name: snapshots",
            ),
            ["resources[0].query", "reads files, which have no query"],
        ),
        (
            ("  type: s3\n  bucket: ops-bucket", "  type: local\n  bucket: ops-bucket"),
            ["checkpoints.bucket", "applies to `type: s3` only"],
        ),
        (("  lease_seconds: 30", "  lease_second: 30"), ["checkpoints.lease_second", "unknown key"]),
        (("endpoint_url: http://127.0.0.1:9000", "endpoint_url: 127.0.0.1:9000"), ["checkpoints.endpoint_url", "http://"]),
        (("endpoint_url: http://127.0.0.1:9000", "endpoint_url: http://me:pw@127.0.0.1:9000"), ["must not hold credentials"]),
        (("    aws_access_key_id: ${KEY_ID}\n", ""), ["sources[0]", "give both aws_access_key_id and aws_secret_access_key"]),
        (
            ("    path: data/*.parquet", "    path: data/*.parquet\n    endpoint_url: http://x:1"),
            ["sources[1].endpoint_url", "s3:// paths only"],
        ),
    ],
)
def test_spec_s3_errors_name_file_key_and_fix(tmp_path, monkeypatch, change, fragments):
    from conduit_dagster.engine.spec import load_spec_text

    monkeypatch.setenv("KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("SECRET_KEY", "s3cr3t-value")
    old, new = change
    assert old in S3_SPEC
    with pytest.raises(SpecError) as info:
        load_spec_text(S3_SPEC.replace(old, new, 1), tmp_path / "ingest.yml")
    message = str(info.value)
    assert str(tmp_path / "ingest.yml") in message
    for fragment in fragments:
        assert fragment in message, message
    assert "s3cr3t" not in message and "AKIAEXAMPLE" not in message


def test_readme_reference_example_is_valid(tmp_path, monkeypatch):
    """The ingest.yml reference in the README parses as documented (so the front door stays true)."""
    from conduit_dagster.engine.spec import S3DestinationSpec, load_spec_text

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## ingest.yml reference") :]
    example = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", section.index("```yaml\n") + 8)]
    for var in ("PG_PASSWORD", "WAREHOUSE_PASSWORD", "LEGACY_PASSWORD", "MART_PASSWORD"):
        monkeypatch.setenv(var, "x")
    spec = load_spec_text(example, tmp_path / "ingest.yml")
    assert spec.checkpoints is not None and spec.checkpoints.type == "s3" and spec.checkpoints.bucket == "ops-bucket"
    assert any(isinstance(d, S3DestinationSpec) for d in spec.destinations)
    assert {s.type for s in spec.sources} == {"postgresql", "sqlite", "file", "mysql", "sqlalchemy"}
    assert {d.type for d in spec.destinations} == {"local", "postgresql", "mysql", "s3"}


@pytest.mark.parametrize(
    ("destination", "resource", "message"),
    [
        ("table: " + "t" * 64, "r", "is longer than PostgreSQL's 63 characters"),
        ("table: _conduit_batches", "r", "starts with _conduit_, which conduit's own tables use"),
        ("mode: append", "r" * 64, "longer than PostgreSQL's 63 characters; set `table:`"),
    ],
)
def test_a_postgresql_table_name_the_server_would_cut_or_that_is_conduits_own_is_refused(
    tmp_path, destination, resource, message
):
    """PostgreSQL cuts identifiers at 63 characters, so two long names would write one table; `_conduit_batches` is
    conduit's own bookkeeping table. Both are refused when ingest.yml is read (as for MySQL)."""
    from conduit_dagster.engine.errors import SpecError
    from conduit_dagster.engine.spec import load_spec_text

    text = f"""
sources:
  - name: src
    type: sqlite
    path: x.db
    resume: true
    checkpoint_column: id
destinations:
  - name: wh
    type: postgresql
    database: test
    {destination}
resources:
  - name: {resource}
    source: src
    destination: wh
    query: SELECT id FROM t
"""
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec_text(text, tmp_path / "ingest.yml")
