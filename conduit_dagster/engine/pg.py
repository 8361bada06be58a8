"""PostgreSQL connections shared by the source and the destination: connect, describe, redact.

Works on any spec with the connection fields of ingest.yml (host, port, database, user,
password, schema, or url).

Every connection conduit opens is specified by ingest.yml, whatever the client's libpq
environment. libpq fills any connection keyword left unset from a service file (``PGSERVICE``,
located by ``PGSERVICEFILE`` / ``PGSYSCONFDIR``, which wins over the other variables) and then
from ``PGHOST``, ``PGDATABASE``, ``PGOPTIONS``, ``PGCLIENTENCODING``...; it also sends
``PGTZ``, ``PGDATESTYLE`` and ``PGGEQO`` as startup settings that beat the ``-c`` switches of
``options``. So:

- ``connect_params`` gives every keyword that chooses the server or shapes the values
  explicitly: host, hostaddr (empty: a service file's ``hostaddr`` would otherwise redirect the
  connection), port, dbname (default: the user, as libpq), user (default: the operating-system
  user, as libpq), client_encoding, options, target_session_attrs. What is left to the
  environment or a service file is transport and authentication only (sslmode and the other
  ssl*/gss*/krb* keywords, a password ingest.yml does not give, the password file).
- ``connect`` then runs ``SESSION_SQL`` (``SET`` wins over the startup settings above and over
  ``ALTER ROLE/DATABASE ... SET``), so every caller (source, destination, the in-process COPY)
  reads and writes values in one format: ``SESSION_SETTINGS``.
- The ``psql`` child of the COPY route gets the same parameters (see ``pgcopy``).

A URL naming a ``service`` is refused: its host, database and settings would come from a file
outside ingest.yml.
"""

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import psycopg2
import psycopg2.extensions

from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.spec import Secret, _Entry


@dataclass(frozen=True)
class PostgresConnectionSpec:
    """The connection keys shared by PostgreSQL sources and destinations."""

    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    database: str | None = None
    user: str | None = None
    password: Secret | None = None
    schema: str | None = None
    url: Secret | None = None


# The session every connection (and the psql child) runs in: text output that parses back exactly
# (UTF-8, UTC ISO timestamps, shortest-exact floats, hex bytea, postgres intervals, C money) and
# standard strings, which psycopg2's quoting of parameters assumes.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("client_encoding", "UTF8"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
    ("lc_monetary", "C"),
)
SESSION_SQL = "; ".join(f"SET {name} = '{value}'" for name, value in SESSION_SETTINGS)
# The same as startup options (libpq's ``options``): a value holds no space (DateStyle ISO,YMD).
SESSION_OPTIONS = " ".join(f"-c {name}={value.replace(' ', '')}" for name, value in SESSION_SETTINGS)
APPLICATION_NAME = "conduit-dagster"
CONNECT_TIMEOUT = "15"
DEFAULT_HOST = "127.0.0.1"  # ingest.yml's default host, for a URL that names none too
DEFAULT_PORT = "5432"
# A host libpq may be given: names, IPv4/IPv6 addresses, socket directories; comma-separated lists.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9._-]+|[0-9A-Fa-f:.%]+|/[^,@]*)(?:,(?:[A-Za-z0-9._-]+|[0-9A-Fa-f:.%]+|/[^,@]*))*")


def _os_user() -> str:
    """The user libpq defaults to: the effective operating-system user (not $USER, an environment value)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        import getpass

        return getpass.getuser()


def _url_params(spec: PostgresConnectionSpec) -> dict[str, str]:
    """libpq's own reading of the URL (the keywords it names, nothing from the environment)."""
    assert spec.url is not None
    url = spec.url.reveal().replace("postgresql+psycopg2://", "postgresql://", 1)
    try:
        given = psycopg2.extensions.parse_dsn(url)
    except psycopg2.Error as exc:
        raise ConduitError(
            f"{spec.name!r}: `url` is not a valid PostgreSQL URL ({redact(str(exc).strip(), spec)}); "
            "e.g. postgresql://user:${PG_PASSWORD}@host:5432/database, with '@', ':', '/' and spaces in the "
            "user or password percent-encoded (%40, %3A, %2F, %20)"
        ) from None
    return {key: str(value) for key, value in given.items()}


