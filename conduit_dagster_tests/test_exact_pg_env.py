"""The PostgreSQL connection is ingest.yml's, whatever the client's libpq environment.

Each libpq variable (and a service file, ALTER DATABASE/ROLE ... SET, a LATIN1 database) is tried on
both COPY routes, the psql child and in-process psycopg2, and every value read is compared with
PostgreSQL's own text output of the table in a clean session.
"""

import datetime as dt
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
import pytest

from conduit_dagster.engine.errors import ConduitError, SourceError
from conduit_dagster.engine.pg import SESSION_SETTINGS, connect, describe, redact
from conduit_dagster.engine.sources.pgcopy import PsqlCopy, open_copy_producer, psql_environment, psql_path
from conduit_dagster.engine.sources.postgresql import PostgresSource
from conduit_dagster.engine.spec import PostgresSourceSpec, Secret

VALS = """
CREATE TABLE {s}.vals (id int, f8 float8, r4 real, ts timestamp, tstz timestamptz, d date, t text, b bytea, m money);
INSERT INTO {s}.vals VALUES
 (1, 1.7976931348623157e308, 1.17549435e-38, '2025-03-30 02:30:00.5', '2025-06-01 12:00:00.123456+00', '2024-02-29',
  {text1}, '\\x00ff0a', 1234.5),
 (2, 0.1, 3.4028235e38, '1900-01-01 00:00:00', '1900-01-01 00:00:00+00', '0001-01-01', E'plain, "quoted"\\nline', '\\x', -0.01),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
CREATE TABLE {s}.ivals (id int, iv interval);
INSERT INTO {s}.ivals VALUES (1, '3 days 04:05:06.789'), (2, '-3 days 00:00:01'), (3, '49:00:00'), (4, NULL);
"""
UTF8_TEXT = "'Ã©tÃ© été 日本 €'"  # mojibake-looking on purpose: a wrong decoding turns it into 'été'
LATIN1_TEXT = "'Ã©tÃ© été ÿ'"  # every character exists in LATIN1
CLEAN = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3; SET lc_monetary = 'C'"


def _f32(text: str) -> float:
    return struct.unpack("f", struct.pack("f", float(text)))[0]


