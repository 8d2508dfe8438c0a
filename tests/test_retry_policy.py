"""RetryPolicy.decide as a table: what one attempt met and where the request stood -> what the session does next.

Every row is run twice, with the jitter fixed at its two ends (0.0 and 1.0), so a row pins the exact delay at
each end of its bounds, besides the action, the counters after the attempt, dedupe, the outcome and exhaustion.
The policy of the table: 3 attempts, 2 429s, backoff 0.5 s doubling (0.25-0.5 s, then 0.5-1 s), settle 4 s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.load.retry import Action, Attempt, Decision, Outcome, RetryPolicy, Tries

SETTLE = 4.0


def policy(jitter: float) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=3, max_rate_limited=2, backoff_base=0.5, backoff_max=30.0, settle_seconds=SETTLE,
        jitter=lambda: jitter,
    )


@dataclass(frozen=True)
class Row:
    """One line of the table. ``delay`` is (with jitter 0.0, with jitter 1.0)."""

    attempt: Attempt
    before: Tries
    action: Action
    after: Tries
    delay: tuple[float, float] = (0.0, 0.0)
    dedupe: bool = False
    outcome: Outcome | None = None
    exhausted: bool = False
    rows: int = 10
    answered: bool = True


FRESH = Tries()
LANDED = Tries(maybe_landed=True)
"""A request one of whose earlier attempts may have stored its contacts."""

ROWS = {
    # --- answers that land ----------------------------------------------------------------------------------------
    "200 is accepted": Row(Attempt(200), FRESH, Action.ACCEPT, FRESH),
    "201 after a lost answer is accepted, counters kept": Row(
        Attempt(201, with_dedupe=True), Tries(2, 1, True), Action.ACCEPT, Tries(2, 1, True)),
    # --- 5xx and friends: retry with backoff, dedupe from now on --------------------------------------------------
    "500 retries with the first backoff and forces dedupe": Row(
        Attempt(500), FRESH, Action.RETRY, Tries(1, 0, True), delay=(0.25, 0.5), dedupe=True),
    "500 on the second attempt doubles the backoff": Row(
        Attempt(500, with_dedupe=True), Tries(1, 0, True), Action.RETRY, Tries(2, 0, True), delay=(0.5, 1.0),
        dedupe=True),
    "503 honours a Retry-After longer than the backoff": Row(
        Attempt(503, retry_after=5.0), FRESH, Action.RETRY, Tries(1, 0, True), delay=(5.0, 5.0), dedupe=True),
    "503 takes the backoff when the Retry-After is shorter": Row(
        Attempt(503, retry_after=0.1), Tries(1, 0, True), Action.RETRY, Tries(2, 0, True), delay=(0.5, 1.0),
        dedupe=True),
    "408 is retried like a 5xx": Row(
        Attempt(408), FRESH, Action.RETRY, Tries(1, 0, True), delay=(0.25, 0.5), dedupe=True),
    "425 is retried like a 5xx": Row(
        Attempt(425), FRESH, Action.RETRY, Tries(1, 0, True), delay=(0.25, 0.5), dedupe=True),
    "500 on the last attempt gives the rows up as unconfirmed": Row(
        Attempt(500, with_dedupe=True), Tries(2, 0, True), Action.GIVE_UP, Tries(3, 0, True),
        outcome="unconfirmed", exhausted=True),
    # --- no usable answer -----------------------------------------------------------------------------------------
    "timeout without dedupe waits for the server to settle": Row(
        Attempt(None), FRESH, Action.RETRY, Tries(1, 0, True), delay=(SETTLE, SETTLE), dedupe=True),
    "timeout of an attempt sent with dedupe needs no settle wait": Row(
        Attempt(None, with_dedupe=True), FRESH, Action.RETRY, Tries(1, 0, True), delay=(0.25, 0.5), dedupe=True),
    "refused connection never landed: no dedupe, no settle": Row(
        Attempt(None, maybe_landed=False), FRESH, Action.RETRY, Tries(1, 0, False), delay=(0.25, 0.5)),
    "refused connection after a lost answer keeps dedupe": Row(
        Attempt(None, maybe_landed=False, with_dedupe=True), Tries(1, 0, True), Action.RETRY, Tries(2, 0, True),
        delay=(0.5, 1.0), dedupe=True),
    "never answered through every attempt stops the run": Row(
        Attempt(None, maybe_landed=False), Tries(2, 0, False), Action.STOP_UNREACHABLE, Tries(3, 0, False),
        outcome="failed", exhausted=True, answered=False),
    "refused on the last attempt of a reachable API is failed": Row(
        Attempt(None, maybe_landed=False), Tries(2, 0, False), Action.GIVE_UP, Tries(3, 0, False),
        outcome="failed", exhausted=True),
    "timeout on the last attempt is unconfirmed": Row(
        Attempt(None), Tries(2, 0, False), Action.GIVE_UP, Tries(3, 0, True), outcome="unconfirmed",
        exhausted=True),
    # --- 429: the pacer waits, the policy only counts -------------------------------------------------------------
    "429 retries at once (the pacer waits) on its own count": Row(
        Attempt(429, retry_after=2.0), FRESH, Action.RETRY, Tries(0, 1, False)),
    "429 does not use up the attempts": Row(
        Attempt(429), Tries(2, 0, False), Action.RETRY, Tries(2, 1, False)),
    "429 after a lost answer keeps dedupe": Row(
        Attempt(429, with_dedupe=True), Tries(1, 0, True), Action.RETRY, Tries(1, 1, True), dedupe=True),
    "429 past its own bound gives the rows up as failed": Row(
        Attempt(429), Tries(0, 1, False), Action.GIVE_UP, Tries(0, 2, False), outcome="failed", exhausted=True),
    # --- 401/403: stop --------------------------------------------------------------------------------------------
    "401 stops the run, rows failed": Row(Attempt(401), FRESH, Action.STOP_AUTH, FRESH, outcome="failed"),
    "403 after a lost answer stops the run, rows unconfirmed": Row(
        Attempt(403, with_dedupe=True), Tries(1, 0, True), Action.STOP_AUTH, Tries(1, 0, True),
        outcome="unconfirmed"),
    # --- refused contacts: split until isolated -------------------------------------------------------------------
    "422 splits the rows": Row(Attempt(422), FRESH, Action.BISECT, Tries(1, 0, False)),
    "400 splits, halves with dedupe after a lost answer": Row(
        Attempt(400, with_dedupe=True), Tries(1, 0, True), Action.BISECT, Tries(2, 0, True), dedupe=True),
    "413 splits two rows": Row(Attempt(413), FRESH, Action.BISECT, Tries(1, 0, False), rows=2),
    "422 of one row fails it, even after a lost answer": Row(
        Attempt(422, with_dedupe=True), Tries(1, 0, True), Action.GIVE_UP, Tries(2, 0, True), outcome="failed",
        rows=1),
    # --- any other error status: give up at once ------------------------------------------------------------------
    "404 gives the rows up as failed": Row(Attempt(404), FRESH, Action.GIVE_UP, Tries(1, 0, False), outcome="failed"),
    "404 after a lost answer gives them up as unconfirmed": Row(
        Attempt(404, with_dedupe=True), Tries(1, 0, True), Action.GIVE_UP, Tries(2, 0, True),
        outcome="unconfirmed"),
}


@pytest.mark.parametrize("end", [0, 1], ids=["jitter=0", "jitter=1"])
@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_decide(row: Row, end: int):
    decision = policy(float(end)).decide(row.attempt, row.before, rows=row.rows, answered=row.answered)
    expected = Decision(row.action, row.after, row.delay[end], row.dedupe, row.outcome, row.exhausted)
    assert decision == expected


@pytest.mark.parametrize(
    "attempts,low,high",
    [(1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (6, 8.0, 16.0), (7, 15.0, 30.0), (20, 15.0, 30.0)],
)
def test_backoff_doubles_between_half_and_all_of_its_ceiling_up_to_the_cap(attempts: int, low: float, high: float):
    assert policy(0.0).backoff(attempts) == low
    assert policy(1.0).backoff(attempts) == high


def test_settle_defaults_to_twice_the_client_timeout_unless_given():
    assert RetryPolicy().for_timeout(0.5).settle == 1.0
    assert RetryPolicy(settle_factor=3.0).for_timeout(2.0).settle == 6.0
    assert RetryPolicy(settle_seconds=0.0).for_timeout(30.0).settle == 0.0
    assert RetryPolicy().settle == 2.0 * settings.DEFAULT_TIMEOUT_SECONDS


def test_a_seeded_jitter_repeats_its_delays():
    first = [RetryPolicy(jitter=random.Random(7).random).backoff(a) for a in range(1, 6)]
    again = [RetryPolicy(jitter=random.Random(7).random).backoff(a) for a in range(1, 6)]
    assert first == again and len(set(first)) == 5


def test_at_least_one_attempt():
    with pytest.raises(InputError, match="max attempts must be at least 1"):
        RetryPolicy(max_attempts=0)
