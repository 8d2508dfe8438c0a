"""The shared ledger: PostgresLedger keeps SQLiteLedger's semantics, and claims hold on both.

Every semantic test runs on both backends (``state_url``); PostgreSQL is the real server from tests/services.py.
The claim race runs in threads with one connection each, as two workers would.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter

import polars as pl
import pytest

from apollo_sync.errors import InputError
from apollo_sync.ledger import LEDGER_FILE, Ledger, PostgresLedger, open_ledger, target_for
from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, Pacer
from loader_helpers import make_contacts, stored_emails
from services import PG_PASSWORD, postgres  # noqa: F401 - fixture

T = target_for("http://127.0.0.1:9/apis/v1/apollo")


def frame(pairs):
    return pl.DataFrame(
        {"source_row": list(range(1, len(pairs) + 1)), "identity": [i for i, _ in pairs], "fingerprint": [f for _, f in pairs]},
        schema={"source_row": pl.Int64, "identity": pl.String, "fingerprint": pl.String},
    )


def outcomes(rows):
    schema = {"identity": pl.String, "fingerprint": pl.String, "outcome": pl.String, "apollo_id": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")




@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.e2e])])
def state_url(request) -> str | None:
    """Each semantic test runs twice: on the SQLite ledger (None) and on a fresh PostgreSQL database."""
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else None


@pytest.fixture
def new_ledger(state_url, tmp_path):
    """``new_ledger()`` -> a new connection to the same ledger (each like a separate worker)."""
    opened: list[Ledger] = []

    def make() -> Ledger:
        ledger = open_ledger(tmp_path / "state", state_url)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


def test_open_with_a_url_gives_postgres_and_the_password_is_nowhere(pg_url):
    with open_ledger("unused", pg_url) as ledger:
        assert isinstance(ledger, PostgresLedger)
        assert PG_PASSWORD not in repr(ledger) and "apollo@" in repr(ledger)
    bad = pg_url.replace(PG_PASSWORD, "wrong-" + PG_PASSWORD)
    with pytest.raises(InputError, match="state-url") as info:
        open_ledger("unused", bad)
    assert PG_PASSWORD not in str(info.value)
    with pytest.raises(InputError, match="postgresql://"):
        PostgresLedger("mysql://u:pw@h/db")


def test_plan_record_and_marks_behave_the_same(new_ledger):
    ledger = new_ledger()
    ledger.mark_pending(T, frame([("email:a", "1"), ("email:b", "2"), ("email:c", "3")]), "run1")
    ledger.record(T, outcomes([("email:a", "1", "created", "A"), ("email:b", "2", "existing", "B"),
                               ("email:c", "3", "failed", None)]), "run1")  # fmt: skip
    to_send, unchanged = ledger.plan(T, frame([("email:a", "1"), ("email:b", "2-changed"), ("email:c", "3"), ("email:d", "4")]))
    assert unchanged["identity"].to_list() == ["email:a"]
    assert to_send["identity"].to_list() == ["email:b", "email:c", "email:d"]
    assert to_send["must_dedupe"].to_list() == [True, True, False]
    ledger.record(T, outcomes([("email:a", "1", "unconfirmed", None)]), "run2")  # ignored: stays as it was
    assert ledger.status_counts(T) == {"created": 1, "existing": 1, "failed": 1}
    assert ledger.get_mark("cursor:x") is None
    ledger.set_mark("cursor:x", "2026-01-01")
    ledger.set_mark("cursor:x", "2026-02-01")
    assert new_ledger().get_mark("cursor:x") == "2026-02-01"


def test_a_live_runs_claim_is_refused_to_another_run(new_ledger):
    first, second = new_ledger(), new_ledger()
    rows = frame([("email:a", "1"), ("email:b", "2")])
    got = first.claim(T, rows, "run-1")
    assert got.claimed == {"email:a", "email:b"} and not got.seen and not got.refused
    other = second.claim(T, frame([("email:b", "2"), ("email:c", "3")]), "run-2")
    assert other.claimed == {"email:c"} and other.refused == {"email:b": "run-1"}
    again = first.claim(T, rows, "run-1")  # the holder itself (e.g. a retried flow run) may claim again
    assert again.claimed == {"email:a", "email:b"} and again.seen == {"email:a", "email:b"}


def test_a_finished_runs_pending_rows_are_taken_over_and_sent_with_dedupe(new_ledger):
    first, second = new_ledger(), new_ledger()
    first.claim(T, frame([("email:a", "1")]), "run-1")
    first.record(T, outcomes([("email:a", "1", "unconfirmed", None)]), "run-1")
    first.close()  # closing finishes the run: its unconfirmed row is free at once
    got = second.claim(T, frame([("email:a", "1")]), "run-2")
    assert got.claimed == {"email:a"} and got.seen == {"email:a"}


def test_an_expired_lease_is_taken_over(new_ledger):
    first, second = new_ledger(), new_ledger()
    first.claim(T, frame([("email:a", "1")]), "run-1")
    second.lease_seconds = 30
    assert second.claim(T, frame([("email:a", "1")]), "run-2").refused == {"email:a": "run-1"}
    second.lease_seconds = 0.0  # as if run-1 sent no heartbeat for longer than the lease
    got = second.claim(T, frame([("email:a", "1")]), "run-2")
    assert got.claimed == {"email:a"} and got.seen == {"email:a"}


def test_a_run_killed_on_this_host_is_dead_at_once(new_ledger, state_url, tmp_path):
    """A holder on this host whose process is gone does not block for the whole lease."""
    first = new_ledger()
    first.claim(T, frame([("email:a", "1")]), "run-1")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    _set_pid(state_url, tmp_path / "state", "run-1", dead_pid)
    got = new_ledger().claim(T, frame([("email:a", "1")]), "run-2")
    assert got.claimed == {"email:a"} and got.seen == {"email:a"}


def _set_pid(state_url: str | None, state_dir, run_id: str, pid: int) -> None:
    """Rewrite a run's pid from a connection of its own, as if that run had been a process now gone."""
    if state_url:
        import psycopg

        with psycopg.connect(state_url, autocommit=True) as conn:
            conn.execute("UPDATE sync_runs SET pid = %s WHERE run_id = %s", (pid, run_id))
    else:
        with sqlite3.connect(state_dir / LEDGER_FILE) as conn:
            conn.execute("UPDATE sync_runs SET pid = ? WHERE run_id = ?", (pid, run_id))
        conn.close()


