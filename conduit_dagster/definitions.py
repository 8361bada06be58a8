"""build_definitions(path) and the module-level ``defs`` that workspace.yaml loads.

The ingest.yml read is $CONDUIT_INGEST_FILE, else the ingest.yml beside workspace.yaml (found by
walking up from the working directory), else ./ingest.yml.
"""

import os
from pathlib import Path

from dagster import Definitions
from dagster_aws.s3 import S3Resource

from conduit_dagster.assets import build_ingest_assets, build_ingest_checks, build_ingest_jobs
from conduit_dagster.automation import build_ingest_schedules, build_ingest_sensors
from conduit_dagster.engine.spec import INGEST_FILE_ENV, load_spec
from conduit_dagster.resources import checkpoint_resource


def find_spec_path(start: Path | None = None) -> Path:
    override = os.environ.get(INGEST_FILE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "workspace.yaml").is_file() or (folder / "ingest.yml").is_file():
            return folder / "ingest.yml"
    return here / "ingest.yml"


def build_definitions(path: str | os.PathLike[str]) -> Definitions:
    spec = load_spec(path)
    jobs = build_ingest_jobs(spec)
    return Definitions(
        assets=build_ingest_assets(spec),
        asset_checks=build_ingest_checks(spec),
        jobs=jobs,
        schedules=build_ingest_schedules(spec, jobs),
        sensors=build_ingest_sensors(spec, jobs),
        resources={"checkpoints": checkpoint_resource(spec), "s3": S3Resource()},
    )


defs = build_definitions(find_spec_path())
