"""ingest.yml parsing never silently changes a value nor shows a secret.

YAML 1.1 reads unquoted ``012345`` as 5349 and ``12:30:45`` as 45045; a ``${VAR}`` in a query would be shown in the
UI and in PostgreSQL's errors; a password with ``@`` substituted into a url would move the host. Each is checked here
through ``load_spec_text``, the way a user's file is read, and the URL case against the real PostgreSQL.
"""

import datetime as dt
import uuid
from pathlib import Path

import psycopg2
import pytest

from conduit_dagster.engine.errors import SpecError
from conduit_dagster.engine.spec import (
    IngestSpec,
    PostgresDestinationSpec,
    PostgresSourceSpec,
    load_spec_text,
)

BASE = """
sources:
  - name: pg
    type: postgresql
    host: 127.0.0.1
    database: test
    user: postgres
    password: pw
    checkpoint_column: id
destinations:
  - name: wh
    type: postgresql
    database: test
    table: t1
resources:
  - name: r
    source: pg
    destination: wh
    query: SELECT 1
"""

# Unquoted values YAML 1.1 would turn into something else (a number, a boolean, a date, an error)
TRICKY = [
    "012345",  # octal: 5349
    "12:30:45",  # base 60: 45045
    "190:20:30.15",  # base 60 float
    "1_000",  # 1000
    "0x1F",  # 31
    "0b101",  # 5
    "1.0e+3",  # 1000.0
    "1e3",
    "+12",
    "-0",
    ".inf",
    ".NaN",
    "yes",
    "on",
    "No",
    "TRUE",
    "2024-01-01",  # a date
    "2024-01-01 10:00:00",  # a datetime
    "2024-13-45",  # an impossible date: crashed the parser
    "=",  # the YAML 'value' key: crashed the parser
]


def load(text: str, tmp_path: Path) -> IngestSpec:
    return load_spec_text(text, tmp_path / "ingest.yml")


