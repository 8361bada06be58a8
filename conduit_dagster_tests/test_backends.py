"""Backends: checkpoint identities pinned byte for byte, the registry's checks, and no type switch outside the backends.

A checkpoint is bound to ``query_fingerprint``, ``source_identity`` and ``destination_identity``: if one of these
strings changed, every existing checkpoint would refuse to resume. They are pinned here for each backend.
"""

import re
from pathlib import Path

import pytest

from conduit_dagster.engine.runner import destination_identity, query_fingerprint, source_identity
from conduit_dagster.engine.spec import load_spec_text

INGEST = """
sources:
  - {name: pg, type: postgresql, host: db.example, port: 5433, database: shop, user: etl, password: hunter2, schema: sales}
  - {name: pgurl, type: postgresql, url: "postgresql://etl:hunter2@db.example:6543/shop"}
  - {name: lite, type: sqlite, path: data/shop.db}
  - {name: csvs, type: file, path: data/*.csv}
  - {name: lake, type: file, path: "s3://bucket-a/raw/orders/", format: parquet, endpoint_url: "http://127.0.0.1:9000"}
destinations:
  - {name: out, type: local, path: out, format: csv}
  - {name: wh, type: postgresql, host: wh.example, database: dw, password: secret9, schema: raw, table: t1, mode: merge,
     primary_key: [id]}
  - {name: wh2, type: postgresql, url: "postgresql://etl:secret9@wh.example/dw", mode: replace}
  - {name: s3out, type: s3, bucket: bucket-b, prefix: land/zone, format: jsonl, endpoint_url: "http://127.0.0.1:9000"}
resources:
  - {name: r_pg, source: pg, destination: wh, query: "SELECT * FROM orders -- note", resume: true, checkpoint_column: id}
  - {name: r_pgurl, source: pgurl, destination: wh2, query: "SELECT 1 AS x"}
  - {name: r_lite, source: lite, destination: out, query: "SELECT * FROM t", resume: true, checkpoint_column: id}
  - {name: r_csv, source: csvs, destination: s3out}
  - {name: r_lake, source: lake, destination: out, resume: true, checkpoint_column: ts}
"""

# (query_fingerprint, source_identity, destination_identity) as released: a change breaks every stored checkpoint
PINNED = {
    "r_pg": (
        "4bafec34e4d890c5870ab3ccc6bc801712f60211ae69354e3a3b413f3e2218b0",
        "postgresql://db.example:5433/shop?schema=sales",
        "postgresql://wh.example:5432/dw/raw.t1?mode=merge",
    ),
    "r_pgurl": (
        "f4dcf8e5ca728c4000586fe50f745028705091aa579639e96cd37c49b6a3b94d",
        "postgresql://db.example:6543/shop?schema=",
        "postgresql://wh.example:5432/dw/public.r_pgurl?mode=replace",
    ),
    "r_lite": (
        "d3202434f9ae1caa7420248a62f6ee9e6e0e2cd3620d4efc47b0815d46770476",
        "sqlite:/srv/etl/data/shop.db",
        "local:/srv/etl/out?format=csv",
    ),
    "r_csv": (
        "583de9b986b8d548930317262afd136075e0d9ea102f091ed7f883b84077307b",
        "file:/srv/etl/data/*.csv",
        "s3://bucket-b/land/zone/r_csv/?format=jsonl&endpoint=http://127.0.0.1:9000",
    ),
    "r_lake": (
        "46c9de4be9c41b0643d565f7db857524e2976531d058420102023de5e8f771a1",
        "file:s3://bucket-a/raw/orders/?endpoint=http://127.0.0.1:9000",
        "local:/srv/etl/out?format=csv",
    ),
}

# (kinds, dagster/uri, description, counts_whole_output, uses_s3) as released
GLUE = {
    "r_pg": (["postgres"], "postgresql://wh.example:5432/dw/raw.t1", "```sql\nSELECT * FROM orders -- note\n```", False, False),
    "r_pgurl": (
        ["postgres"],
        "postgresql://wh.example:5432/dw/public.r_pgurl",
        "```sql\nSELECT 1 AS x\n```",
        True,
        False,
    ),
    "r_lite": (["csv", "sqlite"], "file:///srv/etl/out/r_lite", "```sql\nSELECT * FROM t\n```", True, False),
    "r_csv": (["csv", "file", "json", "s3"], "s3://bucket-b/land/zone/r_csv/", "csv files: `/srv/etl/data/*.csv`", True, True),
    "r_lake": (["csv", "parquet", "s3"], "file:///srv/etl/out/r_lake", "parquet files: `s3://bucket-a/raw/orders/`", True, True),
}


