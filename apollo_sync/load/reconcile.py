"""Map a bulk_create answer back to the rows that were sent (pure; no I/O).

The endpoint returns ``created_contacts`` and ``existing_contacts`` with no per-row status and no promised order.
Each returned contact is matched to one sent row: first by email (case-insensitive, trimmed), then by
first name + last name + organization (case-insensitive) for returned contacts whose email no sent row
has. Matching is one-to-one: two sent rows with the same key
never share one Apollo contact (the second stays unmatched). A sent row that nothing matched is ``unconfirmed``,
never dropped.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence


class SentRow(NamedTuple):
    """The fields of a sent row that matching uses (a tuple: a group of 10,000 rows builds 10,000 of them)."""

    email: str | None
    first_name: str | None = None
    last_name: str | None = None
    organization_name: str | None = None


@dataclass(frozen=True)
class Reconciled:
    """Per sent row (same order): ``outcome`` (created|existing|unconfirmed) and ``apollo_id`` (None if unmatched).

    ``unmatched_returned`` counts returned contacts that matched no sent row (or whose row was already taken).
    """

    outcomes: list[str]
    apollo_ids: list[str | None]
    unmatched_returned: int
    contacts: list[Mapping[str, Any] | None] = ()  # type: ignore[assignment]
    """Per sent row: the contact matched to it, as the answer returned it (None if unmatched)."""


def email_key(value: Any) -> str | None:
    """The email as matched: trimmed and lower-cased; None when empty."""
    if not isinstance(value, str):
        return None
    key = value.strip().lower()
    return key or None


def name_key(first: Any, last: Any, organization: Any) -> tuple[str, str, str] | None:
    """first|last|organization as matched (trimmed, lower-cased); None when all three are empty."""
    parts = tuple(v.strip().lower() if isinstance(v, str) else "" for v in (first, last, organization))
    return parts if any(parts) else None


def reconcile(
    sent: Sequence[SentRow],
    created: Iterable[Mapping[str, Any]],
    existing: Iterable[Mapping[str, Any]] = (),
) -> Reconciled:
    """Match the returned contacts to ``sent`` rows (see the module docstring)."""
    outcomes = ["unconfirmed"] * len(sent)
    ids: list[str | None] = [None] * len(sent)
    matched: list[Mapping[str, Any] | None] = [None] * len(sent)
    taken = [False] * len(sent)

    by_email: dict[str, deque[int]] = defaultdict(deque)
    for i, row in enumerate(sent):
        if (key := email_key(row.email)) is not None:
            by_email[key].append(i)

    returned = [("created", c) for c in created] + [("existing", c) for c in existing]
    left_over: list[tuple[str, Mapping[str, Any]]] = []

    def take(queue: deque[int] | None) -> int | None:
        while queue:
            i = queue.popleft()
            if not taken[i]:
                taken[i] = True
                return i
        return None

    # Pass 1: by email. Pass 2: what is left, by name + organization.
    for outcome, contact in returned:
        i = take(by_email.get(email_key(contact.get("email")) or ""))
        if i is None:
            left_over.append((outcome, contact))
            continue
        outcomes[i], ids[i], matched[i] = outcome, _id(contact), contact
    unmatched = 0
    # The name index is built only when some contact did not match by email (rare: rows without an email).
    by_name: dict[tuple[str, str, str], deque[int]] = defaultdict(deque)
    if left_over:
        for i, row in enumerate(sent):
            if (nkey := name_key(row.first_name, row.last_name, row.organization_name)) is not None:
                by_name[nkey].append(i)
    for outcome, contact in left_over:
        if email_key(contact.get("email")) in by_email:
            # A second contact for an email already matched: it is not another row's, whatever its name.
            unmatched += 1
            continue
        key = name_key(contact.get("first_name"), contact.get("last_name"), contact.get("organization_name"))
        i = take(by_name.get(key) if key is not None else None)
        if i is None:
            unmatched += 1
            continue
        outcomes[i], ids[i], matched[i] = outcome, _id(contact), contact
    return Reconciled(outcomes, ids, unmatched, matched)


def _id(contact: Mapping[str, Any]) -> str | None:
    value = contact.get("id")
    return None if value is None else str(value)
