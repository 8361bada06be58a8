"""S3 plumbing shared by the S3 checkpoint store, the S3 destination and file sources.

Clients are built from an ``S3ConnectionSpec`` (ingest.yml's keys over the usual AWS environment);
inside Dagster the glue installs a ``client_factory`` built on dagster-aws's ``S3Resource``, whose
settings fill what ingest.yml leaves unset. Errors are turned into messages that
name what failed, where, and the fix, and never carry a credential.
"""

import fnmatch
import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from conduit_dagster.engine.errors import SourceError
from conduit_dagster.engine.spec import S3ConnectionSpec

GLOB_CHARS = "*?["


def client_kwargs(conn: S3ConnectionSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if conn.endpoint_url:
        kwargs["endpoint_url"] = conn.endpoint_url
    if conn.region:
        kwargs["region_name"] = conn.region
    if conn.access_key_id is not None and conn.secret_access_key is not None:
        kwargs["aws_access_key_id"] = conn.access_key_id.reveal()
        kwargs["aws_secret_access_key"] = conn.secret_access_key.reveal()
    if conn.session_token is not None:
        kwargs["aws_session_token"] = conn.session_token.reveal()
    return kwargs


def client_config(max_attempts: int = 3) -> Any:
    """Short connect timeout and a few retries: an endpoint that is down fails in seconds, not minutes."""
    from botocore.config import Config

    return Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": max_attempts, "mode": "standard"})


ClientFactory = Callable[[S3ConnectionSpec], Any]
_factory: ContextVar[ClientFactory | None] = ContextVar("conduit_s3_client_factory", default=None)


@contextmanager
def client_factory(factory: ClientFactory) -> Iterator[None]:
    """Within this block, S3 clients for sources and destinations come from ``factory`` (the Dagster glue passes one
    built on dagster-aws's S3Resource: its settings and ``EnvVar`` credentials fill what ingest.yml leaves unset)."""
    token = _factory.set(factory)
    try:
        yield
    finally:
        _factory.reset(token)


def make_client(conn: S3ConnectionSpec) -> Any:
    factory = _factory.get()
    if factory is not None:
        return factory(conn)
    import boto3

    return boto3.session.Session().client("s3", config=client_config(), **client_kwargs(conn))


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_precondition_failed(exc: BaseException) -> bool:
    return error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def is_unsupported(exc: BaseException) -> bool:
    return error_code(exc) in ("NotImplemented", "501")


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


def explain(exc: BaseException, *, bucket: str, endpoint: str | None) -> str:
    """A short reason and fix for a failed S3 call; never a credential."""
    code = error_code(exc)
    endpoint = public_endpoint(endpoint) if endpoint else endpoint
    where = f"bucket {bucket!r}" + (f" at {endpoint}" if endpoint else "")
    if code == "NoSuchBucket":
        return f"{where} does not exist; create it or fix `bucket`"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
        return (
            f"the credentials were rejected by {where} ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or the aws_* keys of ingest.yml"
        )
    if code in ("AccessDenied", "Forbidden", "403"):
        return f"access denied to {where}; grant s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket"
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return f"cannot reach the S3 endpoint {endpoint or '(AWS default)'} ({name}); is it up? check `endpoint_url`"
    if name == "NoCredentialsError":
        return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give aws_* keys"
    if code:
        return f"{where}: S3 said {code}"
    return f"{where}: {name}"


def public_endpoint(url: str) -> str:
    """An endpoint URL fit for a message: no user:password@ and no query (AWS_ENDPOINT_URL_S3 or an S3Resource's
    endpoint_url may carry them; ingest.yml refuses them)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", "")) if parts.scheme else url.rpartition("@")[2].split("?")[0]


def endpoint_of(client: Any) -> str | None:
    try:
        return public_endpoint(str(client.meta.endpoint_url))
    except AttributeError:
        return None


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str
    last_modified: Any = None  # a datetime, by the server's clock (from a listing)


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[S3Object]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield S3Object(item["Key"], int(item["Size"]), str(item.get("ETag", "")), item.get("LastModified"))


def hidden_below(base: str, name: str) -> bool:
    """A folder or file below ``base`` whose name starts with ``_`` or ``.``: bookkeeping (conduit's own
    ``_conduit_staging``, Spark's ``_temporary``, ``.hidden``) that readers of a dataset skip."""
    rest = name[len(base) :] if name.startswith(base) else name
    return any(part.startswith(("_", ".")) for part in rest.split("/") if part)


def fixed_base(pattern: str) -> str:
    """The part of a glob before its first wildcard, cut back to a folder boundary (ends in '/', or '')."""
    cut = min((pattern.index(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[: pattern.rfind("/", 0, cut) + 1]


CONDUIT_MANIFEST = "_conduit_manifest.json"


def parse_manifest(body: bytes) -> dict[str, Any]:
    """A conduit output's manifest document; ValueError if it is not one."""
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("parts", []), list):
        raise ValueError("not a manifest object")
    for key in ("parts", "generations"):
        names = doc.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise ValueError(f"its {key!r} is not a list of names")
    return doc


def _published_only(
    client: Any, bucket: str, listed: list[S3Object], missing: dict[str, str]
) -> tuple[Callable[[S3Object], bool], dict[str, str]]:
    """In a folder that holds a conduit output's manifest, only the parts it names are the output: copies left by a
    publish that crashed midway (until the resumed run removes them) are not. Also returns each manifest's ETag, and
    fills ``missing`` with a part a manifest names that the listing lacks."""
    named: dict[str, set[str]] = {}
    etags: dict[str, str] = {}
    for o in listed:
        folder, _, name = o.key.rpartition("/")
        if name == CONDUIT_MANIFEST:
            response = client.get_object(Bucket=bucket, Key=o.key)
            try:
                parts = parse_manifest(response["Body"].read()).get("parts", [])
            except ValueError as exc:
                raise SourceError(
                    f"s3://{bucket}/{o.key} is damaged ({exc}); it names the parts of a conduit output, which this path "
                    "reads: restore it, or point the source elsewhere"
                ) from None
            named[folder] = set(parts)
            etags[o.key] = str(response["ETag"])

    def keep(o: S3Object) -> bool:
        folder, _, name = o.key.rpartition("/")
        return folder not in named or name in named[folder]

    listed_names = {o.key for o in listed}
    for folder, parts in named.items():
        base = f"{folder}/" if folder else ""
        absent = sorted(base + part for part in parts if base + part not in listed_names)
        if absent:
            etags[base + CONDUIT_MANIFEST] = ""  # listed before a publish committed: read again
            missing[base + CONDUIT_MANIFEST] = absent[0]
    return keep, etags


def _unchanged(client: Any, bucket: str, etags: dict[str, str]) -> bool:
    """Every manifest read is still the current one (no publish committed while the folder was listed)."""
    for key, etag in etags.items():
        if not etag:
            return False
        try:
            client.head_object(Bucket=bucket, Key=key, IfMatch=etag)
        except Exception as exc:  # noqa: BLE001
            if is_precondition_failed(exc) or is_missing(exc):
                return False
            raise
    return True


def match_objects(client: Any, url: str) -> list[S3Object]:
    """The objects an ``s3://`` path names, sorted by key: one key, every object under a prefix ending in
    ``/``, or the keys matching a glob (``*`` stays within one folder level, as in a shell); below a prefix or
    a glob's fixed part, files and folders whose names start with ``_`` or ``.`` are skipped, and in a folder
    holding a conduit output's manifest only the parts it names are taken (a consistent set: the listing is
    read again if a publish commits meanwhile)."""
    bucket, pattern = split_url(url)
    if not (pattern.endswith("/") or pattern == "") and not any(c in pattern for c in GLOB_CHARS):
        head = client.head_object(Bucket=bucket, Key=pattern)
        return [S3Object(pattern, int(head["ContentLength"]), str(head.get("ETag", "")))]
    missing: dict[str, str] = {}
    for _attempt in range(5):
        missing.clear()
        if pattern.endswith("/") or pattern == "":
            listed = list(list_objects(client, bucket, pattern))
            keep, etags = _published_only(client, bucket, listed, missing)
            found = [o for o in listed if not hidden_below(pattern, o.key) and not o.key.endswith("/") and keep(o)]
        else:
            depth = pattern.count("/")
            # Listed from the folder, not from the text before the wildcard: `out/part-*.parquet` must see
            # `out/_conduit_manifest.json`, or the copies a crashed publish left beside the output would be read too.
            listed = list(list_objects(client, bucket, fixed_base(pattern)))
            keep, etags = _published_only(client, bucket, listed, missing)
            found = [
                o
                for o in listed
                if o.key.count("/") == depth
                and fnmatch.fnmatchcase(o.key, pattern)
                and not hidden_below(fixed_base(pattern), o.key)
                and keep(o)
            ]
        if _unchanged(client, bucket, etags):
            return sorted(found, key=lambda o: o.key)
        time.sleep(0.5)
    if missing:  # the same part missing every time: not a publish in progress
        manifest, part = next(iter(missing.items()))
        raise SourceError(
            f"s3://{bucket}/{manifest} names s3://{bucket}/{part}, which does not exist: the manifest lists the parts of "
            "a conduit output, which this path reads; restore the part (or the output), or point the source elsewhere"
        )
    raise SourceError(f"{url}: a conduit output under this path kept being republished while it was listed; try again")


class RangeReader(io.RawIOBase):
    """A seekable, read-only view of one S3 object through ranged GETs (for Parquet footers and row groups).

    With ``etag`` (the version listed) every GET is conditional on it: an object replaced while it is read fails with
    PreconditionFailed instead of giving the footer of one version and row groups of another."""

    def __init__(self, client: Any, bucket: str, key: str, size: int, etag: str = "") -> None:
        self.client, self.bucket, self.key, self.size = client, bucket, key, size
        self.condition = {"IfMatch": etag} if etag else {}
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        body = self.client.get_object(
            Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{self.pos + want - 1}", **self.condition
        )["Body"]
        data = body.read()
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n
