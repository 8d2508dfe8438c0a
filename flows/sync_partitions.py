"""The ``sync-partitions`` flow: one large source, many ``sync-contacts`` children on the work pool, one summary.

Wiring only; the run is ``tasks.partitions.run_partitions``:

1. ``split_source``   partitions: the files of a glob, key ranges of a SQL query, or row ranges of one big file
                      (written as Parquet parts under ``split_dir``);
2. children           one ``sync-contacts`` flow run per partition through ``run_deployment`` on the child
                      deployment (so any worker of its pool runs it), at most ``max_in_flight`` at once, each with
                      the same groups of settings as this run. Children share one rate budget
                      (``load.rate_limit_name``, a Prefect global rate limit) and one ledger (``run.state_url``, or
                      ``run.state_dir`` on one machine), whose claims make a contact held by two partitions go out
                      once: the second reports it as ``duplicate``;
3. merge              the children's summaries added into one ``summary.json``, a markdown artifact with a line
                      per partition and one table of problem rows.

The run fails when any child did not complete; the merged summary is written first, listing which. Cancelling it
cancels the children still running and releases their claims (``cancel_children``, its ``on_cancellation`` hook).
"""


import uuid
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run

from apollo_sync.params import (
    ApolloParams,
    CleaningParams,
    LoadParams,
    PartitionParams,
    RunParams,
    SourceParams,
    SyncParams,
    ui_form,
)
from tasks.partitions import PartitionsFailed, cancel_children, child_parameters, run_partitions
from tasks.steps import deployment_parameters, library_logs_to_prefect, source_name

__all__ = ["PartitionsFailed", "child_parameters", "sync_partitions"]


def _run_name() -> str:
    return "sync partitions of " + source_name(flow_run.get_parameters())[:60]


@flow(name="sync-partitions", flow_run_name=_run_name, persist_result=True, validate_parameters=True,
      on_cancellation=[cancel_children])
async def sync_partitions(
    source: Annotated[SourceParams, ui_form("Source", "A glob, a SQL table or query, or one big file.")],
    partitions: Annotated[PartitionParams, ui_form("Partitions", "How to split and run the children.")] = (
        PartitionParams()
    ),
    cleaning: Annotated[CleaningParams, ui_form("Cleaning", "How source columns become Apollo fields.")] = (
        CleaningParams()
    ),
    apollo: Annotated[ApolloParams, ui_form("Apollo", "Where the contacts go: base URL, auth, key, labels.")] = (
        ApolloParams()
    ),
    load: Annotated[LoadParams, ui_form("Load", "Per child: request size, concurrency, timeout, rate caps.")] = (
        LoadParams()
    ),
    run: Annotated[RunParams, ui_form("Run", "Full refresh, the shared ledger, where the merged report goes.")] = (
        RunParams()
    ),
) -> dict:
    """Split a large source into partitions, sync each as a child run on the work pool, merge the summaries.

    Args:
        source: A glob (one partition per file), a sqlite:///… or postgresql://… URL with a query (key ranges of
            ``partitions.partition_column``), or one file (``partitions.partitions`` row ranges).
        partitions: How many partitions, the SQL partition column, the child deployment, child runs at once.
        cleaning: The mapping file and default phone region, for every child.
        apollo: Base URL, auth, Secret block, labels, dedupe, for every child.
        load: Contacts per request, requests in flight, timeout and rate caps, per child.
        run: The ledger every child shares (a postgresql:// URL across machines), full refresh, the report folder
            (each child reports under partition-NNN in it).
    """
    saved = await deployment_parameters()
    params = SyncParams(source=source, cleaning=cleaning, apollo=apollo, load=load, run=run).over(saved)
    with library_logs_to_prefect():
        return await run_partitions(params, partitions.over(saved.get("partitions")), parent_id=str(flow_run.get_id() or uuid.uuid4()))
