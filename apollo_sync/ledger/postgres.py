"""The sync ledger in PostgreSQL, for runs on several machines that must share one memory of what was sent.

Same tables and semantics as :class:`~apollo_sync.ledger.sqlite.SQLiteLedger` (see :mod:`apollo_sync.ledger`), with two differences that
matter across machines: every timestamp is the database's ``now()`` (one clock for all workers, so leases do not
depend on their clocks), and a claim is one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT ... DO UPDATE ...
WHERE ... RETURNING`` statement, so two workers claiming the same identity at the same moment cannot both get it
(the row lock of ``ON CONFLICT`` serialises them and the second one sees the first one's claim).

Open it with ``open_ledger(state_dir, "postgresql://user:pw@host:5432/db")``. Tables are created if missing (under
an advisory lock, so workers starting together do not race). The password never appears in reprs or errors.
psycopg is imported when a PostgresLedger is made, so importing this module (and :mod:`apollo_sync.ledger`) never
needs it.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import unquote, urlsplit

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.ledger.base import HOST, LEDGER_SCHEMA, LOSERS_SCHEMA, Claim, Ledger, pid_alive

SCHEMES = ("postgresql", "postgres")
_SCHEMA_LOCK = 72_616_571  # pg_advisory_xact_lock key while creating the tables
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sync_ledger (
        target      TEXT NOT NULL,
        identity    TEXT NOT NULL,
        fingerprint TEXT,
        apollo_id   TEXT,
        status      TEXT NOT NULL,
        run_id      TEXT,
        updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (target, identity)
    )""",
    # added with upsert; an earlier ledger is migrated in place, its rows diffed against nothing at first
    "ALTER TABLE sync_ledger ADD COLUMN IF NOT EXISTS field_hashes TEXT",
    """CREATE TABLE IF NOT EXISTS sync_marks (
        mark_key   TEXT PRIMARY KEY,
        mark_value TEXT,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS sync_runs (
        run_id       TEXT PRIMARY KEY,
        host         TEXT,
        pid          INTEGER,
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        finished     BOOLEAN NOT NULL DEFAULT false
    )""",
    # sync-partitions: which rows of a parent run's partitions another partition sends (pruned with the parent's run)
    """CREATE TABLE IF NOT EXISTS sync_partition_losers (
        parent_run_id    TEXT NOT NULL,
        partition        INTEGER NOT NULL,
        source_row       BIGINT NOT NULL,
        identity         TEXT NOT NULL,
        winner_partition INTEGER NOT NULL,
        winner_label     TEXT,
        winner_row       BIGINT NOT NULL,
        PRIMARY KEY (parent_run_id, partition, source_row)
    )""",
)
_HEARTBEAT = """
    INSERT INTO sync_runs (run_id, host, pid, heartbeat_at, finished) VALUES (%s, %s, %s, now(), false)
    ON CONFLICT (run_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, heartbeat_at = now(), finished = false
"""
_CLAIM = """
    INSERT INTO sync_ledger AS l (target, identity, fingerprint, apollo_id, status, run_id, updated_at)
    SELECT %(target)s, u.identity, u.fingerprint, NULL, 'pending', %(run_id)s, now()
    FROM unnest(%(identities)s::text[], %(fingerprints)s::text[]) AS u(identity, fingerprint)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, status = 'pending', run_id = excluded.run_id, updated_at = now()
    WHERE l.run_id IS NOT DISTINCT FROM excluded.run_id OR NOT (
        (l.status IN ('created', 'existing', 'updated') AND l.fingerprint IS NOT DISTINCT FROM excluded.fingerprint
         AND l.updated_at > %(since)s)
        OR (l.status = 'pending' AND EXISTS (
            SELECT 1 FROM sync_runs AS r WHERE r.run_id = l.run_id AND NOT r.finished
              AND r.heartbeat_at > now() - make_interval(secs => %(lease)s)))
    )
    RETURNING l.identity, (l.xmax <> 0) AS seen
"""
_RECORD = """
    INSERT INTO sync_ledger AS l (target, identity, fingerprint, apollo_id, status, run_id, updated_at, field_hashes)
    SELECT %(target)s, u.identity, u.fingerprint, u.apollo_id, u.status, %(run_id)s, now(), u.field_hashes
    FROM unnest(%(identities)s::text[], %(fingerprints)s::text[], %(apollo_ids)s::text[], %(statuses)s::text[],
                %(hashes)s::text[]) AS u(identity, fingerprint, apollo_id, status, field_hashes)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, apollo_id = COALESCE(excluded.apollo_id, l.apollo_id),
        status = excluded.status, run_id = excluded.run_id, updated_at = now(),
        field_hashes = CASE WHEN excluded.status IN ('created', 'updated') THEN excluded.field_hashes
                            WHEN excluded.status = 'existing' THEN NULL ELSE l.field_hashes END
"""
_MARK_PENDING = """
    INSERT INTO sync_ledger AS l (target, identity, fingerprint, apollo_id, status, run_id, updated_at)
    SELECT %(target)s, u.identity, u.fingerprint, NULL, 'pending', %(run_id)s, now()
    FROM unnest(%(identities)s::text[], %(fingerprints)s::text[]) AS u(identity, fingerprint)
    ON CONFLICT (target, identity) DO UPDATE SET
        fingerprint = excluded.fingerprint, status = 'pending', run_id = excluded.run_id, updated_at = now()
"""
_STORE_LOSERS = """
    INSERT INTO sync_partition_losers
        (parent_run_id, partition, source_row, identity, winner_partition, winner_label, winner_row)
    SELECT %(parent)s, u.* FROM unnest(%(partition)s::int[], %(source_row)s::bigint[], %(identity)s::text[],
                                       %(winner_partition)s::int[], %(winner_label)s::text[], %(winner_row)s::bigint[])
        AS u(partition, source_row, identity, winner_partition, winner_label, winner_row)
"""
_LOSERS = """
    SELECT partition, source_row, identity, winner_partition, winner_label, winner_row FROM sync_partition_losers
    WHERE parent_run_id = %s AND partition = %s AND source_row BETWEEN %s AND %s ORDER BY source_row
"""
_PRUNE_RUNS = "DELETE FROM sync_runs WHERE heartbeat_at < now() - make_interval(secs => %s)"
_PRUNE_LOSERS = """
    DELETE FROM sync_partition_losers AS l
    WHERE NOT EXISTS (SELECT 1 FROM sync_runs AS r WHERE r.run_id = l.parent_run_id)
"""
_SET_MARK = """
    INSERT INTO sync_marks (mark_key, mark_value, updated_at) VALUES (%s, %s, now())
    ON CONFLICT (mark_key) DO UPDATE SET mark_value = excluded.mark_value, updated_at = now()
"""


