"""One rate budget shared by every run and worker, kept in the PostgreSQL ledger: a token bucket updated by one
statement per request.

``sync-partitions`` children on several machines already meet in the ledger's database, so the budget lives there
too (table ``sync_rate_budget``, one row per budget name). Each acquisition is one ``INSERT ... ON CONFLICT DO
UPDATE ... RETURNING`` that refills the bucket for the time since its last update (on the database's clock, the
one clock every worker shares), takes one token and returns what is left:

    tokens = LEAST(1, tokens + per_second * elapsed) - 1

The bucket holds at most **one** token and may go into debt: a result ``>= 0`` means send now, a negative one
means this request's turn comes ``-tokens / per_second`` seconds later, and the caller sleeps exactly that long.
So the turns handed out are spaced at least ``1 / per_second`` apart, in the order the statements ran: in any
window of T seconds at most ``ceil(T * per_second)`` requests start (for T = 60: the configured per-minute rate,
never one more), and while requests are waiting every turn is used: nothing is lost to rounding or polling.
Unlike a "take a token if there is one" bucket, waiters do not poll and cannot starve each other.

A turn that is handed out and not used (the run stopped while it waited) is lost: the budget errs on the side of
sending less. What happens between a turn and the request's start (the run's own pacer, the event loop) can only
delay a request, and a late request can land close to the next one: keep the configured rate about 5 % under a
server's per-window limit, as for any client-side limit.

:class:`SharedBudget` runs the statement on its own connection (psycopg 3, autocommit) in a thread, so the event
loop never blocks on the database; it opens lazily and reconnects once after a broken connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from apollo_sync.errors import InputError
from apollo_sync.ledger.postgres import SCHEMES, redacted

_SCHEMA_LOCK = 72_616_572  # pg_advisory_xact_lock key while creating the table (the ledger's is ..571)
_SCHEMA = """CREATE TABLE IF NOT EXISTS sync_rate_budget (
    name       TEXT PRIMARY KEY,
    per_second DOUBLE PRECISION NOT NULL,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
)"""
_TAKE = """
    INSERT INTO sync_rate_budget AS b (name, per_second, tokens, updated_at)
    VALUES (%(name)s, %(per_second)s, 0, clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET
        per_second = excluded.per_second,
        tokens = LEAST(1.0, b.tokens + b.per_second
                            * GREATEST(0.0, EXTRACT(EPOCH FROM excluded.updated_at - b.updated_at))) - 1.0,
        updated_at = GREATEST(b.updated_at, excluded.updated_at)
    RETURNING tokens
"""
"""One acquisition. A new budget starts full (its first request goes at once). ``clock_timestamp()`` is read
before the row lock is taken: a statement that waited for the lock is credited no time it did not see, and
``GREATEST`` keeps the clock of the row from going back."""


def wait_for(tokens: float, per_second: float) -> float:
    """Seconds until the turn of an acquisition that left the bucket at ``tokens`` (0 when it may go now)."""
    return max(0.0, -tokens) / per_second


class SharedBudget:
    """``per_minute`` requests a minute under ``name``, shared by everyone who uses the same name in the same
    PostgreSQL database (``state_url``). ``await budget.acquire()`` before each request; ``close()`` at the end.

    ``sleep`` is awaited with the wait (injectable for tests).
    """

    def __init__(
        self,
        state_url: str,
        name: str,
        per_minute: float,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        if urlsplit(state_url).scheme.lower() not in SCHEMES:
            raise InputError(f"a shared rate budget needs a postgresql:// ledger, got {redacted(state_url)}")
        if not per_minute > 0:
            raise InputError(f"a shared rate budget needs a positive rate, got {per_minute!r} a minute")
        self.name, self.per_second = name, per_minute / 60.0
        self._url, self._shown, self._sleep = state_url, redacted(state_url), sleep
        self._db = None
        self._lock = threading.Lock()
        self.acquired = 0
        self.waited_seconds = 0.0

    def __repr__(self) -> str:
        return f"SharedBudget({self._shown!r}, {self.name!r}, {self.per_second * 60:g}/min)"

    async def acquire(self) -> None:
        """Take this request's turn and sleep until it comes."""
        wait = await asyncio.to_thread(self.take)
        self.acquired += 1
        if wait > 0:
            self.waited_seconds += wait
            await self._sleep(wait)

    def take(self) -> float:
        """One acquisition (one statement); returns the seconds to wait for its turn."""
        import psycopg

        params = {"name": self.name, "per_second": self.per_second}
        with self._lock:
            for attempt in (1, 2):
                try:
                    tokens = self._connection().execute(_TAKE, params).fetchone()[0]
                    return wait_for(tokens, self.per_second)
                except psycopg.OperationalError as exc:  # a dropped connection: open a new one, once
                    self._drop()
                    if attempt == 2:
                        raise InputError(f"the shared rate budget at {self._shown} is unreachable: "
                                         f"{type(exc).__name__}") from None  # fmt: skip
        raise AssertionError("unreachable")

    def _connection(self):
        import psycopg

        if self._db is None or self._db.closed:
            self._db = psycopg.connect(self._url, autocommit=True, connect_timeout=15, application_name="apollo-sync-budget")
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._db.execute(_SCHEMA)
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def close(self) -> None:
        """Release the connection (the budget's state stays in the database)."""
        with self._lock:
            self._drop()
