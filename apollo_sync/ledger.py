"""The sync ledger: what has been sent where, so re-runs send only what is new, changed or unconfirmed.

One row per (target, identity): the content fingerprint last sent, the Apollo id, a status (``pending`` before a
request, then ``created``/``existing``/``failed``), the run and the time. ``target`` is a stable hash of the
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

:class:`Ledger` is the small interface; :class:`SQLiteLedger` (WAL, under ``state_dir``) is the embedded default and
:class:`apollo_sync.ledger_pg.PostgresLedger` (``state_url=postgresql://...``) the one several machines can share,
with the same semantics. Also holds named marks (``get_mark``/``set_mark``) for incremental SQL cursors.
"""

from __future__ import annotations

import abc
import hashlib
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import polars as pl

from apollo_sync import settings
from apollo_sync.errors import InputError

LEDGER_FILE = "ledger.sqlite3"
CONFIRMED = ("created", "existing")
STATUSES = ("pending", "created", "existing", "failed")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sync_ledger (
        target      TEXT NOT NULL,
        identity    TEXT NOT NULL,
        fingerprint TEXT,
        apollo_id   TEXT,
        status      TEXT NOT NULL,
        run_id      TEXT,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (target, identity)
    )""",
    """CREATE TABLE IF NOT EXISTS sync_marks (
        mark_key   TEXT PRIMARY KEY,
        mark_value TEXT,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS sync_runs (
        run_id       TEXT PRIMARY KEY,
        host         TEXT,
        pid          INTEGER,
        heartbeat_at REAL NOT NULL,
        finished     INTEGER NOT NULL DEFAULT 0
    )""",
)

_MARK_PENDING = """
    INSERT INTO sync_ledger (target, identity, fingerprint, apollo_id, status, run_id, updated_at)
    VALUES (?, ?, ?, NULL, 'pending', ?, ?)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, status = 'pending', run_id = excluded.run_id,
        updated_at = excluded.updated_at
"""
_RECORD = """
    INSERT INTO sync_ledger (target, identity, fingerprint, apollo_id, status, run_id, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, apollo_id = COALESCE(excluded.apollo_id, sync_ledger.apollo_id),
        status = excluded.status, run_id = excluded.run_id, updated_at = excluded.updated_at
"""
_CLAIM = """
    INSERT INTO sync_ledger (target, identity, fingerprint, apollo_id, status, run_id, updated_at)
    VALUES (?1, ?2, ?3, NULL, 'pending', ?4, ?5)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, status = 'pending', run_id = excluded.run_id,
        updated_at = excluded.updated_at
    WHERE sync_ledger.run_id IS excluded.run_id OR NOT (
        (sync_ledger.status IN ('created', 'existing') AND sync_ledger.fingerprint IS excluded.fingerprint
         AND sync_ledger.updated_at > ?6)
        OR (sync_ledger.status = 'pending' AND EXISTS (
            SELECT 1 FROM sync_runs AS r WHERE r.run_id = sync_ledger.run_id AND r.finished = 0 AND r.heartbeat_at > ?7))
    )
"""
_HEARTBEAT = """
    INSERT INTO sync_runs (run_id, host, pid, heartbeat_at, finished) VALUES (?, ?, ?, ?, 0)
    ON CONFLICT (run_id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
        heartbeat_at = excluded.heartbeat_at, finished = 0
"""
_SET_MARK = """
    INSERT INTO sync_marks (mark_key, mark_value, updated_at) VALUES (?, ?, ?)
    ON CONFLICT (mark_key) DO UPDATE SET mark_value = excluded.mark_value, updated_at = excluded.updated_at
"""

_LEDGER_SCHEMA = {"identity": pl.String, "fingerprint": pl.String, "status": pl.String}


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """What :meth:`Ledger.claim` got: identities this run now holds, which of them the ledger already had (send
    those with dedupe), and for every refused identity the run that holds it."""

    claimed: frozenset[str]
    seen: frozenset[str]
    refused: dict[str, str] = field(default_factory=dict)


class Ledger(abc.ABC):
    """What every ledger does. Open one with :meth:`Ledger.open`."""

    lease_seconds: float = settings.CLAIM_LEASE_SECONDS
    """A pending claim of a run with no heartbeat for this long may be taken over."""

    @staticmethod
    def open(state_dir: str | Path, state_url: str | None = None) -> Ledger:
        """Open (creating if needed) the shared ledger at ``state_url`` (postgresql://…), else the one under ``state_dir``."""
        if state_url:
            from apollo_sync.ledger_pg import PostgresLedger

            return PostgresLedger(state_url)
        return SQLiteLedger(Path(state_dir) / LEDGER_FILE)

    def plan(self, target: str, contacts: pl.DataFrame | pl.LazyFrame, full_refresh: bool = False):
        """Split ``contacts`` (columns ``identity``, ``fingerprint``, ...) into ``(to_send, unchanged)``.

        ``unchanged``: the identity is confirmed (created/existing) with the same fingerprint (never with
        ``full_refresh``). ``to_send`` gets a bool column ``must_dedupe``: the ledger has seen this identity
        before (a pending row from a killed run, a failed row, or changed content), so it must be sent with
        ``run_dedupe`` true. Both keep the input's columns and order. A LazyFrame (prepare()'s Parquet parts)
        gives two LazyFrames: the ledger is read now, the contacts only when they are collected or sunk.
        """
        lazy = isinstance(contacts, pl.LazyFrame)
        names = contacts.collect_schema().names() if lazy else contacts.columns
        for column in ("identity", "fingerprint"):
            if column not in names:
                raise InputError(f"contacts for the ledger need a {column!r} column; prepare() makes it")
        self._planned_at = self._clock()
        known = self._known(target).rename({"fingerprint": "_ledger_fp", "status": "_ledger_status"})
        if lazy:
            known = known.lazy()
        joined = contacts.join(known, on="identity", how="left", maintain_order="left")
        is_unchanged = (
            pl.col("_ledger_status").is_in(CONFIRMED) & (pl.col("_ledger_fp") == pl.col("fingerprint"))
        ).fill_null(False)
        if full_refresh:
            is_unchanged = pl.lit(False)
        joined = joined.with_columns(
            _unchanged=is_unchanged, must_dedupe=pl.col("_ledger_status").is_not_null()
        )
        to_send = joined.filter(~pl.col("_unchanged")).drop("_ledger_fp", "_ledger_status", "_unchanged")
        unchanged = joined.filter(pl.col("_unchanged")).drop("_ledger_fp", "_ledger_status", "_unchanged", "must_dedupe")
        return to_send, unchanged

    @abc.abstractmethod
    def _known(self, target: str) -> pl.DataFrame:
        """Every (identity, fingerprint, status) the ledger holds for ``target``."""

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
        return getattr(self, "_planned_at", None) or self._opened_at

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
    def _finish(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def _expire_dead_local_runs(self, run_ids: set[str]) -> bool:
        """Finish those of ``run_ids`` that ran on this host in a process that is gone; True if any was."""

    def _finish_own_runs(self) -> None:
        for run_id in list(self._runs):
            try:
                self.finish(run_id)
            except Exception:  # noqa: BLE001 - closing must not fail; the lease expires on its own
                pass

    @abc.abstractmethod
    def record(self, target: str, outcomes: pl.DataFrame, run_id: str) -> None:
        """Record answers: ``outcomes`` has ``identity``, ``fingerprint``, ``outcome``, ``apollo_id``; one transaction.

        ``created``/``existing``/``failed`` are stored; ``unconfirmed`` rows stay ``pending`` (they may have
        landed), other outcomes are ignored.
        """

    @abc.abstractmethod
    def get_mark(self, key: str) -> str | None:
        """The value stored under ``key`` (e.g. an incremental cursor), or None."""

    @abc.abstractmethod
    def set_mark(self, key: str, value: str | None) -> None:
        """Store ``value`` under ``key``."""

    @abc.abstractmethod
    def status_counts(self, target: str) -> dict[str, int]:
        """How many identities the ledger holds for ``target`` in each status."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the runs this ledger claimed for (their leases end) and release the connection."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SQLiteLedger(Ledger):
    """The ledger in one SQLite file (WAL journal; each mark/record call is one transaction)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a killed process
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"cannot open the ledger at {self.path}: {exc}; check --state-dir") from None
        self._lock = threading.Lock()
        self._runs: set[str] = set()
        self._opened_at = self._clock()

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    def _known(self, target: str) -> pl.DataFrame:
        with self._lock:
            rows = self._db.execute(
                "SELECT identity, fingerprint, status FROM sync_ledger WHERE target = ?", (target,)
            ).fetchall()
        return pl.DataFrame(rows, schema=_LEDGER_SCHEMA, orient="row")

    def _write(self, sql: str, params: list[tuple]) -> None:
        if not params:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def mark_pending(self, target: str, rows: pl.DataFrame, run_id: str) -> None:
        now = _now()
        params = [
            (target, identity, fp, run_id, now)
            for identity, fp in zip(rows["identity"].to_list(), rows["fingerprint"].to_list())
        ]
        self._write(_MARK_PENDING, params)

    def _clock(self) -> str:
        return _now()

    def _claim(self, target: str, identities: list[str], fingerprints: list[str | None], run_id: str) -> Claim:
        if not identities:
            return Claim(frozenset(), frozenset())
        now, beat = _now(), time.time()
        cutoff = beat - self.lease_seconds
        marks = ",".join("?" * len(identities))
        select = f"SELECT identity, run_id FROM sync_ledger WHERE target = ? AND identity IN ({marks})"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one writer: the reads below see exactly what the upsert saw
            try:
                self._db.execute(_HEARTBEAT, (run_id, HOST, os.getpid(), beat))
                seen = {identity for identity, _ in self._db.execute(select, (target, *identities))}
                self._db.executemany(
                    _CLAIM, [(target, i, f, run_id, now, self._since, cutoff) for i, f in zip(identities, fingerprints)]
                )
                holders = dict(self._db.execute(select, (target, *identities)).fetchall())
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        claimed = frozenset(i for i in identities if holders.get(i) == run_id)
        refused = {i: holders.get(i) or "?" for i in identities if i not in claimed}
        return Claim(claimed, frozenset(seen & claimed), refused)

    def heartbeat(self, run_id: str) -> None:
        self._write(_HEARTBEAT, [(run_id, HOST, os.getpid(), time.time())])

    def _finish(self, run_id: str) -> None:
        self._write("UPDATE sync_runs SET finished = 1 WHERE run_id = ?", [(run_id,)])

    def _expire_dead_local_runs(self, run_ids: set[str]) -> bool:
        marks = ",".join("?" * len(run_ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT run_id, pid FROM sync_runs WHERE finished = 0 AND host = ? AND run_id IN ({marks})",
                (HOST, *run_ids),
            ).fetchall()
        dead = [(run_id,) for run_id, pid in rows if pid is not None and not _pid_alive(pid)]
        self._write("UPDATE sync_runs SET finished = 1 WHERE run_id = ?", dead)
        return bool(dead)

    def record(self, target: str, outcomes: pl.DataFrame, run_id: str) -> None:
        now = _now()
        params = [
            (target, identity, fp, apollo_id, outcome, run_id, now)
            for identity, fp, outcome, apollo_id in zip(
                outcomes["identity"].to_list(),
                outcomes["fingerprint"].to_list(),
                outcomes["outcome"].to_list(),
                outcomes["apollo_id"].to_list(),
            )
            if outcome in ("created", "existing", "failed")
        ]
        self._write(_RECORD, params)

    def get_mark(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT mark_value FROM sync_marks WHERE mark_key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_mark(self, key: str, value: str | None) -> None:
        self._write(_SET_MARK, [(key, value, _now())])

    def status_counts(self, target: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM sync_ledger WHERE target = ? GROUP BY status", (target,)
            ).fetchall()
        return {status: count for status, count in rows}

    def close(self) -> None:
        self._finish_own_runs()
        with self._lock:
            self._db.close()
