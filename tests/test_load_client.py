"""The Apollo client over real sockets (the sandbox) and, for shapes the sandbox cannot give, MockTransport."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from email.utils import formatdate

import httpx
import pytest
from sandbox_fixtures import FakeClock

from apollo_sync.errors import ApolloAPIError, AuthError, ConfigError, InputError, RateLimited, TransportFailure
from apollo_sync.load import ApolloClient, RateInfo, auth_for, parse_retry_after

KEY = "sandbox-key"
SECRET = "sk-live-DO-NOT-LEAK-1234567890"


def run(coro):
    return asyncio.run(coro)


async def create(base_url, contacts, key=KEY, **kw):
    opts = {k: kw.pop(k) for k in ("timeout", "transport", "auth") if k in kw}
    async with ApolloClient(base_url, key, **opts) as client:
        return await client.bulk_create(contacts, labels=kw.get("labels", ()), run_dedupe=kw.get("run_dedupe", False))


def test_auth_follows_the_base_url():
    assert auth_for("https://api.apollo.io/api/v1") == "x-api-key"
    assert auth_for("https://api.apollo.io/api/v1/") == "x-api-key"
    assert auth_for("https://api.aisa.one/apis/v1/apollo") == "bearer"


@pytest.mark.parametrize("way", ["gateway_base_url", "apollo_base_url"])
def test_creates_over_both_ways_in_with_real_arrays_and_labels(sandbox, way):
    contacts = [{"email": "a@example.com", "first_name": "A"}, json.dumps({"email": "b@example.com", "last_name": "B"})]
    answer = run(create(getattr(sandbox, way), contacts, labels=["Q4 import"]))
    assert answer.status == 200
    assert sorted(c["email"] for c in answer.created) == ["a@example.com", "b@example.com"]
    assert answer.existing == []
    stored = sandbox.contacts()
    assert [c["label_names"] for c in stored] == [["Q4 import"], ["Q4 import"]]


def test_dedupe_returns_existing(sandbox):
    run(create(sandbox.gateway_base_url, [{"email": "a@example.com"}]))
    answer = run(create(sandbox.gateway_base_url, [{"email": "A@example.com"}], run_dedupe=True))
    assert answer.created == [] and [c["email"] for c in answer.existing] == ["a@example.com"]
    assert len(sandbox.contacts()) == 1


def test_body_shape_and_auth_headers_sent():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"created_contacts": [], "existing_contacts": []})

    transport = httpx.MockTransport(handler)
    run(create("https://api.apollo.io/api/v1", [{"email": "a@x.io", "label_names": ["x"]}], key=SECRET,
               transport=transport, labels=["L"], run_dedupe=True))
    run(create("https://gw.example/apis/v1/apollo", ['{"email":"b@x.io"}'], key=SECRET, transport=transport))
    run(create("https://api.apollo.io/api/v1", ['{"email":"c@x.io"}'], key=SECRET, transport=transport, auth="bearer"))
    first, second, third = seen
    assert first.url.path == "/api/v1/contacts/bulk_create"
    assert first.headers["x-api-key"] == SECRET and "authorization" not in first.headers
    body = json.loads(first.content)
    assert body == {"contacts": [{"email": "a@x.io", "label_names": ["x"]}], "run_dedupe": True, "append_label_names": ["L"]}
    assert second.headers["authorization"] == f"Bearer {SECRET}" and "x-api-key" not in second.headers
    assert json.loads(second.content) == {"contacts": [{"email": "b@x.io"}], "run_dedupe": False}
    assert third.headers["authorization"] == f"Bearer {SECRET}"


def test_more_than_100_contacts_is_refused_before_sending():
    calls = []
    transport = httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(200, json={}))
    with pytest.raises(InputError, match="at most 100"):
        run(create("https://api.apollo.io/api/v1", [{"email": f"{i}@x.io"} for i in range(101)], transport=transport))
    assert calls == []


def test_missing_key_or_bad_url_is_a_config_error():
    with pytest.raises(ConfigError):
        ApolloClient("https://api.apollo.io/api/v1", "")
    with pytest.raises(ConfigError):
        ApolloClient("api.apollo.io/api/v1", KEY)


@pytest.mark.parametrize("way,message", [("gateway_base_url", "Invalid access credentials."), ("apollo_base_url", "Invalid access credentials.")])
def test_wrong_key_is_auth_error_in_either_shape(sandbox, way, message):
    with pytest.raises(AuthError) as info:
        run(create(getattr(sandbox, way), [{"email": "a@x.io"}], key="wrong-key"))
    assert info.value.status == 401 and info.value.message == message
    if way == "gateway_base_url":
        assert info.value.request_id and info.value.request_id.startswith("req_")
    assert sandbox.contacts() == []


def test_422_carries_the_api_message(sandbox):
    with pytest.raises(ApolloAPIError) as info:
        run(create(sandbox.gateway_base_url, [{"email": 5}]))
    assert info.value.status == 422 and "email must be a string" in info.value.message


def test_403_and_non_json_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("x-api-key") == "scoped":
            return httpx.Response(403, json={"status": 403, "message": "plan does not allow this"})
        return httpx.Response(502, text="<html>Bad gateway</html>")

    transport = httpx.MockTransport(handler)
    with pytest.raises(AuthError, match="plan does not allow this"):
        run(create("https://api.apollo.io/api/v1", [{"email": "a@x.io"}], key="scoped", transport=transport))
    with pytest.raises(ApolloAPIError) as info:
        run(create("https://api.apollo.io/api/v1", [{"email": "a@x.io"}], transport=transport))
    assert info.value.status == 502 and "Bad gateway" in info.value.message


def test_429_is_rate_limited_with_retry_after_and_windows(sandbox_factory):
    # The sandbox's minute windows are aligned to its clock: 1_700_000_000 is 20 s into one, 40 s before the next.
    clock = FakeClock(1_700_000_000.0)
    sb = sandbox_factory(rate=1, window=60, clock=clock)
    run(create(sb.gateway_base_url, [{"email": "a@x.io"}]))
    clock.advance(10.5)
    with pytest.raises(RateLimited) as info:
        run(create(sb.gateway_base_url, [{"email": "b@x.io"}]))
    assert info.value.status == 429 and info.value.retry_after == 30  # whole seconds, rounded up from 29.5
    (window,) = info.value.rate.windows
    assert window.name == "gateway" and window.limit == 1 and window.remaining == 0
    assert window.reset_after == pytest.approx(29.5)
    with pytest.raises(RateLimited) as info:
        run(create(sb.apollo_base_url, [{"email": "c@x.io"}]))
    assert "minute" in info.value.message
    assert {w.name: w.remaining for w in info.value.rate.windows} == {"minute": 0}


def test_apollo_rate_headers_from_the_sandbox(sandbox_factory):
    sb = sandbox_factory(rate=200, window=60, hourly_limit=400)
    answer = run(create(sb.apollo_base_url, [{"email": "a@x.io"}]))
    windows = {w.name: w for w in answer.rate.windows}
    assert (windows["minute"].limit, windows["minute"].remaining, windows["minute"].length) == (200, 199, 60.0)
    assert (windows["hourly"].limit, windows["hourly"].remaining, windows["hourly"].length) == (400, 399, 3600.0)
    assert windows["minute"].reset_after is None


def test_rate_info_parses_both_families_and_reset_forms():
    now = 1_700_000_000.0
    gw = RateInfo.from_headers({"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "12.5"}, now=now)
    assert gw.windows[0].reset_after == 12.5 and gw.windows[0].remaining == 7
    epoch = RateInfo.from_headers({"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(now + 30.25)}, now=now)
    assert epoch.windows[0].reset_after == pytest.approx(30.25)
    ap = RateInfo.from_headers({"x-rate-limit-daily": "2000", "x-daily-usage": "1500"}, now=now)
    assert ap.windows[0].name == "daily" and ap.windows[0].remaining == 500
    assert RateInfo.from_headers({"Retry-After": "2"}).retry_after == 2.0
    assert RateInfo.from_headers({"X-RateLimit-Remaining": "nonsense"}).windows == ()
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now=now) == pytest.approx(90, abs=1)
    assert parse_retry_after("soon") is None


def test_dropped_connection_may_have_landed(sandbox_factory):
    sb = sandbox_factory(drop=1.0)
    with pytest.raises(TransportFailure) as info:
        run(create(sb.gateway_base_url, [{"email": "a@x.io"}]))
    assert info.value.kind == "connection" and info.value.maybe_landed


def test_slow_answer_is_a_timeout_that_may_have_landed(sandbox_factory):
    sb = sandbox_factory(slow=1.0, slow_seconds=0.6)
    with pytest.raises(TransportFailure) as info:
        run(create(sb.gateway_base_url, [{"email": "a@x.io"}], timeout=0.2))
    assert info.value.kind == "timeout" and info.value.maybe_landed


def test_refused_connection_did_not_land():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportFailure) as info:
        run(create(f"http://127.0.0.1:{port}/api/v1", [{"email": "a@x.io"}]))
    assert not info.value.maybe_landed


def test_unreadable_success_body_is_unknown_outcome():
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text="not json"))
    with pytest.raises(TransportFailure) as info:
        run(create("https://api.apollo.io/api/v1", [{"email": "a@x.io"}], transport=transport))
    assert info.value.kind == "bad_answer" and info.value.maybe_landed


def test_the_key_never_shows(sandbox_factory, caplog):
    """Force every kind of error with a secret key; the key is in no message, repr or log line."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def echo(request: httpx.Request) -> httpx.Response:  # a server that echoes the auth header back
        return httpx.Response(400, json={"error": {"message": f"bad header {request.headers.get('authorization')}"}})

    client = ApolloClient("https://gw.example/apis/v1/apollo", SECRET, transport=httpx.MockTransport(echo))
    texts += [repr(client), str(vars(client).get("auth"))]
    cases = [
        dict(base="https://gw.example/apis/v1/apollo", transport=httpx.MockTransport(echo)),
        dict(base=sandbox_factory().gateway_base_url),  # 401: wrong key
        dict(base=sandbox_factory().apollo_base_url),
        dict(base=sandbox_factory(drop=1.0).gateway_base_url),
        dict(base=sandbox_factory(slow=1.0, slow_seconds=0.5).gateway_base_url, timeout=0.1),
    ]
    for case in cases:
        with pytest.raises(Exception) as info:
            run(create(case["base"], [{"email": "a@x.io"}], key=SECRET, **{k: v for k, v in case.items() if k != "base"}))
        texts += [str(info.value), repr(info.value), repr(info.value.args)]
    texts += [r.getMessage() for r in caplog.records]
    assert len(texts) > 10
    assert not [t for t in texts if SECRET in t]
    assert any("***" in t for t in texts)  # the echoed key was scrubbed, not just absent