def error(text: str, tmp_path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load(text, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "ingest.yml") in message, message
    return message


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize("key", ["password", "database", "user"])
def test_connection_text_keys_keep_the_text_written(tmp_path, key, value):
    old = {"password": "password: pw", "database": "database: test\n    user", "user": "user: postgres"}[key]
    new = {"password": f"password: {value}", "database": f"database: {value}\n    user", "user": f"user: {value}"}[key]
    spec = load(BASE.replace(old, new, 1), tmp_path)
    source = spec.sources[0]
    assert isinstance(source, PostgresSourceSpec)
    got = source.password.reveal() if key == "password" and source.password else getattr(source, key)
    assert got == value and type(got) is str


@pytest.mark.parametrize("value", TRICKY)
def test_query_and_columns_keep_the_text_written(tmp_path, value):
    text = BASE.replace("query: SELECT 1", f"query: {value}").replace("checkpoint_column: id", f"checkpoint_column: {value}")
    (resource,) = load(text, tmp_path).resources
    assert resource.query == value and resource.checkpoint_column == value


@pytest.mark.parametrize("value", ["yes", "on", "No", "TRUE", "null_", "y"])
def test_table_and_description_keep_the_text_written(tmp_path, value):
    text = BASE.replace("table: t1", f"table: {value}").replace("query: SELECT 1", f"query: SELECT 1\n    description: {value}")
    spec = load(text, tmp_path)
    (dest,) = spec.destinations
    assert isinstance(dest, PostgresDestinationSpec) and dest.table == value
    assert spec.resources[0].description == value


@pytest.mark.parametrize("spelled", ["null", "Null", "NULL", "~"])
def test_a_null_in_a_text_key_is_refused_not_dropped(tmp_path, spelled):
    message = error(BASE.replace("password: pw", f"password: {spelled}"), tmp_path)
    assert ":8: sources[0].password" in message and "not set" in message and "quote" in message
    # quoted, it is the text; left empty, it is unset
    quoted = load(BASE.replace("password: pw", f"password: '{spelled}'"), tmp_path).sources[0]
    assert isinstance(quoted, PostgresSourceSpec) and quoted.password is not None and quoted.password.reveal() == spelled
    empty = load(BASE.replace("password: pw", "password:"), tmp_path).sources[0]
    assert isinstance(empty, PostgresSourceSpec) and empty.password is None


@pytest.mark.parametrize(
    "key,written,expected",
    [
        ("batch_size", "5000", 5000),
        ("batch_size", "50_000", 50_000),
        ("batch_size", "10000000", 10_000_000),
        ("retries", "0", 0),
        ("port", "5432", 5432),
        ("port", "'6543'", 6543),
    ],
)
def test_integer_keys_take_plain_decimal_numbers(tmp_path, key, written, expected):
    text = _with_integer(key, written)
    spec = load(text, tmp_path)
    got = spec.sources[0].port if key == "port" else getattr(spec.resources[0], key)  # type: ignore[union-attr]
    assert got == expected


def _with_integer(key: str, written: str) -> str:
    if key == "port":
        return BASE.replace("    host: 127.0.0.1\n", f"    host: 127.0.0.1\n    port: {written}\n", 1)
    return BASE.replace("query: SELECT 1", f"query: SELECT 1\n    {key}: {written}")


@pytest.mark.parametrize(
    "written", ["012345", "05432", "0x1F", "0o17", "0b101", "12:30:45", "1e3", "1.0e+3", ".inf", "5432.0", "yes", "+80"]
)
@pytest.mark.parametrize("key,line", [("port", 6), ("batch_size", 20)])
def test_integer_keys_refuse_what_yaml_would_change(tmp_path, key, line, written):
    message = error(_with_integer(key, written), tmp_path)
    where = f"sources[0].{key}" if key == "port" else f"resources[0].{key}"
    assert f":{line}: {where}: expected a whole number, got '{written}'" in message, message
    assert "plain decimal number" in message


@pytest.mark.parametrize(
    "key,written,fragments",
    [
        ("batch_size", "100000000000000000000000000000", ["between 1 and 10000000", "held in memory whole"]),
        ("batch_size", "10000001", ["between 1 and 10000000", "held in memory whole"]),
        ("batch_size", "0", ["between 1 and 10000000"]),
        ("port", "0", ["between 1 and 65535"]),
        ("port", "65536", ["between 1 and 65535"]),
        ("retries", "101", ["between 0 and 100"]),
    ],
)
def test_integer_keys_have_sane_bounds(tmp_path, key, written, fragments):
    message = error(_with_integer(key, written), tmp_path)
    for fragment in fragments:
        assert fragment in message, message


def test_lease_seconds_bounds_say_why(tmp_path):
    text = BASE + "checkpoints:\n  type: s3\n  bucket: ops-bucket\n  lease_seconds: 7200\n"
    message = error(text, tmp_path)
    assert "checkpoints.lease_seconds: must be between 10 and 3600, got 7200" in message and "retry" in message


@pytest.mark.parametrize(
    "written,expected",
    [("true", True), ("false", False), ("yes", True), ("no", False), ("on", True), ("off", False), ("True", True)],
)
def test_boolean_keys(tmp_path, written, expected):
    text = BASE.replace("checkpoint_column: id", f"checkpoint_column: id\n    resume: {written}")
    assert load(text, tmp_path).sources[0].resume is expected


@pytest.mark.parametrize("written", ["1", "0", "maybe", "y", "'t'"])
def test_boolean_keys_refuse_other_words(tmp_path, written):
    text = BASE.replace("checkpoint_column: id", f"checkpoint_column: id\n    resume: {written}")
    assert ":10: sources[0].resume: expected true or false" in error(text, tmp_path)


def _incremental(value: str) -> str:
    base = BASE.replace("    table: t1\n", "    table: t1\n    mode: merge\n    primary_key: [id]\n")
    base = base.replace("destination: wh\n", "destination: wh\n    incremental_column: id\n")
    return base.replace("query: SELECT 1", f"query: SELECT * FROM t WHERE id >= :last_value\n    initial_value: {value}")


@pytest.mark.parametrize(
    "written,expected",
    [
        ("0", 0),
        ("-1", -1),
        ("1_000", 1000),
        ("1.5", 1.5),
        ("2024-01-01", dt.date(2024, 1, 1)),
        ("2025-01-01T00:00:00+00:00", dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
        ("'012'", "012"),
        ("'2024-01-01'", "2024-01-01"),
        ("abc", "abc"),
        ('""', ""),
    ],
)
def test_initial_value_typed_as_written(tmp_path, written, expected):
    value = load(_incremental(written), tmp_path).resources[0].initial_value
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "written,fragment",
    [
        ("012", "plain decimal digits"),
        ("0x1F", "plain decimal digits"),
        ("12:30", "plain decimal digits"),
        (".inf", "plain decimal digits"),
        ("yes", "a boolean"),
        ("2024-13-45", "not a valid date or time"),
        ("null", "null is not a starting value"),
    ],
)
def test_initial_value_refuses_what_yaml_would_change(tmp_path, written, fragment):
    message = error(_incremental(written), tmp_path)
    assert ":23: resources[0].initial_value" in message and fragment in message, message


SECRET = "tok-SECRET-456"


@pytest.mark.parametrize(
    "old,new,where",
    [
        ("query: SELECT 1", "query: SELECT * FROM t WHERE token = '${API_TOKEN}'", ":19: resources[0].query"),
        ("query: SELECT 1", "query: SELECT * FROM ${API_TOKEN}.t", ":19: resources[0].query"),
        ("query: SELECT 1", "query: SELECT 1\n    description: token ${API_TOKEN}", ":20: resources[0].description"),
        ("query: SELECT 1", "query: SELECT 1\n    checkpoint_column: ${API_TOKEN}", ":20: resources[0].checkpoint_column"),
        ("checkpoint_column: id", "checkpoint_column: ${API_TOKEN}", ":9: sources[0].checkpoint_column"),
        ("table: t1", "table: ${API_TOKEN}", ":14: destinations[0].table"),
        ("  - name: r", "  - name: ${API_TOKEN}", ":16: resources[0].name"),
        ("query: SELECT 1", "query: SELECT 1\n    incremental_key: [id, '${API_TOKEN}']", ":20: resources[0].incremental_key"),
    ],
)
def test_env_values_refused_where_they_would_be_shown(tmp_path, monkeypatch, old, new, where):
    monkeypatch.setenv("API_TOKEN", SECRET)
    message = error(BASE.replace(old, new, 1), tmp_path)
    assert where in message, message
    assert "${API_TOKEN} is not substituted" in message and "connection keys" in message
    assert SECRET not in message


def test_env_in_query_explains_the_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("API_TOKEN", raising=False)  # refused for what it is, set or not
    text = BASE.replace("query: SELECT 1", "query: |\n      SELECT *\n      FROM t WHERE token = '${API_TOKEN}'")
    message = error(text, tmp_path)
    assert ":19: resources[0].query: ${API_TOKEN} is not substituted" in message
    assert ":last_value" in message and "table or view" in message and "`schema:`" in message


def test_env_in_initial_value_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("START", "2024-01-01")
    message = error(_incremental("${START}"), tmp_path)
    assert ":23: resources[0].initial_value: ${START} is not substituted" in message


def test_env_still_substituted_in_connection_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    monkeypatch.setenv("PG_SCHEMA", "raw")
    text = BASE.replace("password: pw", "password: ${PG_PASSWORD}\n    schema: ${PG_SCHEMA}")
    source = load(text, tmp_path).sources[0]
    assert isinstance(source, PostgresSourceSpec) and source.password is not None
    assert source.password.reveal() == SECRET and source.schema == "raw"


# --- url: an environment value cannot change the URL's structure ------------------------------

HARD_PASSWORD = "p@ss:w/rd#?"


def _url_spec(url: str) -> str:
    return BASE.replace("    host: 127.0.0.1\n    database: test\n    user: postgres\n    password: pw\n", f"    url: {url}\n", 1)


def test_url_password_from_env_is_encoded_and_connects(tmp_path, monkeypatch, pg):
    from sqlalchemy.engine import make_url

    from conduit_dagster.engine.pg import connect

    role = f"conduit_url_{uuid.uuid4().hex[:8]}"
    with pg.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (HARD_PASSWORD,))
    try:
        monkeypatch.setenv("PG_PASSWORD", HARD_PASSWORD)
        spec = load(_url_spec(f"postgresql://{role}:${{PG_PASSWORD}}@127.0.0.1:5432/test"), tmp_path)
        source = spec.sources[0]
        assert isinstance(source, PostgresSourceSpec) and source.url is not None
        url = source.url.reveal()
        # trust auth would accept any password: what libpq and the redaction parse must be the value exactly
        parsed = psycopg2.extensions.parse_dsn(url)
        assert (parsed["user"], parsed["password"], parsed["host"], parsed["dbname"]) == (
            role,
            HARD_PASSWORD,
            "127.0.0.1",
            "test",
        )
        assert make_url(url).password == HARD_PASSWORD and make_url(url).host == "127.0.0.1"
        conn = connect(source, "source")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT current_user, current_database()")
                assert cur.fetchone() == (role, "test")
        finally:
            conn.close()
    finally:
        with pg.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")


