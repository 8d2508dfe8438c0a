"""The pacer, on a fake clock: budgets from both header families, in-flight accounting, resets, 429s, the cap, probes.

The session sends one request at a time per task; a test that wants requests in flight together takes each
reservation in its own task (:func:`acquire_each`). A server's reset is waited out a millisecond late
(``RESET_MARGIN``), hence ``approx(..., abs=MARGIN)``. Boundaries over real sockets: tests/test_pacing_boundaries.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from apollo_sync.load import Pacer, RateInfo, WindowInfo

MARGIN = 0.002


class FakeClock:
    """A clock that only moves when someone sleeps; sleeps are recorded."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_pacer(clock: FakeClock, **kw) -> Pacer:
    return Pacer(clock=clock, sleep=clock.sleep, wall=clock, **kw)


def gateway(limit: int, remaining: int, reset_after: float) -> RateInfo:
    return RateInfo((WindowInfo("gateway", limit, remaining, reset_after),))


def apollo(**windows: tuple[int, int]) -> RateInfo:
    lengths = {"minute": 60.0, "hourly": 3600.0, "daily": 86400.0}
    return RateInfo(tuple(WindowInfo(n, lim, left, None, lengths[n]) for n, (lim, left) in windows.items()))


def run(coro):
    return asyncio.run(coro)


async def acquire_each(pacer: Pacer, n: int) -> list:
    """``n`` reservations, each taken by its own task (as each of the session's workers has one request in flight)."""
    return list(await asyncio.gather(*(pacer.acquire() for _ in range(n))))


def test_gateway_budget_is_spent_to_the_last_request_then_waits_for_reset():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        first = await pacer.acquire()
        pacer.observe(gateway(12, 11, 0.8), first)
        for _ in range(11):
            await pacer.acquire()
        assert clock.sleeps == []  # all 12 of the window's requests went out without waiting
        await pacer.acquire()
        return pacer

    pacer = run(scenario())
    assert clock.sleeps == [pytest.approx(0.8, abs=MARGIN)]  # the 13th waited until the window reset
    assert pacer.snapshot()["gateway"]["left"] == 11


def test_in_flight_requests_count_against_the_budget():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        first = await pacer.acquire()
        pacer.observe(gateway(12, 11, 0.5), first)
        tickets = await acquire_each(pacer, 4)
        assert pacer.snapshot()["gateway"]["left"] == 7
        # The first answer says 10 left: the server has not counted all four yet; our own count stands.
        pacer.observe(gateway(12, 10, 0.5), tickets[0])
        assert pacer.snapshot()["gateway"]["left"] == 7
        # Answers out of order: a later request's answer said 7, the earlier one's 9 must not raise it.
        pacer.observe(gateway(12, 7, 0.5), tickets[3])
        pacer.observe(gateway(12, 9, 0.5), tickets[1])
        assert pacer.snapshot()["gateway"]["left"] == 7
        for _ in range(7):
            await pacer.acquire()
        assert clock.sleeps == []
        await pacer.acquire()
        assert clock.sleeps == [pytest.approx(0.5, abs=MARGIN)]

    run(scenario())


def test_a_server_count_above_ours_means_another_client_and_lowers_the_budget():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        t0 = await pacer.acquire()
        pacer.observe(gateway(12, 11, 0.9), t0)  # alone so far: 1 sent, 11 left
        tickets = await acquire_each(pacer, 4)
        assert pacer.snapshot()["gateway"]["left"] == 7
        pacer.observe(gateway(12, 9, 0.9), tickets[0])  # 3 counted of our 5 sent: consistent, keep our count
        assert pacer.snapshot()["gateway"]["left"] == 7
        pacer.observe(gateway(12, 4, 0.9), tickets[1])  # 8 counted but we sent 5: someone else uses the key
        assert pacer.snapshot()["gateway"]["left"] == 4 - 2  # less our 2 still in flight it may not have counted

    run(scenario())


def test_new_gateway_window_from_a_later_reset_and_stale_answers_ignored():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        t1 = await pacer.acquire()
        pacer.observe(gateway(10, 0, 0.2), t1)
        t2 = await pacer.acquire()  # waits for the reset
        assert clock.sleeps == [pytest.approx(0.2, abs=MARGIN)]
        pacer.observe(gateway(10, 9, 1.0), t2)  # the next window (1 s long)
        assert pacer.snapshot()["gateway"]["left"] == 9
        pacer.observe(gateway(10, 0, 0.0), t1)  # a late answer from the old window: ignored
        assert pacer.snapshot()["gateway"]["left"] == 9

    run(scenario())


