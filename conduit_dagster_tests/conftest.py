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


def write_ingest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.yml"
    path.write_text(text, encoding="utf-8")
    return path
