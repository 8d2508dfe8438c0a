"""Load prepared contacts into Apollo: chunks, bounded concurrency, pacing, the ledger; retries as the policy says.

A :class:`LoadSession` lives for one run (the flow calls :meth:`LoadSession.load` once per group of chunks) and
holds the client, the pacer, the ledger, the :class:`~apollo_sync.load.retry.RetryPolicy` and cumulative
:class:`LoadStats`. For each group of chunks it *claims* the rows in the ledger once (one transaction: marks them
``pending`` under this run unless a live run holds them, see ``apollo_sync.ledger``), sends the claimed ones chunk
by chunk, and records the answers (one transaction at most every ``RECORD_SECONDS``). The claim and the writes run
in a thread, beside the requests in flight; per chunk only plain lists are built (:class:`~.chunks.Ends`), and one
outcomes frame per group.

What happens after each attempt (429, 5xx, timeouts, 401/403, 422, ...) is the policy's decision (its module
docstring lists the rules); the session applies it: it waits with the injected ``sleep``, sends again with dedupe
when the policy forces it, splits the rows, or gives them up. Besides:

* A run stops on 401/403 or an API that never answered: ``load`` then returns the stop reason as
  ``GroupResult.stopped`` (an ``AuthError`` or ``Unreachable``) beside an outcome for every row; no further
  request is sent by this session, and later ``load`` calls return every row as ``failed`` ("not sent: ...").
* Rows another live run holds (another partition of the same source) are not sent: their outcome is
  ``duplicate`` with the reason "claimed by another partition (run …)". Claimed rows the ledger already knew are
  sent with ``run_dedupe`` true. While ``load`` runs, the run's claims are renewed every ``HEARTBEAT_SECONDS``.
* A row missing from a successful answer is ``unconfirmed``. Every row given to ``load`` comes back with exactly
  one outcome.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import polars as pl

from apollo_sync import settings
from apollo_sync.errors import ApolloAPIError, InputError, RateLimited, RunStopped, TransportFailure, Unreachable
from apollo_sync.load.chunks import (
    Chunk,
    RequestRows,
    Ends,
    RowOutcome,
    claimed_elsewhere,
    cut_chunks,
    group_lists,
)
from apollo_sync.load.client import ApolloClient, BulkCreateResponse
from apollo_sync.load.pacing import Pacer, Ticket
from apollo_sync.load.reconcile import reconcile
from apollo_sync.load.retry import Action, Attempt, Decision, RetryPolicy, Tries
from apollo_sync.load.upsert import upsert

if TYPE_CHECKING:
    from apollo_sync.ledger import Claim, Ledger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    """What a run sends and how: the ledger ``target``, the ``run_id`` its claims carry, the labels appended to
    every contact, ``run_dedupe``, at most ``concurrency`` requests in flight of at most ``chunk_size`` contacts."""

    target: str
    run_id: str = ""
    labels: tuple[str, ...] = ()
    run_dedupe: bool = True
    concurrency: int = settings.DEFAULT_CONCURRENCY
    chunk_size: int = settings.DEFAULT_CHUNK_SIZE
    mode: str = "create"
    """``create`` (Bulk Create only: a contact Apollo has is left as it is) or ``upsert`` (:mod:`.upsert`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.mode not in ("create", "upsert"):
            raise InputError(f"mode must be create or upsert, got {self.mode!r}")
        if not 1 <= self.chunk_size <= settings.MAX_CONTACTS_PER_REQUEST:
            raise InputError(f"chunk size must be 1 to {settings.MAX_CONTACTS_PER_REQUEST}, got {self.chunk_size}")
        if self.concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {self.concurrency}")


@dataclass
class LoadStats:
    """Counters. On a session they are cumulative over every ``load``; on a :class:`GroupResult`, that call's."""

    chunks: int = 0
    rows: int = 0
    requests: int = 0
    retries: int = 0
    http_429: int = 0
    http_5xx: int = 0
    http_4xx: int = 0
    timeouts: int = 0
    dropped: int = 0
    bisections: int = 0
    dedupe_forced: int = 0
    created: int = 0
    existing: int = 0
    updated: int = 0
    update_requests: int = 0
    """Bulk Update requests (attempts), counted in ``requests`` too."""
    failed: int = 0
    unconfirmed: int = 0
    unmatched_returned: int = 0
    """Contacts in answers that matched no sent row (a sign the answer and the payload disagree)."""
    claimed_elsewhere: int = 0
    """Rows not sent because another live run (partition) held them in the shared ledger."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for summaries and artifacts)."""
        return asdict(self)

    def add(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)


@dataclass(frozen=True)
class ChunkResult:
    """One finished chunk, handed to ``on_chunk_done``: its number, how many rows ended (each with an outcome) and
    the requests it took."""

    chunk: int
    rows: int
    requests: int


@dataclass(frozen=True)
class GroupResult:
    """What one ``load`` call returns: an outcome per row (``OUTCOMES_SCHEMA``), that call's stats, and the reason
    the run stopped (an ``AuthError`` or ``Unreachable``; None while it may go on)."""

    outcomes: pl.DataFrame
    stats: LoadStats
    stopped: RunStopped | None = None


class LoadSession:
    """Loads chunks for one run; see the module docstring for the rules.

    ``client`` must already be open (``async with ApolloClient(...)``). ``ledger`` may be None (nothing is
    remembered). ``policy`` decides the retries (default ``RetryPolicy()``; its ``settle_seconds`` defaults to
    its ``settle_factor`` times the client's timeout); ``sleep`` is awaited for the waits it asks for (backoff,
    settling, a 5xx's Retry-After; the pacer sleeps on its own). ``before_request`` is awaited before every HTTP
    request (the flow passes a Prefect global rate-limit acquire); ``on_chunk_done(ChunkResult)`` is called (and
    awaited if it returns an awaitable) after each chunk is recorded.
    """

    def __init__(
        self,
        client: ApolloClient,
        pacer: Pacer,
        ledger: Ledger | None,
        config: LoadConfig,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        before_request: Callable[[], Awaitable[Any]] | None = None,
        on_chunk_done: Callable[[ChunkResult], Any] | None = None,
    ):
        self.client = client
        self.pacer = pacer
        self.ledger = ledger
        self.config = config
        self.policy = (policy or RetryPolicy()).for_timeout(client.timeout)
        self.sleep = sleep
        self.before_request = before_request
        self.on_chunk_done = on_chunk_done
        self.stats = LoadStats()
        self.stopped: RunStopped | None = None
        """Why the run stopped (a 401/403, or an API that never answered); None while it goes on."""
        self._next_chunk = 0
        self._slots = asyncio.Semaphore(config.concurrency)  # shared by concurrent load() calls
        self._answers = 0  # HTTP answers of any status: the API is reachable once this is above 0

    def make_chunks(self, to_send: pl.DataFrame) -> list[Chunk]:
        """Cut ``to_send`` into chunks of at most ``chunk_size`` rows (see :func:`~apollo_sync.load.chunks.cut_chunks`);
        chunk numbers go on across calls."""
        chunks = cut_chunks(to_send, self.config.chunk_size, self._next_chunk)
        self._next_chunk += len(chunks)
        return chunks

    async def load(self, chunks: Sequence[Chunk]) -> GroupResult:
        """Send ``chunks`` with at most ``concurrency`` chunks in flight (over every ``load`` call running at once:
        the next group may start while the last requests of one finish); an outcome for every row.

        The ledger sees one claim for the whole group before its first request and the answers in batches (one
        transaction at most every ``RECORD_SECONDS``, and at the end): per chunk only plain lists are built.
        When the run stopped (now or on an earlier call), the result's ``stopped`` says why.
        """
        call = LoadStats()
        results: list[Ends | None] = [None] * len(chunks)
        pending = iter(range(len(chunks)))
        # In a thread, while the requests of the group before go on: the rows as lists, and their claim.
        claiming = self.ledger if self.stopped is None else None
        lists, claim = await asyncio.to_thread(prepare_group, claiming, self.config, chunks)
        records = Records(self.ledger, self.config.target, self.config.run_id)
        heartbeat = asyncio.create_task(renew_claims(self.ledger, self.config.run_id)) if self.ledger and chunks else None
        try:
            async with asyncio.TaskGroup() as group:

                async def worker() -> None:
                    for index in pending:
                        chunk = chunks[index]
                        async with self._slots:
                            ends, to_record, requests = await self._load_chunk(lists[index], chunk, claim, call)
                        results[index] = ends
                        records.add(to_record)
                        await self._finish_chunk(chunk, ends, requests, call)

                for _ in range(min(self.config.concurrency, len(chunks))):
                    group.create_task(worker())
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            await records.close()
        every = Ends()
        for ends in results:
            if ends is not None:
                every.extend(ends)
        return GroupResult(every.frame(), call, self.stopped)

    async def _load_chunk(self, rows: RequestRows, chunk: Chunk, claim: Claim | None, call: LoadStats) -> tuple[Ends, list[tuple], int]:
        """Send the chunk's claimed ``rows`` (create, or in upsert mode :func:`~apollo_sync.load.upsert.upsert`);
        returns (outcomes of every row, what the ledger records of the sent rows, requests made)."""
        refused = None
        dedupe = self.config.run_dedupe or chunk.must_dedupe
        sendable = self.stopped is None  # once stopped nothing is sent, so nothing goes in the ledger
        if sendable and claim is not None:
            held = [i for i, identity in enumerate(rows.identity) if identity in claim.refused]
            if held:
                refused = claimed_elsewhere(rows.pick(held), claim.refused)
                rows = rows.pick([i for i, identity in enumerate(rows.identity) if identity not in claim.refused])
                self.count(call, "claimed_elsewhere", len(refused))
            # The ledger knew some of these rows: they may have landed.
            dedupe = dedupe or any(identity in claim.seen for identity in rows.identity)
        requests_before = call.requests
        outcomes: list[RowOutcome] = []
        if len(rows) and self.config.mode == "upsert":
            outcomes = await upsert(self, rows, dedupe, call)
        elif len(rows):
            outcomes = await self.create(rows, dedupe, call)
        ends = Ends.of(rows, outcomes)
        # Rows this run claimed end in the ledger as they end here (after a stop: failed, not left pending).
        to_record = ledger_rows(rows, outcomes) if sendable or claim is not None else []
        if refused is not None:
            ends.extend(refused)
        return ends, to_record, call.requests - requests_before

    async def _finish_chunk(self, chunk: Chunk, ends: Ends, requests: int, call: LoadStats) -> None:
        """Count the chunk's outcomes, tell ``on_chunk_done``."""
        self.count(call, "chunks")
        self.count(call, "rows", len(ends))
        for outcome, n in Counter(ends.outcome).items():
            if outcome in ("created", "existing", "updated", "failed", "unconfirmed"):
                self.count(call, outcome, n)
        if self.on_chunk_done is not None:
            done = self.on_chunk_done(ChunkResult(chunk.number, len(ends), requests))
            if inspect.isawaitable(done):
                await done

    async def create(self, rows: RequestRows, dedupe: bool, call: LoadStats) -> list[RowOutcome]:
        """Create ``rows`` in one request, then retry, split or give up as the policy decides; one outcome per row.
        Rows whose body would pass ``MAX_REQUEST_BYTES`` are split before anything is sent."""
        if body_bytes(rows.payload) > settings.MAX_REQUEST_BYTES:
            return await create_in_halves(self, rows, dedupe, call)

        async def send(with_dedupe: bool) -> BulkCreateResponse:
            if with_dedupe and not self.config.run_dedupe:
                self.count(call, "dedupe_forced")
            return await self.client.bulk_create(rows.payload, labels=self.config.labels, run_dedupe=with_dedupe)

        async def split(forced: bool) -> list[RowOutcome]:
            middle = len(rows) // 2
            first = await self.create(rows.slice(0, middle), forced, call)
            return first + await self.create(rows.slice(middle, len(rows)), forced, call)

        def accept(answer: BulkCreateResponse, _ticket: Ticket, tries: Tries) -> list[RowOutcome]:
            outcomes, unmatched = created_outcomes(rows, answer, tries)
            if unmatched:
                self.count(call, "unmatched_returned", unmatched)
            return outcomes

        return await self.request(
            len(rows), send, accept, split, lambda outcome, reason: give_up(len(rows), outcome, reason), dedupe, call
        )

    async def request(
        self,
        size: int,
        send: Callable[[bool], Awaitable[Any]],
        accept: Callable[[Any, Ticket, Tries], list[RowOutcome]],
        split: Callable[[bool], Awaitable[list[RowOutcome]]],
        give: Callable[[str, str], list[RowOutcome]],
        dedupe: bool,
        call: LoadStats,
    ) -> list[RowOutcome]:
        """One request of ``size`` rows through the shared rate limit, the pacer and the retry policy.

        ``send(with_dedupe)`` makes the HTTP call; ``accept(answer, ticket, tries)`` turns a 2xx answer into the
        rows' outcomes; ``split(forced_dedupe)`` sends the two halves (a 400/413/422); ``give(outcome, reason)``
        gives every row up. Creates and updates (``apollo_sync.load.upsert``) both go through here.
        """
        tries = Tries()
        while True:
            if self.stopped is not None:
                outcome = "unconfirmed" if tries.maybe_landed else "failed"
                return give(outcome, f"not sent: {self.stopped.message}")
            if self.before_request is not None:
                await self.before_request()
            ticket = await self.pacer.acquire()
            if self.stopped is not None:
                continue
            send_dedupe = dedupe or tries.maybe_landed
            self.count(call, "requests")
            if tries.total:
                self.count(call, "retries")
            answer: Any = None
            error: ApolloAPIError | None = None
            try:
                answer = await send(send_dedupe)
                self._answers += 1
                attempt, reason = Attempt(answer.status, with_dedupe=send_dedupe), ""
            except ApolloAPIError as exc:
                error = exc
                attempt, reason = self._answered_error(exc, ticket, send_dedupe, call)
            except TransportFailure as exc:
                attempt, reason = self._no_answer(exc, send_dedupe, call)
            decision = self.policy.decide(attempt, tries, rows=size, answered=self._answers > 0)
            tries = decision.tries
            if decision.action is Action.RETRY:
                if attempt.status != 429:
                    logger.debug("retrying %d rows after %s", size, reason)
                if decision.delay > 0:
                    await self.sleep(decision.delay)
                continue
            if decision.action is Action.ACCEPT:
                self.pacer.observe(answer.rate, ticket)
                return accept(answer, ticket, tries)
            if decision.action is Action.BISECT:
                self.count(call, "bisections")
                logger.info("splitting %d rows in halves to isolate what the API refused: %s", size, reason)
                return await split(dedupe or decision.dedupe)
            return self._given_up(size, give, decision, reason, error)

    def _answered_error(
        self, exc: ApolloAPIError, ticket: Ticket, dedupe: bool, call: LoadStats
    ) -> tuple[Attempt, str]:
        """Count an error answer and tell the pacer; the attempt as the policy sees it, and the reason."""
        self._answers += 1
        if isinstance(exc, RateLimited):
            self.count(call, "http_429")
            self.pacer.on_429(exc.retry_after, exc.rate)
            return Attempt(429, exc.retry_after, with_dedupe=dedupe), f"429: {exc.message}"
        if exc.status in (401, 403):
            return Attempt(exc.status, with_dedupe=dedupe), f"{exc.status} {exc.message}"
        if exc.rate is not None:
            self.pacer.observe(exc.rate, ticket)
        self.count(call, "http_5xx" if exc.status >= 500 else "http_4xx")
        retry_after = exc.rate.retry_after if exc.rate is not None else None
        return Attempt(exc.status, retry_after, with_dedupe=dedupe), f"{exc.status}: {exc.message}"

    def _no_answer(self, exc: TransportFailure, dedupe: bool, call: LoadStats) -> tuple[Attempt, str]:
        """Count an attempt that got no usable answer; the attempt as the policy sees it, and the reason."""
        self.count(call, "timeouts" if exc.kind == "timeout" else "dropped")
        return Attempt(None, maybe_landed=exc.maybe_landed, with_dedupe=dedupe), exc.message

    def _given_up(
        self, size: int, give: Callable[[str, str], list[RowOutcome]], decision: Decision, reason: str,
        error: ApolloAPIError | None,
    ) -> list[RowOutcome]:
        """Give the rows up as the policy decided; stop the run when it says so."""
        if decision.action is Action.STOP_AUTH:
            assert isinstance(error, RunStopped)  # the client raises AuthError for 401/403
            self.stopped = error
            reason = f"not sent: {reason}"
        elif decision.action is Action.STOP_UNREACHABLE and self.stopped is None:
            # Not one answer in a whole chunk's retries: stop rather than spend as long on every chunk.
            self.stopped = Unreachable(reason)
        if decision.exhausted:
            reason = f"gave up after {decision.tries.total} attempts: {reason}"
        return give(decision.outcome or "failed", reason)

    def count(self, call: LoadStats, name: str, n: int = 1) -> None:
        self.stats.add(name, n)
        call.add(name, n)


def give_up(size: int, outcome: str, reason: str) -> list[RowOutcome]:
    """``size`` rows end as ``outcome`` (failed or unconfirmed) with ``reason``, which is logged."""
    logger.warning("%d rows %s: %s", size, outcome, reason)
    return [RowOutcome(outcome, None, reason) for _ in range(size)]


async def renew_claims(ledger: Ledger, run_id: str) -> None:
    """Renew ``run_id``'s claims in the ledger while chunks are loading (a failed renewal is only logged).

    Real time on purpose (not the session's ``sleep``): the lease is measured by other runs' clocks."""
    while True:
        await asyncio.sleep(settings.HEARTBEAT_SECONDS)
        try:
            ledger.heartbeat(run_id)
        except Exception as exc:  # noqa: BLE001 - the lease is long; the next beat or claim renews it
            logger.warning("could not renew the run's claims in the ledger: %s", type(exc).__name__)


async def create_in_halves(session: LoadSession, rows: RequestRows, dedupe: bool, call: LoadStats) -> list[RowOutcome]:
    """Rows too large for one request body, created half by half; one contact that alone is too large fails."""
    if len(rows) == 1:
        return give_up(1, "failed", f"not sent: the contact's body passes {settings.MAX_REQUEST_BYTES:,} bytes")
    middle = len(rows) // 2
    first = await session.create(rows.slice(0, middle), dedupe, call)
    return first + await session.create(rows.slice(middle, len(rows)), dedupe, call)


def body_bytes(payloads: Sequence[str]) -> int:
    """About the size of the request body carrying ``payloads`` (UTF-8, plus the list's punctuation and options)."""
    return sum(len(p.encode("utf-8")) + 1 for p in payloads) + 128


def created_outcomes(rows: RequestRows, answer: BulkCreateResponse, tries: Tries) -> tuple[list[RowOutcome], int]:
    """A Bulk Create answer matched to the rows sent (an ``existing`` row carries the contact Apollo returned), and
    how many returned contacts matched no row."""
    matched = reconcile(rows.sent, answer.created, answer.existing)
    notes = {"unconfirmed": "sent, but not in the answer"}
    if tries.maybe_landed:
        notes["existing"] = "matched on a retry: an earlier attempt whose answer was lost may have created it"
    outcomes = [
        RowOutcome(o, i, notes.get(o), contact=c if o == "existing" else None)
        for o, i, c in zip(matched.outcomes, matched.apollo_ids, matched.contacts)
    ]
    return outcomes, matched.unmatched_returned


def ledger_rows(rows: RequestRows, ends: Sequence[RowOutcome]) -> list[tuple]:
    """What the ledger records of the sent rows: ``(identity, fingerprint, apollo_id, status, field_hashes)`` with
    the status to store and the field hashes of the values sent (``Ledger.record_rows`` keeps the recorded ones)."""
    return [
        (identity, fingerprint, end.apollo_id, end.status or end.outcome, hashes)
        for identity, fingerprint, hashes, end in zip(rows.identity, rows.fingerprint, rows.field_hashes, ends)
    ]


def prepare_group(
    ledger: Ledger | None, config: LoadConfig, chunks: Sequence[Chunk]
) -> tuple[list[RequestRows], Claim | None]:
    """The chunks' rows as lists, and (with a ledger) one claim of them all: the ledger is asked once per group."""
    if not chunks:
        return [], None
    rows = pl.concat([chunk.rows for chunk in chunks], how="vertical")
    claim = None
    if ledger is not None:
        claim = ledger.claim(config.target, rows.select("identity", "fingerprint"), config.run_id)
    return group_lists(rows, [len(chunk) for chunk in chunks]), claim


class Records:
    """A group's answers for the ledger, written in one transaction at most every ``RECORD_SECONDS``, one write at a
    time in a thread (the event loop goes on sending), and the rest on :meth:`close`. A process killed in between
    leaves those rows ``pending``: the next run sends them with dedupe, so nothing is created twice."""

    def __init__(self, ledger: Ledger | None, target: str, run_id: str):
        self.ledger, self.target, self.run_id = ledger, target, run_id
        self.rows: list[tuple] = []
        self.written = time.monotonic()
        self.writing: asyncio.Future | None = None

    def add(self, rows: list[tuple]) -> None:
        self.rows.extend(rows)
        due = time.monotonic() - self.written >= settings.RECORD_SECONDS
        if due and self.rows and self.ledger is not None and (self.writing is None or self.writing.done()):
            if self.writing is not None:
                self.writing.result()  # a failed write fails the group (the rows stay pending)
            write = asyncio.to_thread(self.ledger.record_rows, self.target, self.rows, self.run_id)
            self.writing = asyncio.ensure_future(write)
            self.rows, self.written = [], time.monotonic()

    async def close(self) -> None:
        """Wait for the write in progress, then write what is left."""
        if self.writing is not None:
            await self.writing
        if self.rows and self.ledger is not None:
            await asyncio.to_thread(self.ledger.record_rows, self.target, self.rows, self.run_id)
        self.rows = []
