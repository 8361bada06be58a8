"""Local checkpoints are refused for runs whose next run may start on another machine (a remote run launcher or
executor): there the checkpoint directory, its key-range plans and its locks are not, and a retry would start over."""

from pathlib import Path

import pytest
from dagster import DagsterInstance

from conduit_dagster.engine.checkpoint import LocalCheckpointStore, MemoryCheckpointStore
from conduit_dagster.engine.errors import SpecError
from conduit_dagster.resources import SHARED_CHECKPOINT_DIR_ENV, check_store_reach, run_launcher_name


def test_the_launcher_is_read_from_dagster_yaml_without_building_it(tmp_path: Path) -> None:
    # dagster-k8s is not installed: building this launcher would fail, reading its name must not
    (tmp_path / "dagster.yaml").write_text(
        "run_launcher:\n  module: dagster_k8s\n  class: K8sRunLauncher\n  config: {}\ntelemetry:\n  enabled: false\n"
    )
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert run_launcher_name(instance) == "K8sRunLauncher"
    other = tmp_path / "plain"
    other.mkdir()
    (other / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(other)) as instance:
        assert run_launcher_name(instance) == "DefaultRunLauncher"
    with DagsterInstance.ephemeral() as instance:
        assert run_launcher_name(instance) == "SyncInMemoryRunLauncher"


def test_local_checkpoints_are_refused_under_a_remote_launcher_or_executor(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SHARED_CHECKPOINT_DIR_ENV, raising=False)
    local = LocalCheckpointStore(tmp_path / "cp")
    check_store_reach(local, "DefaultRunLauncher", "multi_or_in_process_executor")  # one machine: fine
    check_store_reach(local, None, "in_process")  # `dagster job execute`: runs where it was started
    with pytest.raises(SpecError) as info:
        check_store_reach(local, "K8sRunLauncher", "multi_or_in_process_executor")
    message = str(info.value)
    assert f"local directory {tmp_path / 'cp'}" in message and "run launcher K8sRunLauncher" in message
    assert "$CONDUIT_CHECKPOINTS=s3://bucket/prefix" in message and "Nothing was read or written" in message
    with pytest.raises(SpecError, match="executor celery"):
        check_store_reach(local, "DefaultRunLauncher", "celery")
    check_store_reach(MemoryCheckpointStore(), "K8sRunLauncher", "celery")  # not a local directory
    monkeypatch.setenv(SHARED_CHECKPOINT_DIR_ENV, "1")  # the operator says every worker mounts it
    check_store_reach(local, "K8sRunLauncher", "multi_or_in_process_executor")
