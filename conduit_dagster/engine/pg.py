"""PostgreSQL connections shared by the source and the destination: connect, describe, redact.

Works on any spec with the connection fields of ingest.yml (host, port, database, user,
password, schema, or url).
"""

from typing import Any

import psycopg2

from conduit_dagster.engine.spec import PostgresConnectionSpec


def connect_kwargs(spec: PostgresConnectionSpec) -> dict[str, Any]:
    if spec.url is not None:
        return {"dsn": spec.url.reveal().replace("postgresql+psycopg2://", "postgresql://", 1)}
    kwargs: dict[str, Any] = {"host": spec.host, "port": spec.port, "dbname": spec.database}
    if spec.user:
        kwargs["user"] = spec.user
    if spec.password is not None:
        kwargs["password"] = spec.password.reveal()
    return kwargs


def redact(text: str, spec: PostgresConnectionSpec) -> str:
    """``text`` with every secret of ``spec`` (password, URL, a password inside the URL) masked."""
    for secret in (spec.password, spec.url):
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), "***")
    if spec.url is not None:
        from sqlalchemy.engine import make_url

        try:
            pw = make_url(spec.url.reveal()).password
        except Exception:  # noqa: BLE001 - an unparsable URL has nothing more to hide here
            pw = None
        if pw:
            text = text.replace(str(pw), "***")
    return text


def describe(spec: PostgresConnectionSpec) -> str:
    """``postgresql://host:port/database``: never a user, password or query string."""
    if spec.url is not None:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(spec.url.reveal())
        except Exception:  # noqa: BLE001 - an unparsable URL is described by its scheme alone
            return "postgresql://***"
        return f"postgresql://{url.host or ''}:{url.port or 5432}/{url.database or ''}"
    return f"postgresql://{spec.host}:{spec.port}/{spec.database}"


def connect(spec: PostgresConnectionSpec, role: str) -> Any:
    """A psycopg2 connection in UTC with ISO dates; errors name ``role`` and never a secret."""
    from conduit_dagster.engine.errors import ConduitError

    try:
        conn = psycopg2.connect(application_name="conduit-dagster", connect_timeout=15, **connect_kwargs(spec))
    except psycopg2.Error as exc:
        raise ConduitError(
            f"{role} {spec.name!r}: cannot connect to PostgreSQL at {describe(spec)}: {redact(str(exc).strip(), spec)}"
        ) from None
    return conn
