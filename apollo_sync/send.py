"""The sending side of a run: the plan of one part, the session that sends its groups, progress, outcomes.

:class:`Stream` takes each planned part (:class:`Plan`) from :func:`apollo_sync.sync.stream_parts`, cuts its rows
into groups of ``settings.CHUNKS_PER_LOAD_TASK`` chunks (one ``send`` step each, :data:`GROUPS_IN_FLIGHT` at once,
so no request slot idles while the last requests of a group finish). Every outcome goes to the run's
:class:`~apollo_sync.report.ResultsStream` as it is known: a part's unchanged rows when it is planned, a group's
outcomes by its ``send`` step when the group ends (the stream keeps only each group's stats, :class:`Sent`).
The frame work of a part (carrying short chunks over, cutting chunks) runs in a thread, beside the requests in
flight. After a stop (a 401, an API that never answers) nothing more is sent and every later row is ``failed``
with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import polars as pl

from apollo_sync import settings
from apollo_sync.errors import ConfigError, RunStopped
from apollo_sync.load import (
    ApolloClient,
    Chunk,
    ChunkResult,
    LoadConfig,
    LoadSession,
    LoadStats,
    Pacer,
)
from apollo_sync.load.client import warm_tls_context
from apollo_sync.load.update import would_change
from apollo_sync.redact import api_key_from
from apollo_sync.report import RESULTS_SCHEMA, Frame, ResultsStream

if TYPE_CHECKING:
    from apollo_sync.sync import Steps, SyncRun

logger = logging.getLogger("apollo_sync.sync")

PROGRESS_LOG_SECONDS = 10.0
"""Least time between two progress lines in the log while contacts are sent."""
GROUPS_IN_FLIGHT = 2
"""Groups of chunks (task runs) sending at once: the next starts while the last requests of one finish."""


@dataclass(frozen=True)
class Plan:
    """What the ledger made of one part of the cleaned contacts: the rows to send (in chunks) and those unchanged."""

    number: int
    """The part's number in the run (from 0)."""
    to_send: pl.DataFrame
    """``must_dedupe`` marks rows the ledger saw before; in upsert mode ``update_id``/``base_hashes`` too."""
    unchanged: pl.DataFrame
    dry_run: bool
    elsewhere: pl.DataFrame | None = None
    """A partition child's rows whose contact another partition of the same parent run sends (``reason``)."""

    @property
    def rows_to_send(self) -> int:
        return self.to_send.height


@dataclass(frozen=True)
class GroupSent:
    """What one ``send`` step returns once its outcomes are in the results files: its stats and stop reason."""

    rows: int
    stats: LoadStats
    stopped: RunStopped | None = None


@dataclass
class Sent:
    """The groups sent so far, in the order they finished (each a small :class:`GroupSent`: the outcomes went to the
    results files, so memory does not grow with the source)."""

    groups: list[GroupSent] = field(default_factory=list)
    first_request_seconds: float | None = None
    """When the first request went, in seconds after the run started (None: nothing was sent)."""

    @property
    def stopped(self) -> RunStopped | None:
        return next((g.stopped for g in self.groups if g.stopped is not None), None)

    @property
    def stats(self) -> dict[str, int]:
        """The groups' stats added up."""
        total: dict[str, int] = {}
        for group in self.groups:
            for key, value in group.stats.as_dict().items():
                total[key] = total.get(key, 0) + value
        return total


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


_watchers: list[Callable[[int, int, float], None]] = []


@contextmanager
def watching_progress(callback: Callable[[int, int, float], None]) -> Iterator[None]:
    """Call ``callback(done, total, contacts_per_second)`` after every chunk any run of this process sends, while in
    the block (the CLI's progress bar). ``total`` counts the rows planned so far: it grows while parts are cleaned
    and planned (a part waits to be planned until the groups before it are nearly sent)."""
    _watchers.append(callback)
    try:
        yield
    finally:
        _watchers.remove(callback)


