"""The ``sync-contacts`` flow: read a source, clean it, send what changed to Apollo, report every row's outcome.

Reads top to bottom like the pipeline:

1. ``read_source``    open the file, glob, database query or bucket object lazily;
2. ``clean_contacts`` map headers, clean, validate and dedupe (cached on the source's content fingerprint);
3. plan               ask the sync ledger which rows are new or changed; the rest are ``unchanged``;
4. ``send_chunks``    load the rows in chunks of at most 100, one task run per group of chunks, sharing one rate
                      budget, one HTTP client and one ledger across the whole run;
5. ``write_report``   summary.json and the per-row results, then artifacts and an event for the Prefect UI.
"""

import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import polars as pl
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from apollo_sync import settings
from flows.params import form
from apollo_sync.client import ApolloClient
from apollo_sync.errors import ApolloSyncError, RunStopped
from apollo_sync.ledger import Ledger, open_ledger, target_for
from apollo_sync.loader import LoadSession
from apollo_sync.pacing import Pacer
from apollo_sync.redact import redact_url
from apollo_sync.report import build_summary, results_frame, summary_problems, RESULTS_SCHEMA
from apollo_sync.sources import SourceOptions
from tasks.artifacts import add_progress, publish_run, start_progress
from tasks.credentials import resolve_api_key
from tasks.extract import clean_contacts, read_contacts
from tasks.load import send_chunks
from tasks.report import write_report_files


class LoadAborted(ApolloSyncError):
    """The run stopped before every row was sent (for example on a 401); the report says which rows."""


def _run_name() -> str:
    params = flow_run.get_parameters()
    source = str(params.get("source", "contacts"))
    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    if "://" in source and not Path(name).suffix:
        name = urlsplit(source).scheme + " " + (params.get("query") or name)[:40]
    return f"sync {name}" + (" (dry run)" if params.get("dry_run") else "")


