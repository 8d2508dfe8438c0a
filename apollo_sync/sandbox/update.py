"""The sandbox's Bulk Update Contacts and one-contact update, as parsers from a request body to an
:class:`~.wire.Operation`. The pipeline they run in (auth, rate windows, faults, counters) is the one bulk_create
runs in, in :mod:`.endpoint`; what an update does to a stored contact is :meth:`.state.SandboxState.update`.

- ``POST <prefix>/contacts/bulk_update``: ``contact_attributes`` (objects, each with a string ``id`` and its own
  fields) and/or ``contact_ids`` (strings) sharing the top-level fields; optional ``async``. At most 1,000
  contacts in all (more is a 422). 1 to 100 and not ``async``: applied and answered ``{"contacts": [...]}`` with
  every known contact updated (unknown ids left out, not an error). More than 100, or ``async: true``: applied
  and answered ``{"contacts": [], "async": true, "message": ...}``, with no outcome per contact.
- ``PATCH <prefix>/contacts/{id}``: the body is the fields; ``{"contact": {...}}``, or a 404 for an unknown id.
"""

from __future__ import annotations

import json
from typing import Any

from apollo_sync import settings
from apollo_sync.sandbox.state import SandboxState
from apollo_sync.sandbox.wire import BadRequest, Operation, Reply, checked_fields, error, is_str_list


def bulk_update_operation(raw: bytes) -> Operation:
    """Validate a bulk_update body (or raise BadRequest naming the field) into the operation that applies it."""
    body = _json_object(raw, "a 'contact_attributes' and/or 'contact_ids' list")
    changes = _attribute_changes(body.get("contact_attributes")) + _shared_changes(body)
    if not changes:
        raise BadRequest("contact_attributes or contact_ids must hold at least 1 contact")
    if len(changes) > settings.MAX_CONTACTS_PER_UPDATE:
        raise BadRequest(
            f"contact_attributes and contact_ids may hold at most {settings.MAX_CONTACTS_PER_UPDATE} contacts "
            f"per request; got {len(changes)}"
        )
    forced = body.get("async")
    if forced is not None and not isinstance(forced, bool):
        raise BadRequest("async must be a boolean")
    asynchronous = bool(forced) or len(changes) > settings.MAX_SYNC_UPDATE

    def apply(state: SandboxState) -> Reply:
        updated = state.update_many(changes)
        if asynchronous:
            message = f"update of {len(changes)} contacts accepted: it runs asynchronously, this answer holds no outcome"
            return Reply(200, {"contacts": [], "async": True, "message": message})
        return Reply(200, {"contacts": updated})

    return Operation(len(changes), apply)


def update_one_operation(family: str, contact_id: str, raw: bytes) -> Operation:
    """Validate a PATCH body (the fields to change) into the operation that updates ``contact_id``."""
    fields = checked_fields("", _json_object(raw, "the contact fields to change"), blanks=True)

    def apply(state: SandboxState) -> Reply:
        contact = state.update(contact_id, fields)
        if contact is None:
            return error(family, 404, f"no contact with id {contact_id!r}")
        return Reply(200, {"contact": contact})

    return Operation(1, apply)


def update_size(raw: bytes) -> int | None:
    """How many contacts a bulk_update body asks for, read loosely (a refused body too); None when unreadable."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    lists = (body.get("contact_attributes"), body.get("contact_ids"))
    return sum(len(x) for x in lists if isinstance(x, list))


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"request body is not valid JSON: send a JSON object with {what}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object with {what}")
    return body


def _attribute_changes(attributes: Any) -> list[tuple[str, dict[str, Any]]]:
    """(id, fields) for each of ``contact_attributes`` (absent or null: none)."""
    if attributes is None:
        return []
    if not isinstance(attributes, list):
        raise BadRequest("contact_attributes must be a list of objects, each with an 'id'")
    changes = []
    for i, item in enumerate(attributes):
        where = f"contact_attributes[{i}]"
        fields = checked_fields(where, item, blanks=True)
        contact_id = item.get("id")
        if not isinstance(contact_id, str) or not contact_id:
            raise BadRequest(f"{where}.id must be a non-empty string (the contact's id)")
        changes.append((contact_id, fields))
    return changes


def _shared_changes(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(id, the top-level fields) for each of ``contact_ids`` (absent or null: none)."""
    ids = body.get("contact_ids")
    if ids is None:
        return []
    if not is_str_list(ids) or not all(ids):
        raise BadRequest("contact_ids must be a list of non-empty strings")
    shared = checked_fields("", body, blanks=True)
    return [(contact_id, shared) for contact_id in ids]
