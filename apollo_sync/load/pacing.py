"""Client-side pacing: spend every rate window's budget to the last request, and never more.

One :class:`Pacer` per run is shared by all concurrent requests. ``await pacer.acquire()`` before each request
reserves one request from every known window and waits while any window is spent; ``pacer.observe(rate, ticket)``
after each answer corrects the budgets from the server's headers; ``pacer.on_429(retry_after, rate)`` pauses
everyone and re-anchors the spent window.

Two kinds of window:

* **Gateway** (``X-RateLimit-Remaining``/``Reset``): the reset time is in every answer, so the pacer follows the
  server's windows; a reset later than the one modelled means a new window began. An epoch ``Reset`` is measured
  on the pacer's wall clock. The window's length is learned from the steps between the reset times of consecutive
  windows (exact even when whole-second resets are rounded up, as every window's end is rounded alike), never
  shorter than the longest delay to a reset seen less the header's precision (1 s for whole seconds); until two
  windows were seen, that longest delay is the length.
* **Apollo direct** (``x-<minute|hourly|daily>-requests-left``): no reset header; the lengths are known
  (60/3600/86400 s, ``settings.APOLLO_WINDOWS``). The first guess is that windows turn with the wall clock; a
  429's ``Retry-After`` re-anchors a window whose budget the server says is spent.

**Probes.** Where the pacer does not know what a boundary brings, one request goes first and the others wait for
its answer, so a wrong guess costs at most that one request's 429 instead of one per request in flight: the run's
first request (nothing is known yet), and the first request after every reset the server has not confirmed. A reset
is confirmed when the request sent first after it finds the window refilled (the server counted no more than our
requests since); the window's next reset is then trusted, and all requests go at once, if its time came from the
server or the window's length is known (an Apollo window's next reset is then counted from when the probe went,
which a pause may have held back past the reset). A boundary whose answer shows the server counted more than we sent since
(its phase is not ours, the window slides, or another client shares the key) leaves the window unconfirmed, and so
does a 429. An Apollo window whose probe shows the server had not reset forgets the guessed reset: when spent, it
waits ``UNKNOWN_RESET_WAIT`` and probes again (a 429 there gives the real reset in its ``Retry-After``). A sliding
window thus frees one probe at a time, never a burst. A probe is over when its answer is observed, a 429 comes, the
task that sent it asks for another request (its answer never came: a timeout or a dropped connection), that task
ends, or after ``probe_timeout`` seconds of the event loop.

Requests in flight stay in the accounting: every reservation counts against the window at once, and one still in
flight at a reset counts against the new window too (it may reach the server after the reset) until its answer
shows it was counted before; only a confirmed window is believed there, a sliding one never. A request is in flight
until its answer is observed, a 429 comes for it, or its task asks for another (each of the session's tasks has one
request in flight at a time). While the server's count shows no more requests than this run made in the window,
the pacer's own count is exact and is kept. When it shows more, the server's ``remaining`` is taken, less every
other request of ours in flight (the server may not have counted them yet). Within one window the pacer only ever
lowers its estimate, so answers arriving out of order cannot inflate it. A server's reset time is taken
``RESET_MARGIN`` late. ``max_rpm`` is a cap that is always honoured (requests are spaced ``60/max_rpm`` seconds
apart); it is the only limit when the server sends no rate headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from apollo_sync import settings
from apollo_sync.load.rates import RateInfo, WindowInfo

logger = logging.getLogger(__name__)

LOG_WAIT_SECONDS = 5.0
"""A wait longer than this is logged at INFO, naming the window."""
DEFAULT_429_WAIT = 1.0
"""Seconds to pause after a 429 that carried no ``Retry-After``."""
UNKNOWN_RESET_WAIT = 1.0
"""Seconds to wait when a window is spent and nothing says when it resets; then one probe request goes out."""
PROBE_TIMEOUT = settings.DEFAULT_TIMEOUT_SECONDS
"""Seconds of the event loop to wait for a probe's answer before the next request probes instead."""
LENGTH_SAMPLES = 8
"""A learned window length is the mean of the last this many steps between windows' resets (per window)."""
RESET_MARGIN = 0.001
"""Seconds added to every reset time a server gives: headers round it to the millisecond, so it may be early by half
of one (and a clock reading may be late by less)."""
MAX_TRACKED = 1024
"""Requests in flight tracked at most (one whose answer never came is forgotten after this many newer ones)."""


