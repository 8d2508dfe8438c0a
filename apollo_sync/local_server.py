"""A local Prefect server that ad hoc runs share, so ``apollo-sync run`` does not start one per run.

Prefect's temporary server (what a flow run uses when ``PREFECT_API_URL`` is unset) costs about 10 s at every
start on a 2-core machine. Instead, the first ``apollo-sync run`` (or ``demo``) without ``PREFECT_API_URL`` starts
``prefect server start`` on loopback in the background, with its database in ``PREFECT_HOME`` (default
``~/.prefect``), says so in one line with the UI's address, and later runs find it and use it. Its process id and
port are in ``<PREFECT_HOME>/apollo-sync-server.json``; ``apollo-sync server stop`` stops it and removes that
file, ``apollo-sync server status`` shows it. ``--ephemeral`` (or ``APOLLO_SYNC_EPHEMERAL=1``) keeps Prefect's
temporary server; a ``PREFECT_API_URL`` that is set is always used as it is.

Plain module: no Prefect import (the server runs in its own process), so the CLI's start-up stays small.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from apollo_sync.errors import ConfigError
from apollo_sync.files import private_dir, touch_private
from apollo_sync.processes import pid_alive

DEFAULT_PORT = 4200
"""Prefect's usual port; a free one is taken when it is busy."""
START_TIMEOUT = 120.0
"""A first start runs the database migrations: ~20 s on a quiet 2-core machine, more when it is busy."""
STOP_TIMEOUT = 20.0
STATE_FILE = "apollo-sync-server.json"
LOG_FILE = "apollo-sync-server.log"
ENV_EPHEMERAL = "APOLLO_SYNC_EPHEMERAL"


@dataclass(frozen=True)
class LocalServer:
    """A Prefect server apollo-sync started: its process id, its address, where it logs."""

    pid: int
    port: int
    home: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log(self) -> Path:
        return Path(self.home) / LOG_FILE


def prefect_home() -> Path:
    """Where Prefect keeps its database and settings: ``PREFECT_HOME``, else ``~/.prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def status(home: Path | None = None) -> LocalServer | None:
    """The server apollo-sync started under ``home`` when it is running and healthy, else None (a stale record
    of a server that is gone is removed)."""
    path = (home or prefect_home()) / STATE_FILE
    try:
        server = LocalServer(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if pid_alive(server.pid) and healthy(server.url):
        return server
    if not pid_alive(server.pid):
        path.unlink(missing_ok=True)
    return None


def start(home: Path | None = None, port: int | None = None) -> LocalServer:
    """Start ``prefect server start`` on 127.0.0.1 in the background and wait until it answers; ConfigError when it
    does not come up (its log says why)."""
    home = private_dir(home or prefect_home())
    port = port or (DEFAULT_PORT if _free(DEFAULT_PORT) else _free_port())
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = touch_private(home / LOG_FILE)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = LocalServer(process.pid, port, str(home))
    deadline = time.monotonic() + START_TIMEOUT
    while not healthy(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate(process.pid)
            raise ConfigError(f"the local Prefect server did not start; see {log_path}, or pass --ephemeral")
        time.sleep(0.25)
    touch_private(home / STATE_FILE).write_text(json.dumps(asdict(server)), encoding="utf-8")
    return server


def stop(home: Path | None = None) -> LocalServer | None:
    """Stop the server apollo-sync started under ``home`` (SIGTERM to its process group, then SIGKILL); returns
    what was stopped, None when nothing was running."""
    path = (home or prefect_home()) / STATE_FILE
    try:
        server = LocalServer(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    running = pid_alive(server.pid)
    if running:
        _terminate(server.pid)
    path.unlink(missing_ok=True)
    return server if running else None


def ensure() -> tuple[LocalServer, bool]:
    """The running local server, started now if there is none; and whether it was started by this call."""
    found = status()
    return (found, False) if found is not None else (start(), True)


def wanted(ephemeral: bool) -> bool:
    """Whether a run should use the shared local server: not with ``--ephemeral`` or ``APOLLO_SYNC_EPHEMERAL``,
    and never when ``PREFECT_API_URL`` names a server already."""
    flag = os.environ.get(ENV_EPHEMERAL, "").strip().lower() in ("1", "true", "yes")
    return not (ephemeral or flag or os.environ.get("PREFECT_API_URL"))


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _terminate(pid: int) -> None:
    """SIGTERM the process group of ``pid`` (the server and its children), SIGKILL it if still there."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not pid_alive(pid) or _reaped(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child (a zombie still answers kill(pid, 0))."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
