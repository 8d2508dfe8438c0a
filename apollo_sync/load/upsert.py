"""One chunk of an upsert: update what Apollo has, create what it lacks, then make what it matched equal the source.

For the rows of one chunk (``LoadSession`` calls :func:`upsert` instead of a plain create in ``upsert`` mode):

1. **By id.** A row the ledger knows an Apollo id for is updated through Bulk Update with the fields whose value
   changed since Apollo last confirmed them (:func:`~apollo_sync.load.update.changed_since`; every non-empty field
   when that is unknown). A row that changed only in fields the source now leaves empty sends nothing: Apollo
   keeps its values and the row is ``unchanged``.
2. **Create.** Rows with no id, and rows whose id the update answer did not list (Apollo no longer has that
   contact, or did not confirm it), go to Bulk Create; the second kind always with ``run_dedupe``, so a contact
   Apollo still has is matched, not doubled, and a deleted one is created again (its reason says so).
3. **Make equal.** A contact Bulk Create matched (``existing``) is updated by the id Apollo returned with the
   source's non-empty fields that differ from the copy Apollo returned. Apollo sets labels and custom fields
   whole, so where they may differ the update sends Apollo's own, read from the contact it returned (a matched
   contact, or the answer of step 1), with the source's added: no label is removed, no custom field dropped.

Each request goes through :meth:`LoadSession.request`: one rate budget, the pacer, the retry policy (an update is
idempotent, so a retry after an unknown outcome is always safe), bisection of a 422. Every row ends in one outcome:
``updated`` (with the fields changed in its reason), ``created``, ``existing`` (matched and already equal),
``unchanged``, or ``failed``/``unconfirmed`` with the reason; ``status`` says what the ledger stores.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
from typing import TYPE_CHECKING, Any

from apollo_sync.clean.payload import parse_field_hashes
from apollo_sync.load.chunks import RequestRows, RowOutcome
from apollo_sync.load.update import (
    CUSTOM,
    LABELS,
    changed_since,
    customs_to_set,
    differing_from,
    labels_to_set,
    payload_values,
    sets_changed,
    wanted_labels,
)

if TYPE_CHECKING:
    from apollo_sync.load.session import LoadSession, LoadStats

MISSING = "missing"
"""An update's outcome for an id its answer did not list (internal: such a row is then created with dedupe)."""
IN_STEP = "updated"
"""The ledger status of a contact that holds the source's values (updated, or found equal)."""


@dataclass
class _Equalise:
    """A row whose contact Apollo has returned, to make equal to the source (step 3)."""

    row: int
    contact: dict[str, Any]
    fields: dict[str, Any]
    updated: list[str]
    """Fields an earlier update of this run already changed."""
    matched: bool
    """Bulk Create matched it (``existing``), rather than an update of step 1 returning it."""


