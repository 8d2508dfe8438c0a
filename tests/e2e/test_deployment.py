"""Issue 5's Done-when, on a fresh local Prefect server: setup, `prefect deploy --all`, a process worker, a run.

The worker has no APOLLO_API_KEY: the flow must take the key from the Secret block that setup.py saved. The
sandbox (a real HTTP server in this process) stands in for Apollo; the run must land every valid email, leave
progress, summary and problems artifacts, and write the key in no log line.

Issue 15: all of it happens in a copy of the project, and the worker started there has no APOLLO_SYNC_HOME: the
runs go to the clone `prefect deploy` ran in, recorded in the deployment (relative paths resolve inside it).
`setup.py --check` names what is missing before setup and nothing after; a run whose Secret block does not
exist fails with one line naming the block and the command that creates it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apollo_sync import settings
from apollo_sync.params import sync_params
from apollo_sync.sandbox import SandboxConfig, SandboxServer

from prefect_server import ROOT, PrefectServer, prefect_cli, run_ok, start_worker, stop_process, wait_final

pytestmark = pytest.mark.e2e

POOL = "apollo-sync"
SECRET_BLOCK = "apollo-api-key"
ADHOC = "sync-contacts/sync-contacts-adhoc"
NIGHTLY = "sync-contacts/sync-contacts-nightly"
RUN_TIMEOUT = 120.0
VALID = 250
PROJECT_ENTRIES = ("prefect.yaml", "pyproject.toml", "apollo_sync", "flows", "tasks", "deployments")
"""What a clone needs to deploy and run the flows (the interpreter and its packages are this environment's)."""


def _copy_project(to: Path) -> Path:
    """A copy of the project's flow code and Prefect files at ``to``, standing in for a clone elsewhere."""
    to.mkdir()
    for name in PROJECT_ENTRIES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, to / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, to / name)
    return to


def _check(clone: Path, env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "deployments/setup.py", "--check"], env=env, cwd=clone,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _write_export(path: Path) -> set[str]:
    lines = ["First Name,Last Name,Email Address,Company,Job Title"]
    lines += [f"P{i},Tester,person{i}@example.com,Acme {i % 5},Buyer" for i in range(VALID)]
    lines += ["Bad,Email,not-an-email,Acme,", ",,,Acme,"]  # one invalid email, one row with no identity
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"person{i}@example.com" for i in range(VALID)}


async def _artifacts_and_logs(server: PrefectServer, flow_run_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    async with server.client() as client:
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs, offset = [], 0
        while page := await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset
        ):
            logs += page
            offset += len(page)
    return artifacts, logs


