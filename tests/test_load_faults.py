"""Issue 4's proof: faults on, every row exactly once; a re-run sends nothing; a kill -9 mid-way loses nothing.

These run in real time on purpose: a slow answer really outlasts the client's timeout, and the retry's settle
wait really lets the server store the first attempt before the retry's dedupe looks, which is what keeps every
contact to one copy. A fake clock cannot show that. The rate windows, though, are on a fake clock shared by the
sandbox and the pacer (the pacer's waits step it), so no test waits for a wall-clock window. Short timeouts keep
this file quick: the client gives up after 0.5 s and "slow" answers take 1 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

from loader_helpers import SteppingClock, make_contacts, plan_and_load, stored_emails

from apollo_sync.ledger import LEDGER_FILE
from apollo_sync.sandbox import SandboxConfig, SandboxProcess

FAULTS = dict(fail_before_store=0.05, fail_after_store=0.05, slow=0.04, slow_seconds=1.0, drop=0.03)
TESTS_DIR = Path(__file__).parent


def test_6000_contacts_through_every_fault_land_exactly_once(sandbox_factory, tmp_path):
    clock = SteppingClock()
    sb = sandbox_factory(rate=12, window=1, seed=2026, clock=clock, **FAULTS)
    contacts = make_contacts(6000)
    result, session, unchanged = asyncio.run(
        plan_and_load(sb.gateway_base_url, contacts, tmp_path, run_dedupe=False, timeout=0.5, backoff_base=0.2,
                      pacer=clock.pacer())
    )
    outcomes = result.outcomes
    assert outcomes.height == 6000 and outcomes["source_row"].n_unique() == 6000  # one outcome per row
    assert set(outcomes["outcome"]) <= {"created", "existing"}
    emails = Counter(stored_emails(sb))
    assert len(emails) == 6000 and max(emails.values()) == 1  # every email exactly once
    assert set(emails) == set(contacts["email"])
    stats = sb.stats()
    successes = stats["status_counts"]["200"]
    assert stats["status_counts"].get("429", 0) < 0.05 * successes
    assert sum(stats["faults"].values()) > 0 and session.stats.retries > 0  # the faults did fire
    assert session.stats.dedupe_forced > 0
    assert sum(clock.sleeps) >= 60 / 12 - 1  # 60 requests or more at 12 a (fake) second: the pacer waited them out
    # An immediate re-run with the same ledger sends nothing.
    before = stats["requests"]
    again, session2, unchanged2 = asyncio.run(plan_and_load(sb.gateway_base_url, contacts, tmp_path, timeout=0.5))
    assert session2.stats.requests == 0 and unchanged2.height == 6000 and again.outcomes.height == 0
    assert sb.stats()["requests"] == before


def test_apollo_direct_with_faults_lands_exactly_once(sandbox_factory, tmp_path):
    sb = sandbox_factory(hourly_limit=100_000, seed=5, **FAULTS)  # X-Api-Key auth, Apollo's error and rate headers
    contacts = make_contacts(2000)
    result, session, _ = asyncio.run(
        plan_and_load(sb.apollo_base_url, contacts, tmp_path, run_dedupe=False, timeout=0.5, backoff_base=0.2)
    )
    assert sorted(result.outcomes["source_row"].to_list()) == list(range(1, 2001))
    assert set(result.outcomes["outcome"]) <= {"created", "existing"}
    emails = Counter(stored_emails(sb))
    assert len(emails) == 2000 and max(emails.values()) == 1
    assert session.pacer.snapshot()["hourly"]["limit"] == 100_000
    assert sum(sb.stats()["faults"].values()) > 0 and session.stats.retries > 0


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from loader_helpers import make_contacts, plan_and_load
    asyncio.run(plan_and_load({url!r}, make_contacts({n}), {state!r}, run_dedupe=False, concurrency=4, timeout=2.0))
    """
)


def _confirmed(state_dir: Path) -> int:
    """Rows the ledger in ``state_dir`` holds as confirmed by Apollo (0 while it does not exist yet)."""
    path = state_dir / LEDGER_FILE
    if not path.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as conn:
            return conn.execute("SELECT count(*) FROM sync_ledger WHERE status IN ('created', 'existing')").fetchone()[0]
    except sqlite3.OperationalError:  # the child is creating its tables
        return 0


def test_kill_9_mid_way_then_rerun_lands_everything_exactly_once(tmp_path):
    n = 3000
    config = SandboxConfig(rate=15, window=1, latency=0.02, fail_after_store=0.05, seed=9)
    with SandboxProcess(config) as sb:
        script = CHILD.format(tests=str(TESTS_DIR), url=sb.gateway_base_url, n=n, state=str(tmp_path))
        child = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS_DIR.parent)
        try:
            deadline = time.monotonic() + 60  # kill once the child has recorded answers (in batches, RECORD_SECONDS)
            while not _confirmed(tmp_path) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL  # killed mid-way, not finished
        landed_before = len(stored_emails(sb))
        assert 0 < landed_before < n
        result, session, unchanged = asyncio.run(
            plan_and_load(sb.gateway_base_url, make_contacts(n), tmp_path, run_dedupe=False, timeout=2.0, backoff_base=0.1)
        )
        assert result.outcomes.height + unchanged.height == n
        assert set(result.outcomes["outcome"]) <= {"created", "existing"}
        assert unchanged.height > 0  # what the killed run confirmed is not sent again
        emails = Counter(stored_emails(sb))
        assert len(emails) == n and max(emails.values()) == 1
        # And a third run has nothing left to send.
        _, session3, unchanged3 = asyncio.run(plan_and_load(sb.gateway_base_url, make_contacts(n), tmp_path))
        assert session3.stats.requests == 0 and unchanged3.height == n
