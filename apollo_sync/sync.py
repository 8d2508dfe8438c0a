"""One ``sync-contacts`` run as plain code: read, clean, plan, send, report.

:func:`run_sync` is the whole run. It calls each stage through a :class:`Steps` object: the plain functions of
this module by default (tests, benchmarks, a script without Prefect), or the Prefect tasks that wrap the same
functions, which is how the ``sync-contacts`` flow runs it (``tasks.steps.PREFECT_STEPS``)::

    read ──▶ clean ──▶ plan ──▶ send × N groups ──▶ report ──▶ publish
    source   map,      ledger:   ≤100 contacts a    summary.json,   artifacts,
    (lazy)   validate, new or    request, paced,    results,        event
             dedupe    changed   retried            cursor mark

Every input row ends in exactly one outcome (``apollo_sync.report``). Loading is never cached: the ledger is the
memory of what landed, and a repeated run plans again from it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from apollo_sync import settings
from apollo_sync.clean import Prepared, load_mapping, prepare
from apollo_sync.clean.payload import contact_field_hashes, payload_fields
from apollo_sync.errors import ApolloSyncError, ConfigError, InputError, RunStopped
from apollo_sync.files import check_writable_dir, private_dir, private_tree
from apollo_sync.ledger import Ledger, open_ledger, target_for
from apollo_sync.load import ApolloClient, Chunk, ChunkResult, GroupResult, LoadConfig, LoadSession, Pacer
from apollo_sync.load.update import would_change
from apollo_sync.params import Format, SourceParams, SyncParams
from apollo_sync.redact import api_key_from, redact_url
from apollo_sync.report import RESULTS_SCHEMA, Frame, build_summary, results_frame, summary_problems, write_report
from apollo_sync.sources import Source, SourceOptions, read_source

logger = logging.getLogger("apollo_sync.sync")

PROGRESS_LOG_SECONDS = 10.0
"""Least time between two progress lines in the log while contacts are sent."""
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

    @property
    def cursor_key(self) -> str | None:
        """The ledger key of the source's high-water mark (incremental SQL), per target; no password in it."""
        source = self.params.source
        if not source.cursor_column:
            return None
        text = f"{self.target}|{redact_url(source.path)}|{source.query}|{source.cursor_column}"
        return "cursor:" + hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """What the ledger made of the cleaned contacts: the rows to send (in chunks) and those unchanged."""

    to_send: Frame
    """Lazy in a dry run (streamed into the report), collected otherwise; ``must_dedupe`` marks rows seen before."""
    unchanged: Frame
    dry_run: bool

    @property
    def rows_to_send(self) -> int:
        return self.to_send.height if isinstance(self.to_send, pl.DataFrame) else 0


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


def clean_contacts(source: Source, mapping: str | None, phone_region: str, prepared_dir: str | None = None) -> Prepared:
    """Map, clean, validate and dedupe (``apollo_sync.clean``); Parquet parts under ``prepared_dir`` when given."""
    loaded = load_mapping(mapping) if mapping else None
    return prepare(source.frame, mapping=loaded, phone_region=phone_region, out_dir=prepared_dir)


def plan_contacts(
    ledger: Ledger,
    target: str,
    prepared: Prepared,
    *,
    full_refresh: bool,
    dry_run: bool,
    mode: str = "create",
    labels: tuple[str, ...] = (),
) -> Plan:
    """Ask the ledger which contacts are new or changed (``upsert``: and which to update by id); a real run collects
    only those. Each gets its field hashes (``labels``: the run's), which the ledger keeps once Apollo confirms."""
    contacts = prepared.contacts
    fields = payload_fields(contacts.collect_schema().names())
    contacts = contacts.with_columns(contact_field_hashes(fields, labels).alias("field_hashes"))
    to_send, unchanged = ledger.plan(target, contacts, full_refresh=full_refresh, mode=mode)
    if not dry_run and isinstance(to_send, pl.LazyFrame):
        to_send = to_send.collect(engine="streaming")
    return Plan(to_send, unchanged, dry_run)