@flow(name="sync-contacts", flow_run_name=_run_name, persist_result=True, validate_parameters=True)
async def sync_contacts(
    source: Annotated[str, form("Source", min_length=1)],
    base_url: Annotated[str, form("Apollo base URL")] = settings.GATEWAY_BASE_URL,
    labels: Annotated[list[str], form("Labels")] = [],  # noqa: B006 - Prefect copies parameters
    run_dedupe: Annotated[bool, form("Server-side dedupe")] = True,
    chunk_size: Annotated[int, form("Contacts per request", ge=1, le=settings.MAX_CONTACTS_PER_REQUEST)] = (
        settings.DEFAULT_CHUNK_SIZE
    ),
    concurrency: Annotated[int, form("Requests in flight", ge=1, le=32)] = settings.DEFAULT_CONCURRENCY,
    timeout: Annotated[float, form("Request timeout (seconds)", gt=0, le=600)] = settings.DEFAULT_TIMEOUT_SECONDS,
    dry_run: Annotated[bool, form("Dry run")] = False,
    report_dir: Annotated[str | None, form("Report directory")] = None,
    state_dir: Annotated[str, form("State directory")] = settings.DEFAULT_STATE_DIR,
    state_url: Annotated[str | None, form("Shared ledger (postgresql:// URL)")] = None,
    mapping: Annotated[str | None, form("Mapping file (TOML)")] = None,
    auth: Annotated[Literal["auto", "bearer", "x-api-key"], form("Auth header")] = "auto",
    api_key_block: Annotated[str | None, form("Secret block with the API key")] = settings.DEFAULT_SECRET_BLOCK,
    full_refresh: Annotated[bool, form("Full refresh")] = False,
    max_rpm: Annotated[int | None, form("Max requests per minute", ge=1)] = None,
    rate_limit_name: Annotated[str | None, form("Shared rate limit (Prefect)")] = None,
    phone_region: Annotated[str, form("Default phone region", min_length=2, max_length=2)] = (
        settings.DEFAULT_PHONE_REGION
    ),
    format: Annotated[Literal["csv", "tsv", "parquet", "json", "ndjson", "xlsx"] | None, form("Source format")] = None,
    delimiter: Annotated[str | None, form("CSV delimiter", min_length=1, max_length=1)] = None,
    encoding: Annotated[str, form("Source encoding")] = "utf-8",
    query: Annotated[str | None, form("SQL query or table")] = None,
    cursor_column: Annotated[str | None, form("Incremental cursor column")] = None,
) -> dict:
    """Sync contacts from a source into Apollo and report what happened to every row.

    Args:
        source: A path or glob (csv, tsv, parquet, json, ndjson, xlsx), sqlite:///file.db or postgresql://… with
            a query, or an s3:// or https:// URL.
        base_url: The AISA gateway (default) or Apollo direct (https://api.apollo.io/api/v1).
        labels: Label (list) names added to every contact created.
        run_dedupe: Ask Apollo to return existing contacts instead of creating duplicates. Retries after an
            unknown outcome always use dedupe, whatever this says.
        chunk_size: Contacts per request (Apollo takes at most 100).
        concurrency: Requests in flight at once; all of them share one rate budget.
        timeout: Seconds to wait for one request's answer.
        dry_run: Read, clean and plan only; send nothing and need no key.
        report_dir: Where summary.json and the per-row results go (default: a new folder under state_dir/runs).
        state_dir: Where the sync ledger lives; a re-run with the same state dir sends only what changed.
        state_url: A postgresql:// URL for a ledger shared by several workers (instead of the one in state_dir);
            runs on it claim contacts, so two partitions holding the same contact send it once.
        mapping: A TOML mapping file: source columns to Apollo fields, custom fields, constants.
        auth: How the key is sent; "auto" follows the host (Bearer for the gateway, X-Api-Key for Apollo).
        api_key_block: Name of the Prefect Secret block holding the key; APOLLO_API_KEY is used when it is absent.
        full_refresh: Ignore the ledger and send every valid row (dedupe still guards against duplicates).
        max_rpm: Requests per minute at most, for APIs that send no rate headers.
        rate_limit_name: A Prefect global concurrency limit with slot decay, shared by every run and worker.
        phone_region: Region for phone numbers written without a country code (ISO code, e.g. US, GB, DE).
        format: The source format, when the file extension does not say it.
        delimiter: The CSV delimiter, when detection should not guess.
        encoding: The source's text encoding (utf-8, utf-8-sig, latin-1, cp1252…).
        query: The SQL query (or table name) for database sources.
        cursor_column: For SQL sources: read only rows past the last confirmed value of this column.
    """
    started = time.monotonic()
    log = get_run_logger()
    restore_logging = _forward_library_logs()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    state = Path(state_dir)
    target = target_for(base_url)
    report_path = report_dir or str(state / "runs" / time.strftime("%Y%m%dT%H%M%S"))

    ledger = open_ledger(state, state_url)
    try:
        mark_key = _cursor_mark_key(target, source, query, cursor_column) if cursor_column else None
        options = SourceOptions(
            format=format, delimiter=delimiter, encoding=encoding, query=query, cursor_column=cursor_column,
            cursor_after=ledger.get_mark(mark_key) if mark_key else None,
        )
        src = read_contacts(source, options)
        prepared = clean_contacts(src, mapping, phone_region, str(state / "prepared"))
        log.info(
            "Read %d rows from %s: %d to load, %d rejected, %d duplicates in source",
            prepared.rows_read, src.description, prepared.contacts_count, prepared.rejected_count,
            prepared.duplicates_count,
        )
        if prepared.unmapped_columns:
            log.info("Columns not sent (unmapped): %s", ", ".join(prepared.unmapped_columns))

        # prepared's frames are lazy scans of its Parquet parts: a dry run streams them into the report;
        # a real run collects only the rows to send.
        to_send, unchanged = ledger.plan(target, prepared.contacts, full_refresh=full_refresh)
        outcomes = [_as_outcomes(unchanged, "unchanged")]
        stats: dict = {}
        aborted: RunStopped | None = None
        if dry_run:
            outcomes.append(_as_outcomes(to_send, "would_send"))
        elif (to_send := _collected(to_send)).height:
            loaded, stats, aborted = await _load(
                to_send, ledger=ledger, target=target, run_id=run_id, base_url=base_url, auth=auth,
                api_key_block=api_key_block, timeout=timeout, concurrency=concurrency, chunk_size=chunk_size,
                labels=labels, run_dedupe=run_dedupe, max_rpm=max_rpm, rate_limit_name=rate_limit_name,
            )
            outcomes.append(loaded)
        else:
            log.info("Nothing new or changed since the last sync: no request needed")

        results = results_frame(prepared.rejected, prepared.duplicates, pl.concat([o.lazy() for o in outcomes]))
        summary = build_summary(
            rows_read=prepared.rows_read,
            results=results,
            requests=stats.get("requests", 0),
            retries=stats.get("retries", 0),
            seconds=time.monotonic() - started,
            extra={
                "dry_run": dry_run,
                "unmapped_columns": prepared.unmapped_columns,
                "phones_dropped": prepared.phones_dropped,
                "rate_limited": stats.get("http_429", 0),
                "claimed_elsewhere": stats.get("claimed_elsewhere", 0),  # counted in duplicates_in_source too
                "report_dir": str(Path(report_path).resolve()),
            },
        )
        if dry_run:
            log.info("Dry run: %d rows would be sent, %d unchanged since the last sync",
                     summary.get("would_send", 0), summary["unchanged"])
        for problem in summary_problems(summary):
            log.error("Summary does not add up: %s", problem)
        write_report_files(report_path, summary, results, prepared.rejected)
        if mark_key and src.cursor_max is not None and not dry_run and aborted is None:
            if summary["failed"] == 0 and summary["unconfirmed"] == 0:
                ledger.set_mark(mark_key, src.cursor_max)
            else:
                log.warning("Cursor not advanced: some rows are failed or unconfirmed; the next run reads them again")
        problems = _collected(results.filter(pl.col("outcome").is_in(["failed", "rejected", "unconfirmed"])))
        await publish_run(summary, problems,
                          source_uri=src.uri, target_url=base_url)
    finally:
        ledger.close()
        restore_logging()

    log.info(
        "Done in %.1fs: %d created, %d existing, %d unchanged, %d failed, %d unconfirmed; report in %s",
        summary["seconds"], summary["created"], summary["existing"], summary["unchanged"], summary["failed"],
        summary["unconfirmed"], summary["report_dir"],
    )
    if aborted is not None:
        raise LoadAborted(f"{aborted}; the rows not sent are marked failed in {summary['report_dir']}")
    return summary


