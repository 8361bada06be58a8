"""MySQL / MariaDB connections shared by the source and the destination: parse, connect, describe, redact.

Works on any spec with the connection fields of ingest.yml (host, port, database, user, password, or url).

Every connection conduit opens runs in one session shape, ``SESSION_STATEMENTS``, whatever the server's or the
account's defaults:

- ``time_zone = '+00:00'``: a TIMESTAMP is converted to and from the session zone, so in a zone with daylight saving
  an hour of values would read ambiguously and compare wrongly; in UTC every value has one text.
- ``NAMES utf8mb4``: every character the server holds reaches Python as itself (``utf8``/``utf8mb3`` would fail on
  characters outside the BMP), and bound text is read as UTF-8.
- ``net_write_timeout``/``net_read_timeout`` of an hour: a streaming read waits while the destination writes a batch
  (an S3 upload, a slow commit); the server's default 60 s would drop the connection mid-table.

The bulk read (ConnectorX) gets the same statements as its ``pre_execution_query``; control statements go through
PyMySQL with bound parameters.
"""

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from conduit_dagster.engine.errors import ConduitError
from conduit_dagster.engine.spec import Secret, _Entry

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3306
CONNECT_TIMEOUT = 15
SESSION_STATEMENTS: tuple[str, ...] = (
    "SET time_zone = '+00:00'",
    "SET NAMES utf8mb4",
    "SET SESSION net_write_timeout = 3600, SESSION net_read_timeout = 3600",
)
URL_SCHEMES = ("mysql://", "mariadb://", "mysql+pymysql://")
# the keys of a MySQL source or destination entry that say how to connect
CONNECTION_KEYS = frozenset({"host", "port", "database", "user", "password", "url"})
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.%]+\]|[0-9A-Fa-f:.%]+")


@dataclass(frozen=True)
class MySQLConnectionSpec:
    """The connection keys shared by MySQL/MariaDB sources and destinations."""

    name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database: str | None = None
    user: str | None = None
    password: Secret | None = None
    url: Secret | None = None


@dataclass(frozen=True)
class Target:
    """Where to connect, resolved from the keys or the URL (``password`` is the only secret)."""

    host: str
    port: int
    database: str
    user: str
    password: str | None


def parse_connection(e: _Entry) -> dict[str, Any]:
    """The connection keys of a ``type: mysql`` entry, checked (the URL's structure too, without showing it)."""
    url = e.text("url", url=True)
    if url is not None:
        given = [k for k in ("host", "port", "database", "user", "password") if e.data.get(k) is not None]
        if given:
            raise e.fail("url", f"give either `url` or {', '.join(given)}, not both")
        if not url.startswith(URL_SCHEMES):
            raise e.fail("url", "must start with mysql:// (or mariadb://); e.g. mysql://user:${MYSQL_PASSWORD}@host:3306/db")
        try:
            _target_of_url(url)
        except ValueError as exc:
            raise e.fail("url", f"{exc} (the URL is not shown)") from None
        return {"url": Secret(url)}
    password = e.text("password")
    return {
        "host": e.text("host", default=DEFAULT_HOST) or DEFAULT_HOST,
        "port": e.integer("port", default=DEFAULT_PORT, maximum=65535),
        "database": e.text("database", required=True),
        "user": e.text("user"),
        "password": Secret(password) if password is not None else None,
    }


def _target_of_url(url: str) -> Target:
    rest = url.split("://", 1)[1]
    authority = rest.split("/", 1)[0]
    if authority.count("@") > 1 or "#" in url:
        raise ValueError(
            "holds an @ or # that is not part of the URL's structure: percent-encode them in a user name or password "
            "(@ as %40, / as %2F, : as %3A, # as %23, ? as %3F), or write the password as ${VAR} inside the url "
            "(substituted values are encoded), or use the separate keys"
        )
    try:
        parts = urlsplit("mysql://" + rest)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if parts.query:
        raise ValueError("has a query string (?...): connection options are not taken from the URL; remove it")
    host = parts.hostname or DEFAULT_HOST
    if not _HOST_RE.fullmatch(host):
        raise ValueError("has a host that is not a host name or address")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError("must name one database after the host, e.g. mysql://user@host:3306/shop")
    user = unquote(parts.username) if parts.username else ""
    password = unquote(parts.password) if parts.password is not None else None
    return Target(host=host, port=port, database=database, user=user, password=password)