def test_url_default_is_encoded_and_a_whole_url_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    source = load(_url_spec("postgresql://u:${NO_SUCH_PW:-a@b}@h:5432/db"), tmp_path).sources[0]
    assert isinstance(source, PostgresSourceSpec) and source.url is not None
    assert psycopg2.extensions.parse_dsn(source.url.reveal())["password"] == "a@b"
    whole = "postgresql://u:p%40ss@h:5432/db?sslmode=disable"
    monkeypatch.setenv("DATABASE_URL", whole)
    source = load(_url_spec("${DATABASE_URL}"), tmp_path).sources[0]
    assert isinstance(source, PostgresSourceSpec) and source.url is not None and source.url.reveal() == whole


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@ss@127.0.0.1:5432/test",
        "postgresql://u:p@ss:w/rd#?@127.0.0.1:5432/test",
        "postgresql://u:pa/ss@127.0.0.1:5432/test",
    ],
)
def test_url_with_a_raw_at_or_slash_in_the_password_is_refused_unechoed(tmp_path, url):
    message = error(_url_spec(url), tmp_path)
    assert ":5: sources[0].url" in message and "%40" in message and "percent-encode" in message
    for piece in ("ss@", "p@", "pa/", "127.0.0.1", "rd#"):
        assert piece not in message, message


