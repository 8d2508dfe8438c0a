"""What every ledger does: the :class:`Ledger` interface, :class:`Claim`, :func:`target_for` and the helpers
both backends share (the polars schema of what a ledger knows, this host's name, whether a local process lives).

``plan`` (split one part of contacts into to-send and unchanged) and the claim protocol around ``_claim`` are written once
here; a backend supplies storage: ``_known``, ``_claim``, ``_clock`` and the writes. See :mod:`apollo_sync.ledger`
for the semantics.
"""

from __future__ import annotations

import abc
import hashlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import polars as pl

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.processes import pid_alive

__all__ = [
    "CONFIRMED", "HOST", "LEDGER_SCHEMA", "LOSERS_SCHEMA", "Claim", "Ledger", "now", "pid_alive", "recorded_rows", "target_for",
]  # fmt: skip

CONFIRMED = ("created", "existing", "updated")
STATUSES = ("pending", "created", "existing", "updated", "failed")
RECORDED = ("created", "existing", "updated", "failed")
"""Statuses ``record`` stores; ``unconfirmed`` rows stay ``pending`` and other outcomes are ignored."""
IN_STEP = ("created", "updated")
"""Statuses whose ``field_hashes`` are what Apollo holds: the contact took the source's values (created by us, or
updated and confirmed). ``existing`` means Apollo matched a contact it already had and kept its own values."""
LEDGER_SCHEMA = {
    "identity": pl.String,
    "fingerprint": pl.String,
    "status": pl.String,
    "apollo_id": pl.String,
    "field_hashes": pl.String,
}
"""The frame ``_known`` returns: what the ledger holds per identity for one target."""
LOSERS_SCHEMA = {
    "partition": pl.Int64,
    "source_row": pl.Int64,
    "identity": pl.String,
    "winner_partition": pl.Int64,
    "winner_label": pl.String,
    "winner_row": pl.Int64,
}
"""Rows of a ``sync-partitions`` run that another partition sends (``apollo_sync.partitions.partition_losers``):
this partition's row and identity, and the partition (number and label) and row whose version is sent instead."""
MODES = ("create", "upsert")
HOST = socket.gethostname()
"""This machine's name, stored with each run's heartbeat so runs on this host can be checked for a live process."""


def target_for(base_url: str) -> str:
    """A stable id for where contacts go: a hash of the base URL with case, default port and slashes normalised."""
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and not ((scheme, port) in (("http", 80), ("https", 443))):
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    normalised = urlunsplit((scheme, host, path, "", ""))
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()[:24]