def redacted(url: str) -> str:
    """``url`` without the password (and without query or fragment): safe for reprs, logs and errors."""
    parts = urlsplit(url)
    user = f"{unquote(parts.username)}@" if parts.username else ""
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{user}{host}{parts.path}"


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database (psycopg 3, autocommit; each write is one statement or transaction)."""

    def __init__(self, url: str):
        import psycopg

        if urlsplit(url).scheme.lower() not in SCHEMES:
            raise InputError(f"--state-url must be a postgresql:// URL, got {redacted(url)}")
        self._shown = redacted(url)
        self._lock = threading.Lock()
        password = urlsplit(url).password
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=15, application_name="apollo-sync")
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    self._db.execute(statement)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if password:
                reason = reason.replace(password, "***").replace(unquote(password), "***")
            raise InputError(f"cannot open the ledger at {self._shown}: {reason}; check --state-url") from None
        super().__init__()

    def __repr__(self) -> str:
        return f"PostgresLedger({self._shown!r})"

    def _clock(self):
        with self._lock:
            return self._db.execute("SELECT now()").fetchone()[0]

    def _known(self, target: str, identities: pl.Series) -> pl.DataFrame:
        with self._lock:
            rows = self._db.execute(
                "SELECT l.identity, l.fingerprint, l.status, l.apollo_id, l.field_hashes"
                " FROM unnest(%s::text[]) AS batch(identity) JOIN sync_ledger AS l"
                " ON l.target = %s AND l.identity = batch.identity",
                (identities.drop_nulls().unique().to_list(), target),
            ).fetchall()
        return pl.DataFrame(rows, schema=LEDGER_SCHEMA, orient="row")

    def _claim(self, target: str, identities: list[str], fingerprints: list[str | None], run_id: str) -> Claim:
        if not identities:
            return Claim(frozenset(), frozenset())
        unique = dict(zip(identities, fingerprints))  # one statement may not touch a row twice
        identities, fingerprints = list(unique), list(unique.values())
        params = {"target": target, "run_id": run_id, "identities": identities, "fingerprints": fingerprints,
                  "since": self._since, "lease": float(self.lease_seconds)}  # fmt: skip
        with self._lock, self._db.transaction():
            self._db.execute(_HEARTBEAT, (run_id, HOST, os.getpid()))
            returned = self._db.execute(_CLAIM, params).fetchall()
            claimed = frozenset(identity for identity, _ in returned)
            refused_ids = [i for i in identities if i not in claimed]
            holders = dict(
                self._db.execute(
                    "SELECT identity, run_id FROM sync_ledger WHERE target = %s AND identity = ANY(%s)",
                    (target, refused_ids),
                ).fetchall()
            ) if refused_ids else {}  # fmt: skip
        seen = frozenset(identity for identity, was_there in returned if was_there)
        return Claim(claimed, seen, {i: holders.get(i) or "?" for i in refused_ids})

    def heartbeat(self, run_id: str) -> None:
        with self._lock:
            self._db.execute(_HEARTBEAT, (run_id, HOST, os.getpid()))

    def _finish(self, run_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE sync_runs SET finished = true WHERE run_id = %s", (run_id,))

    def _expire_dead_local_runs(self, run_ids: set[str]) -> bool:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, pid FROM sync_runs WHERE NOT finished AND host = %s AND run_id = ANY(%s)",
                (HOST, list(run_ids)),
            ).fetchall()
            dead = [run_id for run_id, pid in rows if pid is not None and not pid_alive(pid)]
            if dead:
                self._db.execute("UPDATE sync_runs SET finished = true WHERE run_id = ANY(%s)", (dead,))
        return bool(dead)

    def mark_pending(self, target: str, rows: pl.DataFrame, run_id: str) -> None:
        rows = rows.unique("identity", keep="last", maintain_order=True)
        if rows.height == 0:
            return
        params = {"target": target, "run_id": run_id, "identities": rows["identity"].to_list(),
                  "fingerprints": rows["fingerprint"].to_list()}  # fmt: skip
        with self._lock:
            self._db.execute(_MARK_PENDING, params)

    def _record(self, target: str, rows: list[tuple], run_id: str) -> None:
        identities, fingerprints, apollo_ids, statuses, hashes = (list(column) for column in zip(*rows))
        params = {"target": target, "run_id": run_id, "identities": identities, "fingerprints": fingerprints,
                  "apollo_ids": apollo_ids, "statuses": statuses, "hashes": hashes}  # fmt: skip
        with self._lock:
            self._db.execute(_RECORD, params)

    def get_mark(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT mark_value FROM sync_marks WHERE mark_key = %s", (key,)).fetchone()
        return None if row is None else row[0]

    def set_mark(self, key: str, value: str | None) -> None:
        with self._lock:
            self._db.execute(_SET_MARK, (key, value))

    def status_counts(self, target: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM sync_ledger WHERE target = %s GROUP BY status", (target,)
            ).fetchall()
        return {status: count for status, count in rows}

    def store_losers(self, parent_run_id: str, losers: pl.DataFrame) -> None:
        columns = {name: losers.get_column(name).to_list() for name in LOSERS_SCHEMA}
        with self._lock, self._db.transaction():
            self._db.execute(_HEARTBEAT, (parent_run_id, HOST, os.getpid()))
            self._db.execute("DELETE FROM sync_partition_losers WHERE parent_run_id = %s", (parent_run_id,))
            if losers.height:
                self._db.execute(_STORE_LOSERS, {"parent": parent_run_id, **columns})

    def losers(self, parent_run_id: str, partition: int, first_row: int, last_row: int) -> pl.DataFrame:
        with self._lock:
            rows = self._db.execute(_LOSERS, (parent_run_id, partition, first_row, last_row)).fetchall()
        return pl.DataFrame(rows, schema=LOSERS_SCHEMA, orient="row")

    def prune_runs(self, retention_seconds: float) -> int:
        keep = float(max(retention_seconds, self.lease_seconds))
        with self._lock, self._db.transaction():
            pruned = self._db.execute(_PRUNE_RUNS, (keep,)).rowcount
            self._db.execute(_PRUNE_LOSERS)
        return pruned

    def close(self) -> None:
        if self._db.closed:
            return
        self._finish_own_runs()
        with self._lock:
            self._db.close()

