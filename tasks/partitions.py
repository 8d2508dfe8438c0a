"""The ``sync-partitions`` flow's Prefect side: split the source (a task), run the children, publish the merged run.

:func:`run_partitions` is the whole parent run: split, one ``sync-contacts`` child per partition through
``arun_deployment`` on the child deployment (so any worker of its pool runs it), at most ``max_in_flight`` at once,
then the merged summary. Children get the parent's own groups of settings (``apollo_sync.params``) with their
partition as the source and their own report folder (:func:`child_parameters`). ``split_source`` runs :func:`apollo_sync.partitions.plan_partitions` in a thread (it may query a database or write
Parquet parts). ``start_partition_progress``/``partition_done`` move a progress artifact per finished child, and
``publish_partitions`` writes the merged summary as markdown plus one table of problem rows gathered from the
children's ``results.parquet`` (when the parent can read their report directories). Plain async functions add no
task runs.

Before any child starts, ``assign_versions`` prunes old ``sync_runs`` rows and stores in the shared ledger which
rows of which partition lose to another partition's version of the same contact
(:func:`apollo_sync.partitions.store_versions`); each child gets ``run.parent_partition`` to look them up.
:func:`cancel_children` is the parent flow's ``on_cancellation`` hook: it cancels the children still running and
ends their ledger leases once they stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.deployments import arun_deployment

from apollo_sync import settings
from apollo_sync.errors import ApolloSyncError, InputError
from apollo_sync.ledger import open_ledger
from apollo_sync.ledger.base import LOSERS_SCHEMA
from apollo_sync.params import PartitionParams, RunParams, SourceParams, SyncParams
from apollo_sync.partitions import Partition, merge_summaries, plan_partitions, store_versions, write_summary
from apollo_sync.redact import redact_url
from apollo_sync.report import RESULTS_PARQUET, summary_problems
from apollo_sync.sources import SourceOptions
from apollo_sync.sync import source_options
from tasks.artifacts import MAX_PROBLEM_ROWS, summary_markdown

PROGRESS_KEY = "apollo-sync-partitions-progress"
SUMMARY_KEY = "apollo-sync-partitions-summary"
PROBLEMS_KEY = "apollo-sync-partitions-problems"
PROBLEM_OUTCOMES = ("failed", "rejected", "unconfirmed")
CHILD_STOP_SECONDS = 90.0
"""How long a cancelled parent waits for its children to stop (a process worker gives a run 30 s after SIGTERM)."""

logger = logging.getLogger("apollo_sync.partitions")


class PartitionsFailed(ApolloSyncError):
    """Some child runs did not complete; the merged summary lists them."""


@task(name="split_source", cache_policy=NO_CACHE, persist_result=False)
async def split_source(
    source: str, query: str | None, partition_column: str | None, partitions: int | None, split_dir: str,
    options: SourceOptions,
) -> list[Partition]:  # fmt: skip
    """The partitions of ``source``: files of a glob, SQL key ranges, or row-range parts of one file."""
    return await asyncio.to_thread(
        plan_partitions, source, query=query, partition_column=partition_column, partitions=partitions,
        split_dir=split_dir, options=options,
    )  # fmt: skip


async def start_partition_progress(total: int):
    """A progress artifact counting finished partitions; returns its id."""
    return await acreate_progress_artifact(
        progress=0.0, key=PROGRESS_KEY, description=f"Partitions finished out of {total}"
    )


async def partition_done(artifact_id, done: int, total: int) -> None:
    """Show ``done`` of ``total`` partitions finished (a failed update is only logged: progress is a view)."""
    try:
        await aupdate_progress_artifact(artifact_id=artifact_id, progress=round(100.0 * done / max(total, 1), 1))
    except Exception as exc:  # noqa: BLE001
        logger.warning("Could not update the partitions progress artifact: %s", type(exc).__name__)


def problem_rows(children: Sequence[Mapping[str, Any] | None], limit: int = MAX_PROBLEM_ROWS) -> list[dict]:
    """Up to ``limit`` failed, rejected or unconfirmed rows from the children's results files, with the partition."""
    frames = []
    for number, summary in enumerate(children):
        report_dir = (summary or {}).get("report_dir")
        path = Path(report_dir) / RESULTS_PARQUET if report_dir else None
        if path is None or not path.is_file():
            continue
        frames.append(
            pl.scan_parquet(path)
            .filter(pl.col("outcome").is_in(PROBLEM_OUTCOMES))
            .select(pl.lit(number).alias("partition"), "source_row", "email", "outcome", "reason")
            .head(limit)
            .collect()
        )
    return pl.concat(frames).head(limit).to_dicts() if frames else []


