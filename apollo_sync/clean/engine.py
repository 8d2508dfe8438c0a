"""prepare(): the fast engine that turns a frame of exported contact rows into contacts ready for Bulk Create.

What a clean, valid, deduplicated contact *is* is stated in :mod:`apollo_sync.clean.rules`, row by row in plain
Python; this module gives the same results over whole columns, fast, and a property test holds the two together.
The pipeline:

0. With ``out_dir``, a LazyFrame source is first copied once to Parquet there (:func:`spill_source`: polars'
   streaming sink, bounded memory); both passes below read that copy a slice at a time.
1. **Identities first**: the identity columns alone (email, names, organization) are cleaned batch by batch with
   the same functions, and each row's identity hashed (:func:`identity_pass`). The rows whose hash repeats are
   the *candidates*: only they can be duplicates or survivors.
2. **Batches** of ``options.batch_rows`` rows (the first batch short), two at once in threads: each is mapped,
   cleaned and validated (:mod:`apollo_sync.clean.batch`), its identities checked against the first read (a
   source that changed in between is refused), and every row that is not a candidate is final at once:
   fingerprinted and handed to ``on_ready`` (a sending run plans and sends it while the next batch is cleaned).
3. **Dedupe** of the candidates once the source is read (:func:`apollo_sync.clean.dedupe.candidate_groups`), and
   their **merge**: duplicates dropped, survivors filled, fingerprinted, handed over last.

With ``out_dir`` every intermediate and result is a Parquet part on disk (:mod:`apollo_sync.clean.parts`) and the
Prepared holds LazyFrames. How fast, and why it is built so: BENCHMARKS.md ("The transform").
"""

from __future__ import annotations

import itertools
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
from apollo_sync.clean.columns import KEY_HASH, POSITION
from apollo_sync.clean.dedupe import candidate_groups, fingerprints, identity_hashes, merge_candidates, repeated_positions
from apollo_sync.clean.frames import pick
from apollo_sync.clean.mapping import CUSTOM_PREFIX, FULL_NAME, ColumnPlan, Mapping, plan_columns, require_identity
from apollo_sync.clean.options import EngineOptions
from apollo_sync.clean.parts import Parts
from apollo_sync.clean.phones import check_region
from apollo_sync.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