def reference(dsn: str, schema: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The table as PostgreSQL prints it in a clean session, turned into the Python values Arrow must hold."""
    conn = psycopg2.connect(dsn, client_encoding="UTF8")
    try:
        with conn.cursor() as cur:
            cur.execute(CLEAN)
            cur.execute(
                f"SELECT id, f8::text, r4::text, ts::text, tstz::text, d::text, t, encode(b, 'hex'), m::text, "
                f"(tstz AT TIME ZONE 'UTC')::text FROM {schema}.vals ORDER BY id"
            )
            vals = [
                {
                    "id": i,
                    "f8": None if f8 is None else float(f8),
                    "r4": None if r4 is None else _f32(r4),
                    "ts": None if ts is None else dt.datetime.fromisoformat(ts),
                    "tstz": None if tstz is None else dt.datetime.fromisoformat(tstz),
                    "d": None if d is None else dt.date.fromisoformat(d),
                    "t": t,
                    "b": None if b is None else bytes.fromhex(b),
                    "m": m,
                    "tstz_utc": None if utc is None else dt.datetime.fromisoformat(utc),
                }
                for i, f8, r4, ts, tstz, d, t, b, m, utc in cur.fetchall()
            ]
            # intervals arrive as PostgreSQL's own text in the postgres style (a month is not 30 days)
            cur.execute("SET IntervalStyle = 'postgres'")
            cur.execute(f"SELECT id, iv::text FROM {schema}.ivals ORDER BY id")
            ivals = [{"id": i, "iv": s} for i, s in cur.fetchall()]
    finally:
        conn.close()
    return vals, ivals


def admin(dsn: str, sql: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


class Place:
    def __init__(self, database: str, schema: str, vals: list[dict[str, Any]], ivals: list[dict[str, Any]]) -> None:
        self.database, self.schema, self.vals, self.ivals = database, schema, vals, ivals

    def spec(self, **kw: Any) -> PostgresSourceSpec:
        base: dict[str, Any] = dict(
            name="pg", host="127.0.0.1", port=5432, database=self.database, user="postgres", schema=self.schema
        )
        base.update(kw)
        return PostgresSourceSpec(**base)


@pytest.fixture(scope="module")
def places(postgres_dsn: str) -> Iterator[dict[str, Place]]:
    """``main``: a schema in the test database; ``other``: a database with the same schema and table but other rows
    (where a service file points); ``latin1``: a LATIN1 database whose ALTER DATABASE/ROLE ... SET fight ours."""
    tag = uuid.uuid4().hex[:10]
    schema, other, latin1 = f"conduit_env_{tag}", f"conduit_env_other_{tag}", f"conduit_env_latin1_{tag}"
    admin(postgres_dsn, f"CREATE SCHEMA {schema}")
    admin(postgres_dsn, f"CREATE DATABASE {other}")
    admin(postgres_dsn, f"CREATE DATABASE {latin1} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    other_dsn = postgres_dsn.replace("dbname=test", f"dbname={other}")
    latin1_dsn = postgres_dsn.replace("dbname=test", f"dbname={latin1}")
    try:
        admin(postgres_dsn, VALS.format(s=schema, text1=UTF8_TEXT))
        admin(other_dsn, f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.vals AS SELECT 99 AS id, 'the wrong database' AS t")
        admin(latin1_dsn, f"CREATE SCHEMA {schema}; " + VALS.format(s=schema, text1=LATIN1_TEXT))
        admin(
            postgres_dsn,
            f"ALTER DATABASE {latin1} SET TimeZone = 'America/New_York'; ALTER DATABASE {latin1} SET DateStyle = 'German'; "
            f"ALTER DATABASE {latin1} SET extra_float_digits = 0; ALTER DATABASE {latin1} SET bytea_output = 'escape'; "
            f"ALTER DATABASE {latin1} SET client_encoding = 'LATIN1'; "
            f"ALTER ROLE postgres IN DATABASE {latin1} SET IntervalStyle = 'iso_8601'; "
            f"ALTER ROLE postgres IN DATABASE {latin1} SET standard_conforming_strings = off",
        )
        yield {
            "main": Place("test", schema, *reference(postgres_dsn, schema)),
            "latin1": Place(latin1, schema, *reference(latin1_dsn, schema)),
            "other": Place(other, schema, [], []),
        }
    finally:
        admin(postgres_dsn, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        for database in (other, latin1):
            admin(postgres_dsn, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


# tstz::timestamp: a query's own conversion, which follows the session's TimeZone
def read(
    spec: PostgresSourceSpec, use_psql: bool, query: str = "SELECT *, tstz::timestamp AS tstz_utc FROM vals"
) -> list[dict[str, Any]]:
    if use_psql:
        assert psql_path() and psql_environment(spec) is not None, "this read must take the psql route"
    src = PostgresSource(spec, use_psql=use_psql)
    try:
        batches = [chunk.data for chunk in src.read(query, None, None, resume=False, fetch_size=1000)]
    finally:
        src.close()
    return sorted(pa.Table.from_batches(batches).to_pylist(), key=lambda row: row["id"])


def service_file(path: Path, database: str) -> Path:
    path.write_text(
        f"[conduit_other]\ndbname={database}\noptions=-c extra_float_digits=0 -c TimeZone=America/New_York\n\n"
        "[conduit_options]\noptions=-c extra_float_digits=0 -c DateStyle=German -c IntervalStyle=sql_standard\n"
    )
    return path


# name -> libpq variables ({svc}: the service file written by set_environment, {dir}: its directory)
ENVIRONMENTS: dict[str, dict[str, str]] = {
    "PGSERVICE other database": {"PGSERVICE": "conduit_other", "PGSERVICEFILE": "{svc}"},
    "PGSERVICE options": {"PGSERVICE": "conduit_options", "PGSERVICEFILE": "{svc}"},
    "PGSYSCONFDIR service": {"PGSERVICE": "conduit_other", "PGSYSCONFDIR": "{dir}"},
    "PGOPTIONS": {
        "PGOPTIONS": "-c extra_float_digits=0 -c TimeZone=America/New_York -c DateStyle=German "
        "-c IntervalStyle=sql_standard -c bytea_output=escape -c standard_conforming_strings=off"
    },
    "PGTZ New York": {"PGTZ": "America/New_York"},
    "PGTZ Amsterdam": {"PGTZ": "Europe/Amsterdam"},
    "PGDATESTYLE German": {"PGDATESTYLE": "German"},
    "PGDATESTYLE SQL DMY": {"PGDATESTYLE": "SQL, DMY"},
    "PGCLIENTENCODING": {"PGCLIENTENCODING": "LATIN1"},
    "PGGEQO": {"PGGEQO": "off"},
    "target variables": {
        "PGHOST": "nonexistent.invalid",
        "PGHOSTADDR": "127.0.0.2",
        "PGPORT": "1",
        "PGDATABASE": "postgres",
        "PGUSER": "nobody",
        "PGTARGETSESSIONATTRS": "standby",
        "PGAPPNAME": "someone-else",
        "PGCONNECT_TIMEOUT": "1",
    },
}


def set_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], other_db: str) -> None:
    svc = service_file(tmp_path / "pg_service.conf", other_db)
    monkeypatch.delenv("CONDUIT_PSQL", raising=False)
    for key, value in env.items():  # both routes read os.environ when they connect
        monkeypatch.setenv(key, value.format(svc=svc, dir=tmp_path))


@pytest.mark.parametrize("use_psql", [True, False], ids=["psql", "in-process"])
@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_libpq_environment_changes_no_value(places, monkeypatch, tmp_path, name, use_psql):
    main = places["main"]
    set_environment(monkeypatch, tmp_path, ENVIRONMENTS[name], places["other"].database)
    assert read(main.spec(), use_psql) == main.vals
    assert read(main.spec(), use_psql, "SELECT * FROM ivals") == main.ivals


@pytest.mark.parametrize("use_psql", [True, False], ids=["psql", "in-process"])
def test_latin1_database_with_hostile_database_and_role_settings(places, monkeypatch, use_psql):
    latin1 = places["latin1"]
    monkeypatch.delenv("CONDUIT_PSQL", raising=False)
    rows = read(latin1.spec(), use_psql)
    assert rows == latin1.vals
    assert rows[0]["t"] == "Ã©tÃ© été ÿ"
    assert read(latin1.spec(), use_psql, "SELECT * FROM ivals") == latin1.ivals


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_every_connection_and_the_psql_child_run_in_the_session(places, monkeypatch, tmp_path, name):
    """pg.connect (the source, the destination, the in-process COPY) and the psql child: ingest.yml's database and
    SESSION_SETTINGS, in the LATIN1 database whose own settings say otherwise."""
    latin1 = places["latin1"]
    set_environment(monkeypatch, tmp_path, ENVIRONMENTS[name], places["other"].database)
    expected = [latin1.database, *(value for _, value in SESSION_SETTINGS)]
    columns = ", ".join(["current_database()", *(f"current_setting('{setting}')" for setting, _ in SESSION_SETTINGS)])
    conn = connect(latin1.spec(), "destination")
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {columns}")
            assert list(cur.fetchone()) == expected
    finally:
        conn.close()
    spec = latin1.spec()
    env = psql_environment(spec)
    psql = psql_path()
    assert psql and env is not None
    producer = PsqlCopy(psql, env, f"COPY (SELECT {columns}) TO STDOUT".encode(), lambda text: text)
    out = producer.stream.read()
    producer.finish()
    producer.close()
    assert out.decode().rstrip("\n").split("\t") == expected


@pytest.mark.parametrize("use_psql", [True, False], ids=["psql", "in-process"])
def test_missing_service_named_by_pgservice_says_what_to_do(places, monkeypatch, tmp_path, use_psql):
    """A PGSERVICE naming no service: libpq refuses any connection in this process, so the error says why."""
    set_environment(monkeypatch, tmp_path, {"PGSERVICE": "no_such_service", "PGSERVICEFILE": "{svc}"}, "x")
    with pytest.raises(SourceError, match='definition of service "no_such_service" not found.*unset PGSERVICE'):
        read(places["main"].spec(), use_psql)


def test_url_naming_a_service_is_refused(places):
    spec = places["main"].spec(host="127.0.0.1", database=None, user=None, url=Secret("postgresql:///?service=prod"))
    with pytest.raises(SourceError, match="names a service .*give host, port and database in the URL"):
        PostgresSource(spec)


# --- secrets in connection descriptions and errors -------------------------------------------------------------


def test_password_with_a_raw_at_sign_never_shows(places):
    spec = places["main"].spec(
        host="127.0.0.1", database=None, user=None, url=Secret("postgresql://postgres:S3cr@tPart@127.0.0.1:5432/test")
    )
    assert describe(spec) == "postgresql://***"
    with pytest.raises(SourceError) as info:
        PostgresSource(spec)
    message = str(info.value)
    assert "S3cr" not in message and "tPart" not in message
    assert "percent-encoded (%40" in message


def test_redact_masks_the_encoded_and_decoded_password():
    spec = PostgresSourceSpec(name="pg", url=Secret("postgresql://etl:p%40ss%2Fw0rd@db.example.com:5432/prod"))
    text = "failed for p@ss/w0rd, or p%40ss%2Fw0rd, at postgresql://etl:p%40ss%2Fw0rd@db.example.com:5432/prod"
    masked = redact(text, spec)
    assert "w0rd" not in masked and "p%40ss" not in masked and "p@ss" not in masked
    assert describe(spec) == "postgresql://db.example.com:5432/prod"


def test_connection_error_through_a_url_hides_the_password(places):
    secret = "hunter2%2Fsecret"
    spec = places["main"].spec(
        host="127.0.0.1",
        database=None,
        user=None,
        url=Secret(f"postgresql://nobody_{uuid.uuid4().hex[:6]}:{secret}@127.0.0.1:1/x"),
    )
    with pytest.raises(SourceError) as info:
        PostgresSource(spec)
    message = str(info.value)
    assert "postgresql://127.0.0.1:1/x" in message
    assert "hunter2" not in message and "nobody_" not in message


# --- the psql binary -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "not executable"])
def test_bad_conduit_psql_is_a_clear_error(places, monkeypatch, tmp_path, kind):
    path = tmp_path / "psql"
    if kind == "not executable":
        path.write_text("#!/bin/sh\n")
        path.chmod(0o644)
    monkeypatch.setenv("CONDUIT_PSQL", str(path))
    src = PostgresSource(places["main"].spec())
    try:
        with pytest.raises(
            SourceError, match=r"CONDUIT_PSQL=.*psql is not an executable file: set CONDUIT_PSQL to the path .*=off"
        ) as err:
            list(src.read("SELECT * FROM vals", None, None, resume=False, fetch_size=1000))
        assert str(err.value).startswith("source "), "the error names the source it stopped"
        with pytest.raises(SourceError, match="CONDUIT_PSQL"):
            open_copy_producer(src.spec, src.conn, b"COPY (SELECT 1) TO STDOUT", lambda t: t, use_psql=True)
    finally:
        src.close()


def test_conduit_psql_off_and_a_good_path_both_read_exactly(places, monkeypatch):
    main = places["main"]
    psql = psql_path()
    assert psql
    monkeypatch.setenv("CONDUIT_PSQL", "off")
    assert read(main.spec(), False) == main.vals
    monkeypatch.setenv("CONDUIT_PSQL", psql)
    assert read(main.spec(), True) == main.vals


def test_conduit_error_names_the_role_for_a_bad_host():
    spec = PostgresSourceSpec(name="pg", host="user@host", database="x")
    with pytest.raises(ConduitError, match="destination 'pg': `host` is not a host name"):
        connect(spec, "destination")
