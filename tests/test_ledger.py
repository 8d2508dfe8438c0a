"""The sync ledger: plan() splits new/changed/unconfirmed from unchanged; marks and records are durable."""

from __future__ import annotations

import sqlite3

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync.errors import InputError
from apollo_sync.ledger import LEDGER_FILE, open_ledger, target_for

T = target_for("http://127.0.0.1:9/apis/v1/apollo")


def frame(pairs):
    return pl.DataFrame(
        {"source_row": list(range(1, len(pairs) + 1)), "identity": [i for i, _ in pairs], "fingerprint": [f for _, f in pairs]},
        schema={"source_row": pl.Int64, "identity": pl.String, "fingerprint": pl.String},
    )


def outcomes(rows):
    return pl.DataFrame(rows, schema={"identity": pl.String, "fingerprint": pl.String, "outcome": pl.String, "apollo_id": pl.String}, orient="row")


@pytest.fixture
def ledger(tmp_path):
    with open_ledger(tmp_path / "state") as led:
        yield led


def test_empty_ledger_sends_everything_without_forced_dedupe(ledger):
    contacts = frame([("email:a", "1"), ("email:b", "2")])
    to_send, unchanged = ledger.plan(T, contacts)
    assert_frame_equal(to_send.drop("must_dedupe"), contacts)
    assert to_send["must_dedupe"].to_list() == [False, False]
    assert unchanged.height == 0


def test_confirmed_same_content_is_unchanged_changed_content_must_dedupe(ledger):
    ledger.mark_pending(T, frame([("email:a", "1"), ("email:b", "2"), ("email:c", "3")]), "run1")
    ledger.record(T, outcomes([("email:a", "1", "created", "A"), ("email:b", "2", "existing", "B"), ("email:c", "3", "failed", None)]), "run1")
    to_send, unchanged = ledger.plan(T, frame([("email:a", "1"), ("email:b", "2-changed"), ("email:c", "3"), ("email:d", "4")]))
    assert unchanged["identity"].to_list() == ["email:a"]
    assert "must_dedupe" not in unchanged.columns
    assert to_send["identity"].to_list() == ["email:b", "email:c", "email:d"]
    assert to_send["must_dedupe"].to_list() == [True, True, False]


def test_pending_from_a_killed_run_must_dedupe(ledger):
    ledger.mark_pending(T, frame([("email:a", "1")]), "killed-run")
    to_send, unchanged = ledger.plan(T, frame([("email:a", "1")]))
    assert to_send["must_dedupe"].to_list() == [True] and unchanged.height == 0


def test_unconfirmed_stays_pending(ledger):
    ledger.mark_pending(T, frame([("email:a", "1")]), "r")
    ledger.record(T, outcomes([("email:a", "1", "unconfirmed", None)]), "r")
    assert ledger.status_counts(T) == {"pending": 1}


def test_full_refresh_sends_confirmed_rows_again_with_dedupe(ledger):
    ledger.record(T, outcomes([("email:a", "1", "created", "A")]), "r")
    to_send, unchanged = ledger.plan(T, frame([("email:a", "1")]), full_refresh=True)
    assert to_send["must_dedupe"].to_list() == [True] and unchanged.height == 0


def test_targets_are_separate_and_key_free():
    assert target_for("HTTPS://API.apollo.io:443/api/v1/") == target_for("https://api.apollo.io/api/v1")
    assert target_for("https://api.apollo.io/api/v1") != target_for("https://api.aisa.one/apis/v1/apollo")
    assert target_for("http://127.0.0.1:8000/api/v1") != target_for("http://127.0.0.1:8001/api/v1")


def test_other_target_sees_nothing(ledger):
    ledger.record(T, outcomes([("email:a", "1", "created", "A")]), "r")
    to_send, _ = ledger.plan(target_for("https://api.apollo.io/api/v1"), frame([("email:a", "1")]))
    assert to_send["must_dedupe"].to_list() == [False]


def test_failed_after_created_keeps_the_apollo_id(ledger, tmp_path):
    ledger.record(T, outcomes([("email:a", "1", "created", "A")]), "r1")
    ledger.record(T, outcomes([("email:a", "2", "failed", None)]), "r2")
    db = sqlite3.connect(tmp_path / "state" / LEDGER_FILE)
    assert db.execute("SELECT apollo_id, status, run_id FROM sync_ledger").fetchall() == [("A", "failed", "r2")]


def test_survives_reopen_and_uses_wal(tmp_path):
    with open_ledger(tmp_path) as led:
        led.record(T, outcomes([("email:a", "1", "created", "A")]), "r")
        led.set_mark("sql:cursor", "2024-01-01")
    with open_ledger(tmp_path) as led:
        assert led.plan(T, frame([("email:a", "1")]))[1].height == 1
        assert led.get_mark("sql:cursor") == "2024-01-01"
        assert led.get_mark("missing") is None
    mode = sqlite3.connect(tmp_path / LEDGER_FILE).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_plan_keeps_order_and_extra_columns_on_many_rows(ledger):
    n = 20_000
    contacts = frame([(f"email:{i}", str(i)) for i in range(n)]).with_columns(payload=pl.lit("{}"))
    ledger.record(T, outcomes([(f"email:{i}", str(i), "created", f"id{i}") for i in range(0, n, 2)]), "r")
    to_send, unchanged = ledger.plan(T, contacts)
    assert to_send["source_row"].to_list() == list(range(2, n + 1, 2))
    assert unchanged["source_row"].to_list() == list(range(1, n + 1, 2))
    assert "payload" in to_send.columns


def test_the_batch_drives_the_lookup_one_primary_key_search_per_identity(ledger):
    """A part is planned by looking its identities up one by one (never by scanning the ledger for each), so planning
    a part costs the same whether the ledger holds a thousand contacts or ten million."""
    from apollo_sync.ledger.sqlite import KNOWN_QUERY

    ledger.record(T, outcomes([(f"email:{i}", "f", "created", f"id{i}") for i in range(2_000)]), "r")
    plan = [row[3] for row in ledger._db.execute("EXPLAIN QUERY PLAN" + KNOWN_QUERY, (T, '["email:1"]'))]
    assert plan[0].startswith("SCAN batch"), plan
    assert plan[1].startswith("SEARCH l USING") and "identity=?" in plan[1], plan


def test_plan_needs_identity_and_fingerprint(ledger):
    with pytest.raises(InputError, match="identity"):
        ledger.plan(T, pl.DataFrame({"fingerprint": ["x"]}))


def test_unwritable_state_dir_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="state-dir"):
        open_ledger(blocker / "sub")
