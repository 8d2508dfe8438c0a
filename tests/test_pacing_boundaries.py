"""The pacer at window boundaries it does not know, over real sockets against the sandbox (issue 14, item 8).

A :class:`SteppingClock` is the sandbox's time and the pacer's (its sleeps step it), so no test waits for a window:
each counts requests, 429s and the server windows a run touched, never seconds. A run of one-contact requests at
the default concurrency of 4 spends each window at one fake instant, so a pacer that wastes no window touches
exactly ``requests / rate`` of them.

- Apollo direct has no reset header: a minute whose phase is not the wall clock's costs at most one 429 (a probe).
- A gateway ``X-RateLimit-Reset`` in whole epoch seconds, rounded up (a transport here rewrites the sandbox's
  exact one, as such a gateway would send it): the window's length is learned right, the rate kept, no 429.
- A sliding window (the sandbox's ``sliding``): no burst of 429s as its requests free up one by one.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
from loader_helpers import SteppingClock, make_contacts, wait_until
from sandbox_fixtures import KEY, gateway

from apollo_sync import settings
from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, RateInfo
from apollo_sync.sandbox.process import build_parser, config_from_args, config_to_argv
from apollo_sync.sandbox.state import GATEWAY, SandboxConfig, SandboxState

START = 1_700_000_000.0
"""The stepping clock's start: 20 s into a wall-clock minute (1_700_000_000 % 60 == 20)."""


class SettlingClock(SteppingClock):
    """A stepping clock that steps only once the requests in flight are answered (``in_flight``, counted by
    :class:`Wire`), as a real wait for a window outlasts a loopback round trip: the server counts each request at
    the time it was let go, and a test counts the pacer's windows, not requests the fake clock carried over."""

    def __init__(self, now: float = START):
        super().__init__(now)
        self.in_flight = 0

    async def sleep(self, seconds: float) -> None:
        await wait_until(lambda: self.in_flight == 0)
        await super().sleep(seconds)


class Wire(httpx.AsyncBaseTransport):
    """Real HTTP to the sandbox, counting the requests in flight on a :class:`SettlingClock`.

    With ``whole_seconds=(window, phase)`` the sandbox's ``X-RateLimit-Reset`` (seconds to the reset, to the
    millisecond) becomes the epoch second of the reset rounded up, as a gateway with whole-second reset times sends
    it: the end of the sandbox window the answer came from (the first boundary ``k * window + phase`` after the
    answer's time less the seconds given; the clock may have stepped while the answer was on its way).
    """

    def __init__(self, clock: SteppingClock, whole_seconds: tuple[float, float] | None = None,
                 exchanges: list[tuple[float, float, int]] | None = None):  # fmt: skip
        self.inner = httpx.AsyncHTTPTransport()
        self.clock, self.whole_seconds = clock, whole_seconds
        self.exchanges = exchanges if exchanges is not None else []
        """(clock when sent, clock when answered, status) of every request."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        counting = isinstance(self.clock, SettlingClock)
        if counting:
            self.clock.in_flight += 1
        sent = self.clock()
        try:
            response = await self.inner.handle_async_request(request)
        finally:
            if counting:
                self.clock.in_flight -= 1
        self.exchanges.append((sent, self.clock(), response.status_code))
        reset = response.headers.get(settings.GATEWAY_RESET_HEADER)
        if reset is not None and self.whole_seconds is not None:
            window, phase = self.whole_seconds
            index = math.floor((self.clock() + float(reset) - phase + 0.001) / window)
            response.headers[settings.GATEWAY_RESET_HEADER] = str(math.ceil(index * window + phase))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def load(base_url: str, n: int, clock: SteppingClock, whole_seconds: tuple[float, float] | None = None,
         exchanges: list[tuple[float, float, int]] | None = None):  # fmt: skip
    """Send ``n`` one-contact requests, 4 in flight, paced on ``clock``; returns the pacer (``exchanges`` gets what
    :class:`Wire` notes of each request)."""

    async def go():
        pacer = clock.pacer()
        transport = Wire(clock, whole_seconds, exchanges)
        async with ApolloClient(base_url, KEY, timeout=5.0, transport=transport) as client:
            session = LoadSession(client, pacer, None, LoadConfig("t", chunk_size=1, concurrency=4, run_id="r"))
            result = await session.load(session.make_chunks(make_contacts(n)))
        assert set(result.outcomes["outcome"]) == {"created"} and result.outcomes.height == n
        return pacer

    return asyncio.run(go())


def windows_touched(start: float, end: float, window: float, phase: float) -> int:
    """How many of the sandbox's fixed windows the span from ``start`` to ``end`` (fake time) reaches into."""
    return math.floor((end - phase) / window) - math.floor((start - phase) / window) + 1