@dataclass(frozen=True)
class Ticket:
    """A reservation handed out by :meth:`Pacer.acquire`; give it back to :meth:`Pacer.observe`.

    ``epochs`` holds, per known window, which of its windows the reservation was made in (a window not yet
    known counts as its first).
    """

    seq: int
    epochs: dict[str, int] = field(default_factory=dict)


@dataclass
class _Probe:
    """The one request out at a boundary the pacer does not know; the others wait for ``answered``."""

    seq: int
    task: asyncio.Task | None
    loop: asyncio.AbstractEventLoop
    deadline: float  # on the loop's clock
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    on_task_done: Callable[[object], None] | None = None

    async def answer(self) -> bool:
        """Wait until the probe is over; False when its deadline passed first."""
        try:
            await asyncio.wait_for(self.answered.wait(), max(0.0, self.deadline - self.loop.time()))
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """The probe is over: wake whoever waits for it."""
        self.answered.set()
        if self.task is not None and self.on_task_done is not None:
            self.task.remove_done_callback(self.on_task_done)


@dataclass
class _Window:
    name: str
    length: float | None
    exact: bool  # the length is known (Apollo's windows), not learned
    limit: int | None = None
    left: int | None = None
    reset_at: float | None = None
    reset_observed: bool = False  # reset_at came from the server, not from adding a window length
    epoch: int = 0
    sent: int = 0  # reservations made in the current window
    confirmed: bool = False  # the last reset found the window refilled: the next one can be trusted
    probing: bool = False  # reset and not trusted: the first request after it is a probe
    longest: float = 0.0  # the longest delay to a server reset seen
    step: float = 0.0  # the precision of the server's reset times (1.0: whole seconds)
    server_reset: float | None = None  # the server's reset time of the latest window it answered from
    steps: list[float] = field(default_factory=list)  # steps between the resets of the windows answers came from
    crossers: set[int] = field(default_factory=set)  # requests in flight at the reset: counted here, or before?

    def take(self, remaining: int, others: int) -> bool:
        """Apply a server count from the current window; True when it shows more requests than ours in it."""
        if self.limit is not None and self.left is not None and remaining >= self.limit - self.sent:
            return False  # the server counted no more than we sent: our own count is exact
        estimate = remaining - others
        self.left = estimate if self.left is None else min(self.left, estimate)
        return True

    def restart(self, remaining: int, others: int) -> None:
        """Start tracking a window the server is in from its count (minus our requests it may not have seen)."""
        self.left = remaining - others
        self.sent = max(0, self.limit - self.left) if self.limit is not None else 0

    def roll(self, now: float, in_flight: set[int]) -> None:
        """The reset passed: refill, and probe first unless this reset was one to trust.

        The requests still in flight may reach the server after its reset: they count against the new window
        until their answers say otherwise (:meth:`uncross`)."""
        trusted = self.confirmed and (self.exact or self.reset_observed)
        self.epoch += 1
        self.crossers, self.sent = in_flight, len(in_flight)
        self.left = None if self.limit is None else self.limit - self.sent
        self.reset_observed = False
        self.probing = not trusted
        if self.length and self.reset_at is not None and (trusted or not self.exact):
            while self.reset_at <= now:
                self.reset_at += self.length
        elif self.length and self.reset_at is not None:
            # What a probe now can tell is that the server had reset by now, not by the reset passed (a pause may
            # have held the probe back): the next reset that is sure to have come is a length from now.
            self.reset_at = now + self.length
        else:
            self.reset_at = None

    def observe_reset(self, now: float, delay: float, info: WindowInfo, others: int, current: bool) -> bool | None:
        """Apply a gateway answer; whether it shows more requests than ours since the reset (None: cannot tell)."""
        reset_at = now + delay
        remaining = info.remaining
        assert remaining is not None
        tolerance = max(0.05, 0.25 * (self.length or 0.0))
        new_window = self.reset_at is None or reset_at > self.reset_at + tolerance
        self.learn(delay, reset_at, info.reset_step)
        if new_window:
            # The server is in a window we have not modelled yet: take its word.
            deficit = None
            if self.reset_at is not None:
                deficit = self.limit is None or remaining < self.limit - self.sent
                self.epoch += 1
            self.reset_at, self.reset_observed = reset_at, True
            self.restart(remaining, others)
            return deficit
        if reset_at >= self.reset_at - tolerance or current:
            # Our window (or we rolled over too early: a request reserved after our reset was still counted in
            # the server's earlier window). The server's reset time wins over our estimate.
            self.reset_at = reset_at if not self.reset_observed else min(self.reset_at, reset_at)
            self.reset_observed = True
            return self.take(remaining, others)
        return None  # a late answer from a window that has already reset

    def judge(self, deficit: bool, current: bool, *, told_reset: bool) -> None:
        """After an answer from this window (``deficit``: the server counted more than we sent in it)."""
        if self.probing and current:  # the first answer since the reset: was the window refilled?
            self.probing, self.confirmed = False, not deficit
            if deficit and not told_reset and not self.reset_observed:
                self.reset_at = None  # Apollo had not reset (or not for us): the guessed reset is wrong
        elif deficit:
            self.confirmed = False

    def uncross(self, seq: int) -> None:
        """A request in flight at the reset was not counted after it: give its reservation back."""
        self.crossers.discard(seq)
        self.sent = max(0, self.sent - 1)
        if self.left is not None and self.limit is not None:
            self.left = min(self.left + 1, self.limit - self.sent)

    def learn(self, delay: float, reset_at: float, step: float) -> None:
        """Learn the length from a server reset: the delay to it, and the step from the last window's reset.

        A step may span windows no answer came from: it is divided by the whole number of windows nearest to it
        in the shortest step seen, or in the longest delay less the precision when that is longer."""
        self.step = max(self.step, step)
        self.longest = max(self.longest, delay)
        tolerance = max(0.05, 0.25 * (self.length or delay))
        last = self.server_reset
        if last is None or reset_at > last + tolerance:  # the server is in a later window than the last seen
            if last is not None:
                self.steps = [*self.steps, reset_at - last][-LENGTH_SAMPLES:]
            self.server_reset = reset_at
        elif reset_at >= last - tolerance:  # the same window: keep its earliest reading (the least delayed)
            self.server_reset = min(last, reset_at)
        floor = self.longest - self.step  # no window is shorter than a delay to its reset, less the precision
        if self.steps:
            unit = max(floor, min(self.steps))
            estimate = sum(jump / max(1, round(jump / unit)) for jump in self.steps) / len(self.steps)
        else:
            estimate = self.longest if self.step else _rounded(self.longest)
        self.length = max(estimate, floor) or None


