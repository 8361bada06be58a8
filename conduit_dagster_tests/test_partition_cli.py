"""The `conduit` command and `python -m conduit_dagster.engine` on partitioned pipelines: run --partition /
--all-partitions, checkpoints per partition, checkpoints clear, plan."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conduit_dagster.engine.checkpoint import LocalCheckpointStore
from conduit_dagster.engine.partitions import resolve_partition
from conduit_dagster.engine.runner import BatchCommitted, run_pipeline
from conduit_dagster.engine.sources import open_source
from conduit_dagster.engine.spec import load_spec
from conduit_dagster_tests.helpers import assert_same_rows
from conduit_dagster_tests.test_partition_dagster import DAYS, day_rows, make_shop, partition_output, source_rows

CONDUIT = str(Path(sys.executable).with_name("conduit"))


def conduit(*args: str, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if home is not None:
        env["DAGSTER_HOME"] = str(home)
    return subprocess.run([CONDUIT, *args], cwd=cwd, capture_output=True, text=True, env=env)


def engine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conduit_dagster.engine", "run", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    return make_shop(tmp_path)


def interrupt(shop: Path, pipeline: str, key: str, batches: int = 2) -> None:
    """A partition run that stops after ``batches`` committed batches, as a killed run would."""
    spec = load_spec(shop)
    resource = spec.resource(pipeline)
    store = LocalCheckpointStore(shop.parent / ".checkpoints")
    partition = resolve_partition(resource, key, store, lambda: open_source(resource.source))
    run = run_pipeline(resource, store, run_id=f"crashed-{key}", partition=partition)
    for event in run:
        if isinstance(event, BatchCommitted) and event.index == batches - 1:
            break
    run.close()


def test_run_of_a_partitioned_pipeline_names_its_keys_and_the_flags(shop, tmp_path):
    out = conduit("run", "--pipeline", "daily", cwd=tmp_path)
    assert out.returncode == 1
    message = out.stderr.strip()
    assert message.startswith("error: pipeline 'daily' is partitioned (daily windows on created")
    assert "5 partitions, 2024-01-01 .. 2024-01-05" in message
    assert "--partition KEY (repeatable)" in message and "--all-partitions" in message
    assert "Traceback" not in out.stderr
    ranged = conduit("run", "--pipeline", "ranged", cwd=tmp_path)
    assert "4 partitions, r00 .. r03" in ranged.stderr and ranged.returncode == 1
    # the whole file: every pipeline is checked before anything runs
    everything = conduit("run", cwd=tmp_path)
    assert everything.returncode == 1 and "pipeline 'daily' is partitioned" in everything.stderr
    assert not (tmp_path / "lake").exists()
    unknown = conduit("run", "--pipeline", "daily", "--partition", "2024-02-30", cwd=tmp_path)
    assert unknown.returncode == 1
    assert "'2024-02-30' is not among its partitions (5 partitions, 2024-01-01 .. 2024-01-05)" in unknown.stderr
    past_end = conduit("run", "--pipeline", "daily", "--partition", "2024-01-06", cwd=tmp_path)
    assert "past the pipeline's partitions end" in past_end.stderr
    bad_range = conduit("run", "--pipeline", "ranged", "--partition", "r4", cwd=tmp_path)
    assert "'r4' is not among its partitions (4 partitions, r00 .. r03)" in bad_range.stderr
    plain = conduit("run", "--pipeline", "orders", "--partition", "r00", cwd=tmp_path)
    assert plain.returncode == 1 and "pipeline 'orders' has no partitions: run it without --partition" in plain.stderr
    both = conduit("run", "--pipeline", "ranged", "--partition", "r00", "--all-partitions", cwd=tmp_path)
    assert "give either --partition KEY or --all-partitions, not both" in both.stderr
    assert not (tmp_path / "lake").exists()


def test_run_partitions_through_dagster_and_every_partition(shop, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = conduit("run", "--pipeline", "daily", "--partition", "2024-01-04", "--partition", "2024-01-02", cwd=tmp_path, home=home)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "daily partition 2024-01-02: 48 rows this run (48 in total)" in out.stdout
    assert "48 rows in the partition" in out.stdout
    assert out.stdout.count(": success") == 2  # one run per partition (backfill: multi_run)
    for key in ("2024-01-02", "2024-01-04"):
        assert_same_rows(day_rows(tmp_path, key), partition_output(tmp_path, "daily", key))
    assert not (tmp_path / "lake" / "daily" / "2024-01-03").exists()
    ranged = conduit("run", "--pipeline", "ranged", "--pipeline", "orders", "--all-partitions", cwd=tmp_path, home=home)
    assert ranged.returncode == 0, ranged.stdout + ranged.stderr
    assert "(ranged r00 .. r03): success" in ranged.stdout  # backfill: single_run: the four in one run
    assert "orders: 240 rows this run" in ranged.stdout  # an unpartitioned pipeline runs whole
    rows = [row for key in ("r00", "r01", "r02", "r03") for row in partition_output(tmp_path, "ranged", key)]
    assert_same_rows(source_rows(tmp_path), rows)
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_materialized_partitions(AssetKey("daily")) == {"2024-01-02", "2024-01-04"}
        assert instance.get_materialized_partitions(AssetKey("ranged")) == {"r00", "r01", "r02", "r03"}
        assert len(instance.get_runs()) == 4


def test_checkpoints_are_listed_per_partition_resumed_and_cleared(shop, tmp_path):
    interrupt(shop, "daily", "2024-01-02")
    interrupt(shop, "daily", "2024-01-03", batches=3)
    listed = conduit("checkpoints", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *lines = [ln for ln in listed.stdout.splitlines() if ln.startswith(("pipeline", "daily"))]
    assert header.split()[:3] == ["pipeline", "partition", "column"]
    rows = {ln.split()[1]: ln.split() for ln in lines}
    assert rows["2024-01-02"][:6] == ["daily", "2024-01-02", "id", "68", "int", "20"]
    assert rows["2024-01-03"][:6] == ["daily", "2024-01-03", "id", "126", "int", "30"]
    assert "crashed-2024-01-02" in listed.stdout
    only = conduit("checkpoints", "--pipeline", "daily", "--partition", "2024-01-03", cwd=tmp_path)
    assert "2024-01-03" in only.stdout and "2024-01-02" not in only.stdout

    # the engine alone resumes a partition from its own checkpoint, with the same flags
    resumed = engine("--pipeline", "daily", "--partition", "2024-01-02", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "daily.2024-01-02: resuming after 68" in resumed.stdout and "28 rows this run, 48 in total" in resumed.stdout
    assert_same_rows(day_rows(tmp_path, "2024-01-02"), partition_output(tmp_path, "daily", "2024-01-02"))
    missing = engine("--pipeline", "daily", cwd=tmp_path)
    assert missing.returncode == 1 and "--partition KEY (repeatable)" in missing.stderr

    no_pipeline = conduit("checkpoints", "clear", "--partition", "2024-01-03", cwd=tmp_path)
    assert no_pipeline.returncode == 1 and "--partition needs --pipeline" in no_pipeline.stderr
    cleared = conduit("checkpoints", "clear", "--pipeline", "daily", "--partition", "2024-01-03", cwd=tmp_path)
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared daily partition 2024-01-03" in cleared.stdout and "loads that partition in full" in cleared.stdout
    assert not (tmp_path / ".checkpoints" / "daily.2024-01-03.json").exists()
    again = conduit("checkpoints", "clear", "--pipeline", "daily", "--partition", "2024-01-03", cwd=tmp_path)
    assert "no checkpoint for daily partition 2024-01-03" in again.stdout
    assert "no checkpoints in" in conduit("checkpoints", cwd=tmp_path).stdout
    # the next run of the cleared partition loads it whole, over what its unfinished run had staged
    full = engine("--pipeline", "daily", "--partition", "2024-01-03", cwd=tmp_path)
    assert full.returncode == 0 and "daily.2024-01-03: full load" in full.stdout
    assert_same_rows(day_rows(tmp_path, "2024-01-03"), partition_output(tmp_path, "daily", "2024-01-03"))


def test_clear_checkpoints_by_pipeline_name_clears_its_partitions(shop, tmp_path):
    interrupt(shop, "daily", "2024-01-01")
    interrupt(shop, "daily", "2024-01-05")
    cleared = conduit("clear-checkpoints", "--pipeline-name", "daily", cwd=tmp_path)
    assert cleared.returncode == 0
    assert "cleared daily partition 2024-01-01" in cleared.stdout and "cleared daily partition 2024-01-05" in cleared.stdout
    interrupt(shop, "daily", "2024-01-02")
    # the way out a partition's checkpoint error names: `conduit clear-checkpoints --pipeline-name daily.2024-01-02`
    single = conduit("clear-checkpoints", "--pipeline-name", "daily.2024-01-02", cwd=tmp_path)
    assert "cleared daily partition 2024-01-02" in single.stdout
    assert not list((tmp_path / ".checkpoints").glob("daily*.json"))


def test_plan_replans_key_ranges_and_is_refused_while_a_partition_holds_a_checkpoint(shop, tmp_path):
    windows = conduit("plan", "--pipeline", "daily", cwd=tmp_path)
    assert windows.returncode == 1 and "split into daily windows on created" in windows.stderr
    assert "which need no plan" in windows.stderr
    plain = conduit("plan", "--pipeline", "orders", cwd=tmp_path)
    assert "pipeline 'orders' has no partitions: there is nothing to plan" in plain.stderr

    first = conduit("plan", "--pipeline", "ranged", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "(no plan)" in first.stdout and "r00 [-inf, " in first.stdout and ", +inf)" in first.stdout
    assert "rows seen: 240 now (none before)" in first.stdout
    plan = json.loads((tmp_path / ".checkpoints" / "ranged.plan.json").read_text())
    assert plan["ranges"] == 4 and len(plan["boundaries"]) == 3 and plan["rows_seen"] == 240

    interrupt(shop, "ranged", "r01", batches=1)
    refused = conduit("plan", "--pipeline", "ranged", cwd=tmp_path)
    assert refused.returncode == 1
    assert "partitions r01 hold checkpoints" in refused.stderr and "conduit checkpoints" in refused.stderr
    assert json.loads((tmp_path / ".checkpoints" / "ranged.plan.json").read_text()) == plan  # unchanged
    assert conduit("checkpoints", "clear", "--pipeline", "ranged", cwd=tmp_path).returncode == 0

    conn = sqlite3.connect(tmp_path / "shop.db")  # the table grows: the quantiles move
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, "2024-01-06 00:00:00", 1.0) for i in range(241, 481)])
    conn.commit()
    conn.close()
    second = conduit("plan", "--pipeline", "ranged", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    old_first = f"r00 [-inf, {plan['boundaries'][0]['value']})"
    lines = second.stdout.splitlines()
    assert any(line.startswith(old_first) for line in lines)  # old and new side by side
    assert "rows seen: 480 now (from 240 rows" in second.stdout
    assert "warning: the boundaries moved" in second.stdout and "--all-partitions" in second.stdout
    assert json.loads((tmp_path / ".checkpoints" / "ranged.plan.json").read_text())["rows_seen"] == 480
    listed = conduit("checkpoints", cwd=tmp_path)
    assert "plan ranged: 4 key ranges on id" in listed.stdout and "from 480 rows" in listed.stdout

    # fewer ranges: what the dropped partitions published stays, and the command says so
    shop.write_text(shop.read_text().replace("ranges: 4", "ranges: 2"))
    fewer = conduit("plan", "--pipeline", "ranged", cwd=tmp_path)
    assert fewer.returncode == 0, fewer.stderr
    assert "warning: partitions r02, r03 no longer exist" in fewer.stdout


def test_validate_describes_partitioned_pipelines(shop, tmp_path):
    interrupt(shop, "daily", "2024-01-04")
    out = conduit("validate", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "resource daily: ok, shop -> lake, 3 columns, batches of 10, partitioned: daily windows on created from "
        "2024-01-01T00:00:00+01:00 to 2024-01-06T00:00:00+01:00 (Europe/Berlin) (5 partitions, 2024-01-01 .. 2024-01-05), "
        "1 partition(s) with an unfinished run (2024-01-04), backfill multi_run"
    ) in out.stdout
    assert "resource ranged: ok" in out.stdout and "not planned yet (the first partition run plans it" in out.stdout
    assert DAYS[0] in out.stdout
