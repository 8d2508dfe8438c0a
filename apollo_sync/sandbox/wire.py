"""What every sandbox route shares on the wire: the :class:`Reply`, the two error shapes, :class:`BadRequest` and
the checks of contact fields, and the :class:`Operation` a parsed request becomes. Kept apart from
:mod:`.endpoint` (the routes and the request pipeline) so that :mod:`.update` can use them without a cycle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apollo_sync import settings
from apollo_sync.sandbox.state import APOLLO, SandboxState

_GATEWAY_ERRORS = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("api_error", "internal_error"),
    503: ("api_error", "service_unavailable"),
}


@dataclass
class Reply:
    """One answer: status, JSON body and extra headers. ``body`` None: drop the connection without answering."""

    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """A validated request, ready to run: how many contacts it holds and what it does to the store.

    ``apply`` is called with the state's lock held, once the request passed the rate windows and the fault draw
    (so a ``fail_after_store`` fault has applied it before the 500).
    """

    size: int
    apply: Callable[[SandboxState], Reply]


class BadRequest(Exception):
    """A 422 with a message naming the field."""


def error(family: str, status: int, message: str) -> Reply:
    """An error reply in the way in's shape (the gateway's carries a request id, also as ``X-Request-Id``)."""
    if family == APOLLO:
        return Reply(status, {"status": status, "message": message})
    kind, code = _GATEWAY_ERRORS.get(status, ("api_error", "error"))
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    return Reply(
        status,
        {"error": {"type": kind, "code": code, "message": message, "request_id": request_id}},
        {"X-Request-Id": request_id},
    )


def checked_fields(where: str, contact: Any, *, blanks: bool) -> dict[str, Any]:
    """The known contact fields of ``contact`` (named ``where`` in messages), type-checked; unknown ones dropped.

    ``blanks`` False (create): a null field is left out. ``blanks`` True (update): a field given as null or ``""``
    is kept as given, since on an update it blanks the stored value.
    """
    if not isinstance(contact, dict):
        raise BadRequest(f"{where} must be a contact object" if where else "request body must be a JSON object")
    prefix = f"{where}." if where else ""
    kept: dict[str, Any] = {}
    for name in settings.CONTACT_FIELDS:
        if name not in contact:
            continue
        value = contact[name]
        if value is None or (blanks and value == ""):
            if blanks:
                kept[name] = value
            continue
        if name == "label_names":
            if not is_str_list(value):
                raise BadRequest(f"{prefix}label_names must be a list of strings")
        elif name == "typed_custom_fields":
            if not isinstance(value, dict):
                raise BadRequest(f"{prefix}typed_custom_fields must be an object")
        elif not isinstance(value, str):
            raise BadRequest(f"{prefix}{name} must be a string")
        kept[name] = value
    return kept


def is_str_list(value: Any) -> bool:
    """A JSON list of strings (empty included)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
