"""Client-side pacing: spend every rate window's budget to the last request, and never more.

One :class:`Pacer` per run is shared by all concurrent requests. ``await pacer.acquire()`` before each request
reserves one request from every known window and waits while any window is spent; ``pacer.observe(rate, ticket)``
after each answer corrects the budgets from the server's headers; ``pacer.on_429(retry_after, rate)`` pauses
everyone and re-anchors the spent window.

Two kinds of window:

* **Gateway** (``X-RateLimit-Remaining``/``Reset``): the reset time is in every answer, so the pacer follows the
  server's windows exactly; a reset later than the one modelled means a new window began.
* **Apollo direct** (``x-<minute|hourly|daily>-requests-left``): no reset header. Windows are assumed fixed and
  aligned to the wall clock (60/3600/86400 s, ``settings.APOLLO_WINDOWS``); a 429's ``Retry-After`` re-anchors a
  window whose budget the server says is spent.

Requests in flight stay in the accounting: every reservation counts against the window at once. While the
server's count shows no more requests than this run made in the window, the pacer's own count is exact and is
kept. When it shows more (another client shares the key, or a request of ours crossed into the window), the
server's ``remaining`` is taken, less the reservations made after the answered request (which the server may not
have counted yet). Within one window the pacer only ever lowers its estimate, so answers arriving out of order
cannot inflate it. ``max_rpm`` is a
cap that is always honoured (requests are spaced ``60/max_rpm`` seconds apart); it is the only limit when the
server sends no rate headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from apollo_sync.load.rates import RateInfo

logger = logging.getLogger(__name__)

LOG_WAIT_SECONDS = 5.0
"""A wait longer than this is logged at INFO, naming the window."""
DEFAULT_429_WAIT = 1.0
"""Seconds to pause after a 429 that carried no ``Retry-After``."""
UNKNOWN_RESET_WAIT = 1.0
"""Seconds to wait when a window is spent and nothing says when it resets; then one probe request goes out."""


@dataclass(frozen=True)
class Ticket:
    """A reservation handed out by :meth:`Pacer.acquire`; give it back to :meth:`Pacer.observe`.

    ``epochs`` holds, per known window, which of its windows the reservation was made in (a window not yet
    known counts as its first).
    """

    seq: int
    epochs: dict[str, int] = field(default_factory=dict)


@dataclass
class _Window:
    name: str
    length: float | None
    aligned: bool
    limit: int | None = None
    left: int | None = None
    reset_at: float | None = None
    reset_observed: bool = False  # reset_at came from the server, not from adding a window length
    epoch: int = 0
    sent: int = 0  # reservations made in the current window

    def lower(self, remaining: int, estimate: int) -> None:
        """Apply a server count from the current window, unless it shows no one but us using the window."""
        if self.limit is not None and self.left is not None and remaining >= self.limit - self.sent:
            return  # the server counted no more than we sent: our own count is exact
        self.left = estimate if self.left is None else min(self.left, estimate)

    def restart(self, estimate: int) -> None:
        """Start tracking a window the server is in from its count (minus our requests it may not have seen)."""
        self.left = estimate
        self.sent = max(0, self.limit - estimate) if self.limit is not None else 0


def _learned_length(longest_delay: float) -> float | None:
    """A window length from the longest delay to a reset seen: rounded up to whole seconds when within 5 %."""
    if longest_delay <= 0:
        return None
    whole = float(max(1, -(-longest_delay // 1)))
    return whole if whole - longest_delay <= 0.05 * whole else longest_delay


class Pacer:
    """Paces the requests of one run (see the module docstring).

    ``clock`` is a monotonic clock and ``sleep`` an async sleep (both injectable for tests); ``wall`` is the wall
    clock used to align Apollo's windows (defaults to ``time.time``).
    """

    def __init__(
        self,
        max_rpm: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        *,
        wall: Callable[[], float] = time.time,
    ):
        if max_rpm is not None and max_rpm <= 0:
            raise ValueError("max_rpm must be positive")
        self.max_rpm = max_rpm
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._windows: dict[str, _Window] = {}
        self._seq = 0
        self._pause_until = 0.0
        self._next_slot = float("-inf")
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.waited_seconds = 0.0
        """Total time spent waiting in :meth:`acquire`."""

    # --- before a request ----------------------------------------------------------------------------------------

    async def acquire(self) -> Ticket:
        """Wait until every known window has budget, then reserve one request from each."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            # The flow may drive one pacer from several event loops (one per task run); a lock binds to one.
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            while True:
                now = self._clock()
                self._roll(now)
                until, reason = self._blocked_until(now)
                if until is None:
                    break
                delay = until - now
                if delay > LOG_WAIT_SECONDS:
                    logger.info("rate limit: waiting %.0f s for %s", delay, reason)
                self.waited_seconds += delay
                await self._sleep(delay)
            self._seq += 1
            for w in self._windows.values():
                w.sent += 1
                if w.left is not None:
                    w.left -= 1
            if self.max_rpm:
                self._next_slot = max(now, self._next_slot) + 60.0 / self.max_rpm
            return Ticket(self._seq, {name: w.epoch for name, w in self._windows.items()})

    def _roll(self, now: float) -> None:
        """Start a new epoch in every window whose reset time has passed."""
        for w in self._windows.values():
            if w.reset_at is None or now < w.reset_at:
                continue
            w.epoch += 1
            w.left = w.limit
            w.sent = 0
            w.reset_observed = False
            if w.length:
                while w.reset_at <= now:
                    w.reset_at += w.length
            else:
                w.reset_at = None

    def _blocked_until(self, now: float) -> tuple[float | None, str]:
        waits: list[tuple[float, str]] = []
        if self._pause_until > now:
            waits.append((self._pause_until, "the Retry-After of a 429 answer"))
        for w in self._windows.values():
            if w.left is None or w.left > 0:
                continue
            if w.reset_at is None:
                # Spent, and nothing says when it resets: wait a little, then allow one probe.
                w.reset_at = now + (w.length or UNKNOWN_RESET_WAIT)
                if w.limit is None:
                    w.limit = 1
            limit = f" (limit {w.limit} requests)" if w.limit is not None else ""
            waits.append((w.reset_at, f"the {w.name} window to reset{limit}"))
        if self.max_rpm and self._next_slot > now:
            waits.append((self._next_slot, f"the configured cap of {self.max_rpm:g} requests a minute"))
        if not waits:
            return None, ""
        return max(waits, key=lambda item: item[0])

    # --- after an answer -----------------------------------------------------------------------------------------

    def observe(self, rate: RateInfo, ticket: Ticket | None = None) -> None:
        """Correct the budgets from an answer's rate headers (``ticket`` is the reservation of that request)."""
        now = self._clock()
        after = self._seq - ticket.seq if ticket is not None else 0
        for info in rate.windows:
            w = self._window(info.name, info.length, aligned=info.reset_after is None, now=now)
            if info.limit is not None:
                w.limit = info.limit
            if info.remaining is None:
                continue
            estimate = info.remaining - after
            if info.reset_after is not None:
                self._observe_with_reset(w, now + info.reset_after, info.reset_after, info.remaining, estimate, ticket)
            elif w.left is None:
                w.restart(estimate)
            elif ticket is None or ticket.epochs.get(w.name, 0) == w.epoch:
                w.lower(info.remaining, estimate)
            # else: the answer was counted in an earlier window of ours; it says nothing about this one.

    def _observe_with_reset(
        self, w: _Window, reset_at: float, reset_after: float, remaining: int, estimate: int, ticket: Ticket | None
    ) -> None:
        if reset_after > (w.length or 0.0):
            w.length = _learned_length(reset_after)
        tolerance = max(0.05, 0.25 * (w.length or 0.0))
        same_epoch_ticket = ticket is None or ticket.epochs.get(w.name, 0) == w.epoch
        if w.reset_at is None or reset_at > w.reset_at + tolerance:
            # The server is in a window we have not modelled yet: take its word.
            if w.reset_at is not None:
                w.epoch += 1
            w.reset_at, w.reset_observed = reset_at, True
            w.restart(estimate)
        elif reset_at >= w.reset_at - tolerance or same_epoch_ticket:
            # Our window (or we rolled over too early: a request reserved after our reset was still counted in
            # the server's earlier window). The server's reset time wins over our estimate.
            w.reset_at = reset_at if not w.reset_observed else min(w.reset_at, reset_at)
            w.reset_observed = True
            w.lower(remaining, estimate)
        # else: a late answer from a window that has already reset.

    def on_429(self, retry_after: float | None, rate: RateInfo | None = None) -> None:
        """A 429 came: pause every request for ``retry_after`` and mark the spent windows until then."""
        now = self._clock()
        wait = DEFAULT_429_WAIT if retry_after is None else max(0.0, retry_after)
        self._pause_until = max(self._pause_until, now + wait)
        for info in rate.windows if rate is not None else ():
            if info.remaining is None or info.remaining > 0:
                continue
            w = self._window(info.name, info.length, aligned=info.reset_after is None, now=now)
            if info.limit is not None:
                w.limit = info.limit
            w.left = 0
            # Re-anchor: this window resets when the server says to come back.
            w.reset_at = now + (info.reset_after if info.reset_after is not None else wait)
            w.reset_observed = True

    def _window(self, name: str, length: float | None, *, aligned: bool, now: float) -> _Window:
        w = self._windows.get(name)
        if w is None:
            w = self._windows[name] = _Window(name, length, aligned)
            if aligned and length:
                # Apollo's windows are assumed aligned to the wall clock (minute, hour, day boundaries).
                w.reset_at = now + (length - (self._wall() % length))
        return w

    # --- for reports and tests -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """The windows as the pacer sees them now: limit, left, seconds to reset."""
        now = self._clock()
        return {
            name: {
                "limit": w.limit,
                "left": w.left,
                "reset_in": None if w.reset_at is None else round(w.reset_at - now, 3),
                "length": w.length,
            }
            for name, w in self._windows.items()
        }