async def send_group(sender: Sender, plan: Plan, group: int) -> GroupResult:
    """Send one group of chunks through the run's shared session (``plan`` is where the chunks came from)."""
    return await sender.session.load(sender.groups[group])


def write_run_report(run: SyncRun, prepared: Prepared, plan: Plan, sent: list[GroupResult]) -> dict:
    """Every row's outcome and the summary: summary.json, results.parquet/.csv, rejected.csv. Returns the summary."""
    outcomes = [as_outcomes(plan.unchanged, "unchanged")]
    if plan.dry_run:
        outcomes.append(would_send(plan.to_send))
    outcomes += [result.outcomes for result in sent]
    stopped = next((r.stopped for r in sent if r.stopped is not None), None)
    if stopped is not None:  # rows of the groups never sent are failed, so every row still has its outcome
        done = pl.concat([r.outcomes.select(settings.SOURCE_ROW) for r in sent])
        unsent = plan.to_send.join(done, on=settings.SOURCE_ROW, how="anti")
        outcomes.append(as_outcomes(unsent, "failed", reason=f"not sent: the run stopped ({stopped.message})"))
    results = results_frame(prepared.rejected, prepared.duplicates, pl.concat([o.lazy() for o in outcomes]))
    stats = _added_stats(sent)
    summary = build_summary(
        rows_read=prepared.rows_read,
        results=results,
        requests=stats.get("requests", 0),
        retries=stats.get("retries", 0),
        seconds=time.monotonic() - run.started,
        extra={
            "dry_run": plan.dry_run,
            "unmapped_columns": prepared.unmapped_columns,
            "phones_dropped": prepared.phones_dropped,
            "phones_dropped_by_reason": prepared.phones_dropped_by_reason,  # invalid, unparseable
            "rate_limited": stats.get("http_429", 0),
            "claimed_elsewhere": stats.get("claimed_elsewhere", 0),  # counted in duplicates_in_source too
            "report_dir": str(run.report_dir.resolve()),
        },
    )
    for problem in summary_problems(summary):
        logger.error("Summary does not add up: %s", problem)
    write_report(run.report_dir, summary, results, prepared.rejected)
    return summary


def problem_rows(report_dir: str | Path) -> pl.DataFrame:
    """The failed, rejected and unconfirmed rows of a written report (for the problems artifact)."""
    path = Path(report_dir) / "results.parquet"
    return pl.scan_parquet(path).filter(pl.col("outcome").is_in(PROBLEM_OUTCOMES)).collect(engine="streaming")


def as_outcomes(rows: Frame, outcome: str, reason: str | None = None) -> Frame:
    """``rows`` as results rows (source_row, email, outcome, apollo_id, reason) with one outcome for all; the
    rows' own ``apollo_id`` and ``reason`` columns are kept when they have them and no ``reason`` is given."""
    names = rows.collect_schema().names()
    has_id = "apollo_id" in names
    own_reason = reason is None and "reason" in names
    return rows.select(
        pl.col(settings.SOURCE_ROW).cast(pl.Int64),
        pl.col("email").cast(pl.String),
        pl.lit(outcome).alias("outcome"),
        (pl.col("apollo_id").cast(pl.String) if has_id else pl.lit(None, pl.String)).alias("apollo_id"),
        (pl.col("reason").cast(pl.String) if own_reason else pl.lit(reason, pl.String)).alias("reason"),
    ).cast(RESULTS_SCHEMA)


def would_send(to_send: Frame) -> Frame:
    """A dry run's outcomes: ``would_send`` (to Bulk Create), or in upsert mode ``would_update`` for the rows the
    ledger knows an Apollo id of, with the fields that changed since Apollo confirmed them as the reason (worked
    out for those rows only: the creates of a first run need no Python per row)."""
    if "update_id" not in to_send.collect_schema().names():
        return as_outcomes(to_send, "would_send")
    creates = as_outcomes(to_send.filter(pl.col("update_id").is_null()), "would_send")
    updates = to_send.filter(pl.col("update_id").is_not_null()).with_columns(
        apollo_id=pl.col("update_id"),
        reason=pl.struct("field_hashes", "base_hashes").map_elements(
            lambda row: would_change(row["field_hashes"], row["base_hashes"]), return_dtype=pl.String
        ),
    )
    return pl.concat([creates, as_outcomes(updates, "would_update")], how="vertical")


