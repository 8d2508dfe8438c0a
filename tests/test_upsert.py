"""``--mode upsert`` against the sandbox over real sockets: contacts Apollo had before the first run take the
source's values, edits land through Bulk Update (only the edited contacts, only the edited fields), an empty cell
never blanks a field, labels are only added, and the default mode never updates."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import polars as pl
import pytest

from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, Pacer
from apollo_sync.params import sync_params
from apollo_sync.report import summary_problems
from apollo_sync.sandbox import SandboxConfig, SandboxProcess
from apollo_sync.settings import ENV_API_KEY
from apollo_sync.sync import RunAborted, run_sync

FIELDS = ["email", "first name", "last name", "company", "title", "website", "phone"]


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """``n`` source rows; every value depends on the row number only."""
    return [
        {"email": f"person{i}@example.com", "first name": f"First{i}", "last name": f"Last{i}",
         "company": f"Company {i % 7}", "title": f"Title {i}", "website": f"https://c{i % 7}.example.com",
         "phone": f"+1 415 555 {1000 + i:04d}"}
        for i in range(start, start + n)
    ]  # fmt: skip


def write_source(path: Path, records: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(records)
    return path


def sync(server, source: Path, tmp_path: Path, **settings) -> dict:
    params = sync_params(source=str(source), base_url=server.gateway_base_url, state_dir=str(tmp_path / "state"),
                         **settings)  # fmt: skip
    summary = asyncio.run(run_sync(params))
    assert summary_problems(summary) == []
    return summary


def by_email(server) -> dict[str, dict]:
    return {c["email"]: c for c in server.contacts()}


def results(summary: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(summary["report_dir"]) / "results.parquet")


def endpoint_counts(server) -> Counter:
    return Counter(server.stats()["requests_by_endpoint"])


@pytest.fixture(autouse=True)
def _key(monkeypatch, sandbox):
    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)


def seed_old_copies(sandbox, records: list[dict[str, str]]) -> None:
    """The contacts as Apollo held them before apollo-sync: an old title, a rep's label, a LinkedIn URL the source
    does not have, no website."""
    sandbox.seed([
        {"email": r["email"], "first_name": r["first name"], "last_name": r["last name"],
         "organization_name": r["company"], "title": "Old title", "linkedin_url": "https://linkedin.com/in/x",
         "label_names": ["Rep list"]}
        for r in records
    ])  # fmt: skip


def test_upsert_makes_contacts_apollo_had_equal_to_the_source_labels_added_nothing_blanked(sandbox, tmp_path):
    existing, new = rows(30), rows(20, start=30)
    seed_old_copies(sandbox, existing)
    source = write_source(tmp_path / "contacts.csv", existing + new)

    summary = sync(sandbox, source, tmp_path, mode="upsert", labels=["Q4"])

    assert (summary["created"], summary["updated"], summary["existing"]) == (20, 30, 0)
    stored = by_email(sandbox)
    assert len(stored) == 50 and sandbox.stats()["contacts_stored"] == 50  # nobody twice
    for record in existing + new:
        contact = stored[record["email"]]
        assert contact["title"] == record["title"] and contact["website_url"] == record["website"]
        assert contact["organization_name"] == record["company"]
        assert "Q4" in contact["label_names"]
    for record in existing:
        contact = stored[record["email"]]
        assert "Rep list" in contact["label_names"]  # no label removed
        assert contact["linkedin_url"] == "https://linkedin.com/in/x"  # not in the source: left alone
    updated = results(summary).filter(pl.col("outcome") == "updated")
    assert updated.height == 30 and updated["reason"].str.contains("title").all()
    assert set(updated["apollo_id"]) == {stored[r["email"]]["id"] for r in existing}
    assert sandbox.stats()["updated"] == 30


def test_only_the_edited_contacts_go_to_bulk_update_and_their_new_values_land(sandbox, tmp_path):
    records = rows(300)
    source = write_source(tmp_path / "contacts.csv", records)
    first = sync(sandbox, source, tmp_path, mode="upsert", labels=["Q4"])
    assert first["created"] == 300
    before = endpoint_counts(sandbox)

    for record in records[::3]:  # 100 edits
        record["title"] = "Edited " + record["title"]
    write_source(source, records)
    second = sync(sandbox, source, tmp_path, mode="upsert", labels=["Q4"])

    sent = endpoint_counts(sandbox) - before
    assert (second["updated"], second["unchanged"], second["created"]) == (100, 200, 0)
    assert sent == Counter({"bulk_update": 1})  # 100 contacts: one request, nothing else
    assert sandbox.stats()["max_contacts_in_update"] == 100
    stored = by_email(sandbox)
    assert all(stored[r["email"]]["title"] == r["title"] for r in records)
    assert all(stored[r["email"]]["label_names"] == ["Q4"] for r in records)
    reasons = results(second).filter(pl.col("outcome") == "updated")["reason"]
    assert set(reasons) == {"updated: title"}  # only the edited field was sent

    third = sync(sandbox, source, tmp_path, mode="upsert", labels=["Q4"])
    assert third["unchanged"] == 300 and third["requests"] == 0
    assert endpoint_counts(sandbox) - before == sent  # an unchanged re-run sends nothing


def test_an_emptied_cell_never_blanks_the_field_in_apollo(sandbox, tmp_path):
    records = rows(10)
    source = write_source(tmp_path / "contacts.csv", records)
    sync(sandbox, source, tmp_path, mode="upsert")
    records[0]["title"] = ""  # cleared in the source
    records[1]["title"], records[1]["website"] = "New title", ""  # one change, one cleared cell
    write_source(source, records)

    summary = sync(sandbox, source, tmp_path, mode="upsert")

    stored = by_email(sandbox)
    assert stored[records[0]["email"]]["title"] == "Title 0"
    assert stored[records[1]["email"]]["title"] == "New title"
    assert stored[records[1]["email"]]["website_url"] == "https://c1.example.com"
    outcome = dict(results(summary).select("email", "outcome").iter_rows())
    assert outcome[records[0]["email"]] == "unchanged" and outcome[records[1]["email"]] == "updated"
    assert summary["updated"] == 1 and summary["requests"] == 1


def test_the_default_mode_never_updates_a_contact(sandbox, tmp_path):
    records = rows(10)
    seed_old_copies(sandbox, records)
    source = write_source(tmp_path / "contacts.csv", records)

    summary = sync(sandbox, source, tmp_path, labels=["Q4"])

    assert summary["existing"] == 10 and summary["updated"] == 0
    assert endpoint_counts(sandbox)["bulk_update"] == 0
    assert all(c["title"] == "Old title" for c in sandbox.contacts())


def test_switching_a_create_ledger_to_upsert_brings_the_contacts_apollo_kept_into_step(sandbox, tmp_path):
    records = rows(20)
    seed_old_copies(sandbox, records[:5])
    source = write_source(tmp_path / "contacts.csv", records)
    created = sync(sandbox, source, tmp_path)
    assert (created["created"], created["existing"]) == (15, 5)

    summary = sync(sandbox, source, tmp_path, mode="upsert")

    # the 5 Apollo kept its own values for are updated; the 15 it created from the source are unchanged
    assert (summary["updated"], summary["unchanged"]) == (5, 15)
    assert all(by_email(sandbox)[r["email"]]["title"] == r["title"] for r in records)
    assert endpoint_counts(sandbox)["bulk_create"] == 1  # the update went by the id the ledger kept


def test_dry_run_names_the_fields_that_would_change_and_sends_nothing(sandbox, tmp_path):
    records = rows(10)
    source = write_source(tmp_path / "contacts.csv", records)
    sync(sandbox, source, tmp_path, mode="upsert")
    records[2]["title"] = "Changed"
    records[3]["phone"] = "+1 415 555 9999"
    write_source(source, records + rows(1, start=50))
    before = sandbox.stats()["requests"]

    summary = sync(sandbox, source, tmp_path, mode="upsert", dry_run=True)

    assert sandbox.stats()["requests"] == before
    assert (summary["would_update"], summary["would_send"], summary["unchanged"]) == (2, 1, 8)
    reasons = dict(results(summary).filter(pl.col("outcome") == "would_update").select("email", "reason").iter_rows())
    assert reasons == {records[2]["email"]: "would change: title", records[3]["email"]: "would change: direct_phone"}


def test_a_contact_deleted_in_apollo_is_created_again_not_lost(sandbox, tmp_path):
    records = rows(5)
    source = write_source(tmp_path / "contacts.csv", records)
    sync(sandbox, source, tmp_path, mode="upsert")
    sandbox.reset()  # every contact gone from Apollo; the ledger still has their ids
    records[0]["title"] = "Changed"
    write_source(source, records)

    summary = sync(sandbox, source, tmp_path, mode="upsert")

    assert summary["created"] == 1 and summary["unchanged"] == 4
    [row] = results(summary).filter(pl.col("outcome") == "created").iter_rows(named=True)
    assert "no longer had" in row["reason"] and row["email"] == records[0]["email"]
    assert by_email(sandbox)[records[0]["email"]]["title"] == "Changed"


def test_updates_through_the_fault_mix_land_once_and_a_rerun_finishes_what_was_unconfirmed(sandbox_factory, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    server = sandbox_factory(seed=13, fail_before_store=0.1, fail_after_store=0.1, drop=0.05, burst_429=0.05)
    monkeypatch.setenv(ENV_API_KEY, server.config.api_key)
    records = rows(400)
    seed_old_copies(server, records[:200])
    source = write_source(tmp_path / "contacts.csv", records)
    settings = dict(mode="upsert", labels=["Q4"], chunk_size=20, timeout=2.0)

    first = sync(server, source, tmp_path, **settings)
    for record in records[::4]:
        record["title"] += " (edited)"
    write_source(source, records)
    second = sync(server, source, tmp_path, **settings)
    third = sync(server, source, tmp_path, **settings)

    assert sum(server.stats()["faults"].values()) > 0 and first["retries"] + second["retries"] > 0
    stored = Counter(c["email"] for c in server.contacts())
    assert len(stored) == 400 and max(stored.values()) == 1  # nobody lost, nobody twice
    contacts = by_email(server)
    assert all(contacts[r["email"]]["title"] == r["title"] for r in records)
    assert all("Q4" in contacts[r["email"]]["label_names"] for r in records)
    assert all("Rep list" in contacts[r["email"]]["label_names"] for r in records[:200])
    assert third["failed"] == third["unconfirmed"] == 0


CHILD = """
import asyncio
from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, Pacer
from apollo_sync.params import sync_params
from apollo_sync.sync import RunAborted, run_sync
asyncio.run(run_sync(sync_params(source={source!r}, base_url={url!r}, state_dir={state!r}, mode="upsert",
                                 labels=["Q4"], chunk_size=20, concurrency=2)))