# --- Apollo direct: a minute out of phase with the wall clock -----------------------------------------------------


@pytest.mark.parametrize("phase", [0.0, 10.5, 19.0, 30.0, 55.0])
@pytest.mark.parametrize("settling", [False, True], ids=["stepping", "settling"])
def test_an_apollo_minute_out_of_phase_draws_at_most_one_429(sandbox_factory, phase, settling):
    """The run starts 20 s into a wall-clock minute. With phases 10.5 and 19 the server's minute ends after the wall
    clock's (the old pacer drew a 429 for each of its 4 requests in flight there); with 30 and 55, before it (the
    pacer's guess is late: no 429, and still every server minute gets its 40). On the plain stepping clock, requests
    in flight while the pacer sleeps reach the server after the step, across the boundary (the old pacer drew 429s
    for those too); they may cost a window. On the settling clock no window is lost."""
    clock = SettlingClock(START) if settling else SteppingClock(START)
    sb = sandbox_factory(rate=40, window=60, phase=phase, clock=clock, shuffle=False)
    exchanges: list[tuple[float, float, int]] = []
    pacer = load(sb.apollo_base_url, 160, clock, exchanges=exchanges)
    stats = sb.stats()
    # On the stepping clock a request still in flight when the pacer sleeps may reach the server after the step
    # (sent at t, counted 40 s later in a window that filled meanwhile: a 429 no real clock can give). Those are
    # the clock's; the pacer answers for the requests the server counted when they were sent: one probe's 429.
    carried = [status for sent, answered, status in exchanges if answered != sent]
    own = [status for sent, answered, status in exchanges if answered == sent]
    assert own.count(429) <= 1, exchanges
    assert stats["status_counts"].get("429", 0) <= 1 + carried.count(429)
    assert carried.count(429) == 0 or not settling  # the settling clock steps only when nothing is in flight
    assert stats["status_counts"]["200"] == 160
    assert windows_touched(START, clock(), 60, phase) <= 160 // 40 + (0 if settling else 1)
    assert pacer.snapshot()["minute"]["confirmed"]  # the pacer found where the server's minute turns


# --- gateway: whole-second reset times ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "rate", "windows", "share"),
    [(1.0, 3, 6, 0.90), (1.0, 20, 6, 0.90), (10.0, 3, 6, 0.90), (10.0, 20, 6, 0.90), (60.0, 3, 6, 0.98),
     (60.0, 30, 6, 0.98)],
    ids=["1s-3", "1s-20", "10s-3", "10s-20", "60s-3", "60s-30"],
)  # fmt: skip
@pytest.mark.parametrize("into", [0.05, 0.5], ids=["at-start", "mid-window"])
def test_gateway_whole_second_resets_learn_the_length_and_keep_the_rate(
    sandbox_factory, window, rate, windows, share, into
):
    """The windows end 0.3 s past a whole second, so a reset reads up to 0.7 s late. A run that starts just after a
    window began sees a first delay to a reset of the window plus 0.65 s: the old pacer took that for the length
    (1.7 s for a 1-s window, 11 s for 10 s, 61 s for a minute), and where the budget is gone before an answer comes
    back (3 a window, 4 in flight) it waited out its too-long windows and drew 429s. A run that starts mid-window
    sees a first delay of about half the window, and must not divide the next step by it."""
    phase = 0.3
    start = START - START % window + phase + into * window
    clock = SettlingClock(start)
    sb = sandbox_factory(rate=rate, window=window, phase=phase, clock=clock, shuffle=False)
    n = rate * windows
    pacer = load(sb.gateway_base_url, n, clock, whole_seconds=(window, phase))
    stats = sb.stats()
    assert stats["status_counts"].get("429", 0) == 0
    assert pacer.snapshot()["gateway"]["length"] == pytest.approx(window, abs=0.01)
    assert n / (rate * windows_touched(start, clock(), window, phase)) >= share


