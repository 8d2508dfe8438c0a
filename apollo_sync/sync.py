"""One ``sync-contacts`` run as plain code: read, clean, and per part plan and send; then report.

:func:`run_sync` is the whole run. It calls each stage through a :class:`Steps` object: the plain functions of
this module by default (tests, benchmarks, a script without Prefect), or the Prefect tasks that wrap the same
functions, which is how the ``sync-contacts`` flow runs it (``tasks.steps.PREFECT_STEPS``)::

    read ──▶ clean (a thread) ──▶ each part as it is final ──▶ plan ──▶ send × groups ──▶ report ──▶ publish
    source   map, validate,       (Feed: a few parts ahead)    ledger:   ≤100 contacts a    summary.json,
    (lazy)   dedupe                                            this part's  request, paced,  results files
                                                               identities   retried

Sending streams: the cleaning runs in a thread and hands each final part of contacts over (``apollo_sync.feed``);
each part is planned against the ledger (only its identities are looked up) and sent in groups of
``settings.CHUNKS_PER_LOAD_TASK`` chunks, two groups in flight so no request slot idles at a group's end, while
the next part is cleaned. Outcomes are written as they come (``report.ResultsStream``), so memory follows a few
parts, never the source, and a killed run leaves the results of what it sent.

Every input row ends in exactly one outcome (``apollo_sync.report``). Loading is never cached: the ledger is the
memory of what landed, and a repeated run plans again from it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from apollo_sync import settings
from apollo_sync.clean import Prepared, load_mapping, prepare
from apollo_sync.clean.payload import contact_field_hashes, payload_fields
from apollo_sync.errors import ApolloSyncError, InputError, RunStopped
from apollo_sync.feed import Feed
from apollo_sync.files import check_writable_dir, private_dir, private_tree
from apollo_sync.ledger import Ledger, open_ledger, target_for
from apollo_sync.params import Format, RunParams, SourceParams, SyncParams
from apollo_sync.partitions import lost_rows
from apollo_sync.processes import run_gc
from apollo_sync.redact import redact_url
from apollo_sync.report import (
    ResultsStream,
    build_summary,
    results_frame,
    summary_problems,
    write_report,
)
from apollo_sync.send import (
    Group,
    GroupSent,
    Plan,
    Sender,
    Sent,
    Stream,
)
from apollo_sync.sources import Source, SourceOptions, read_source

logger = logging.getLogger("apollo_sync.sync")

PROBLEM_OUTCOMES = ("failed", "rejected", "unconfirmed")


class RunAborted(ApolloSyncError):
    """The run stopped before every row was sent (a wrong key, an API that never answered); the report says which."""


@dataclass
class SyncRun:
    """What every stage of one run shares: its settings, id, target, report folder and the open ledger."""

    params: SyncParams
    run_id: str
    target: str
    report_dir: Path
    ledger: Ledger
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    """The same moment as epoch seconds (``summary.json``'s ``started_at``)."""

    @property
    def cursor_key(self) -> str | None:
        """The ledger key of the source's high-water mark (incremental SQL), per target; no password in it."""
        source = self.params.source
        if not source.cursor_column:
            return None
        text = f"{self.target}|{redact_url(source.path)}|{source.query}|{source.cursor_column}"
        return "cursor:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def open_run(params: SyncParams, run_id: str | None = None) -> SyncRun:
    """Check the folders, open the ledger and fix the report folder (``<state_dir>/runs/<time>-<run id>`` unless
    ``run.report_dir``): all before anything is read or sent."""
    run = params.run
    run_id = run_id or str(uuid.uuid4())
    check_folders(params)
    default = Path(run.state_dir) / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{run_id[:8]}"  # one per run
    report_dir = Path(run.report_dir) if run.report_dir else default
    ledger = open_ledger(run.state_dir, run.state_url)
    return SyncRun(params, run_id, target_for(params.apollo.base_url), report_dir, ledger)


def check_folders(params: SyncParams) -> None:
    """The state and report folders can be written (InputError otherwise): a report that cannot be written
    after the contacts were sent would leave their outcomes unknown."""
    check_writable_dir(params.run.state_dir, "--state-dir")
    if params.run.report_dir:
        check_writable_dir(params.run.report_dir, "--report-dir")


def source_options(source: SourceParams, cursor_after: str | None = None) -> SourceOptions:
    """How ``apollo_sync.sources`` reads the source (``cursor_after``: the last confirmed cursor value)."""
    return SourceOptions(
        format=None if source.format == Format.auto else source.format.value,
        delimiter=source.delimiter,
        encoding=source.encoding,
        query=source.query,
        cursor_column=source.cursor_column,
        cursor_after=cursor_after,
    )


def preflight(params: SyncParams) -> None:
    """Open the source, read the mapping and check the columns, before anything starts; raises InputError.

    The CLI calls it before Prefect starts, so a mistake costs one line and a second, not a traceback and ten.
    """
    check_folders(params)
    mapping = params.cleaning.mapping
    if mapping and not Path(mapping).is_file():
        raise InputError(f"mapping file not found: {mapping}; pass an existing TOML file to --mapping")
    source = read_source(params.source.path, source_options(params.source))
    loaded = load_mapping(mapping) if mapping else None
    prepare(source.frame.head(0), mapping=loaded, phone_region=params.cleaning.phone_region)


# --- The stages, as plain functions (tasks/ wraps each in a Prefect task) ----------------------------------------


def clean_contacts(
    source: Source,
    mapping: str | None,
    phone_region: str,
    prepared_dir: str | None = None,
    on_ready: Callable[[pl.DataFrame], None] | None = None,
) -> Prepared:
    """Map, clean, validate and dedupe (``apollo_sync.clean``); Parquet parts under ``prepared_dir`` when given;
    ``on_ready`` gets each final part of contacts."""
    loaded = load_mapping(mapping) if mapping else None
    return prepare(source.frame, mapping=loaded, phone_region=phone_region, out_dir=prepared_dir, on_ready=on_ready)


def plan_contacts(
    ledger: Ledger,
    target: str,
    part: pl.DataFrame,
    number: int = 0,
    *,
    full_refresh: bool,
    dry_run: bool,
    mode: str = "create",
    labels: tuple[str, ...] = (),
    run_params: RunParams | None = None,
) -> Plan:
    """Ask the ledger which contacts of ``part`` are new or changed (``upsert``: and which to update by id). Each
    gets its field hashes (``labels``: the run's), which the ledger keeps once Apollo confirms.

    In a partition child (``run_params`` names its parent run) the rows whose contact another partition sends
    are taken out first (``Plan.elsewhere``: they end as ``duplicate``)."""
    elsewhere = lost_rows(ledger, run_params, part) if run_params is not None else None
    if elsewhere is not None and elsewhere.height:
        part = part.join(elsewhere.select(settings.SOURCE_ROW, "identity"), on=[settings.SOURCE_ROW, "identity"],
                         how="anti", maintain_order="left")  # fmt: skip
    fields = payload_fields(part.columns)
    part = part.with_columns(contact_field_hashes(fields, labels).alias("field_hashes"))
    to_send, unchanged = ledger.plan(target, part, full_refresh=full_refresh, mode=mode)
    return Plan(number, to_send, unchanged, dry_run, elsewhere=elsewhere if elsewhere is not None and elsewhere.height else None)


def in_thread(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``fn`` as a coroutine function that runs it in a thread, with ``fn``'s signature (a Prefect task made of it
    binds its arguments by that). The event loop answers the requests in flight meanwhile, and as an async task it
    shares the flow's Prefect client: a sync task run opens a client of its own, whose TLS context holds the GIL
    about 20 ms."""

    @functools.wraps(fn)
    async def in_a_thread(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    in_a_thread.__doc__ = f":func:`{fn.__name__}` in a thread."
    return in_a_thread


plan_in_thread = in_thread(plan_contacts)


async def send_group(sender: Sender, plan: Plan, group: Group) -> GroupSent:
    """Send ``group``, chunks of ``plan``'s rows, through the run's shared session and write every row's outcome to
    the results (``plan`` links the step to the part it came from in the Prefect UI)."""
    result = await sender.session.load(group.chunks)
    await asyncio.to_thread(sender.results.add, result.outcomes)  # a CSV and a Parquet write: not on the loop
    return GroupSent(result.outcomes.height, result.stats, result.stopped)


def write_run_report(run: SyncRun, prepared: Prepared, results: ResultsStream, sent: Sent) -> dict:
    """Every row's outcome and the summary: summary.json, results.parquet/.csv, rejected.csv. Returns the summary."""
    every = results_frame(prepared.rejected, prepared.duplicates, results.frame())
    stats = sent.stats
    summary = build_summary(
        rows_read=prepared.rows_read,
        results=every,
        requests=stats.get("requests", 0),
        retries=stats.get("retries", 0),
        seconds=time.monotonic() - run.started,
        extra={
            "dry_run": run.params.run.dry_run,
            "unmapped_columns": prepared.unmapped_columns,
            "phones_dropped": prepared.phones_dropped,
            "phones_dropped_by_reason": prepared.phones_dropped_by_reason,  # invalid, unparseable
            "rate_limited": stats.get("http_429", 0),
            "claimed_elsewhere": stats.get("claimed_elsewhere", 0),  # counted in duplicates_in_source too
            "started_at": datetime.fromtimestamp(run.started_at, timezone.utc).isoformat(timespec="milliseconds"),
            "first_request_seconds": sent.first_request_seconds,
            "report_dir": str(run.report_dir.resolve()),
        },
    )
    for problem in summary_problems(summary):
        logger.error("Summary does not add up: %s", problem)
    write_report(run.report_dir, summary, every, prepared.rejected)
    results.remove()
    return summary


read_in_thread = in_thread(read_source)
report_in_thread = in_thread(write_run_report)


def problem_rows(report_dir: str | Path) -> pl.DataFrame:
    """The failed, rejected and unconfirmed rows of a written report (for the problems artifact)."""
    path = Path(report_dir) / "results.parquet"
    return pl.scan_parquet(path).filter(pl.col("outcome").is_in(PROBLEM_OUTCOMES)).collect(engine="streaming")


@dataclass(frozen=True)
class Steps:
    """How :func:`run_sync` runs each stage. The defaults are this module's plain functions; the flow passes
    Prefect tasks wrapping the same functions (``tasks.steps``), so the run shows in the UI as a task graph."""

    read: Callable[[str, SourceOptions], Awaitable[Source]] = read_in_thread
    """``read_source``'s arguments, awaited (the work runs in a thread)."""
    clean: Callable[..., Prepared] = clean_contacts
    """``clean(source, mapping, phone_region, prepared_dir, on_ready)``, called in a thread."""
    plan: Callable[..., Awaitable[Plan]] = plan_in_thread
    """``plan_contacts``'s arguments; awaited once per part (the work runs in a thread)."""
    send: Callable[[Sender, Plan, Group], Awaitable[GroupSent]] = send_group
    report: Callable[[SyncRun, Prepared, ResultsStream, Sent], Awaitable[dict]] = report_in_thread
    """``write_run_report``'s arguments, awaited (the work runs in a thread)."""
    api_key: Callable[[str | None], Awaitable[str]] | None = None
    """Where the key comes from (given the Secret block name); default: the environment."""
    show_progress: Callable[[], Awaitable[Callable[[int, int], Awaitable[None]]]] | None = None
    """Returns what to call with each chunk's row count and the rows planned so far (the flow: a progress artifact)."""
    rate_limit: Callable[[str, str | None], Callable[[], Awaitable[Any]]] | None = None
    """Given ``load.rate_limit_name`` and ``run.state_url``, the acquire awaited before every request (the flow: a
    token bucket in a PostgreSQL ledger, else a Prefect global rate limit: ``tasks.budget``)."""
    publish: Callable[..., Awaitable[None]] | None = None
    """After the report: ``publish(summary, problems, source_uri=..., target_url=...)`` (the flow: artifacts, event)."""
    prepared_dir: Callable[[SyncRun], str | None] | None = None
    """Where ``clean`` puts its Parquet parts; default: a folder of this run under ``<state_dir>/prepared``, removed
    at the end (the flow's cached task keeps its parts between runs and prunes them itself)."""


PLAIN_STEPS = Steps()


# --- The whole run ------------------------------------------------------------------------------------------------


async def run_sync(params: SyncParams, *, steps: Steps = PLAIN_STEPS, run_id: str | None = None) -> dict:
    """Run one sync and return its summary (also written to ``summary.json``).

    Raises :class:`RunAborted` after the report is written when the run had to stop (a wrong key, an API that
    never answered); InputError/ConfigError for bad input before anything is sent.
    """
    with run_gc():
        return await _run(params, steps, run_id)


async def _run(params: SyncParams, steps: Steps, run_id: str | None) -> dict:
    run = open_run(params, run_id)
    cleaned_parts: str | None = None
    try:
        mark = run.ledger.get_mark(run.cursor_key) if run.cursor_key else None
        source = await steps.read(params.source.path, source_options(params.source, mark))
        if steps.prepared_dir is not None:
            parts = steps.prepared_dir(run)
        else:
            parts = cleaned_parts = str(Path(params.run.state_dir) / "prepared" / f"run-{run.run_id}.tmp")
        if parts:
            private_dir(Path(parts).parent)  # the cleaned rows are in there
        prepared, stream = await stream_parts(run, steps, source, parts)
        if cleaned_parts and Path(cleaned_parts).exists():
            private_tree(cleaned_parts)
        summary = await steps.report(run, prepared, stream.results, stream.sent)
        stopped = stream.sent.stopped
        _advance_cursor(run, source, summary, stopped)
        if steps.publish is not None:
            await steps.publish(summary, problem_rows(run.report_dir), source_uri=source.uri, target_url=params.apollo.base_url)
    finally:
        run.ledger.close()
        if cleaned_parts is not None:
            shutil.rmtree(cleaned_parts, ignore_errors=True)
    _log_done(summary)
    if stopped is not None:
        raise RunAborted(f"{stopped}; the rows not sent are marked failed in {summary['report_dir']}")
    return summary


async def stream_parts(run: SyncRun, steps: Steps, source: Source, parts: str | None) -> tuple[Prepared, Stream]:
    """Clean in a thread while each final part is planned and sent; returns the Prepared and the finished stream."""
    params = run.params
    feed = Feed()

    def clean() -> Prepared:
        try:
            return steps.clean(source, params.cleaning.mapping, params.cleaning.phone_region, parts, feed.put)
        finally:
            feed.end()

    cleaning = asyncio.ensure_future(asyncio.to_thread(clean))
    stream = Stream(run, steps, ResultsStream(run.report_dir))
    try:
        number = 0
        async for part in feed.parts(cleaning):
            plan = await steps.plan(
                run.ledger, run.target, part, number, full_refresh=params.run.full_refresh,
                dry_run=params.run.dry_run, mode=params.run.mode.value, labels=tuple(params.apollo.labels),
                run_params=params.run,
            )  # fmt: skip
            number += 1
            await stream.take(plan)
        await stream.take_rest()
        _log_prepared(cleaning.result(), source)
        await stream.finish()
    finally:
        feed.close()
        await stream.close()
        if not cleaning.done():
            await asyncio.gather(cleaning, return_exceptions=True)
    return cleaning.result(), stream


def _log_prepared(prepared: Prepared, source: Source) -> None:
    logger.info("Read %d rows from %s: %d to load, %d rejected, %d duplicates in source", prepared.rows_read,
                source.description, prepared.contacts_count, prepared.rejected_count, prepared.duplicates_count)  # fmt: skip
    if prepared.unmapped_columns:
        logger.info("Columns not sent (unmapped): %s", ", ".join(prepared.unmapped_columns))


def _advance_cursor(run: SyncRun, source: Source, summary: dict, stopped: RunStopped | None) -> None:
    """Move the incremental cursor only when every row of a real run is confirmed."""
    if run.cursor_key is None or source.cursor_max is None or run.params.run.dry_run or stopped is not None:
        return
    if summary["failed"] == 0 and summary["unconfirmed"] == 0:
        run.ledger.set_mark(run.cursor_key, source.cursor_max)
    else:
        logger.warning("Cursor not advanced: some rows are failed or unconfirmed; the next run reads them again")


def _log_done(summary: dict) -> None:
    if summary.get("dry_run"):
        logger.info("Dry run: %d rows would be created, %d updated, %d unchanged since the last sync",
                    summary.get("would_send", 0), summary.get("would_update", 0), summary["unchanged"])  # fmt: skip
    logger.info("Done in %.1fs: %d created, %d updated, %d existing, %d unchanged, %d failed, %d unconfirmed; "
                "report in %s", summary["seconds"], summary["created"], summary["updated"], summary["existing"],
                summary["unchanged"], summary["failed"], summary["unconfirmed"], summary["report_dir"])  # fmt: skip