def test_content_another_run_confirmed_during_this_run_is_not_sent_again(new_ledger):
    """Even on a full refresh, where plan() sends confirmed rows again, a row another partition confirmed
    after this run planned is refused; one confirmed before the plan is claimed (and deduped)."""
    first, second = new_ledger(), new_ledger()
    first.claim(T, frame([("email:old", "1")]), "run-0")
    first.record(T, outcomes([("email:old", "1", "created", "X")]), "run-0")
    second.plan(T, frame([("email:old", "1"), ("email:a", "1")]), full_refresh=True)
    first.claim(T, frame([("email:a", "1")]), "run-1")
    first.record(T, outcomes([("email:a", "1", "created", "A")]), "run-1")
    first.finish("run-1")
    got = second.claim(T, frame([("email:old", "1"), ("email:a", "1")]), "run-2")
    assert got.claimed == {"email:old"} and got.seen == {"email:old"}
    assert got.refused == {"email:a": "run-1"}
    changed = second.claim(T, frame([("email:a", "2-changed")]), "run-2")  # other content: sent, with dedupe
    assert changed.claimed == {"email:a"} and changed.seen == {"email:a"}


def test_racing_claims_give_each_identity_to_one_run(new_ledger):
    n, runs = 400, 4
    ledgers = [new_ledger() for _ in range(runs)]
    rows = frame([(f"email:{i}", "1") for i in range(n)])
    barrier = threading.Barrier(runs)
    claims: dict[str, list[frozenset[str]]] = {f"run-{k}": [] for k in range(runs)}

    def worker(k: int) -> None:
        barrier.wait()
        for start in range(0, n, 20):  # the same chunks, in a different order per run
            chunk = rows.slice(((start + 100 * k) % n), 20)
            claims[f"run-{k}"].append(ledgers[k].claim(T, chunk, f"run-{k}").claimed)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners = Counter(identity for got in claims.values() for claim in got for identity in claim)
    assert len(owners) == n and set(owners.values()) == {1}


def test_two_loaders_over_overlapping_rows_send_each_contact_once(new_ledger, sandbox):
    """The loader end to end: overlapping halves loaded at once by two sessions on one ledger."""
    contacts = make_contacts(300)
    parts = [contacts.slice(0, 200), contacts.slice(100, 200)]  # rows 100-199 are in both
    target = target_for(sandbox.gateway_base_url)

    async def load(part: pl.DataFrame, run_id: str):
        ledger = new_ledger()
        to_send, _ = ledger.plan(target, part)
        async with ApolloClient(sandbox.gateway_base_url, "sandbox-key") as client:
            config = LoadConfig(target, run_id=run_id, chunk_size=10, concurrency=2, run_dedupe=False)
            session = LoadSession(client, Pacer(), ledger, config)
            return await session.load(session.make_chunks(to_send)), session

    async def both():
        return await asyncio.gather(load(parts[0], "run-a"), load(parts[1], "run-b"))

    (a, sa), (b, sb) = asyncio.run(both())
    emails = Counter(stored_emails(sandbox))
    assert len(emails) == 300 and max(emails.values()) == 1
    merged = pl.concat([a.outcomes, b.outcomes])
    assert merged.height == 400  # every input row has one outcome
    dup = merged.filter(pl.col("outcome") == "duplicate")
    landed = merged.filter(pl.col("outcome").is_in(["created", "existing"]))
    assert dup.height == sa.stats.claimed_elsewhere + sb.stats.claimed_elsewhere
    assert landed.height + dup.height == 400 and landed["email"].n_unique() == 300
    assert dup["reason"].str.contains(r"claimed by another partition \(run run-[ab]\)").all()
    assert os.environ.get("APOLLO_API_KEY") is None


