"""What the sandbox remembers and decides, with no HTTP: its config, the contact store, its id and dedupe indexes,
the rate windows, the fault draws and the counters, behind one lock.

Bulk Create stores new contacts (or matches them); Bulk Update and the one-contact update change stored ones in
place with Apollo's update semantics (a field given replaces the value, ``""`` or null blanks it, ``label_names``
replaces the labels), moving the dedupe indexes when an email or a name changes; :meth:`SandboxState.seed` stores
contacts that existed before a sync, outside every counter and window.

Rate limits are counted per API key, in fixed windows that start at multiples of their length since the epoch plus
the config's ``phase`` (0: aligned to the clock), or with ``sliding`` in windows that count the last ``length``
seconds. Time comes from the state's ``clock`` (``time.time`` unless one is injected), so a test can step a fake clock
over a window boundary instead of sleeping to one. Faults are drawn per request from one seeded ``random.Random``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from apollo_sync import settings
from apollo_sync.errors import InputError

Clock = Callable[[], float]
"""Seconds since the epoch, like ``time.time``."""
BY_SECOND_KEPT = 3600
"""Whole seconds of the clock whose request counts ``stats()`` keeps (the last hour of traffic)."""

GATEWAY = "gateway"
APOLLO = "apollo"
"""The two ways in (families): their error bodies and rate headers differ."""

FAULT_KINDS = ("drop", "fail_before_store", "burst_429", "slow", "fail_after_store")
"""Fault kinds in the order they are checked for each rate-counted request (creates and updates alike)."""

ENDPOINTS = ("bulk_create", "bulk_update", "update_one")
"""The rate-counted endpoints, as ``stats()["requests_by_endpoint"]`` names them (``update_one``: PATCH a contact)."""


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Probabilities are per request (bulk_create, bulk_update, PATCH), in [0, 1].

    ``rate`` requests per ``window`` seconds is the primary window (reported as Apollo's minute family);
    ``hourly_limit`` and ``daily_limit`` add 3600 s and 86400 s windows. ``None`` means no limit.
    Windows are fixed and start at multiples of their length plus ``phase`` seconds since the epoch (a server whose
    minutes do not turn with the clock's); ``sliding`` makes every window count the requests of the last ``window``
    (3600, 86400) seconds instead, and its reset the time until the oldest of them leaves it (one request frees up).
    ``latency`` seconds are slept on every such request. ``seed`` makes faults, ids and shuffles
    repeatable. ``shuffle`` returns each contact list in a random order, as the real API promises none.
    ``keep_contacts=False`` keeps of each contact only its id under its email (dedupe by email still works, a
    second create of a known email is counted in ``created_again``): for loads of millions of contacts, where
    whole records would take gigabytes; ``contacts()`` is then empty and updates find nothing.
    """

    api_key: str = field(default="sandbox-key", repr=False)
    rate: int | None = None
    window: float = 60.0
    phase: float = 0.0
    sliding: bool = False
    hourly_limit: int | None = None
    daily_limit: int | None = None
    latency: float = 0.0
    fail_before_store: float = 0.0
    fail_after_store: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 2.0
    drop: float = 0.0
    burst_429: float = 0.0
    seed: int | None = None
    shuffle: bool = True
    keep_contacts: bool = True

    def __post_init__(self) -> None:
        if not self.api_key:
            raise InputError("sandbox api_key is empty: give a non-empty key (default 'sandbox-key')")
        for name in ("rate", "hourly_limit", "daily_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"sandbox {name} must be a whole number >= 1 or unset; got {value!r}")
        if not self.window > 0:
            raise InputError(f"sandbox window must be > 0 seconds; got {self.window!r}")
        if not math.isfinite(self.phase):
            raise InputError(f"sandbox phase must be a finite number of seconds; got {self.phase!r}")
        for name in ("latency", "slow_seconds"):
            if getattr(self, name) < 0:
                raise InputError(f"sandbox {name} must be >= 0 seconds; got {getattr(self, name)!r}")
        for name in FAULT_KINDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"sandbox {name} is a probability: give a value in [0, 1]; got {value!r}")


@dataclass(frozen=True)
class Window:
    """One rate window: its family (``minute`` | ``hourly`` | ``daily``), limit and length in seconds."""

    family: str
    limit: int
    length: float


