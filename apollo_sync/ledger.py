"""The sync ledger: what has been sent where, so re-runs send only what is new, changed or unconfirmed.

One row per (target, identity): the content fingerprint last sent, the Apollo id, a status (``pending`` before a
request, then ``created``/``existing``/``failed``), the run and the time. ``target`` is a stable hash of the
normalised base URL (:func:`target_for`; the key is not part of it). Rows are marked ``pending`` in one transaction
before their request and recorded in one transaction after it, so a run killed at any moment leaves every row it
may have sent as ``pending``; the next run sends those with ``run_dedupe`` true (``must_dedupe``) and no second
contact is created.

:class:`Ledger` is the small interface; :class:`SQLiteLedger` (WAL, under ``state_dir``) is the implementation
today. The SQL is kept portable (``INSERT ... ON CONFLICT ... DO UPDATE``) so a PostgreSQL ledger can sit beside
it with the same semantics. Also holds named marks (``get_mark``/``set_mark``) for incremental SQL cursors.
"""

from __future__ import annotations

import abc
import hashlib
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import polars as pl

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


class Ledger(abc.ABC):
    """What every ledger does. Open one with :meth:`Ledger.open`."""

    @staticmethod
    def open(state_dir: str | Path) -> Ledger:
        """Open (creating if needed) the ledger kept under ``state_dir``."""
        return SQLiteLedger(Path(state_dir) / LEDGER_FILE)

    def plan(self, target: str, contacts: pl.DataFrame, full_refresh: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Split ``contacts`` (columns ``identity``, ``fingerprint``, ...) into ``(to_send, unchanged)``.

        ``unchanged``: the identity is confirmed (created/existing) with the same fingerprint (never with
        ``full_refresh``). ``to_send`` gets a bool column ``must_dedupe``: the ledger has seen this identity
        before (a pending row from a killed run, a failed row, or changed content), so it must be sent with
        ``run_dedupe`` true. Both keep the input's columns and order.
        """
        for column in ("identity", "fingerprint"):
            if column not in contacts.columns:
                raise InputError(f"contacts for the ledger need a {column!r} column; prepare() makes it")
        known = self._known(target).rename({"fingerprint": "_ledger_fp", "status": "_ledger_status"})
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
        """Release the connection."""

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
        with self._lock:
            self._db.close()