def test_gateway_whole_second_reset_is_read_on_the_pacers_wall_clock():
    """The epoch reset is measured on the pacer's wall clock (the stepping clock here), not on time.time()."""
    clock = SteppingClock(START)
    pacer = clock.pacer()
    headers = {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(START) + 3)}

    async def scenario():
        ticket = await pacer.acquire()
        pacer.observe(RateInfo.from_headers(headers), ticket)
        await pacer.acquire()

    asyncio.run(scenario())
    assert clock.sleeps == [pytest.approx(3.0, abs=0.002)]  # (a millisecond's margin on a server's reset)


# --- a sliding window ---------------------------------------------------------------------------------------------


def test_a_sliding_window_is_paced_without_bursts_of_429s(sandbox_factory):
    """Before the run, 16 requests were sent 0.05 s apart: the last second's window frees one request at a time.
    The old pacer took each freed request for a new window and sent 4 at once (3 of them answered 429). A sliding
    window counts each request at the time it arrives, so the clock settles: none is carried over a step."""
    clock = SettlingClock(START)
    sb = sandbox_factory(rate=20, window=1, sliding=True, clock=clock, shuffle=False)
    with gateway(sb) as g:
        for i in range(16):
            body = {"contacts": [{"email": f"before{i}@example.com"}]}
            assert g.post(settings.BULK_CREATE_PATH, json=body).status_code == 200
            clock.advance(0.05)
    pacer = load(sb.gateway_base_url, 100, clock)
    stats = sb.stats()
    assert stats["status_counts"].get("429", 0) <= 1
    assert stats["status_counts"]["200"] == 16 + 100
    assert pacer.probes > 1  # the freed requests went one probe at a time


# --- the sandbox's phase and sliding windows ----------------------------------------------------------------------


def test_sandbox_phase_shifts_fixed_windows_and_sliding_windows_free_one_request_at_a_time():
    now = [START + 0.5]
    fixed = SandboxState(SandboxConfig(rate=2, window=1, phase=0.75), clock=lambda: now[0])
    assert fixed.rate_headers(GATEWAY, KEY, now[0])[settings.GATEWAY_RESET_HEADER] == "0.250"  # ends at .75
    sliding = SandboxState(SandboxConfig(rate=2, window=1, sliding=True), clock=lambda: now[0])
    for step in (0.0, 0.4):
        now[0] += step
        sliding.count_request(KEY, now[0])
    assert sliding.over_limit(KEY, now[0])[1] == pytest.approx(0.6)  # the first of the two leaves at +1 s
    now[0] += 0.6
    assert sliding.over_limit(KEY, now[0]) is None
    headers = sliding.rate_headers(GATEWAY, KEY, now[0])
    assert headers[settings.GATEWAY_REMAINING_HEADER] == "1" and headers[settings.GATEWAY_RESET_HEADER] == "0.400"


def test_sandbox_cli_flags_carry_phase_and_sliding():
    config = SandboxConfig(rate=5, window=2.5, phase=0.7, sliding=True)
    argv = config_to_argv(config)
    assert "--sliding" in argv and "--phase" in argv
    assert config_from_args(build_parser().parse_args(["--port", "0", *argv])) == config