def _added_stats(sent: list[GroupResult]) -> dict[str, int]:
    total: dict[str, int] = {}
    for result in sent:
        for key, value in result.stats.as_dict().items():
            total[key] = total.get(key, 0) + value
    return total


# --- Sending ---------------------------------------------------------------------------------------------------


_watchers: list[Callable[[int, int, float], None]] = []


@contextmanager
def watching_progress(callback: Callable[[int, int, float], None]) -> Iterator[None]:
    """Call ``callback(done, total, contacts_per_second)`` after every chunk any run of this process sends, while in
    the block (the CLI's progress bar)."""
    _watchers.append(callback)
    try:
        yield
    finally:
        _watchers.remove(callback)


class Progress:
    """Counts sent rows and logs a progress line at most every :data:`PROGRESS_LOG_SECONDS` (and at the end);
    tells the watchers of :func:`watching_progress` after every chunk."""

    def __init__(self, total: int, show: Callable[[int], Awaitable[None]] | None = None):
        self.total = total
        self.done = 0
        self._show = show
        self._started = self._logged = time.monotonic()

    async def chunk_done(self, result: ChunkResult) -> None:
        self.done += result.outcomes.height
        now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-9)
        for watcher in list(_watchers):
            watcher(self.done, self.total, rate)
        if now - self._logged >= PROGRESS_LOG_SECONDS or (self.done >= self.total and self._logged != float("inf")):
            self._logged = now if self.done < self.total else float("inf")  # the last line once
            left = (self.total - self.done) / rate if rate else float("inf")
            logger.info("Progress: %d of %d contacts (%.0f%%), %.0f contacts/s, about %.0fs to go",
                        self.done, self.total, 100 * self.done / max(self.total, 1), rate, left)  # fmt: skip
        if self._show is not None:
            await self._show(result.outcomes.height)


@dataclass
class Sender:
    """The run's one HTTP client, pacer and load session, and the chunks it sends in groups (one task run each)."""

    session: LoadSession
    groups: list[list[Chunk]]


@dataclass(frozen=True)
class Steps:
    """How :func:`run_sync` runs each stage. The defaults are this module's plain functions; the flow passes
    Prefect tasks wrapping the same functions (``tasks.steps``), so the run shows in the UI as a task graph."""

    read: Callable[[str, SourceOptions], Source] = read_source
    clean: Callable[[Source, str | None, str, str | None], Prepared] = clean_contacts
    plan: Callable[..., Plan] = plan_contacts
    send: Callable[[Sender, Plan, int], Awaitable[GroupResult]] = send_group
    report: Callable[[SyncRun, Prepared, Plan, list[GroupResult]], dict] = write_run_report
    api_key: Callable[[str | None], Awaitable[str]] | None = None
    """Where the key comes from (given the Secret block name); default: the environment."""
    show_progress: Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]] | None = None
    """Given the rows to send, returns what to call with each chunk's row count (the flow: a progress artifact)."""
    rate_limit: Callable[[str], Callable[[], Awaitable[Any]]] | None = None
    """Given ``load.rate_limit_name``, the acquire awaited before every request (the flow: a Prefect rate limit)."""
    publish: Callable[..., Awaitable[None]] | None = None
    """After the report: ``publish(summary, problems, source_uri=..., target_url=...)`` (the flow: artifacts, event)."""
    prepared_dir: Callable[[SyncRun], str | None] | None = None
    """Where ``clean`` puts its Parquet parts; default: a folder of this run under ``<state_dir>/prepared``, removed
    at the end (the flow's cached task keeps its parts between runs and prunes them itself)."""


PLAIN_STEPS = Steps()


async def key_from_environment(block_name: str | None) -> str:
    """The API key from ``APOLLO_API_KEY`` (plain runs have no Secret blocks), registered for redaction."""
    import os

    key = os.environ.get(settings.ENV_API_KEY)
    if not key or not key.strip():
        raise ConfigError(f"no Apollo API key: set the {settings.ENV_API_KEY} environment variable (or pass --api-key)")
    return api_key_from(key)