async def _load(to_send: pl.DataFrame, *, ledger: Ledger, target: str, run_id: str, base_url: str, auth: str,
                api_key_block: str | None, timeout: float, concurrency: int, chunk_size: int, labels: list[str],
                run_dedupe: bool, max_rpm: int | None, rate_limit_name: str | None):
    """Load ``to_send`` in groups of chunks; returns (outcomes, stats, the RunStopped that stopped it or None)."""
    log = get_run_logger()
    api_key = await resolve_api_key(api_key_block)
    before_request = _shared_rate_limit(rate_limit_name) if rate_limit_name else None
    total = to_send.height
    progress = await start_progress(total)
    started = time.monotonic()
    last_log = [started]

    async def on_chunk_done(result) -> None:
        """Move the progress artifact per chunk; log a progress line at most every 10 seconds."""
        await add_progress(progress, result.outcomes.height)
        now = time.monotonic()
        if now - last_log[0] >= 10 or progress.done_rows >= total:
            last_log[0] = now
            rate = progress.done_rows / max(now - started, 1e-9)
            eta = (total - progress.done_rows) / rate if rate else float("inf")
            log.info("Progress: %d of %d contacts (%.0f%%), %.0f contacts/s, about %.0fs to go",
                     progress.done_rows, total, 100 * progress.done_rows / total, rate, eta)

    aborted = None
    async with ApolloClient(base_url, api_key, auth=auth, timeout=timeout) as client:
        session = LoadSession(
            client, Pacer(max_rpm=max_rpm), ledger, target=target, labels=labels, run_dedupe=run_dedupe,
            concurrency=concurrency, chunk_size=chunk_size, run_id=run_id, before_request=before_request,
            on_chunk_done=on_chunk_done,
        )
        chunks = session.make_chunks(to_send)
        groups = [chunks[i : i + settings.CHUNKS_PER_LOAD_TASK] for i in range(0, len(chunks), settings.CHUNKS_PER_LOAD_TASK)]
        log.info("Sending %d contacts in %d request(s), %d task run(s)", total, len(chunks), len(groups))
        parts = []
        for group_no, group in enumerate(groups):
            try:
                result = await send_chunks(session, group, group_no)
            except RunStopped as exc:
                aborted = exc
                parts.append(exc.result.outcomes)  # the stopped group still has an outcome for each of its rows
                log.error("Stopped: %s", exc)
                break
            parts.append(result.outcomes)
        stats = session.stats.as_dict()
    outcomes = pl.concat(parts, how="vertical") if parts else _as_outcomes(to_send.head(0), "failed")
    if aborted is not None:
        unsent = to_send.join(outcomes.select(settings.SOURCE_ROW), on=settings.SOURCE_ROW, how="anti")
        outcomes = pl.concat(
            [outcomes, _as_outcomes(unsent, "failed", reason=f"not sent: the run stopped ({aborted.message})")],
            how="vertical",
        )
    return outcomes, stats, aborted


