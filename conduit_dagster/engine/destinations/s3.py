"""S3: part files per batch, staged under a generation and published under the resource's prefix.

Layout for ``bucket: lake``, ``prefix: raw`` and pipeline ``orders``::

    s3://lake/raw/orders/part-<gen>-000000.parquet ...   the visible output: a finished run's parts
    s3://lake/raw/orders/_conduit_manifest.json          which parts make the output (readers skip '_')
    s3://lake/raw/_conduit_staging/orders/<gen>/part-000000.parquet
                                                         a run in progress (readers skip '_' folders)

A batch's staged key is fixed by its index and by the run attempt writing it
(``part-<index>-<attempt>``): a batch replayed after a crash overwrites its own object, and a run that lost
the pipeline while paused (its lease taken over) can only ever write keys of its own attempt, which the run
that owns the pipeline never publishes. The checkpoint records which attempt wrote which batches. A PUT (or
a completed multipart upload) appears whole, so a reader never sees half an object.

S3 has no atomic rename of many objects: publishing copies the committed parts into the output (server-side),
then writes the manifest (the commit point: one PUT, conditional on the manifest it read), then deletes what
that manifest replaced. A reader that lists the prefix during those seconds may see old and new parts
together; a reader that follows the manifest (conduit's file source does) never does. A crash anywhere is
finished by the resumed run.

A partitioned pipeline has the same design one level down, one output prefix and manifest per partition::

    s3://lake/raw/orders/2024-01-01/part-<gen>-000000.parquet ...   partition 2024-01-01's output
    s3://lake/raw/orders/2024-01-01/_conduit_manifest.json          its parts (and its key, under "partition")
    s3://lake/raw/_conduit_staging/orders.2024-01-01/<gen>/part-000000-<attempt>.parquet
                                                                    a run of that partition in progress

Publishing a partition commits its own manifest (the same conditional PUT) and deletes only what that manifest
replaced: the other partitions' prefixes are never listed, written or deleted. Its staging is named by the
partition's unit, ``<pipeline>.<key>`` (the name of its checkpoint and lock), so the clean-up after a partition's
publish (only objects older than its manifest, under its own staging prefix, while its run still owns the unit)
never reaches another partition's staging, which partitions running at the same time in other processes are
writing, nor the unpartitioned layout's ``_conduit_staging/orders/`` (and that layout's clean-up never reaches
``_conduit_staging/orders.<key>/``). A zero-row partition publishes a manifest naming no part: its earlier parts
are deleted, ``count()`` is 0, and no schema file is invented (no batch came to take one from).

The prefix is the partition key as is (``orders/2024-01-01/``, ``orders/r03/``), not hive-style
``l_shipdate=2024-01-01/``: the rows already hold the partition column with its real values, and a hive-aware reader
(DuckDB's ``hive_partitioning``, Spark, Athena) would add or overwrite that column with the prefix's text, the
window's start rather than each row's value.

Reading every partition: every part below ``s3://lake/raw/orders/``, e.g. DuckDB's
``read_parquet('s3://lake/raw/orders/*/*.parquet')`` or ``pyarrow.dataset.dataset("lake/raw/orders",
filesystem=S3FileSystem(...))`` (which skips the ``_`` manifests); runs in progress are under ``_conduit_staging/``,
outside that prefix, so neither sees them. Conduit's file source on ``s3://lake/raw/orders/`` follows each
partition's manifest, so it never sees a republished partition's old and new parts together, which a plain listing
may during the seconds of that publish. A
pipeline's output is either one prefix or partitioned: a partitioned run refuses ``orders/`` while it holds an
unpartitioned output, and an unpartitioned run refuses it while it holds partitions.
"""