class SandboxState:
    """Store, dedupe indexes, rate windows, fault draws and counters, behind one lock. No HTTP here.

    Methods documented "lock held" expect the caller to hold ``lock`` (one request's checks and writes are
    one critical section); the others take it themselves.
    """

    def __init__(self, config: SandboxConfig, clock: Clock = time.time):
        self.config = config
        self.clock = clock
        self.lock = threading.Lock()
        self.windows = [
            Window(family, limit, length)
            for family, limit, length in (
                ("minute", config.rate, config.window),
                ("hourly", config.hourly_limit, settings.APOLLO_WINDOWS["hourly"]),
                ("daily", config.daily_limit, settings.APOLLO_WINDOWS["daily"]),
            )
            if limit is not None
        ]
        self.reset()

    def reset(self) -> None:
        """Clear store, counters and windows; restart the random stream from the seed."""
        with self.lock:
            self.rng = random.Random(self.config.seed)
            self.store: list[dict[str, Any]] = []
            self.by_id: dict[str, dict[str, Any]] = {}
            self.by_email: dict[str, dict[str, Any]] = {}
            self.by_name: dict[tuple[str, str, str], dict[str, Any]] = {}
            self.usage: dict[tuple[str, str], tuple[int, int]] = {}  # (key, family) -> (window index, count)
            self.recent: dict[tuple[str, str], deque[float]] = {}  # sliding: (key, family) -> times counted
            self.id_counter = itertools.count(1)
            self.requests = 0
            self.requests_by_endpoint = {name: 0 for name in ENDPOINTS}
            self.status_counts: dict[str, int] = {}
            self.faults = {kind: 0 for kind in FAULT_KINDS}
            self.max_contacts_in_request = 0
            self.max_contacts_in_update = 0
            self.created = 0
            self.created_again = 0
            self.existing = 0
            self.updated = 0
            self.async_updates = 0
            self.first_request_at: float | None = None
            self.last_request_at: float | None = None
            self.by_second: dict[int, int] = {}  # whole seconds of the clock -> requests answered in it (the last hour)

    # --- counters (lock held) ----------------------------------------------------------------
    def count_answer(self, label: str, endpoint: str = "bulk_create", *, asynchronous: bool = False) -> None:
        """Count one answered (or dropped) request of ``endpoint`` under ``label`` (``"200"``, ``"dropped"``...);
        ``asynchronous``: it was a bulk_update answered "accepted, runs asynchronously"."""
        self.requests += 1
        self.last_request_at = self.clock()
        self.first_request_at = self.first_request_at or self.last_request_at
        second = int(self.last_request_at)
        self.by_second[second] = self.by_second.get(second, 0) + 1
        if len(self.by_second) > BY_SECOND_KEPT:
            del self.by_second[next(iter(self.by_second))]
        self.requests_by_endpoint[endpoint] += 1
        self.status_counts[label] = self.status_counts.get(label, 0) + 1
        self.async_updates += asynchronous

    def note_size(self, contacts: int, endpoint: str = "bulk_create") -> None:
        """Remember the largest request seen per bulk endpoint, refused ones included (a PATCH holds one)."""
        if endpoint == "bulk_create":
            self.max_contacts_in_request = max(self.max_contacts_in_request, contacts)
        elif endpoint == "bulk_update":
            self.max_contacts_in_update = max(self.max_contacts_in_update, contacts)

    # --- rate windows (lock held) ------------------------------------------------------------
    def _window_state(self, key: str, now: float) -> list[tuple[Window, int, float]]:
        """(window, used in the current window, seconds until it resets) for each configured window.

        A sliding window "resets" when its oldest counted request leaves it (one request frees up)."""
        out = []
        for w in self.windows:
            if self.config.sliding:
                times = self._recent(key, w, now)
                out.append((w, len(times), (times[0] + w.length - now) if times else w.length))
                continue
            index = math.floor((now - self.config.phase) / w.length)
            seen_index, count = self.usage.get((key, w.family), (index, 0))
            used = count if seen_index == index else 0
            out.append((w, used, (index + 1) * w.length + self.config.phase - now))
        return out

    def _recent(self, key: str, w: Window, now: float) -> deque[float]:
        """A sliding window's request times of ``key``, those older than ``w.length`` seconds dropped."""
        times = self.recent.setdefault((key, w.family), deque())
        while times and times[0] <= now - w.length:
            times.popleft()
        return times

    def count_request(self, key: str, now: float) -> None:
        """Count one request of ``key`` in every window."""
        for w in self.windows:
            if self.config.sliding:
                self._recent(key, w, now).append(now)
                continue
            index = math.floor((now - self.config.phase) / w.length)
            seen_index, count = self.usage.get((key, w.family), (index, 0))
            self.usage[(key, w.family)] = (index, count + 1 if seen_index == index else 1)

    def rate_headers(self, family: str, key: str, now: float) -> dict[str, str]:
        """The rate headers of the way in, from the current usage; none when no limit is configured."""
        return _rate_headers(family, self._window_state(key, now))

    def over_limit(self, key: str, now: float) -> tuple[Window, float] | None:
        """The spent window that frees up last, with seconds until it does; None when all have room."""
        spent = [(w, reset_in) for w, used, reset_in in self._window_state(key, now) if used >= w.limit]
        return max(spent, key=lambda s: s[1]) if spent else None

    # --- store (lock held) -------------------------------------------------------------------
    def _new_id(self, now: float) -> str:
        # ObjectId-like: 8 hex of seconds, 8 random hex, 8 hex counter (unique within a server).
        return f"{int(now) & 0xFFFFFFFF:08x}{self.rng.getrandbits(32):08x}{next(self.id_counter) & 0xFFFFFFFF:08x}"

    def create_or_match(
        self, contacts: list[dict[str, Any]], append: list[str], run_dedupe: bool
    ) -> dict[str, list[dict[str, Any]]]:
        """Store the contacts (or match them when run_dedupe) and return the response body."""
        created, existing = [], []
        for contact in contacts:
            email, name = _email_key(contact), _name_key(contact)
            if run_dedupe:
                match = self.by_email.get(email) if email else (self.by_name.get(name) if name else None)
                if match is not None:
                    existing.append(_public(match))
                    continue
            created.append(_public(self._store_new(contact, append)))
        self.created += len(created)
        self.existing += len(existing)
        return {"created_contacts": self.shuffled(created), "existing_contacts": self.shuffled(existing)}

    def update(self, contact_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply ``changes`` (validated fields) to the stored contact; its public shape, or None for an unknown id.

        A field given replaces the stored value; null or ``""`` blanks it (null; ``[]`` for labels, ``{}`` for
        custom fields); a field not given is untouched. ``label_names`` and ``typed_custom_fields`` replace the
        stored ones whole (the client must merge). Phone fields rebuild ``phone_numbers``; an email or name change
        moves the dedupe indexes; ``updated_at`` moves. Counted in ``updated``.
        """
        record = self.by_id.get(contact_id)
        if record is None:
            return None
        self._apply(record, changes)
        self.updated += 1
        return _public(record)

    def update_many(self, changes: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Apply each (id, fields) in order, as :meth:`update`; the public shape of every contact updated, once each
        (and counted once), with its final values, in no promised order. Unknown ids are left out (not an error)."""
        updated: dict[str, dict[str, Any]] = {}
        for contact_id, fields in changes:
            record = self.by_id.get(contact_id)
            if record is not None:
                self._apply(record, fields)
                updated[contact_id] = record
        self.updated += len(updated)
        return self.shuffled([_public(record) for record in updated.values()])

    def shuffled(self, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``contacts`` in a random order when the config shuffles (the real API promises none), else as given."""
        if self.config.shuffle:
            self.rng.shuffle(contacts)
        return contacts

    def _store_new(self, contact: dict[str, Any], append: list[str]) -> dict[str, Any]:
        """Store ``contact`` as a new record (id, labels merged with ``append``, phone_numbers, stamps); index it."""
        now = self.clock()
        if not self.config.keep_contacts:  # lean: the id under the email, for dedupe and the created-twice count
            email = _email_key(contact)
            lean = {"id": self._new_id(now), "email": contact.get("email")}
            if email in self.by_email:
                self.created_again += 1
            elif email:
                self.by_email[email] = lean
            return lean
        record = dict(contact)
        record["id"] = self._new_id(now)
        record["label_names"] = _merge_labels(contact.get("label_names", []), append)
        record["typed_custom_fields"] = dict(contact.get("typed_custom_fields", {}))
        record["phone_numbers"] = _phone_numbers(contact)
        record["created_at"] = record["updated_at"] = _iso(now)
        self.store.append(record)
        self.by_id[record["id"]] = record
        email, name = _email_key(record), _name_key(record)
        if email:
            self.by_email.setdefault(email, record)
        if name:
            self.by_name.setdefault(name, record)
        return record

    def _apply(self, record: dict[str, Any], changes: dict[str, Any]) -> None:
        """Change ``record`` in place as :meth:`update` describes, without counting it."""
        old_email, old_name = _email_key(record), _name_key(record)
        for name, value in changes.items():
            record[name] = _updated_value(name, value)
        record["phone_numbers"] = _phone_numbers(record)
        record["updated_at"] = _iso(self.clock())
        _move_key(self.by_email, self.store, record, old_email, _email_key)
        _move_key(self.by_name, self.store, record, old_name, _name_key)

    def draw_fault(self) -> str | None:
        """One draw per configured fault kind, in order; the first that fires wins (lock held)."""
        for kind in FAULT_KINDS:
            p = getattr(self.config, kind)
            if p > 0 and self.rng.random() < p:
                self.faults[kind] += 1
                return kind
        return None

    # --- seeding and snapshots (take the lock) ----------------------------------------------
    def seed(self, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store validated contacts as if created before the sync (ids assigned, labels kept, indexes updated), outside
        every counter and rate window; their public shapes, in the order given."""
        with self.lock:
            return [_public(self._store_new(contact, [])) for contact in contacts]

    def knows(self, contact_id: str) -> bool:
        """Whether a contact with this id is stored."""
        with self.lock:
            return contact_id in self.by_id

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see ``SandboxServer.stats`` for what each means)."""
        with self.lock:
            return {
                "requests": self.requests,
                "requests_by_endpoint": dict(self.requests_by_endpoint),
                "status_counts": dict(self.status_counts),
                "faults": dict(self.faults),
                "contacts_stored": len(self.store),
                "max_contacts_in_request": self.max_contacts_in_request,
                "max_contacts_in_update": self.max_contacts_in_update,
                "created": self.created,
                "created_again": self.created_again,
                "existing": self.existing,
                "updated": self.updated,
                "async_updates": self.async_updates,
                "first_request_at": self.first_request_at,
                "last_request_at": self.last_request_at,
                "requests_by_second": [[second, n] for second, n in sorted(self.by_second.items())],
            }

    def contacts(self) -> list[dict[str, Any]]:
        """Copies of every stored contact, in creation order."""
        with self.lock:
            return json.loads(json.dumps(self.store))


def _rate_headers(family: str, state: list[tuple[Window, int, float]]) -> dict[str, str]:
    """The headers of the way in for (window, used, seconds to reset) of each window; none without a limit."""
    if not state:
        return {}
    if family == APOLLO:
        headers = {}
        for w, used, _ in state:
            headers[f"x-rate-limit-{w.family}"] = str(w.limit)
            headers[f"x-{w.family}-requests-left"] = str(max(w.limit - used, 0))
            headers[f"x-{w.family}-usage"] = str(used)
        return headers
    # Gateway: the tightest window (fewest left; on a tie the one that resets last).
    w, used, reset_in = min(state, key=lambda s: (s[0].limit - s[1], -s[2]))
    return {
        settings.GATEWAY_LIMIT_HEADER: str(w.limit),
        settings.GATEWAY_REMAINING_HEADER: str(max(w.limit - used, 0)),
        settings.GATEWAY_RESET_HEADER: f"{max(reset_in, 0.0):.3f}",
    }


def _iso(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _merge_labels(*lists: list[str]) -> list[str]:
    """Union of label lists, first occurrence order kept, no repeats."""
    return list(dict.fromkeys(itertools.chain.from_iterable(lists)))


def _email_key(contact: dict[str, Any]) -> str | None:
    email = (contact.get("email") or "").strip().lower()
    return email or None


def _name_key(contact: dict[str, Any]) -> tuple[str, str, str] | None:
    parts = tuple((contact.get(f) or "").strip().lower() for f in ("first_name", "last_name", "organization_name"))
    return parts if all(parts) else None  # type: ignore[return-value]


def _move_key(
    index: dict[Any, dict[str, Any]],
    store: list[dict[str, Any]],
    record: dict[str, Any],
    old: Any,
    key_of: Callable[[dict[str, Any]], Any],
) -> None:
    """After ``record``'s key in ``index`` changed from ``old``: the first other stored contact with ``old`` now
    answers for it (the earliest stored wins, as on create), and ``record`` answers for its new key unless an
    earlier contact does."""
    new = key_of(record)
    if new == old:
        return
    if old is not None and index.get(old) is record:
        heir = next((r for r in store if r is not record and key_of(r) == old), None)
        if heir is None:
            del index[old]
        else:
            index[old] = heir
    if new is not None:
        index.setdefault(new, record)


def _phone_numbers(contact: dict[str, Any]) -> list[dict[str, str]]:
    """Apollo's ``phone_numbers`` list, rebuilt from the phone fields that hold a number, in PHONE_FIELDS order."""
    return [{"raw_number": contact[p]} for p in settings.PHONE_FIELDS if contact.get(p)]


def _updated_value(name: str, value: Any) -> Any:
    """The value an update stores: a blank (null or ``""``) empties the field; lists and objects are copied."""
    if value is None or value == "":
        return [] if name == "label_names" else {} if name == "typed_custom_fields" else None
    return _copy(value)


def _public(contact: dict[str, Any]) -> dict[str, Any]:
    """The contact as bulk_create, bulk_update and PATCH return it: ``id``, every contact field it has stored (a
    blanked one as null), ``phone_numbers`` and the stamps. Copies: the answer is written outside the lock."""
    stored = (name for name in settings.CONTACT_FIELDS if name in contact)
    return {name: _copy(contact.get(name)) for name in ("id", *stored, "phone_numbers", "created_at", "updated_at")}


def _copy(value: Any) -> Any:
    """A copy of a JSON value that shares no list or object with the store."""
    if isinstance(value, (list, dict)):
        return json.loads(json.dumps(value))
    return value