DUPLICATES_SCHEMA = {SOURCE_ROW: pl.Int64, "email": pl.String, "merged_into": pl.Int64}
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

    The frame is read ``options.batch_rows`` at a time, so memory is bounded by a batch plus the cleaned rows.
    With ``out_dir`` a LazyFrame is read from a Parquet copy written there first (:func:`spill_source`), and the
    cleaned rows and the three results go to Parquet files there instead (``contacts-*.parquet``,
    ``rejected-*.parquet``, ``duplicates-*.parquet``, then :data:`~apollo_sync.clean.parts.DONE_MARKER`); the
    Prepared's frames are LazyFrames scanning them: memory then holds two batches, 12 bytes a row (identity hash
    and position) and the rows whose identity repeats. The results are the same either way, and whatever
    ``options`` say.

    ``on_ready(part)`` is called with each part of the contacts, in order, as soon as it is final (from this
    thread; it may block, which holds the engine back: a sending run plans and sends each part while the next is
    merged, so nothing holds every contact at once).
    """
    region, lf, mapping, plan = planned(frame, mapping, phone_region)
    parts = Parts(out_dir)
    rows_read = 0
    phones_dropped = dict.fromkeys(settings.PHONE_DROP_REASONS, 0)
    height = None
    if isinstance(frame, pl.LazyFrame) and parts.dir is not None:
        # the source read once, into a Parquet copy that both passes read slice by slice (bounded memory)
        spilled = spill_source(lf, parts.path("source", 0))
        frame, lf, height = spilled.frame, spilled.frame, spilled.height

    with ThreadPoolExecutor(max_workers=PIPELINE_DEPTH, thread_name_prefix="apollo-sync-prepare") as pool:
        # Pass 1: every row's identity only, to know which rows can be duplicates or survivors (the candidates).
        first = [identity_hashes(cleaned, options)
                 for _, cleaned in identity_pass(pool, frame, lf, plan, mapping, region, options, height)]  # fmt: skip
        hashes = pl.concat(first) if first else pl.Series(KEY_HASH, [], dtype=pl.UInt64)
        candidates = repeated_positions(hashes)
        del first

        def clean(batch: tuple[int, pl.DataFrame]) -> tuple[int, pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, int]]:
            offset, raw = batch
            cleaned, rejected, dropped = clean_batch(raw, plan.sources, mapping, region, options)
            check_same_rows(identity_hashes(cleaned, options), hashes, offset)
            position = pl.int_range(offset, offset + cleaned.height, dtype=pl.UInt32, eager=True)
            held = position.is_in(candidates.slice(*window(candidates, offset, cleaned.height)).implode())
            has_identity = cleaned.get_column("identity").is_not_null()  # a rejected row has none
            ready = cleaned.filter(has_identity & ~held)
            ready = contact_columns(ready.with_columns(fingerprints(ready)))
            kept = cleaned.with_columns(position.alias(POSITION)).filter(has_identity & held)
            return raw.height, ready, kept, rejected, dropped

        # Pass 2: clean every row; those that cannot repeat are final at once and handed to on_ready.
        for read, ready, kept, rejected, dropped in in_order(pool, clean, numbered(batches(frame, lf, options, height))):
            rows_read += read
            phones_dropped = {why: phones_dropped[why] + dropped[why] for why in phones_dropped}
            parts.put("rejected", rejected)
            if kept.height:
                parts.put("candidates", kept)
            if ready.height or not parts.count.get("contacts"):
                parts.put("contacts", ready)
                if on_ready is not None and ready.height:
                    on_ready(ready)
        if rows_read != hashes.len():
            raise InputError(source_changed(f"{hashes.len():,} rows on the first read, {rows_read:,} on the second"))

    # The candidates: dedupe them, then their survivors (and those whose identity did not repeat after all).
    duplicates = pl.DataFrame(schema=DUPLICATES_SCHEMA)
    if parts.count.get("candidates"):
        duplicates, groups = candidate_groups(parts, options)
        for index in range(parts.count["candidates"]):
            merged = contact_columns(merge_candidates(parts.take("candidates", index), groups))
            if merged.height:
                parts.put("contacts", merged)
                if on_ready is not None:
                    on_ready(merged)
        parts.drop("candidates")
    parts.put("duplicates", duplicates.cast(DUPLICATES_SCHEMA))
    if height is not None:
        parts.drop("source")
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


def identities(
    frame: pl.LazyFrame | pl.DataFrame,
    *,
    mapping: Mapping | None = None,
    phone_region: str = settings.DEFAULT_PHONE_REGION,
    options: EngineOptions = EngineOptions(),
) -> pl.DataFrame:
    """``source_row`` and ``identity`` of every row that has one (not rejected for its identity), before dedupe:
    what :func:`prepare` would key each row by, from the identity columns alone (email, names, organization).

    A row rejected only for a too large cell elsewhere still appears here (prepare() rejects it)."""
    region, lf, mapping, plan = planned(frame, mapping, phone_region)
    with ThreadPoolExecutor(max_workers=PIPELINE_DEPTH, thread_name_prefix="apollo-sync-identities") as pool:
        found = [
            cleaned.select(SOURCE_ROW, "identity").filter(pl.col("identity").is_not_null())
            for _, cleaned in identity_pass(pool, frame, lf, plan, mapping, region, options)
        ]
    return pl.concat(found) if found else pl.DataFrame(schema={SOURCE_ROW: pl.Int64, "identity": pl.String})


def planned(
    frame: pl.LazyFrame | pl.DataFrame, mapping: Mapping | None, phone_region: str
) -> tuple[str, pl.LazyFrame, Mapping, ColumnPlan]:
    """(checked phone region, numbered rows, the mapping, which columns feed which field) for ``frame``; raises
    InputError for a bad region or when no column can give a row an identity."""
    region = check_region(phone_region)
    names = frame.lazy().collect_schema().names()
    mapping = mapping or Mapping()
    plan = plan_columns(names, mapping)
    require_identity(plan.sources, mapping, names)
    return region, numbered_rows(frame), mapping, plan


IDENTITY_TARGETS = ("email", "first_name", "last_name", FULL_NAME, "organization_name")
"""What a row's identity is made of: its email, else first name + last name + organization."""


def identity_pass(
    pool: ThreadPoolExecutor,
    frame: pl.LazyFrame | pl.DataFrame,
    lf: pl.LazyFrame,
    plan: ColumnPlan,
    mapping: Mapping,
    region: str,
    options: EngineOptions,
    height: int | None = None,
) -> Iterator[tuple[int, pl.DataFrame]]:
    """(offset, cleaned rows with ``identity``) of each batch, cleaning only the identity columns: the same
    functions as the full clean on fewer columns, so a row's identity is the one prepare() gives it (``height``:
    as :func:`batches` takes it)."""
    sources = {target: cols for target, cols in plan.sources.items() if target in IDENTITY_TARGETS}
    only = Mapping(constants={k: v for k, v in mapping.constants.items() if k in IDENTITY_TARGETS})
    columns = [SOURCE_ROW, *dict.fromkeys(c for cs in sources.values() for c in cs)]

    def clean(batch: tuple[int, pl.DataFrame]) -> tuple[int, pl.DataFrame]:
        offset, raw = batch
        return offset, clean_batch(raw, sources, only, region, options)[0]

    yield from in_order(pool, clean, numbered(batches(frame, lf.select(columns), options, height)))


