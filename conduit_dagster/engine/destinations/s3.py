"""S3: part files per batch, staged under a generation and published under the resource's prefix.

Layout for ``bucket: lake``, ``prefix: raw`` and pipeline ``orders``::

    s3://lake/raw/orders/part-<gen>-000000.parquet ...   the visible output: a finished run's parts
    s3://lake/raw/orders/_conduit_manifest.json          which parts make the output (readers skip '_')
    s3://lake/raw/_conduit_staging/orders/<gen>/part-000000.parquet
                                                         a run in progress (readers skip '_' folders)

A batch's key is fixed by its index, so a batch replayed after a crash overwrites its own object;
a PUT (or a completed multipart upload) appears whole, so a reader never sees half an object.
S3 has no atomic rename of many objects: publishing copies the staged parts into the output
(server-side), then writes the manifest (the commit point: one atomic PUT), then deletes the
previous output's parts. A reader that lists the prefix during those seconds may see old and new
parts together; a reader that follows the manifest never does. A crash anywhere is finished by
the resumed run.
"""

import datetime as dt
import json
import re
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from conduit_dagster.engine.destinations.base import Resumption
from conduit_dagster.engine.destinations.formats import EXTENSIONS, count_rows, write_part
from conduit_dagster.engine.errors import CheckpointError, DestinationError
from conduit_dagster.engine.s3 import (
    RangeReader,
    endpoint_of,
    explain,
    is_missing,
    is_precondition_failed,
    join_key,
    list_objects,
    make_client,
)
from conduit_dagster.engine.spec import S3DestinationSpec

MANIFEST = "_conduit_manifest.json"
STAGING = "_conduit_staging"
MULTIPART_BYTES = 16 * 1024 * 1024  # parts larger than this go up in 16 MiB pieces, 4 at a time
_PART_RE = re.compile(r"^part-(\d{6})\.")