class Progress:
    """Counts sent rows against those planned so far; logs a progress line at most every
    :data:`PROGRESS_LOG_SECONDS` (and at the end); tells the watchers of :func:`watching_progress` after every
    chunk and ``show(rows, total)`` (the flow's progress artifact) beside the requests: a chunk's worker never
    waits for it (an artifact update is an API call; awaited in the worker, it held every slot whose chunk ended
    meanwhile). Rows done while one ``show`` is under way go to the next, so calls do not pile up; :meth:`shown`
    waits for the last."""

    def __init__(self, show: Callable[[int, int], Awaitable[None]] | None = None):
        self.total = 0
        self.done = 0
        self.planning = True
        """More parts may come: the total counts the rows planned so far."""
        self._show = show
        self._unshown = 0
        self._showing: asyncio.Task | None = None
        self._started = self._logged = time.monotonic()

    def expect(self, rows: int) -> None:
        """``rows`` more rows are planned to be sent."""
        self.total += rows

    async def chunk_done(self, result: ChunkResult) -> None:
        self.done += result.rows
        now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-9)
        for watcher in list(_watchers):
            watcher(self.done, self.total, rate)
        last = self.done >= self.total and not self.planning
        if now - self._logged >= PROGRESS_LOG_SECONDS or (last and self._logged != float("inf")):
            self._logged = float("inf") if last else now  # the last line once
            more = " planned so far (more parts to plan)" if self.planning else ""
            left = "" if self.planning else f", about {(self.total - self.done) / rate if rate else 0:.0f}s to go"
            logger.info("Progress: %d of %d contacts%s (%.0f%%), %.0f contacts/s%s", self.done, self.total, more,
                        100 * self.done / max(self.total, 1), rate, left)  # fmt: skip
        if self._show is not None:
            self._unshown += result.rows
            if self._showing is None or self._showing.done():
                self._showing = asyncio.ensure_future(self._show_unshown(self._show))

    async def _show_unshown(self, show: Callable[[int, int], Awaitable[None]]) -> None:
        while self._unshown:
            rows, self._unshown = self._unshown, 0
            await show(rows, self.total)

    async def shown(self) -> None:
        """Wait until ``show`` has been told of every chunk done so far."""
        if self._showing is not None:
            await self._showing


@dataclass
class Sender:
    """The run's one HTTP client session (pacer, ledger, retries), its progress, and where outcomes go."""

    session: LoadSession
    progress: Progress
    results: ResultsStream


class Group:
    """The chunks one ``send`` step (one task run) sends: at most ``CHUNKS_PER_LOAD_TASK`` of them. A plain object,
    so Prefect does not walk a hundred chunks as task inputs."""

    __slots__ = ("number", "chunks")

    def __init__(self, number: int, chunks: list[Chunk]):
        self.number, self.chunks = number, chunks

    def __repr__(self) -> str:
        return f"Group({self.number}, {len(self.chunks)} chunks)"


def cut_groups(session: LoadSession, rows: pl.DataFrame, first: int = 0) -> list[Group]:
    """``rows`` in chunks (``session.make_chunks``), in groups of at most ``CHUNKS_PER_LOAD_TASK`` chunks, numbered
    from ``first``. Cut once: nothing keeps them after they are sent."""
    chunks = session.make_chunks(rows)
    per = settings.CHUNKS_PER_LOAD_TASK
    return [Group(first + n, chunks[i : i + per]) for n, i in enumerate(range(0, len(chunks), per))]


async def key_from_environment(block_name: str | None) -> str:
    """The API key from ``APOLLO_API_KEY`` (plain runs have no Secret blocks), registered for redaction."""
    key = os.environ.get(settings.ENV_API_KEY)
    if not key or not key.strip():
        raise ConfigError(f"no Apollo API key: set the {settings.ENV_API_KEY} environment variable (or pass --api-key)")
    return api_key_from(key)


async def open_sender(
    run: SyncRun, steps: Steps, results: ResultsStream, on_request: Callable[[], None]
) -> tuple[ApolloClient, Sender]:
    """The client (to close when done) and the run's sender, progress and rate limit wired in; ``on_request()``
    is called as each request goes (after the shared rate limit let it)."""
    apollo, load = run.params.apollo, run.params.load
    key = await (steps.api_key or key_from_environment)(apollo.api_key_block)
    progress = Progress(await steps.show_progress() if steps.show_progress else None)
    shared = steps.rate_limit if load.rate_limit_name else None
    acquire = shared(load.rate_limit_name, run.params.run.state_url) if shared else None

    async def before() -> None:
        if acquire is not None:
            await acquire()
        on_request()

    client = ApolloClient(apollo.base_url, key, auth=apollo.auth.value, timeout=load.timeout)
    await client.__aenter__()
    config = LoadConfig(target=run.target, run_id=run.run_id, labels=tuple(apollo.labels), run_dedupe=apollo.run_dedupe,
                        concurrency=load.concurrency, chunk_size=load.chunk_size, mode=run.params.run.mode.value)  # fmt: skip
    session = LoadSession(client, Pacer(max_rpm=load.max_rpm), run.ledger, config, before_request=before,
                          on_chunk_done=progress.chunk_done)  # fmt: skip
    return client, Sender(session, progress, results)


