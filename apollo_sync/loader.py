"""Load prepared contacts into Apollo: chunks, bounded concurrency, pacing, retries, bisection, the ledger.

A :class:`LoadSession` lives for one run (the flow calls :meth:`LoadSession.load` once per group of chunks) and
holds the client, the pacer, the ledger and cumulative :class:`LoadStats`. For each chunk it *claims* the rows in
the ledger (one transaction: marks them ``pending`` under this run unless a live run holds them, see
``apollo_sync.ledger``), sends the claimed ones, and records the outcome of every row (one transaction,
in a task beside the next request). Ledger calls are synchronous on the event loop: each takes well under a
millisecond for 100 rows, and a thread hop measured slower (GIL hand-offs) than the write itself. The rules:

* 429: wait as the pacer says (``Retry-After``) and retry; these retries have their own, larger bound.
* 5xx, timeouts, dropped connections: retry with exponential backoff and jitter, up to ``max_attempts``. The
  request may have landed, so every later attempt of those rows runs with ``run_dedupe`` true, whatever the user
  chose: no second contact is created. After a timeout or a dropped connection of an attempt sent *without*
  dedupe, the retry waits at least ``settle_seconds`` (default twice the client timeout), so a server still
  processing that attempt has stored it before the retry's dedupe looks (a server slower than that could still
  race a retry). An attempt sent with dedupe needs no wait: whichever of it and its retry lands second finds the
  first. A
  ``Retry-After`` on a 5xx is honoured too.
* 401/403: raise ``AuthError`` at once; no further request is sent by this session. The exception carries
  ``result`` (a :class:`GroupResult` with an outcome for every row of the call). An API that has not answered
  once by the time a chunk exhausts its retries (connections refused, a wrong host) stops the session the same
  way with ``Unreachable``, instead of spending as long on every chunk.
* 400/413/422: split the chunk in halves until the offending contacts are isolated; they are ``failed`` with the
  API's message and the rest land.
* Rows another live run holds (another partition of the same source) are not sent: their outcome is
  ``duplicate`` with the reason "claimed by another partition (run …)". Claimed rows the ledger already knew are
  sent with ``run_dedupe`` true. While ``load`` runs, the run's claims are renewed every ``HEARTBEAT_SECONDS``.
* Rows that exhaust their attempts are ``failed`` with the reason, or ``unconfirmed`` if any attempt's outcome was
  unknown. A row missing from a successful answer is ``unconfirmed``. Every row given to ``load`` comes back with
  exactly one outcome.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Awaitable, Callable, Sequence

import polars as pl

from apollo_sync import settings
from apollo_sync.client import ApolloClient, RateLimited, TransportFailure
from apollo_sync.errors import ApolloAPIError, AuthError, InputError, RunStopped, Unreachable
from apollo_sync.ledger import Ledger
from apollo_sync.pacing import Pacer
from apollo_sync.payload import payload_fields, with_payload
from apollo_sync.reconcile import SentRow, reconcile

logger = logging.getLogger("apollo_sync.loader")

OUTCOMES_SCHEMA = {
    "source_row": pl.Int64,
    "email": pl.String,
    "outcome": pl.String,
    "apollo_id": pl.String,
    "reason": pl.String,
}
"""The outcomes frame every ``load`` returns (common contract)."""

REQUIRED_COLUMNS = ("source_row", "identity")
OPTIONAL_COLUMNS = ("fingerprint", "email", "first_name", "last_name", "organization_name")

DEFAULT_MAX_ATTEMPTS = 8
"""Attempts per request for 5xx, timeouts and dropped connections (429s are counted apart)."""
MAX_RATE_LIMITED = 50
"""429 answers one request may get before its rows are given up as failed."""
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
SETTLE_FACTOR = 2.0
"""After a timeout or a dropped connection, wait at least this many client timeouts before retrying: a server
still working on the first request then has finished, and the retry's dedupe finds what it stored."""
BISECT_STATUSES = frozenset({400, 413, 422})
RETRY_STATUSES = frozenset({408, 425})
"""Besides 5xx: client-side statuses worth retrying (their outcome is treated as unknown)."""


