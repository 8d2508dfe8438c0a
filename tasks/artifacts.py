"""What the Prefect UI shows about a sync run: progress, summary, problem rows, the run event, asset lineage.

The flow awaits these plain async functions (no ``@task`` wrappers, so they add no task runs):

- ``start_progress(total_rows)`` creates the progress artifact at 0 % and returns a ``ProgressHandle``;
  ``advance_progress(handle, done_rows)`` (cumulative) or ``add_progress(handle, rows)`` (a delta, for the
  loader's per-chunk ``on_chunk_done``) moves it as chunks land (at most one API call per whole percent and per second).
- ``publish_run(summary, problems, source_uri=..., target_url=...)`` creates the markdown summary, the table of
  up to 100 failed or rejected rows, emits the ``apollo-sync.run.completed`` event with the counts, and records
  asset lineage source -> Apollo contacts through a one-off ``@materialize`` task.

The rendering helpers (``summary_markdown``, ``problem_rows``, ``event_payload``, ``asset_key``, ``redact_uri``)
are pure and tested without a server. Nothing here ever receives the API key; URIs are shown without user
info, query or fragment, because those are where credentials hide.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_logger
from prefect.runtime import flow_run

from apollo_sync.redact import redact_url

PROGRESS_KEY = "apollo-sync-progress"
SUMMARY_KEY = "apollo-sync-summary"
PROBLEMS_KEY = "apollo-sync-problems"
"""Artifact keys: lowercase letters, digits and dashes. Each run adds a version under the same key."""
RUN_COMPLETED_EVENT = "apollo-sync.run.completed"
RUN_RESOURCE_PREFIX = "apollo-sync.run."
MAX_PROBLEM_ROWS = 100
PROGRESS_MIN_SECONDS = 1.0
"""Least time between two progress updates before 100 %: each update is an API call and a database write, and
a run sending 30,000 contacts in 3 s would otherwise make 100 (0.9 s of its event loop's time in a profile)."""
PROBLEM_COLUMNS = ("source_row", "email", "outcome", "reason")
COUNT_KEYS = ("created", "updated", "existing", "unchanged", "failed", "unconfirmed")
"""Outcomes of contacts that were sent (or skipped as unchanged), in the order the summary shows them."""
MATERIALIZED_BY = "apollo-sync"
_MAX_ASSET_KEY = 512
_ASSET_FORBIDDEN = re.compile(r"[\s#?&%\"'<>\[\]{}|\\^`\x00]")

logger = get_logger("apollo_sync.artifacts")


# --- Progress -------------------------------------------------------------------------------


@dataclass
class ProgressHandle:
    """The progress artifact of one run and what it last showed. Safe to advance from concurrent coroutines."""

    artifact_id: uuid.UUID | None
    total_rows: int
    done_rows: int = 0
    shown_percent: float = 0.0
    shown_at: float = float("-inf")
    """time.monotonic() of the last update (the first move is shown at once)."""
    updates: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


def percent_done(done_rows: int, total_rows: int) -> float:
    """Progress in percent (0-100); an empty run counts as complete."""
    if total_rows <= 0:
        return 100.0
    return round(100.0 * min(max(done_rows, 0), total_rows) / total_rows, 1)


async def start_progress(total_rows: int, *, key: str = PROGRESS_KEY, growing: bool = False) -> ProgressHandle:
    """Create the run's progress artifact (0 %, or 100 % when there is nothing to send) and return its handle.

    Args:
        total_rows: Rows the run will account for; ``advance_progress`` reports against this.
        key: Artifact key (lowercase letters, digits, dashes).
        growing: The total grows as the run goes (a streaming run plans each part as it is cleaned): start at 0 %
            and describe it as the rows planned so far; set ``handle.total_rows`` as it grows.
    """
    start = 0.0 if growing else percent_done(0, total_rows)
    described = "Contacts sent out of those planned so far" if growing else f"Contacts processed out of {total_rows:,}"
    artifact_id = await acreate_progress_artifact(progress=start, key=key, description=described)
    return ProgressHandle(artifact_id=artifact_id, total_rows=total_rows, shown_percent=start)


async def advance_progress(handle: ProgressHandle, done_rows: int) -> None:
    """Report that ``done_rows`` rows in total (cumulative, not a delta) are done.

    Calls may arrive out of order from concurrent chunks: the highest count wins. The artifact is updated only
    when the shown value moves by a whole percent (and PROGRESS_MIN_SECONDS passed since the last update) or
    reaches 100 %, so a run costs at most ~100 API calls, and a short run only a few.
    A failed update is logged as a warning and does not stop the load: progress is a view, not the work.
    """
    async with handle._lock:
        handle.done_rows = max(handle.done_rows, done_rows)
        await _show(handle)


async def add_progress(handle: ProgressHandle, rows: int) -> None:
    """Report ``rows`` more rows done (a delta): fits the loader's ``on_chunk_done``, called once per chunk.

    ``on_chunk_done=lambda result: add_progress(handle, result.rows)``; same throttling as
    ``advance_progress``, and the two can be mixed (a cumulative count never moves the bar backwards).
    """
    async with handle._lock:
        handle.done_rows += rows
        await _show(handle)


async def _show(handle: ProgressHandle) -> None:
    """Update the artifact if the value moved by a whole percent a while after the last update, or reached 100 %
    (caller holds the lock)."""
    percent = percent_done(handle.done_rows, handle.total_rows)
    now = time.monotonic()
    if percent < 100.0 and (percent - handle.shown_percent < 1.0 or now - handle.shown_at < PROGRESS_MIN_SECONDS):
        return
    if percent == handle.shown_percent or handle.artifact_id is None:
        return
    try:
        await aupdate_progress_artifact(artifact_id=handle.artifact_id, progress=percent)
    except Exception as exc:  # noqa: BLE001 - the load must go on; the next update may succeed
        logger.warning("Could not update the progress artifact: %s", type(exc).__name__)
        return
    handle.shown_percent = percent
    handle.shown_at = now
    handle.updates += 1


# --- Rendering (pure) -----------------------------------------------------------------------


def asset_key(uri: str) -> str:
    """A valid Prefect asset key for a source or target: redacted, ``file://`` for paths, no forbidden characters."""
    clean = redact_url(uri)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", clean):
        clean = "file://" + os.path.abspath(os.path.expanduser(clean))
    scheme, rest = clean.split("://", 1)
    rest = _ASSET_FORBIDDEN.sub("-", rest)
    return f"{scheme.lower()}://{rest}"[:_MAX_ASSET_KEY]


def contacts_asset_key(target_url: str) -> str:
    """Asset key of the contacts collection behind a base URL, e.g. ``https://host/api/v1/contacts``."""
    return asset_key(redact_url(target_url).rstrip("/") + "/contacts")


def _count(summary: Mapping[str, Any], key: str) -> int:
    value = summary.get(key) or 0
    return int(value)


def _rejected(summary: Mapping[str, Any]) -> dict[str, int]:
    rejected = summary.get("rejected") or {}
    return {str(reason): int(n) for reason, n in sorted(rejected.items())}


def event_payload(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The counts an automation can act on: every outcome, rejects (total and by reason), requests, timing."""
    rejected = _rejected(summary)
    payload: dict[str, Any] = {key: _count(summary, key) for key in COUNT_KEYS}
    payload |= {
        "rows_read": _count(summary, "rows_read"),
        "rows_valid": _count(summary, "rows_valid"),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "duplicates_in_source": _count(summary, "duplicates_in_source"),
        "requests": _count(summary, "requests"),
        "retries": _count(summary, "retries"),
        "seconds": round(float(summary.get("seconds") or 0.0), 3),
    }
    return payload


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.1f}/s" if seconds > 0 else "n/a"


def summary_markdown(summary: Mapping[str, Any], *, source_uri: str, target_url: str) -> str:
    """The run summary as markdown: where from/to, counts by outcome, rejects by reason, requests, throughput."""
    p = event_payload(summary)
    seconds = p["seconds"]
    sent = sum(p[key] for key in ("created", "updated", "existing", "failed", "unconfirmed"))
    lines = [
        "# apollo-sync run",
        "",
        f"**Source:** `{redact_url(source_uri)}`  ",
        f"**Target:** `{redact_url(target_url)}`",
        "",
        "| outcome | contacts |",
        "|---|---:|",
    ]
    lines += [f"| {key} | {p[key]:,} |" for key in COUNT_KEYS]
    lines += [
        f"| rejected | {p['rejected']:,} |",
        f"| duplicate in source | {p['duplicates_in_source']:,} |",
        "",
        f"Rows read: **{p['rows_read']:,}**, valid: **{p['rows_valid']:,}**.",
        "",
    ]
    if p["rejected_by_reason"]:
        lines += ["| rejected because | rows |", "|---|---:|"]
        lines += [f"| {reason} | {n:,} |" for reason, n in p["rejected_by_reason"].items()]
        lines.append("")
    lines += [
        "| requests | retries | duration | rows read | contacts sent |",
        "|---:|---:|---:|---:|---:|",
        f"| {p['requests']:,} | {p['retries']:,} | {seconds:,.1f} s | {_rate(p['rows_read'], seconds)} "
        f"| {_rate(sent, seconds)} |",
    ]
    return "\n".join(lines) + "\n"


def problem_rows(problems: pl.DataFrame, limit: int = MAX_PROBLEM_ROWS) -> list[dict[str, Any]]:
    """Up to ``limit`` problem rows (source_row, email, outcome, reason), in source order, as table records.

    ``problems`` needs ``source_row`` and ``reason``; a missing ``email`` shows empty and a missing ``outcome``
    shows ``rejected`` (the shape of ``Prepared.rejected``). Other columns are ignored, so no raw row data
    (``original``) reaches the artifact.
    """
    frame = problems
    if "email" not in frame.columns:
        frame = frame.with_columns(email=pl.lit(None, dtype=pl.String))
    if "outcome" not in frame.columns:
        frame = frame.with_columns(outcome=pl.lit("rejected"))
    return (
        frame.select(
            pl.col("source_row").cast(pl.Int64),
            pl.col("email").cast(pl.String),
            pl.col("outcome").cast(pl.String),
            pl.col("reason").cast(pl.String),
        )
        .sort("source_row", nulls_last=True)
        .head(limit)
        .to_dicts()
    )


# --- Publishing -----------------------------------------------------------------------------


def _run_resource(summary: Mapping[str, Any]) -> dict[str, str]:
    run_id = flow_run.get_id() or f"local-{uuid.uuid4()}"
    failed = _count(summary, "failed")
    resource = {
        "prefect.resource.id": f"{RUN_RESOURCE_PREFIX}{run_id}",
        "apollo-sync.failed": str(failed),
        "apollo-sync.has-failures": "true" if failed or _count(summary, "unconfirmed") else "false",
    }
    if name := flow_run.get_name():
        resource["prefect.resource.name"] = name
    return resource


async def _record_lineage(summary: Mapping[str, Any], *, source_uri: str, target_url: str) -> None:
    """Run a one-off ``@materialize`` task so Prefect records source -> Apollo contacts with the counts."""
    source = asset_key(source_uri)
    target = Asset(
        key=contacts_asset_key(target_url),
        properties=AssetProperties(name="Apollo contacts", description="Contacts created or updated by apollo-sync"),
    )
    metadata = {key: _count(summary, key) for key in ("created", "updated", "existing", "failed", "unconfirmed", "requests")}

    async def record_contacts_lineage() -> None:
        add_asset_metadata(target.key, metadata)

    lineage_task = materialize(
        target,
        asset_deps=[source],
        by=MATERIALIZED_BY,
        name="record-contacts-lineage",
        cache_policy=NO_CACHE,
        persist_result=False,
    )(record_contacts_lineage)
    await lineage_task()


async def publish_run(
    summary: Mapping[str, Any],
    problems: pl.DataFrame,
    *,
    source_uri: str,
    target_url: str,
) -> None:
    """Publish what happened in this run: summary and problems artifacts, the run event, asset lineage.

    Args:
        summary: The flow's summary dict (rows_read, rows_valid, rejected{reason: n}, duplicates_in_source,
            created, existing, failed, unconfirmed, unchanged, requests, retries, seconds).
        problems: Failed and rejected rows: source_row, reason, and usually email and outcome.
        source_uri: Where the contacts came from (shown without credentials).
        target_url: The base URL the contacts went to (shown without credentials).

    The event ``apollo-sync.run.completed`` has resource id ``apollo-sync.run.<flow_run_id>`` with the labels
    ``apollo-sync.failed`` (a count) and ``apollo-sync.has-failures`` (``true``/``false``) for automations to
    match, and every count in its payload. Lineage is recorded only when requests were sent.
    """
    await acreate_markdown_artifact(
        markdown=summary_markdown(summary, source_uri=source_uri, target_url=target_url),
        key=SUMMARY_KEY,
        description="apollo-sync run summary",
    )
    rows = problem_rows(problems)
    shown = f"first {len(rows)} of {problems.height:,}" if problems.height > len(rows) else f"{len(rows)}"
    await acreate_table_artifact(
        table=rows,
        key=PROBLEMS_KEY,
        description=f"Failed or rejected rows ({shown})" if rows else "No failed or rejected rows",
    )
    emit_event(
        event=RUN_COMPLETED_EVENT,
        resource=_run_resource(summary),
        related=[
            {"prefect.resource.id": asset_key(source_uri), "prefect.resource.role": "source"},
            {"prefect.resource.id": contacts_asset_key(target_url), "prefect.resource.role": "target"},
        ],
        payload=event_payload(summary),
    )
    if _count(summary, "requests") > 0:
        await _record_lineage(summary, source_uri=source_uri, target_url=target_url)
