"""Producers of a PostgreSQL ``COPY ... TO STDOUT (FORMAT csv)`` byte stream for Arrow to parse.

Two routes, same bytes:

- ``PsqlCopy`` runs the ``psql`` client as a child process and reads its standard output. No
  Python code touches a row, so the stream keeps up with the server (measured here: the whole
  PostgreSQL -> Parquet loop within 10% of ``psql \\copy`` to a file). Credentials travel in the
  child's environment (PGPASSWORD...), and the SQL on its standard input: neither shows in the
  process list.
- ``ThreadCopy`` runs psycopg2's ``copy_expert`` in a thread into an OS pipe. It needs nothing
  but the driver, but psycopg2 calls back into Python once per row, which costs about a third
  of the throughput. It is used where ``psql`` is not installed (or ``CONDUIT_PSQL=off``) or the
  connection needs a keyword libpq has no environment variable for.

The child's connection is the one ``pg.connect`` opens, in the same session (``pg.SESSION_SQL``,
run on its standard input before the COPY, after the same startup options). Its environment
is built afresh for libpq: every ``PG*`` variable of ours is dropped, since each can change
the server, the database or the format of the values (PGSERVICE, PGSERVICEFILE, PGSYSCONFDIR,
PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER, PGOPTIONS, PGTZ, PGDATESTYLE, PGGEQO,
PGCLIENTENCODING, PGTARGETSESSIONATTRS, PGLOADBALANCEHOSTS, PGAPPNAME, PGLOCALEDIR...), except
those that only secure or authenticate the same connection, which the in-process route (libpq
reads them there too) honours as well: PGPASSWORD and PGPASSFILE (a password ingest.yml does not
give), PGSSL*, PGGSS*, PGKRBSRVNAME, PGREQUIREPEER, PGREQUIREAUTH, PGCHANNELBINDING,
PGREQUIRESSL. Then ingest.yml's parameters are set. A service file therefore never reaches the
child; in-process, libpq still lets one fill transport settings (sslmode...) that nothing else
gives, never the server, database, user or a session setting.
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol

import psycopg2

from conduit_dagster.engine.errors import ConduitError, SourceError
from conduit_dagster.engine.pg import SESSION_SQL, connect_params

if TYPE_CHECKING:
    from conduit_dagster.engine.sources.postgresql import PostgresSourceSpec

# The startup options the child adds to pg.connect's: a source never writes.
SOURCE_OPTIONS = "-c default_transaction_read_only=on"
# libpq keyword -> its environment variable (libpq 15's set; a keyword missing here sends the read in-process)
_PARAM_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "client_encoding": "PGCLIENTENCODING",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "sslmode": "PGSSLMODE",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "channel_binding": "PGCHANNELBINDING",
}
# The user's libpq variables the child keeps: transport and authentication of the connection ingest.yml names.
_KEPT_PREFIXES = ("PGSSL", "PGGSS")
_KEPT = frozenset(
    {"PGPASSWORD", "PGPASSFILE", "PGKRBSRVNAME", "PGREQUIREPEER", "PGREQUIREAUTH", "PGCHANNELBINDING", "PGREQUIRESSL"}
)
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
    """The psql to run: $CONDUIT_PSQL, else the one on PATH; None for the in-process route. A $CONDUIT_PSQL that is
    not an executable file is an error, never a silent fallback."""
    chosen = os.environ.get(PSQL_ENV, "")
    if chosen.lower() == "off":
        return None
    if not chosen:
        return shutil.which("psql")
    if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
        raise SourceError(
            f"{PSQL_ENV}={chosen} is not an executable file: set {PSQL_ENV} to the path of the psql client "
            f"(e.g. /usr/bin/psql, from the postgresql-client package), unset it to use the psql on PATH, or set "
            f"{PSQL_ENV}=off to read through psycopg2 in-process"
        )
    return chosen


def psql_environment(spec: "PostgresSourceSpec") -> dict[str, str] | None:
    """libpq environment variables for ``spec`` (pg.connect's parameters), or None when one has no variable."""
    try:
        params = connect_params(spec)
    except ConduitError:
        return None  # the in-process route reports the connection's problem
    options = f"{params['options']} {SOURCE_OPTIONS}"
    if spec.schema:
        if not re.fullmatch(r"[A-Za-z0-9_]+", spec.schema):
            return None
        options += f" -c search_path={spec.schema}"
    env: dict[str, str] = {}
    for key, value in {**params, "options": options}.items():
        if key not in _PARAM_ENV:
            return None
        if value != "":
            env[_PARAM_ENV[key]] = value
    return env


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """The process environment with the user's libpq variables dropped (bar transport/auth), then ``env``."""
    child = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") or key in _KEPT or key.startswith(_KEPT_PREFIXES)
    }
    child.update(env)
    return child


class PsqlCopy:
    def __init__(self, psql: str, env: dict[str, str], copy_sql: bytes, redact: Any) -> None:
        self._redact = redact
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=child_environment(env),
            )
        except OSError as exc:
            self._stderr.close()
            raise SourceError(
                f"cannot run {psql} ({exc.strerror}): set {PSQL_ENV} to the path of the psql client, "
                f"or {PSQL_ENV}=off to read through psycopg2 in-process"
            ) from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # SET after the startup options: also beats what libpq sends from the environment and ALTER ROLE ... SET
        self.proc.stdin.write(SESSION_SQL.encode() + b";\n" + copy_sql + b";\n")
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
    spec: "PostgresSourceSpec", conn: Any, copy_sql: bytes, redact: Callable[[str], str], *, use_psql: bool
) -> CopyProducer:
    """The producer for ``copy_sql``: the ``psql`` child when it is wanted, found and the connection is
    expressible in its environment, else psycopg2's ``copy_expert`` on ``conn`` in a thread."""
    psql = psql_path() if use_psql else None
    env = psql_environment(spec) if psql else None
    if psql and env is not None:
        return PsqlCopy(psql, env, copy_sql, redact)
    return ThreadCopy(conn, copy_sql)