def connect_params(spec: PostgresConnectionSpec) -> dict[str, str]:
    """Every libpq keyword that picks the server or shapes the values, from ``spec`` alone (see the module doc)."""
    if spec.url is not None:
        given = _url_params(spec)
        if "service" in given:
            raise ConduitError(
                f"{spec.name!r}: `url` names a service ({given['service']!r}), whose host, database and settings come "
                "from a service file outside ingest.yml: give host, port and database in the URL instead"
            )
    else:
        given = {"host": spec.host, "port": str(spec.port)}
        if spec.database:
            given["dbname"] = spec.database
        if spec.user:
            given["user"] = spec.user
        if spec.password is not None:
            given["password"] = spec.password.reveal()
    host = given.get("host") or DEFAULT_HOST
    if not _HOST_RE.fullmatch(host):
        # e.g. postgresql://user:p@ss@host/db: libpq reads the password up to the first '@' and the rest as the host
        if spec.url is None:
            raise ConduitError(f"{spec.name!r}: `host` is not a host name, an address or a socket directory")
        raise ConduitError(
            f"{spec.name!r}: the host of `url` is not a host name or address (postgresql://***): a user or password "
            "holding '@', ':' or '/' must be percent-encoded (%40, %3A, %2F), e.g. postgresql://user:p%40ss@host/db"
        )
    user = given.get("user") or _os_user()
    params = {
        **given,
        "host": host,
        "hostaddr": given.get("hostaddr", ""),
        "port": given.get("port") or DEFAULT_PORT,
        "user": user,
        "dbname": given.get("dbname") or user,
        "client_encoding": "UTF8",
        # the user's own options first: of two -c switches for one setting, the last wins
        "options": f"{given['options']} {SESSION_OPTIONS}" if given.get("options") else SESSION_OPTIONS,
        "target_session_attrs": given.get("target_session_attrs") or "any",
        "application_name": given.get("application_name") or APPLICATION_NAME,
        "connect_timeout": given.get("connect_timeout") or CONNECT_TIMEOUT,
    }
    return params


def _password_forms(spec: PostgresConnectionSpec) -> list[str]:
    """Every form a secret of ``spec`` can take in a message: the password, the URL, the URL's password as written
    (percent-encoded) and decoded, as libpq reads it and as written up to the host, and the pieces a raw '@' cuts it into."""
    forms: list[str] = []
    if spec.password is not None:
        forms.append(spec.password.reveal())
    if spec.url is not None:
        url = spec.url.reveal()
        forms.append(url)
        rest = url.split("://", 1)[1] if "://" in url else url
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        # the user and password as written: up to the last '@' of the authority, or of the whole URL when the
        # password holds a raw '/' (masking too much is harmless)
        for userinfo in {authority.rsplit("@", 1)[0] if "@" in authority else "", rest.rsplit("@", 1)[0] if "@" in rest else ""}:
            if ":" not in userinfo:
                continue  # a user alone is no secret (and names the role in libpq's messages)
            # a password with a raw '@', ':' or '/' is cut there by libpq: each piece may show up alone (pieces this
            # guess finds shorter than 3 characters are left: masking every 'a' would garble the message, and
            # libpq's own reading of the password is masked below whatever its length)
            password = userinfo.split(":", 1)[1]
            forms.extend(piece for piece in [password, *re.split(r"[@:/]", password)] if len(piece) >= 3)
        try:
            pw = psycopg2.extensions.parse_dsn(url.replace("postgresql+psycopg2://", "postgresql://", 1)).get("password")
        except psycopg2.Error:
            pw = None
        if pw:
            forms.append(pw)
    forms += [quote(f, safe="") for f in forms] + [unquote(f) for f in forms]
    return sorted({f for f in forms if f}, key=len, reverse=True)


def redact(text: str, spec: PostgresConnectionSpec) -> str:
    """``text`` with every secret of ``spec`` (password, URL, a password inside the URL, encoded or not) masked."""
    for secret in _password_forms(spec):
        text = text.replace(secret, "***")
    return text


