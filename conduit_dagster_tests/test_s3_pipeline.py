"""PostgreSQL to S3 Parquet with checkpoints in S3, end to end through Dagster, against a real S3 endpoint
(moto's server on 127.0.0.1): a failure re-executed from failure, a SIGKILL then a fresh run, and bad input.
"""

import json
import os
import random
import signal
import time

import pytest
from dagster import DagsterInstance, ReexecutionOptions, build_reconstructable_job, execute_job, instance_for_test

from conduit_dagster_tests.conftest import s3_keys, write_ingest
from conduit_dagster_tests.helpers import assert_same_rows, s3_output_rows
from conduit_dagster_tests.test_postgres_resume import _dagster_env, _job_execute, make_table, source_rows


def ingest_text(schema: str, endpoint: str, bucket: str, *, batch: int = 500, lease: int = 60, dest_bucket: str = "") -> str:
    return f"""
checkpoints:
  type: s3
  bucket: {bucket}
  prefix: conduit/checkpoints
  endpoint_url: {endpoint}
  lease_seconds: {lease}
sources:
  - name: pg
    type: postgresql
    host: 127.0.0.1
    database: test
    user: postgres
    schema: {schema}
    resume: true
    checkpoint_column: id
destinations:
  - name: data_lake_s3
    type: s3
    bucket: {dest_bucket or bucket}
    prefix: raw/shop
    endpoint_url: {endpoint}
resources:
  - name: events
    source: pg
    destination: data_lake_s3
    batch_size: {batch}
    query: SELECT id, ts, kind, amount, payload::text AS payload, note FROM events
"""


CHECKPOINT = "conduit/checkpoints/events.json"
OUTPUT = "raw/shop/events/"


def checkpoint_doc(s3, bucket: str) -> dict | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=CHECKPOINT)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def latest_metadata(instance: DagsterInstance) -> dict:
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("events"))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_fail_then_reexecute_from_failure_lands_exactly_the_source_rows(
    tmp_path, pg, pg_schema, postgres_dsn, s3, s3_endpoint, bucket
):
    make_table(pg, pg_schema, rows=8_000)
    ingest = write_ingest(tmp_path, ingest_text(pg_schema, s3_endpoint, bucket))
    flag = tmp_path / "fail.flag"
    fail_at = 6
    job = build_reconstructable_job(
        "conduit_dagster_tests.injected_defs",
        "build_s3_job",
        reconstructable_args=(str(ingest), fail_at, str(flag), "ingest_events"),
    )
    with instance_for_test() as instance:
        # 1. a complete first load: the output readers keep seeing while the next load runs
        assert execute_job(job, instance=instance).success
        old = source_rows(postgres_dsn, pg_schema)
        assert_same_rows(old, s3_output_rows(s3, bucket, OUTPUT))
        assert checkpoint_doc(s3, bucket) is None

        # 2. the source changes; the next load fails after 4 committed batches
        with pg.cursor() as cur:
            cur.execute(f"DELETE FROM {pg_schema}.events WHERE id % 5 = 0")
            cur.execute(f"UPDATE {pg_schema}.events SET kind = 'changed' WHERE id % 3 = 0")
        flag.touch()
        failed = execute_job(job, instance=instance, raise_on_error=False)
        assert not failed.success
        doc = checkpoint_doc(s3, bucket)
        assert doc is not None and doc["pipeline"] == "events" and doc["run_id"] == failed.run_id
        assert doc["batches_committed"] == fail_at - 2  # save 1 is the checkpoint taken before the first batch
        assert doc["last_value"]["type"] == "int" and int(doc["last_value"]["value"]) > 0
        assert doc["destination_id"].startswith(f"s3://{bucket}/raw/shop/events/")
        assert_same_rows(old, s3_output_rows(s3, bucket, OUTPUT))  # still the previous complete output
        staged = [k for k in s3_keys(s3, bucket, "raw/shop/_conduit_staging/events/") if "/part-" in k]
        assert len(staged) >= doc["batches_committed"]

        # 3. re-execute from failure: it resumes from the S3 checkpoint
        flag.unlink()
        resumed = execute_job(
            job, instance=instance, reexecution_options=ReexecutionOptions.from_failure(failed.run_id, instance)
        )
        assert resumed.success
        new = source_rows(postgres_dsn, pg_schema)
        assert_same_rows(new, s3_output_rows(s3, bucket, OUTPUT))
        assert checkpoint_doc(s3, bucket) is None
        assert s3_keys(s3, bucket, "conduit/checkpoints/") == []  # no lease left either
        assert s3_keys(s3, bucket, "raw/shop/_conduit_staging/") == []
        meta = latest_metadata(instance)
        assert meta["conduit/resumed"] is True
        assert meta["conduit/rows_this_run"] == len(new) - doc["records_processed"]
        assert meta["dagster/uri"] == f"s3://{bucket}/raw/shop/events/"