def test_apollo_windows_are_clock_aligned_and_a_long_wait_is_logged(caplog):
    clock = FakeClock(now=7_200.0 + 1_800.0)  # half past the hour, on a whole minute

    async def scenario():
        pacer = make_pacer(clock)
        ticket = await pacer.acquire()
        pacer.observe(apollo(minute=(200, 150), hourly=(400, 0)), ticket)
        with caplog.at_level(logging.INFO, logger="apollo_sync.load.pacing"):
            await pacer.acquire()
        return pacer

    pacer = run(scenario())
    assert clock.sleeps == [pytest.approx(1_800.0)]  # the hourly window resets on the hour
    messages = [r.getMessage() for r in caplog.records if r.name == "apollo_sync.load.pacing"]
    assert len(messages) == 1 and "hourly" in messages[0] and "1800 s" in messages[0] and "400" in messages[0]
    snap = pacer.snapshot()
    assert snap["hourly"]["left"] == 399 and snap["minute"]["left"] == 199


def test_apollo_answer_from_a_previous_window_is_ignored():
    clock = FakeClock(now=600.0 + 59.0)

    async def scenario():
        pacer = make_pacer(clock)
        t1 = await pacer.acquire()
        pacer.observe(apollo(minute=(5, 4)), t1)
        t2 = await pacer.acquire()
        clock.now += 2.0  # the minute turned; t2's answer arrives late with the old count
        t3 = await pacer.acquire()
        pacer.observe(apollo(minute=(5, 0)), t2)
        assert pacer.snapshot()["minute"]["left"] == 4  # 5 in the new minute, minus t3
        pacer.observe(apollo(minute=(5, 4)), t3)
        assert pacer.snapshot()["minute"]["left"] == 4

    run(scenario())


def test_429_pauses_everyone_and_re_anchors_the_spent_apollo_window():
    clock = FakeClock(now=6_000.0 + 10.0)  # 10 s into a minute by the wall clock

    async def scenario():
        pacer = make_pacer(clock)
        t = await pacer.acquire()
        pacer.observe(apollo(minute=(3, 2)), t)
        # The server's minute is not aligned with ours: it says spent, come back in 25 s.
        pacer.on_429(25.0, apollo(minute=(3, 0)))
        await pacer.acquire()
        assert clock.sleeps == [pytest.approx(25.0)]
        for _ in range(2):
            await pacer.acquire()
        await pacer.acquire()  # the 4th of the new window waits a whole minute from the re-anchored reset
        assert clock.sleeps == [pytest.approx(25.0), pytest.approx(60.0)]

    run(scenario())


def test_429_without_retry_after_pauses_a_default():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        pacer.on_429(None)
        await pacer.acquire()

    run(scenario())
    assert clock.sleeps == [pytest.approx(1.0)]


def test_max_rpm_spaces_requests_when_no_headers_come():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock, max_rpm=120)
        for _ in range(5):
            await pacer.acquire()

    run(scenario())
    assert clock.sleeps == [pytest.approx(0.5)] * 4


def test_spent_window_without_reset_information_probes_after_a_pause():
    clock = FakeClock()

    async def scenario():
        pacer = make_pacer(clock)
        t = await pacer.acquire()
        pacer.observe(RateInfo((WindowInfo("gateway", None, 0, None),)), t)
        await pacer.acquire()

    run(scenario())
    assert clock.sleeps == [pytest.approx(1.0)]


def test_concurrent_acquires_never_exceed_the_window():
    """Many coroutines share one pacer; per fake-clock window no more than the limit is handed out."""
    clock = FakeClock(now=0.0)
    handed: list[float] = []

    async def scenario():
        pacer = make_pacer(clock)
        t = await pacer.acquire()
        handed.append(clock.now)
        pacer.observe(gateway(5, 4, 1.0), t)

        async def worker():
            for _ in range(10):
                ticket = await pacer.acquire()
                handed.append(clock.now)
                remaining = 5 - sum(1 for x in handed if int(x) == int(clock.now))
                pacer.observe(gateway(5, max(remaining, 0), 1.0 - (clock.now % 1.0)), ticket)

        await asyncio.gather(*(worker() for _ in range(4)))

    run(scenario())
    per_window: dict[int, int] = {}
    for x in handed:
        per_window[int(x + 1e-9)] = per_window.get(int(x + 1e-9), 0) + 1
    assert max(per_window.values()) <= 5
    assert sum(per_window.values()) == 41
    assert len(per_window) == 9  # 41 requests at 5 a window: 9 windows, none wasted


def test_a_rollover_too_early_is_corrected_by_the_servers_reset():
    """We estimated the next reset from a window length; the server's answer says its window ends later."""
    clock = FakeClock(now=0.0)

    async def scenario():
        pacer = make_pacer(clock)
        t = await pacer.acquire()
        pacer.observe(gateway(4, 0, 0.9), t)  # learned length 0.9 s; real windows are longer
        probe = await pacer.acquire()  # waits 0.9, then rolls over to an estimated window ending at 1.8
        # The server still counted it in a window that ends at 2.0, and that window is spent.
        pacer.observe(gateway(4, 0, 1.1), probe)
        assert pacer.snapshot()["gateway"]["left"] == 0
        await pacer.acquire()
        return pacer

    run(scenario())
    assert clock.sleeps == [pytest.approx(0.9, abs=MARGIN), pytest.approx(1.1, abs=MARGIN)]


# --- probes at what the pacer does not know ---------------------------------------------------------------------


