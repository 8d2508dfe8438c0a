"""End-to-end fixtures: ``prefect_server`` is a real ``prefect server start`` on loopback, one per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prefect_server import PrefectServer, running_server
from services import PREFECT_SERVER_PORTS, url_port


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[PrefectServer]:
    """A fresh Prefect server on 127.0.0.1 with its own PREFECT_HOME and no telemetry; stopped after the module."""
    with running_server() as server:
        PREFECT_SERVER_PORTS.add(url_port(server.api_url))
        yield server
