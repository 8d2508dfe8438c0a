"""Pytest fixtures for the sandbox server; conftest imports them so any test can ask for them.

- ``sandbox``: a SandboxServer with the default config (key ``sandbox-key``, no limits, no faults), per test.
- ``sandbox_factory``: call it with SandboxConfig keyword arguments to start a configured SandboxServer;
  every server it started is stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apollo_sync.sandbox import SandboxConfig, SandboxServer


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """A running SandboxServer with default settings."""
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """``sandbox_factory(rate=3, window=1, drop=1.0, ...)`` -> a running SandboxServer, stopped after the test."""
    started: list[SandboxServer] = []

    def make(**config: Any) -> SandboxServer:
        server = SandboxServer(SandboxConfig(**config)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