def _forward_library_logs():
    """Send the plain modules' log lines (pacing waits, bisections, give-ups) where Prefect sends the flow's.

    Like listing ``apollo_sync`` in PREFECT_LOGGING_EXTRA_LOGGERS, but it works however the flow was started
    (CLI, worker, serve, import). Returns the function that undoes it when the run ends.
    """
    extra = logging.getLogger("prefect.extra")
    library = logging.getLogger("apollo_sync")
    added = [h for h in extra.handlers if h not in library.handlers]
    level = library.level
    for handler in added:
        library.addHandler(handler)
    if level == logging.NOTSET:
        library.setLevel(extra.getEffectiveLevel())

    def restore() -> None:
        for handler in added:
            library.removeHandler(handler)
        library.setLevel(level)

    return restore


def _collected(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    return frame.collect(engine="streaming") if isinstance(frame, pl.LazyFrame) else frame


def _as_outcomes(rows: pl.DataFrame | pl.LazyFrame, outcome: str, reason: str | None = None):
    has_id = "apollo_id" in rows.collect_schema().names()
    return rows.select(
        pl.col(settings.SOURCE_ROW).cast(pl.Int64),
        pl.col("email").cast(pl.String),
        pl.lit(outcome).alias("outcome"),
        (pl.col("apollo_id").cast(pl.String) if has_id else pl.lit(None, pl.String)).alias("apollo_id"),
        pl.lit(reason, pl.String).alias("reason"),
    ).cast(RESULTS_SCHEMA)


def _shared_rate_limit(name: str):
    """An awaitable that takes one slot of Prefect global rate limit ``name`` (strict: a missing limit is an error)."""
    from prefect.concurrency.asyncio import rate_limit

    async def acquire() -> None:
        await rate_limit(name, strict=True)

    return acquire


def _cursor_mark_key(target: str, source: str, query: str | None, cursor_column: str) -> str:
    """The ledger key of a source's high-water mark, per Apollo target (a password never enters it)."""
    bare = redact_url(source)
    return "cursor:" + hashlib.sha256(f"{target}|{bare}|{query}|{cursor_column}".encode()).hexdigest()[:32]
