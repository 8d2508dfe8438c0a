"""Helpers for the loader tests: contact frames shaped like prepare()'s, and one call that plans and loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from apollo_sync.client import ApolloClient
from apollo_sync.ledger import open_ledger, target_for
from apollo_sync.loader import GroupResult, LoadSession
from apollo_sync.pacing import Pacer


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
    """Plan against the ledger (if any), load what is to send; returns (result, session, unchanged)."""
    ledger = open_ledger(state_dir) if state_dir is not None else None
    target = target_for(base_url)
    try:
        if ledger is not None:
            to_send, unchanged = ledger.plan(target, contacts, full_refresh)
        else:
            to_send, unchanged = contacts, contacts.clear()
        session.setdefault("run_id", "test-run")
        async with ApolloClient(base_url, key, timeout=timeout) as client:
            loader = LoadSession(client, session.pop("pacer", None) or Pacer(), ledger, target=target, **session)
            result = await loader.load(loader.make_chunks(to_send))
        return result, loader, unchanged
    finally:
        if ledger is not None:
            ledger.close()


def stored_emails(sandbox: Any) -> list[str]:
    """Every email the sandbox holds (one per stored contact, so duplicates show)."""
    return [c["email"] for c in sandbox.contacts()]
