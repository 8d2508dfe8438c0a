"""The sandbox server over real sockets: both ways in, auth, validation, dedupe, rate windows, faults, admin; at
the end, only loopback Host headers answered (a DNS-rebinding defence) and the key from ``APOLLO_SANDBOX_KEY``.

Fixtures ``sandbox`` and ``sandbox_factory`` come from tests/sandbox_fixtures.py via conftest. Rate windows run on
a ``FakeClock`` the test advances; one test checks that the default clock is the wall clock.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from apollo_sync.errors import InputError
from apollo_sync.sandbox import SandboxConfig, SandboxProcess, SandboxServer, config_to_argv, serve_forever
from apollo_sync.sandbox.endpoint import names_loopback
from apollo_sync.sandbox.process import build_parser, config_from_args
from apollo_sync.settings import ENV_SANDBOX_KEY
from sandbox_fixtures import KEY, FakeClock, apollo, gateway, wait_for

BULK = "/contacts/bulk_create"
RESPONSE_FIELDS = {"id", "phone_numbers", "label_names", "typed_custom_fields", "created_at", "updated_at"}
"""In every contact answered; besides, each field the contact holds (a diff against Apollo's copy needs them all)."""


def post(client: httpx.Client, contacts, **body) -> httpx.Response:
    return client.post(BULK, json={"contacts": contacts, **body})


# --- both ways in ------------------------------------------------------------------------------


def test_gateway_creates_contact_with_documented_shape(sandbox):
    contact = {
        "first_name": "Tim", "last_name": "Zheng", "email": "tim@example.com", "organization_name": "Apollo",
        "title": "Analyst", "mobile_phone": "+1 555 0100", "direct_phone": "+1 555 0101",
        "typed_custom_fields": {"cf_1": "x"}, "website_url": "https://apollo.io",
    }  # fmt: skip
    with gateway(sandbox) as c:
        r = post(c, [contact])
    assert r.status_code == 200
    body = r.json()
    assert body["existing_contacts"] == []
    [created] = body["created_contacts"]
    assert set(created) == RESPONSE_FIELDS | set(contact)
    assert len(created["id"]) == 24 and all(ch in "0123456789abcdef" for ch in created["id"])
    assert created["email"] == "tim@example.com" and created["title"] == "Analyst"
    assert created["phone_numbers"] == [{"raw_number": "+1 555 0101"}, {"raw_number": "+1 555 0100"}]
    assert created["typed_custom_fields"] == {"cf_1": "x"}
    [stored] = sandbox.contacts()
    assert stored["id"] == created["id"] and stored["website_url"] == "https://apollo.io"
    assert stored["created_at"].endswith("Z") and stored["updated_at"] == created["updated_at"]


@pytest.mark.parametrize("headers", [{"X-Api-Key": KEY}, {"Authorization": f"Bearer {KEY}"}])
def test_apollo_path_accepts_x_api_key_and_bearer(sandbox, headers):
    with httpx.Client(base_url=sandbox.apollo_base_url, headers=headers) as c:
        r = post(c, [{"email": "a@example.com"}])
    assert r.status_code == 200
    assert [x["email"] for x in r.json()["created_contacts"]] == ["a@example.com"]


def test_gateway_rejects_x_api_key(sandbox):
    with httpx.Client(base_url=sandbox.gateway_base_url, headers={"X-Api-Key": KEY}) as c:
        assert post(c, [{"email": "a@example.com"}]).status_code == 401
    assert sandbox.contacts() == []


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_401_in_each_error_shape(sandbox, key):
    with gateway(sandbox, key) as g, apollo(sandbox, key) as a:
        rg = post(g, [{"email": "a@example.com"}])
        ra = post(a, [{"email": "a@example.com"}])
    assert rg.status_code == 401
    err = rg.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] and err["message"]
    assert err["request_id"].startswith("req_")
    assert ra.status_code == 401
    assert ra.json() == {"status": 401, "message": "Invalid access credentials."}
    assert sandbox.contacts() == []
    assert sandbox.stats()["status_counts"] == {"401": 2}


