"""The sync-contacts flow end to end: a CRM export over real HTTP into the sandbox, under one Prefect harness."""

import asyncio
import gc
import json
import logging
import time
from datetime import datetime, timedelta

import polars as pl
import pytest

from apollo_sync.settings import ENV_API_KEY

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_harness")]

CRM_HEADER = "First Name,Last Name,Email Address,Company,Job Title,Phone\r\n"


def crm_export(path, n_unique=230):
    """A CRM export as people's tools write it: BOM, CRLF, quoted commas and newlines, messy emails, repeats."""
    lines = [CRM_HEADER]
    for i in range(n_unique):
        lines.append(f'Person{i},Tester,"  Person{i}@Example.COM ","Acme, Inc. {i % 7}","Head of\nThings",(415) 555-{i % 10000:04d}\r\n')
    lines.append('Dup,Tester,PERSON1@example.com,"Acme, Inc. 1",,\r\n')  # a duplicate by email
    lines.append("Bad,Email,not-an-email,Acme,,\r\n")  # invalid email
    lines.append(",,,Acme,,\r\n")  # no identity
    lines.append("\r\n")  # a blank line is not a row
    path.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
    return path


def _flow():
    from flows.sync_contacts import sync_contacts

    return sync_contacts


def grouped(**flat):
    """The flow's grouped parameters from the flat names the CLI uses (``source``, ``base_url``, ``dry_run``...)."""
    from apollo_sync.params import flow_parameters, sync_params

    return flow_parameters(sync_params(**flat))


def run(**flat):
    return asyncio.run(_flow()(**grouped(**flat)))


async def _run_state(**flat):
    return await _flow()(**grouped(**flat), return_state=True)


@pytest.fixture
def gateway(sandbox, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    return sandbox


def test_crm_export_lands_every_valid_email_once_labelled(gateway, tmp_path):
    source = crm_export(tmp_path / "export.csv")
    called_at = time.time()
    summary = run(source=str(source), base_url=gateway.gateway_base_url, labels=["X"], chunk_size=100,
                  state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "report"), api_key_block=None)

    stored = gateway.contacts()
    emails = sorted(c["email"] for c in stored)
    assert emails == sorted(f"person{i}@example.com" for i in range(230))
    assert all(c["label_names"] == ["X"] for c in stored)
    assert gateway.stats()["max_contacts_in_request"] == 100
    assert {c["organization_name"] for c in stored} >= {"Acme, Inc. 0"}

    assert summary["rows_read"] == 233
    assert summary["rejected"] == {"invalid_email": 1, "missing_identity": 1}
    assert (summary["rows_valid"], summary["duplicates_in_source"], summary["created"]) == (231, 1, 230)
    assert summary["requests"] == 3
    # started_at is when the run began (UTC); the first request reached the sandbox after it, within the run
    started_at = datetime.fromisoformat(summary["started_at"])
    assert started_at.utcoffset() == timedelta(0) and called_at <= started_at.timestamp()
    first_request = gateway.stats()["first_request_at"] - started_at.timestamp()
    assert 0 <= first_request <= summary["seconds"] and summary["first_request_seconds"] <= summary["seconds"]
    assert gc.get_freeze_count() == 0  # the run gave the objects it froze back
    drops = summary["phones_dropped_by_reason"]  # counted by reason, adding up to the total
    assert set(drops) == {"invalid", "unparseable"} and sum(drops.values()) == summary["phones_dropped"]
    written = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert written == summary
    results = pl.read_parquet(tmp_path / "report" / "results.parquet")
    assert results.height == 233 and results["source_row"].n_unique() == 233
    created_ids = set(results.filter(pl.col("outcome") == "created")["apollo_id"])
    assert created_ids == {c["id"] for c in stored}


def test_rerun_sends_nothing_and_reports_unchanged(gateway, tmp_path):
    source = crm_export(tmp_path / "export.csv", n_unique=30)
    params = dict(source=str(source), base_url=gateway.gateway_base_url, state_dir=str(tmp_path / "state"),
                  api_key_block=None)
    first = run(**params, report_dir=str(tmp_path / "r1"))
    requests_after_first = gateway.stats()["requests"]
    second = run(**params, report_dir=str(tmp_path / "r2"))
    assert first["created"] == 30
    assert gateway.stats()["requests"] == requests_after_first
    assert (second["requests"], second["created"], second["unchanged"]) == (0, 0, 30)


def test_dry_run_needs_no_key_and_sends_nothing(gateway, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_API_KEY)
    source = crm_export(tmp_path / "export.csv", n_unique=12)
    summary = run(source=str(source), base_url=gateway.gateway_base_url, dry_run=True, api_key_block=None,
                  state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "r"))
    assert gateway.stats()["requests"] == 0
    assert summary["would_send"] == 12 and summary["created"] == 0