@dataclass(frozen=True)
class Chunk:
    """At most ``chunk_size`` rows sent in one request; ``must_dedupe`` chunks always go with ``run_dedupe``."""

    number: int
    rows: pl.DataFrame
    must_dedupe: bool = False

    def __len__(self) -> int:
        return self.rows.height


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
    """One finished chunk, handed to ``on_chunk_done``: its number, its rows' outcomes and the requests it took."""

    chunk: int
    outcomes: pl.DataFrame
    requests: int


@dataclass(frozen=True)
class GroupResult:
    """What one ``load`` call returns: an outcome per row (``OUTCOMES_SCHEMA``) and that call's stats."""

    outcomes: pl.DataFrame
    stats: LoadStats


@dataclass
class _Rows:
    """The rows of one request as plain lists (cheap to slice when bisecting)."""

    source_row: list[int]
    identity: list[str]
    fingerprint: list[str | None]
    payload: list[str]
    email: list[str | None]
    sent: list[SentRow]

    def __len__(self) -> int:
        return len(self.payload)

    def slice(self, start: int, stop: int) -> _Rows:
        return _Rows(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    @classmethod
    def of(cls, frame: pl.DataFrame) -> _Rows:
        cols = {c: frame[c].to_list() for c in frame.columns}
        sent = [
            SentRow(e, f, l, o)
            for e, f, l, o in zip(cols["email"], cols["first_name"], cols["last_name"], cols["organization_name"])
        ]
        return cls(cols["source_row"], cols["identity"], cols["fingerprint"], cols["payload"], cols["email"], sent)


@dataclass
class _Outcome:
    outcome: str
    apollo_id: str | None
    reason: str | None


@dataclass
class _Call:
    """Per-``load`` bookkeeping."""

    stats: LoadStats = field(default_factory=LoadStats)


class LoadSession:
    """Loads chunks for one run; see the module docstring for the rules.

    ``client`` must already be open (``async with ApolloClient(...)``). ``ledger`` may be None (nothing is
    remembered). At most ``concurrency`` chunks are in progress, so at most that many requests are in flight.
    ``before_request`` is awaited before every HTTP request (the flow passes a Prefect global rate-limit
    acquire); ``on_chunk_done(ChunkResult)`` is called (and awaited if it returns an awaitable) after each chunk
    is recorded. ``settle_seconds`` defaults to ``SETTLE_FACTOR`` times the client's timeout; ``seed`` fixes the
    backoff jitter.
    """

    def __init__(
        self,
        client: ApolloClient,
        pacer: Pacer,
        ledger: Ledger | None,
        *,
        target: str,
        labels: Sequence[str] = (),
        run_dedupe: bool = True,
        concurrency: int = settings.DEFAULT_CONCURRENCY,
        chunk_size: int = settings.DEFAULT_CHUNK_SIZE,
        run_id: str = "",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        before_request: Callable[[], Awaitable[Any]] | None = None,
        on_chunk_done: Callable[[ChunkResult], Any] | None = None,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
        settle_seconds: float | None = None,
        seed: int | None = None,
    ):
        if not 1 <= chunk_size <= settings.MAX_CONTACTS_PER_REQUEST:
            raise InputError(f"chunk size must be 1 to {settings.MAX_CONTACTS_PER_REQUEST}, got {chunk_size}")
        if concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {concurrency}")
        if max_attempts < 1:
            raise InputError(f"max attempts must be at least 1, got {max_attempts}")
        self.client = client
        self.pacer = pacer
        self.ledger = ledger
        self.target = target
        self.labels = list(labels)
        self.run_dedupe = run_dedupe
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.run_id = run_id
        self.max_attempts = max_attempts
        self.before_request = before_request
        self.on_chunk_done = on_chunk_done
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.settle_seconds = SETTLE_FACTOR * client.timeout if settle_seconds is None else settle_seconds
        self.stats = LoadStats()
        self._random = random.Random(seed)
        self._next_chunk = 0
        self._auth_error: RunStopped | None = None  # a 401/403, or an API that never answered
        self._answers = 0  # HTTP answers of any status: the API is reachable once this is above 0

    # --- chunks ------------------------------------------------------------------------------------------------------

    def make_chunks(self, to_send: pl.DataFrame) -> list[Chunk]:
        """Cut ``to_send`` into chunks of at most ``chunk_size`` rows.

        Needs ``source_row`` and ``identity``; ``fingerprint``, ``email``, ``first_name``, ``last_name``,
        ``organization_name`` and ``must_dedupe`` are used when present. The JSON sent per row is its ``payload``
        column, or when there is none it is written here from the Apollo field columns (prepare()'s contacts) by
        :func:`apollo_sync.payload.with_payload`. Rows that must be deduped are chunked apart, so they do not force
        dedupe on new rows.
        """
        missing = [c for c in REQUIRED_COLUMNS if c not in to_send.columns]
        if "payload" not in to_send.columns and not payload_fields(to_send.columns):
            missing.append("payload")
        if missing:
            raise InputError(f"rows to load lack column(s) {', '.join(missing)}; pass the contacts from prepare()")
        if "payload" not in to_send.columns:
            to_send = with_payload(to_send)
        frame = to_send.with_columns(
            [pl.lit(None, dtype=pl.String).alias(c) for c in OPTIONAL_COLUMNS if c not in to_send.columns]
        )
        if "must_dedupe" not in frame.columns:
            frame = frame.with_columns(must_dedupe=pl.lit(False))
        frame = frame.select(
            pl.col("source_row").cast(pl.Int64),
            *[pl.col(c).cast(pl.String) for c in ("identity", "payload", *OPTIONAL_COLUMNS)],
            pl.col("must_dedupe").fill_null(True).cast(pl.Boolean),
        )
        chunks: list[Chunk] = []
        for flag in (False, True):
            part = frame.filter(pl.col("must_dedupe") == flag).drop("must_dedupe")
            for start in range(0, part.height, self.chunk_size):
                chunks.append(Chunk(self._next_chunk, part.slice(start, self.chunk_size), flag))
                self._next_chunk += 1
        return chunks

    # --- loading -----------------------------------------------------------------------------------------------------

    async def load(self, chunks: Sequence[Chunk]) -> GroupResult:
        """Send ``chunks`` with at most ``concurrency`` requests in flight; an outcome for every row.

        Raises ``AuthError`` (with ``.result``) on 401/403, at once or on any later call, and ``Unreachable`` (also
        a ``RunStopped``) when the API gave no answer at all through a chunk's retries.
        """
        call = _Call()
        results: list[pl.DataFrame | None] = [None] * len(chunks)
        pending = iter(range(len(chunks)))
        heartbeat = asyncio.create_task(self._heartbeat()) if self.ledger is not None and chunks else None
        try:
            async with asyncio.TaskGroup() as group:

                async def worker() -> None:
                    for index in pending:
                        chunk = chunks[index]
                        frame, to_record, requests = await self._load_chunk(chunk, call)
                        results[index] = frame
                        # Recording runs in its own task, beside the next request of this slot.
                        group.create_task(self._finish_chunk(chunk, frame, to_record, requests, call))

                for _ in range(min(self.concurrency, len(chunks))):
                    group.create_task(worker())
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        frames = [frame for frame in results if frame is not None]
        outcomes = pl.concat(frames) if frames else pl.DataFrame(schema=OUTCOMES_SCHEMA)
        result = GroupResult(outcomes, call.stats)
        if self._auth_error is not None:
            self._auth_error.result = result  # type: ignore[attr-defined]
            raise self._auth_error
        return result

    async def _heartbeat(self) -> None:
        """Renew this run's claims in the ledger while chunks are loading (a failed renewal is only logged)."""
        while True:
            await asyncio.sleep(settings.HEARTBEAT_SECONDS)
            try:
                self.ledger.heartbeat(self.run_id)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the lease is long; the next beat or claim renews it
                logger.warning("could not renew the run's claims in the ledger: %s", type(exc).__name__)

    async def _load_chunk(self, chunk: Chunk, call: _Call) -> tuple[pl.DataFrame, pl.DataFrame | None, int]:
        """Claim, send; returns (outcomes of every row, sent rows' outcomes + identity/fingerprint to record or
        None, requests made)."""
        send = chunk.rows
        refused = None
        dedupe = self.run_dedupe or chunk.must_dedupe
        sendable = self._auth_error is None  # after a 401/403 nothing is sent, so nothing goes in the ledger
        if sendable and self.ledger is not None:
            claim = self.ledger.claim(self.target, chunk.rows, self.run_id)
            if claim.refused:
                held = pl.col("identity").is_in(list(claim.refused))
                refused = chunk.rows.filter(held).select(
                    pl.col("source_row"),
                    pl.col("email"),
                    pl.lit("duplicate").alias("outcome"),
                    pl.lit(None, pl.String).alias("apollo_id"),
                    pl.format(
                        "claimed by another partition (run {})",
                        pl.col("identity").replace_strict(claim.refused, return_dtype=pl.String),
                    ).alias("reason"),
                ).cast(OUTCOMES_SCHEMA)
                send = chunk.rows.filter(~held)
                self._count(call, "claimed_elsewhere", refused.height)
            dedupe = dedupe or bool(claim.seen)  # the ledger knew some of these rows: they may have landed
        rows = _Rows.of(send)
        requests_before = call.stats.requests
        outcomes = await self._send(rows, dedupe, call) if len(rows) else []
        sent = pl.DataFrame(
            {
                "source_row": rows.source_row,
                "email": rows.email,
                "outcome": [o.outcome for o in outcomes],
                "apollo_id": [o.apollo_id for o in outcomes],
                "reason": [o.reason for o in outcomes],
            },
            schema=OUTCOMES_SCHEMA,
        )
        to_record = pl.concat([sent, send.select("identity", "fingerprint")], how="horizontal") if sendable else None
        frame = sent if refused is None else pl.concat([sent, refused], how="vertical")
        return frame, to_record, call.stats.requests - requests_before

    async def _finish_chunk(
        self, chunk: Chunk, frame: pl.DataFrame, to_record: pl.DataFrame | None, requests: int, call: _Call
    ) -> None:
        """Record the chunk's outcomes in the ledger (one transaction), count them, tell ``on_chunk_done``."""
        if to_record is not None and to_record.height and self.ledger is not None:
            self.ledger.record(self.target, to_record, self.run_id)
        self._count(call, "chunks")
        self._count(call, "rows", frame.height)
        for outcome, n in frame["outcome"].value_counts().iter_rows():
            if outcome in ("created", "existing", "failed", "unconfirmed"):
                self._count(call, outcome, n)
        if self.on_chunk_done is not None:
            done = self.on_chunk_done(ChunkResult(chunk.number, frame, requests))
            if inspect.isawaitable(done):
                await done

    async def _send(self, rows: _Rows, dedupe: bool, call: _Call) -> list[_Outcome]:
        """Send ``rows`` in one request, retrying and bisecting as the rules say; one outcome per row."""
        attempts = rate_limited = 0
        unknown = False  # some attempt may have landed: dedupe from now on, and never call the rows failed
        reason = ""
        while True:
            if self._auth_error is not None:
                return _give_up(rows, unknown, f"not sent: {self._auth_error.message}")
            if attempts >= self.max_attempts or rate_limited >= MAX_RATE_LIMITED:
                if self._answers == 0 and self._auth_error is None:
                    # Not one answer in a whole chunk's retries: stop rather than spend as long on every chunk.
                    self._auth_error = Unreachable(reason)
                return _give_up(rows, unknown, f"gave up after {attempts + rate_limited} attempts: {reason}")
            if self.before_request is not None:
                await self.before_request()
            ticket = await self.pacer.acquire()
            if self._auth_error is not None:
                continue
            send_dedupe = dedupe or unknown
            self._count(call, "requests")
            if attempts or rate_limited:
                self._count(call, "retries")
            if send_dedupe and not self.run_dedupe:
                self._count(call, "dedupe_forced")
            try:
                answer = await self.client.bulk_create(rows.payload, labels=self.labels, run_dedupe=send_dedupe)
                self._answers += 1
            except RateLimited as exc:
                self._answers += 1
                rate_limited += 1
                self._count(call, "http_429")
                self.pacer.on_429(exc.retry_after, exc.rate)
                reason = f"429: {exc.message}"
                continue
            except AuthError as exc:
                self._answers += 1
                self._auth_error = exc
                return _give_up(rows, unknown, f"not sent: {exc.status} {exc.message}")
            except ApolloAPIError as exc:
                self._answers += 1
                attempts += 1
                rate = getattr(exc, "rate", None)
                if rate is not None:
                    self.pacer.observe(rate, ticket)
                reason = f"{exc.status}: {exc.message}"
                if exc.status >= 500 or exc.status in RETRY_STATUSES:
                    self._count(call, "http_5xx" if exc.status >= 500 else "http_4xx")
                    unknown = True
                    logger.debug("retrying %d rows after %s", len(rows), reason)
                    await self._backoff(attempts, at_least=(rate.retry_after or 0.0) if rate is not None else 0.0)
                    continue
                self._count(call, "http_4xx")
                if exc.status in BISECT_STATUSES:
                    if len(rows) == 1:
                        return [_Outcome("failed", None, reason)]
                    self._count(call, "bisections")
                    logger.info("splitting %d rows in halves to isolate what the API refused: %s", len(rows), reason)
                    middle = len(rows) // 2
                    first = await self._send(rows.slice(0, middle), dedupe or unknown, call)
                    return first + await self._send(rows.slice(middle, len(rows)), dedupe or unknown, call)
                return _give_up(rows, unknown, reason)
            except TransportFailure as exc:
                attempts += 1
                self._count(call, "timeouts" if exc.kind == "timeout" else "dropped")
                unknown = unknown or exc.maybe_landed
                reason = exc.message
                logger.debug("retrying %d rows after %s", len(rows), reason)
                # The server may still be working on an attempt sent without dedupe: let it finish, so the retry's
                # dedupe sees its contacts. An attempt sent with dedupe cannot race its retry into a duplicate.
                settle = exc.maybe_landed and not send_dedupe
                await self._backoff(attempts, at_least=self.settle_seconds if settle else 0.0)
                continue
            self.pacer.observe(answer.rate, ticket)
            matched = reconcile(rows.sent, answer.created, answer.existing)
            if matched.unmatched_returned:
                self._count(call, "unmatched_returned", matched.unmatched_returned)
            notes = {"unconfirmed": "sent, but not in the answer"}
            if unknown:
                notes["existing"] = "matched on a retry: an earlier attempt whose answer was lost may have created it"
            return [_Outcome(o, i, notes.get(o)) for o, i in zip(matched.outcomes, matched.apollo_ids)]

    async def _backoff(self, attempt: int, at_least: float = 0.0) -> None:
        """Exponential backoff with jitter: between half and all of ``base * 2**(attempt-1)``, capped."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        await asyncio.sleep(max(at_least, ceiling / 2 + self._random.uniform(0, ceiling / 2)))

    def _count(self, call: _Call, name: str, n: int = 1) -> None:
        self.stats.add(name, n)
        call.stats.add(name, n)


def _give_up(rows: _Rows, unknown: bool, reason: str) -> list[_Outcome]:
    outcome = "unconfirmed" if unknown else "failed"
    logger.warning("%d rows %s: %s", len(rows), outcome, reason)
    return [_Outcome(outcome, None, reason) for _ in range(len(rows))]
