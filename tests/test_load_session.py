"""The loader against the sandbox: chunks, outcomes, retries with forced dedupe, bisection, auth stop, the ledger."""

from __future__ import annotations

import asyncio
import json

import httpx
import polars as pl
import pytest
from loader_helpers import RecordingSleep, SteppingClock, make_contacts, plan_and_load, stored_emails, wait_until

from apollo_sync.errors import AuthError, InputError, Unreachable
from apollo_sync.ledger import open_ledger, target_for
from apollo_sync.load import OUTCOMES_SCHEMA, ApolloClient, LoadConfig, LoadSession, Pacer, RetryPolicy


def run(coro):
    return asyncio.run(coro)


def test_loads_every_row_once_in_chunks_of_at_most_chunk_size(sandbox, tmp_path):
    contacts = make_contacts(250)
    result, session, _ = run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path, labels=["Q4"], chunk_size=100))
    assert result.outcomes.schema == pl.Schema(OUTCOMES_SCHEMA)
    assert sorted(result.outcomes["source_row"].to_list()) == list(range(1, 251))
    assert set(result.outcomes["outcome"]) == {"created"}
    assert result.outcomes["apollo_id"].null_count() == 0
    assert sorted(stored_emails(sandbox)) == sorted(contacts["email"])
    stats = sandbox.stats()
    assert stats["requests"] == 3 and stats["max_contacts_in_request"] == 100
    assert all(c["label_names"] == ["Q4"] for c in sandbox.contacts())
    assert session.stats.chunks == 3 and session.stats.created == 250 and session.stats.requests == 3
    # Each row's Apollo id is the stored contact's id for that email.
    ids = {c["email"]: c["id"] for c in sandbox.contacts()}
    assert all(ids[e] == i for e, i in zip(result.outcomes["email"], result.outcomes["apollo_id"]))


def test_a_second_run_with_the_same_ledger_sends_nothing(sandbox, tmp_path):
    contacts = make_contacts(120)
    run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path))
    result, session, unchanged = run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path))
    assert session.stats.requests == 0 and result.outcomes.height == 0 and unchanged.height == 120
    assert sandbox.stats()["requests"] == 2
    # Changed content goes again, with dedupe, and does not duplicate.
    changed = make_contacts(120, title="Director")
    result, session, unchanged = run(plan_and_load(sandbox.gateway_base_url, changed, tmp_path, run_dedupe=False))
    assert set(result.outcomes["outcome"]) == {"existing"} and unchanged.height == 0
    assert session.stats.dedupe_forced == session.stats.requests == 2
    assert len(stored_emails(sandbox)) == 120


def test_full_refresh_sends_again_without_duplicates(sandbox, tmp_path):
    contacts = make_contacts(30)
    run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path))
    result, _, _ = run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path, full_refresh=True, run_dedupe=False))
    assert set(result.outcomes["outcome"]) == {"existing"}
    assert len(stored_emails(sandbox)) == 30


def test_unknown_outcome_retries_with_dedupe_even_when_the_user_turned_it_off(sandbox_factory, tmp_path):
    sb = sandbox_factory(fail_after_store=1.0)  # every request stores, then answers 500
    naps = RecordingSleep()
    result, session, _ = run(plan_and_load(sb.gateway_base_url, make_contacts(150), tmp_path, run_dedupe=False,
                                           max_attempts=3, jitter=lambda: 1.0, sleep=naps))
    assert set(result.outcomes["outcome"]) == {"unconfirmed"}
    assert result.outcomes["reason"].str.contains("500").all()
    assert sorted(stored_emails(sb)) == sorted(make_contacts(150)["email"])  # stored once despite 3 attempts
    assert session.stats.requests == 6 and session.stats.retries == 4 and session.stats.dedupe_forced == 4
    # Two backoffs per chunk (the jitter at its top: 0.5 s, then 1 s), waited through the session's sleep; none
    # after the last attempt.
    assert sorted(naps.waits) == [0.5, 0.5, 1.0, 1.0]
    assert open_ledger(tmp_path).status_counts(target_for(sb.gateway_base_url)) == {"pending": 150}


