"""Checkpoints in S3: the same JSON documents as the local store, one object per pipeline, owned by one run.

Layout under ``s3://<bucket>/<prefix>/``::

    <pipeline>.json          the checkpoint (deleted when the run finishes)
    <pipeline>.state.json    an incremental load's state (kept between runs)
    <pipeline>.lease.json    which run owns the pipeline now, renewed while it runs

Ownership, with S3 conditional writes (``If-None-Match: *`` and ``If-Match: <ETag>``):

- A run takes the lease by creating ``<pipeline>.lease.json`` only if it does not exist. A lease left
  by a run that died is taken over once it expires (``lease_seconds`` after its last renewal, by the
  S3 server's clock, so machines' clocks never matter) or at once when it names a process of this
  machine that is gone. The takeover is itself conditional on the stale lease's ETag, so of two runs
  racing for it one wins.
- The owner renews the lease every third of ``lease_seconds``; if it cannot, or finds it taken, it
  stops before its next write.
- Every checkpoint write is conditional on the ETag this run last read or wrote: a run that lost the
  pipeline (a paused process whose lease was taken over) can never overwrite the new owner's
  checkpoint; its save fails and it stops.

Where the endpoint does not honour conditional writes (it answers 501, or ignores the header) the
store refuses to run unless ``conditional_writes: false`` is set; then the lease is a plain write
checked by reading it back, which two runs starting in the same instant can both pass. Keep the
Dagster pool limit of 1 per pipeline in that case (see the README).
"""

import builtins
import datetime as dt
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from conduit_dagster.engine.checkpoint import CLEAR_HINT, Checkpoint, IncrementalState
from conduit_dagster.engine.errors import CheckpointError, PipelineBusyError, SpecError
from conduit_dagster.engine.s3 import (
    endpoint_of,
    explain,
    is_missing,
    is_precondition_failed,
    is_unsupported,
    join_key,
    list_objects,
)

