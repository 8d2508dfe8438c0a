"""Reconciliation: answers mapped back to sent rows by email, then name + organization, one-to-one."""

from __future__ import annotations

import random

from hypothesis import given, settings as hsettings, strategies as st

from apollo_sync.load.reconcile import SentRow, reconcile


def contact(id_, email=None, first=None, last=None, org=None):
    return {"id": id_, "email": email, "first_name": first, "last_name": last, "organization_name": org}


def test_matches_by_email_case_insensitively_whatever_the_order():
    sent = [SentRow("Ann@Example.com"), SentRow("bob@example.com"), SentRow("cy@example.com")]
    got = reconcile(sent, [contact("c", "CY@example.com"), contact("a", "ann@example.com ")], [contact("b", "bob@EXAMPLE.com")])
    assert got.outcomes == ["created", "existing", "created"]
    assert got.apollo_ids == ["a", "b", "c"]
    assert got.unmatched_returned == 0


def test_falls_back_to_first_last_organization():
    sent = [SentRow(None, "Tim", "Zheng", "Apollo"), SentRow("x@example.com", "Ann", "Lee", "Acme")]
    got = reconcile(sent, [], [contact("t", None, "tim", "ZHENG", "apollo"), contact("x", "x@example.com")])
    assert got.outcomes == ["existing", "existing"]
    assert got.apollo_ids == ["t", "x"]


def test_existing_contact_with_another_email_matches_by_name():
    # Apollo matched by name + organization and returned its own record, which has a different email.
    sent = [SentRow("new@example.com", "Tim", "Zheng", "Apollo")]
    got = reconcile(sent, [], [contact("t", "old@example.com", "Tim", "Zheng", "Apollo")])
    assert got.outcomes == ["existing"] and got.apollo_ids == ["t"]


def test_row_absent_from_answer_is_unconfirmed_not_dropped():
    sent = [SentRow("a@example.com"), SentRow("b@example.com")]
    got = reconcile(sent, [contact("a", "a@example.com")])
    assert got.outcomes == ["created", "unconfirmed"]
    assert got.apollo_ids == ["a", None]


def test_tie_never_gives_one_contact_to_two_rows():
    sent = [SentRow("a@example.com", "A", "B", "C"), SentRow("A@example.com", "A", "B", "C")]
    got = reconcile(sent, [], [contact("only", "a@example.com", "A", "B", "C")])
    assert sorted(got.outcomes) == ["existing", "unconfirmed"]
    assert got.apollo_ids.count("only") == 1


def test_second_contact_for_a_matched_email_does_not_take_another_row_by_name():
    sent = [SentRow("a@example.com", "Same", "Name", "Org"), SentRow(None, "Same", "Name", "Org")]
    got = reconcile(sent, [contact("1", "a@example.com", "Same", "Name", "Org"), contact("2", "a@example.com", "Same", "Name", "Org")])
    assert got.outcomes == ["created", "unconfirmed"]
    assert got.unmatched_returned == 1


def test_unknown_returned_contact_is_counted_not_assigned():
    got = reconcile([SentRow("a@example.com")], [contact("z", "zed@example.com")])
    assert got.outcomes == ["unconfirmed"] and got.unmatched_returned == 1


@hsettings(max_examples=60, deadline=None)
@given(
    emails=st.lists(st.sampled_from(["a@x.io", "b@x.io", "c@x.io", "d@x.io", None]), min_size=1, max_size=12),
    seed=st.integers(0, 10_000),
)
def test_property_one_to_one_and_every_row_has_an_outcome(emails, seed):
    rng = random.Random(seed)
    sent = [SentRow(e, f"F{i % 3}", "L", "O") for i, e in enumerate(emails)]
    returned = [contact(f"id{i}", (e.upper() if e and rng.random() < 0.5 else e), f"F{i % 3}", "l", "o")
                for i, e in enumerate(emails) if rng.random() < 0.8]
    rng.shuffle(returned)
    split = rng.randrange(len(returned) + 1)
    got = reconcile(sent, returned[:split], returned[split:])
    assert len(got.outcomes) == len(sent)
    ids = [i for i in got.apollo_ids if i is not None]
    assert len(ids) == len(set(ids))  # one Apollo contact never goes to two rows
    assert len(ids) + got.unmatched_returned == len(returned)
    by_id = {c["id"]: c for c in returned}
    for row, apollo_id, outcome in zip(sent, got.apollo_ids, got.outcomes):
        assert (apollo_id is None) == (outcome == "unconfirmed")
        if apollo_id is not None and row.email and by_id[apollo_id]["email"]:
            assert by_id[apollo_id]["email"].lower() == row.email.lower()
