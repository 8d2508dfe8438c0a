"""The rows of a load as the session handles them: chunks cut from prepare()'s contacts, the plain lists one
request sends, and the outcomes frame every row ends in (pure polars and lists; no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import polars as pl

from apollo_sync.clean.payload import payload_fields, with_payload
from apollo_sync.errors import InputError
from apollo_sync.load.reconcile import SentRow

OUTCOMES_SCHEMA = {
    "source_row": pl.Int64,
    "email": pl.String,
    "outcome": pl.String,
    "apollo_id": pl.String,
    "reason": pl.String,
}
"""The outcomes frame every ``load`` returns (common contract)."""

REQUIRED_COLUMNS = ("source_row", "identity")
OPTIONAL_COLUMNS = (
    "fingerprint", "email", "first_name", "last_name", "organization_name", "update_id", "base_hashes", "field_hashes",
)
"""Used when present: ``update_id``/``base_hashes`` come from an upsert plan, ``field_hashes`` from the plan."""


@dataclass(frozen=True)
class Chunk:
    """At most ``chunk_size`` rows sent in one request; ``must_dedupe`` chunks always go with ``run_dedupe``;
    ``updates``: every row has an Apollo id to update by (an upsert of contacts the ledger knows)."""

    number: int
    rows: pl.DataFrame
    must_dedupe: bool = False
    updates: bool = False

    def __len__(self) -> int:
        return self.rows.height


def cut_chunks(to_send: pl.DataFrame, chunk_size: int, first_number: int = 0) -> list[Chunk]:
    """Cut ``to_send`` into chunks of at most ``chunk_size`` rows, numbered from ``first_number``.

    Needs ``source_row`` and ``identity``; ``fingerprint``, ``email``, ``first_name``, ``last_name``,
    ``organization_name`` and ``must_dedupe`` are used when present. The JSON sent per row is its ``payload``
    column, or when there is none it is written here from the Apollo field columns (prepare()'s contacts) by
    :func:`apollo_sync.clean.payload.with_payload`. Rows that must be deduped are chunked apart, so they do not
    force dedupe on new rows.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in to_send.columns]
    if "payload" not in to_send.columns and not payload_fields(to_send.columns):
        missing.append("payload")
    if missing:
        raise InputError(f"rows to load lack column(s) {', '.join(missing)}; pass the contacts from prepare()")
    if "payload" not in to_send.columns:
        to_send = with_payload(to_send)
    frame = to_send.with_columns(
        [pl.lit(None, dtype=pl.String).alias(c) for c in OPTIONAL_COLUMNS if c not in to_send.columns]
    )
    if "must_dedupe" not in frame.columns:
        frame = frame.with_columns(must_dedupe=pl.lit(False))
    frame = frame.select(
        pl.col("source_row").cast(pl.Int64),
        *[pl.col(c).cast(pl.String) for c in ("identity", "payload", *OPTIONAL_COLUMNS)],
        pl.col("must_dedupe").fill_null(True).cast(pl.Boolean),
    )
    chunks: list[Chunk] = []
    for updates in (False, True):
        for flag in (False, True):
            kind = (pl.col("must_dedupe") == flag) & (pl.col("update_id").is_not_null() == updates)
            part = frame.filter(kind).drop("must_dedupe")
            for start in range(0, part.height, chunk_size):
                chunks.append(Chunk(first_number + len(chunks), part.slice(start, chunk_size), flag, updates))
    return chunks


def group_lists(rows: pl.DataFrame, sizes: Sequence[int]) -> list[RequestRows]:
    """A group's ``rows`` (its chunks' rows, in order) as plain lists, sliced per chunk (``sizes``): one conversion
    for the group (a few MB for 10,000 rows; a whole part as Python objects would take hundreds)."""
    every = RequestRows.of(rows)
    out, start = [], 0
    for size in sizes:
        out.append(every.slice(start, start + size))
        start += size
    return out


@dataclass
class RequestRows:
    """The rows of one request as plain lists (cheap to slice when bisecting)."""

    source_row: list[int]
    identity: list[str]
    fingerprint: list[str | None]
    payload: list[str]
    email: list[str | None]
    sent: list[SentRow]
    update_id: list[str | None]
    base_hashes: list[str | None]
    field_hashes: list[str | None]

    def __len__(self) -> int:
        return len(self.payload)

    def slice(self, start: int, stop: int) -> RequestRows:
        return RequestRows(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    @classmethod
    def of(cls, frame: pl.DataFrame) -> RequestRows:
        cols = {c: frame[c].to_list() for c in frame.columns}
        sent = list(map(SentRow, cols["email"], cols["first_name"], cols["last_name"], cols["organization_name"]))
        return cls(cols["source_row"], cols["identity"], cols["fingerprint"], cols["payload"], cols["email"], sent,
                   cols["update_id"], cols["base_hashes"], cols["field_hashes"])  # fmt: skip

    def pick(self, indexes: Sequence[int]) -> RequestRows:
        """The rows at ``indexes``, in that order."""
        return RequestRows(*([getattr(self, f.name)[i] for i in indexes] for f in fields(self)))


@dataclass
class RowOutcome:
    """How one sent row ended: ``outcome`` (created, existing, updated, unchanged, failed, unconfirmed), its Apollo
    id, a reason; ``contact``: Apollo's copy from the answer (upsert diffs against it); ``status``: what the ledger
    stores when it is not the outcome (an upsert that found nothing to change is in step: ``updated``)."""

    outcome: str
    apollo_id: str | None
    reason: str | None
    contact: Mapping[str, Any] | None = None
    status: str | None = None


@dataclass
class Ends:
    """Outcomes as plain column lists (``OUTCOMES_SCHEMA`` order): a chunk's, gathered into its group's, which
    becomes one frame at the group's end (no frame per chunk)."""

    source_row: list[int] = field(default_factory=list)
    email: list[str | None] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)
    apollo_id: list[str | None] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)

    @classmethod
    def of(cls, rows: RequestRows, ends: Sequence[RowOutcome]) -> Ends:
        """The outcomes of ``rows`` (same order)."""
        return cls(rows.source_row, rows.email, [e.outcome for e in ends], [e.apollo_id for e in ends],
                   [e.reason for e in ends])  # fmt: skip

    def extend(self, other: Ends) -> None:
        for name in OUTCOMES_SCHEMA:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.outcome)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({name: getattr(self, name) for name in OUTCOMES_SCHEMA}, schema=OUTCOMES_SCHEMA)


def claimed_elsewhere(rows: RequestRows, refused: Mapping[str, str]) -> Ends:
    """``duplicate`` outcomes for the rows whose identity another live run holds (``refused``: identity -> run)."""
    return Ends(list(rows.source_row), list(rows.email), ["duplicate"] * len(rows), [None] * len(rows),
                [f"claimed by another partition (run {refused[identity]})" for identity in rows.identity])  # fmt: skip