def now() -> str:
    """The current UTC time as ISO 8601 text with milliseconds (what the SQLite ledger stores)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Claim:
    """What :meth:`Ledger.claim` got: identities this run now holds, which of them the ledger already had (send
    those with dedupe), and for every refused identity the run that holds it."""

    claimed: frozenset[str]
    seen: frozenset[str]
    refused: dict[str, str] = field(default_factory=dict)


class Ledger(abc.ABC):
    """What every ledger does. Open one with :func:`apollo_sync.ledger.open_ledger`.

    A backend opens its connection, then calls ``super().__init__()``, which reads the ledger's clock.
    """

    lease_seconds: float = settings.CLAIM_LEASE_SECONDS
    """A pending claim of a run with no heartbeat for this long may be taken over."""

    def __init__(self) -> None:
        self._runs: set[str] = set()
        self._planned_at = None
        self._opened_at = self._clock()

    def plan(
        self,
        target: str,
        contacts: pl.DataFrame,
        full_refresh: bool = False,
        mode: str = "create",
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Split ``contacts`` (one part of a run's rows: columns ``identity``, ``fingerprint``, ...) into
        ``(to_send, unchanged)``.

        The ledger is asked only about these identities (``_known`` joins against the batch), so memory follows
        the part, never the ledger's size: a run plans each part as it is cleaned.

        ``unchanged``: the identity is confirmed with the same fingerprint (never with ``full_refresh``). In
        ``upsert`` mode a contact confirmed only as ``existing`` is not unchanged: Apollo kept its own values, so
        it is updated until it is in step.

        ``to_send`` gets a bool column ``must_dedupe`` (the ledger has seen this identity before: a pending row
        from a killed run, a failed row, or changed content, so a create must go with ``run_dedupe`` true) and,
        in ``upsert`` mode, ``update_id``: the Apollo id to update by, for every row the ledger knows an id of
        (null: create it), and ``base_hashes``: the field hashes of the last values Apollo confirmed (null when
        unknown: send every non-empty field). Both keep the input's columns and order.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(contacts, pl.LazyFrame):
            raise InputError("Ledger.plan takes one part of contacts as a DataFrame; plan a lazy source part by part")
        for column in ("identity", "fingerprint"):
            if column not in contacts.columns:
                raise InputError(f"contacts for the ledger need a {column!r} column; prepare() makes it")
        if self._planned_at is None:
            self._planned_at = self._clock()  # the first part's plan: claims compare confirmations against it
        known = self._known(target, contacts.get_column("identity")).rename(
            {"fingerprint": "_ledger_fp", "status": "_ledger_status", "apollo_id": "_ledger_id", "field_hashes": "_ledger_hashes"}
        )
        joined = contacts.join(known, on="identity", how="left", maintain_order="left")
        confirmed = IN_STEP if mode == "upsert" else CONFIRMED
        is_unchanged = (
            pl.col("_ledger_status").is_in(confirmed) & (pl.col("_ledger_fp") == pl.col("fingerprint"))
        ).fill_null(False)
        if full_refresh:
            is_unchanged = pl.lit(False)
        added = {"_unchanged": is_unchanged, "must_dedupe": pl.col("_ledger_status").is_not_null()}
        if mode == "upsert":
            added["update_id"] = pl.col("_ledger_id")
            base = pl.when(pl.col("_ledger_status") != "existing").then(pl.col("_ledger_hashes"))
            added["base_hashes"] = pl.lit(None, pl.String) if full_refresh else base
        joined = joined.with_columns(**added)
        internal = ("_ledger_fp", "_ledger_status", "_ledger_id", "_ledger_hashes", "_unchanged")
        to_send = joined.filter(~pl.col("_unchanged")).drop(*internal)
        unchanged = joined.filter(pl.col("_unchanged")).drop(*internal, *[c for c in added if not c.startswith("_")])
        return to_send, unchanged

    @abc.abstractmethod
    def _known(self, target: str, identities: pl.Series) -> pl.DataFrame:
        """What the ledger holds for ``target`` about ``identities`` (:data:`LEDGER_SCHEMA`; one row per identity it
        knows, none for the others): one query joining against the batch."""

    @abc.abstractmethod
    def mark_pending(self, target: str, rows: pl.DataFrame, run_id: str) -> None:
        """Mark ``rows`` (``identity``, ``fingerprint``) pending before they are sent: one transaction."""

    def claim(self, target: str, rows: pl.DataFrame, run_id: str) -> Claim:
        """Claim ``rows`` (``identity``, ``fingerprint``) for ``run_id`` before they are sent: one atomic upsert.

        A row is claimed (and marked pending) unless another run holds it pending and is live, or another run
        confirmed it with the same fingerprint since this ledger's last :meth:`plan`. When some rows are refused,
        holders on this host whose process is gone are expired and those rows are tried once more.
        """
        identities = rows["identity"].to_list()
        fingerprints = rows["fingerprint"].to_list()
        result = self._claim(target, identities, fingerprints, run_id)
        self._runs.add(run_id)
        if result.refused and self._expire_dead_local_runs(set(result.refused.values())):
            again = [i for i, identity in enumerate(identities) if identity in result.refused]
            retry = self._claim(target, [identities[i] for i in again], [fingerprints[i] for i in again], run_id)
            result = Claim(result.claimed | retry.claimed, result.seen | retry.seen, retry.refused)
        return result

    def finish(self, run_id: str) -> None:
        """End ``run_id``'s lease at once: its pending rows (unconfirmed ones) may be taken over by other runs."""
        self._finish(run_id)
        self._runs.discard(run_id)

    @property
    def _since(self):
        """Confirmations after this moment (the last plan, else the opening) refuse a claim of the same content."""
        return self._planned_at or self._opened_at

    @abc.abstractmethod
    def _clock(self):
        """The ledger's notion of now, comparable with what it stores (the database's time where there is one)."""

    @abc.abstractmethod
    def _claim(self, target: str, identities: list[str], fingerprints: list[str | None], run_id: str) -> Claim:
        """One atomic claim of the given identities, renewing ``run_id``'s heartbeat in the same transaction."""

    @abc.abstractmethod
    def heartbeat(self, run_id: str) -> None:
        """Renew ``run_id``'s lease on everything it holds pending."""

    @abc.abstractmethod
    def _finish(self, run_id: str) -> None:
        """Mark ``run_id`` finished in storage."""

    @abc.abstractmethod
    def _expire_dead_local_runs(self, run_ids: set[str]) -> bool:
        """Finish those of ``run_ids`` that ran on this host in a process that is gone; True if any was."""

    def _finish_own_runs(self) -> None:
        for run_id in list(self._runs):
            try:
                self.finish(run_id)
            except Exception:  # noqa: BLE001 - closing must not fail; the lease expires on its own
                pass

    def record(self, target: str, outcomes: pl.DataFrame, run_id: str) -> None:
        """Record answers: ``outcomes`` has ``identity``, ``fingerprint``, ``outcome``, ``apollo_id`` and optionally
        ``status`` (overrides the status the outcome implies) and ``field_hashes``; one transaction.

        ``created``/``existing``/``updated``/``failed`` are stored (:func:`recorded_rows`); ``unconfirmed`` rows stay
        ``pending`` (they may have landed), other outcomes are ignored. The field hashes are kept for an in-step
        status, cleared for ``existing`` and left as they were otherwise (the last confirmed values stay the base
        of the next diff).
        """
        rows = recorded_rows(outcomes)
        if rows.height:
            self._record(target, list(rows.iter_rows()), run_id)

    def record_rows(self, target: str, rows: Iterable[tuple], run_id: str) -> None:
        """:meth:`record` for plain tuples ``(identity, fingerprint, apollo_id, status, field_hashes)`` (the load
        session's buffer: no frame per chunk); the same rules, one transaction."""
        kept = {row[0]: row for row in rows if row[3] in RECORDED}  # one row per identity: the last wins
        if kept:
            self._record(target, list(kept.values()), run_id)

    @abc.abstractmethod
    def _record(self, target: str, rows: list[tuple], run_id: str) -> None:
        """Store ``rows`` (``identity, fingerprint, apollo_id, status, field_hashes``; one per identity, statuses of
        :data:`RECORDED`) in one transaction."""

    @abc.abstractmethod
    def get_mark(self, key: str) -> str | None:
        """The value stored under ``key`` (e.g. an incremental cursor), or None."""

    @abc.abstractmethod
    def set_mark(self, key: str, value: str | None) -> None:
        """Store ``value`` under ``key``."""

    @abc.abstractmethod
    def status_counts(self, target: str) -> dict[str, int]:
        """How many identities the ledger holds for ``target`` in each status."""

    # --- partitions of one parent run, and pruning (``apollo_sync.partitions``) ------------------------------

    @abc.abstractmethod
    def store_losers(self, parent_run_id: str, losers: pl.DataFrame) -> None:
        """Keep ``losers`` (:data:`LOSERS_SCHEMA`) for the partitions of ``parent_run_id``, replacing what that run
        stored before (a retried parent), and start the parent's row in ``sync_runs`` so they are pruned with it:
        one transaction."""

    @abc.abstractmethod
    def losers(self, parent_run_id: str, partition: int, first_row: int, last_row: int) -> pl.DataFrame:
        """The stored losers of ``partition`` of ``parent_run_id`` with ``source_row`` in
        [``first_row``, ``last_row``] (:data:`LOSERS_SCHEMA`)."""

    @abc.abstractmethod
    def prune_runs(self, retention_seconds: float) -> int:
        """Delete the ``sync_runs`` rows with no heartbeat for ``retention_seconds`` (at least the lease: finished
        runs, and runs that died, whose claims anyone may take over anyway) and the losers of parent runs whose row
        is gone; returns how many runs were deleted. A run's ``sync_ledger`` rows are kept: they are the memory."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the runs this ledger claimed for (their leases end) and release the connection."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def recorded_rows(outcomes: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``outcomes`` the ledger stores, one per identity (the last wins), as columns ``identity``,
    ``fingerprint``, ``apollo_id``, ``status``, ``field_hashes`` (both backends write exactly these)."""
    status = pl.col("status") if "status" in outcomes.columns else pl.col("outcome")
    hashes = pl.col("field_hashes") if "field_hashes" in outcomes.columns else pl.lit(None, pl.String)
    return (
        outcomes.select(
            pl.col("identity").cast(pl.String),
            pl.col("fingerprint").cast(pl.String),
            pl.col("apollo_id").cast(pl.String),
            status.cast(pl.String).alias("status"),
            hashes.cast(pl.String).alias("field_hashes"),
        )
        .filter(pl.col("status").is_in(RECORDED))
        .unique("identity", keep="last", maintain_order=True)
    )