def whole_chunks(rows: pl.DataFrame, size: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows that fill whole chunks of ``size``, the rest): per kind of chunk (``cut_chunks`` keeps rows that must be
    deduped, and updates, in chunks of their own), the last ``count % size`` rows of the kind wait."""
    kind = [pl.col("must_dedupe").fill_null(True)]
    if "update_id" in rows.columns:
        kind.append(pl.col("update_id").is_null())
    full = pl.int_range(pl.len()).over(kind) < (pl.len().over(kind) // size) * size
    marked = rows.with_columns(full.alias("_full"))
    return marked.filter("_full").drop("_full"), marked.filter(~pl.col("_full")).drop("_full")


class Stream:
    """One run's sending side: takes each planned part, sends its groups (at most :data:`GROUPS_IN_FLIGHT` at once)
    and writes every outcome to the results as it comes."""

    def __init__(self, run: SyncRun, steps: Steps, results: ResultsStream):
        self.run, self.steps, self.results = run, steps, results
        self.sent = Sent()
        self.client: ApolloClient | None = None
        self.sender: Sender | None = None
        self._in_flight: set[asyncio.Task] = set()
        self._carry: pl.DataFrame | None = None
        self._groups = 0  # groups handed to the send step so far (their numbers)
        self._first_request = asyncio.Event()
        # The client's TLS context, built in a thread while the first part is read and cleaned (a sending run).
        self._tls = None if run.params.run.dry_run else asyncio.ensure_future(warm_tls_context())

    async def take(self, plan: Plan, *, last: bool = False) -> None:
        """Account for ``plan``'s unchanged rows and send (or in a dry run list) the rest. A part's rows that would
        leave a chunk short wait for the next part (``last``: send them now), so parts cost no extra requests."""
        # The frame work runs in a thread, so the requests in flight are answered meanwhile.
        plan = await asyncio.to_thread(self._settle, plan, last)
        if plan is None:
            return
        if self.sender is None:
            if self._tls is not None:
                await self._tls
            self.client, self.sender = await open_sender(self.run, self.steps, self.results, self._request_goes)
        self.sender.progress.expect(plan.rows_to_send)
        groups = await asyncio.to_thread(cut_groups, self.sender.session, plan.to_send, self._groups)
        self._groups += len(groups)
        while groups:
            group = groups.pop(0)  # the stream keeps no group once it is handed over
            while len(self._in_flight) >= GROUPS_IN_FLIGHT:
                await self._one_done()
            if self.sent.stopped is not None:  # nothing more is sent; every row still gets its outcome
                rows = pl.concat([chunk.rows for chunk in group.chunks])
                self.results.add(as_outcomes(rows, "failed", reason=f"not sent: the run stopped ({self.sent.stopped.message})"))
                continue
            sending = asyncio.ensure_future(self.steps.send(self.sender, plan, group))
            self._in_flight.add(sending)
            if not self._first_request.is_set():
                await self._until_first_request(sending)

    def _request_goes(self) -> None:
        if not self._first_request.is_set():
            self._first_request.set()
            self.sent.first_request_seconds = round(time.monotonic() - self.run.started, 3)
            logger.info("Sending the first request %.1fs after the run started", self.sent.first_request_seconds)

    async def _until_first_request(self, sending: asyncio.Future) -> None:
        """Wait until the run's first request is out (or its group ended without one): the ledger claims the
        group's rows first, and the next part's plan would compete with that claim for the ledger and the CPU."""
        first = asyncio.ensure_future(self._first_request.wait())
        try:
            await asyncio.wait({first, sending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()

    def _settle(self, plan: Plan, last: bool) -> Plan | None:
        """Write the outcomes ``plan`` already decides (unchanged, elsewhere, a dry run's); the plan of the rows to
        send now (with the rows carried over from the last part; without those left for the next), or None."""
        self.results.add(as_outcomes(plan.unchanged, "unchanged"))
        if plan.elsewhere is not None:
            self.results.add(as_outcomes(plan.elsewhere, "duplicate"))
        if plan.dry_run:
            self.results.add(would_send(plan.to_send))
            return None
        to_send = plan.to_send if self._carry is None else pl.concat([self._carry, plan.to_send], how="vertical_relaxed")
        self._carry = None
        if not last:
            to_send, self._carry = whole_chunks(to_send, self.run.params.load.chunk_size)
        return replace(plan, to_send=to_send) if to_send.height else None

    async def take_rest(self) -> None:
        """Send the rows still waiting for a whole chunk (the stream has ended)."""
        if self._carry is not None and self._carry.height:
            rest = Plan(-1, self._carry.head(0), self._carry.head(0), dry_run=False)
            await self.take(rest, last=True)

    async def _one_done(self) -> None:
        done, _ = await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            self._in_flight.discard(task)
            result = task.result()
            if result.stopped is not None and self.sent.stopped is None:
                logger.error("Stopped: %s", result.stopped)
            self.sent.groups.append(result)

    async def finish(self) -> Sent:
        """Wait for the groups still sending (every part is planned); close the client."""
        if self.sender is None and not self.run.params.run.dry_run:
            logger.info("Nothing new or changed since the last sync: no request needed")
        if self.sender is not None:
            self.sender.progress.planning = False
        try:
            while self._in_flight:
                await self._one_done()
        finally:
            await self.close()
        return self.sent

    async def close(self) -> None:
        if self._tls is not None:
            await asyncio.gather(self._tls, return_exceptions=True)
        for task in self._in_flight:
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            self._in_flight.clear()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.sender is not None:
            await self.sender.progress.shown()
