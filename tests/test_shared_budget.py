"""The shared rate budget in the PostgreSQL ledger (issue 17): what each acquisition hands out.

These tests look at the turns the statement computes (the waits it returns), not at how fast anything runs; the
throughput against a rate-limited sandbox is measured in bench/bench_shared_budget.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from apollo_sync.errors import InputError
from apollo_sync.ledger.budget import SharedBudget, wait_for
from services import postgres  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]




def _age(url: str, name: str, seconds: float) -> None:
    """Move the bucket's last update ``seconds`` into the past (as if nobody had asked for that long)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE sync_rate_budget SET updated_at = updated_at - make_interval(secs => %s) WHERE name = %s",
                     (seconds, name))  # fmt: skip


def test_the_wait_is_the_debt_over_the_rate():
    assert wait_for(0.0, 2.0) == 0.0 and wait_for(0.5, 2.0) == 0.0
    assert wait_for(-3.0, 2.0) == 1.5


def test_turns_are_one_interval_apart_and_an_idle_bucket_allows_no_burst(pg_url):
    budget = SharedBudget(pg_url, "b", per_minute=60)  # one a second: the takes below run well within one
    try:
        waits = [budget.take() for _ in range(5)]
        assert waits[0] == 0.0  # a new budget starts full
        for k, wait in enumerate(waits[1:], 1):
            assert k - 0.5 < wait <= k, waits  # the k-th next request waits for its own turn, k seconds on
        _age(pg_url, "b", 3600)  # an hour idle: the bucket refills to one token, never more
        again = [budget.take() for _ in range(3)]
        assert again[0] == 0.0 and 0.5 < again[1] <= 1.0 and 1.5 < again[2] <= 2.0, again
    finally:
        budget.close()


def test_two_workers_share_one_sequence_of_turns(pg_url):
    """Two budgets on their own connections (as on two machines) taking at the same time get distinct turns."""
    budgets = [SharedBudget(pg_url, "shared", per_minute=60) for _ in range(2)]
    waits: list[list[float]] = [[], []]

    def take(i: int) -> None:
        for _ in range(6):
            waits[i].append(budgets[i].take())

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for budget in budgets:
        budget.close()
    turns = sorted(waits[0] + waits[1])
    assert len(turns) == 12 and turns[0] == 0.0
    # 12 requests at one a second: the last turn is about 11 s away, and no two share a second
    assert 10.5 < turns[-1] <= 11.0, turns
    assert all(b - a > 0.5 for a, b in zip(turns, turns[1:])), turns


def test_acquire_sleeps_for_the_turn_and_a_rate_change_applies_at_once(pg_url):
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    budget = SharedBudget(pg_url, "c", per_minute=60, sleep=sleep)
    try:
        asyncio.run(budget.acquire())
        asyncio.run(budget.acquire())
        assert budget.acquired == 2 and len(slept) == 1 and 0.5 < slept[0] <= 1.0
        faster = SharedBudget(pg_url, "c", per_minute=600)
        try:
            wait = faster.take()  # the debt of the two above, now repaid at ten a second
            assert 0.0 < wait <= 0.2, wait
        finally:
            faster.close()
    finally:
        budget.close()


def test_a_budget_needs_a_postgres_url_and_a_rate_and_never_shows_the_password(pg_url):
    with pytest.raises(InputError, match="postgresql://"):
        SharedBudget("sqlite:///x.db", "b", 60)
    with pytest.raises(InputError, match="positive rate"):
        SharedBudget(pg_url, "b", 0)
    password = pg_url.split(":")[2].split("@")[0]
    assert password not in repr(SharedBudget(pg_url, "b", 60))
    wrong = pg_url.replace(password, "not-the-password")
    with pytest.raises(InputError, match="unreachable") as raised:
        SharedBudget(wrong, "b", 60).take()
    assert "not-the-password" not in str(raised.value)
