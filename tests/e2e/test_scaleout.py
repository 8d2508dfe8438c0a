"""Issues 8 and 17: two process workers, overlapping partitions, one rate budget, one shared ledger, clean stops.

A fresh Prefect server, ``setup.py --save-key --rate-per-minute 600`` (the rate of the shared budget, which with a
PostgreSQL ledger is a token bucket in it), ``prefect deploy --all``, two process workers with ``--limit 2`` each,
PostgreSQL (tests/services.py) as the shared ledger, and the sandbox in its own process with a 20 requests/second
window on the gateway path. The parent ``sync-partitions`` runs on a worker and starts three children at once, so
both workers must run children (the parent takes one of the four slots); which worker ran a child comes from the
server's ``prefect.worker.executed-flow-run`` events. The four CSV files overlap: each shares 40 contacts with the
next, and the later file's copy has another first name, so only the parent's choice of one version per contact
keeps an unchanged re-run from sending anything. Then a larger run is cancelled while its children send: no child
may keep running and no claim may stay held. The ledger password is in the workers' PGPASSWORD, never in a
parameter.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from apollo_sync.params import sync_params
from apollo_sync.report import summary_problems
from apollo_sync.sandbox import SandboxConfig, SandboxProcess
from services import PG_PASSWORD, postgres  # noqa: F401 - fixture

from partition_files import write_overlapping
from prefect_server import ROOT, PrefectServer, executed_by, prefect_cli, start_run, stop_process, wait_final

pytestmark = pytest.mark.e2e

POOL = "apollo-sync"
PARENT = "sync-partitions/sync-partitions"
CHILD = "sync-contacts/sync-contacts-partition"
RUN_TIMEOUT = 240.0
FILES, PER_FILE, OVERLAP = 4, 320, 40
STEP = PER_FILE - OVERLAP
STOP_TIMEOUT = 120.0
"""How long the cancelled run's children may take to stop (the parent's hook waits for them, a worker gives 30 s)."""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _write_fresh(folder: Path, per_file: int) -> None:
    """Four CSV files of ``per_file`` contacts no other file of the test holds (for the run that is cancelled)."""
    folder.mkdir()
    for k in range(FILES):
        lines = ["First Name,Last Name,Email Address,Company"]
        lines += [f"C{i},Stopper,cancel{k}-{i}@example.com,Acme" for i in range(per_file)]
        (folder / f"part-{k}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _children_of(parent_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))


async def _children_and_artifacts(server: PrefectServer, parent_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with server.client() as client:
        children = await client.read_flow_runs(flow_run_filter=_children_of(parent_id))
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id])))
    return children, artifacts


async def _cancel_while_sending(server: PrefectServer, parent_id: str, sandbox: SandboxProcess, timeout: float) -> int:
    """Cancel the parent (as the UI's Cancel does: the state Cancelling) once a child is running and its requests
    reach the sandbox; returns the sandbox's request count at that moment."""
    from prefect.states import Cancelling

    baseline = sandbox.stats()["requests"]
    deadline = time.monotonic() + timeout
    async with server.client() as client:
        while True:
            children = await client.read_flow_runs(flow_run_filter=_children_of(parent_id))
            sending = sandbox.stats()["requests"] - baseline
            if sending >= 10 and any(c.state is not None and c.state.is_running() for c in children):
                break
            assert time.monotonic() < deadline, f"no child sending after {timeout}s: {[c.state for c in children]}"
            await asyncio.sleep(0.5)
        await client.set_flow_run_state(parent_id, Cancelling(message="cancelled by the test"))
    return baseline + sending


async def _log_lines(server: PrefectServer, flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with server.client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


async def _children_once_final(server: PrefectServer, parent_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    async with server.client() as client:
        while True:
            children = await client.read_flow_runs(flow_run_filter=_children_of(parent_id))
            if all(c.state is not None and c.state.is_final() for c in children) or time.monotonic() > deadline:
                return children
            await asyncio.sleep(1.0)


def _held_claims(url: str) -> list[tuple]:
    """Rows still pending under a run whose lease has not ended (finished = false)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT l.run_id, count(*) FROM sync_ledger AS l JOIN sync_runs AS r ON r.run_id = l.run_id"
            " WHERE l.status = 'pending' AND NOT r.finished GROUP BY l.run_id"
        ).fetchall()


def _create_database(url: str) -> str:
    import psycopg

    name = "ledger_" + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def test_two_workers_overlapping_partitions_one_budget_one_version_each_and_a_clean_cancel(prefect_server, postgres, tmp_path):  # noqa: F811
    database = _create_database(postgres.url)
    state_url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{database}"  # no password in it
    expected = write_overlapping(tmp_path / "parts", FILES, PER_FILE, OVERLAP)
    _write_fresh(tmp_path / "fresh", per_file=1000)
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

        def parameters(source: Path, report: str) -> dict:
            settings = sync_params(
                source=str(source / "*.csv"), base_url=sandbox.gateway_base_url, state_url=state_url,
                state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / report), chunk_size=10, concurrency=4,
            ).as_json()  # fmt: skip
            return settings | {"partitions": {"max_in_flight": 3, "poll_seconds": 1.0}}

        try:
            for n, log_path in enumerate(logs, 1):
                with log_path.open("wb") as log:
                    workers.append(subprocess.Popen(
                        prefect_cli("worker", "start", "--pool", POOL, "--type", "process", "--limit", "2",
                                    "--name", f"worker-{n}"),
                        env=worker_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    ))  # fmt: skip
            parent_id = asyncio.run(start_run(prefect_server, PARENT, parameters(tmp_path / "parts", "report")))
            parent = asyncio.run(wait_final(prefect_server, parent_id, RUN_TIMEOUT, poll=1))
            stats = sandbox.stats()
            stored = Counter(c["email"] for c in sandbox.contacts())
            first_names = {c["email"]: c.get("first_name") for c in sandbox.contacts()}

            # the same partitions again, unchanged
            again_id = asyncio.run(start_run(prefect_server, PARENT, parameters(tmp_path / "parts", "report-again")))
            again = asyncio.run(wait_final(prefect_server, again_id, RUN_TIMEOUT, poll=1))
            requests_again = sandbox.stats()["requests"] - stats["requests"]

            # a larger run, cancelled while its children send
            cancel_id = asyncio.run(start_run(prefect_server, PARENT, parameters(tmp_path / "fresh", "report-cancelled")))
            asyncio.run(_cancel_while_sending(prefect_server, cancel_id, sandbox, RUN_TIMEOUT))
            cancelled = asyncio.run(wait_final(prefect_server, cancel_id, STOP_TIMEOUT, poll=1))
            stopped = asyncio.run(_children_once_final(prefect_server, cancel_id, STOP_TIMEOUT))
            after_stop = sandbox.stats()["requests"]
            time.sleep(3.0)
            after_wait = sandbox.stats()["requests"]
            held = _held_claims(postgres.url.rsplit("/", 1)[0] + "/" + database)
            parent_log = asyncio.run(_log_lines(prefect_server, cancel_id))
        finally:
            codes = [stop_process(worker) for worker in workers]
        assert -signal.SIGKILL not in codes, f"a worker ignored SIGTERM: {codes}"
        outputs = [log.read_text(errors="replace") for log in logs]
        assert parent.state.is_completed(), f"{parent.state}\n" + "\n".join(o[-3000:] for o in outputs)

    # every valid contact landed exactly once, in the version of the first partition holding it
    assert set(stored) == expected and max(stored.values()) == 1
    shared = [f"person{i}@example.com" for k in range(1, FILES) for i in range(k * STEP, k * STEP + OVERLAP)]
    assert {first_names[email][0] for email in shared} == {"P"}

    # one rate budget: the workers together stayed inside the sandbox's window
    rate_limited = stats["status_counts"].get("429", 0)
    assert rate_limited == 0, stats

    # one merged summary that adds up and matches the sandbox; the later copies are duplicates of the first
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    print("sandbox:", {k: stats[k] for k in ("requests", "status_counts")}, "summary:",
          {k: summary[k] for k in ("created", "duplicates_in_source", "unchanged", "requests", "rate_limited", "seconds")})
    assert not summary_problems(summary), summary
    assert summary["rows_read"] == FILES * (PER_FILE + 1)
    assert summary["rejected"] == {"invalid_email": FILES}
    assert summary["created"] == len(expected) and summary["existing"] == 0
    assert summary["failed"] == summary["unconfirmed"] == summary["unchanged"] == 0
    assert summary["duplicates_in_source"] == (FILES - 1) * OVERLAP
    assert summary["requests"] == stats["requests"] and summary["rate_limited"] == rate_limited
    assert [p["state"] for p in summary["partitions"]] == ["Completed"] * FILES

    # an unchanged re-run of the same partitions sends nothing
    assert again.state.is_completed(), again.state
    summary_again = json.loads((tmp_path / "report-again" / "summary.json").read_text())
    assert requests_again == 0 and summary_again["requests"] == 0, summary_again
    assert summary_again["unchanged"] == len(expected)
    assert summary_again["duplicates_in_source"] == (FILES - 1) * OVERLAP

    # both workers ran children (the server's worker events say which); the parent has the merged artifacts
    children, artifacts = asyncio.run(_children_and_artifacts(prefect_server, parent_id))
    assert len(children) == FILES and all(c.state.is_completed() for c in children)
    ran_by = asyncio.run(executed_by(prefect_server, {str(c.id) for c in children}))
    assert set(ran_by) == {str(c.id) for c in children}, ran_by
    assert set(ran_by.values()) == {"worker-1", "worker-2"}, ran_by
    by_key = {a.key: a for a in artifacts}
    assert f"over {FILES} partitions" in by_key["apollo-sync-partitions-summary"].data
    assert float(by_key["apollo-sync-partitions-progress"].data) == 100.0
    assert not [o for o in outputs if key in o or PG_PASSWORD in o]
    assert PG_PASSWORD not in str(parent.parameters) and key not in str(parent.parameters)

    # cancelling the parent left no child running, nothing sent after they stopped, no claim held
    assert cancelled.state.is_cancelled(), cancelled.state
    assert stopped and all(c.state.is_final() for c in stopped), [(str(c.id), c.state.name) for c in stopped]
    assert any(c.state.is_cancelled() for c in stopped), [c.state.name for c in stopped]
    assert after_wait == after_stop
    assert held == [], held
    assert any(line.startswith("Cancelling ") and "child run(s)" in line for line in parent_log), parent_log[-20:]