async def open_sender(run: SyncRun, plan: Plan, steps: Steps) -> tuple[ApolloClient, Sender]:
    """The client (to close when done) and the sender for ``plan``'s rows, progress and rate limit wired in."""
    apollo, load = run.params.apollo, run.params.load
    key = await (steps.api_key or key_from_environment)(apollo.api_key_block)
    show = await steps.show_progress(plan.rows_to_send) if steps.show_progress else None
    progress = Progress(plan.rows_to_send, show)
    before = steps.rate_limit(load.rate_limit_name) if steps.rate_limit and load.rate_limit_name else None
    client = ApolloClient(apollo.base_url, key, auth=apollo.auth.value, timeout=load.timeout)
    await client.__aenter__()
    config = LoadConfig(target=run.target, run_id=run.run_id, labels=tuple(apollo.labels), run_dedupe=apollo.run_dedupe,
                        concurrency=load.concurrency, chunk_size=load.chunk_size, mode=run.params.run.mode.value)  # fmt: skip
    session = LoadSession(client, Pacer(max_rpm=load.max_rpm), run.ledger, config, before_request=before,
                          on_chunk_done=progress.chunk_done)  # fmt: skip
    chunks = session.make_chunks(plan.to_send)
    per = settings.CHUNKS_PER_LOAD_TASK
    return client, Sender(session, [chunks[i : i + per] for i in range(0, len(chunks), per)])


async def send_all(run: SyncRun, plan: Plan, steps: Steps) -> list[GroupResult]:
    """Send every group in order; after a stop (a 401, an API that never answers) the rest are not sent."""
    if plan.dry_run:
        return []
    if plan.rows_to_send == 0:
        logger.info("Nothing new or changed since the last sync: no request needed")
        return []
    client, sender = await open_sender(run, plan, steps)
    logger.info("Sending %d contacts in %d request(s), %d task run(s)",
                plan.rows_to_send, sum(len(g) for g in sender.groups), len(sender.groups))  # fmt: skip
    sent: list[GroupResult] = []
    try:
        for group in range(len(sender.groups)):
            sent.append(await steps.send(sender, plan, group))
            if sent[-1].stopped is not None:
                logger.error("Stopped: %s", sent[-1].stopped)
                break
    finally:
        await client.aclose()
    return sent


# --- The whole run ------------------------------------------------------------------------------------------------


async def run_sync(params: SyncParams, *, steps: Steps = PLAIN_STEPS, run_id: str | None = None) -> dict:
    """Run one sync and return its summary (also written to ``summary.json``).

    Raises :class:`RunAborted` after the report is written when the run had to stop (a wrong key, an API that
    never answered); InputError/ConfigError for bad input before anything is sent.
    """
    run = open_run(params, run_id)
    cleaned_parts: str | None = None
    try:
        mark = run.ledger.get_mark(run.cursor_key) if run.cursor_key else None
        source = steps.read(params.source.path, source_options(params.source, mark))
        if steps.prepared_dir is not None:
            parts = steps.prepared_dir(run)
        else:
            parts = cleaned_parts = str(Path(params.run.state_dir) / "prepared" / f"run-{run.run_id}.tmp")
        if parts:
            private_dir(Path(parts).parent)  # the cleaned rows are in there
        prepared = steps.clean(source, params.cleaning.mapping, params.cleaning.phone_region, parts)
        if cleaned_parts and Path(cleaned_parts).exists():
            private_tree(cleaned_parts)
        _log_prepared(prepared, source)
        plan = steps.plan(run.ledger, run.target, prepared, full_refresh=params.run.full_refresh,
                          dry_run=params.run.dry_run, mode=params.run.mode.value,
                          labels=tuple(params.apollo.labels))  # fmt: skip
        sent = await send_all(run, plan, steps)
        summary = steps.report(run, prepared, plan, sent)
        stopped = next((r.stopped for r in sent if r.stopped is not None), None)
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
