"""Pytest fixtures for the sandbox server; conftest imports them so any test can ask for them.

- ``sandbox``: a SandboxServer with the default config (key ``sandbox-key``, no limits, no faults), per test.
- ``sandbox_factory``: call it with SandboxConfig keyword arguments (and optionally ``clock=``) to start a
  configured SandboxServer; every server it started is stopped at the end of the test.
- ``FakeClock``: a clock for ``sandbox_factory(clock=...)`` that stands still until the test advances it, so rate
  windows are tested without sleeping to a wall-clock boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from apollo_sync.sandbox import SandboxConfig, SandboxServer

KEY = "sandbox-key"
"""The sandbox's default key."""


def gateway(sb, key: str | None = KEY, **kw) -> httpx.Client:
    """A client on the AISA gateway way in of ``sb`` (Bearer auth; no header when ``key`` is None)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=sb.gateway_base_url, headers=headers, **kw)


def apollo(sb, key: str | None = KEY, **kw) -> httpx.Client:
    """A client on the Apollo direct way in of ``sb`` (X-Api-Key auth)."""
    headers = {"X-Api-Key": key} if key else {}
    return httpx.Client(base_url=sb.apollo_base_url, headers=headers, **kw)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """Poll until predicate() is true (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class FakeClock:
    """Seconds since the epoch, like ``time.time``, but only moving when :meth:`advance` is called."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """A running SandboxServer with default settings."""
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """``sandbox_factory(rate=3, window=1, drop=1.0, ...)`` -> a running SandboxServer, stopped after the test.

    ``clock=`` (a :class:`FakeClock`, say) is passed to the server; every other keyword goes to SandboxConfig.
    """
    started: list[SandboxServer] = []

    def make(*, clock: Callable[[], float] = time.time, **config: Any) -> SandboxServer:
        server = SandboxServer(SandboxConfig(**config), clock=clock).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