def test_unknown_path_404_in_family_shape_and_connection_stays_usable(sandbox):
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg = g.post("/contacts/nope", json={"contacts": []})
        ra = a.post("/people/search", json={"q": 1})
        again = post(a, [{"email": "a@example.com"}])  # same keep-alive connection, body was consumed
    assert rg.status_code == 404 and rg.json()["error"]["type"] == "not_found_error"
    assert ra.status_code == 404 and ra.json()["status"] == 404
    assert again.status_code == 200


# --- validation ----------------------------------------------------------------------------------


def test_more_than_100_contacts_is_422(sandbox):
    contacts = [{"email": f"u{i}@example.com"} for i in range(101)]
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg, ra = post(g, contacts), post(a, contacts)
        ok = post(g, contacts[:100])
    assert rg.status_code == 422 and "at most 100 contacts" in rg.json()["error"]["message"]
    assert rg.json()["error"]["type"] == "invalid_request_error"
    assert ra.status_code == 422 and "at most 100 contacts" in ra.json()["message"]
    assert ok.status_code == 200 and len(ok.json()["created_contacts"]) == 100
    assert len(sandbox.contacts()) == 100
    assert sandbox.stats()["max_contacts_in_request"] == 101


def test_malformed_json_is_422(sandbox):
    with apollo(sandbox) as a:
        r = a.post(BULK, content=b'{"contacts": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "request body"),
        ({"contacts": "x"}, "contacts"),
        ({"contacts": []}, "contacts"),
        ({"contacts": [{"email": "a@example.com"}, "b@example.com"]}, "contacts[1]"),
        ({"contacts": [{"email": 5}]}, "contacts[0].email"),
        ({"contacts": [{"email": "a@example.com", "label_names": "VIP"}]}, "contacts[0].label_names"),
        ({"contacts": [{"email": "a@example.com", "label_names": ["ok", 3]}]}, "contacts[0].label_names"),
        ({"contacts": [{"email": "a@example.com", "typed_custom_fields": [1]}]}, "contacts[0].typed_custom_fields"),
        ({"contacts": [{"email": "a@example.com"}], "append_label_names": "Q4"}, "append_label_names"),
        ({"contacts": [{"email": "a@example.com"}], "run_dedupe": "yes"}, "run_dedupe"),
    ],
)
def test_wrong_types_are_422_naming_the_field(sandbox, body, field):
    with gateway(sandbox) as g:
        r = g.post(BULK, json=body)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith(field)
    assert sandbox.contacts() == []


def test_unknown_fields_are_ignored_not_stored(sandbox):
    with gateway(sandbox) as g:
        r = post(g, [{"email": "a@example.com", "favourite_colour": "teal", "id": "forged"}])
    assert r.status_code == 200
    [stored] = sandbox.contacts()
    assert "favourite_colour" not in stored and stored["id"] != "forged"


# --- store, labels, dedupe ----------------------------------------------------------------------


def test_append_label_names_applied_on_create_in_order_without_repeats(sandbox):
    with gateway(sandbox) as g:
        r = post(g, [{"email": "a@example.com", "label_names": ["VIP", "Q4"]}], append_label_names=["Q4", "Import"])
    assert r.json()["created_contacts"][0]["label_names"] == ["VIP", "Q4", "Import"]
    assert sandbox.contacts()[0]["label_names"] == ["VIP", "Q4", "Import"]


def test_dedupe_by_email_case_insensitive_returns_existing_unchanged(sandbox):
    with gateway(sandbox) as g:
        first = post(g, [{"email": "Tim@Example.com", "first_name": "Tim"}], append_label_names=["A"], run_dedupe=True)
        again = post(
            g, [{"email": "tim@example.COM", "first_name": "Timothy", "label_names": ["X"]}],
            append_label_names=["B"], run_dedupe=True,
        )  # fmt: skip
    created = first.json()["created_contacts"][0]
    assert again.json()["created_contacts"] == []
    [existing] = again.json()["existing_contacts"]
    assert existing == created  # exactly as stored: no label appended, name not updated
    [stored] = sandbox.contacts()
    assert stored["label_names"] == ["A"] and stored["first_name"] == "Tim"
    assert sandbox.stats()["created"] == 1 and sandbox.stats()["existing"] == 1


