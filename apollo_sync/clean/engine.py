"""prepare(): the fast engine that turns a frame of exported contact rows into contacts ready for Bulk Create.

What a clean, valid, deduplicated contact *is* is stated in :mod:`apollo_sync.clean.rules`, row by row in plain
Python; this module gives the same results over whole columns, fast, and a property test holds the two together.
The pipeline:

1. **Batches** of ``options.batch_rows`` rows (a LazyFrame read through the streaming engine, the first batch
   short), two at once in threads: each is mapped, cleaned and validated (:mod:`apollo_sync.clean.batch`), and its
   identity hashes sorted in its worker (:func:`apollo_sync.clean.dedupe.identity_keys`).
2. **Fingerprints** of every batch's rows, computed while the dedupe runs.
3. **Dedupe** across batches from those hashes, reading back only the rows whose hash repeats
   (:func:`apollo_sync.clean.dedupe.duplicate_groups`).
4. **Merge** per batch again: rejected rows and duplicates dropped in one filter, survivors filled and their
   fingerprints redone.

With ``out_dir`` every intermediate and result is a Parquet part on disk (:mod:`apollo_sync.clean.parts`) and the
Prepared holds LazyFrames. How fast, and why it is built so: BENCHMARKS.md ("The transform").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import polars as pl

from apollo_sync import settings
from apollo_sync.clean.batch import clean_batch
from apollo_sync.clean.columns import CONTACT_COLUMNS, SOURCE_ROW
from apollo_sync.clean.dedupe import duplicate_groups, fingerprints, identity_keys, merge_batch
from apollo_sync.clean.frames import pick
from apollo_sync.clean.mapping import CUSTOM_PREFIX, Mapping, plan_columns, require_identity
from apollo_sync.clean.options import EngineOptions
from apollo_sync.clean.parts import Parts
from apollo_sync.clean.phones import check_region

T = TypeVar("T")
R = TypeVar("R")

PIPELINE_DEPTH = 2
"""Batches worked on at once, in threads (polars releases the GIL): one batch's single-threaded steps (eager
Series work, library calls) overlap the other's, which measured ~1.5 -> ~1.8 of the 2 cores busy."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made of a frame. Every row read is in exactly one of the three frames.

    The frames are DataFrames, or with ``prepare(..., out_dir=...)`` LazyFrames scanning Parquet parts in that
    directory (so a 10M-row source never sits in memory whole); the ``*_count`` fields give their heights.
    """

    contacts: pl.DataFrame | pl.LazyFrame
    """One row per contact to send, in the frame's (source) order: see :data:`CONTACT_COLUMNS`."""
    rejected: pl.DataFrame | pl.LazyFrame
    """source_row, email (as read), reason (too_large | invalid_email | missing_identity), original (JSON of the row
    as read)."""
    duplicates: pl.DataFrame | pl.LazyFrame
    """source_row, email, merged_into (source_row of the surviving row)."""
    rows_read: int
    unmapped_columns: list[str]
    phones_dropped: int
    """Phone values (in rows not rejected) that were present but not valid numbers, so not sent."""
    column_map: dict[str, str] = field(default_factory=dict)
    """source column -> Apollo field (or ``custom.<id>``, ``name``, ``city``...) it fed."""
    phones_dropped_by_reason: dict[str, int] = field(default_factory=dict)
    """``phones_dropped`` by reason: each of :data:`~apollo_sync.settings.PHONE_DROP_REASONS` (``invalid``,
    ``unparseable``), 0 or more."""
    contacts_count: int = 0
    rejected_count: int = 0
    duplicates_count: int = 0


