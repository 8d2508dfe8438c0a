"""The ``sync-contacts`` flow: read a source, clean it, send what changed to Apollo, report every row's outcome.

Wiring only. The run is ``apollo_sync.sync.run_sync`` (plain code, readable top to bottom); this flow hands it
the grouped settings of ``apollo_sync.params`` and the Prefect tasks of ``tasks.steps``, so the UI shows

    read_source -> clean_contacts -> plan_contacts -> send_chunks x N -> write_report

and the progress, summary and problems artifacts and the ``apollo-sync.run.completed`` event.

From Python: ``await sync_contacts(source="contacts.csv", apollo={"base_url": ...})`` (each group takes a
model, a dict, or for ``source`` a plain path), or ``sync_contacts(**flow_parameters(sync_params(...)))``.
"""


import uuid
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run

from apollo_sync.params import ApolloParams, CleaningParams, LoadParams, RunParams, SourceParams, SyncParams, ui_form
from apollo_sync.sync import RunAborted, run_sync
from tasks.steps import PREFECT_STEPS, deployment_parameters, library_logs_to_prefect, run_name

__all__ = ["RunAborted", "sync_contacts"]


@flow(name="sync-contacts", flow_run_name=run_name, persist_result=True, validate_parameters=True)
async def sync_contacts(
    source: Annotated[SourceParams, ui_form("Source", "Where the contacts come from and how to read them.")],
    cleaning: Annotated[CleaningParams, ui_form("Cleaning", "How source columns become Apollo fields.")] = (
        CleaningParams()
    ),
    apollo: Annotated[ApolloParams, ui_form("Apollo", "Where the contacts go: base URL, auth, key, labels.")] = (
        ApolloParams()
    ),
    load: Annotated[LoadParams, ui_form("Load", "Request size, concurrency, timeout and rate caps.")] = LoadParams(),
    run: Annotated[RunParams, ui_form("Run", "Dry run, full refresh, where the ledger and report live.")] = (
        RunParams()
    ),
) -> dict:
    """Sync contacts from a source into Apollo and report what happened to every row.

    Args:
        source: The file, glob, database query or bucket object, and how to read it.
        cleaning: The mapping file and the default phone region.
        apollo: The base URL (the AISA gateway or Apollo direct), auth style, Secret block, labels, dedupe.
        load: Contacts per request, requests in flight, timeout, a requests-per-minute cap, a shared rate limit.
        run: Dry run, full refresh, the ledger (state directory or a shared PostgreSQL URL), the report folder.

    Returns the summary (also written to ``summary.json``); raises ``RunAborted`` after writing the report when
    the run had to stop (a wrong key, an API that never answered).
    """
    given = SyncParams(source=source, cleaning=cleaning, apollo=apollo, load=load, run=run)
    params = given.over(await deployment_parameters())
    with library_logs_to_prefect():
        return await run_sync(params, steps=PREFECT_STEPS, run_id=str(flow_run.get_id() or uuid.uuid4()))