def test_without_dedupe_duplicates_are_created(sandbox):
    with gateway(sandbox) as g:
        post(g, [{"email": "a@example.com"}])
        r = post(g, [{"email": "A@example.com"}], run_dedupe=False)
    assert len(r.json()["created_contacts"]) == 1
    assert len(sandbox.contacts()) == 2


def test_dedupe_by_name_and_organization_when_no_email(sandbox):
    person = {"first_name": "Ada", "last_name": "Lovelace", "organization_name": "Analytical"}
    with gateway(sandbox) as g:
        created = post(g, [{**person, "email": "ada@example.com"}], run_dedupe=True).json()["created_contacts"][0]
        same = post(g, [{"first_name": "ADA", "last_name": "lovelace", "organization_name": "analytical"}], run_dedupe=True)
        no_org = post(g, [{"first_name": "Ada", "last_name": "Lovelace"}], run_dedupe=True)
        other_email = post(g, [{**person, "email": "ada2@example.com"}], run_dedupe=True)
    assert same.json()["existing_contacts"] == [created] and same.json()["created_contacts"] == []
    assert len(no_org.json()["created_contacts"]) == 1  # all three parts are needed to match
    assert len(other_email.json()["created_contacts"]) == 1  # a contact with an email matches by email only
    assert len(sandbox.contacts()) == 3


def test_dedupe_counts_matches_inside_one_request(sandbox):
    with apollo(sandbox) as a:
        r = post(a, [{"email": "a@example.com", "title": "1"}, {"email": "A@EXAMPLE.com", "title": "2"}], run_dedupe=True)
    body = r.json()
    assert [c["title"] for c in body["created_contacts"]] == ["1"]
    assert [c["title"] for c in body["existing_contacts"]] == ["1"]
    assert len(sandbox.contacts()) == 1


def test_response_order_is_shuffled_unless_disabled(sandbox_factory):
    contacts = [{"email": f"u{i:03d}@example.com"} for i in range(100)]
    shuffled, ordered = sandbox_factory(seed=1), sandbox_factory(shuffle=False)
    with gateway(shuffled) as g1, gateway(ordered) as g2:
        got1 = [c["email"] for c in post(g1, contacts).json()["created_contacts"]]
        got2 = [c["email"] for c in post(g2, contacts).json()["created_contacts"]]
    expected = [c["email"] for c in contacts]
    assert sorted(got1) == expected and got1 != expected
    assert got2 == expected


def test_concurrent_dedupe_stores_each_email_once(sandbox):
    emails = [{"email": f"u{i}@example.com"} for i in range(20)]
    statuses: list[int] = []

    def worker() -> None:
        with gateway(sandbox) as g:
            for i in range(0, 20, 5):
                statuses.append(post(g, emails[i : i + 5], run_dedupe=True).status_code)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 24
    stats = sandbox.stats()
    assert stats["contacts_stored"] == 20 and stats["created"] == 20 and stats["existing"] == 100
    assert stats["requests"] == 24


# --- rate windows --------------------------------------------------------------------------------


def test_gateway_rate_window_429_then_passes_after_reset(sandbox_factory):
    clock = FakeClock(1_700_000_000.25)  # a quarter into a 1 s window
    sb = sandbox_factory(rate=3, window=1, clock=clock)
    with gateway(sb) as g:
        answers = [post(g, [{"email": f"u{i}@example.com"}]) for i in range(4)]
        over = answers[-1]
        clock.advance(int(over.headers["Retry-After"]))
        after = post(g, [{"email": "late@example.com"}])
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in answers)
    reset = over.headers["X-RateLimit-Reset"]
    assert 0 < float(reset) <= 1 and len(reset.split(".")[1]) == 3
    assert reset == "0.750"  # the window ends at the next whole second since the epoch
    assert over.headers["Retry-After"] == "1"
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert after.status_code == 200 and after.headers["X-RateLimit-Remaining"] == "2"
    assert sb.stats()["status_counts"] == {"200": 4, "429": 1}
    assert len(sb.contacts()) == 4
    # per whole second of the server's clock: the first window's three and its 429, then the one after the reset
    assert sb.stats()["requests_by_second"] == [[1_700_000_000, 4], [1_700_000_001, 1]]