def test_url_with_a_whole_env_value_is_checked_unechoed(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@ss@127.0.0.1/test")
    message = error(_url_spec("${DATABASE_URL}"), tmp_path)
    assert "sources[0].url" in message and "%40" in message and "p@ss" not in message


# --- << merge keys ------------------------------------------------------------------------

MERGED = """
sources:
  - &pg
    name: a
    type: postgresql
    host: db.internal
    database: one
    password: ${PG_PASSWORD}
    checkpoint_column: id
  - <<: *pg
    name: b
    database: two
destinations:
  - name: wh
    type: postgresql
    database: test
    table: t1
resources:
  - name: r
    source: b
    destination: wh
    query: SELECT 1
"""


def test_merge_keys_merge_and_own_keys_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    a, b = load(MERGED, tmp_path).sources
    assert isinstance(a, PostgresSourceSpec) and isinstance(b, PostgresSourceSpec)
    assert (b.name, b.host, b.database) == ("b", "db.internal", "two")
    assert b.password is not None and b.password.reveal() == SECRET


def test_merge_list_first_mapping_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    other = "  - &other\n    name: c\n    type: postgresql\n    database: x\n    host: other\n    user: someone\n"
    text = MERGED.replace("destinations:", other + "  - <<: [*pg, *other]\n    name: d\ndestinations:")
    d = load(text, tmp_path).sources[-1]
    assert isinstance(d, PostgresSourceSpec) and (d.name, d.host, d.database, d.user) == ("d", "db.internal", "one", "someone")


def test_merge_key_errors_name_the_line_the_key_was_written_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    text = MERGED.replace("    table: t1\n", "    table: t1\n  - <<: *pg\n    name: w2\n")
    message = error(text, tmp_path)
    # the source's checkpoint_column is merged into a destination, which has no such key: reported where it was written
    assert ":9: destinations[1].checkpoint_column: unknown key" in message, message


def test_merge_does_not_hide_a_real_duplicate(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    message = error(MERGED.replace("    database: two\n", "    database: two\n    database: three\n"), tmp_path)
    assert ":13:" in message and "'database' appears twice" in message


def test_merge_of_a_non_mapping_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    message = error(MERGED.replace("  - <<: *pg\n", "  - <<: 5\n"), tmp_path)
    assert ":10: `<<:` merges a mapping" in message and "<<: *defaults" in message


@pytest.mark.parametrize("written,interval", [("yes", 60), ("on", 60), ("no", None), ("{interval: 300}", 300)])
def test_sensor_takes_boolean_words_or_an_interval(tmp_path, written, interval):
    text = BASE.replace("query: SELECT 1", f"query: SELECT 1\n    sensor: {written}")
    assert load(text, tmp_path).resources[0].sensor_interval == interval
