"""tasks/artifacts.py: the pure rendering without a server, then the real artifacts, event and lineage on the harness."""

from __future__ import annotations

import asyncio
import json

import polars as pl
import pytest

from apollo_sync.redact import redact_url

from tasks import artifacts

SUMMARY = {
    "rows_read": 12, "rows_valid": 9, "rejected": {"missing_identity": 1, "invalid_email": 2},
    "duplicates_in_source": 1, "created": 5, "existing": 1, "failed": 1, "unconfirmed": 1, "unchanged": 0,
    "requests": 2, "retries": 3, "seconds": 2.0,
}  # fmt: skip
KEY = "sk-artifact-test-0123456789"


def test_uris_lose_credentials_query_and_fragment():
    assert redact_url("postgresql://crm:pw@db.local:5432/crm?sslmode=require") == "postgresql://db.local:5432/crm"
    assert redact_url(f"https://h.test/apis/v1/apollo?api_key={KEY}#x") == "https://h.test/apis/v1/apollo"
    assert redact_url("data/contacts.csv") == "data/contacts.csv"


def test_asset_keys_are_valid_prefect_asset_keys():
    from prefect.assets import Asset

    keys = [
        artifacts.asset_key("data/my contacts [2026].csv"),
        artifacts.asset_key("s3://bucket/exports/a&b.csv?versionId=3"),
        artifacts.asset_key("postgresql://u:pw@db/crm"),
        artifacts.contacts_asset_key("http://127.0.0.1:9/apis/v1/apollo/"),
    ]
    for key in keys:
        assert Asset(key=key).key == key  # the validator accepts it unchanged
    assert keys[0].startswith("file:///") and keys[0].endswith("/data/my-contacts--2026-.csv")
    assert keys[2] == "postgresql://db/crm"
    assert keys[3] == "http://127.0.0.1:9/apis/v1/apollo/contacts"


def test_summary_markdown_has_every_count_and_the_rates():
    md = artifacts.summary_markdown(SUMMARY, source_uri="postgresql://u:pw@db/crm", target_url="https://h.test/apis/v1/apollo")
    for line in ("| created | 5 |", "| existing | 1 |", "| failed | 1 |", "| unconfirmed | 1 |", "| unchanged | 0 |",
                 "| rejected | 3 |", "| duplicate in source | 1 |", "| invalid_email | 2 |", "| missing_identity | 1 |"):
        assert line in md
    assert "| 2 | 3 | 2.0 s | 6.0/s | 4.0/s |" in md  # requests, retries, duration, rows read/s, contacts sent/s
    assert "pw" not in md and "`postgresql://db/crm`" in md


def test_event_payload_counts_rejects_by_reason_and_in_total():
    payload = artifacts.event_payload(SUMMARY)
    assert payload["rejected"] == 3 and payload["rejected_by_reason"] == {"invalid_email": 2, "missing_identity": 1}
    assert (payload["failed"], payload["unconfirmed"], payload["requests"], payload["retries"]) == (1, 1, 2, 3)
    json.dumps(payload)  # an event payload must be JSON


def test_problem_rows_are_the_first_100_in_source_order_without_raw_data():
    problems = pl.DataFrame({
        "source_row": list(range(150, 0, -1)),
        "email": [f"p{i}@x.test" for i in range(150, 0, -1)],
        "outcome": ["failed"] * 150,
        "reason": ["422 from Apollo"] * 150,
        "original": ['{"secret": "row data"}'] * 150,
    })  # fmt: skip
    rows = artifacts.problem_rows(problems)
    assert len(rows) == 100
    assert [r["source_row"] for r in rows] == list(range(1, 101))
    assert set(rows[0]) == {"source_row", "email", "outcome", "reason"}

    rejected = pl.DataFrame({"source_row": [2], "reason": ["missing_identity"]})  # Prepared.rejected without email
    assert artifacts.problem_rows(rejected) == [
        {"source_row": 2, "email": None, "outcome": "rejected", "reason": "missing_identity"}
    ]


def test_percent_done_is_bounded_and_empty_runs_are_complete():
    assert artifacts.percent_done(0, 0) == 100.0
    assert artifacts.percent_done(50, 200) == 25.0
    assert artifacts.percent_done(500, 200) == 100.0


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_a_run_publishes_progress_summary_problems_event_and_lineage():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    problems = pl.DataFrame({"source_row": [7, 3], "email": ["x@y.test", None], "outcome": ["failed", "rejected"],
                             "reason": ["422 from Apollo", "missing_identity"]})  # fmt: skip

    @flow(name="artifacts-probe")
    async def probe() -> int:
        handle = await artifacts.start_progress(400)
        # deltas per chunk, as the loader's on_chunk_done reports them: 200 rows in all
        await asyncio.gather(*(artifacts.add_progress(handle, 100) for _ in range(2)))
        assert handle.done_rows == 200
        # concurrent, out of order, cumulative: the highest count wins and small steps cost no call
        await asyncio.gather(*(artifacts.advance_progress(handle, n) for n in (100, 201, 300, 202, 400, 200)))
        await artifacts.publish_run(SUMMARY, problems, source_uri="data/in.csv",
                                    target_url=f"http://127.0.0.1:9/apis/v1/apollo?key={KEY}")
        return handle.updates

    async def check():
        state = await probe(return_state=True)
        assert state.is_completed()
        assert 2 <= await state.result() <= 4  # 25 %, 50 %, maybe 75 %, 100 %: never one call per report
        run_id = state.state_details.flow_run_id
        async with get_client() as client:
            found = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            by_key = {a.key: a for a in found}
            events = []
            for _ in range(50):  # events are written asynchronously by the server
                page = await client.read_events(
                    EventFilter(
                        event=EventNameFilter(name=[artifacts.RUN_COMPLETED_EVENT, "prefect.asset.materialization.succeeded"]),
                        related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]),
                    ),
                    limit=50,
                )
                events = page.events
                if len(events) == 2:
                    break
                await asyncio.sleep(0.2)
        return by_key, events

    by_key, events = asyncio.run(check())
    assert {artifacts.PROGRESS_KEY, artifacts.SUMMARY_KEY, artifacts.PROBLEMS_KEY} <= set(by_key)
    assert float(by_key[artifacts.PROGRESS_KEY].data) == 100.0
    assert "| created | 5 |" in by_key[artifacts.SUMMARY_KEY].data
    table = json.loads(by_key[artifacts.PROBLEMS_KEY].data)
    assert [r["source_row"] for r in table] == [3, 7]
    for artifact in by_key.values():
        assert KEY not in str(artifact.data) and KEY not in str(artifact.description)

    by_name = {e.event: e for e in events}
    run_event = by_name[artifacts.RUN_COMPLETED_EVENT]
    assert run_event.payload["failed"] == 1 and run_event.payload["rejected"] == 3
    assert run_event.resource["apollo-sync.has-failures"] == "true"
    lineage = by_name["prefect.asset.materialization.succeeded"]
    assert lineage.resource.id == "http://127.0.0.1:9/apis/v1/apollo/contacts"
    assert artifacts.asset_key("data/in.csv") in {r.id for r in lineage.related}
    assert KEY not in run_event.model_dump_json() and KEY not in lineage.model_dump_json()


def test_progress_without_an_artifact_counts_but_calls_nothing():
    handle = artifacts.ProgressHandle(artifact_id=None, total_rows=10)
    asyncio.run(artifacts.add_progress(handle, 3))
    asyncio.run(artifacts.advance_progress(handle, 2))  # an older cumulative count does not move it back
    assert (handle.done_rows, handle.updates, handle.shown_percent) == (3, 0, 0.0)