def test_the_first_request_goes_alone_until_its_answer():
    """Nothing is known before the first answer: one request probes, the others wait for its answer."""
    clock = FakeClock()
    sent: list[int] = []

    async def scenario():
        pacer = make_pacer(clock)
        answered = asyncio.Event()

        async def first():
            ticket = await pacer.acquire()
            sent.append(ticket.seq)
            await answered.wait()
            pacer.observe(gateway(10, 9, 1.0), ticket)

        async def other():
            sent.append((await pacer.acquire()).seq)

        probe = asyncio.create_task(first())
        await asyncio.sleep(0)
        others = [asyncio.create_task(other()) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == [1]  # the others wait for the answer, not for a time
        answered.set()
        await asyncio.gather(probe, *others)
        return pacer

    pacer = run(scenario())
    assert sorted(sent) == [1, 2, 3, 4] and pacer.probes == 1 and clock.sleeps == []


def test_a_probe_without_an_answer_ends_when_its_task_asks_again():
    """A probe that timed out or was dropped: its task asks again (the retry), and the waiting ones go on."""
    clock = FakeClock()
    sent: list[int] = []

    async def scenario():
        pacer = make_pacer(clock)

        async def other():
            sent.append((await pacer.acquire()).seq)

        await pacer.acquire()  # the probe; its answer never comes
        waiting = asyncio.create_task(other())
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == []
        retry = await pacer.acquire()
        await waiting
        return pacer, retry

    pacer, retry = run(scenario())
    assert sent == [2] and retry.seq == 3 and pacer.probes == 3  # still nothing answered: each went alone


def whole_seconds(limit: int, remaining: int, reset_epoch: int) -> RateInfo:
    headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
               "X-RateLimit-Reset": str(reset_epoch)}  # fmt: skip
    return RateInfo.from_headers(headers)


def test_whole_second_resets_learn_the_length_from_the_step_between_windows():
    """1-s windows end at .3 past a second; the gateway rounds their ends up to whole epoch seconds. Just after a
    window began, the delay to its rounded reset is 1.6 s (the old pacer's length); the step to the next is 1 s."""
    clock = FakeClock(now=1_700_000_000.4)  # in the window [.3, 1.3), sent as 1_700_000_002

    async def scenario():
        pacer = make_pacer(clock)
        ticket = await pacer.acquire()
        pacer.observe(whole_seconds(2, 1, 1_700_000_002), ticket)
        assert pacer.snapshot()["gateway"]["length"] == pytest.approx(1.6, abs=MARGIN)
        await pacer.acquire()
        probe = await pacer.acquire()  # waits for the rounded reset; the next window ends at 2.3, sent as ...03
        pacer.observe(whole_seconds(2, 1, 1_700_000_003), probe)
        return pacer

    pacer = run(scenario())
    assert clock.sleeps == [pytest.approx(1.6, abs=MARGIN)]
    assert pacer.snapshot()["gateway"]["length"] == pytest.approx(1.0, abs=MARGIN)
    assert pacer.snapshot()["gateway"]["confirmed"]  # the window was full again after the reset


def test_an_apollo_reset_is_probed_until_confirmed_then_trusted():
    clock = FakeClock(now=6_000.0 + 10.0)  # 10 s into a wall-clock minute

    async def scenario():
        pacer = make_pacer(clock)
        ticket = await pacer.acquire()
        pacer.observe(apollo(minute=(3, 2)), ticket)
        for _ in range(2):
            await pacer.acquire()
        probe = await pacer.acquire()  # the guessed (wall-clock) reset: one request goes first
        assert pacer.probes == 2
        pacer.observe(apollo(minute=(3, 2)), probe)  # the server's minute was full again: the guess holds
        for _ in range(2):
            await pacer.acquire()
        await pacer.acquire()  # the next reset is trusted: no probe
        return pacer

    pacer = run(scenario())
    assert clock.sleeps == [pytest.approx(50.0), pytest.approx(60.0)] and pacer.probes == 2
    assert pacer.snapshot()["minute"]["confirmed"]


def test_a_probe_held_back_past_the_reset_dates_the_next_reset_from_itself():
    """A 429's pause outlasted the guessed reset: the probe that finds the window refilled was sent 20 s after that
    reset, so the server's minute may have turned as late as the probe; the next sure reset is a minute from it."""
    clock = FakeClock(now=6_000.0 + 50.0)  # the wall-clock minute turns in 10 s

    async def scenario():
        pacer = make_pacer(clock)
        ticket = await pacer.acquire()
        pacer.observe(apollo(minute=(3, 2)), ticket)
        for _ in range(2):
            await pacer.acquire()
        pacer.on_429(30.0)  # a 429 that names no window (a burst): a pause past the reset
        probe = await pacer.acquire()
        pacer.observe(apollo(minute=(3, 2)), probe)
        for _ in range(2):
            await pacer.acquire()
        await pacer.acquire()

    run(scenario())
    assert clock.sleeps == [pytest.approx(30.0), pytest.approx(60.0)]  # not 40: the grid of the wall clock