async def _run_event(server: PrefectServer, flow_run_id: str):
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    async with server.client() as client:
        for _ in range(40):  # the server writes events asynchronously
            page = await client.read_events(
                EventFilter(event=EventNameFilter(name=["apollo-sync.run.completed"]),
                            related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
                limit=5,
            )  # fmt: skip
            if page.events:
                return page.events[0]
            await asyncio.sleep(0.25)
    return None


async def _deployments(server: PrefectServer):
    async with server.client() as client:
        return {name: await client.read_deployment_by_name(name) for name in (ADHOC, NIGHTLY)}


async def _rate_limit(server: PrefectServer, name: str):
    async with server.client() as client:
        return await client.read_global_concurrency_limit_by_name(name)


def test_deploy_all_and_a_worker_run_lands_every_contact_with_the_key_from_the_secret_block(prefect_server, tmp_path):
    clone = _copy_project(tmp_path / "clone")
    with SandboxServer(SandboxConfig()) as sandbox:
        key = sandbox.config.api_key
        env = prefect_server.env()

        # 1. setup.py --check on a fresh server: one line per missing object, exit 1
        code, before = _check(clone, env)
        assert code == 1, before
        assert f"work pool '{POOL}': missing; create it with `python deployments/setup.py`" in before
        create_block = "create it with `APOLLO_API_KEY=... python deployments/setup.py --save-key`"
        assert f"Secret block '{SECRET_BLOCK}': missing; {create_block}" in before
        assert "global rate limit 'apollo-sync-rate' (used by sync-partitions): missing" in before

        # 2. setup.py, twice: the second run must change nothing; then --check finds everything
        setup = [sys.executable, "deployments/setup.py", "--save-key", "--rate-per-minute", "600"]
        first = run_ok(setup, env | {"APOLLO_API_KEY": key}, cwd=clone)
        second = run_ok(setup, env | {"APOLLO_API_KEY": key}, cwd=clone)
        assert f"work pool '{POOL}' (process): created" in first
        assert "already there" in second and "already holds this key" in second
        assert key not in first + second
        limit = asyncio.run(_rate_limit(prefect_server, "apollo-sync-rate"))
        assert (limit.limit, limit.slot_decay_per_second) == (10, 10.0)
        code, after = _check(clone, env)
        assert code == 0 and "missing" not in after and after.count(": ok") == 3, after
        assert key not in before + after

        # 3. prefect deploy --all from the clone (no APOLLO_SYNC_HOME): the deployments record the clone
        assert "APOLLO_SYNC_HOME" not in env
        deployed = run_ok(prefect_cli("--no-prompt", "deploy", "--all"), env, cwd=clone)
        assert "sync-contacts-adhoc" in deployed and "sync-contacts-nightly" in deployed
        deployments = asyncio.run(_deployments(prefect_server))
        nightly, adhoc = deployments[NIGHTLY], deployments[ADHOC]
        assert [s.active for s in nightly.schedules] == [False]
        assert nightly.schedules[0].schedule.cron == "0 2 * * *"
        assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1
        assert not adhoc.schedules
        choose, change = adhoc.pull_steps
        recorded = choose["prefect.deployments.steps.run_shell_script"]["env"]
        assert recorded == {"APOLLO_SYNC_DEPLOYED_FROM": os.path.realpath(clone)}
        assert change == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.stdout }}"}}
        assert adhoc.work_pool_name == nightly.work_pool_name == POOL
        # the imported flow's form, not the placeholder `prefect deploy` falls back to when the import fails
        schema = adhoc.parameter_openapi_schema
        assert schema["definitions"]["ApolloParams"]["properties"]["base_url"]["default"] == settings.GATEWAY_BASE_URL

        # 4. a process worker started in the clone, with neither APOLLO_SYNC_HOME nor the key in its environment
        worker_log = tmp_path / "worker.log"
        worker_env = env | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
        assert "APOLLO_API_KEY" not in worker_env and "APOLLO_SYNC_HOME" not in worker_env
        worker = start_worker(worker_env, clone, worker_log, POOL)
        try:
            # 5. run the ad hoc deployment against the sandbox; source, ledger and report relative to the clone
            (clone / "data").mkdir()
            expected = _write_export(clone / "data" / "export.csv")
            started = run_ok(
                prefect_cli(
                    "deployment", "run", ADHOC,
                    "--params", json.dumps(sync_params(source="data/export.csv", base_url=sandbox.gateway_base_url,
                                                       report_dir="reports/e2e", state_dir="state").as_json()),
                ),
                env,
            )  # fmt: skip
            flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started).group(1)
            run = asyncio.run(wait_final(prefect_server, flow_run_id, RUN_TIMEOUT))

            # 6. a run naming a Secret block that does not exist: one line saying which, and how to create it
            no_block = asyncio.run(_start_run(prefect_server, adhoc.id, sync_params(
                source="data/export.csv", base_url=sandbox.gateway_base_url, api_key_block="no-such-block",
                state_dir="state-no-block").as_json()))  # fmt: skip
            failed = asyncio.run(wait_final(prefect_server, no_block, RUN_TIMEOUT))
        finally:
            stop_process(worker)
        worker_output = worker_log.read_text(errors="replace")
        assert run.state.is_completed(), f"{run.state}\n{worker_output[-4000:]}"

        # 7. every valid email landed, once; the report is where the relative path says, inside the clone
        stored = sorted(c["email"] for c in sandbox.contacts())
        assert stored == sorted(expected)
        assert (clone / "reports" / "e2e" / "summary.json").exists()
        assert (clone / "state").is_dir() and not (ROOT / "reports" / "e2e").exists()

    assert failed.state.is_failed(), f"{failed.state}\n{worker_output[-4000:]}"
    message = failed.state.message or ""
    assert "Secret block 'no-such-block' does not exist" in message, message
    assert "python deployments/setup.py --save-key --secret-block no-such-block" in message, message

    # 8. artifacts exist; the key is in no log line, artifact, parameter or worker output
    artifacts, logs = asyncio.run(_artifacts_and_logs(prefect_server, flow_run_id))
    by_key = {a.key: a for a in artifacts}
    assert {"apollo-sync-progress", "apollo-sync-summary", "apollo-sync-problems"} <= set(by_key)
    assert float(by_key["apollo-sync-progress"].data) == 100.0
    assert f"| created | {VALID} |" in by_key["apollo-sync-summary"].data
    problems = json.loads(by_key["apollo-sync-problems"].data)
    assert sorted(row["reason"] for row in problems) == ["invalid_email", "missing_identity"]
    event = asyncio.run(_run_event(prefect_server, flow_run_id))
    assert event is not None and event.payload["created"] == VALID and event.payload["rejected"] == 2
    assert event.resource["apollo-sync.has-failures"] == "false"
    assert logs, "the flow run sent no logs to the API"
    assert not [log.message for log in logs if key in log.message]
    assert not [a.key for a in artifacts if key in str(a.data)]
    assert key not in str(run.parameters)
    assert key not in worker_output


