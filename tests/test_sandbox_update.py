"""The sandbox's Bulk Update and one-contact PATCH over real sockets: both ways in and auth styles, sync and async
answers, update semantics (blanks, label replacement, dedupe index moves), the rate budget shared with bulk_create,
faults, seeding contacts that exist before a sync, and the counters.

Fixtures ``sandbox`` and ``sandbox_factory`` come from tests/sandbox_fixtures.py via conftest; rate windows run on a
``FakeClock`` the test advances.
"""

from __future__ import annotations


import httpx
import pytest

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.sandbox import SandboxConfig, SandboxProcess
from sandbox_fixtures import KEY, FakeClock, apollo, gateway, wait_for

CREATE = "/contacts/bulk_create"
UPDATE = "/contacts/bulk_update"
PUBLIC_BASE = {"id", "phone_numbers", "label_names", "typed_custom_fields", "created_at", "updated_at"}

WAYS_IN = {
    "gateway-bearer": lambda sb: httpx.Client(base_url=sb.gateway_base_url, headers={"Authorization": f"Bearer {KEY}"}),
    "apollo-x-api-key": lambda sb: httpx.Client(base_url=sb.apollo_base_url, headers={"X-Api-Key": KEY}),
    "apollo-bearer": lambda sb: httpx.Client(base_url=sb.apollo_base_url, headers={"Authorization": f"Bearer {KEY}"}),
}


def update(client: httpx.Client, attributes=None, **body) -> httpx.Response:
    if attributes is not None:
        body["contact_attributes"] = attributes
    return client.post(UPDATE, json=body)


def stored(sb, contact_id: str) -> dict:
    [contact] = [c for c in sb.contacts() if c["id"] == contact_id]
    return contact


def seed_many(sb, n: int) -> list[dict]:
    return sb.seed([{"email": f"u{i:04d}@example.com", "title": "Old"} for i in range(n)])


# --- both ways in, answer shapes -----------------------------------------------------------------


@pytest.mark.parametrize("way_in", sorted(WAYS_IN))
def test_bulk_update_on_each_way_in_answers_the_updated_contacts(sandbox, way_in):
    [tim] = sandbox.seed([{"email": "tim@example.com", "first_name": "Tim", "title": "Analyst"}])
    with WAYS_IN[way_in](sandbox) as c:
        r = update(c, [{"id": tim["id"], "title": "Director", "website_url": "https://apollo.io"}])
    assert r.status_code == 200
    [contact] = r.json()["contacts"]
    assert set(r.json()) == {"contacts"}
    assert contact["id"] == tim["id"] and contact["title"] == "Director"
    assert contact["first_name"] == "Tim" and contact["email"] == "tim@example.com"  # not given: untouched
    assert contact["website_url"] == "https://apollo.io"
    assert set(contact) == PUBLIC_BASE | {"email", "first_name", "title", "website_url"}
    assert stored(sandbox, tim["id"])["title"] == "Director"


@pytest.mark.parametrize("way_in", sorted(WAYS_IN))
def test_patch_on_each_way_in_updates_one_contact(sandbox, way_in):
    [ada] = sandbox.seed([{"email": "ada@example.com", "title": "Engineer"}])
    with WAYS_IN[way_in](sandbox) as c:
        r = c.patch(f"/contacts/{ada['id']}", json={"title": "CTO", "mobile_phone": "+1 555 0100"})
    assert r.status_code == 200
    contact = r.json()["contact"]
    assert contact["id"] == ada["id"] and contact["title"] == "CTO"
    assert contact["phone_numbers"] == [{"raw_number": "+1 555 0100"}] and contact["mobile_phone"] == "+1 555 0100"
    assert stored(sandbox, ada["id"])["title"] == "CTO"