def describe(spec: PostgresConnectionSpec) -> str:
    """``postgresql://host:port/database``: never a user, password or query string; ``postgresql://***`` for a URL
    whose host is not a host (a password holding a raw '@' would show up there)."""
    if spec.url is not None:
        try:
            given = psycopg2.extensions.parse_dsn(spec.url.reveal().replace("postgresql+psycopg2://", "postgresql://", 1))
        except psycopg2.Error:
            return "postgresql://***"
        host = given.get("host") or DEFAULT_HOST
        if not _HOST_RE.fullmatch(host) or "@" in host:
            return "postgresql://***"
        database = given.get("dbname", "")
        if re.search(r"[@:/?#\s]", database):
            database = "***"
        port = given.get("port") or DEFAULT_PORT
        if not re.fullmatch(r"[0-9,]*", port):
            return "postgresql://***"
        return f"postgresql://{host}:{port}/{database}"
    return f"postgresql://{spec.host}:{spec.port}/{spec.database}"


def connect(spec: PostgresConnectionSpec, role: str) -> Any:
    """A psycopg2 connection in ``SESSION_SETTINGS``; errors name ``role`` and never a secret."""
    try:
        kwargs: dict[str, Any] = dict(connect_params(spec))
    except ConduitError as exc:
        raise ConduitError(f"{role} {exc}") from None
    try:
        conn = psycopg2.connect(**kwargs)
    except psycopg2.Error as exc:
        message = redact(str(exc).strip(), spec)
        if "definition of service" in message and os.environ.get("PGSERVICE"):
            message += (
                " (PGSERVICE is set in this environment; conduit takes the connection from ingest.yml, so the "
                "service is not needed: unset PGSERVICE, or point PGSERVICEFILE at a file that defines it)"
            )
        raise ConduitError(f"{role} {spec.name!r}: cannot connect to PostgreSQL at {describe(spec)}: {message}") from None
    try:
        with conn.cursor() as cur:
            cur.execute(SESSION_SQL)
        conn.commit()
    except psycopg2.Error as exc:
        conn.close()
        raise ConduitError(
            f"{role} {spec.name!r}: cannot set the session at {describe(spec)} ({SESSION_SQL}): {redact(str(exc).strip(), spec)}"
        ) from None
    return conn


# the keys of a PostgreSQL source or destination entry that say how to connect
CONNECTION_KEYS = frozenset({"host", "port", "database", "user", "password", "schema", "url"})


def parse_connection(e: _Entry) -> dict[str, Any]:
    """The connection keys shared by PostgreSQL sources and destinations."""
    url = e.text("url", url=True)
    password = e.text("password")
    if url is not None:
        given = [k for k in ("host", "port", "database", "user", "password") if e.data.get(k) is not None]
        if given:
            raise e.fail("url", f"give either `url` or {', '.join(given)}, not both")
        if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg2://")):
            raise e.fail("url", "must start with postgresql://; e.g. postgresql://user:${PG_PASSWORD}@host:5432/db")
        rest = url.split("://", 1)[1]
        if rest.count("@") > 1 or ("@" in rest and "/" in rest.partition("@")[0]):
            # libpq takes the user and password up to the first @ (before any /): a raw @ or / in a password moves
            # the host into the password or the password into the host, and the error would show a piece of it
            raise e.fail(
                "url",
                "holds an @ or / that is not part of the URL's structure (the URL is not shown): percent-encode "
                "them in a user name or password (@ as %40, / as %2F, : as %3A, # as %23, ? as %3F), or write the "
                "password as ${VAR} inside the url (substituted values are encoded), or use the separate keys",
            )
        return {"url": Secret(url), "schema": e.text("schema")}
    return {
        "host": e.text("host", default="127.0.0.1") or "127.0.0.1",
        "port": e.integer("port", default=5432, maximum=65535),
        "database": e.text("database", required=True),
        "user": e.text("user"),
        "password": Secret(password) if password is not None else None,
        "schema": e.text("schema"),
    }
