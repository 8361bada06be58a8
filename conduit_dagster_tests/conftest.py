import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

PG_DSN = os.environ.get("CONDUIT_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def _need(service: str, exc: Exception) -> None:
    message = f"{service} is not reachable ({exc}); start it (see README, 'Running the tests')"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    try:
        psycopg2.connect(PG_DSN, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        _need("PostgreSQL", exc)
    return PG_DSN


@pytest.fixture
def pg(postgres_dsn: str) -> Iterator["psycopg2.extensions.connection"]:
    conn = psycopg2.connect(postgres_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def pg_schema(pg) -> Iterator[str]:
    """A fresh schema per test, dropped afterwards."""
    name = f"conduit_t_{uuid.uuid4().hex[:10]}"
    with pg.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {name}")
    yield name
    with pg.cursor() as cur:
        cur.execute(f"DROP SCHEMA {name} CASCADE")


# --- MariaDB / MySQL -------------------------------------------------------------------------------------------

MYSQL = {
    "host": os.environ.get("CONDUIT_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("CONDUIT_TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("CONDUIT_TEST_MYSQL_USER", "root"),
    "password": os.environ.get("CONDUIT_TEST_MYSQL_PASSWORD", ""),
}


@pytest.fixture(scope="session")
def mysql_server() -> dict[str, object]:
    """Connection keywords (host, port, user, password) of the MariaDB/MySQL server the tests use."""
    import pymysql

    try:
        pymysql.connect(**MYSQL, connect_timeout=5).close()  # type: ignore[arg-type]
    except pymysql.err.OperationalError as exc:
        _need("MariaDB/MySQL", exc)
    return dict(MYSQL)


@pytest.fixture
def mysql_db(mysql_server: dict[str, object]) -> Iterator[str]:
    """A fresh database per test (dropped afterwards); connect with ``mysql_connect(mysql_db)``."""
    name = f"conduit_t_{uuid.uuid4().hex[:10]}"
    conn = mysql_connect(None)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def mysql_connect(database: str | None, **extra: object):  # noqa: ANN201 - a pymysql connection
    """An autocommit connection to the test server (UTC session, utf8mb4)."""
    import pymysql

    return pymysql.connect(
        **MYSQL,  # type: ignore[arg-type]
        database=database,
        charset="utf8mb4",
        autocommit=True,
        init_command="SET time_zone = '+00:00'",
        **extra,
    )


def write_ingest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.yml"
    path.write_text(text, encoding="utf-8")
    return path


# --- S3: moto's ThreadedMotoServer, a real HTTP S3 endpoint on 127.0.0.1 -----------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of an S3 server on 127.0.0.1 (fake credentials in the environment, for child processes too)."""
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "conduit-test"),
        ("AWS_SECRET_ACCESS_KEY", "conduit-test-secret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[key] = value
    os.environ.pop("AWS_PROFILE", None)
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # the dev extra brings it
        _need("moto's S3 server (pip install -e '.[dev]')", exc)
        raise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str):  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket per test."""
    name = f"conduit-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