def test_unconfirmed_rows_land_exactly_once_on_the_next_run(sandbox_factory, tmp_path):
    sb = sandbox_factory(fail_after_store=0.5, seed=3)  # half the requests store, then answer 500
    contacts = make_contacts(100)
    first, _, _ = run(plan_and_load(sb.gateway_base_url, contacts, tmp_path, run_dedupe=False, chunk_size=10, max_attempts=1))
    unconfirmed = first.outcomes.filter(pl.col("outcome") == "unconfirmed")["source_row"].to_list()
    assert 0 < len(unconfirmed) < 100
    assert len(stored_emails(sb)) == 100  # stored, but the answers said 500
    second, session, unchanged = run(plan_and_load(sb.gateway_base_url, contacts, tmp_path, run_dedupe=False, chunk_size=10, sleep=RecordingSleep()))
    assert sorted(second.outcomes["source_row"].to_list()) == unconfirmed  # only what was not confirmed
    assert set(second.outcomes["outcome"]) == {"existing"} and unchanged.height == 100 - len(unconfirmed)
    assert session.stats.dedupe_forced == session.stats.requests  # pending rows always go with dedupe
    assert sorted(stored_emails(sb)) == sorted(contacts["email"])


def test_422_bisects_to_the_offending_rows_and_the_rest_land(sandbox, tmp_path):
    contacts = make_contacts(100, bad_rows=(17, 64))
    result, session, _ = run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path))
    failed = result.outcomes.filter(pl.col("outcome") == "failed")
    assert failed["source_row"].to_list() == [17, 64]
    assert failed["reason"].str.contains("422").all() and failed["reason"].str.contains("must be a string").all()
    assert result.outcomes.filter(pl.col("outcome") == "created").height == 98
    assert len(stored_emails(sandbox)) == 98
    assert session.stats.bisections >= 2 and session.stats.failed == 2
    counts = open_ledger(tmp_path).status_counts(target_for(sandbox.gateway_base_url))
    assert counts == {"created": 98, "failed": 2}


def test_401_stops_at_once_with_an_outcome_for_every_row(sandbox, tmp_path):
    contacts = make_contacts(1000)
    result, session, _ = run(plan_and_load(sandbox.gateway_base_url, contacts, tmp_path, key="wrong", concurrency=3))
    assert isinstance(result.stopped, AuthError) and session.stopped is result.stopped
    assert sandbox.stats()["requests"] <= 3  # the first wave only; no chunk after it
    outcomes = result.outcomes
    assert sorted(outcomes["source_row"].to_list()) == list(range(1, 1001))
    assert set(outcomes["outcome"]) == {"failed"}
    assert outcomes["reason"].str.contains("not sent").all()
    assert sandbox.contacts() == []
    # The group was claimed before its first request; every row of it ends failed in the ledger, none pending.
    counts = open_ledger(tmp_path).status_counts(target_for(sandbox.gateway_base_url))
    assert counts == {"failed": 1000}


def test_after_an_auth_error_later_calls_send_nothing(sandbox):
    async def scenario():
        async with ApolloClient(sandbox.gateway_base_url, "wrong") as client:
            session = LoadSession(client, Pacer(), None, LoadConfig("t", chunk_size=10, concurrency=1))
            chunks = session.make_chunks(make_contacts(30))
            first = await session.load(chunks[:1])
            assert isinstance(first.stopped, AuthError)
            again = await session.load(chunks[1:])
            assert again.stopped is first.stopped
            return session, again

    session, result = run(scenario())
    assert sandbox.stats()["requests"] == 1 and session.stats.requests == 1
    assert result.outcomes["source_row"].to_list() == list(range(11, 31)) and set(result.outcomes["outcome"]) == {"failed"}