def test_apollo_rate_headers_name_each_window(sandbox_factory):
    sb = sandbox_factory(rate=5, window=1, hourly_limit=2, daily_limit=100, clock=FakeClock())
    with apollo(sb) as a:
        answers = [post(a, [{"email": f"u{i}@example.com"}]) for i in range(4)]
    first, _, over, over_again = answers
    assert first.status_code == 200
    assert first.headers["x-rate-limit-minute"] == "5" and first.headers["x-minute-requests-left"] == "4"
    assert first.headers["x-minute-usage"] == "1"
    assert first.headers["x-rate-limit-hourly"] == "2" and first.headers["x-hourly-requests-left"] == "1"
    assert first.headers["x-rate-limit-daily"] == "100" and first.headers["x-daily-usage"] == "1"
    assert over.status_code == 429
    assert over.json() == {"status": 429, "message": "hourly rate limit exceeded"}
    assert over.headers["x-hourly-requests-left"] == "0" and over.headers["x-minute-usage"] == "2"
    assert 1 <= int(over.headers["Retry-After"]) <= 3600
    assert over_again.status_code == 429 and over_again.headers["x-hourly-usage"] == "2"  # a 429 is not counted


def test_the_default_clock_is_the_wall_clock(sandbox_factory):
    """What a fake clock cannot show: without one, windows follow real time, and the reset header says when."""
    sb = sandbox_factory(rate=1, window=1)
    with gateway(sb) as g:
        answers = [post(g, [{"email": "u0@example.com"}])]
        while answers[-1].status_code != 429 and len(answers) < 10:  # until two land in one window
            answers.append(post(g, [{"email": f"u{len(answers)}@example.com"}]))
        over = answers[-1]
        time.sleep(float(over.headers["X-RateLimit-Reset"]) + 0.05)
        after = post(g, [{"email": "late@example.com"}])
    assert 0 < float(over.headers["X-RateLimit-Reset"]) <= 1 and over.headers["Retry-After"] == "1"
    assert after.status_code == 200 and after.headers["X-RateLimit-Remaining"] == "0"
    assert time.time() - int(sb.contacts()[-1]["id"][:8], 16) < 60  # ids carry the real time, as ObjectIds do


def test_windows_align_to_the_epoch_and_stamps_use_the_same_clock(sandbox_factory):
    clock = FakeClock(1_700_000_039.5)  # half a second before a 60 s boundary (epoch multiples of 60)
    sb = sandbox_factory(rate=1, window=60, clock=clock)
    with gateway(sb) as g:
        first = post(g, [{"email": "a@example.com"}])
        over = post(g, [{"email": "b@example.com"}])
        clock.advance(0.5)
        next_window = post(g, [{"email": "c@example.com"}])
    assert first.status_code == 200 and over.status_code == 429
    assert over.headers["X-RateLimit-Reset"] == "0.500" and over.headers["Retry-After"] == "1"
    assert next_window.status_code == 200
    assert sb.contacts()[0]["created_at"] == "2023-11-14T22:13:59.500Z"  # stamps come from the same clock


def test_apollo_minute_window_message(sandbox_factory):
    sb = sandbox_factory(rate=1, window=60)
    with apollo(sb) as a:
        post(a, [{"email": "a@example.com"}])
        over = post(a, [{"email": "b@example.com"}])
    assert over.status_code == 429 and over.json()["message"] == "minute rate limit exceeded"
    assert 1 <= int(over.headers["Retry-After"]) <= 60


def test_no_limits_means_no_rate_headers(sandbox):
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg, ra = post(g, [{"email": "a@example.com"}]), post(a, [{"email": "b@example.com"}])
    assert not [h for h in rg.headers if h.lower().startswith("x-ratelimit")]
    assert not [h for h in ra.headers if h.lower().startswith("x-rate-limit") or "requests-left" in h.lower()]


