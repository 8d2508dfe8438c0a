"""The sync ledger: what has been sent where, so re-runs send only what is new, changed or unconfirmed.

One row per (target, identity): the content fingerprint last sent, the Apollo id, a status (``pending`` before a
request, then ``created``/``existing``/``updated``/``failed``), the run and the time, and for a contact that holds
the source's values (``created`` by us, or ``updated``) a hash of each field, which an upsert diffs against
(``Ledger.plan(mode="upsert")``). ``target`` is a stable hash of the
normalised base URL (:func:`target_for`; the key is not part of it). Rows are marked ``pending`` in one transaction
before their request and recorded in one transaction after it, so a run killed at any moment leaves every row it
may have sent as ``pending``; the next run sends those with ``run_dedupe`` true (``must_dedupe``) and no second
contact is created.

Claims (several runs on one ledger, e.g. the partitions of ``sync-partitions``): the loader marks rows pending
with :meth:`Ledger.claim`, one atomic upsert that takes a row only when no *live* run holds it pending and no other
run confirmed the same content since this run planned. A run is live while its heartbeat (``sync_runs``, renewed
by every claim and by the loader every ``HEARTBEAT_SECONDS``) is younger than ``lease_seconds``; a run that closed
its ledger is finished at once, and a run on this host whose process is gone is treated as dead. A claim of a dead
run is taken over, and every row the ledger already held is sent with dedupe (``Claim.seen``). Rows not claimed
are not sent: the loader reports them as ``duplicate`` (claimed by another partition).

:class:`Ledger` (:mod:`.base`) is the small interface; :class:`SQLiteLedger` (:mod:`.sqlite`, WAL, under
``state_dir``) is the embedded default and :class:`PostgresLedger` (:mod:`.postgres`, ``state_url=postgresql://...``)
the one several machines can share, with the same semantics. :func:`open_ledger` picks one. Also holds named marks
(``get_mark``/``set_mark``) for incremental SQL cursors.
"""

from __future__ import annotations

from pathlib import Path

from apollo_sync.ledger.base import Claim, Ledger, target_for
from apollo_sync.ledger.postgres import PostgresLedger
from apollo_sync.ledger.sqlite import LEDGER_FILE, SQLiteLedger

__all__ = ["LEDGER_FILE", "Claim", "Ledger", "PostgresLedger", "SQLiteLedger", "open_ledger", "target_for"]


def open_ledger(state_dir: str | Path, state_url: str | None = None) -> Ledger:
    """Open (creating if needed) the shared ledger at ``state_url`` (postgresql://…), else the one under ``state_dir``."""
    if state_url:
        return PostgresLedger(state_url)
    return SQLiteLedger(Path(state_dir) / LEDGER_FILE)
