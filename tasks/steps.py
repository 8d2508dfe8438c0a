"""The stages of ``apollo_sync.sync.run_sync`` as Prefect tasks, so a flow run shows them as a task graph.

Each task wraps the plain function of ``apollo_sync.sync`` (or ``tasks.extract`` for the cached clean)::

    read_source -> clean_contacts ─┬─> write_report
                    (a thread)     └ each part: plan_contacts -> send_chunks x N ─┘

``clean_contacts`` runs in a thread beside the sending: each part it finishes is planned (one ``plan_contacts``
task run per part, up to 250,000 rows) and sent while the next is cleaned. Only ``clean_contacts`` is cached (on the source's content, see ``tasks.extract``). Nothing that sends is cached
or retried by Prefect: the sync ledger is the memory of what landed, the load session retries each request with
the right semantics (Retry-After, dedupe after an unknown outcome, bisection on 422), and a retried *flow run*
plans again from the ledger. One ``send_chunks`` task run per group of ``settings.CHUNKS_PER_LOAD_TASK`` chunks
keeps task runs bounded at any scale (1M contacts: 100 task runs, not 10,000).

``PREFECT_STEPS`` also carries the Prefect side of a run: the key from a Secret block, the progress artifact,
a Prefect global rate limit before each request, and the artifacts and event at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from apollo_sync import send, sync
from apollo_sync.redact import redact_url
from tasks.artifacts import add_progress, publish_run, start_progress
from tasks.credentials import resolve_api_key
from tasks.extract import clean_contacts


# Async tasks doing their work in a thread, on purpose: a sync task run opens a Prefect client of its own, and its
# TLS context (about 20 ms holding the GIL) stalled the requests in flight once a part, and delayed the first one.
read_contacts = task(name="read_source", cache_policy=NO_CACHE, persist_result=False)(sync.read_in_thread)
plan_contacts = task(name="plan_contacts", cache_policy=NO_CACHE, persist_result=False)(sync.plan_in_thread)


@task(name="send_chunks", cache_policy=NO_CACHE, persist_result=False, retries=0)
async def send_chunks(sender: send.Sender, plan: send.Plan, group: send.Group) -> send.GroupSent:
    """Send ``group`` (chunks of the plan's rows) through the run's shared session (client, pacer, ledger); the
    outcomes go to the run's results files."""
    return await sync.send_group(sender, plan, group)


write_report = task(name="write_report", cache_policy=NO_CACHE, persist_result=False)(sync.report_in_thread)


async def progress_artifact() -> Callable[[int, int], Awaitable[None]]:
    """A progress artifact; returns what moves it by a chunk's rows against the rows planned so far."""
    handle = await start_progress(0, growing=True)

    async def advance(rows: int, total: int) -> None:
        handle.total_rows = total
        await add_progress(handle, rows)

    return advance


def shared_rate_limit(name: str, state_url: str | None = None) -> Callable[[], Awaitable[None]]:
    """The acquire awaited before every request for the shared budget ``name``: a token bucket in the PostgreSQL
    ledger at ``state_url`` (default: the flow run's ``run.state_url``), else Prefect's global rate limit ``name``
    (strict: a missing limit is an error). See ``tasks.budget``."""
    from tasks.budget import shared_rate_limit as acquire_for

    return acquire_for(name, state_url)


async def deployment_parameters() -> dict[str, Any]:
    """The parameters saved on the deployment this flow run came from (``{}`` for a run started in Python or
    from the CLI), for ``SyncParams.over``: Prefect merges a run's groups into them by name only."""
    from prefect import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return {}
    async with get_client() as client:
        saved = await client.read_deployment(deployment.id)
    return dict(saved.parameters or {})


def prepared_dir(run: sync.SyncRun) -> str:
    """The cached clean's parts live beside the ledger and outlive the run (``tasks.extract`` prunes them)."""
    return str(Path(run.params.run.state_dir) / "prepared")


PREFECT_STEPS = sync.Steps(
    read=read_contacts,
    clean=clean_contacts,
    plan=plan_contacts,
    send=send_chunks,
    report=write_report,
    api_key=resolve_api_key,
    show_progress=progress_artifact,
    rate_limit=shared_rate_limit,
    publish=publish_run,
    prepared_dir=prepared_dir,
)


def _group(value: Any) -> dict[str, Any]:
    """A group from flow-run parameters as a dict, whether it arrived as a model, JSON (a deployment) or a str."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, str):
        return {"path": value}
    return dict(value or {})


def source_name(params: dict[str, Any]) -> str:
    """A short name for a run's source: the file name, or ``<scheme> <query>`` for a database; never a password
    or a query string."""
    source = _group(params.get("source"))
    path = redact_url(str(source.get("path") or "contacts"))
    name = path.rstrip("/").rsplit("/", 1)[-1] or path
    if "://" in path and not Path(name).suffix:
        name = urlsplit(path).scheme + " " + (source.get("query") or name)[:40]
    return name


def run_name() -> str:
    """``sync <source name>``, and `` (dry run)`` when it is one."""
    params = flow_run.get_parameters()
    return f"sync {source_name(params)}" + (" (dry run)" if _group(params.get("run")).get("dry_run") else "")


@contextmanager
def library_logs_to_prefect() -> Iterator[None]:
    """Send the plain modules' log lines (progress, pacing waits, bisections, give-ups) where Prefect sends the flow's.

    Like listing ``apollo_sync`` in PREFECT_LOGGING_EXTRA_LOGGERS, but it works however the flow was started
    (CLI, worker, serve, import); undone when the run ends.
    """
    extra = logging.getLogger("prefect.extra")
    library = logging.getLogger("apollo_sync")
    added = [h for h in extra.handlers if h not in library.handlers]
    level = library.level
    for handler in added:
        library.addHandler(handler)
    if level == logging.NOTSET:
        library.setLevel(extra.getEffectiveLevel())
    try:
        yield
    finally:
        for handler in added:
            library.removeHandler(handler)
        library.setLevel(level)
