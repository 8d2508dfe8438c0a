"""Test-wide setup: a private Prefect home, no telemetry, no stray APOLLO_* or proxy settings."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile

# Before anything imports prefect: a private home so tests never touch ~/.prefect, and no telemetry
# (offline, it would log an error at every server start). No PREFECT_API_URL: flows run on the harness.
_PREFECT_HOME = tempfile.mkdtemp(prefix="apollo-sync-tests-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # every session made one, and left it behind
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)

import pytest  # noqa: E402

_CLEARED_PREFIXES = ("APOLLO_",)
_CLEARED_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without APOLLO_* settings or proxies from the developer's shell."""
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED_NAMES:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session; opt in with ``pytest.mark.usefixtures``."""
    from prefect.testing.utilities import prefect_test_harness  # lazy: this import alone costs seconds

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        PREFECT_SERVER_PORTS.add(url_port(PREFECT_API_URL.value()))
        yield


from sandbox_fixtures import sandbox, sandbox_factory  # noqa: E402,F401  (fixtures for every test file)
from services import PREFECT_SERVER_PORTS, url_port  # noqa: E402
from services import pg_url, postgres, postgres_cluster_once, s3, s3_server_once  # noqa: E402,F401  (real services)


_SERVICE_MARKERS = {"postgres": ("postgres", "e2e"), "s3": ("s3", "e2e"), "prefect_server": ("e2e",),
                    "local_prefect_home": ("e2e",), "prefect_harness": ("prefect",)}
"""Fixture a test uses -> the markers it gets: what a test needs is what it asks for."""


_PEER_PORT = re.compile(r"raddr=\('127\.0\.0\.1', (\d+)\)")


@pytest.hookimpl(trylast=True)  # after pytest's own unraisable plugin has installed its hook
def pytest_configure(config: pytest.Config) -> None:
    """With ``filterwarnings = error`` an unclosed socket fails the test that happens to collect it. Prefect's own
    clients (the log and event workers of the test harness) leave connections to *its* server unclosed at exit;
    those, and only those, are let through: a socket of ours (to the sandbox, PostgreSQL, S3) still fails."""
    pytest_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, ResourceWarning):
            peer = _PEER_PORT.search(repr(unraisable.object))
            if peer and int(peer.group(1)) in PREFECT_SERVER_PORTS:
                return
        pytest_hook(unraisable)

    sys.unraisablehook = hook


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in _SERVICE_MARKERS.get(fixture, ()):
                item.add_marker(marker)
