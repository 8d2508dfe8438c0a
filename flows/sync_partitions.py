"""The ``sync-partitions`` flow: one large source, many ``sync-contacts`` children on the work pool, one summary.

Reads top to bottom like the pipeline:

1. ``split_source``   partitions: the files of a glob, key ranges of a SQL query, or row ranges of one big file
                      (written as Parquet parts under ``split_dir``);
2. children           one ``sync-contacts`` flow run per partition through ``run_deployment`` on the child
                      deployment (so any worker of its pool runs it), at most ``max_in_flight`` at once. Children
                      share one rate budget (``rate_limit_name``, a Prefect global rate limit) and one ledger
                      (``state_url``, or ``state_dir`` on one machine), whose claims make a contact held by two
                      partitions go out once: the second reports it as ``duplicate``;
3. merge              the children's summaries (their persisted results) added into one ``summary.json``, a
                      markdown artifact with a line per partition and one table of problem rows.

The run fails when any child did not complete; the merged summary is written first, listing which.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.deployments import arun_deployment
from prefect.runtime import flow_run

from apollo_sync import settings
from flows.params import form
from apollo_sync.errors import ApolloSyncError
from apollo_sync.partitions import Partition, merge_summaries, write_summary
from apollo_sync.report import summary_problems
from apollo_sync.sources import SourceOptions
from tasks.partitions import partition_done, publish_partitions, split_source, start_partition_progress

CHILD_DEPLOYMENT = "sync-contacts/sync-contacts-partition"


class PartitionsFailed(ApolloSyncError):
    """Some child runs did not complete; the merged summary lists them."""


def _run_name() -> str:
    source = str(flow_run.get_parameters().get("source", "contacts"))
    return "sync partitions of " + (source.rstrip("/").rsplit("/", 1)[-1] or source)[:60]


@flow(name="sync-partitions", flow_run_name=_run_name, persist_result=True, validate_parameters=True)
async def sync_partitions(
    source: Annotated[str, form("Source (glob, SQL URL or one big file)", min_length=1)],
    partitions: Annotated[int | None, form("Partitions (SQL key ranges or file row ranges)", ge=1, le=1000)] = None,
    partition_column: Annotated[str | None, form("Partition column (SQL)")] = None,
    query: Annotated[str | None, form("SQL query or table")] = None,
    deployment: Annotated[str, form("Child deployment")] = CHILD_DEPLOYMENT,
    max_in_flight: Annotated[int, form("Child runs at once", ge=1, le=100)] = 2,
    split_dir: Annotated[str | None, form("Directory for row-range parts")] = None,
    base_url: Annotated[str, form("Apollo base URL")] = settings.GATEWAY_BASE_URL,
    labels: Annotated[list[str], form("Labels")] = [],  # noqa: B006 - Prefect copies parameters
    run_dedupe: Annotated[bool, form("Server-side dedupe")] = True,
    chunk_size: Annotated[int, form("Contacts per request", ge=1, le=settings.MAX_CONTACTS_PER_REQUEST)] = (
        settings.DEFAULT_CHUNK_SIZE
    ),
    concurrency: Annotated[int, form("Requests in flight per child", ge=1, le=32)] = settings.DEFAULT_CONCURRENCY,
    timeout: Annotated[float, form("Request timeout (seconds)", gt=0, le=600)] = settings.DEFAULT_TIMEOUT_SECONDS,
    report_dir: Annotated[str | None, form("Report directory")] = None,
    state_dir: Annotated[str, form("State directory")] = settings.DEFAULT_STATE_DIR,
    state_url: Annotated[str | None, form("Shared ledger (postgresql:// URL)")] = None,
    rate_limit_name: Annotated[str | None, form("Shared rate limit (Prefect)")] = None,
    mapping: Annotated[str | None, form("Mapping file (TOML)")] = None,
    auth: Annotated[Literal["auto", "bearer", "x-api-key"], form("Auth header")] = "auto",
    api_key_block: Annotated[str | None, form("Secret block with the API key")] = settings.DEFAULT_SECRET_BLOCK,
    full_refresh: Annotated[bool, form("Full refresh")] = False,
    max_rpm: Annotated[int | None, form("Max requests per minute per child", ge=1)] = None,
    phone_region: Annotated[str, form("Default phone region", min_length=2, max_length=2)] = (
        settings.DEFAULT_PHONE_REGION
    ),
    format: Annotated[Literal["csv", "tsv", "parquet", "json", "ndjson", "xlsx"] | None, form("Source format")] = None,
    delimiter: Annotated[str | None, form("CSV delimiter", min_length=1, max_length=1)] = None,
    encoding: Annotated[str, form("Source encoding")] = "utf-8",
    poll_seconds: Annotated[float, form("Seconds between child state checks", gt=0, le=60)] = 5.0,
) -> dict:
    """Split a large source into partitions, sync each as a child run on the work pool, merge the summaries.

    Args:
        source: A glob (one partition per file), a sqlite:///… or postgresql://… URL with query,
            partition_column and partitions (key ranges), or one file with partitions (row ranges).
        partitions: How many key ranges (SQL) or row ranges (one file); a glob ignores it.
        partition_column: For SQL: the column whose ranges split the rows (any orderable type; NULLs go to the first).
        query: For SQL: the query or table to split.
        deployment: The child deployment (a sync-contacts deployment on the work pool).
        max_in_flight: Child runs in progress at once; the shared rate limit bounds requests, not this.
        split_dir: Where row-range parts of one file are written; every worker must read it (default: under the
            report directory).
        base_url: The AISA gateway (default) or Apollo direct (https://api.apollo.io/api/v1).
        labels: Label (list) names added to every contact created.
        run_dedupe: Ask Apollo to return existing contacts instead of creating duplicates.
        chunk_size: Contacts per request (Apollo takes at most 100).
        concurrency: Requests in flight per child.
        timeout: Seconds to wait for one request's answer.
        report_dir: Where the merged summary.json goes; each child reports under partition-NNN in it.
        state_dir: The children's ledger directory when no state_url is given (one machine only).
        state_url: A postgresql:// ledger shared by every worker (put the password in the workers' PGPASSWORD
            or ~/.pgpass, not here: parameters are stored with the run).
        rate_limit_name: The Prefect global rate limit every child consults before each request.
        mapping: A TOML mapping file, read by every child.
        auth: How the key is sent; "auto" follows the host.
        api_key_block: Name of the Prefect Secret block holding the key.
        full_refresh: Ignore the ledger's confirmed rows and send every valid row again (dedupe still guards).
        max_rpm: Requests per minute per child, for APIs that send no rate headers.
        phone_region: Region for phone numbers written without a country code.
        format: The source format, when the file extension does not say it.
        delimiter: The CSV delimiter, when detection should not guess.
        encoding: The source's text encoding.
        poll_seconds: How often the parent checks whether a child finished.
    """
    started = time.monotonic()
    log = get_run_logger()
    parent_id = str(flow_run.get_id() or uuid.uuid4())
    report_path = Path(report_dir or Path(state_dir) / "runs" / f"partitions-{time.strftime('%Y%m%dT%H%M%S')}")
    options = SourceOptions(format=format, delimiter=delimiter, encoding=encoding)
    parts = await split_source(source, query, partition_column, partitions,
                               split_dir or str(report_path / "parts"), options)  # fmt: skip
    log.info("%d partitions of %s; %d child run(s) at once on %s", len(parts), source, max_in_flight, deployment)

    shared = dict(
        base_url=base_url, labels=labels, run_dedupe=run_dedupe, chunk_size=chunk_size, concurrency=concurrency,
        timeout=timeout, state_dir=state_dir, state_url=state_url, rate_limit_name=rate_limit_name, mapping=mapping,
        auth=auth, api_key_block=api_key_block, full_refresh=full_refresh, max_rpm=max_rpm, phone_region=phone_region,
    )  # fmt: skip
    progress = await start_partition_progress(len(parts))
    slots = asyncio.Semaphore(max_in_flight)
    done = [0]

    async def run_child(part: Partition):
        params = child_parameters(part, shared, report_path, format=format, delimiter=delimiter, encoding=encoding)
        summary = None
        try:
            async with slots:
                child = await arun_deployment(
                    deployment, parameters=params, timeout=None, poll_interval=poll_seconds, as_subflow=True,
                    idempotency_key=f"{parent_id}:partition-{part.number}",  # a retried parent reuses its children
                    flow_run_name=f"partition {part.number}: {part.label}"[:120],
                )  # fmt: skip
            state = child.state.name if child.state is not None else "Unknown"
            if child.state is not None and child.state.is_completed():
                summary = await child.state.aresult()
        except Exception as exc:  # noqa: BLE001 - one partition's trouble must not hide the others' results
            state = f"Not run ({type(exc).__name__})"
            log.error("Partition %d (%s) could not be run or read: %s", part.number, part.label, exc)
        done[0] += 1
        await partition_done(progress, done[0], len(parts))
        log.info("Partition %d (%s): %s", part.number, part.label, state)
        return state, summary

    finished = await asyncio.gather(*(run_child(part) for part in parts))
    states = [state for state, _ in finished]
    children = [summary for _, summary in finished]
    merged = merge_summaries(
        children, parts, seconds=time.monotonic() - started, states=states,
        extra={"source": source, "report_dir": str(report_path.resolve())},
    )  # fmt: skip
    for problem in summary_problems(merged):
        log.error("Merged summary does not add up: %s", problem)
    write_summary(report_path, merged)
    await publish_partitions(merged, children, source_uri=source, target_url=base_url)
    log.info(
        "Done in %.1fs over %d partitions: %d created, %d existing, %d unchanged, %d failed, %d unconfirmed, "
        "%d duplicates (in source or claimed by another partition); report in %s",
        merged["seconds"], len(parts), merged["created"], merged["existing"], merged["unchanged"], merged["failed"],
        merged["unconfirmed"], merged["duplicates_in_source"], merged["report_dir"],
    )  # fmt: skip
    if merged["partitions_failed"]:
        failed = [f"{p['partition']} ({p['state']})" for p in merged["partitions"] if p["state"] != "Completed"]
        raise PartitionsFailed(f"{len(failed)} of {len(parts)} partitions did not complete: {', '.join(failed)}")
    return merged


def child_parameters(
    part: Partition, shared: dict, report_path: Path, *, format: str | None, delimiter: str | None, encoding: str
) -> dict:
    """The child run's parameters: the shared load settings, its own report directory, and how it reads its
    partition (a file with the run's format options, a SQL key range, or a Parquet part)."""
    params = shared | {"source": part.source, "report_dir": str((report_path / f"partition-{part.number:03d}").resolve())}
    if part.kind == "sql":
        params["query"] = part.query
    elif part.kind == "file":
        params |= {"format": format, "delimiter": delimiter, "encoding": encoding}
    return params