def test_refused_connection_fails_rows_as_not_landed(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/apis/v1/apollo"
    naps = RecordingSleep()
    result, _, _ = run(plan_and_load(url, make_contacts(30), tmp_path, max_attempts=2, chunk_size=10, concurrency=1,
                                     jitter=lambda: 0.0, sleep=naps))
    assert isinstance(result.stopped, Unreachable)
    outcomes = result.outcomes.sort("source_row")
    assert outcomes["source_row"].to_list() == list(range(1, 31)) and set(outcomes["outcome"]) == {"failed"}
    # The first chunk used its two attempts; then the session stopped instead of trying the next chunks.
    assert outcomes.head(10)["reason"].str.contains("gave up after 2 attempts").all()
    assert outcomes.tail(20)["reason"].str.contains("not sent").all()
    assert "cannot reach the API" in str(result.stopped)
    assert naps.waits == [0.25]  # one backoff between the two attempts (never landed: no settle wait)


def test_429_waits_and_retries_within_the_budget(sandbox_factory, tmp_path):
    clock = SteppingClock()
    sb = sandbox_factory(burst_429=0.3, seed=2, clock=clock)  # seed 2, one request at a time: two 429s
    contacts = make_contacts(300)
    naps = RecordingSleep()
    result, session, _ = run(plan_and_load(sb.gateway_base_url, contacts, tmp_path, chunk_size=50, concurrency=1,
                                           pacer=clock.pacer(), sleep=naps))
    assert set(result.outcomes["outcome"]) == {"created"}
    assert session.stats.http_429 == sb.stats()["status_counts"]["429"] == 2
    assert session.stats.requests == 8 and session.stats.retries == 2
    # Each 429's Retry-After (1 s) was waited out by the pacer, before the retry; the session itself never waited.
    assert clock.sleeps == [1.0, 1.0] and session.pacer.waited_seconds == 2.0 and naps.waits == []
    assert len(stored_emails(sb)) == 300


def test_hooks_are_called_and_stats_accumulate_over_calls(sandbox, tmp_path):
    done, before = [], []

    async def before_request():
        before.append(1)

    async def scenario():
        ledger = open_ledger(tmp_path)
        target = target_for(sandbox.gateway_base_url)
        async with ApolloClient(sandbox.gateway_base_url, "sandbox-key") as client:
            session = LoadSession(client, Pacer(), ledger, LoadConfig(target, run_id="r", chunk_size=10),
                                  before_request=before_request, on_chunk_done=done.append)
            to_send, _ = ledger.plan(target, make_contacts(45))
            chunks = session.make_chunks(to_send)
            first = await session.load(chunks[:2])
            second = await session.load(chunks[2:])
        return session, first, second, chunks

    session, first, second, chunks = run(scenario())
    assert [len(c) for c in chunks] == [10, 10, 10, 10, 5]
    assert first.stats.requests == 2 and second.stats.requests == 3 and session.stats.requests == 5
    assert len(before) == 5 and sorted(r.chunk for r in done) == [c.number for c in chunks]
    assert sum(r.rows for r in done) == 45


def test_must_dedupe_rows_are_chunked_apart_and_sent_with_dedupe():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"created_contacts": [json.loads(json.dumps(c)) | {"id": c["email"]} for c in body["contacts"]]})

    contacts = make_contacts(6).with_columns(must_dedupe=pl.Series([False, True, False, True, True, False]))

    async def scenario():
        async with ApolloClient("https://gw.test/apis/v1/apollo", "k", transport=httpx.MockTransport(handler)) as client:
            session = LoadSession(client, Pacer(), None, LoadConfig("t", run_dedupe=False, chunk_size=2))
            chunks = session.make_chunks(contacts)
            return chunks, await session.load(chunks)

    chunks, result = run(scenario())
    assert [(c.must_dedupe, c.rows["source_row"].to_list()) for c in chunks] == [
        (False, [1, 3]), (False, [6]), (True, [2, 4]), (True, [5])]
    flags = {tuple(c["email"] for c in body["contacts"]): body["run_dedupe"] for body in seen}
    assert flags == {("u1@example.com", "u3@example.com"): False, ("u6@example.com",): False,
                     ("u2@example.com", "u4@example.com"): True, ("u5@example.com",): True}
    assert sorted(result.outcomes["source_row"].to_list()) == [1, 2, 3, 4, 5, 6]
    assert result.stats.unmatched_returned == 0


