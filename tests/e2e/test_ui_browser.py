"""Issue 15: the Prefect UI in a real browser, from the run form to the summary artifact.

A fresh ``prefect server start``, ``setup.py`` (the work pool), ``prefect deploy --all`` from the clone and a
process worker with APOLLO_API_KEY and no APOLLO_SYNC_HOME; the sandbox (in its own process) stands in for
Apollo. Headless Chromium (Debian's ``chromium``, driven by Playwright through ``executable_path``: Playwright's
own browser download needs a network this machine does not have) opens the ad hoc deployment's Custom run form,
checks that the parameter groups render as sections, fills the source, starts the run, and once the worker has
finished it finds the summary artifact on the run's Artifacts tab.

Screenshots of the form and of the finished run go to the test's tmp_path; with UPDATE_UI_SCREENSHOTS=1 they are
also copied to docs/ui-run-form.png and docs/ui-finished-run.png (README, "Running on Prefect").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from apollo_sync.sandbox import SandboxConfig, SandboxProcess

from prefect_server import ROOT, PrefectServer, prefect_cli, run_ok, start_worker, stop_process, wait_final

pytestmark = pytest.mark.e2e

POOL = "apollo-sync"
ADHOC = "sync-contacts/sync-contacts-adhoc"
SECTIONS = ["Source", "Cleaning", "Apollo", "Load", "Run"]
MAX_TOP_LEVEL_FIELDS = 8
VALID = 40
UI_TIMEOUT_MS = 30_000
"""Give-up timeout for one page element; the UI answers in well under a second on a quiet machine."""
RUN_TIMEOUT = 180.0
"""Give-up timeout for the worker to pick up and finish the run (about 10 s here)."""
DOCS = ROOT / "docs"
SCREENSHOTS = {"form": "ui-run-form.png", "finished": "ui-finished-run.png"}
UPDATE_SCREENSHOTS_ENV = "UPDATE_UI_SCREENSHOTS"
CHROMIUM_NAMES = ("chromium", "chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium executable; skips (or fails under CI_REQUIRE_SERVICES=1) when it or Playwright is missing.

    Asked for before ``prefect_server`` so a machine without a browser skips without starting a server.
    """
    path = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    missing = None if path else "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (a dev dependency: uv sync)"
    if missing:
        if os.environ.get("CI_REQUIRE_SERVICES") == "1":
            pytest.fail(missing + " (CI_REQUIRE_SERVICES=1)")
        pytest.skip(missing)
    return path


def _write_export(path: Path) -> set[str]:
    lines = ["First Name,Last Name,Email Address,Company"]
    lines += [f"P{i},Browser,ui{i}@example.com,Acme {i % 3}" for i in range(VALID)]
    lines.append("Bad,Email,not-an-email,Acme")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"ui{i}@example.com" for i in range(VALID)}


def _ui_base(server: PrefectServer) -> str:
    """The URL of the UI a browser gets by default (Prefect 3.9 serves the new UI under /v2 and the old one at /)."""
    with urllib.request.urlopen(f"{server.url}/ui-settings", timeout=10) as response:
        settings = json.load(response)
    base = settings.get(f"{settings['default_ui']}_base_url") or "/"
    return server.url + base.rstrip("/")


async def _deployment(server: PrefectServer):
    async with server.client() as client:
        return await client.read_deployment_by_name(ADHOC)


def _null_default_fields(schema: dict) -> list[str]:
    """Titles of the form's fields whose schema default is null.

    The run form (Prefect 3.9.1's default UI) starts such a field at null and submits the null, and the server's
    schema check refuses it (``None is not of type 'string'``): apollo_sync/params.py drops the null from each
    optional field's type (so the form shows no type picker) but keeps ``"default": null``. Until it leaves that
    default out, a person has to pick "Omit value" in each such field's menu, as this test does.
    """
    titles = []
    for group in schema["properties"].values():
        definition = schema["definitions"][group["$ref"].rsplit("/", 1)[-1]]
        titles += [f["title"] for f in definition["properties"].values() if "default" in f and f["default"] is None]
    return titles


def _label(title: str) -> re.Pattern[str]:
    """A field's label in the form: its title, followed by " (Optional)" unless it is required."""
    return re.compile(rf"^{re.escape(title)}( \(Optional\))?$")


_SECTIONS_JS = """
container => {
  const labels = [...container.querySelectorAll("label")];
  const nested = l => { const f = l.closest("fieldset"); return f !== null && container.contains(f); };
  return labels.filter(l => !nested(l)).map(l => {
    let group = l;   // the nearest ancestor holding nested fields: this field's own box, if it is a section
    while (group !== container && !group.querySelector("fieldset label")) group = group.parentElement;
    const fields = group === container ? [] : [...group.querySelectorAll("fieldset label")];
    return {title: l.textContent.trim().replace(/ \\(Optional\\)$/, ""), fields: fields.map(f => f.textContent.trim())};
  });
}
"""