"""


def test_kill_9_in_the_middle_of_updates_then_a_rerun_leaves_apollo_equal_to_the_source(tmp_path):
    records = rows(600)
    config = SandboxConfig(rate=20, window=1, latency=0.02, seed=4)
    with SandboxProcess(config) as server:
        seed_old_copies(server, records[:400])
        source = write_source(tmp_path / "contacts.csv", records)
        script = CHILD.format(source=str(source), url=server.gateway_base_url, state=str(tmp_path / "state"))
        child = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {ENV_API_KEY: config.api_key})
        try:
            deadline = time.monotonic() + 90
            while (server.stats()["requests_by_endpoint"].get("bulk_update", 0) < 4 and child.poll() is None
                   and time.monotonic() < deadline):  # fmt: skip
                time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL  # killed mid-way, not finished
        titles = Counter(c["title"] == "Old title" for c in server.contacts())
        assert titles[True] > 0 and titles[False] > 0  # some updates landed, some did not

        summary = sync(server, source, tmp_path, mode="upsert", labels=["Q4"], chunk_size=20)

        stored = Counter(c["email"] for c in server.contacts())
        assert len(stored) == 600 and max(stored.values()) == 1
        contacts = by_email(server)
        assert all(contacts[r["email"]]["title"] == r["title"] for r in records)
        assert all({"Q4", "Rep list"} <= set(contacts[r["email"]]["label_names"]) for r in records[:400])
        assert summary["failed"] == summary["unconfirmed"] == 0
        again = sync(server, source, tmp_path, mode="upsert", labels=["Q4"])
        assert again["requests"] == 0 and again["unchanged"] == 600


def test_a_refused_update_is_isolated_by_bisection_and_the_rest_land():
    """A 422 for one contact of an update (a shape the sandbox does not give for valid fields): halves are sent
    until that contact is alone; it fails with Apollo's message, the other 15 are updated."""
    sizes = []

    def handler(request: httpx.Request) -> httpx.Response:
        entries = json.loads(request.content)["contact_attributes"]
        sizes.append(len(entries))
        if any(e["id"] == "id-7" for e in entries):
            return httpx.Response(422, json={"error": {"message": "title is too long"}})
        return httpx.Response(200, json={"contacts": [{**e, "label_names": []} for e in entries]})

    n = 16
    to_send = pl.DataFrame({
        "source_row": list(range(1, n + 1)), "identity": [f"email:p{i}" for i in range(n)],
        "fingerprint": [str(i) for i in range(n)], "email": [f"p{i}@example.com" for i in range(n)],
        "title": [f"T{i}" for i in range(n)], "update_id": [f"id-{i}" for i in range(n)],
        "base_hashes": ["email=x"] * n, "field_hashes": [f"email=x;title={i}" for i in range(n)],
    })  # fmt: skip

    async def load():
        async with ApolloClient("https://gw.test/apis/v1/apollo", "k", transport=httpx.MockTransport(handler)) as client:
            session = LoadSession(client, Pacer(), None, LoadConfig(target="t", mode="upsert", chunk_size=n))
            return await session.load(session.make_chunks(to_send))

    result = asyncio.run(load())

    ends = {row["source_row"]: row for row in result.outcomes.iter_rows(named=True)}
    assert ends[8]["outcome"] == "failed" and "title is too long" in ends[8]["reason"]
    assert all(ends[r]["outcome"] == "updated" and ends[r]["reason"] == "updated: title" for r in ends if r != 8)
    assert sizes[0] == n and sizes.count(1) >= 1 and len(sizes) <= 1 + 2 * 4  # log2(16) levels of halves


