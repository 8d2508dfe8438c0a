"""Helpers for the loader tests: contact frames shaped like prepare()'s, one call that plans and loads, a
recording fake ``sleep`` for LoadSession (retry waits noted, not waited), and a fake clock that a Pacer sleeps on
and a sandbox reads (rate windows passed without waiting for them)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import polars as pl
from sandbox_fixtures import FakeClock

from apollo_sync.ledger import open_ledger, target_for
from apollo_sync.load import ApolloClient, GroupResult, LoadConfig, LoadSession, Pacer, RetryPolicy

CONFIG_FIELDS = {f.name for f in dataclasses.fields(LoadConfig)}
POLICY_FIELDS = {f.name for f in dataclasses.fields(RetryPolicy)}


class RecordingSleep:
    """A fake ``sleep`` for LoadSession: notes every wait asked for and returns after one event-loop turn.

    ``before_return(seconds)``, if given, is awaited first: a test can make a wait last until something happened
    (the sandbox stored a request) instead of guessing how long that takes.
    """

    def __init__(self, before_return: Callable[[float], Any] | None = None):
        self.waits: list[float] = []
        self.before_return = before_return

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.before_return is not None:
            await self.before_return(seconds)
        await asyncio.sleep(0)


class SteppingClock(FakeClock):
    """A fake clock for a Pacer and a sandbox at once: the pacer's sleeps step it (and are noted in ``sleeps``),
    and the sandbox (``sandbox_factory(clock=...)``) counts its rate windows on the same time, so a window the
    pacer waits out has reset on the server too, at once."""

    def __init__(self, now: float = 1_700_000_000.0):
        super().__init__(now)
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def pacer(self, **kw: Any) -> Pacer:
        """A Pacer on this clock (monotonic and wall clock both)."""
        return Pacer(clock=self, sleep=self.sleep, wall=self, **kw)


async def wait_until(condition: Callable[[], bool], *, deadline: float = 15.0) -> None:
    """Poll ``condition`` until true; fail after ``deadline`` seconds (a safety net, not a timing assumption)."""
    give_up_at = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up_at:
            raise AssertionError("the condition never became true")
        await asyncio.sleep(0.01)


def make_contacts(n: int, *, start: int = 1, title: str = "Analyst", bad_rows: tuple[int, ...] = ()) -> pl.DataFrame:
    """``n`` contacts u<i>@example.com with the columns prepare() gives; ``bad_rows`` get a payload the API refuses."""
    rows: list[dict[str, Any]] = []
    for i in range(start, start + n):
        payload: dict[str, Any] = {"first_name": f"First{i}", "last_name": f"Last{i}", "email": f"u{i}@example.com",
                                   "organization_name": f"Org{i % 7}", "title": title}
        if i in bad_rows:
            payload["email"] = i  # a number: the sandbox answers 422 for the whole request
        text = json.dumps(payload, sort_keys=True)
        rows.append({
            "source_row": i,
            "identity": f"email:u{i}@example.com",
            "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16],
            "payload": text,
            "email": f"u{i}@example.com",
            "first_name": f"First{i}",
            "last_name": f"Last{i}",
            "organization_name": f"Org{i % 7}",
        })
    return pl.DataFrame(rows, schema_overrides={"source_row": pl.Int64})


async def plan_and_load(
    base_url: str, contacts: pl.DataFrame, state_dir: Path | None, *, key: str = "sandbox-key", timeout: float = 5.0,
    full_refresh: bool = False, **session: Any,
) -> tuple[GroupResult, LoadSession, pl.DataFrame]:
    """Plan against the ledger (if any), load what is to send; returns (result, session, unchanged).

    ``session`` takes LoadConfig fields (chunk_size, run_dedupe, ...), RetryPolicy fields (max_attempts,
    backoff_base, settle_seconds, ...) or a ``policy``, a ``pacer``, and LoadSession's keywords (``sleep``, hooks).
    """
    ledger = open_ledger(state_dir) if state_dir is not None else None
    target = target_for(base_url)
    try:
        if ledger is not None:
            to_send, unchanged = ledger.plan(target, contacts, full_refresh)
        else:
            to_send, unchanged = contacts, contacts.clear()
        session.setdefault("run_id", "test-run")
        config = LoadConfig(target, **{k: session.pop(k) for k in list(session) if k in CONFIG_FIELDS})
        policy_fields = {k: session.pop(k) for k in list(session) if k in POLICY_FIELDS}
        policy = session.pop("policy", None) or (RetryPolicy(**policy_fields) if policy_fields else None)
        async with ApolloClient(base_url, key, timeout=timeout) as client:
            pacer = session.pop("pacer", None) or Pacer()
            loader = LoadSession(client, pacer, ledger, config, policy=policy, **session)
            result = await loader.load(loader.make_chunks(to_send))
        return result, loader, unchanged
    finally:
        if ledger is not None:
            ledger.close()


def stored_emails(sandbox: Any) -> list[str]:
    """Every email the sandbox holds (one per stored contact, so duplicates show)."""
    return [c["email"] for c in sandbox.contacts()]