def _spec():  # type: ignore[no-untyped-def]
    return load_spec_text(INGEST, Path("/srv/etl/ingest.yml"))


def test_checkpoint_identities_are_pinned_for_every_backend() -> None:
    got = {r.name: (query_fingerprint(r), source_identity(r), destination_identity(r)) for r in _spec().resources}
    assert got == PINNED
    assert not any("hunter2" in part or "secret9" in part for ids in got.values() for part in ids)


def test_asset_kinds_uri_and_description_are_pinned_for_every_backend() -> None:
    from conduit_dagster.assets import asset_description, asset_kinds, counts_whole_output, destination_uri
    from conduit_dagster.resources import uses_s3

    got = {
        r.name: (sorted(asset_kinds(r)), destination_uri(r), asset_description(r), counts_whole_output(r), uses_s3(r))
        for r in _spec().resources
    }
    assert got == GLUE


def _source_backend(**changes: object):  # type: ignore[no-untyped-def]
    import dataclasses

    from conduit_dagster.engine.backends import source_backend

    return dataclasses.replace(source_backend("sqlite"), **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "source type 'sqlite' is already registered"),
        ({"type": "Bad-Type"}, "source type 'Bad-Type' is not a lowercase name"),
        ({"type": "nokeys", "keys": frozenset({"name", "type"})}, "keys lack checkpoint_column, resume"),
        ({"type": "setkeys", "keys": {"name", "type", "resume", "checkpoint_column"}}, "keys must be a frozenset"),
        ({"type": "noopen", "open": None}, "open must be callable"),
        ({"type": "noidentity", "identity": "sqlite:"}, "identity must be callable"),
    ],
)
def test_the_registry_refuses_a_bad_source_backend(changes: dict[str, object], message: str) -> None:
    from conduit_dagster.engine.backends import register_source_backend, source_types

    before = source_types()
    with pytest.raises(ValueError, match=re.escape(message)):
        register_source_backend(_source_backend(**changes))
    assert source_types() == before


def test_the_registry_refuses_a_bad_destination_backend() -> None:
    import dataclasses

    from conduit_dagster.engine.backends import (
        destination_backend,
        destination_types,
        register_destination_backend,
        register_source_backend,
    )

    local = destination_backend("local")
    with pytest.raises(ValueError, match="destination type 'local' is already registered"):
        register_destination_backend(local)
    with pytest.raises(ValueError, match="destination type 'x': uri must be callable"):
        register_destination_backend(dataclasses.replace(local, type="x", uri=None))
    with pytest.raises(ValueError, match="destination type 'y': keys lack name"):
        register_destination_backend(dataclasses.replace(local, type="y", keys=frozenset({"type"})))
    with pytest.raises(TypeError, match="register_source_backend takes a SourceBackend, got DestinationBackend"):
        register_source_backend(local)  # type: ignore[arg-type]
    assert destination_types() == ("local", "postgresql", "mysql", "s3")


def test_an_unknown_type_names_the_registered_ones() -> None:
    from conduit_dagster.engine.errors import SpecError

    text = INGEST.replace("type: sqlite", "type: oracle")
    with pytest.raises(SpecError, match=re.escape("unknown value 'oracle'; use one of: postgresql, sqlite, file")):
        load_spec_text(text, Path("/srv/etl/ingest.yml"))


def test_no_type_switch_outside_the_backends() -> None:
    """The runner, the Dagster glue, the CLI and spec.py ask a backend; only a backend's own module knows its spec type."""
    import conduit_dagster

    root = Path(conduit_dagster.__file__).parent
    backends = (root / "engine" / "sources", root / "engine" / "destinations")
    switch = re.compile(
        r"isinstance\([^)]*(Source|Destination)Spec\b"  # isinstance(d, PostgresDestinationSpec)
        r"|(source|destination|\bs|\bd)\.type\s*(==|!=|in)"  # source.type == "file"
        r"|_id\.startswith\("  # destination_id.startswith("postgresql://")
    )
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent in backends:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if switch.search(line):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert found == []


def test_the_types_are_listed_in_a_fixed_order_whatever_was_imported_first() -> None:
    import subprocess
    import sys

    code = (
        "import conduit_dagster.engine.sources.files, conduit_dagster.engine.destinations.s3\n"
        "from conduit_dagster.engine.backends import source_types, destination_types\n"
        "print(source_types(), destination_types())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('postgresql', 'sqlite', 'file', 'mysql', 'sqlalchemy') ('local', 'postgresql', 'mysql', 's3')"