import datetime as dt
import json
import re
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.backends import DestinationBackend, register_destination_backend
from conduit_dagster.engine.destinations.base import Resumption
from conduit_dagster.engine.destinations.formats import EXTENSIONS, count_rows, write_part
from conduit_dagster.engine.destinations.layout import check_partition, cleared_partition, leftover_lines
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.partitions import Partition
from conduit_dagster.engine.s3 import (
    CONDUIT_MANIFEST,
    RangeReader,
    S3Object,
    endpoint_of,
    explain,
    is_missing,
    is_precondition_failed,
    join_key,
    list_objects,
    make_client,
    parse_manifest,
)
from conduit_dagster.engine.spec import (
    FORMAT_KINDS,
    FORMATS,
    S3_KEYS,
    S3ConnectionSpec,
    _Entry,
    bucket_name,
    key_prefix,
    s3_connection,
)


@dataclass(frozen=True)
class S3DestinationSpec:
    """Part files under s3://bucket/prefix/<resource>/."""

    name: str
    bucket: str
    prefix: str = ""
    format: str = "parquet"
    s3: S3ConnectionSpec = field(default_factory=S3ConnectionSpec)
    type: str = "s3"

    def uri(self, pipeline: str) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{pipeline}/"


MANIFEST = CONDUIT_MANIFEST
STAGING = "_conduit_staging"
MULTIPART_BYTES = 16 * 1024 * 1024  # parts larger than this go up in 16 MiB pieces, 4 at a time
_OUTPUT_PART_RE = re.compile(r"^part-[0-9a-f]{12}-\d{6}\.(parquet|csv|jsonl)$")