async def _browse(chromium: str, ui: str, server: PrefectServer, deployment, values: dict[str, str], omit: list[str],
                  shots: Path) -> tuple[list[dict], str, str]:  # fmt: skip
    """Custom run form -> sections, fill, submit -> the run, finished -> its Artifacts tab and the summary."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])  # Chromium refuses root
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)

            # 1. the deployment's page -> Run -> Custom run: the parameter form
            await page.goto(f"{ui}/deployments/deployment/{deployment.id}")
            await page.get_by_role("button", name="Run", exact=True).click()
            await page.get_by_role("menuitem", name="Custom run").click()
            heading = page.get_by_role("heading", name="Parameters", exact=True)
            await page.get_by_label(_label("Path or URL")).wait_for()
            sections = await heading.locator("xpath=following-sibling::*[1]").evaluate(_SECTIONS_JS)

            # 2. fill the source, the sandbox and the run's folders; omit the fields the form would send as null
            for title, value in values.items():
                await page.get_by_label(_label(title)).fill(value)
            for title in omit:
                label = page.locator("label").filter(has_text=_label(title))
                menu = label.locator("xpath=ancestor::div[.//button[@aria-haspopup='menu']][1]")
                await menu.locator("button[aria-haspopup='menu']").first.click()
                await page.get_by_role("menuitem", name="Omit value").click()
            height = await page.evaluate("document.documentElement.scrollHeight")
            await page.set_viewport_size({"width": 1400, "height": height})  # the whole form, sidebar included
            await page.screenshot(path=shots / SCREENSHOTS["form"])
            await page.set_viewport_size({"width": 1400, "height": 1000})

            # 3. submit: the server creates the run (its id is in the answer) and the UI goes back to the deployment
            for _ in range(3):  # a busy SQLite-backed server may answer 503 (the design notes): click again, as a user would
                async with page.expect_response(lambda r: r.url.endswith("/create_flow_run")) as answer:
                    await page.get_by_role("button", name="Submit", exact=True).click()
                response = await answer.value
                created = await response.json()
                if response.status != 503:
                    break
            assert response.status == 201, f"the form's run was refused: {created}"
            flow_run_id = created["id"]

            # 4. the worker finishes it (the API says when); the run's page shows the state
            run = await wait_final(server, flow_run_id, RUN_TIMEOUT)
            assert run.state.is_completed(), f"the run from the form ended {run.state}"
            await page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
            await page.get_by_text(run.state.name, exact=True).first.wait_for()

            # 5. the Artifacts tab lists the summary; the summary itself shows the counts
            await page.get_by_role("tab", name="Artifacts").click()
            summary_card = page.get_by_text("apollo-sync-summary", exact=True).first
            await summary_card.wait_for()
            try:
                await page.wait_for_load_state("networkidle", timeout=10_000)  # the run graph, for the picture
            except PlaywrightTimeout:  # the UI kept polling: the picture is taken all the same
                pass
            await page.screenshot(path=shots / SCREENSHOTS["finished"], full_page=True)
            await summary_card.click()
            wanted = (f"Rows read: {VALID + 1}, valid: {VALID}.", "invalid_email")  # the markdown, rendered
            for text in wanted:
                await page.get_by_text(text, exact=True).wait_for()
            # The page's text once both show together (the UI may still be swapping views when one first appears).
            summary_text = ""
            for _ in range(50):
                summary_text = await page.locator("body").inner_text()
                if all(text in summary_text for text in wanted):
                    break
                await asyncio.sleep(0.2)
            return sections, flow_run_id, summary_text
        finally:
            await browser.close()


def test_custom_run_form_shows_the_sections_and_a_run_started_from_it_ends_with_its_summary(
    chromium, prefect_server, tmp_path
):
    with SandboxProcess(SandboxConfig()) as sandbox:
        env = prefect_server.env()
        run_ok([sys.executable, "deployments/setup.py"], env)  # the work pool; the key comes from the worker's env
        run_ok(prefect_cli("--no-prompt", "deploy", "--all"), env)
        deployment = asyncio.run(_deployment(prefect_server))

        worker_log = tmp_path / "worker.log"
        worker_env = env | {"APOLLO_API_KEY": sandbox.config.api_key, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        assert "APOLLO_SYNC_HOME" not in worker_env  # the clone recorded by `prefect deploy`
        worker = start_worker(worker_env, tmp_path, worker_log, POOL)
        try:
            expected = _write_export(tmp_path / "export.csv")
            values = {"Path or URL": str(tmp_path / "export.csv"), "Base URL": sandbox.gateway_base_url,
                      "State directory": str(tmp_path / "state"),
                      "Report directory": str(tmp_path / "report")}  # fmt: skip
            omit = [t for t in _null_default_fields(deployment.parameter_openapi_schema) if t not in values]
            try:
                sections, flow_run_id, summary_text = asyncio.run(
                    _browse(chromium, _ui_base(prefect_server), prefect_server, deployment, values, omit, tmp_path)
                )
            except Exception as exc:
                worker_output = worker_log.read_text(errors="replace")
                raise AssertionError(f"{exc}\nscreenshots in {tmp_path}\nworker:\n{worker_output[-3000:]}") from exc
        finally:
            stop_process(worker)
        stored = sorted(c["email"] for c in sandbox.contacts())
        key = sandbox.config.api_key

    # the form: a few titled sections, the groups of apollo_sync/params.py, each with its fields inside
    titles = [s["title"] for s in sections]
    assert titles == SECTIONS, titles
    assert len(sections) <= MAX_TOP_LEVEL_FIELDS
    assert all(s["fields"] for s in sections), [s["title"] for s in sections if not s["fields"]]
    assert "Path or URL" in sections[0]["fields"]

    # the run the form started: every valid contact landed; the summary the UI shows says so, without the key
    run = asyncio.run(wait_final(prefect_server, flow_run_id, RUN_TIMEOUT))
    assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text(errors='replace')[-3000:]}"
    assert run.parameters["source"]["path"] == str(tmp_path / "export.csv")
    assert stored == sorted(expected)
    assert "invalid_email" in summary_text and key not in summary_text
    assert (tmp_path / "report" / "summary.json").exists()

    if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
        for name in SCREENSHOTS.values():
            shutil.copyfile(tmp_path / name, DOCS / name)