def target(spec: MySQLConnectionSpec) -> Target:
    """Host, port, database, user and password from the keys or the URL (the user defaults to the OS user, as the
    ``mysql`` client's)."""
    if spec.url is not None:
        try:
            t = _target_of_url(spec.url.reveal())
        except ValueError as exc:
            raise ConduitError(f"{spec.name!r}: `url` {exc} (the URL is not shown)") from None
    else:
        t = Target(
            host=spec.host,
            port=spec.port,
            database=spec.database or "",
            user=spec.user or "",
            password=spec.password.reveal() if spec.password is not None else None,
        )
    if not t.user:
        import getpass

        t = Target(t.host, t.port, t.database, getpass.getuser(), t.password)
    return t


def _secret_forms(spec: MySQLConnectionSpec) -> list[str]:
    forms: list[str] = []
    if spec.password is not None:
        forms.append(spec.password.reveal())
    if spec.url is not None:
        url = spec.url.reveal()
        forms.append(url)
        authority = url.split("://", 1)[-1].split("/", 1)[0]
        userinfo = authority.rsplit("@", 1)[0] if "@" in authority else ""
        if ":" in userinfo:
            forms.append(userinfo.split(":", 1)[1])
    forms += [quote(f, safe="") for f in forms] + [unquote(f) for f in forms]
    return sorted({f for f in forms if f}, key=len, reverse=True)


def redact(text: str, spec: MySQLConnectionSpec) -> str:
    """``text`` with every secret of ``spec`` (password, URL, the URL's password, encoded or not) masked."""
    for secret in _secret_forms(spec):
        text = text.replace(secret, "***")
    return text


def describe(spec: MySQLConnectionSpec) -> str:
    """``mysql://host:port/database``: never a user or password."""
    try:
        t = target(spec)
    except ConduitError:
        return "mysql://***"
    return f"mysql://{t.host}:{t.port}/{t.database}"


def identity(spec: MySQLConnectionSpec) -> str:
    """The server and database (never the user or password): what a checkpoint is bound to."""
    return describe(spec)


def connect(spec: MySQLConnectionSpec, role: str, **options: Any) -> Any:
    """A PyMySQL connection in ``SESSION_STATEMENTS`` (autocommit off unless ``options`` says otherwise); errors
    name ``role`` and the server, never a secret."""
    import pymysql

    try:
        t = target(spec)
    except ConduitError as exc:
        raise ConduitError(f"{role} {exc}") from None
    try:
        conn = pymysql.connect(
            host=t.host.strip("[]"),
            port=t.port,
            user=t.user,
            password=t.password or "",
            database=t.database,
            charset="utf8mb4",
            connect_timeout=CONNECT_TIMEOUT,
            **options,
        )
    except pymysql.MySQLError as exc:
        raise ConduitError(
            f"{role} {spec.name!r}: cannot connect to MySQL/MariaDB at {describe(spec)}: {redact(str(exc), spec)}"
        ) from None
    try:
        with conn.cursor() as cur:
            for statement in SESSION_STATEMENTS:
                cur.execute(statement)
    except pymysql.MySQLError as exc:
        conn.close()
        message = redact(str(exc), spec)
        raise ConduitError(f"{role} {spec.name!r}: cannot set the session at {describe(spec)}: {message}") from None
    return conn


def connectorx_url(spec: MySQLConnectionSpec) -> str:
    """The URL ConnectorX connects with (a secret: never log it); its session comes from ``SESSION_STATEMENTS`` as
    ``pre_execution_query``."""
    t = target(spec)
    auth = quote(t.user, safe="") + (":" + quote(t.password, safe="") if t.password else "")
    return f"mysql://{auth}@{t.host}:{t.port}/{quote(t.database, safe='')}"