class S3Destination:
    def __init__(
        self,
        spec: S3DestinationSpec,
        pipeline: str,
        *,
        accumulate: bool = False,
        client: Any = None,
        multipart_bytes: int = MULTIPART_BYTES,
        partition: Partition | None = None,
    ) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.accumulate = accumulate
        self.partition = partition
        self.parent = join_key(spec.prefix, pipeline) + "/"  # the pipeline's output prefix
        if partition is None:
            self.unit = pipeline
            self.what = f"pipeline {pipeline!r}"
            self.output = self.parent
        else:
            check_partition(spec.name, pipeline, partition, accumulate=accumulate, names="prefix")
            self.unit = partition.unit
            self.what = f"pipeline {pipeline!r} partition {partition.key!r}"
            self.output = join_key(spec.prefix, pipeline, partition.key) + "/"
        # every object this output's runs stage, under a prefix no other output's (nor partition's) begins with
        self.staging = join_key(spec.prefix, STAGING, self.unit) + "/"
        self.client = client if client is not None else make_client(spec.s3)
        self.bucket = spec.bucket
        self.ext = EXTENSIONS[spec.format]
        self.generation: str | None = None
        self.attempt = uuid.uuid4().hex[:8]  # this run's attempt at the generation: its staged keys are its own
        self.attempts: list[tuple[int, str]] = []  # (first batch index, attempt) for the committed batches
        self.fence: Callable[[], None] | None = None
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes, max_concurrency=4, use_threads=True
        )

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.output}"

    def close(self) -> None:
        pass

    def _fail(self, what: str, exc: BaseException) -> DestinationError:
        why = explain(exc, bucket=self.bucket, endpoint=endpoint_of(self.client))
        return DestinationError(
            f"destination {self.spec.name!r}: cannot {what} at s3://{self.bucket}/{self.output} ({why}); "
            "nothing was published and the checkpoint is unchanged"
        )

    @property
    def _gen_prefix(self) -> str:
        assert self.generation is not None
        return f"{self.staging}{self.generation}/"

    def _part_key(self, index: int, attempt: str | None = None) -> str:
        return f"{self._gen_prefix}part-{index:06d}-{attempt or self.attempt}.{self.ext}"

    def _attempt_of(self, index: int) -> str:
        """The attempt whose part of batch ``index`` is the committed one."""
        chosen = self.attempt
        for first, attempt in self.attempts:
            if first <= index:
                chosen = attempt
        return chosen

    def _consecutive(self, staged: set[str]) -> int:
        """How many batches from 0 on have their committed part staged (when the caller does not say)."""
        count = 0
        while self._part_key(count, self._attempt_of(count)) in staged:
            count += 1
        return count

    def set_fence(self, fence: Callable[[], None]) -> None:
        """``fence()`` raises if this run no longer owns the pipeline; checked before removing anything not its own."""
        self.fence = fence

    def _state(self) -> dict[str, Any]:
        return {"generation": self.generation, "attempts": [[first, attempt] for first, attempt in self.attempts]}

    def _keys(self, prefix: str) -> list[str]:
        return [o.key for o in list_objects(self.client, self.bucket, prefix)]

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )
            errors = response.get("Errors") or []
            if errors:
                raise DestinationError(
                    f"destination {self.spec.name!r}: could not delete {len(errors)} object(s) under s3://{self.bucket}/"
                    f"{self.output}, e.g. {errors[0].get('Key')} ({errors[0].get('Code')})"
                )

    def _abort_uploads(self, prefix: str, *, before: Any = None) -> None:
        """Incomplete multipart uploads of a crashed run hold storage (and cost) until aborted."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if before is not None and not (upload.get("Initiated") and upload["Initiated"] < before):
                    continue
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def manifest(self) -> dict[str, Any] | None:
        return self._manifest_etag()[0]

    def _parse_manifest(self, body: bytes) -> dict[str, Any]:
        try:
            return parse_manifest(body)
        except ValueError as exc:
            raise DestinationError(
                f"destination {self.spec.name!r}: s3://{self.bucket}/{self.output}{MANIFEST} is damaged ({exc}); it names "
                "the parts of the output. Restore it, or delete the output prefix for a full reload. Nothing was changed"
            ) from None

    def _check_not_unpartitioned(self) -> None:
        """A partition's output goes below ``<pipeline>/<key>/``: refuse while ``<pipeline>/`` holds an unpartitioned
        run's output (its manifest, or the parts of its first publish), which a reader would see next to the
        partitions'."""
        if self.partition is None:
            return
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.parent + MANIFEST)
            found = f"its {MANIFEST}"
        except Exception as exc:  # noqa: BLE001
            if not is_missing(exc):
                raise
            parts = [k for k in self._keys(self.parent + "part-") if _OUTPUT_PART_RE.match(k[len(self.parent) :])]
            if not parts:
                return
            found = f"part files such as {parts[0][len(self.parent) :]}"
        raise DestinationError(
            f"destination {self.spec.name!r}: s3://{self.bucket}/{self.parent} holds the output of an unpartitioned run of "
            f"{self.pipeline!r} ({found}), and a partitioned pipeline writes each partition below "
            f"s3://{self.bucket}/{self.parent}<partition key>/, where readers of that prefix would see both. Move that "
            "output away (or delete it), or set another prefix. Nothing was changed"
        )

    def _check_output_is_ours(self, manifest: dict[str, Any] | None) -> None:
        self._check_not_unpartitioned()
        if manifest is not None:
            return
        # Without a manifest, the only objects conduit leaves here are the copies of a first publish that crashed
        # before its manifest (the resumed or next run publishes over them); anything else is not ours to replace.
        foreign = [k for k in self._keys(self.output) if not _OUTPUT_PART_RE.match(k[len(self.output) :])]
        partitions = sorted({k[len(self.output) :].split("/")[0] for k in foreign if k.endswith("/" + MANIFEST)})
        if partitions and self.partition is None:
            raise DestinationError(
                f"destination {self.spec.name!r}: s3://{self.bucket}/{self.output} holds the partitions of a partitioned "
                f"run of {self.pipeline!r} ({', '.join(partitions[:3])}{' ...' if len(partitions) > 3 else ''}), which "
                "publishing this unpartitioned output would replace; move them away (or delete them), or set another "
                "prefix. Nothing was changed"
            )
        if foreign:
            raise DestinationError(
                f"destination {self.spec.name!r}: s3://{self.bucket}/{self.output} holds objects conduit did not write "
                f"(no {MANIFEST}), and publishing would replace them; move them away or set another prefix. Nothing was changed"
            )

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            manifest, etag = self._manifest_etag()
            self._check_output_is_ours(manifest)
            if state is None:
                return self._start_fresh()
            return self._resume(state, committed, manifest, etag)
        except (DestinationError, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("prepare the output", exc) from None

    def _start_fresh(self) -> Resumption:
        # Staging left by runs that died before their first checkpoint is removed after this run publishes, not
        # now: a run that lost the pipeline while paused must never delete the staged parts of the run that owns it.
        self.generation = uuid.uuid4().hex
        self.attempts = [(0, self.attempt)]
        return Resumption(self._state())

    def _resume(
        self, state: dict[str, Any], committed: int, manifest: dict[str, Any] | None, manifest_etag: str | None
    ) -> Resumption:
        generation, attempts = state.get("generation"), state.get("attempts")
        valid = isinstance(attempts, list) and all(
            isinstance(a, list)
            and len(a) == 2
            and isinstance(a[0], int)
            and not isinstance(a[0], bool)
            and isinstance(a[1], str)
            and re.fullmatch(r"[0-9a-f]{8}", a[1])
            for a in attempts
        )
        if not isinstance(generation, str) or not generation.isalnum() or not valid:
            raise CheckpointError(
                f"{self.what}: the checkpoint names no valid output generation and attempts (written by an "
                f"older conduit, or edited); start over with `conduit clear-checkpoints --pipeline-name {self.unit}`"
            )
        self.generation = generation
        assert isinstance(attempts, list)
        published = set(manifest.get("parts", [])) if manifest and generation in manifest.get("generations", []) else set()
        if published and set(self._names(committed)) <= published:
            # Crashed after the manifest named this run's parts, before the checkpoint was deleted: finish the clean-up.
            self._finish(None, manifest or {}, [], manifest_etag)
            return Resumption(state, already_published=True)
        # The committed batches keep the attempts that wrote them; this attempt writes from `committed` on.
        self.attempts = [(first, attempt) for first, attempt in attempts if first < committed] + [(committed, self.attempt)]
        self._abort_uploads(self._gen_prefix)
        staged = self._keys(self._gen_prefix)
        names = self._names(committed)
        # a committed part that a paused run of this generation already published need not be staged any more
        wanted = {self._part_key(i, self._attempt_of(i)) for i in range(committed) if names[i] not in published}
        missing = sorted(int(k[len(self._gen_prefix) :][5:11]) for k in wanted - set(staged))
        if missing:
            raise CheckpointError(
                f"{self.what}: {len(missing)} committed part(s) of the unfinished output are missing from "
                f"s3://{self.bucket}/{self._gen_prefix} (e.g. part {missing[0]}), so it cannot be resumed; start over with "
                f"`conduit clear-checkpoints --pipeline-name {self.unit}`"
            )
        # Everything else staged for this generation (parts written after the last checkpoint, or by an attempt that
        # lost the pipeline) is never published: drop it.
        self._delete([k for k in staged if k not in wanted])
        return Resumption(self._state())

    def write(self, index: int, table: pa.Table, key_column: str | None = None, last_key: Any = None) -> None:
        key = self._part_key(index)
        # Spooled: a part up to 64 MiB stays in memory, a larger one goes to a temporary file on its way up.
        with tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024) as buffer:
            write_part(table, self.spec.format, buffer)
            buffer.seek(0)
            try:
                self.client.upload_fileobj(buffer, self.bucket, key, Config=self.transfer)
            except Exception as exc:  # noqa: BLE001
                raise self._fail(f"write part {index}", exc) from None

    def _manifest_etag(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.output + MANIFEST)
        except Exception as exc:  # noqa: BLE001
            if is_missing(exc):
                return None, None
            raise self._fail("read the manifest", exc) from None
        return self._parse_manifest(response["Body"].read()), str(response["ETag"])

    def _names(self, count: int) -> list[str]:
        assert self.generation is not None
        return [f"part-{self.generation[:12]}-{i:06d}.{self.ext}" for i in range(count)]

    def publish(self, batches: int | None = None) -> None:
        """Copy the committed parts 0..batches-1 into the output, then commit them with one conditional PUT of the
        manifest.

        Safe even when run by a process that lost the pipeline while paused: a part the manifest already names for
        this generation (a paused run of it published first) is that same committed part and is not copied again;
        a committed part neither published nor staged stops the publish loudly; and the manifest is written only
        if nobody changed it since this publish read it, so of two publishers one commits and the other stops."""
        assert self.generation is not None
        try:
            manifest, etag = self._manifest_etag()
            self._check_output_is_ours(manifest)
            staged = set(self._keys(self._gen_prefix))
            count = batches if batches is not None else self._consecutive(staged)
            names = self._names(count)
            previous_parts = list((manifest or {}).get("parts", []))
            published = set(previous_parts) if manifest and self.generation in manifest.get("generations", []) else set()
            todo = [i for i in range(count) if names[i] not in published]
            keys = {i: self._part_key(i, self._attempt_of(i)) for i in todo}
            missing = [i for i in todo if keys[i] not in staged]
            if missing:
                raise DestinationError(
                    f"destination {self.spec.name!r}: {len(missing)} committed part(s) of this run are missing from "
                    f"s3://{self.bucket}/{self._gen_prefix} (e.g. part {missing[0]}), so its output was not published; "
                    f"another process may have removed them. Start over with `conduit clear-checkpoints --pipeline-name "
                    f"{self.unit}`"
                )
            generations = list((manifest or {}).get("generations", []))
            if self.accumulate:
                parts = previous_parts + [names[i] for i in todo]
                generations += [] if self.generation in generations else [self.generation]
            else:
                parts, generations = names, [self.generation]
            if manifest is not None and parts == previous_parts and generations == manifest.get("generations"):
                self._finish(None, manifest, [], etag)  # already published whole (by a resumed run of this generation)
                return

            def copy(i: int) -> None:
                self.client.copy(
                    {"Bucket": self.bucket, "Key": keys[i]}, self.bucket, self.output + names[i], Config=self.transfer
                )

            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="conduit-publish") as pool:
                list(pool.map(copy, todo))
            doc: dict[str, Any] = {
                "format_version": 1,
                "pipeline": self.pipeline,
                **({"partition": self.partition.key} if self.partition is not None else {}),
                "format": self.spec.format,
                "generation": self.generation,
                "generations": generations[-1000:],
                "parts": parts,
                "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            body = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                put = self.client.put_object(
                    Bucket=self.bucket, Key=self.output + MANIFEST, Body=body, ContentType="application/json", **condition
                )
            except Exception as exc:  # noqa: BLE001
                if not is_precondition_failed(exc):
                    raise
                raise DestinationError(
                    f"destination {self.spec.name!r}: another run published s3://{self.bucket}/{self.output} while this "
                    "one was publishing; this run's output was not published and nothing was deleted"
                ) from None
            self._finish(manifest, doc, list(keys.values()), str(put["ETag"]))
        except (DestinationError, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("publish the output", exc) from None

    def _finish(
        self, previous: dict[str, Any] | None, manifest: dict[str, Any], copied: list[str], manifest_etag: str | None
    ) -> None:
        """After the manifest: delete what it replaced and the staged parts it copied. Even a run that lost the pipeline
        while paused may do this: the parts ``previous`` named and this manifest does not, and the staged copies of
        parts it names, are needed by nobody once it is committed.

        Anything else not named (copies of a publish that crashed, replays, staging of runs that died before their
        first checkpoint) is removed only while this run still owns the pipeline, and only if it is not newer than
        the manifest by the server's clock: a run that owned the pipeline when it committed the manifest owned it
        before too, so everything older is its own or an abandoned run's, while anything a later run wrote is
        newer, even if this process was paused between the check and the delete."""
        keep = set(manifest.get("parts", []))
        if previous is not None:
            self._delete([self.output + name for name in previous.get("parts", []) if name not in keep])
        self._delete(copied)
        if self.fence is None or manifest_etag is None:
            return
        # When this manifest was committed, by the server's clock: read now, before the ownership check, and only if it
        # is still this manifest (a later publish means a later run, whose objects are not this run's to judge).
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.output + MANIFEST, IfMatch=manifest_etag)
        except Exception as exc:  # noqa: BLE001
            if is_precondition_failed(exc) or is_missing(exc):
                return
            raise
        self.fence()
        # A later run takes the pipeline only once this run's lease has gone unrenewed for lease_seconds (at least
        # 10 s), so all it writes is at least that much newer than this manifest; 2 s covers whole-second timestamps.
        horizon = head["LastModified"] + dt.timedelta(seconds=2)

        def old(o: S3Object) -> bool:
            return o.last_modified is not None and o.last_modified <= horizon

        # only names a publish of conduit's gives: `part-notes.txt` or `part-x/y.csv` put there by someone else is not ours
        outputs = [o.key for o in list_objects(self.client, self.bucket, self.output + "part-") if old(o)]
        self._delete([k for k in outputs if _OUTPUT_PART_RE.match(k[len(self.output) :]) and k[len(self.output) :] not in keep])
        self._abort_uploads(self.staging, before=horizon)
        self._delete([o.key for o in list_objects(self.client, self.bucket, self.staging) if old(o)])

    def count(self) -> int | None:
        manifest = self.manifest()
        if manifest is None:
            return None

        def rows(name: str) -> int:
            key = self.output + name
            if self.spec.format == "parquet":
                size = int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
                return count_rows("parquet", RangeReader(self.client, self.bucket, key, size))
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            if self.spec.format == "jsonl":
                return sum(1 for _ in body.iter_lines())
            return count_rows("csv", body)

        with ThreadPoolExecutor(max_workers=8) as pool:
            return sum(pool.map(rows, manifest.get("parts", [])))


