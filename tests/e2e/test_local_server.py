"""Ad hoc runs share one local Prefect server: the first run starts it (one line says so), later runs reuse it,
`apollo-sync server stop` leaves nothing running. A real `prefect server start` in a private PREFECT_HOME."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apollo_sync import local_server
from apollo_sync.processes import pid_alive
from apollo_sync.settings import ENV_API_KEY

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from cli_helpers import cli  # noqa: E402


@pytest.fixture
def local_prefect_home(tmp_path) -> Iterator[Path]:
    """A private PREFECT_HOME; whatever apollo-sync started in it is stopped afterwards, pass or fail."""
    home = tmp_path / "prefect-home"
    yield home
    local_server.stop(home)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "APOLLO_"))}
    local = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "APOLLO_SYNC_EPHEMERAL": ""}
    return env | local | extra


def test_the_first_run_starts_the_local_server_later_runs_reuse_it_and_stop_leaves_nothing(
    local_prefect_home, sandbox, tmp_path
):
    source = tmp_path / "ten.csv"
    source.write_text("email,first name\n" + "".join(f"p{i}@x.io,P{i}\n" for i in range(10)))
    run = ["run", str(source), "--base-url", sandbox.gateway_base_url]
    extra = _env(local_prefect_home, **{ENV_API_KEY: sandbox.config.api_key})

    first = cli(*run, "--state-dir", str(tmp_path / "s1"), env_extra=extra)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Started a local Prefect server" in first.stderr
    record = json.loads((local_prefect_home / local_server.STATE_FILE).read_text())
    assert pid_alive(record["pid"]) and local_server.status(local_prefect_home) is not None

    second = cli(*run, "--state-dir", str(tmp_path / "s2"), env_extra=extra)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Started a local Prefect server" not in second.stderr  # reused
    assert json.loads((local_prefect_home / local_server.STATE_FILE).read_text())["pid"] == record["pid"]
    assert len(sandbox.contacts()) == 10

    status = cli("server", "status", env_extra=extra)
    assert status.returncode == 0 and f"127.0.0.1:{record['port']}" in status.stdout
    stopped = cli("server", "stop", env_extra=extra)
    assert stopped.returncode == 0 and str(record["pid"]) in stopped.stdout
    assert not pid_alive(record["pid"])  # the server (its process group) is gone
    assert not local_server.healthy(f"http://127.0.0.1:{record['port']}")
    assert not (local_prefect_home / local_server.STATE_FILE).exists()
    assert cli("server", "status", env_extra=extra).returncode == 3