# --- faults --------------------------------------------------------------------------------------


def test_drop_closes_without_answer_and_stores_nothing(sandbox_factory):
    sb = sandbox_factory(drop=1.0)
    with gateway(sb) as g, pytest.raises(httpx.RemoteProtocolError):
        post(g, [{"email": "a@example.com"}])
    assert sb.contacts() == []
    assert sb.stats()["faults"]["drop"] == 1


def test_fail_before_store_is_503_and_stores_nothing(sandbox_factory):
    sb = sandbox_factory(fail_before_store=1.0)
    with gateway(sb) as g, apollo(sb) as a:
        rg, ra = post(g, [{"email": "a@example.com"}]), post(a, [{"email": "b@example.com"}])
    assert rg.status_code == 503 and rg.json()["error"]["type"] == "api_error"
    assert ra.status_code == 503 and ra.json()["status"] == 503
    assert sb.contacts() == [] and sb.stats()["faults"]["fail_before_store"] == 2


def test_burst_429_has_retry_after_1_and_is_not_counted(sandbox_factory):
    sb = sandbox_factory(burst_429=1.0, rate=1, window=60)
    with gateway(sb) as g:
        answers = [post(g, [{"email": "a@example.com"}]) for _ in range(2)]
    for r in answers:
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.headers["X-RateLimit-Remaining"] == "1"  # the window is untouched
    assert sb.contacts() == [] and sb.stats()["faults"]["burst_429"] == 2


def test_slow_answers_late_but_stores(sandbox_factory):
    sb = sandbox_factory(slow=1.0, slow_seconds=0.5)
    with gateway(sb, timeout=0.1) as g, pytest.raises(httpx.ReadTimeout):
        post(g, [{"email": "slow@example.com"}])
    assert wait_for(lambda: len(sb.contacts()) == 1)
    assert sb.contacts()[0]["email"] == "slow@example.com"
    assert sb.stats()["faults"]["slow"] == 1


def test_fail_after_store_is_500_and_stores(sandbox_factory):
    sb = sandbox_factory(fail_after_store=1.0)
    with apollo(sb) as a:
        r = post(a, [{"email": "a@example.com"}])
    assert r.status_code == 500 and r.json()["status"] == 500
    assert [c["email"] for c in sb.contacts()] == ["a@example.com"]


def test_seeded_faults_repeat(sandbox_factory):
    runs = []
    for _ in range(2):
        sb = sandbox_factory(fail_before_store=0.5, seed=7)
        with gateway(sb) as g:
            runs.append([post(g, [{"email": f"u{i}@example.com"}]).status_code for i in range(12)])
    assert runs[0] == runs[1] and {200, 503} <= set(runs[0])


# --- admin, process, config ----------------------------------------------------------------------


def test_admin_endpoints_and_reset(sandbox_factory):
    sb = sandbox_factory(rate=1, window=60)
    with gateway(sb) as g, httpx.Client(base_url=sb.url) as admin:
        post(g, [{"email": "a@example.com"}])
        assert post(g, [{"email": "b@example.com"}]).status_code == 429
        assert [c["email"] for c in admin.get("/_sandbox/contacts").json()["contacts"]] == ["a@example.com"]
        assert admin.get("/_sandbox/stats").json()["status_counts"] == {"200": 1, "429": 1}
        assert admin.post("/_sandbox/reset").status_code == 200
        assert admin.get("/_sandbox/contacts").json() == {"contacts": []}
        assert post(g, [{"email": "b@example.com"}]).status_code == 200  # windows cleared too
    assert sb.stats()["requests"] == 1