def test_patch_unknown_id_is_404_in_each_family_shape(sandbox):
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg = g.patch("/contacts/000000000000000000000000", json={"title": "X"})
        ra = a.patch("/contacts/000000000000000000000000", json={"title": "X"})
    assert rg.status_code == 404 and rg.json()["error"]["type"] == "not_found_error"
    assert "000000000000000000000000" in rg.json()["error"]["message"]
    assert ra.status_code == 404 and ra.json()["status"] == 404 and "000000000000000000000000" in ra.json()["message"]
    assert sandbox.stats()["requests_by_endpoint"]["update_one"] == 2


def test_other_methods_on_update_paths_are_405(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com"}])
    with gateway(sandbox) as g, apollo(sandbox) as a:
        get_bulk = g.get(UPDATE)
        put_one = a.put(f"/contacts/{c['id']}", json={"title": "X"})
        post_one = g.post(f"/contacts/{c['id']}", json={"title": "X"})
        patch_create = a.patch(CREATE, json={"contacts": []})
    assert get_bulk.status_code == 405 and get_bulk.json()["error"]["code"] == "method_not_allowed"
    assert put_one.status_code == 405 and put_one.json()["status"] == 405
    assert post_one.status_code == 405
    assert patch_create.status_code == 405
    assert "title" not in stored(sandbox, c["id"])


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_401_on_update_in_each_error_shape_and_nothing_changes(sandbox, key):
    [c] = sandbox.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(sandbox, key) as g, apollo(sandbox, key) as a:
        rg = update(g, [{"id": c["id"], "title": "New"}])
        ra = a.patch(f"/contacts/{c['id']}", json={"title": "New"})
    assert rg.status_code == 401 and rg.json()["error"]["type"] == "authentication_error"
    assert ra.status_code == 401 and ra.json() == {"status": 401, "message": "Invalid access credentials."}
    assert stored(sandbox, c["id"])["title"] == "Old"


def test_100_contacts_are_answered_synchronously(sandbox):
    seeded = seed_many(sandbox, 100)
    with gateway(sandbox) as g:
        r = update(g, [{"id": c["id"], "title": f"T{i}"} for i, c in enumerate(seeded)])
    body = r.json()
    assert r.status_code == 200 and "async" not in body
    assert sorted(c["id"] for c in body["contacts"]) == sorted(c["id"] for c in seeded)
    titles = {c["id"]: c["title"] for c in body["contacts"]}
    assert titles == {c["id"]: f"T{i}" for i, c in enumerate(seeded)}
    assert sandbox.stats()["async_updates"] == 0


@pytest.mark.parametrize("n", [101, 1000])
def test_more_than_100_are_applied_but_answered_async_without_contacts(sandbox, n):
    seeded = seed_many(sandbox, n)
    with apollo(sandbox) as a:
        r = update(a, [{"id": c["id"], "title": "New"} for c in seeded])
    body = r.json()
    assert r.status_code == 200
    assert body["contacts"] == [] and body["async"] is True and body["message"]
    assert {c["title"] for c in sandbox.contacts()} == {"New"}
    stats = sandbox.stats()
    assert stats["async_updates"] == 1 and stats["updated"] == n and stats["max_contacts_in_update"] == n


def test_async_true_forces_an_async_answer_for_one_contact(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com"}])
    with gateway(sandbox) as g:
        r = update(g, [{"id": c["id"], "title": "New"}], **{"async": True})
    assert r.json()["contacts"] == [] and r.json()["async"] is True
    assert stored(sandbox, c["id"])["title"] == "New"


def test_the_1000_limit_counts_attributes_and_ids_together(sandbox):
    seeded = seed_many(sandbox, 2)
    attributes = [{"id": seeded[0]["id"], "title": "New"}] * 600
    with gateway(sandbox) as g, apollo(sandbox) as a:
        rg = update(g, attributes, contact_ids=[seeded[1]["id"]] * 401, title="New")
        ra = update(a, attributes + [{"id": seeded[1]["id"]}] * 401)
    assert rg.status_code == 422 and rg.json()["error"]["type"] == "invalid_request_error"
    assert "at most 1000 contacts" in rg.json()["error"]["message"] and "got 1001" in rg.json()["error"]["message"]
    assert ra.status_code == 422 and "at most 1000 contacts" in ra.json()["message"]
    assert {c["title"] for c in sandbox.contacts()} == {"Old"}  # nothing applied
    assert sandbox.stats()["max_contacts_in_update"] == 1001 and sandbox.stats()["updated"] == 0


def test_unknown_ids_are_left_out_of_the_answer(sandbox):
    [known] = sandbox.seed([{"email": "a@example.com"}])
    with gateway(sandbox) as g:
        r = update(g, [{"id": "ffffffffffffffffffffffff", "title": "X"}, {"id": known["id"], "title": "Y"}])
        none_known = update(g, [{"id": "ffffffffffffffffffffffff", "title": "X"}])
    assert r.status_code == 200 and [c["id"] for c in r.json()["contacts"]] == [known["id"]]
    assert none_known.status_code == 200 and none_known.json() == {"contacts": []}
    assert len(sandbox.contacts()) == 1 and sandbox.stats()["updated"] == 1


def test_contact_ids_share_the_top_level_fields(sandbox):
    a, b, c = sandbox.seed([{"email": f"{x}@example.com", "title": "Old"} for x in "abc"])
    with apollo(sandbox) as client:
        own = [{"id": c["id"], "title": "Own"}]
        r = update(client, own, contact_ids=[a["id"], b["id"]], title="Shared", owner_id="o1")
    answered = {x["id"]: (x["title"], x.get("owner_id")) for x in r.json()["contacts"]}
    assert answered == {a["id"]: ("Shared", "o1"), b["id"]: ("Shared", "o1"), c["id"]: ("Own", None)}


def test_a_contact_given_twice_is_answered_once_with_its_last_values(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com"}])
    with gateway(sandbox) as g:
        r = update(g, [{"id": c["id"], "title": "First"}, {"id": c["id"], "title": "Second"}])
    assert [x["title"] for x in r.json()["contacts"]] == ["Second"]
    assert sandbox.stats()["updated"] == 1


# --- update semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", None])
def test_a_blank_field_blanks_the_stored_value(sandbox, blank):
    [c] = sandbox.seed([{
        "email": "a@example.com", "title": "Analyst", "mobile_phone": "+1 555 0100", "direct_phone": "+1 555 0101",
        "label_names": ["VIP"], "typed_custom_fields": {"cf_1": "x"}, "organization_name": "Apollo",
    }])  # fmt: skip
    changes = {"title": blank, "mobile_phone": blank, "label_names": blank, "typed_custom_fields": blank}
    with gateway(sandbox) as g:
        [answered] = update(g, [{"id": c["id"], **changes}]).json()["contacts"]
    assert answered["title"] is None and "title" in answered  # present, blanked: a client test can see it
    assert answered["mobile_phone"] is None and answered["phone_numbers"] == [{"raw_number": "+1 555 0101"}]
    assert answered["label_names"] == [] and answered["typed_custom_fields"] == {}
    assert answered["organization_name"] == "Apollo"  # not given: untouched
    assert stored(sandbox, c["id"])["title"] is None


def test_label_names_replaces_the_labels(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com", "label_names": ["VIP", "Q3"]}])
    with gateway(sandbox) as g:
        [answered] = update(g, [{"id": c["id"], "label_names": ["Q4"]}]).json()["contacts"]
        merged = g.patch(f"/contacts/{c['id']}", json={"label_names": ["Q4", "VIP", "Q3"]}).json()["contact"]
    assert answered["label_names"] == ["Q4"]
    assert merged["label_names"] == ["Q4", "VIP", "Q3"]


def test_typed_custom_fields_replace_the_stored_object(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com", "typed_custom_fields": {"cf_1": "x", "cf_2": "y"}}])
    with apollo(sandbox) as a:
        [answered] = update(a, [{"id": c["id"], "typed_custom_fields": {"cf_2": "z"}}]).json()["contacts"]
    assert answered["typed_custom_fields"] == {"cf_2": "z"}


def test_phone_fields_rebuild_phone_numbers(sandbox):
    [c] = sandbox.seed([{"email": "a@example.com", "mobile_phone": "+1 555 0100"}])
    with gateway(sandbox) as g:
        [answered] = update(g, [{"id": c["id"], "mobile_phone": "+1 555 0199", "home_phone": "+1 555 0200"}]).json()[
            "contacts"
        ]
    assert answered["phone_numbers"] == [{"raw_number": "+1 555 0199"}, {"raw_number": "+1 555 0200"}]
    assert stored(sandbox, c["id"])["phone_numbers"] == answered["phone_numbers"]


def test_updated_at_moves_and_created_at_stays(sandbox_factory):
    clock = FakeClock(1_700_000_000.0)
    sb = sandbox_factory(clock=clock)
    [c] = sb.seed([{"email": "a@example.com"}])
    clock.advance(90)
    with gateway(sb) as g:
        [answered] = update(g, [{"id": c["id"], "title": "New"}]).json()["contacts"]
    assert answered["created_at"] == c["created_at"] == "2023-11-14T22:13:20.000Z"
    assert answered["updated_at"] == "2023-11-14T22:14:50.000Z"


def test_an_email_change_moves_the_dedupe_index(sandbox):
    [c] = sandbox.seed([{"email": "old@example.com", "first_name": "Tim"}])
    with gateway(sandbox) as g:
        assert update(g, [{"id": c["id"], "email": "New@Example.com"}]).status_code == 200
        by_new = g.post(CREATE, json={"contacts": [{"email": "new@example.com"}], "run_dedupe": True}).json()
        by_old = g.post(CREATE, json={"contacts": [{"email": "old@example.com"}], "run_dedupe": True}).json()
    assert [x["id"] for x in by_new["existing_contacts"]] == [c["id"]] and by_new["created_contacts"] == []
    assert by_old["existing_contacts"] == [] and len(by_old["created_contacts"]) == 1  # the old email is free


def test_an_email_change_hands_the_old_email_to_the_next_contact_holding_it(sandbox):
    first, second = sandbox.seed([{"email": "same@example.com", "title": str(i)} for i in (1, 2)])
    with apollo(sandbox) as a:
        a.patch(f"/contacts/{first['id']}", json={"email": "moved@example.com"})
        r = a.post(CREATE, json={"contacts": [{"email": "same@example.com"}], "run_dedupe": True}).json()
    assert [x["id"] for x in r["existing_contacts"]] == [second["id"]]


def test_a_name_or_organization_change_moves_the_name_index(sandbox):
    [c] = sandbox.seed([{"first_name": "Ada", "last_name": "Lovelace", "organization_name": "Analytical"}])
    with gateway(sandbox) as g:
        g.patch(f"/contacts/{c['id']}", json={"organization_name": "Babbage & Co"})
        moved = {"first_name": "ada", "last_name": "lovelace", "organization_name": "babbage & co"}
        new = g.post(CREATE, json={"contacts": [moved], "run_dedupe": True})
        left = {"first_name": "Ada", "last_name": "Lovelace", "organization_name": "Analytical"}
        old = g.post(CREATE, json={"contacts": [left], "run_dedupe": True})
    assert [x["id"] for x in new.json()["existing_contacts"]] == [c["id"]]
    assert old.json()["existing_contacts"] == [] and len(old.json()["created_contacts"]) == 1


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "request body"),
        ({}, "contact_attributes or contact_ids"),
        ({"contact_attributes": [], "contact_ids": []}, "contact_attributes or contact_ids"),
        ({"contact_attributes": {"id": "x"}}, "contact_attributes"),
        ({"contact_attributes": ["x"]}, "contact_attributes[0]"),
        ({"contact_attributes": [{"title": "No id"}]}, "contact_attributes[0].id"),
        ({"contact_attributes": [{"id": 5}]}, "contact_attributes[0].id"),
        ({"contact_attributes": [{"id": "a"}, {"id": "b", "title": 3}]}, "contact_attributes[1].title"),
        ({"contact_attributes": [{"id": "a", "label_names": "VIP"}]}, "contact_attributes[0].label_names"),
        ({"contact_attributes": [{"id": "a", "label_names": ["ok", 1]}]}, "contact_attributes[0].label_names"),
        ({"contact_attributes": [{"id": "a", "typed_custom_fields": [1]}]}, "contact_attributes[0].typed_custom_fields"),
        ({"contact_ids": "a"}, "contact_ids"),
        ({"contact_ids": ["a", 2]}, "contact_ids"),
        ({"contact_ids": ["a"], "email": 5}, "email"),
        ({"contact_ids": ["a"], "async": "yes"}, "async"),
    ],
)
def test_bulk_update_wrong_types_are_422_naming_the_field(sandbox, body, field):
    [c] = sandbox.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(sandbox) as g:
        r = g.post(UPDATE, json=body)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith(field)
    assert stored(sandbox, c["id"])["title"] == "Old"


@pytest.mark.parametrize(
    ("body", "field"), [([1], "request body"), ({"title": 5}, "title"), ({"label_names": "x"}, "label_names")]
)
def test_patch_wrong_types_are_422_naming_the_field(sandbox, body, field):
    [c] = sandbox.seed([{"email": "a@example.com"}])
    with apollo(sandbox) as a:
        r = a.patch(f"/contacts/{c['id']}", json=body)
    assert r.status_code == 422 and r.json()["message"].startswith(field)


def test_bulk_update_malformed_json_is_422(sandbox):
    with apollo(sandbox) as a:
        r = a.post(UPDATE, content=b'{"contact_ids": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]


# --- one rate budget, faults ---------------------------------------------------------------------


def test_creates_and_updates_share_one_rate_budget(sandbox_factory):
    clock = FakeClock(1_700_000_000.25)
    sb = sandbox_factory(rate=3, window=1, clock=clock)
    [c] = sb.seed([{"email": "seeded@example.com"}])  # seeding is outside the window
    with gateway(sb) as g, apollo(sb) as a:
        created = g.post(CREATE, json={"contacts": [{"email": "a@example.com"}]})
        bulk = update(g, [{"id": c["id"], "title": "1"}])
        one = a.patch(f"/contacts/{c['id']}", json={"title": "2"})
        over_bulk = update(g, [{"id": c["id"], "title": "3"}])
        over_one = a.patch(f"/contacts/{c['id']}", json={"title": "4"})
        over_create = g.post(CREATE, json={"contacts": [{"email": "b@example.com"}]})
        clock.advance(int(over_bulk.headers["Retry-After"]))
        after = update(g, [{"id": c["id"], "title": "5"}])
    assert [r.status_code for r in (created, bulk, one)] == [200, 200, 200]
    assert [created.headers["X-RateLimit-Remaining"], bulk.headers["X-RateLimit-Remaining"]] == ["2", "1"]
    assert one.headers["x-minute-requests-left"] == "0"
    assert [r.status_code for r in (over_bulk, over_one, over_create)] == [429, 429, 429]
    assert over_bulk.headers["Retry-After"] == "1" and over_bulk.json()["error"]["type"] == "rate_limit_error"
    assert over_one.json() == {"status": 429, "message": "minute rate limit exceeded"}
    assert over_one.headers["Retry-After"] == "1"
    assert stored(sb, c["id"])["title"] == "5" and after.status_code == 200
    stats = sb.stats()
    assert stats["status_counts"] == {"200": 4, "429": 3} and stats["requests"] == 7


def test_fail_after_store_applies_the_update_then_answers_500(sandbox_factory):
    sb = sandbox_factory(fail_after_store=1.0)
    [c] = sb.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(sb) as g, apollo(sb) as a:
        rg = update(g, [{"id": c["id"], "title": "Bulk"}])
        assert stored(sb, c["id"])["title"] == "Bulk"
        ra = a.patch(f"/contacts/{c['id']}", json={"title": "One"})
    assert rg.status_code == 500 and rg.json()["error"]["type"] == "api_error"
    assert ra.status_code == 500 and ra.json()["status"] == 500
    assert stored(sb, c["id"])["title"] == "One"
    assert sb.stats()["faults"]["fail_after_store"] == 2 and sb.stats()["updated"] == 2


def test_fail_before_store_and_drop_leave_the_contact_unchanged(sandbox_factory):
    failing, dropping = sandbox_factory(fail_before_store=1.0), sandbox_factory(drop=1.0)
    [f] = failing.seed([{"email": "a@example.com", "title": "Old"}])
    [d] = dropping.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(failing) as g:
        r = update(g, [{"id": f["id"], "title": "New"}])
    with apollo(dropping) as a, pytest.raises(httpx.RemoteProtocolError):
        a.patch(f"/contacts/{d['id']}", json={"title": "New"})
    assert r.status_code == 503 and stored(failing, f["id"])["title"] == "Old"
    assert stored(dropping, d["id"])["title"] == "Old"
    assert dropping.stats()["status_counts"] == {"dropped": 1} and dropping.stats()["faults"]["drop"] == 1


def test_burst_429_on_update_is_not_counted_in_the_window(sandbox_factory):
    sb = sandbox_factory(burst_429=1.0, rate=1, window=60, clock=FakeClock())
    [c] = sb.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(sb) as g:
        r = update(g, [{"id": c["id"], "title": "New"}])
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.headers["X-RateLimit-Remaining"] == "1"
    assert stored(sb, c["id"])["title"] == "Old" and sb.stats()["faults"]["burst_429"] == 1


def test_slow_update_answers_late_but_applies(sandbox_factory):
    sb = sandbox_factory(slow=1.0, slow_seconds=0.5)
    [c] = sb.seed([{"email": "a@example.com", "title": "Old"}])
    with gateway(sb, timeout=0.1) as g, pytest.raises(httpx.ReadTimeout):
        update(g, [{"id": c["id"], "title": "Late"}])
    assert wait_for(lambda: stored(sb, c["id"])["title"] == "Late")
    assert sb.stats()["faults"]["slow"] == 1


# --- seeding -------------------------------------------------------------------------------------


def test_seed_route_stores_contacts_outside_every_counter(sandbox_factory):
    sb = sandbox_factory(rate=1, window=60, clock=FakeClock())
    seeds = [{"email": "A@example.com", "label_names": ["VIP"], "mobile_phone": "+1 555 0100", "x": "dropped"},
             {"first_name": "Ada", "last_name": "Lovelace", "organization_name": "Analytical"}]  # fmt: skip
    with httpx.Client(base_url=sb.url) as admin, gateway(sb) as g:
        r = admin.post("/_sandbox/contacts", json={"contacts": seeds})
        dedupe = g.post(CREATE, json={"contacts": [{"email": "a@example.com"}, dict(seeds[1])], "run_dedupe": True})
    assert r.status_code == 200
    first, second = r.json()["contacts"]
    assert len(first["id"]) == 24 and first["id"] != second["id"]
    assert first["label_names"] == ["VIP"] and first["phone_numbers"] == [{"raw_number": "+1 555 0100"}]
    assert "x" not in first and set(first) == PUBLIC_BASE | {"email", "mobile_phone"}
    assert dedupe.status_code == 200  # the one request of the window: seeding took none of it
    assert sorted(x["id"] for x in dedupe.json()["existing_contacts"]) == sorted([first["id"], second["id"]])
    stats = sb.stats()
    assert stats["requests"] == 1 and stats["created"] == 0 and stats["existing"] == 2
    assert stats["contacts_stored"] == 2 and stats["requests_by_endpoint"]["bulk_create"] == 1


def test_seed_route_refuses_a_bad_body_naming_the_field(sandbox):
    with httpx.Client(base_url=sandbox.url) as admin:
        r = admin.post("/_sandbox/contacts", json={"contacts": [{"email": "a@example.com"}, {"email": 5}]})
        not_list = admin.post("/_sandbox/contacts", json={"contacts": "a@example.com"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("contacts[1].email")
    assert not_list.status_code == 422 and not_list.json()["error"]["message"].startswith("contacts")
    assert sandbox.contacts() == []


def test_sandbox_server_seed_returns_public_contacts_and_checks_them(sandbox):
    seeded = sandbox.seed([{"email": "a@example.com", "typed_custom_fields": {"cf": "1"}}, {"email": "b@example.com"}])
    assert [c["email"] for c in seeded] == ["a@example.com", "b@example.com"]
    assert seeded[0]["typed_custom_fields"] == {"cf": "1"}
    assert [c["id"] for c in sandbox.contacts()] == [c["id"] for c in seeded]
    with pytest.raises(InputError, match=r"contacts\[0\]\.label_names"):
        sandbox.seed([{"email": "c@example.com", "label_names": "VIP"}])
    assert len(sandbox.contacts()) == 2 and sandbox.stats()["requests"] == 0


def test_sandbox_process_seeds_and_updates():
    with SandboxProcess(SandboxConfig(shuffle=False)) as sb:
        [c] = sb.seed([{"email": "a@example.com", "label_names": ["VIP"]}])
        with apollo(sb) as a:
            r = update(a, [{"id": c["id"], "label_names": ["VIP", "Q4"]}])
        assert r.status_code == 200 and r.json()["contacts"][0]["label_names"] == ["VIP", "Q4"]
        assert sb.contacts()[0]["label_names"] == ["VIP", "Q4"]
        stats = sb.stats()
        assert stats["requests_by_endpoint"] == {"bulk_create": 0, "bulk_update": 1, "update_one": 0}
        with pytest.raises(InputError, match=r"contacts\[0\]\.email"):
            sb.seed([{"email": 5}])


# --- public shape, counters ----------------------------------------------------------------------


def test_bulk_create_answers_every_stored_field(sandbox):
    strings = [f for f in settings.CONTACT_FIELDS if f not in ("label_names", "typed_custom_fields")]
    contact = {field: f"v-{field}" for field in strings}
    with gateway(sandbox) as g:
        [created] = g.post(CREATE, json={"contacts": [{**contact, "label_names": ["L"]}]}).json()["created_contacts"]
    assert set(created) == set(settings.CONTACT_FIELDS) | PUBLIC_BASE
    assert all(created[field] == value for field, value in contact.items())
    assert created["phone_numbers"] == [{"raw_number": f"v-{p}"} for p in settings.PHONE_FIELDS]


def test_stats_count_updates_by_endpoint(sandbox):
    seeded = seed_many(sandbox, 150)
    with gateway(sandbox) as g:
        g.post(CREATE, json={"contacts": [{"email": "new@example.com"}]})
        update(g, [{"id": c["id"], "title": "A"} for c in seeded[:10]] + [{"id": "unknown"}])
        update(g, [{"id": c["id"], "title": "B"} for c in seeded])
        g.patch(f"/contacts/{seeded[0]['id']}", json={"title": "C"})
        g.patch("/contacts/unknown", json={"title": "C"})
        update(g, [{"id": "x", "title": 1}])  # a 422 is counted as a request of its endpoint
    stats = sandbox.stats()
    assert stats["requests_by_endpoint"] == {"bulk_create": 1, "bulk_update": 3, "update_one": 2}
    assert stats["requests"] == 6
    assert stats["status_counts"] == {"200": 4, "404": 1, "422": 1}
    assert stats["updated"] == 10 + 150 + 1
    assert stats["max_contacts_in_update"] == 150 and stats["max_contacts_in_request"] == 1
    assert stats["async_updates"] == 1 and stats["created"] == 1
    sandbox.reset()
    after = sandbox.stats()
    assert after["updated"] == 0 and after["async_updates"] == 0 and after["requests_by_endpoint"]["bulk_update"] == 0