def prepare(
    frame: pl.LazyFrame | pl.DataFrame,
    *,
    mapping: Mapping | None = None,
    phone_region: str = settings.DEFAULT_PHONE_REGION,
    out_dir: str | Path | None = None,
    options: EngineOptions = EngineOptions(),
    on_ready: Callable[[pl.DataFrame], None] | None = None,
) -> Prepared:
    """Map, clean, validate and dedupe exported rows (all ``pl.String`` columns, optional ``source_row``).

    Rows are numbered from 1 when ``source_row`` is absent. Raises InputError when no column can give a
    row an identity (no email, and not first/last name + company), or for a bad mapping or region.

    The frame is read ``options.batch_rows`` at a time (a LazyFrame through the streaming engine), so memory is
    bounded by a batch plus the cleaned rows. With ``out_dir`` the cleaned rows and the three results go to
    Parquet files there instead (``contacts-*.parquet``, ``rejected-*.parquet``, ``duplicates-*.parquet``,
    then :data:`~apollo_sync.clean.parts.DONE_MARKER`) and the Prepared's frames are LazyFrames scanning them:
    memory then holds two batches, 12 bytes a row (identity hash and position) and the rows whose identity
    repeats. The results are the same either way, and whatever ``options`` say.

    ``on_ready(part)`` is called with each part of the contacts, in order, as soon as it is final (from this
    thread; it may block, which holds the engine back: a sending run plans and sends each part while the next is
    merged, so nothing holds every contact at once).
    """
    region = check_region(phone_region)
    lf = frame.lazy()
    names = lf.collect_schema().names()
    lf = lf.with_columns(pl.exclude(SOURCE_ROW).cast(pl.String))  # the contract says String; be lenient
    if SOURCE_ROW not in names:
        lf = lf.with_row_index(SOURCE_ROW, offset=1)
    lf = lf.with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))
    mapping = mapping or Mapping()
    plan = plan_columns(names, mapping)
    require_identity(plan.sources, mapping, names)

    parts = Parts(out_dir)
    rows_read = 0
    phones_dropped = dict.fromkeys(settings.PHONE_DROP_REASONS, 0)
    keys_per_batch: list[pl.DataFrame] = []  # per batch: (hash, position) of each identity, sorted by hash
    heights: list[int] = []

    def clean(
        batch: tuple[int, pl.DataFrame],
    ) -> tuple[int, pl.DataFrame, pl.DataFrame, dict[str, int], pl.DataFrame]:
        offset, raw = batch
        cleaned, rejected, dropped = clean_batch(raw, plan.sources, mapping, region, options)
        return raw.height, cleaned, rejected, dropped, identity_keys(cleaned, offset, options)

    def numbered(batches: Iterator[pl.DataFrame]) -> Iterator[tuple[int, pl.DataFrame]]:
        offset = 0
        for raw in batches:
            yield offset, raw
            offset += raw.height

    with ThreadPoolExecutor(max_workers=PIPELINE_DEPTH, thread_name_prefix="apollo-sync-prepare") as pool:
        for height, cleaned, rejected, dropped, keys in in_order(pool, clean, numbered(batches(frame, lf, options))):
            rows_read += height
            phones_dropped = {why: phones_dropped[why] + dropped[why] for why in phones_dropped}
            parts.put("rejected", rejected)
            parts.put("clean", cleaned)
            keys_per_batch.append(keys)
            heights.append(height)
        offsets = [sum(heights[:i]) for i in range(len(heights))]
        # Fingerprints need no dedupe: they are computed while it runs, then redone for survivors it fills.
        prints = [pool.submit(lambda i: fingerprints(parts.get("clean", i)), i) for i in range(len(heights))]
        duplicates, groups = duplicate_groups(parts, keys_per_batch, offsets, heights)
        parts.put("duplicates", duplicates)

        def finish(index: int) -> pl.DataFrame:
            fingerprint = prints[index].result()  # before take(): that removes the part the fingerprints read
            rows = parts.take("clean", index).with_columns(fingerprint)
            return contact_columns(merge_batch(rows, groups, offsets[index]))

        for contacts in in_order(pool, finish, range(len(heights))):
            parts.put("contacts", contacts)
            if on_ready is not None:
                on_ready(contacts)
    return Prepared(
        contacts=parts.frame("contacts"),
        rejected=parts.frame("rejected"),
        duplicates=parts.frame("duplicates"),
        rows_read=rows_read,
        unmapped_columns=plan.unmapped,
        phones_dropped=sum(phones_dropped.values()),
        column_map=plan.column_map,
        phones_dropped_by_reason=phones_dropped,
        **parts.finish(rows_read=rows_read, phones_dropped=sum(phones_dropped.values())),
    )


def in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, with up to :data:`PIPELINE_DEPTH` items worked on at once."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= PIPELINE_DEPTH:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batches(frame: pl.LazyFrame | pl.DataFrame, lf: pl.LazyFrame, options: EngineOptions) -> Iterator[pl.DataFrame]:
    """The rows of ``lf`` (``frame`` with source_row) ``options.batch_rows`` at a time; one empty batch for no rows.

    The first batch from a LazyFrame is only ``options.first_batch_rows`` rows, so cleaning starts while the
    reader goes on.
    """
    batch_rows = options.batch_rows
    if isinstance(frame, pl.DataFrame) and frame.height <= batch_rows:
        yield lf.collect()
        return
    given = False
    pending: list[pl.DataFrame] = []
    size = 0
    for part in lf.collect_batches(chunk_size=min(batch_rows, options.first_batch_rows), maintain_order=True):
        pending.append(part)
        size += part.height
        if size and (not given or size >= batch_rows):
            given = True
            yield pl.concat(pending, rechunk=False) if len(pending) > 1 else pending[0]
            pending, size = [], 0
    if size:
        yield pl.concat(pending, rechunk=False) if len(pending) > 1 else pending[0]
    elif not given:
        yield lf.head(0).collect()


def contact_columns(contacts: pl.DataFrame) -> pl.DataFrame:
    """``contacts`` in :data:`CONTACT_COLUMNS` order, custom fields last."""
    return pick(contacts, *CONTACT_COLUMNS, *[c for c in contacts.columns if c.startswith(CUSTOM_PREFIX)])