async def _wait_deployment(server: PrefectServer, name: str, proc: subprocess.Popen):
    from prefect.exceptions import ObjectNotFound

    async with server.client() as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except ObjectNotFound:
                assert proc.poll() is None, "serve.py exited before registering its deployment"
                assert time.monotonic() < deadline, f"{name} not registered after 60s"
                await asyncio.sleep(0.5)


async def _start_run(server: PrefectServer, deployment_id, parameters: dict):
    async with server.client() as client:
        run = await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        return str(run.id)


def test_serve_py_runs_a_flow_run_and_pauses_its_deployment_on_sigterm(prefect_server, tmp_path):
    with SandboxServer(SandboxConfig()) as sandbox:
        key = sandbox.config.api_key
        log_path = tmp_path / "serve.log"
        env = prefect_server.env(APOLLO_API_KEY=key, PREFECT_RUNNER_POLL_FREQUENCY="1")
        with log_path.open("wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "deployments/serve.py"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            deployment = asyncio.run(_wait_deployment(prefect_server, "sync-contacts/sync-contacts-serve", serve))
            expected = _write_export(tmp_path / "export.csv")
            flow_run_id = asyncio.run(_start_run(prefect_server, deployment.id, sync_params(
                source=str(tmp_path / "export.csv"), base_url=sandbox.gateway_base_url,
                state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "report"), api_key_block=None,
            ).as_json()))  # fmt: skip
            run = asyncio.run(wait_final(prefect_server, flow_run_id, RUN_TIMEOUT))
        finally:
            code = stop_process(serve)
        output = log_path.read_text(errors="replace")
        assert run.state.is_completed(), f"{run.state}\n{output[-4000:]}"
        assert sorted(c["email"] for c in sandbox.contacts()) == sorted(expected)
        assert code is not None and key not in output
    paused = asyncio.run(_wait_deployment(prefect_server, "sync-contacts/sync-contacts-serve", serve)).paused
    assert paused, "serve.py should pause its deployment when it stops"