_UNKNOWN = "?"  # no ETag known for a key: this store has neither read nor written it
SAFETY_MARGIN_S = 3.0  # the owner stops this long before others may see its lease as expired
# Below this, the owner (which stops SAFETY_MARGIN_S before expiry) would have too little time between renewals
# (every third of the lease) to survive one slow or failed request.
MIN_LEASE_SECONDS = 10


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    """This process's PID namespace: two containers may share a host name and boot id, not their PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Lease:
    key: str
    etag: str
    body: bytes
    renewed_at: float  # time.monotonic() when the last successful write was sent (never later than the server stamped it)
    lost: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class S3CheckpointStore:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        lease_seconds: int = 60,
        conditional_writes: bool = True,
        wait_seconds: float | None = None,
    ) -> None:
        if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int) or lease_seconds < MIN_LEASE_SECONDS:
            raise SpecError(
                f"checkpoints: lease_seconds {lease_seconds!r} is too short for the S3 checkpoint store; give at least "
                f"{MIN_LEASE_SECONDS} (the default is 60): a run stops {SAFETY_MARGIN_S:.0f} s before its lease could "
                "expire, and renews it every third of lease_seconds"
            )
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.lease_seconds = lease_seconds
        self.conditional_writes = conditional_writes
        # how long to wait for a lease nobody renews (its run died where this machine cannot see): by default until it
        # expires; a lease that gets renewed meanwhile shows a live run, and the pipeline is busy at once
        self.wait_seconds = lease_seconds + 5.0 if wait_seconds is None else wait_seconds
        self.endpoint = endpoint_of(client)
        self._etags: dict[str, str | None] = {}  # None: known to be absent
        self._leases: dict[str, _Lease] = {}
        self._mutex = threading.Lock()

    # --- naming ---------------------------------------------------------------------------------------

    def _key(self, pipeline: str, suffix: str = ".json") -> str:
        if (
            not pipeline
            or "/" in pipeline
            or "\\" in pipeline
            or "\x00" in pipeline
            or pipeline.startswith(".")
            or pipeline.endswith((".state", ".lease", ".plan"))  # its objects would be another pipeline's state, lease or plan
        ):
            raise CheckpointError(f"invalid pipeline name {pipeline!r} for a checkpoint object")
        return join_key(self.prefix, pipeline + suffix)

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def describe(self, pipeline: str) -> str:
        return self._url(self._key(pipeline))

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"

    def _why(self, exc: BaseException) -> str:
        return explain(exc, bucket=self.bucket, endpoint=self.endpoint)

    # --- objects --------------------------------------------------------------------------------------

    def _get(self, key: str) -> str | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            text = response["Body"].read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; each is explained
            if is_missing(exc):
                self._etags[key] = None
                return None
            raise CheckpointError(f"{self._url(key)}: cannot read ({self._why(exc)}); nothing was read or written") from None
        self._etags[key] = str(response["ETag"])
        return text

    def _conditions(self, key: str) -> dict[str, str]:
        if not self.conditional_writes:
            return {}
        etag = self._etags.get(key, _UNKNOWN)
        if etag is None:
            return {"IfNoneMatch": "*"}
        if etag != _UNKNOWN:
            return {"IfMatch": etag}
        return {}

    def _put(self, key: str, body: bytes, pipeline: str, what: str) -> None:
        self.assert_owner(pipeline)
        conditions = self._conditions(key)
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **conditions
            )
        except Exception as exc:  # noqa: BLE001
            if conditions and (is_precondition_failed(exc) or ("IfMatch" in conditions and is_missing(exc))):
                if self._landed(key, body):  # our own write, retried after a lost response
                    return
                raise CheckpointError(
                    f"{self._url(key)}: another run changed the {what} after this run read it, so this run no longer "
                    f"owns pipeline {pipeline!r}; it stops here and writes nothing more (the other run's {what} is kept)"
                ) from None
            raise CheckpointError(
                f"{self._url(key)}: cannot write the {what} ({self._why(exc)}); the previous {what} is unchanged"
            ) from None
        self._etags[key] = str(response["ETag"])

    def _landed(self, key: str, body: bytes) -> bool:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            if response["Body"].read() == body:
                self._etags[key] = str(response["ETag"])
                return True
        except Exception:  # noqa: BLE001 - then it did not
            return False
        return False

    def _delete(self, key: str, pipeline: str, what: str) -> None:
        self.assert_owner(pipeline)
        etag = self._etags.get(key, _UNKNOWN)
        conditions = {"IfMatch": etag} if self.conditional_writes and etag not in (None, _UNKNOWN) else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, **conditions)
        except Exception as exc:  # noqa: BLE001
            if is_precondition_failed(exc):
                raise CheckpointError(
                    f"{self._url(key)}: another run changed the {what} after this run read it, so this run no longer "
                    f"owns pipeline {pipeline!r}; the other run's {what} is left in place"
                ) from None
            if not is_missing(exc):
                raise CheckpointError(f"{self._url(key)}: cannot delete the {what} ({self._why(exc)})") from None
        self._etags[key] = None

    # --- the store protocol ---------------------------------------------------------------------------

    def load(self, pipeline: str) -> Checkpoint | None:
        key = self._key(pipeline)
        text = self._get(key)
        return None if text is None else Checkpoint.from_json(text, where=self._url(key), pipeline=pipeline)

    def save(self, checkpoint: Checkpoint) -> None:
        key = self._key(checkpoint.pipeline)
        self._put(key, checkpoint.to_json().encode("utf-8"), checkpoint.pipeline, "checkpoint")

    def delete(self, pipeline: str) -> None:
        self._delete(self._key(pipeline), pipeline, "checkpoint")

    def load_state(self, pipeline: str) -> IncrementalState | None:
        key = self._key(pipeline, ".state.json")
        text = self._get(key)
        return None if text is None else IncrementalState.from_json(text, where=self._url(key), pipeline=pipeline)

    def save_state(self, state: IncrementalState) -> None:
        self._put(self._key(state.pipeline, ".state.json"), state.to_json().encode("utf-8"), state.pipeline, "incremental state")

    def delete_state(self, pipeline: str) -> None:
        self._delete(self._key(pipeline, ".state.json"), pipeline, "incremental state")

    def load_plan(self, pipeline: str) -> str | None:
        return self._get(self._key(pipeline, ".plan.json"))

    def save_plan(self, pipeline: str, text: str) -> None:
        self._put(self._key(pipeline, ".plan.json"), text.encode("utf-8"), pipeline, "key-range plan")

    def delete_plan(self, pipeline: str) -> None:
        self._delete(self._key(pipeline, ".plan.json"), pipeline, "key-range plan")

    def _names(self, suffix: str) -> "builtins.list[str]":
        base = join_key(self.prefix, "") + ("/" if self.prefix else "")
        try:
            objects = builtins.list(list_objects(self.client, self.bucket, base))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{self.location}: cannot list checkpoints ({self._why(exc)})") from None
        names = []
        for o in objects:
            rest = o.key[len(base) :]
            if "/" in rest or not rest.endswith(suffix) or rest.startswith("."):
                continue
            stem = rest[: -len(suffix)]
            if suffix == ".json" and stem.endswith((".state", ".lease", ".plan")):
                continue
            names.append(stem)
        return sorted(names)

    def list(self) -> "builtins.list[str]":
        return self._names(".json")

    def list_states(self) -> "builtins.list[str]":
        return self._names(".state.json")

    def has_checkpoint(self, pipeline: str) -> bool:
        return self._get(self._key(pipeline)) is not None

    # --- ownership ------------------------------------------------------------------------------------

    def assert_owner(self, pipeline: str) -> None:
        """Raise if this store holds ``pipeline``'s lease no more (taken over, or not renewed in time)."""
        lease = self._leases.get(pipeline)
        if lease is None:
            return
        if lease.lost is None and time.monotonic() - lease.renewed_at > self.lease_seconds - SAFETY_MARGIN_S:
            lease.lost = f"its lease was not renewed for {time.monotonic() - lease.renewed_at:.0f} s"
        if lease.lost is not None:
            raise CheckpointError(
                f"{self._url(lease.key)}: this run no longer owns pipeline {pipeline!r} ({lease.lost}); it stopped before "
                "writing anything more. The run that holds the pipeline now, or the next one, resumes from the checkpoint"
            )

    def _lease_body(self, run_id: str | None, token: str) -> bytes:
        doc = {
            "run_id": run_id,
            "token": token,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "pid_ns": _pid_ns(),
            "lease_seconds": self.lease_seconds,
            "renewed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")

    def _holder(self, key: str) -> tuple[dict[str, Any], str, float] | None:
        """The current lease: (document, ETag, seconds since its last renewal by the server's clock)."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if is_missing(exc):
                return None
            raise CheckpointError(
                f"{self._url(key)}: cannot read the lease ({self._why(exc)}); nothing was read or written"
            ) from None
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            doc = {}
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            server_now = email.utils.parsedate_to_datetime(date) if date else dt.datetime.now(dt.UTC)
        except (TypeError, ValueError):  # no usable Date header: this machine's clock is the best there is
            server_now = dt.datetime.now(dt.UTC)
        if server_now.tzinfo is None:
            server_now = server_now.replace(tzinfo=dt.UTC)
        age = (server_now - response["LastModified"]).total_seconds()
        return doc, str(response["ETag"]), age

    def _stale(self, doc: dict[str, Any], age: float) -> bool:
        ttl = doc.get("lease_seconds")
        ttl = ttl if isinstance(ttl, int) and ttl > 0 else self.lease_seconds
        if age > ttl:
            return True
        pid = doc.get("pid")
        same_machine = (
            doc.get("host") == socket.gethostname()
            and doc.get("boot_id") == _boot_id() != ""
            and doc.get("pid_ns") == _pid_ns() != ""  # a process of another container is not ours to see
        )
        return bool(
            same_machine and isinstance(pid, int) and not isinstance(pid, bool) and pid != os.getpid() and not _alive(pid)
        )

    def _acquire(self, pipeline: str, run_id: str | None) -> _Lease:
        """Take the lease: create it, or take over a stale one. A lease held by a run that is not renewing it (a run
        that died on another machine, whose process this machine cannot see) is waited out, up to ``wait_seconds``,
        so that a retry launched right after such a crash runs instead of failing; a lease that is renewed while
        this waits belongs to a live run, and the pipeline is busy."""
        key = self._key(pipeline, ".lease.json")
        body = self._lease_body(run_id, uuid.uuid4().hex)
        token = json.loads(body)["token"]
        deadline = time.monotonic() + self.wait_seconds
        watched: str | None = None  # the ETag of the holder's lease when this run first saw it
        while True:
            conditions: dict[str, str] = {"IfNoneMatch": "*"} if self.conditional_writes else {}
            found = None if self.conditional_writes else self._holder(key)
            if found is None:
                sent = time.monotonic()  # the server stamps the lease no earlier than this: count its age from here
                try:
                    response = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **conditions)
                except Exception as exc:  # noqa: BLE001
                    if is_unsupported(exc):
                        raise self._unsupported() from None
                    if not is_precondition_failed(exc):
                        raise CheckpointError(
                            f"{self._url(key)}: cannot take the pipeline's lease ({self._why(exc)}); nothing was read or written"
                        ) from None
                else:
                    lease = _Lease(key, str(response["ETag"]), body, sent)
                    try:
                        self._verify(lease, pipeline)
                    except PipelineBusyError:
                        raise  # the lease is the other run's now
                    except BaseException:
                        self._release(lease)  # not left behind to block the next run (e.g. with conditional_writes: false)
                        raise
                    return lease
                found = self._holder(key)
                if found is None:
                    continue  # released in between: try again
            doc, etag, age = found
            if doc.get("token") == token:
                # our own create, retried by botocore after its response was lost: the lease is ours
                lease = _Lease(key, etag, body, time.monotonic())
                self._verify(lease, pipeline)
                return lease
            if self._stale(doc, age):
                sent = time.monotonic()
                # take over the dead run's lease, unless another run does first (or it is released meanwhile); without
                # conditional writes the endpoint may refuse If-Match, and the lease is read back instead (_verify)
                takeover = {"IfMatch": etag} if self.conditional_writes else {}
                try:
                    response = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **takeover)
                except Exception as exc:  # noqa: BLE001
                    if is_unsupported(exc):
                        raise self._unsupported() from None
                    if not (is_precondition_failed(exc) or is_missing(exc)):
                        raise CheckpointError(
                            f"{self._url(key)}: cannot take over the lease ({self._why(exc)}); nothing was read or written"
                        ) from None
                    continue
                lease = _Lease(key, str(response["ETag"]), body, sent)
                # A takeover is checked like a create: an endpoint that ignores If-Match (while honouring If-None-Match)
                # would otherwise only be caught by runs that found no lease, and fencing would silently do nothing.
                try:
                    self._verify(lease, pipeline)
                except PipelineBusyError:
                    raise
                except BaseException:
                    self._release(lease)
                    raise
                return lease
            if watched is not None and etag != watched or time.monotonic() >= deadline:
                raise self._busy(pipeline, key, doc, age, renewed=watched is not None and etag != watched)
            watched = watched or etag
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _busy(self, pipeline: str, key: str, doc: dict[str, Any], age: float, *, renewed: bool) -> PipelineBusyError:
        ttl = doc.get("lease_seconds", self.lease_seconds)
        how = "it renewed its lease" if renewed else f"its lease {self._url(key)} was renewed {age:.0f} s ago"
        return PipelineBusyError(
            f"pipeline {pipeline!r} is already being run (run {doc.get('run_id') or 'unknown'} on {doc.get('host') or '?'}, "
            f"pid {doc.get('pid') or '?'}; {how}, lease {self._url(key)}); nothing was read or written. Wait for that "
            f"run to finish or stop it; a run that died releases the pipeline when its lease expires ({ttl} s after its "
            "last renewal)"
        )

    def _verify(self, lease: _Lease, pipeline: str) -> None:
        """Conditional writes honoured? A second create of the same key must be refused (an endpoint that ignores
        If-None-Match would accept it). Without conditional writes: read the lease back, it must be ours."""
        if not self.conditional_writes:
            time.sleep(0.2)
            found = self._holder(lease.key)
            if found is None or found[0].get("token") != json.loads(lease.body)["token"]:
                raise PipelineBusyError(
                    f"pipeline {pipeline!r}: another run took the lease {self._url(lease.key)} at the same time"
                )
            lease.etag = found[1]
            return
        # Both conditions: If-None-Match guards the lease, If-Match every checkpoint save; each must refuse here.
        for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'}):
            try:
                self.client.put_object(Bucket=self.bucket, Key=lease.key, Body=lease.body, **condition)
            except Exception as exc:  # noqa: BLE001
                if is_precondition_failed(exc):
                    continue
                if is_unsupported(exc):
                    raise self._unsupported() from None
                raise CheckpointError(f"{self._url(lease.key)}: cannot check the lease ({self._why(exc)})") from None
            raise self._unsupported()

    def _unsupported(self) -> CheckpointError:
        return CheckpointError(
            f"{self.location}: the S3 endpoint {self.endpoint or '(AWS)'} does not honour conditional writes "
            "(If-None-Match / If-Match), which keep two runs from both owning a pipeline's checkpoint. Use an endpoint "
            "that does (AWS S3, MinIO, Ceph RGW 18+), or set `conditional_writes: false` under `checkpoints:` and rely "
            "on the Dagster pool limit of 1 per pipeline (README: 'Checkpoints in S3')"
        )

    def _renew(self, lease: _Lease, run_id: str | None, token: str) -> None:
        interval = self.lease_seconds / 3
        wait = interval
        while not lease.stop.wait(wait):
            body = self._lease_body(run_id, token)
            conditions = {"IfMatch": lease.etag} if self.conditional_writes else {}
            sent = time.monotonic()  # the renewal counts from when it was sent, not answered: never later than the server's
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=lease.key, Body=body, **conditions)
                etag = str(response["ETag"])
            except Exception as exc:  # noqa: BLE001
                if is_precondition_failed(exc) or (conditions and is_missing(exc)):
                    found = self._landed_etag(lease.key, body)  # our own renewal, retried after a lost response?
                    if found is None:
                        lease.lost = "another run took over its lease"
                        return
                    etag = found
                else:
                    wait = min(interval, 1.0)  # a network blip: try again soon; assert_owner stops the run if it lasts
                    continue
            wait = interval
            with self._mutex:
                lease.etag, lease.body, lease.renewed_at = etag, body, sent

    def _landed_etag(self, key: str, body: bytes) -> str | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            if response["Body"].read() == body:
                return str(response["ETag"])
        except Exception:  # noqa: BLE001 - then it did not land
            return None
        return None

    def _release(self, lease: _Lease) -> None:
        """Delete the lease if it is still this run's (with conditional writes, even after losing it by time: the
        If-Match leaves a lease another run took alone). A lease left behind expires by itself."""
        if lease.lost is not None and not self.conditional_writes:
            return
        try:
            conditions = {"IfMatch": lease.etag} if self.conditional_writes else {}
            self.client.delete_object(Bucket=self.bucket, Key=lease.key, **conditions)
        except Exception:  # noqa: BLE001, S110 - a lease left behind expires by itself
            pass

    def _refresh(self, key: str) -> None:
        """Learn ``key``'s ETag now, so that this run's writes to it fail if another run writes it meanwhile, and an
        ETag remembered from an earlier run of this store does not fail them."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if not is_missing(exc):
                raise CheckpointError(f"{self._url(key)}: cannot read ({self._why(exc)}); nothing was read or written") from None
            self._etags[key] = None
            return
        self._etags[key] = str(response["ETag"])

    @contextmanager
    def lock(self, pipeline: str, run_id: str | None) -> Iterator[None]:
        """Own ``pipeline`` for one run: its lease is taken, renewed in the background, and released at the end."""
        if pipeline in self._leases:
            raise PipelineBusyError(f"pipeline {pipeline!r} is already being run by this process")
        lease = self._acquire(pipeline, run_id)
        try:
            for suffix in (".json", ".state.json"):
                self._refresh(self._key(pipeline, suffix))
        except BaseException:
            self._release(lease)
            raise
        token = json.loads(lease.body)["token"]
        lease.thread = threading.Thread(target=self._renew, args=(lease, run_id, token), daemon=True, name=f"lease-{pipeline}")
        self._leases[pipeline] = lease
        lease.thread.start()
        try:
            yield
        finally:
            lease.stop.set()
            lease.thread.join()
            del self._leases[pipeline]
            self._release(lease)


__all__ = ["CLEAR_HINT", "S3CheckpointStore"]