def test_key_from_secret_block_and_never_logged(sandbox, tmp_path, caplog):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    Secret(value=sandbox.config.api_key).save("apollo-sync-test-key", overwrite=True)
    source = crm_export(tmp_path / "export.csv", n_unique=5)
    with caplog.at_level(logging.DEBUG):
        state = asyncio.run(
            _run_state(
                source=str(source), base_url=sandbox.apollo_base_url, api_key_block="apollo-sync-test-key",
                state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "r"),
            )
        )
    assert state.is_completed() and state.result()["created"] == 5
    APILogWorker.drain_all()

    async def stored_logs():
        async with get_client() as client:
            flow_run_id = state.state_details.flow_run_id
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    messages = [entry.message for entry in asyncio.run(stored_logs())]
    assert any("created" in m for m in messages)  # the run's own log lines were stored: the check below has teeth
    assert not any(sandbox.config.api_key in m for m in messages)
    assert sandbox.config.api_key not in caplog.text
    for path in (tmp_path / "r").iterdir():
        assert sandbox.config.api_key not in path.read_bytes().decode("utf-8", "replace")


def test_wrong_key_stops_the_run_and_reports_every_row(sandbox, tmp_path, monkeypatch):
    from flows.sync_contacts import RunAborted

    monkeypatch.setenv(ENV_API_KEY, "wrong-key-123456")
    source = crm_export(tmp_path / "export.csv", n_unique=250)
    with pytest.raises(RunAborted, match="401"):
        run(source=str(source), base_url=sandbox.gateway_base_url, api_key_block=None, chunk_size=50,
            state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "r"))
    assert sandbox.contacts() == []
    counts = sandbox.stats()["status_counts"]
    assert set(counts) == {"401"} and counts["401"] <= 4  # at most the requests already in flight (concurrency 4)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["failed"] == 250 and summary["created"] == 0
    assert "wrong-key-123456" not in str(summary)


def test_incremental_sql_reads_only_rows_past_the_confirmed_mark(gateway, tmp_path):
    import sqlite3

    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE contacts (id INTEGER, email TEXT, first_name TEXT)")
        conn.executemany("INSERT INTO contacts VALUES (?, ?, ?)", [(i, f"c{i}@x.io", f"C{i}") for i in range(1, 4)])
    conn.close()
    params = dict(source=f"sqlite:///{db}", query="contacts", cursor_column="id", base_url=gateway.gateway_base_url,
                  state_dir=str(tmp_path / "state"), api_key_block=None)
    first = run(**params, report_dir=str(tmp_path / "r1"))
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO contacts VALUES (?, ?, ?)", [(i, f"c{i}@x.io", f"C{i}") for i in (4, 5)])
    conn.close()
    second = run(**params, report_dir=str(tmp_path / "r2"))
    assert (first["rows_read"], first["created"]) == (3, 3)
    assert (second["rows_read"], second["created"], second["unchanged"]) == (2, 2, 0)  # only rows past id 3
    assert sorted(c["email"] for c in gateway.contacts()) == [f"c{i}@x.io" for i in range(1, 6)]


def test_the_task_graph_runs_read_clean_then_plan_and_send_per_part_then_report(gateway, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    source = crm_export(tmp_path / "export.csv", n_unique=30)
    state = asyncio.run(_run_state(source=str(source), base_url=gateway.gateway_base_url, chunk_size=10,
                                   state_dir=str(tmp_path / "state"), api_key_block=None))  # fmt: skip
    assert state.is_completed()

    async def task_runs():
        async with get_client() as client:
            runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=runs_filter, task_run_filter=TaskRunFilter())

    runs = asyncio.run(task_runs())
    by_name = {run.name.rsplit("-", 1)[0]: run for run in runs}
    assert {"read_source", "clean_contacts", "plan_contacts", "send_chunks", "write_report"} <= set(by_name)

    def fed_by(name: str) -> set[str]:
        upstream_ids = {str(ref.id) for refs in by_name[name].task_inputs.values() for ref in refs
                        if getattr(ref, "input_type", None) == "task_run"}  # fmt: skip
        return {n for n, run in by_name.items() if str(run.id) in upstream_ids}

    # The parts reach plan_contacts from the cleaning thread (not as a task result), so no edge is drawn there.
    assert "read_source" in fed_by("clean_contacts")
    assert "plan_contacts" in fed_by("send_chunks")
    assert {"clean_contacts", "send_chunks"} <= fed_by("write_report"), fed_by("write_report")