def test_an_identity_twice_in_one_batch_is_claimed_and_recorded_once(new_ledger):
    ledger = new_ledger()
    got = ledger.claim(T, frame([("email:a", "1"), ("email:a", "1"), ("email:b", "2")]), "run-1")
    assert got.claimed == {"email:a", "email:b"} and not got.refused
    ledger.record(T, outcomes([("email:a", "1", "created", "A"), ("email:a", "1", "existing", "A")]), "run-1")
    assert ledger.status_counts(T) == {"existing": 1, "pending": 1}


def _with_hashes(rows):
    """outcomes() plus the status to store and the field hashes of what was sent."""
    return pl.DataFrame(rows, schema={"identity": pl.String, "fingerprint": pl.String, "outcome": pl.String,
                                      "apollo_id": pl.String, "status": pl.String, "field_hashes": pl.String},
                        orient="row")  # fmt: skip


def test_upsert_plans_updates_by_id_against_the_last_confirmed_field_hashes(new_ledger):
    ledger = new_ledger()
    ledger.record(T, _with_hashes([
        ("email:a", "1", "created", "A", "created", "title=1"),      # ours, in step
        ("email:b", "2", "existing", "B", "existing", "title=2"),    # Apollo kept its values: hashes dropped
        ("email:c", "3", "updated", "C", "updated", "title=3"),
        ("email:d", "4", "created", "D", "created", "title=4"),
    ]), "run1")  # fmt: skip
    ledger.record(T, _with_hashes([("email:d", "4b", "failed", None, "failed", "title=9")]), "run2")  # keeps title=4
    contacts = frame([("email:a", "1"), ("email:b", "2"), ("email:c", "3-changed"), ("email:d", "4b"), ("email:e", "5")])

    to_send, unchanged = ledger.plan(T, contacts, mode="upsert")

    assert unchanged["identity"].to_list() == ["email:a"] and "update_id" not in unchanged.columns
    assert to_send.select("identity", "update_id", "base_hashes").rows() == [
        ("email:b", "B", None), ("email:c", "C", "title=3"), ("email:d", "D", "title=4"), ("email:e", None, None),
    ]  # fmt: skip
    created_mode, _ = ledger.plan(T, contacts)
    assert created_mode["identity"].to_list() == ["email:c", "email:d", "email:e"]  # existing b is confirmed there
    assert "update_id" not in created_mode.columns
    full, _ = ledger.plan(T, contacts, full_refresh=True, mode="upsert")
    assert full["base_hashes"].null_count() == full.height  # a full refresh sends every non-empty field
    with pytest.raises(InputError, match="mode"):
        ledger.plan(T, contacts, mode="overwrite")


def test_a_ledger_from_before_upsert_is_migrated_in_place(tmp_path):
    path = tmp_path / "state" / LEDGER_FILE
    path.parent.mkdir()
    with sqlite3.connect(path) as db:  # the table as versions before upsert made it
        db.execute("""CREATE TABLE sync_ledger (target TEXT NOT NULL, identity TEXT NOT NULL, fingerprint TEXT,
                      apollo_id TEXT, status TEXT NOT NULL, run_id TEXT, updated_at TEXT NOT NULL,
                      PRIMARY KEY (target, identity))""")  # fmt: skip
        db.execute("INSERT INTO sync_ledger VALUES (?, 'email:a', '1', 'A', 'existing', 'old', '2026-01-01')", (T,))
    with open_ledger(tmp_path / "state") as ledger:
        to_send, unchanged = ledger.plan(T, frame([("email:a", "1")]), mode="upsert")
        assert to_send.select("update_id", "base_hashes").rows() == [("A", None)] and unchanged.height == 0
        ledger.record(T, _with_hashes([("email:a", "1", "updated", "A", "updated", "title=1")]), "new")
        _, unchanged = ledger.plan(T, frame([("email:a", "1")]), mode="upsert")
        assert unchanged.height == 1
