"""What an upsert sends (``apollo_sync.load.update``, pure): only changed, non-empty fields; labels and custom
fields merged with Apollo's copy, never replaced."""

from __future__ import annotations

from apollo_sync.load.update import (
    changed_since,
    customs_to_set,
    differing_from,
    labels_to_set,
    sets_changed,
    wanted_labels,
    would_change,
)

VALUES = {"email": "a@x.io", "title": "CEO", "direct_phone": "+14155550100", "label_names": ["Src"],
          "typed_custom_fields": {"cf_1": "gold"}}  # fmt: skip
NOW = {"email": "1", "title": "2", "direct_phone": "3", "label_names": "4", "custom.cf_1": "5"}


def test_changed_since_sends_the_fields_whose_hash_moved_and_all_plain_fields_when_nothing_is_known():
    assert changed_since(VALUES, NOW, NOW | {"title": "old"}) == {"title": "CEO"}
    assert changed_since(VALUES, NOW, NOW) == {}
    assert changed_since(VALUES, NOW, None) == {"email": "a@x.io", "title": "CEO", "direct_phone": "+14155550100"}


def test_a_field_gone_from_the_source_is_not_a_change_to_send():
    values = {k: v for k, v in VALUES.items() if k != "title"}  # the cell was emptied: not in the payload
    assert changed_since(values, {k: v for k, v in NOW.items() if k != "title"}, NOW) == {}


def test_sets_changed_when_labels_or_a_custom_field_moved_or_nothing_is_known():
    assert not sets_changed(VALUES, NOW, NOW, ())
    assert sets_changed(VALUES, NOW, NOW | {"label_names": "9"}, ())
    assert sets_changed(VALUES, NOW, NOW | {"custom.cf_1": "9"}, ())
    assert sets_changed(VALUES, NOW, None, ())
    assert not sets_changed({"email": "a@x.io"}, {"email": "1"}, None, ())  # no labels, no customs to merge
    assert sets_changed({"email": "a@x.io"}, {"email": "1"}, None, ("Run",))


def test_differing_from_compares_with_apollos_copy_email_by_case_phones_by_digits():
    contact = {"email": "A@X.IO", "title": "Founder", "phone_numbers": [{"raw_number": "+1 (415) 555-0100"}]}
    assert differing_from(VALUES, contact) == {"title": "CEO"}
    assert differing_from(VALUES, {"email": "a@x.io"}) == {"title": "CEO", "direct_phone": "+14155550100"}


def test_labels_are_only_added_to_what_the_contact_has():
    wanted = wanted_labels(VALUES, ("Run", "Src"))
    assert wanted == ["Src", "Run"]
    assert labels_to_set(["Rep", "Src"], wanted) == ["Rep", "Src", "Run"]
    assert labels_to_set(["Run", "Src", "Rep"], wanted) is None  # nothing missing: labels not sent
    assert labels_to_set(None, wanted) == ["Src", "Run"]


def test_custom_fields_keep_what_apollo_has_and_take_the_sources_values():
    assert customs_to_set({"cf_9": "keep", "cf_1": "silver"}, {"cf_1": "gold"}) == {"cf_9": "keep", "cf_1": "gold"}
    assert customs_to_set({"cf_1": "gold", "cf_9": "keep"}, {"cf_1": "gold"}) is None
    assert customs_to_set(None, None) is None


def test_a_dry_run_names_what_would_change():
    assert would_change("title=1;label_names=2", "title=0;label_names=2") == "would change: title"
    assert would_change("title=1;label_names=3", "title=1;label_names=2") == "would change: label_names (added)"
    assert "every non-empty field" in would_change("title=1", None)
    assert "nothing to send" in would_change("email=1", "email=1;title=1")
