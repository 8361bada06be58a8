"""The UI path in a real browser: headless Chromium (Debian's package, driven by Playwright) opens a
failed run's page, clicks "Re-execute" > "From failure", and the new run resumes with exact data."""

import re
import shutil

import pytest

from conduit_dagster_tests.helpers import assert_same_rows, output_rows
from conduit_dagster_tests.test_postgres_resume import source_rows
from conduit_dagster_tests.test_ui_graphql import dagster_ui  # noqa: F401 - the fixture

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.mark.parametrize("dagster_ui", [False], indirect=True)
def test_browser_reexecute_from_failure(dagster_ui, tmp_path, pg_schema, postgres_dsn):  # noqa: F811
    import os

    if not shutil.which("chromium") and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it; CI never skips this test)")
    from playwright.sync_api import expect, sync_playwright

    ui = dagster_ui
    ui.flag.touch()
    failed = ui.launch("ingest_events")
    assert ui.wait(failed) == "FAILURE"
    base = f"http://127.0.0.1:{ui.port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # the page loads a telemetry script from the internet: only our server is reachable
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
            page.goto(f"{base}/runs/{failed}")
            reexecute = page.get_by_role("button", name=re.compile(r"^Re-execute all"))
            expect(reexecute).to_be_enabled(timeout=60_000)
            menu = reexecute.locator("xpath=following::button[1]")
            expect(menu).to_be_enabled(timeout=30_000)
            menu.click()
            page.get_by_role("menuitem", name=re.compile(r"From failure$")).click()
            page.wait_for_url(re.compile(rf"{base}/runs/(?!{failed})[0-9a-f-]{{36}}"), timeout=60_000)
            page.screenshot(path=str(tmp_path / "after-click.png"))
            new_run = page.url.rsplit("/runs/", 1)[1].split("?")[0].split("/")[0]
        finally:
            browser.close()
    assert new_run != failed
    tags = {t["key"]: t["value"] for r in ui.runs() if r["runId"] == new_run for t in r["tags"]}
    assert tags.get("dagster/parent_run_id") == failed and tags.get("dagster/is_resume_retry") == "true", tags
    assert ui.wait(new_run) == "SUCCESS"
    assert_same_rows(source_rows(postgres_dsn, pg_schema), output_rows(tmp_path / "out" / "events"))
    assert not (ui.checkpoints / "events.json").exists()