def test_sandbox_process_serves_and_stops():
    config = SandboxConfig(rate=50, seed=3, shuffle=False)
    with SandboxProcess(config) as sb:
        proc = sb.process
        assert sb.url.startswith("http://127.0.0.1:")
        with gateway(sb) as g:
            r = post(g, [{"email": "a@example.com"}, {"email": "b@example.com"}])
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "50"
        assert [c["email"] for c in sb.contacts()] == ["a@example.com", "b@example.com"]
        assert sb.stats()["max_contacts_in_request"] == 2
        sb.reset()
        assert sb.contacts() == [] and sb.stats()["requests"] == 0
    assert proc.poll() is not None
    with pytest.raises(httpx.ConnectError), httpx.Client() as c:
        c.get(sb.url + "/_sandbox/stats")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_refuses_non_loopback_host(host):
    with pytest.raises(InputError, match="127.0.0.1"):
        SandboxServer(host=host).start()
    with pytest.raises(InputError, match="127.0.0.1"):
        serve_forever(SandboxConfig(), 0, host=host, announce=lambda line: None)


@pytest.mark.parametrize("bad", [{"drop": 1.5}, {"rate": 0}, {"window": 0}, {"latency": -1}, {"api_key": ""}])
def test_bad_config_is_input_error(bad):
    with pytest.raises(InputError):
        SandboxConfig(**bad)


def test_cli_flags_round_trip_config():
    config = SandboxConfig(
        api_key="k2", rate=7, window=2.5, hourly_limit=40, daily_limit=900, latency=0.01, fail_before_store=0.1,
        fail_after_store=0.2, slow=0.3, slow_seconds=1.5, drop=0.05, burst_429=0.15, seed=9, shuffle=False,
    )  # fmt: skip
    args = build_parser().parse_args(["--port", "0", *config_to_argv(config)])
    assert config_from_args(args) == config and args.port == 0


def test_key_is_never_logged_or_in_repr(sandbox_factory, capfd):
    secret = "sk-live-do-not-print"
    sb = sandbox_factory(api_key=secret)
    with gateway(sb, secret) as g, apollo(sb, secret) as a:
        assert post(g, [{"email": "a@example.com"}]).status_code == 200
        assert post(a, [{"email": "b@example.com"}]).status_code == 200
        g.post(BULK, content=b"not json")
    out, err = capfd.readouterr()
    assert secret not in out + err
    assert secret not in repr(sb.config)
    assert secret not in json.dumps(sb.stats()) + json.dumps(sb.contacts())


# === Only loopback Host headers; the key from the environment (issue 14, item 7) =====================

CONTACT = {"email": "a@example.com"}

# --- Host ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "10.0.0.1:{port}", "[::2]:{port}"])  # fmt: skip
def test_foreign_host_is_421_in_each_way_ins_shape_and_changes_nothing(sandbox, host):
    port = sandbox.url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port)}
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg = g.post(BULK, json={"contacts": [CONTACT]}, headers=headers)
        ra = a.post(BULK, json={"contacts": [CONTACT]}, headers=headers)
    assert rg.status_code == 421
    err = rg.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "misdirected_request"
    assert "127.0.0.1" in err["message"] and err["request_id"].startswith("req_")
    assert ra.status_code == 421 and ra.json()["status"] == 421 and "localhost" in ra.json()["message"]
    assert sandbox.contacts() == [] and sandbox.stats()["requests"] == 0


def test_foreign_host_cannot_read_or_reset_through_the_admin_routes(sandbox):
    sandbox.seed([{"email": "kept@example.com"}])
    with httpx.Client(base_url=sandbox.url, headers={"Host": "evil.example"}) as admin:
        listed = admin.get("/_sandbox/contacts")
        reset = admin.post("/_sandbox/reset")
    assert listed.status_code == 421 and "contacts" not in listed.json()
    assert reset.status_code == 421
    assert [c["email"] for c in sandbox.contacts()] == ["kept@example.com"]


def test_request_without_host_is_refused(sandbox):
    port = int(sandbox.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /_sandbox/stats HTTP/1.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 421 ") and b"misdirected_request" in answer


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost", "localhost:{port}", "LocalHost",
                                  "[::1]:{port}", "[::1]"])  # fmt: skip
def test_loopback_hosts_are_answered(sandbox, host):
    port = sandbox.url.rsplit(":", 1)[1]
    with gateway(sandbox) as g:
        r = g.post(BULK, json={"contacts": [CONTACT]}, headers={"Host": host.format(port=port)})
    assert r.request.headers["Host"] == host.format(port=port) and r.status_code == 200
    assert [c["email"] for c in r.json()["created_contacts"]] == ["a@example.com"]