def test_sigkill_then_run_again_with_s3_checkpoints(tmp_path, pg, pg_schema, postgres_dsn, s3, s3_endpoint, bucket):
    make_table(pg, pg_schema, rows=30_000)
    # a lease far longer than the run takes even on a loaded machine: waiting for it to expire would show at once
    ingest = write_ingest(tmp_path, ingest_text(pg_schema, s3_endpoint, bucket, batch=300, lease=1800))
    env = _dagster_env(tmp_path, ingest, tmp_path / "unused-local-checkpoints")
    env.pop("CONDUIT_CHECKPOINT_DIR")  # ingest.yml's checkpoints: section puts them in S3
    log = tmp_path / "runs.log"
    target = random.Random().randint(2, 30)
    proc = _job_execute(env, log)
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        doc = checkpoint_doc(s3, bucket)
        if doc is not None and doc["batches_committed"] >= target:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the step runs in a child process
            killed_at = doc["batches_committed"]
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed_at is not None, f"the run ended before batch {target}: {log.read_text()[-3000:]}"
    assert checkpoint_doc(s3, bucket) is not None
    assert "conduit/checkpoints/events.lease.json" in s3_keys(s3, bucket)  # the dead run's lease is still there
    assert s3_keys(s3, bucket, OUTPUT) == [], "nothing may be visible before the run finishes"

    # The dead run was on this machine: its lease names a gone process, so the new run takes it over at once.
    started = time.monotonic()
    again = _job_execute(env, log)
    assert again.wait(timeout=900) == 0, log.read_text()[-5000:]
    assert time.monotonic() - started < 900, "the new run must not wait for the dead run's lease (1800 s) to expire"
    assert "resuming after" in log.read_text()
    assert_same_rows(source_rows(postgres_dsn, pg_schema), s3_output_rows(s3, bucket, OUTPUT))
    assert s3_keys(s3, bucket, "conduit/checkpoints/") == []