def test_a_wrong_key_stops_the_updates_and_reports_every_row(sandbox, tmp_path, monkeypatch):
    records = rows(30)
    source = write_source(tmp_path / "contacts.csv", records)
    sync(sandbox, source, tmp_path, mode="upsert")
    for record in records:
        record["title"] += " (new)"
    write_source(source, records)
    monkeypatch.setenv(ENV_API_KEY, "not-the-key")
    before = endpoint_counts(sandbox)

    params = sync_params(source=str(source), base_url=sandbox.gateway_base_url, state_dir=str(tmp_path / "state"),
                         report_dir=str(tmp_path / "report"), mode="upsert", chunk_size=10, concurrency=1)  # fmt: skip
    with pytest.raises(RunAborted, match="401"):
        asyncio.run(run_sync(params))

    assert endpoint_counts(sandbox) - before == Counter({"bulk_update": 1})  # stopped at the first answer
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["failed"] == 30 and summary_problems(summary) == []
    assert not any(c["title"].endswith("(new)") for c in sandbox.contacts())  # nothing changed
    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    assert sync(sandbox, source, tmp_path, mode="upsert")["updated"] == 30  # the next run makes them land


@pytest.mark.parametrize("way_in", ["gateway_base_url", "apollo_base_url"])
def test_both_ways_in_update(sandbox, tmp_path, way_in):
    records = rows(12)
    seed_old_copies(sandbox, records)
    source = write_source(tmp_path / "contacts.csv", records)
    params = sync_params(source=str(source), base_url=getattr(sandbox, way_in), state_dir=str(tmp_path / "state"),
                         mode="upsert")  # fmt: skip
    summary = asyncio.run(run_sync(params))
    assert summary["updated"] == 12 and all(c["title"] != "Old title" for c in sandbox.contacts())
