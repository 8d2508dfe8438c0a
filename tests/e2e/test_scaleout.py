"""Issue 8's Done-when: two process workers, four overlapping partitions, one rate budget, one shared ledger.

A fresh Prefect server, ``setup.py --save-key --rate-per-minute 600`` (the global rate limit every child consults),
``prefect deploy --all``, two process workers with ``--limit 2`` each, PostgreSQL (tests/services.py) as the
shared ledger, and the sandbox in its own process with a 20 requests/second window on the gateway path. The
parent ``sync-partitions`` runs on a worker and starts three children at once, so both workers must run
children (the parent takes one of the four slots). Together the children could send far more than 20 requests a
second (3 children x 4 in flight against a 20 ms sandbox). The four CSV files overlap: each shares 40 contacts
with the next. The ledger password is in the workers' PGPASSWORD, never in a parameter.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from apollo_sync.params import sync_params
from apollo_sync.report import summary_problems
from apollo_sync.sandbox import SandboxConfig, SandboxProcess
from services import PG_PASSWORD, postgres  # noqa: F401 - fixture

from prefect_server import ROOT, PrefectServer, prefect_cli, stop_process, wait_final

pytestmark = pytest.mark.e2e

POOL = "apollo-sync"
PARENT = "sync-partitions/sync-partitions"
CHILD = "sync-contacts/sync-contacts-partition"
RUN_TIMEOUT = 240.0
FILES, PER_FILE, OVERLAP = 4, 320, 40
STEP = PER_FILE - OVERLAP


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _write_partitions(folder: Path) -> set[str]:
    """Four CSV files; file k holds contacts k*STEP .. k*STEP+PER_FILE-1 (40 shared with the next) + 1 bad row."""
    folder.mkdir()
    for k in range(FILES):
        lines = ["First Name,Last Name,Email Address,Company"]
        lines += [f"P{i},Tester,person{i}@example.com,Acme {i % 7}" for i in range(k * STEP, k * STEP + PER_FILE)]
        lines.append(f"Bad{k},Row,not-an-email-{k},Acme")
        (folder / f"part-{k}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"person{i}@example.com" for i in range((FILES - 1) * STEP + PER_FILE)}


async def _start(server: PrefectServer, parameters: dict) -> str:
    async with server.client() as client:
        deployment = await client.read_deployment_by_name(PARENT)
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return str(run.id)


async def _children_and_artifacts(server: PrefectServer, parent_id: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId

    async with server.client() as client:
        child_deployment = await client.read_deployment_by_name(CHILD)
        children = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[child_deployment.id])))
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id])))
    return children, artifacts


def _create_database(url: str) -> str:
    import psycopg

    name = "ledger_" + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def test_two_workers_four_overlapping_partitions_one_rate_budget_every_contact_once(prefect_server, postgres, tmp_path):  # noqa: F811
    database = _create_database(postgres.url)
    state_url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{database}"  # no password in it
    expected = _write_partitions(tmp_path / "parts")
    config = SandboxConfig(rate=20, window=1.0, latency=0.02, seed=8)
    with SandboxProcess(config) as sandbox:
        key = sandbox.config.api_key
        env = prefect_server.env()
        _run([sys.executable, "deployments/setup.py", "--save-key", "--rate-per-minute", "600"], env | {"APOLLO_API_KEY": key})
        deployed = _run(prefect_cli("--no-prompt", "deploy", "--all"), env)
        assert "sync-partitions" in deployed and "sync-contacts-partition" in deployed

        worker_env = env | {"APOLLO_SYNC_HOME": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1", "PGPASSWORD": PG_PASSWORD}
        logs = [tmp_path / f"worker-{n}.log" for n in (1, 2)]
        workers = []
        try:
            for n, log_path in enumerate(logs, 1):
                with log_path.open("wb") as log:
                    workers.append(subprocess.Popen(
                        prefect_cli("worker", "start", "--pool", POOL, "--type", "process", "--limit", "2",
                                    "--name", f"worker-{n}"),
                        env=worker_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    ))  # fmt: skip
            report_dir = tmp_path / "report"
            settings = sync_params(
                source=str(tmp_path / "parts" / "*.csv"), base_url=sandbox.gateway_base_url, state_url=state_url,
                state_dir=str(tmp_path / "state"), report_dir=str(report_dir), chunk_size=10, concurrency=4,
            ).as_json()  # fmt: skip
            parent_id = asyncio.run(_start(prefect_server, settings | {
                "partitions": {"max_in_flight": 3, "poll_seconds": 1.0},
            }))  # fmt: skip
            parent = asyncio.run(wait_final(prefect_server, parent_id, RUN_TIMEOUT, poll=1))
        finally:
            codes = [stop_process(worker) for worker in workers]
        assert -signal.SIGKILL not in codes, f"a worker ignored SIGTERM: {codes}"
        outputs = [log.read_text(errors="replace") for log in logs]
        assert parent.state.is_completed(), f"{parent.state}\n" + "\n".join(o[-3000:] for o in outputs)

        # every valid contact landed exactly once, although each overlap was in two partitions
        stored = Counter(c["email"] for c in sandbox.contacts())
        assert set(stored) == expected and max(stored.values()) == 1
        stats = sandbox.stats()

    # one rate budget: the workers together stayed inside the sandbox's window
    rate_limited = stats["status_counts"].get("429", 0)
    assert rate_limited < 0.02 * stats["requests"], stats

    # one merged summary that adds up and matches the sandbox
    summary = json.loads((report_dir / "summary.json").read_text())
    print("sandbox:", {k: stats[k] for k in ("requests", "status_counts")}, "summary:",
          {k: summary[k] for k in ("created", "duplicates_in_source", "unchanged", "requests", "rate_limited", "seconds")})
    assert not summary_problems(summary), summary
    assert summary["rows_read"] == FILES * (PER_FILE + 1)
    assert summary["rejected"] == {"invalid_email": FILES}
    assert summary["created"] == len(expected) and summary["existing"] == 0
    assert summary["failed"] == summary["unconfirmed"] == 0
    assert summary["duplicates_in_source"] + summary["unchanged"] == (FILES - 1) * OVERLAP  # claimed elsewhere
    assert summary["requests"] == stats["requests"] and summary["rate_limited"] == rate_limited
    assert [p["state"] for p in summary["partitions"]] == ["Completed"] * FILES

    # both workers ran children; the parent has the merged artifacts
    children, artifacts = asyncio.run(_children_and_artifacts(prefect_server, parent_id))
    assert len(children) == FILES and all(c.state.is_completed() for c in children)
    ran = [{str(c.id) for c in children if str(c.id) in output} for output in outputs]
    assert all(ran), f"each worker should have run a child: {[len(r) for r in ran]}"
    by_key = {a.key: a for a in artifacts}
    assert f"over {FILES} partitions" in by_key["apollo-sync-partitions-summary"].data
    assert float(by_key["apollo-sync-partitions-progress"].data) == 100.0
    assert not [o for o in outputs if key in o or PG_PASSWORD in o]
    assert PG_PASSWORD not in str(parent.parameters) and key not in str(parent.parameters)