def test_the_default_client_host_is_answered(sandbox):
    with gateway(sandbox) as g:
        r = g.post(BULK, json={"contacts": [CONTACT]})
    assert r.request.headers["Host"] == sandbox.url.removeprefix("http://") and r.status_code == 200


def test_names_loopback_edges():
    for good in ("127.0.0.1:8765", " localhost ", "::1", "[::1]:1", "localhost:"):
        assert names_loopback(good), good
    for bad in (None, "", "[::1", "[::1]x", "localhost:80x", "localhost:８０", "127.0.0.1:1:2", "127.0.0.01",
                "localhost@evil.example", "evil.example#localhost"):
        assert not names_loopback(bad), bad


# --- The key from the environment ------------------------------------------------------------------------


def test_cli_takes_the_key_from_the_environment_unless_given(monkeypatch):
    parse = build_parser().parse_args
    assert config_from_args(parse(["--port", "0"])).api_key == KEY
    monkeypatch.setenv(ENV_SANDBOX_KEY, "env-key")
    assert config_from_args(parse(["--port", "0"])).api_key == "env-key"
    assert config_from_args(parse(["--api-key", "flag-key"])).api_key == "flag-key"
    monkeypatch.setenv(ENV_SANDBOX_KEY, "")
    assert config_from_args(parse([])).api_key == KEY


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's command line from /proc")
def test_sandbox_process_hands_its_key_over_by_environment_not_argv(monkeypatch):
    secret = "sk-sandbox-not-in-ps"
    monkeypatch.setenv(ENV_SANDBOX_KEY, "parent-key")  # the config's key wins over the parent's environment
    with SandboxProcess(SandboxConfig(api_key=secret, rate=5)) as sb:
        argv = Path(f"/proc/{sb.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{sb.pid}/environ").read_bytes().split(b"\0")
        with gateway(sb, secret) as ok, gateway(sb, "parent-key") as parent, gateway(sb) as default:
            assert ok.post(BULK, json={"contacts": [CONTACT]}).status_code == 200
            assert parent.post(BULK, json={"contacts": [CONTACT]}).status_code == 401
            assert default.post(BULK, json={"contacts": [CONTACT]}).status_code == 401
    assert not any(secret.encode() in arg for arg in argv) and b"--api-key" not in argv
    assert b"--rate" in argv  # the other flags still go on the command line
    assert f"{ENV_SANDBOX_KEY}={secret}".encode() in environ


def test_sandbox_process_with_the_default_key_ignores_a_parent_key(monkeypatch):
    monkeypatch.setenv(ENV_SANDBOX_KEY, "parent-key")
    with SandboxProcess(SandboxConfig()) as sb, gateway(sb) as g:
        assert g.post(BULK, json={"contacts": [CONTACT]}).status_code == 200


def test_lean_sandbox_keeps_only_ids_by_email_and_counts_a_second_create():
    with SandboxServer(SandboxConfig(api_key=KEY, keep_contacts=False)) as sb, gateway(sb) as c:
        first = post(c, [{"email": "a@x.io", "first_name": "A"}, {"email": "b@x.io"}]).json()
        again = post(c, [{"email": "a@x.io"}]).json()  # no dedupe: created again, and counted
        deduped = post(c, [{"email": "b@x.io"}], run_dedupe=True).json()
        stats = sb.stats()
    assert sorted(x["email"] for x in first["created_contacts"]) == ["a@x.io", "b@x.io"]
    assert len(again["created_contacts"]) == 1 and stats["created_again"] == 1
    assert deduped["existing_contacts"][0]["id"] in {x["id"] for x in first["created_contacts"]}
    assert stats["contacts_stored"] == 0 and stats["created"] == 3 and stats["existing"] == 1
    assert config_from_args(build_parser().parse_args(["--lean"])).keep_contacts is False
    assert "--lean" in config_to_argv(SandboxConfig(keep_contacts=False))