# --- the backend: ingest.yml `type: s3` --------------------------------------------------------------------------


def _parse(e: _Entry, file: Path, name: str) -> S3DestinationSpec:
    e.finish(_KEYS)
    return S3DestinationSpec(
        name=name,
        bucket=bucket_name(e, e.text("bucket")),
        prefix=key_prefix(e),
        format=e.choice("format", FORMATS, default="parquet"),
        s3=s3_connection(e),
    )


def _check(dest: S3DestinationSpec) -> str:
    """`conduit validate`: the bucket can be listed."""
    client = make_client(dest.s3)
    try:
        client.list_objects_v2(Bucket=dest.bucket, MaxKeys=1)  # names a missing bucket (HEAD only says 404)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types; each is explained
        raise DestinationError(
            f"destination {dest.name!r}: {explain(exc, bucket=dest.bucket, endpoint=dest.s3.endpoint_url)}"
        ) from None
    return f"{dest.uri('<resource>')} ({dest.format})"


def _leftover(destination_id: str, state: dict[str, Any], pipeline: str) -> list[str] | None:
    """A partition's staged generation (its prefix below ``_conduit_staging/<pipeline>.<key>/``), when its checkpoint
    is cleared (see ``layout.cleared_partition``)."""
    cleared = cleared_partition(destination_id, "s3://", state, pipeline)
    if cleared is None:
        return None
    base, key, generation = cleared
    output = destination_id.partition("?format=")[0]  # s3://bucket/prefix/<pipeline>/
    if not output.endswith(f"/{base}/"):
        return None
    staged = f"{output[: -len(base) - 1]}{STAGING}/{pipeline}/{generation}/"
    return leftover_lines(staged, key, f"aws s3 rm --recursive {staged}")


_KEYS = frozenset({"name", "type", "bucket", "prefix", "format"} | S3_KEYS)
BACKEND = register_destination_backend(
    DestinationBackend(
        type="s3",
        keys=_KEYS,
        parse=_parse,
        open=S3Destination,
        identity=lambda d, pipeline: f"{d.uri(pipeline)}?format={d.format}&endpoint={d.s3.endpoint_url or ''}",
        uri=lambda d, pipeline: d.uri(pipeline),
        kinds=lambda d: {FORMAT_KINDS[d.format], "s3"},
        check=_check,
        uses_s3=lambda d: True,
        leftover=_leftover,
        partitioned=True,
    )
)