class S3Destination:
    def __init__(
        self,
        spec: S3DestinationSpec,
        pipeline: str,
        *,
        accumulate: bool = False,
        client: Any = None,
        multipart_bytes: int = MULTIPART_BYTES,
    ) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.accumulate = accumulate
        self.client = client if client is not None else make_client(spec.s3)
        self.bucket = spec.bucket
        self.output = join_key(spec.prefix, pipeline) + "/"
        self.staging = join_key(spec.prefix, STAGING, pipeline) + "/"
        self.ext = EXTENSIONS[spec.format]
        self.generation: str | None = None
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

    def _part_key(self, index: int) -> str:
        return f"{self._gen_prefix}part-{index:06d}.{self.ext}"

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

    def _abort_uploads(self, prefix: str) -> None:
        """Incomplete multipart uploads of a crashed run hold storage (and cost) until aborted."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def manifest(self) -> dict[str, Any] | None:
        return self._manifest_etag()[0]

    def _parse_manifest(self, body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("parts", []), list):
                raise ValueError("not a manifest object")
        except ValueError as exc:
            raise DestinationError(
                f"destination {self.spec.name!r}: s3://{self.bucket}/{self.output}{MANIFEST} is damaged ({exc}); it names "
                "the parts of the output. Restore it, or delete the output prefix for a full reload. Nothing was changed"
            ) from None
        return doc

    def _check_output_is_ours(self, manifest: dict[str, Any] | None) -> None:
        if manifest is not None:
            return
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.output, MaxKeys=1)
        if page.get("KeyCount", 0):
            raise DestinationError(
                f"destination {self.spec.name!r}: s3://{self.bucket}/{self.output} holds objects conduit did not write "
                f"(no {MANIFEST}), and publishing would replace them; move them away or set another prefix. Nothing was changed"
            )

    def start(self, state: dict[str, Any] | None, committed: int = 0) -> Resumption:
        try:
            manifest = self.manifest()
            self._check_output_is_ours(manifest)
            if state is None:
                return self._start_fresh()
            return self._resume(state, committed, manifest)
        except (DestinationError, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("prepare the output", exc) from None

    def _start_fresh(self) -> Resumption:
        # Staging left by runs that died before their first checkpoint is removed after this run publishes, not
        # now: a run that lost the pipeline while paused must never delete the staged parts of the run that owns it.
        self.generation = uuid.uuid4().hex
        return Resumption({"generation": self.generation})

    def _resume(self, state: dict[str, Any], committed: int, manifest: dict[str, Any] | None) -> Resumption:
        generation = state.get("generation")
        if not isinstance(generation, str) or not generation.isalnum():
            raise CheckpointError(f"pipeline {self.pipeline!r}: the checkpoint names no valid output generation")
        self.generation = generation
        if manifest is not None and generation in manifest.get("generations", []):
            # Crashed after the manifest named this run's parts, before the checkpoint was deleted: finish the clean-up.
            self._finish(manifest)
            return Resumption(state, already_published=True)
        self._abort_uploads(self._gen_prefix)
        staged = self._keys(self._gen_prefix)
        missing = self._missing(self._staged(staged), committed)
        if missing:
            raise CheckpointError(
                f"pipeline {self.pipeline!r}: {len(missing)} committed part(s) of the unfinished output are missing from "
                f"s3://{self.bucket}/{self._gen_prefix} (e.g. part {missing[0]}), so it cannot be resumed; start over with "
                f"`conduit clear-checkpoints --pipeline-name {self.pipeline}`"
            )
        # Parts written after the last checkpoint are replays-to-be: drop them so that a source that now
        # yields fewer batches cannot leave stale rows behind.
        stale = [k for k in staged if (m := _PART_RE.match(k[len(self._gen_prefix) :])) is None or int(m.group(1)) >= committed]
        self._delete(stale)
        return Resumption(state)

    def _staged(self, keys: list[str] | None = None) -> dict[int, str]:
        """This generation's staged parts (from ``keys`` if listed already): batch index -> key."""
        keys = self._keys(self._gen_prefix) if keys is None else keys
        return {int(m.group(1)): k for k in keys if (m := _PART_RE.match(k[len(self._gen_prefix) :]))}

    @staticmethod
    def _missing(staged: dict[int, str], count: int) -> list[int]:
        return [i for i in range(count) if i not in staged]

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

    def publish(self, batches: int | None = None) -> None:
        """Copy parts 0..batches-1 into the output, then commit them with one conditional PUT of the manifest.

        Every step is safe even when run by a process that lost the pipeline while paused: a committed part that is
        missing stops the publish loudly; a generation the manifest already names is left alone; and the manifest is
        written only if nobody changed it since this publish read it, so two publishers can never both commit."""
        assert self.generation is not None
        try:
            manifest, etag = self._manifest_etag()
            self._check_output_is_ours(manifest)
            if manifest is not None and self.generation in manifest.get("generations", []):
                return  # already published (by a resumed run of this generation): nothing left to do
            staged = self._staged()
            count = len(staged) if batches is None else batches
            missing = self._missing(staged, count)
            if missing:
                raise DestinationError(
                    f"destination {self.spec.name!r}: {len(missing)} committed part(s) of this run are missing from "
                    f"s3://{self.bucket}/{self._gen_prefix} (e.g. part {missing[0]}), so its output was not published; "
                    f"another process may have removed them. Start over with `conduit clear-checkpoints --pipeline-name "
                    f"{self.pipeline}`"
                )
            keys = [staged[i] for i in range(count)]
            names = [f"part-{self.generation[:12]}-{k[len(self._gen_prefix) :].removeprefix('part-')}" for k in keys]

            def copy(pair: tuple[str, str]) -> None:
                source, name = pair
                self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, self.output + name, Config=self.transfer)

            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="conduit-publish") as pool:
                list(pool.map(copy, zip(keys, names, strict=True)))
            previous = manifest or {}
            parts = (list(previous.get("parts", [])) + names) if self.accumulate else names
            generations = (list(previous.get("generations", [])) + [self.generation]) if self.accumulate else [self.generation]
            doc = {
                "format_version": 1,
                "pipeline": self.pipeline,
                "format": self.spec.format,
                "generation": self.generation,
                "generations": generations[-1000:],
                "parts": parts,
                "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            body = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self.output + MANIFEST, Body=body, ContentType="application/json", **condition
                )
            except Exception as exc:  # noqa: BLE001
                if not is_precondition_failed(exc):
                    raise
                raise DestinationError(
                    f"destination {self.spec.name!r}: another run published s3://{self.bucket}/{self.output} while this "
                    "one was publishing; this run's output was not published and nothing was deleted"
                ) from None
            self._finish(doc)
        except (DestinationError, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("publish the output", exc) from None

    def _finish(self, manifest: dict[str, Any]) -> None:
        """After the manifest: drop the parts it does not name, and everything staged for this pipeline (this run's
        parts, and those of runs that died before their first checkpoint)."""
        keep = set(manifest.get("parts", []))
        old = [k for k in self._keys(self.output + "part-") if k[len(self.output) :] not in keep]
        self._delete(old)
        self._abort_uploads(self.staging)
        self._delete(self._keys(self.staging))

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