def numbered_rows(frame: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """``frame`` as text columns with an Int64 ``source_row`` (numbered from 1 when absent)."""
    lf = frame.lazy()
    names = lf.collect_schema().names()
    lf = lf.with_columns(pl.exclude(SOURCE_ROW).cast(pl.String))  # the contract says String; be lenient
    if SOURCE_ROW not in names:
        lf = lf.with_row_index(SOURCE_ROW, offset=1)
    return lf.with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))


def numbered(items: Iterator[pl.DataFrame]) -> Iterator[tuple[int, pl.DataFrame]]:
    """(offset of its first row, batch) of each batch."""
    offset = 0
    for raw in items:
        yield offset, raw
        offset += raw.height


def window(positions: pl.Series, offset: int, height: int) -> tuple[int, int]:
    """(start, length) of the slice of sorted ``positions`` within ``[offset, offset + height)``."""
    start = positions.search_sorted(offset)
    return start, positions.search_sorted(offset + height) - start


def check_same_rows(second: pl.Series, first: pl.Series, offset: int) -> None:
    """InputError unless each row with an identity on the second read has the identity it had on the first (the
    dedupe planned on the first read; a source that changed between the two must not be sent)."""
    before = first.slice(offset, second.len())
    if before.len() != second.len():
        raise InputError(source_changed("more rows on the second read than on the first"))
    differs = (second != before).fill_null(False) | (second.is_not_null() & before.is_null())
    if differs.any():
        row = offset + int(differs.arg_max()) + 1
        raise InputError(source_changed(f"row {row:,} differs between the two reads"))


def source_changed(detail: str) -> str:
    return f"the source changed while it was read ({detail}); nothing of it was planned from the change: run again"


def in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, with up to :data:`PIPELINE_DEPTH` items worked on at once."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= PIPELINE_DEPTH:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


SPILL_ROW_GROUP = 50_000
"""Rows per row group of the source's Parquet copy (a batch reads whole row groups)."""


def spill_source(lf: pl.LazyFrame, path: Path) -> SpilledSource:
    """Write ``lf`` (numbered rows) to ``path`` as Parquet through polars' streaming sink, which holds a few
    morsels at a time whatever the source's size, and return the copy to read slice by slice.

    Why not read the source's batches directly: ``LazyFrame.collect_batches`` reads ahead without bound, so while
    a sending run's batches wait for the API, the reader would hold the rest of the source in memory (measured:
    all of a 2M-row CSV within a second). The copy (LZ4) costs about 0.15 s per million rows here, and both passes
    then read the same rows, so the source cannot change between them."""
    lf.sink_parquet(path, compression="lz4", row_group_size=SPILL_ROW_GROUP, statistics=False, engine="streaming")
    copy = pl.scan_parquet(path)
    return SpilledSource(copy, copy.select(pl.len()).collect().item())


@dataclass(frozen=True)
class SpilledSource:
    """The source's Parquet copy: a LazyFrame scanning it, and its height (so :func:`batches` can read it by slices)."""

    frame: pl.LazyFrame
    height: int


def batches(
    frame: pl.LazyFrame | pl.DataFrame, lf: pl.LazyFrame, options: EngineOptions, height: int | None = None
) -> Iterator[pl.DataFrame]:
    """The rows of ``lf`` (``frame`` with source_row) ``options.batch_rows`` at a time; one empty batch for no rows.

    The first batch from a LazyFrame is only ``options.first_batch_rows`` rows, so cleaning starts while the
    reader goes on. With ``height`` (a :class:`SpilledSource`: Parquet, read by row groups) each batch is read as a
    slice, so the reader holds only that slice.
    """
    batch_rows = options.batch_rows
    if isinstance(frame, pl.DataFrame) and frame.height <= batch_rows:
        yield lf.collect()
        return
    if height is not None:
        sizes = itertools.chain([min(batch_rows, options.first_batch_rows)], itertools.repeat(batch_rows))
        start = 0
        while start < height or start == 0:
            size = next(sizes)
            yield lf.slice(start, size).collect()
            start += size
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
