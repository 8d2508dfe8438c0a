"""What an upsert sends to a contact Apollo already has (pure; no I/O).

Two ways to know what changed:

* against the ledger (:func:`changed_since`): the contact's field hashes now against those of the last values
  Apollo confirmed; with no such record (a contact Apollo matched but never took our values, or a ledger from
  before upsert) every non-empty field is sent;
* against Apollo's own copy (:func:`differing_from`): the contact as a Bulk Create (``existing_contacts``) or Bulk
  Update answer returned it.

Either way a field the source left empty is never sent, so it never blanks Apollo's value. Apollo's update sets
``label_names`` and ``typed_custom_fields`` whole, so both are merged with the copy Apollo returned: labels are only
ever added (:func:`labels_to_set`: what the contact has plus its source labels and the run's), and a custom field
the source does not have is kept (:func:`customs_to_set`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from apollo_sync import settings
from apollo_sync.clean.payload import parse_field_hashes

LABELS = "label_names"
CUSTOM = "typed_custom_fields"
CUSTOM_PREFIX = "custom."
"""How a custom field is named in the field hashes (its column name)."""


def payload_values(payload: str) -> dict[str, Any]:
    """A row's ``payload`` JSON (what Bulk Create gets) as a dict; only non-empty fields are in it."""
    return json.loads(payload)


def changed_since(values: Mapping[str, Any], now: Mapping[str, str], base: Mapping[str, str] | None) -> dict[str, Any]:
    """The plain fields of ``values`` whose hash in ``now`` differs from ``base`` (all when ``base`` is None).
    Labels and custom fields are left out: Apollo sets each whole, so they are merged with its copy
    (:func:`labels_to_set`, :func:`customs_to_set`); :func:`sets_changed` says whether that is needed."""
    return {
        name: value
        for name, value in values.items()
        if name not in (LABELS, CUSTOM) and (base is None or _moved(name, now, base))
    }


def sets_changed(values: Mapping[str, Any], now: Mapping[str, str], base: Mapping[str, str] | None,
                 run_labels: Iterable[str]) -> bool:  # fmt: skip
    """Whether the labels or custom fields a contact should carry changed since Apollo last confirmed them (an
    unknown base counts as changed when the contact has any)."""
    customs = [CUSTOM_PREFIX + key for key in values.get(CUSTOM) or {}]
    if base is None:
        return bool(customs or wanted_labels(values, run_labels))
    return any(_moved(name, now, base) for name in (LABELS, *customs))


def differing_from(values: Mapping[str, Any], contact: Mapping[str, Any]) -> dict[str, Any]:
    """The plain fields of ``values`` that Apollo's ``contact`` does not already hold (labels and custom fields
    left out, as for :func:`changed_since`)."""
    changed: dict[str, Any] = {}
    phones = _phone_digits(contact)
    for name, value in values.items():
        if name in (LABELS, CUSTOM):
            continue
        if name in settings.PHONE_FIELDS:
            if _digits(value) not in phones and not _same(value, contact.get(name)):
                changed[name] = value
        elif not _same(value, contact.get(name), fold=name == "email"):
            changed[name] = value
    return changed


def customs_to_set(held: Any, wanted: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``typed_custom_fields`` to send: Apollo's plus the source's non-empty ones where they differ; None when
    none differs (then the field is not sent, and no custom field Apollo holds is touched)."""
    have = dict(held) if isinstance(held, Mapping) else {}
    changes = {key: value for key, value in (wanted or {}).items() if not _same(value, have.get(key))}
    return {**have, **changes} if changes else None


def wanted_labels(values: Mapping[str, Any], run_labels: Iterable[str]) -> list[str]:
    """The labels a contact should carry: its source labels, then the run's."""
    return list(dict.fromkeys([*(values.get(LABELS) or []), *run_labels]))


def labels_to_set(held: Any, wanted: Iterable[str]) -> list[str] | None:
    """The ``label_names`` to send: what the contact holds plus what it lacks of ``wanted``; None when it lacks
    nothing (then labels are not sent at all)."""
    have = [label for label in held if isinstance(label, str)] if isinstance(held, list) else []
    missing = [label for label in wanted if label not in have]
    return [*have, *missing] if missing else None


def would_change(now: str | None, base: str | None) -> str:
    """A dry run's reason for an update: the fields whose hashes moved (``contact_field_hashes`` texts)."""
    if base is None:
        return "would update every non-empty field (what Apollo holds is not on record)"
    current, before = parse_field_hashes(now) or {}, parse_field_hashes(base) or {}
    names = [name for name in current if current[name] != before.get(name)]
    kept = [name for name in names if name != LABELS] + (["label_names (added)"] if LABELS in names else [])
    if not kept:
        return "changed only in fields the source left empty: nothing to send"
    return "would change: " + ", ".join(kept)


def _moved(name: str, now: Mapping[str, str], base: Mapping[str, str]) -> bool:
    return now.get(name) != base.get(name)


def _same(value: Any, held: Any, fold: bool = False) -> bool:
    if isinstance(value, str) and isinstance(held, str):
        a, b = value.strip(), held.strip()
        return a.casefold() == b.casefold() if fold else a == b
    return value == held


def _digits(value: Any) -> str:
    return re.sub(r"\D", "", value) if isinstance(value, str) else ""


def _phone_digits(contact: Mapping[str, Any]) -> set[str]:
    """The digits of every number Apollo lists for the contact (``phone_numbers``: raw and sanitized)."""
    found = set()
    for phone in contact.get("phone_numbers") or []:
        if isinstance(phone, Mapping):
            for key in ("raw_number", "sanitized_number"):
                if digits := _digits(phone.get(key)):
                    found.add(digits)
    return found
