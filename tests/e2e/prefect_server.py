"""Helpers for end-to-end tests on a real Prefect server: start/stop one, its environment, the CLI.

``start_server()`` runs ``prefect server start`` on a free 127.0.0.1 port with a throwaway PREFECT_HOME and waits
for /api/health; ``stop_process`` ends what it started with SIGTERM (SIGINT does not stop a Prefect process
started without a terminal). ``PrefectServer.env()`` is the environment for CLI and worker subprocesses that
should talk to it; nothing in it comes from the developer's shell except PATH and the like.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services import free_port

from apollo_sync.local_server import healthy

ROOT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT = 120.0
"""A fresh database runs its migrations first: ~20 s on a quiet 2-core machine, more when it is busy."""
STOP_TIMEOUT = 20.0
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "SYSTEMROOT")

@dataclass
class PrefectServer:
    """A running Prefect API on loopback and the private home it keeps its database in."""

    url: str
    api_url: str
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that uses this server (a fresh home, no telemetry, no APOLLO_*)."""
        env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
        env |= {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_CLI_WRAP_LINES": "false",
            "PYTHONUNBUFFERED": "1",
        }
        return env | extra

    def client(self):
        """A PrefectClient for this server (use as ``async with``), independent of the test process's settings."""
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(self.api_url)

async def wait_final(server: PrefectServer, flow_run_id: str, timeout: float, poll: float = 0.5):
    """The flow run once its state is final; fails the test if that takes longer than ``timeout`` seconds."""
    import asyncio

    async with server.client() as client:
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            state = run.state.name if run.state else None
            assert time.monotonic() < deadline, f"flow run {flow_run_id} still {state} after {timeout}s"
            await asyncio.sleep(poll)


async def start_run(server: PrefectServer, deployment: str, parameters: dict) -> str:
    """Create a flow run of ``deployment`` (``flow/deployment``) with ``parameters``; returns its id."""
    async with server.client() as client:
        found = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(found.id, parameters=parameters)
        return str(run.id)


async def executed_by(server: PrefectServer, run_ids: set[str], timeout: float = 60.0) -> dict[str, str]:
    """Which worker ran each of ``run_ids``, from the server's ``prefect.worker.executed-flow-run`` events (a worker
    emits one when the run's process has exited: the worker that submits a run and loses it emits none)."""
    import asyncio

    from prefect.events.filters import EventFilter, EventNameFilter

    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    async with server.client() as client:
        while set(found) < run_ids and time.monotonic() < deadline:
            page = await client.read_events(EventFilter(event=EventNameFilter(name=["prefect.worker.executed-flow-run"])),
                                            limit=50)  # fmt: skip
            while page is not None:
                for event in page.events:
                    for related in event.related:
                        run_id = related.id.removeprefix("prefect.flow-run.")
                        if related.role == "flow-run" and run_id in run_ids:
                            found[run_id] = event.resource.name or event.resource.id
                page = await client.read_events_page(page.next_page) if page.next_page else None
            await asyncio.sleep(1.0)
    return found


def prefect_cli(*args: str) -> list[str]:
    """The ``prefect`` command of this interpreter's environment."""
    return [sys.executable, "-m", "prefect", *args]


def run_ok(cmd: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 120) -> str:
    """Run ``cmd`` to completion; fail the test with its output unless it exits 0. Returns stdout + stderr."""
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr

def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the process group we started, wait, then SIGKILL it if it is still there. Returns the exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout)

def start_worker(env: dict[str, str], cwd: Path, log_path: Path, pool: str) -> subprocess.Popen:
    """``prefect worker start --pool POOL --type process`` in ``cwd``, its output in ``log_path``; stop it with
    :func:`stop_process`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            prefect_cli("worker", "start", "--pool", pool, "--type", "process"),
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

@contextmanager
def running_server() -> Iterator[PrefectServer]:
    """``prefect server start`` on 127.0.0.1:<free port> with a throwaway PREFECT_HOME; SIGTERM and removed on exit."""
    home = Path(tempfile.mkdtemp(prefix="apollo-sync-e2e-prefect-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = PrefectServer(url=url, api_url=f"{url}/api", home=home, log=home / "server.log")
    env = server.env(PREFECT_UI_API_URL=server.api_url)  # else the UI calls port 4200 (tests/e2e/test_ui_browser.py)
    env.pop("PREFECT_API_URL")
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            prefect_cli("server", "start", "--host", "127.0.0.1", "--port", str(port)),
            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT:.0f}s:\n{server.log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)
