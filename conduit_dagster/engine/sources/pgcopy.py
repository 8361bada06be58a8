"""Producers of a PostgreSQL ``COPY ... TO STDOUT (FORMAT csv)`` byte stream for Arrow to parse.

Two routes, same bytes:

- ``PsqlCopy`` runs the ``psql`` client as a child process and reads its standard output. No
  Python code touches a row, so the stream keeps up with the server (measured here: the whole
  PostgreSQL -> Parquet loop within 10% of ``psql \\copy`` to a file). Credentials travel in the
  child's environment (PGPASSWORD...), and the SQL on its standard input: neither shows in the
  process list.
- ``ThreadCopy`` runs psycopg2's ``copy_expert`` in a thread into an OS pipe. It needs nothing
  but the driver, but psycopg2 calls back into Python once per row, which costs about a third
  of the throughput. It is used where ``psql`` is not installed or the connection needs options
  only a connection string can carry.
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any, Protocol

import psycopg2

from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.spec import PostgresSourceSpec

SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c extra_float_digits=3 -c bytea_output=hex -c default_transaction_read_only=on"
)
_URL_PARAM_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslpassword": "PGSSLPASSWORD",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "password": "PGPASSWORD",
    "user": "PGUSER",
    "host": "PGHOST",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
}
PSQL_ENV = "CONDUIT_PSQL"  # a path to psql, or "off" to always use the in-process route


class CopyProducer(Protocol):
    stream: IO[bytes]

    def finish(self) -> None:
        """Wait for the producer to end; raise if COPY did not complete."""
        ...

    def ended(self, timeout: float) -> bool:
        """Whether the producer has ended (waiting up to ``timeout`` seconds)."""
        ...

    def abort(self) -> None:
        """Stop early (the reader stopped reading)."""
        ...

    def close(self) -> None:
        """Release the stream (and the connection's transaction)."""
        ...


def psql_path() -> str | None:
    chosen = os.environ.get(PSQL_ENV, "")
    if chosen.lower() == "off":
        return None
    return chosen or shutil.which("psql")


def psql_environment(spec: PostgresSourceSpec) -> dict[str, str] | None:
    """libpq environment variables for ``spec``, or None when only a connection string would do."""
    env: dict[str, str] = {"PGAPPNAME": "conduit-dagster", "PGCONNECT_TIMEOUT": "15"}
    options = SESSION_OPTIONS
    if spec.schema:
        if not re.fullmatch(r"[A-Za-z0-9_]+", spec.schema):
            return None
        options += f" -c search_path={spec.schema}"
    if spec.url is not None:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(spec.url.reveal())
        except Exception:  # noqa: BLE001 - let the in-process route report the URL's problem
            return None
        parts: dict[str, Any] = {
            "host": url.host,
            "port": url.port,
            "dbname": url.database,
            "user": url.username,
            "password": url.password,
        }
        for key, value in url.query.items():
            if key not in _URL_PARAM_ENV or not isinstance(value, str):
                return None  # e.g. `options`: only a connection string carries it faithfully
            if parts.get(key) in (None, ""):
                parts[key] = value
    else:
        parts = {
            "host": spec.host,
            "port": spec.port,
            "dbname": spec.database,
            "user": spec.user,
            "password": spec.password.reveal() if spec.password is not None else None,
        }
    for key, value in parts.items():
        if value is not None and value != "":
            env[_URL_PARAM_ENV[key]] = str(value)
    env["PGOPTIONS"] = options
    return env


class PsqlCopy:
    def __init__(self, psql: str, env: dict[str, str], copy_sql: bytes, redact: Any) -> None:
        self._redact = redact
        self._stderr = tempfile.TemporaryFile()
        child_env = dict(os.environ)  # the user's libpq settings (PGPASSFILE, PGSSLROOTCERT...) apply as to psycopg2
        user_options = child_env.get("PGOPTIONS", "")
        child_env.update(env)
        if user_options:
            child_env["PGOPTIONS"] = f"{user_options} {env['PGOPTIONS']}"
        self.proc = subprocess.Popen(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(copy_sql + b";\n")
        self.proc.stdin.close()
        self.stream = self.proc.stdout

    def ended(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def finish(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            self._stderr.seek(0)
            message = self._stderr.read().decode("utf-8", "replace").strip().replace("psql:<stdin>:1: ", "")
            raise SourceError(f"COPY failed (psql exit {rc}): {self._redact(message)}")

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.stream.close()
        self._stderr.close()


class ThreadCopy:
    def __init__(self, conn: Any, copy_sql: bytes) -> None:
        self.conn = conn
        read_fd, write_fd = os.pipe()
        self.failure: list[BaseException] = []

        def pump() -> None:
            try:
                with os.fdopen(write_fd, "wb", buffering=1 << 20) as sink, conn.cursor() as cur:
                    cur.copy_expert(copy_sql, sink, size=1 << 20)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                self.failure.append(exc)

        self.thread = threading.Thread(target=pump, name="conduit-copy", daemon=True)
        self.thread.start()
        self.stream: IO[bytes] = os.fdopen(read_fd, "rb", buffering=0)

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout=timeout)
        return not self.thread.is_alive()

    def finish(self) -> None:
        self.thread.join()
        if self.failure:
            raise self.failure[0]

    def abort(self) -> None:
        self.stream.close()  # a writer still running gets a broken pipe and stops
        if self.thread.is_alive():
            self.conn.cancel()
            self.thread.join(timeout=30)

    def close(self) -> None:
        self.stream.close()
        try:
            self.conn.rollback()
        except psycopg2.Error:
            pass


def open_copy_producer(
    spec: PostgresSourceSpec, conn: Any, copy_sql: bytes, redact: Callable[[str], str], *, use_psql: bool
) -> CopyProducer:
    """The producer for ``copy_sql``: the ``psql`` child when it is wanted, found and the connection is
    expressible in its environment, else psycopg2's ``copy_expert`` on ``conn`` in a thread."""
    psql = psql_path() if use_psql else None
    env = psql_environment(spec) if psql else None
    if psql and env is not None:
        return PsqlCopy(psql, env, copy_sql, redact)
    return ThreadCopy(conn, copy_sql)