@pytest.mark.parametrize("broken", ["missing bucket", "endpoint down"])
def test_bad_destination_fails_clearly_and_keeps_the_checkpoint(tmp_path, pg, pg_schema, s3, s3_endpoint, bucket, broken):
    """A run that failed leaves a checkpoint; the destination's bucket then disappears, or its endpoint goes down: the
    next run fails with a message naming the pipeline, the destination and the fix, and the checkpoint stays byte for
    byte. The destination lives on a second S3 server so that one can be stopped."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    other = f"http://{host}:{port}"
    lake = boto3.client("s3", endpoint_url=other, region_name="us-east-1")
    lake.create_bucket(Bucket="lake")
    try:
        make_table(pg, pg_schema, rows=3_000)
        text = ingest_text(pg_schema, s3_endpoint, bucket, dest_bucket="lake")
        ingest = write_ingest(
            tmp_path,
            text.replace(
                f"bucket: lake\n    prefix: raw/shop\n    endpoint_url: {s3_endpoint}",
                f"bucket: lake\n    prefix: raw/shop\n    endpoint_url: {other}",
            ),
        )
        assert other in ingest.read_text()
        flag = tmp_path / "fail.flag"
        flag.touch()
        job = build_reconstructable_job(
            "conduit_dagster_tests.injected_defs",
            "build_s3_job",
            reconstructable_args=(str(ingest), 3, str(flag), "ingest_events"),
        )
        with instance_for_test() as instance:
            assert not execute_job(job, instance=instance, raise_on_error=False).success
        before = s3.get_object(Bucket=bucket, Key=CHECKPOINT)["Body"].read()
        if broken == "missing bucket":
            for key in s3_keys(lake, "lake"):
                lake.delete_object(Bucket="lake", Key=key)
            lake.delete_bucket(Bucket="lake")
        else:
            server.stop()
        flag.unlink()
        with instance_for_test() as instance:
            started = time.monotonic()
            result = execute_job(job, instance=instance, raise_on_error=False)
            assert not result.success
            assert time.monotonic() - started < 60
            failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            message = failures[0].step_failure_data.error.message
        assert "events:" in message and "destination 'data_lake_s3'" in message, message
        if broken == "missing bucket":
            assert "bucket 'lake'" in message and "does not exist" in message, message
        else:
            assert f"cannot reach the S3 endpoint {other}" in message, message
        assert "conduit-test-secret" not in message
        assert s3.get_object(Bucket=bucket, Key=CHECKPOINT)["Body"].read() == before
    finally:
        if broken == "missing bucket":
            server.stop()


def test_launchpad_config_switches_a_local_deployment_to_s3_checkpoints(
    tmp_path, pg, pg_schema, postgres_dsn, s3, s3_endpoint, bucket, monkeypatch
):
    """No checkpoints: section and no environment setting: the local store is bound. A run whose config sets
    `location: s3://...` (as the launchpad does) keeps its checkpoints in S3 instead."""
    from conduit_dagster.definitions import build_definitions
    from conduit_dagster.resources import LocalCheckpointStoreResource

    for var in ("CONDUIT_CHECKPOINTS", "CONDUIT_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)  # the usual AWS environment names the endpoint
    make_table(pg, pg_schema, rows=1_000)
    text = ingest_text(pg_schema, s3_endpoint, bucket)
    ingest = write_ingest(tmp_path, text[text.index("sources:") :])
    defs = build_definitions(ingest)
    assert isinstance(defs.resources["checkpoints"], LocalCheckpointStoreResource)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("ingest_events").execute_in_process(
            instance=instance,
            run_config={"resources": {"checkpoints": {"config": {"location": f"s3://{bucket}/from-launchpad"}}}},
        )
        assert result.success
        meta = latest_metadata(instance)
    assert meta["conduit/checkpoint_store"] == f"s3://{bucket}/from-launchpad/"
    assert not (tmp_path / ".checkpoints").exists() or not any((tmp_path / ".checkpoints").glob("*.json"))
    assert_same_rows(source_rows(postgres_dsn, pg_schema), s3_output_rows(s3, bucket, OUTPUT))


def test_data_lake_reached_through_the_s3_resource_with_env_credentials(
    tmp_path, pg, pg_schema, postgres_dsn, s3, s3_endpoint, bucket, monkeypatch
):
    """ingest.yml names only the bucket; the `s3` resource (dagster-aws S3Resource, here set in run config as the
    launchpad does, its credentials from environment variables) says how to reach it. Wrong credentials fail the run
    with the pipeline, the destination and the reason named, no secret shown and no checkpoint written."""
    import uuid

    import boto3

    from conduit_dagster.definitions import build_definitions
    from conduit_dagster_tests.test_s3_checkpoints import moto_checks_credentials

    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    user = f"lake-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    arn = iam.create_policy(PolicyName=f"{user}-s3", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName=user, PolicyArn=arn)
    for var in ("CONDUIT_CHECKPOINTS", "CONDUIT_CHECKPOINT_DIR", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LAKE_KEY_ID", key["AccessKeyId"])
    make_table(pg, pg_schema, rows=2_000)
    text = ingest_text(pg_schema, s3_endpoint, bucket)
    text = text[text.index("sources:") :].replace(
        f"    prefix: raw/shop\n    endpoint_url: {s3_endpoint}\n", "    prefix: raw/shop\n"
    )
    assert s3_endpoint not in text
    defs = build_definitions(write_ingest(tmp_path, text))
    run_config = {
        "resources": {
            "s3": {
                "config": {
                    "endpoint_url": s3_endpoint,
                    "aws_access_key_id": {"env": "LAKE_KEY_ID"},
                    "aws_secret_access_key": {"env": "LAKE_SECRET"},
                }
            }
        }
    }
    job = defs.resolve_job_def("ingest_events")
    with moto_checks_credentials(s3_endpoint), DagsterInstance.ephemeral() as instance:
        monkeypatch.setenv("LAKE_SECRET", "wrong-secret-never-shown")
        failed = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
        assert not failed.success
        message = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error.message
        assert "events:" in message and "destination 'data_lake_s3'" in message, message
        assert "credentials were rejected" in message and "SignatureDoesNotMatch" in message, message
        assert "wrong-secret-never-shown" not in message and key["AccessKeyId"] not in message
        assert not list((tmp_path / ".checkpoints").glob("events*.json"))

        monkeypatch.setenv("LAKE_SECRET", key["SecretAccessKey"])
        assert job.execute_in_process(instance=instance, run_config=run_config).success
    assert_same_rows(source_rows(postgres_dsn, pg_schema), s3_output_rows(s3, bucket, OUTPUT))