def _delay(info: WindowInfo, wall: Callable[[], float]) -> float | None:
    """Seconds until the window resets: an epoch reset measured on the ``wall`` clock, else the delay given; plus
    ``RESET_MARGIN``. None when the answer gave no reset."""
    if info.reset_epoch is not None:
        return max(0.0, info.reset_epoch - wall()) + RESET_MARGIN
    return None if info.reset_after is None else info.reset_after + RESET_MARGIN


def _rounded(longest_delay: float) -> float:
    """A length from the longest delay to a fractional reset: rounded up to whole seconds when within 5 %."""
    if longest_delay <= 0:
        return 0.0
    whole = float(max(1, -(-longest_delay // 1)))
    return whole if whole - longest_delay <= 0.05 * whole else longest_delay


class Pacer:
    """Paces the requests of one run (see the module docstring).

    ``clock`` is a monotonic clock and ``sleep`` an async sleep (both injectable for tests); ``wall`` is the wall
    clock that Apollo's windows are first aligned to and epoch resets are measured on (defaults to ``time.time``).
    ``probe_timeout``: event-loop seconds to wait for a probe's answer.
    """

    def __init__(
        self,
        max_rpm: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        *,
        wall: Callable[[], float] = time.time,
        probe_timeout: float = PROBE_TIMEOUT,
    ):
        if max_rpm is not None and max_rpm <= 0:
            raise ValueError("max_rpm must be positive")
        self.max_rpm = max_rpm
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._windows: dict[str, _Window] = {}
        self._seq = 0
        self._in_flight: dict[int, Ticket] = {}
        self._task_seq: weakref.WeakKeyDictionary[asyncio.Task, int] = weakref.WeakKeyDictionary()
        self._answered = False
        self._probe: _Probe | None = None
        self._pause_until = 0.0
        self._next_slot = float("-inf")
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.waited_seconds = 0.0
        """Total time spent waiting in :meth:`acquire` (for a window or the cap; not for a probe's answer)."""
        self.probes = 0
        """Requests sent as probes."""

    # --- before a request ----------------------------------------------------------------------------------------

    async def acquire(self) -> Ticket:
        """Wait until every known window has budget (and no probe is out), then reserve one request from each."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None and task in self._task_seq:
            # A task sends one request at a time: its last one is over, answered or not (a timeout, a drop).
            self._over(self._task_seq.pop(task))
        probe = self._probe
        if probe is not None and (probe.task is task or probe.loop is not loop):
            self._end_probe(probe)  # its task asks again: the answer never came (or its event loop is gone)
        if self._lock is None or self._lock_loop is not loop:
            # The flow may drive one pacer from several event loops (one per task run); a lock binds to one.
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            while True:
                now = self._clock()
                for w in self._windows.values():
                    if w.reset_at is not None and now >= w.reset_at:
                        w.roll(now, set(self._in_flight))
                until, reason = self._blocked_until(now)
                if until is not None:
                    delay = until - now
                    if delay > LOG_WAIT_SECONDS:
                        logger.info("rate limit: waiting %.0f s for %s", delay, reason)
                    self.waited_seconds += delay
                    await self._sleep(delay)
                elif self._probe is not None:
                    probe = self._probe
                    if not await probe.answer():
                        logger.debug("no answer to a probe within %.0f s: the next request probes", self.probe_timeout)
                        self._end_probe(probe)
                else:
                    break
            ticket = self._reserve(now)
            if task is not None:
                self._task_seq[task] = ticket.seq
            if not self._answered or any(w.probing for w in self._windows.values()):
                self._start_probe(ticket, task, loop)
            return ticket

    def _reserve(self, now: float) -> Ticket:
        self._seq += 1
        for w in self._windows.values():
            w.sent += 1
            if w.left is not None:
                w.left -= 1
        if self.max_rpm:
            self._next_slot = max(now, self._next_slot) + 60.0 / self.max_rpm
        ticket = Ticket(self._seq, {name: w.epoch for name, w in self._windows.items()})
        self._in_flight[ticket.seq] = ticket
        if len(self._in_flight) > MAX_TRACKED:
            self._over(next(iter(self._in_flight)))
        return ticket

    def _over(self, seq: int | None, *, counted: bool = True) -> None:
        """Request ``seq`` is no longer in flight; ``counted=False``: the server did not count it (a 429)."""
        if seq is None or self._in_flight.pop(seq, None) is None:
            return
        for w in self._windows.values():
            if seq in w.crossers:
                if counted:
                    w.crossers.discard(seq)  # it may have landed after the reset: keep counting it there
                else:
                    w.uncross(seq)

    def _blocked_until(self, now: float) -> tuple[float | None, str]:
        waits: list[tuple[float, str]] = []
        if self._pause_until > now:
            waits.append((self._pause_until, "the Retry-After of a 429 answer"))
        for w in self._windows.values():
            if w.left is None or w.left > 0:
                continue
            if w.reset_at is None:
                # Spent, and nothing says when it resets: wait a little, then allow one probe.
                w.reset_at, w.confirmed = now + UNKNOWN_RESET_WAIT, False
                if w.limit is None:
                    w.limit = 1
            limit = f" (limit {w.limit} requests)" if w.limit is not None else ""
            waits.append((w.reset_at, f"the {w.name} window to reset{limit}"))
        if self.max_rpm and self._next_slot > now:
            waits.append((self._next_slot, f"the configured cap of {self.max_rpm:g} requests a minute"))
        if not waits:
            return None, ""
        return max(waits, key=lambda item: item[0])

    # --- probes --------------------------------------------------------------------------------------------------

    def _start_probe(self, ticket: Ticket, task: asyncio.Task | None, loop: asyncio.AbstractEventLoop) -> None:
        probe = _Probe(ticket.seq, task, loop, loop.time() + self.probe_timeout)
        if task is not None:
            probe.on_task_done = lambda _task: self._end_probe(probe)
            task.add_done_callback(probe.on_task_done)
        self._probe = probe
        self.probes += 1

    def _end_probe(self, probe: _Probe | None = None) -> None:
        """The probe (``probe``, or whichever is out) is over."""
        current = self._probe
        if current is not None and (probe is None or probe is current):
            self._probe = None
            current.close()

    # --- after an answer -----------------------------------------------------------------------------------------

    def observe(self, rate: RateInfo, ticket: Ticket | None = None) -> None:
        """Correct the budgets from an answer's rate headers (``ticket`` is the reservation of that request)."""
        now = self._clock()
        self._answered = True
        if ticket is not None:
            self._in_flight.pop(ticket.seq, None)
        for info in rate.windows:
            w = self._window(info, now)
            if info.limit is not None:
                w.limit = info.limit
            if info.remaining is None:
                continue
            others = len(self._in_flight)  # every other request of ours in flight may land in this window
            current = ticket is None or ticket.epochs.get(w.name, 0) == w.epoch
            # A request in flight at the reset was counted after it until its answer shows otherwise, and only a
            # confirmed window (fixed, its resets trusted) is believed when it does; a sliding one never.
            crosser = ticket is not None and ticket.seq in w.crossers
            w.crossers.discard(ticket.seq if ticket is not None else -1)
            delay = _delay(info, self._wall)
            if delay is not None:
                deficit = w.observe_reset(now, delay, info, others, current)
                if crosser and deficit is None and w.confirmed:
                    w.uncross(ticket.seq)  # its reset was the window's before
            elif w.left is None:
                w.restart(info.remaining, others)
                continue
            elif current:
                deficit = w.take(info.remaining, others)
            else:
                # Counted in an earlier window of ours: it says nothing about this one. One in flight at the reset
                # came back with more counted than we sent since: it was counted before the reset.
                if crosser and w.confirmed and (w.limit is None or info.remaining < w.limit - w.sent):
                    w.uncross(ticket.seq)
                continue
            if deficit is not None:
                w.judge(deficit, current, told_reset=delay is not None)
        if ticket is not None and self._probe is not None and self._probe.seq == ticket.seq:
            self._end_probe()

    def on_429(self, retry_after: float | None, rate: RateInfo | None = None) -> None:
        """A 429 came: pause every request for ``retry_after`` and mark the spent windows until then."""
        now = self._clock()
        self._answered = True
        self._over(self._current_seq(), counted=False)
        wait = DEFAULT_429_WAIT if retry_after is None else max(0.0, retry_after)
        self._pause_until = max(self._pause_until, now + wait)
        for info in rate.windows if rate is not None else ():
            if info.remaining is None or info.remaining > 0:
                continue
            w = self._window(info, now)
            if info.limit is not None:
                w.limit = info.limit
            w.left = 0
            # Re-anchor: this window resets when the server says to come back; probe when it does.
            delay = _delay(info, self._wall)
            w.reset_at = now + (delay if delay is not None else wait)
            w.reset_observed, w.confirmed = True, False
        self._end_probe()

    def _current_seq(self) -> int | None:
        """The request in flight of the calling task (a 429 is told without its ticket); else the oldest."""
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        seq = self._task_seq.get(task) if task is not None else None
        if seq in self._in_flight:
            return seq
        return next(iter(self._in_flight), None)

    def _window(self, info: WindowInfo, now: float) -> _Window:
        w = self._windows.get(info.name)
        if w is None:
            exact = info.reset_after is None and info.reset_epoch is None and bool(info.length)
            w = self._windows[info.name] = _Window(info.name, info.length, exact)
            if exact and info.length:
                # First guess: Apollo's windows turn with the wall clock (minute, hour, day boundaries).
                w.reset_at = now + (info.length - (self._wall() % info.length))
        return w

    # --- for reports and tests -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, float | int | bool | None]]:
        """The windows as the pacer sees them now: limit, left, seconds to reset, length, whether confirmed."""
        now = self._clock()
        return {
            name: {
                "limit": w.limit,
                "left": w.left,
                "reset_in": None if w.reset_at is None else round(w.reset_at - now, 3),
                "length": w.length,
                "confirmed": w.confirmed,
            }
            for name, w in self._windows.items()
        }