def partitions_markdown(merged: Mapping[str, Any], *, source_uri: str, target_url: str) -> str:
    """The merged summary (same layout as a single run's) and one line per partition with its state and counts."""
    lines = [summary_markdown(merged, source_uri=source_uri, target_url=target_url).replace(
        "# apollo-sync run", f"# apollo-sync run over {len(merged['partitions'])} partitions", 1)]  # fmt: skip
    lines += [
        "",
        "| partition | state | rows read | created | updated | existing | unchanged | failed | unconfirmed | duplicate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in merged["partitions"]:
        counts = [p.get(k, "") for k in ("rows_read", "created", "updated", "existing", "unchanged", "failed", "unconfirmed",
                                         "duplicates_in_source")]  # fmt: skip
        lines.append(f"| {p['partition']}: {redact_url(str(p['label']))} | {p['state']} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines) + "\n"


async def publish_partitions(
    merged: Mapping[str, Any], children: Sequence[Mapping[str, Any] | None], *, source_uri: str, target_url: str
) -> None:
    """The merged summary as a markdown artifact and the children's problem rows as one table artifact."""
    await acreate_markdown_artifact(
        markdown=partitions_markdown(merged, source_uri=source_uri, target_url=target_url),
        key=SUMMARY_KEY,
        description="apollo-sync partitioned run summary",
    )
    rows = await asyncio.to_thread(problem_rows, children)
    await acreate_table_artifact(
        table=rows, key=PROBLEMS_KEY,
        description=f"Failed, rejected or unconfirmed rows (first {len(rows)})" if rows else "No problem rows",
    )  # fmt: skip


# --- The parent run -------------------------------------------------------------------------------------------


def child_parameters(
    part: Partition, params: SyncParams, report_path: Path, parent_id: str | None = None
) -> dict[str, Any]:
    """A child run's parameters (JSON, one entry per group): the parent's settings, its partition as the source
    (a file read with the parent's format options, a SQL key range, or a Parquet part), its own report folder and,
    given the parent's run id, ``run.parent_partition`` (which of its rows another partition sends)."""
    groups = params.as_json()
    source: dict[str, Any] = {"path": part.source}
    if part.kind == "sql":
        source["query"] = part.query
    elif part.kind == "file":
        source |= {key: value for key, value in groups["source"].items() if key in ("format", "delimiter", "encoding")}
    groups["source"] = source
    groups["run"]["report_dir"] = str((report_path / f"partition-{part.number:03d}").resolve())
    if parent_id:
        groups["run"]["parent_partition"] = f"{parent_id}:{part.number}"
    return groups


@task(name="assign_versions", cache_policy=NO_CACHE, persist_result=False)
async def assign_versions(params: SyncParams, parts: list[Partition], children: list[dict[str, Any]], parent_id: str) -> int:
    """Prune old ``sync_runs`` rows, then decide which partition sends each contact held by several and keep the
    losing rows in the shared ledger under ``parent_id`` (before any child starts); returns how many rows lose."""
    sources = [(part.source, source_options(SourceParams.model_validate(child["source"])))
               for part, child in zip(parts, children)]  # fmt: skip

    def store() -> int:
        with open_ledger(params.run.state_dir, params.run.state_url) as ledger:
            pruned = ledger.prune_runs(settings.RUN_RETENTION_SECONDS)
            if pruned:
                logger.info("Pruned %d finished sync_runs rows older than %.0f days", pruned,
                            settings.RUN_RETENTION_SECONDS / 86400)  # fmt: skip
            try:
                losers = store_versions(ledger, parent_id, sources, [part.label for part in parts],
                                        mapping=params.cleaning.mapping, phone_region=params.cleaning.phone_region)  # fmt: skip
            except ImportError:  # apollo_sync.clean.identities not there yet: the claims alone keep contacts once
                logger.warning("This version cannot compare partitions' contacts; overlapping rows are left to the claims")
                ledger.store_losers(parent_id, pl.DataFrame(schema=LOSERS_SCHEMA))
                return 0
            return losers.height

    lost = await asyncio.to_thread(store)
    logger.info("%d row(s) hold a contact that an earlier partition sends: their children report them as duplicate", lost)
    return lost


async def finish_runs(run: RunParams, run_ids: Sequence[str]) -> None:
    """End the ledger leases of ``run_ids`` (stopped children, the parent), so no claim waits for the lease."""

    def finish() -> None:
        with open_ledger(run.state_dir, run.state_url) as ledger:
            for run_id in run_ids:
                ledger.finish(run_id)

    await asyncio.to_thread(finish)


async def cancel_children(flow, flow_run, state) -> None:
    """``on_cancellation`` of ``sync-partitions``: cancel every child run not yet final, wait up to
    ``CHILD_STOP_SECONDS`` for them to stop, then end the ledger leases of those that stopped (a child killed
    before it closed its ledger would otherwise hold its claims for ``CLAIM_LEASE_SECONDS``)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.logging.loggers import flow_run_logger
    from prefect.states import Cancelled, Cancelling

    match = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=match)
        live = [c for c in children if c.state is not None and not c.state.is_final()]
        flow_run_logger(flow_run, flow).info("Cancelling %d child run(s) still running or scheduled", len(live))
        for child in live:
            # A run whose flow has not started (scheduled, or pending while its process starts) is cancelled at once:
            # its process, if it comes up, finds the run final and sends nothing. Set to Cancelling instead, it
            # would see Cancelling, exit on its own, and stay Cancelling (its worker only ends runs it stops).
            not_started = child.state.is_scheduled() or child.state.is_pending()
            stop = Cancelled if not_started else Cancelling
            await client.set_flow_run_state(child.id, stop(message="the parent sync-partitions run was cancelled"),
                                            force=True)  # fmt: skip
        deadline = time.monotonic() + CHILD_STOP_SECONDS
        while True:
            children = await client.read_flow_runs(flow_run_filter=match)
            running = [c for c in children if c.state is not None and not c.state.is_final()]
            if not running or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    for child in running:
        logger.warning("Child run %s is still %s after %.0f s: its claims last until its lease ends",
                       child.id, child.state.name, CHILD_STOP_SECONDS)  # fmt: skip
    still = {c.id for c in running}
    stopped = [str(c.id) for c in children if c.id not in still]
    try:
        run = RunParams.model_validate(dict(flow_run.parameters.get("run") or {}))
        await finish_runs(run, [*stopped, str(flow_run.id)])
    except Exception as exc:  # noqa: BLE001 - a hook must not fail the cancellation; the leases expire on their own
        logger.warning("Could not release the stopped children's claims: %s", type(exc).__name__)


async def run_partitions(params: SyncParams, partitioning: PartitionParams, parent_id: str) -> dict:
    """Split ``params.source``, run one child per partition, merge and publish their summaries; returns the merged
    summary (also written to ``summary.json``). Raises :class:`PartitionsFailed` after that when a child did not
    complete."""
    if params.source.cursor_column:
        raise InputError("cursor_column does not work with sync-partitions: each partition would move one cursor")
    started = time.monotonic()
    run = params.run
    report_path = Path(run.report_dir or Path(run.state_dir) / "runs" / f"partitions-{time.strftime('%Y%m%dT%H%M%S')}")
    parts = await split_source(params.source.path, params.source.query, partitioning.partition_column,
                               partitioning.partitions, partitioning.split_dir or str(report_path / "parts"),
                               source_options(params.source))  # fmt: skip
    logger.info("%d partitions of %s; %d child run(s) at once on %s", len(parts), redact_url(params.source.path),
                partitioning.max_in_flight, partitioning.deployment)  # fmt: skip
    given = [child_parameters(part, params, report_path, parent_id) for part in parts]
    await assign_versions(params, parts, given, parent_id)
    progress = await start_partition_progress(len(parts))
    slots = asyncio.Semaphore(partitioning.max_in_flight)
    done = 0

    async def run_child(part: Partition) -> tuple[str, dict | None]:
        nonlocal done
        state, summary = await child_run(part, given[part.number], partitioning, slots, parent_id)
        done += 1
        await partition_done(progress, done, len(parts))
        logger.info("Partition %d (%s): %s", part.number, part.label, state)
        return state, summary

    try:
        finished = await asyncio.gather(*(run_child(part) for part in parts))
    finally:
        await finish_runs(run, [parent_id])  # the parent's row stays until pruned, with its losers
    children = [summary for _, summary in finished]
    merged = merge_summaries(children, parts, seconds=time.monotonic() - started, states=[s for s, _ in finished],
                             extra={"source": redact_url(params.source.path),
                                    "report_dir": str(report_path.resolve())})  # fmt: skip
    for problem in summary_problems(merged):
        logger.error("Merged summary does not add up: %s", problem)
    write_summary(report_path, merged)
    await publish_partitions(merged, children, source_uri=params.source.path, target_url=params.apollo.base_url)
    logger.info("Done in %.1fs over %d partitions: %d created, %d updated, %d existing, %d unchanged, %d failed, "
                "%d unconfirmed, %d duplicates (in source or claimed by another partition); report in %s", merged["seconds"],
                len(parts), merged["created"], merged["updated"], merged["existing"], merged["unchanged"], merged["failed"],
                merged["unconfirmed"], merged["duplicates_in_source"], merged["report_dir"])  # fmt: skip
    if merged["partitions_failed"]:
        failed = [f"{p['partition']} ({p['state']})" for p in merged["partitions"] if p["state"] != "Completed"]
        raise PartitionsFailed(f"{len(failed)} of {len(parts)} partitions did not complete: {', '.join(failed)}")
    return merged


async def child_run(
    part: Partition, parameters: dict[str, Any], partitioning: PartitionParams, slots: asyncio.Semaphore,
    parent_id: str,
) -> tuple[str, dict | None]:  # fmt: skip
    """Run one child on the deployment and wait for it; its final state's name and its summary (None unless it
    completed). One partition's trouble never hides the others' results: any error becomes its state."""
    try:
        async with slots:
            child = await arun_deployment(
                partitioning.deployment, parameters=parameters, timeout=None, poll_interval=partitioning.poll_seconds,
                as_subflow=True, idempotency_key=f"{parent_id}:partition-{part.number}",  # a retried parent reuses them
                flow_run_name=f"partition {part.number}: {redact_url(part.label)}"[:120],
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        logger.error("Partition %d (%s) could not be run: %s", part.number, part.label, exc)
        return f"Not run ({type(exc).__name__})", None
    if child.state is None or not child.state.is_completed():
        return (child.state.name if child.state is not None else "Unknown"), None
    try:
        return child.state.name, await child.state.aresult()
    except Exception as exc:  # noqa: BLE001
        logger.error("Partition %d (%s) completed but its summary could not be read: %s", part.number, part.label, exc)
        return f"Completed, summary unreadable ({type(exc).__name__})", None