def test_a_row_missing_from_the_answer_is_unconfirmed_and_stays_pending(tmp_path):
    """The API answers 200 but leaves one contact out and returns a stranger: never silently dropped."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)["contacts"]
        answer = [{"id": f"id-{c['email']}", "email": c["email"]} for c in sent[1:]] + [{"id": "x", "email": "who@else.io"}]
        return httpx.Response(200, json={"created_contacts": answer, "existing_contacts": []})

    async def scenario():
        ledger = open_ledger(tmp_path)
        async with ApolloClient("https://gw.test/apis/v1/apollo", "k", transport=httpx.MockTransport(handler)) as client:
            session = LoadSession(client, Pacer(), ledger, LoadConfig("t", chunk_size=3))
            result = await session.load(session.make_chunks(make_contacts(6)))
        return session, result, ledger.status_counts("t")

    session, result, counts = run(scenario())
    by_row = dict(zip(result.outcomes["source_row"], result.outcomes["outcome"]))
    assert by_row == {1: "unconfirmed", 2: "created", 3: "created", 4: "unconfirmed", 5: "created", 6: "created"}
    assert session.stats.unmatched_returned == 2 and session.stats.unconfirmed == 2
    assert counts == {"pending": 2, "created": 4}


def test_bad_settings_and_missing_columns_are_input_errors():
    async def scenario():
        async with ApolloClient("https://gw.test/apis/v1/apollo", "k") as client:
            with pytest.raises(InputError, match="chunk size"):
                LoadSession(client, Pacer(), None, LoadConfig("t", chunk_size=101))
            with pytest.raises(InputError, match="concurrency must be at least 1"):
                LoadSession(client, Pacer(), None, LoadConfig("t", concurrency=0))
            with pytest.raises(InputError, match="max attempts must be at least 1"):
                LoadSession(client, Pacer(), None, LoadConfig("t"), policy=RetryPolicy(max_attempts=0))
            session = LoadSession(client, Pacer(), None, LoadConfig("t"))
            with pytest.raises(InputError, match="payload"):
                session.make_chunks(pl.DataFrame({"source_row": [1], "identity": ["x"]}))

    run(scenario())


def answers_200(sandbox) -> int:
    return sandbox.stats()["status_counts"].get("200", 0)


@pytest.mark.parametrize("settle,duplicates", [(0.0, True), (0.6, False)])
def test_after_a_timeout_the_retry_waits_for_the_first_request_to_settle(sandbox_factory, settle, duplicates):
    """A timed-out request without dedupe may still be stored later; retrying too soon would duplicate it.

    Real sockets and a real client timeout (a fake clock cannot time out a socket), but no wall-clock guess for
    the wait: the session's sleep is a fake. With a settle wait, the fake returns only once the sandbox has stored
    the slow request (its late 200 is counted), so the retry's dedupe must find it. Without one, the retry goes
    out at once, 0.4 s after the slow request came; the sandbox stores that one 1.6 s after it came.
    """
    # Seed 13: the first request is slow (stored slow_seconds after it came, past the 0.4 s client timeout), the
    # retry is not, whether it comes before the slow request is stored or after (storing draws ids from the same
    # random stream as the faults).
    sb = sandbox_factory(slow=0.5, slow_seconds=0.8 if settle else 1.6, seed=13, shuffle=False)

    async def until_the_slow_request_is_stored(seconds: float) -> None:
        if settle and seconds >= settle:
            await wait_until(lambda: answers_200(sb) >= 1)

    naps = RecordingSleep(until_the_slow_request_is_stored)
    result, session, _ = run(plan_and_load(sb.gateway_base_url, make_contacts(5), None, timeout=0.4, run_dedupe=False,
                                           settle_seconds=settle, sleep=naps))
    stats = session.stats
    assert stats.timeouts >= 1 and stats.requests == stats.timeouts + 1
    assert stats.dedupe_forced == stats.timeouts  # every retry went with dedupe
    # The wait after the first attempt (sent without dedupe) is at least the settle time. A retry that timed out
    # too on a busy machine was sent with dedupe, so its own wait is only a backoff.
    assert len(naps.waits) == stats.timeouts and naps.waits[0] >= settle
    run(wait_until(lambda: answers_200(sb) == stats.requests))  # every attempt stored in the end
    assert (len(stored_emails(sb)) > 5) == duplicates
    # Without the settle wait the first retry created the contacts (a third attempt, if that retry timed out
    # too, found them); with it, the retry found what the slow request stored.
    first_retry_answered = stats.timeouts == 1
    assert set(result.outcomes["outcome"]) == ({"created"} if duplicates and first_retry_answered else {"existing"})
    if not duplicates:
        assert result.outcomes["reason"].str.contains("matched on a retry").all()


def test_a_chunk_whose_body_would_be_too_large_is_split_before_anything_is_sent(sandbox, monkeypatch):
    from apollo_sync import settings

    monkeypatch.setattr(settings, "MAX_REQUEST_BYTES", 2_000)  # a few contacts' worth
    frame = make_contacts(40)

    async def go():
        async with ApolloClient(sandbox.gateway_base_url, sandbox.config.api_key) as client:
            session = LoadSession(client, Pacer(), None, LoadConfig(target="t", chunk_size=40))
            return await session.load(session.make_chunks(frame)), session

    result, session = asyncio.run(go())
    assert set(result.outcomes["outcome"]) == {"created"} and result.outcomes.height == 40
    assert sandbox.stats()["requests"] == session.stats.requests > 1  # split, not one 40-contact request
    assert sandbox.stats()["max_contacts_in_request"] < 40