async def upsert(session: LoadSession, rows: RequestRows, dedupe: bool, call: LoadStats) -> list[RowOutcome]:
    """Update, create and make equal the rows of one chunk (see the module docstring); one outcome per row."""
    labels = session.config.labels
    # Parsed only for the rows an update touches: a first run's creates need neither.
    values = functools.cache(lambda i: payload_values(rows.payload[i]))
    now = functools.cache(lambda i: parse_field_hashes(rows.field_hashes[i]) or {})
    out: list[RowOutcome | None] = [None] * len(rows)
    to_create = [i for i in range(len(rows)) if not rows.update_id[i]]
    gone: set[int] = set()
    equalise: list[_Equalise] = []

    # 1. by id
    by_id, entries = [], []
    for i in range(len(rows)):
        if not (apollo_id := rows.update_id[i]):
            continue
        base = parse_field_hashes(rows.base_hashes[i])
        fields = changed_since(values(i), now(i), base)
        if fields or sets_changed(values(i), now(i), base, labels):
            # with no plain field to change, the id alone reads the contact back for step 3's merge
            by_id.append((i, list(fields)))
            entries.append({"id": apollo_id, **fields})
        else:
            reason = "changed only in fields the source left empty: Apollo keeps its values"
            out[i] = RowOutcome("unchanged", apollo_id, reason, status=IN_STEP)
    for (i, names), result in zip(by_id, await update(session, entries, call)):
        if result.outcome == MISSING:
            gone.add(i)
            to_create.append(i)
        elif result.outcome == "updated" and result.contact is not None:
            equalise.append(_Equalise(i, dict(result.contact), {}, names, matched=False))
        else:
            out[i] = result

    # 2. create
    if to_create:
        created = await session.create(rows.pick(to_create), dedupe or bool(gone), call)
        for i, result in zip(to_create, created):
            if result.outcome == "existing" and result.contact is not None:
                equalise.append(_Equalise(i, dict(result.contact), differing_from(values(i), result.contact), [], True))
            elif i in gone and result.outcome == "created":
                reason = f"Apollo no longer had contact {rows.update_id[i]}: created again"
                out[i] = RowOutcome("created", result.apollo_id, reason)
            else:
                out[i] = result

    # 3. make equal
    todo, entries = [], []
    for item in equalise:
        sets = {
            LABELS: labels_to_set(item.contact.get(LABELS), wanted_labels(values(item.row), labels)),
            CUSTOM: customs_to_set(item.contact.get(CUSTOM), values(item.row).get(CUSTOM)),
        }
        changes = item.fields | {name: value for name, value in sets.items() if value is not None}
        if changes:
            todo.append((item, list(changes)))
            entries.append({"id": item.contact["id"], **changes})
        else:
            out[item.row] = _settled(item, item.updated)
    for (item, names), result in zip(todo, await update(session, entries, call)):
        if result.outcome == "updated":
            out[item.row] = _settled(item, item.updated + names)
        else:
            what = "matched in Apollo" if item.matched else "its fields were updated"
            reason = f"{what}, but the update of {', '.join(names)} was not confirmed: {result.reason}"
            outcome = "unconfirmed" if result.outcome == MISSING else result.outcome
            out[item.row] = RowOutcome(outcome, str(item.contact["id"]), reason)
    return out  # type: ignore[return-value]  # every row got exactly one outcome above


def _settled(item: _Equalise, changed: list[str]) -> RowOutcome:
    """The outcome of a row Apollo now holds equal to the source: ``updated`` when this run changed something;
    else ``existing`` (matched, and it already held the source's values) or ``unchanged``."""
    apollo_id = str(item.contact["id"])
    if changed:
        return RowOutcome("updated", apollo_id, "updated: " + ", ".join(dict.fromkeys(changed)), status=IN_STEP)
    outcome = "existing" if item.matched else "unchanged"
    return RowOutcome(outcome, apollo_id, "Apollo already holds the source's values", status=IN_STEP)


async def update(session: LoadSession, entries: list[dict[str, Any]], call: LoadStats) -> list[RowOutcome]:
    """Send ``entries`` (``{"id": ..., <fields>}``, at most a chunk) in one Bulk Update; per entry ``updated`` with
    the contact Apollo returned, :data:`MISSING` when the answer did not list it, or ``failed``/``unconfirmed``."""
    if not entries:
        return []

    async def send(_dedupe: bool) -> Any:
        session.count(call, "update_requests")
        return await session.client.bulk_update(entries)

    def accept(answer: Any, _ticket: Any, _tries: Any) -> list[RowOutcome]:
        listed = {str(c.get("id")): c for c in answer.contacts}
        return [
            RowOutcome("updated", e["id"], None, contact=listed[e["id"]])
            if e["id"] in listed
            else RowOutcome(MISSING, e["id"], "not in the update answer")
            for e in entries
        ]

    async def split(_forced: bool) -> list[RowOutcome]:
        middle = len(entries) // 2
        return await update(session, entries[:middle], call) + await update(session, entries[middle:], call)

    def give(outcome: str, reason: str) -> list[RowOutcome]:
        return [RowOutcome(outcome, e["id"], reason) for e in entries]

    return await session.request(len(entries), send, accept, split, give, True, call)
