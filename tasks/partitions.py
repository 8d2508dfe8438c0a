"""The ``sync-partitions`` flow's Prefect side: split the source (a task), publish the merged run (artifacts).

``split_source`` runs :func:`apollo_sync.partitions.plan_partitions` in a thread (it may query a database or write
Parquet parts). ``start_partition_progress``/``partition_done`` move a progress artifact per finished child, and
``publish_partitions`` writes the merged summary as markdown plus one table of problem rows gathered from the
children's ``results.parquet`` (when the parent can read their report directories). Plain async functions add no
task runs.
"""

from __future__ import annotations

import asyncio
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
from prefect.logging import get_logger

from apollo_sync.partitions import Partition, plan_partitions
from apollo_sync.report import RESULTS_PARQUET
from apollo_sync.sources import SourceOptions
from apollo_sync.redact import redact_url
from tasks.artifacts import MAX_PROBLEM_ROWS, summary_markdown

PROGRESS_KEY = "apollo-sync-partitions-progress"
SUMMARY_KEY = "apollo-sync-partitions-summary"
PROBLEMS_KEY = "apollo-sync-partitions-problems"
PROBLEM_OUTCOMES = ("failed", "rejected", "unconfirmed")

logger = get_logger("apollo_sync.partitions")


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
        "| partition | state | rows read | created | existing | unchanged | failed | unconfirmed | duplicate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in merged["partitions"]:
        counts = [p.get(k, "") for k in ("rows_read", "created", "existing", "unchanged", "failed", "unconfirmed",
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
