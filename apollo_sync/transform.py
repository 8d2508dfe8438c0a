"""Turn a frame of exported contact rows into contacts ready for Bulk Create, and say what happened to each row.

:func:`prepare` runs, over whole columns:

1. **Mapping** (:mod:`apollo_sync.mapping`): headers auto-map to Apollo fields, a mapping file overrides;
   columns that feed nothing are listed in ``unmapped_columns`` and never sent.
2. **Cleaning** (:mod:`apollo_sync.expressions`): every text trimmed with whitespace collapsed, "" -> null,
   names keep their case; email lower-cased and its syntax checked (email-validator, no network); phones to
   E.164 (phonenumbers, default region ``phone_region``; an unusable phone is dropped and counted);
   website to ``https://<host>``; labels split on ``;``/``,``.
3. **Validation**: a present but invalid email rejects the row (``invalid_email``); a row with no email and
   not all of first name, last name and organization is rejected (``missing_identity``).
4. **Dedupe** within the source: by email, and rows without email by case-insensitive
   first+last+organization. The first row survives, its empty fields filled from later duplicates; each
   dropped row names the row it merged into.
5. **Fingerprint**: a stable 64-bit hash of each contact's cleaned fields (:mod:`apollo_sync.payload`), which
   tells a re-run what changed. The JSON body is written only at load time, for the rows sent.

Library calls happen once per distinct value and only for values the vectorised fast paths do not decide.
Columns that repeat a lot (names, titles, companies, websites, labels, city/state/country) are cleaned once per
distinct value and mapped back by a verified 64-bit hash; mostly empty ones (LinkedIn, mobile) on their values only.

Steps 1-3 run on batches of :data:`BATCH_ROWS` rows (a LazyFrame is read through the streaming engine, the
first batch short), two batches at once in threads. The dedupe then works across batches from each batch's
identity hashes, sorted in its worker, reading back only the rows whose hash repeats; the merge runs per batch
again and drops the rejected rows and the duplicates in one filter. With ``out_dir`` every intermediate and
result is a Parquet part on disk and the Prepared holds LazyFrames, which bounds memory on 10M-row sources
(bench/bench_dry_run.py). How fast, and why it is built so: BENCHMARKS.md ("The transform").
:func:`apollo_sync.report.escape_for_spreadsheet` makes a frame safe to open in a spreadsheet (formula injection).
"""

from __future__ import annotations

import functools
import json
import operator
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata
import polars as pl
from email_validator import EmailNotValidError, validate_email

from apollo_sync import expressions as ex
from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.payload import contact_fingerprint, payload_fields
from apollo_sync.mapping import (
    ADDRESS_PARTS,
    CUSTOM_PREFIX,
    FULL_NAME,
    MAPPABLE_FIELDS,
    Mapping,
    load_mapping,
    plan_columns,
)

__all__ = ["Prepared", "prepare", "load_mapping"]

SOURCE_ROW = settings.SOURCE_ROW
T = TypeVar("T")
R = TypeVar("R")
_EMAIL_READ = "_email_read"
_REASON = "_reason"
_PHONE_RAW = "_raw_"  # prefix: phone text as read (trimmed) before E.164
TEXT_FIELDS = tuple(f for f in MAPPABLE_FIELDS if f not in ("label_names", "website_url", "linkedin_url", "email"))
CONTACT_COLUMNS = (SOURCE_ROW, "identity", "fingerprint", *MAPPABLE_FIELDS)
"""First columns of ``Prepared.contacts``: the Apollo fields as cleaned; a ``custom.<id>`` column per custom field
follows. :func:`apollo_sync.payload.with_payload` turns them into the JSON Bulk Create gets."""


BATCH_ROWS = 250_000
"""Rows cleaned at a time (two batches at once, see :data:`_PIPELINE_DEPTH`). A batch of a 15-column export costs
~0.35 GB while it is cleaned; only its cleaned rows (in memory, or in Parquet files with ``out_dir``) and 16 bytes a
row for the dedupe outlive it."""

FIRST_BATCH_ROWS = 50_000
"""Rows in the first batch read from a LazyFrame (see :func:`_batches`)."""

PART_KINDS = ("contacts", "rejected", "duplicates")
DONE_MARKER = "prepared.json"
"""Written last in ``out_dir``: its presence means the Parquet parts are whole (and gives the counts)."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made of a frame. Every row read is in exactly one of the three frames.

    The frames are DataFrames, or with ``prepare(..., out_dir=...)`` LazyFrames scanning Parquet parts in that
    directory (so a 10M-row source never sits in memory whole); the ``*_count`` fields give their heights.
    """

    contacts: pl.DataFrame | pl.LazyFrame
    """One row per contact to send, in the frame's (source) order: see :data:`CONTACT_COLUMNS`."""
    rejected: pl.DataFrame | pl.LazyFrame
    """source_row, email (as read), reason (invalid_email | missing_identity), original (JSON of the row as read)."""
    duplicates: pl.DataFrame | pl.LazyFrame
    """source_row, email, merged_into (source_row of the surviving row)."""
    rows_read: int
    unmapped_columns: list[str]
    phones_dropped: int
    """Phone values (in rows not rejected) that were present but not usable as E.164, so not sent."""
    column_map: dict[str, str] = field(default_factory=dict)
    """source column -> Apollo field (or ``custom.<id>``, ``name``, ``city``...) it fed."""
    contacts_count: int = 0
    rejected_count: int = 0
    duplicates_count: int = 0


def prepare(
    frame: pl.LazyFrame | pl.DataFrame,
    *,
    mapping: Mapping | None = None,
    phone_region: str = settings.DEFAULT_PHONE_REGION,
    out_dir: str | Path | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Prepared:
    """Map, clean, validate and dedupe exported rows (all ``pl.String`` columns, optional ``source_row``).

    Rows are numbered from 1 when ``source_row`` is absent. Raises InputError when no column can give a
    row an identity (no email, and not first/last name + company), or for a bad mapping or region.

    The frame is read ``batch_rows`` at a time (a LazyFrame through the streaming engine), so memory is
    bounded by a batch plus the cleaned rows. With ``out_dir`` the cleaned rows and the three results go to
    Parquet files there instead (``contacts-*.parquet``, ``rejected-*.parquet``, ``duplicates-*.parquet``,
    then :data:`DONE_MARKER`) and the Prepared's frames are LazyFrames scanning them: memory then holds two
    batches, 12 bytes a row (identity hash and position) and the rows whose identity repeats. The results are
    the same either way.
    """
    region = phone_region.upper()
    if phonenumbers.country_code_for_region(region) == 0:
        raise InputError(f"unknown phone region {phone_region!r}; use a two-letter region code such as US or GB")
    lf = frame.lazy()
    names = lf.collect_schema().names()
    lf = lf.with_columns(pl.exclude(SOURCE_ROW).cast(pl.String))  # the contract says String; be lenient
    if SOURCE_ROW not in names:
        lf = lf.with_row_index(SOURCE_ROW, offset=1)
    lf = lf.with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))
    mapping = mapping or Mapping()
    plan = plan_columns(names, mapping)
    _require_identity(plan.sources, mapping, names)

    parts = _Parts(out_dir)
    rows_read = phones_dropped = 0
    identity_keys: list[pl.DataFrame] = []  # per batch: (hash, row) of each identity, sorted by hash
    heights: list[int] = []

    def clean(batch: tuple[int, pl.DataFrame]) -> tuple[int, pl.DataFrame, pl.DataFrame, int, pl.DataFrame]:
        offset, raw = batch
        cleaned, rejected, dropped = _clean_batch(raw, plan.sources, mapping, region)
        return raw.height, cleaned, rejected, dropped, _identity_keys(cleaned, offset)

    def numbered(batches: Iterator[pl.DataFrame]) -> Iterator[tuple[int, pl.DataFrame]]:
        offset = 0
        for raw in batches:
            yield offset, raw
            offset += raw.height

    with ThreadPoolExecutor(max_workers=_PIPELINE_DEPTH, thread_name_prefix="apollo-sync-prepare") as pool:
        batches = numbered(_batches(frame, lf, batch_rows))
        for height, cleaned, rejected, dropped, keys in _in_order(pool, clean, batches):
            rows_read += height
            phones_dropped += dropped
            parts.put("rejected", rejected)
            parts.put("clean", cleaned)
            identity_keys.append(keys)
            heights.append(height)
        offsets = [sum(heights[:i]) for i in range(len(heights))]
        # Fingerprints need no dedupe: they are computed while it runs, then redone for survivors it fills.
        fingerprints = [pool.submit(lambda i: _fingerprints(parts.get("clean", i)), i) for i in range(len(heights))]
        duplicates, groups = _duplicate_groups(parts, identity_keys, offsets, heights)
        parts.put("duplicates", duplicates)

        def finish(index: int) -> pl.DataFrame:
            fingerprint = fingerprints[index].result()  # before take(): that removes the part the fingerprints read
            rows = parts.take("clean", index).with_columns(fingerprint)
            return _contact_columns(_merge_batch(rows, groups, offsets[index]))

        for contacts in _in_order(pool, finish, range(len(heights))):
            parts.put("contacts", contacts)
    return Prepared(
        contacts=parts.frame("contacts"),
        rejected=parts.frame("rejected"),
        duplicates=parts.frame("duplicates"),
        rows_read=rows_read,
        unmapped_columns=plan.unmapped,
        phones_dropped=phones_dropped,
        column_map=plan.column_map,
        **parts.finish(rows_read=rows_read, phones_dropped=phones_dropped),
    )


_PIPELINE_DEPTH = 2
"""Batches worked on at once, in threads (polars releases the GIL): one batch's single-threaded steps (eager
Series work, library calls) overlap the other's, which measured ~1.5 -> ~1.8 of the 2 cores busy."""


def _in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, with up to :data:`_PIPELINE_DEPTH` items worked on at once."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= _PIPELINE_DEPTH:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(frame: pl.LazyFrame | pl.DataFrame, lf: pl.LazyFrame, batch_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of ``lf`` (``frame`` with source_row) ``batch_rows`` at a time; one empty batch for no rows.

    The first batch is only :data:`FIRST_BATCH_ROWS` rows: it is ready ~4x sooner (the reader parses less
    before the first yield), so cleaning starts while the reader goes on.
    """
    if isinstance(frame, pl.DataFrame) and frame.height <= batch_rows:
        yield lf.collect()
        return
    given = False
    pending: list[pl.DataFrame] = []
    size = 0
    for part in lf.collect_batches(chunk_size=min(batch_rows, FIRST_BATCH_ROWS), maintain_order=True):
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


def reopen_parts(prepared: Prepared, out_dir: str | Path) -> Prepared:
    """``prepared`` (made with ``out_dir=...``) with its frames scanning the parts now in ``out_dir`` (after a move)."""
    return replace(prepared, **{kind: pl.scan_parquet(Path(out_dir) / f"{kind}-*.parquet") for kind in PART_KINDS})


def prune_prepared(root: str | Path, max_age_seconds: float, keep: Path | None = None) -> None:
    """Remove ``out_dir``s under ``root`` (and left-over ``*.tmp`` ones) not written for ``max_age_seconds``."""
    root = Path(root)
    if not root.is_dir():
        return
    now = time.time()
    for child in root.iterdir():
        if not child.is_dir() or child == keep:
            continue
        marker = child / DONE_MARKER
        stamp = (marker if marker.exists() else child).stat().st_mtime
        if now - stamp > max_age_seconds:
            shutil.rmtree(child, ignore_errors=True)


class _Parts:
    """Frames made batch by batch: kept in memory, or written as Parquet parts in ``out_dir``."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.dir = None if out_dir is None else Path(out_dir)
        self.memory: dict[str, list[pl.DataFrame | None]] = {}
        self.count: dict[str, int] = {}
        self.heights: dict[str, int] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / DONE_MARKER).unlink(missing_ok=True)
            for kind in (*PART_KINDS, "clean", "candidates"):
                for old in self.dir.glob(f"{kind}-*.parquet"):
                    old.unlink()

    def _path(self, kind: str, index: int) -> Path:
        assert self.dir is not None
        return self.dir / f"{kind}-{index:05d}.parquet"

    def put(self, kind: str, df: pl.DataFrame) -> None:
        index = self.count.get(kind, 0)
        self.count[kind] = index + 1
        self.heights[kind] = self.heights.get(kind, 0) + df.height
        if self.dir is None:
            self.memory.setdefault(kind, []).append(df)
        else:
            df.write_parquet(self._path(kind, index), statistics=False)

    def get(self, kind: str, index: int) -> pl.DataFrame:
        if self.dir is None:
            df = self.memory[kind][index]
            assert df is not None
            return df
        return pl.read_parquet(self._path(kind, index))

    def take(self, kind: str, index: int) -> pl.DataFrame:
        """Like :meth:`get`, and the part is gone afterwards (its memory or file freed)."""
        df = self.get(kind, index)
        if self.dir is None:
            self.memory[kind][index] = None
        else:
            self._path(kind, index).unlink()
        return df

    def column(self, kind: str, columns: list[str]) -> pl.DataFrame:
        """``columns`` of every part of ``kind``, concatenated (Parquet reads only those columns)."""
        if self.dir is None:
            frames = [_pick(df, *columns) for df in self.memory[kind] if df is not None]
            return pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
        return pl.read_parquet(self.dir / f"{kind}-*.parquet", columns=columns)

    def drop(self, kind: str) -> None:
        """Forget every part of ``kind`` (memory freed, files removed)."""
        self.memory.pop(kind, None)
        if self.dir is not None:
            for path in self.dir.glob(f"{kind}-*.parquet"):
                path.unlink()

    def frame(self, kind: str) -> pl.DataFrame | pl.LazyFrame:
        if self.dir is None:
            frames = self.memory.pop(kind)
            return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical", rechunk=False)
        return pl.scan_parquet(self.dir / f"{kind}-*.parquet")

    def finish(self, **figures: int) -> dict[str, int]:
        counts = {f"{kind}_count": self.heights.get(kind, 0) for kind in PART_KINDS}
        if self.dir is not None:
            (self.dir / DONE_MARKER).write_text(json.dumps({**figures, **counts}) + "\n", encoding="utf-8")
        return counts


def _pick(frame: pl.DataFrame, *names: str) -> pl.DataFrame:
    """The columns ``names`` of ``frame``, without copying: DataFrame.select/drop copied every column of a frame whose
    columns are chunked differently (as after scatter and per-distinct gathers), ~5-10 ms a 250k-row batch."""
    return pl.DataFrame([frame.get_column(name) for name in names])


def _without(frame: pl.DataFrame, *names: str) -> pl.DataFrame:
    """``frame`` without the columns ``names`` (see :func:`_pick`)."""
    return _pick(frame, *[c for c in frame.columns if c not in names])


_SPARSE = "_sparse_"  # prefix: a column as read, to be built on its values only (see _on_values)


def _sparse(values: pl.Series) -> bool:
    """True when most of ``values`` are null: :func:`_on_values` then costs less than an expression over the column."""
    return values.null_count() * 2 > values.len()


def _on_values(values: pl.Series, build: Callable[[pl.Expr], pl.Expr]) -> pl.Series:
    """``build`` over the non-null ``values`` only, scattered back (null elsewhere): 13-29% less CPU than over the
    whole column when 70-80% of it is null (measured on LinkedIn and mobile phones of a CRM export)."""
    rows = values.is_not_null().arg_true()
    built = _select(values.gather(rows).to_frame("v"), build(pl.col("v")).alias("v")).to_series()
    return pl.repeat(None, values.len(), dtype=built.dtype, eager=True).scatter(rows, built)


def _select(frame: pl.DataFrame, *exprs: pl.Expr) -> pl.DataFrame:
    """``frame.select(*exprs)`` through the lazy engine: DataFrame.select ran single-threaded (measured ~1.7x the wall
    time of the same lazy query on a 250k-row batch)."""
    return frame.lazy().select(*exprs).collect()


def _with_columns(frame: pl.DataFrame, *exprs: pl.Expr) -> pl.DataFrame:
    """``frame.with_columns(*exprs)`` through the lazy engine (see :func:`_select`)."""
    return frame.lazy().with_columns(*exprs).collect()


def _clean_batch(
    raw: pl.DataFrame, sources: dict[str, tuple[str, ...]], mapping: Mapping, region: str
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(cleaned rows, rejected rows, phones dropped) of one batch of rows as read.

    The cleaned rows are all the batch's rows; a rejected one has a null ``identity`` (every other has one).
    """
    nanp = phonenumbers.country_code_for_region(region) == 1
    phones = [n for n in settings.PHONE_FIELDS if n in sources or n in mapping.constants]
    # The in-memory engine runs this wide select in ~15% less CPU than the streaming one; the narrower second pass
    # (and the fingerprints) the other way round (measured on 250k-row batches).
    cleaned = raw.lazy().select(_clean_exprs(raw, sources, mapping, phones)).collect(engine="in-memory")
    # Second pass on the materialised clean text: each regex reads a column once. Mostly empty columns are worked
    # on their values only: string kernels cost per row, null or not.
    sparse = {n for n in phones if _sparse(cleaned.get_column(_PHONE_RAW + n))}
    cleaned = _with_columns(
        cleaned,
        ex.email_fast_valid(pl.col("email")).fill_null(False).alias("_email_fast"),
        *[ex.phone_nanp_e164(pl.col(_PHONE_RAW + n), nanp_region=nanp).alias(n) for n in phones if n not in sparse],
    )
    later = {
        n: _on_values(cleaned.get_column(_PHONE_RAW + n), lambda e: ex.phone_nanp_e164(e, nanp_region=nanp))
        for n in sparse
    }
    if _SPARSE + "linkedin_url" in cleaned.columns:
        later["linkedin_url"] = _on_values(cleaned.get_column(_SPARSE + "linkedin_url"), ex.linkedin)
        cleaned = _without(cleaned, _SPARSE + "linkedin_url")
    cleaned = cleaned.with_columns(values.alias(name) for name, values in later.items())
    # Keep the rows as read only where a rejection is possible (their originals go to the report);
    # the rest are freed before the heavy steps. Fast-valid emails are never rejected.
    maybe_rejected = _select(
        cleaned,
        pl.when(pl.col("email").is_not_null()).then(~pl.col("_email_fast")).otherwise(~_named()).alias("m")
    ).to_series()
    raw_maybe = raw.filter(maybe_rejected)
    cleaned, dropped = _finish(cleaned, region, phones)

    reason = cleaned.get_column(_REASON)
    rejected_mask = reason.is_not_null()
    rows = _without(cleaned, _REASON, _EMAIL_READ)
    if not rejected_mask.any():
        return rows, _rejected(raw_maybe.head(0), cleaned.head(0)), int(dropped.sum())
    rejected = _rejected(
        raw_maybe.filter(reason.filter(maybe_rejected).is_not_null()),
        _pick(cleaned, SOURCE_ROW, _EMAIL_READ, _REASON).filter(rejected_mask),
    )
    # Rejected rows stay (without identity) until the merge, which drops them with the duplicates in one filter.
    return rows, rejected, int(dropped.filter(~rejected_mask).sum())


# --- Mapping checks ------------------------------------------------------------------------


def _require_identity(sources: dict[str, tuple[str, ...]], mapping: Mapping, names: list[str]) -> None:
    have = set(sources) | set(mapping.constants)
    by_name = ({"first_name", "last_name"} <= have or FULL_NAME in have) and "organization_name" in have
    if "email" not in have and not by_name:
        cols = [n for n in names if n != SOURCE_ROW]
        raise InputError(
            f"no email or first/last name + company columns found in {cols}; map them with --mapping FILE"
        )


# --- Cleaning ------------------------------------------------------------------------------


def _clean_exprs(
    raw: pl.DataFrame, sources: dict[str, tuple[str, ...]], mapping: Mapping, phones: list[str]
) -> list[pl.Expr]:
    """One expression per output column of the cleaning step (before per-value library checks).

    A single email column is only trimmed and lower-cased here: that is its whole normalisation for every
    address the fast path accepts (they hold no whitespace), and :func:`_finish` normalises the rest.
    """

    def cols(target: str) -> list[pl.Expr]:
        return [pl.col(c) for c in sources.get(target, ())]

    skip = {c for t in ("email", *settings.PHONE_FIELDS, *ADDRESS_PARTS) for c in sources.get(t, ())}  # not per value
    repeating = _repeating_values(raw, [c for cs in sources.values() for c in cs if c not in skip])

    def distinct(target: str, build) -> list[pl.Expr]:
        return [_per_distinct(c, repeating.get(c), build) for c in sources.get(target, ())]

    def text(target: str) -> pl.Expr:
        return ex.first_present(distinct(target, ex.clean_text))

    constants = mapping.constants
    out: list[pl.Expr] = [pl.col(SOURCE_ROW)]

    email_cols = cols("email")
    if len(email_cols) == 1:
        email_read = email_cols[0]
    else:  # the first column with a value is the one the row's email came from
        email_read = ex.first_present([pl.when(ex.clean_text(c).is_not_null()).then(c) for c in email_cols])
    out.append(email_read.alias(_EMAIL_READ))
    if len(email_cols) == 1:
        email = email_cols[0].str.strip_chars().str.to_lowercase()
    else:  # "" must not hide a later column's address
        email = ex.first_present([ex.normalized_email(c) for c in email_cols])
    out.append(email.alias("email"))

    first, last = text("first_name"), text("last_name")
    if FULL_NAME in sources:
        split_first, split_last = ex.split_name(text(FULL_NAME))
        first, last = split_first, split_last
    for name, expr in (("first_name", first), ("last_name", last)):
        out.append(_with_constant(expr, constants.get(name)).alias(name))

    for name in TEXT_FIELDS:
        if name in ("first_name", "last_name") or name in settings.PHONE_FIELDS:
            continue
        expr = text(name)
        if name == "present_raw_address" and "present_raw_address" not in sources:
            address = _address(raw, {p: sources[p] for p in ADDRESS_PARTS if p in sources})
            expr = expr if address is None else address
        out.append(_with_constant(expr, constants.get(name)).alias(name))

    website = ex.first_present(distinct("website_url", ex.website))
    out.append(_with_constant(website, constants.get("website_url")).alias("website_url"))
    linkedin_cols = sources.get("linkedin_url", ())
    if len(linkedin_cols) == 1 and "linkedin_url" not in constants and linkedin_cols[0] not in repeating and _sparse(
        raw.get_column(linkedin_cols[0])
    ):
        out.append(pl.col(linkedin_cols[0]).alias(_SPARSE + "linkedin_url"))  # built on its values in the 2nd pass
    else:
        linkedin = ex.first_present(distinct("linkedin_url", ex.linkedin))
        out.append(_with_constant(linkedin, constants.get("linkedin_url")).alias("linkedin_url"))

    label_lists = distinct("label_names", ex.labels)
    const_labels = constants.get("label_names")
    if const_labels:
        label_lists.append(pl.lit(pl.Series([list(const_labels)], dtype=pl.List(pl.String))).first())  # a scalar
    if not label_lists:
        out.append(pl.lit(None, dtype=pl.List(pl.String)).alias("label_names"))
    elif len(label_lists) == 1:
        out.append(label_lists[0].alias("label_names"))
    else:
        merged = pl.concat_list([lst.fill_null(pl.lit([], dtype=pl.List(pl.String))) for lst in label_lists])
        merged = merged.list.unique(maintain_order=True)
        out.append(pl.when(merged.list.len() > 0).then(merged).alias("label_names"))

    for name in settings.PHONE_FIELDS:
        phone_cols = cols(name)
        if name not in phones:
            out.append(pl.lit(None, dtype=pl.String).alias(name))
        elif len(phone_cols) == 1 and name not in constants:
            # Only trimmed (no copy): the fast path reads it so, and _finish cleans the values it leaves open.
            out.append(phone_cols[0].str.strip_chars().alias(_PHONE_RAW + name))
        else:
            out.append(_with_constant(text(name), constants.get(name)).alias(_PHONE_RAW + name))


    customs = sorted({t for t in sources if t.startswith(CUSTOM_PREFIX)} | {t for t in constants if t.startswith(CUSTOM_PREFIX)})
    for name in customs:
        out.append(_with_constant(text(name), constants.get(name)).alias(name))
    return out


_SAMPLE_ROWS = 2_000
_REPEATS = 4
"""A column (or combination of columns) is worked on per distinct value when it has at most 1 in this many rows."""


def _repeating_values(raw: pl.DataFrame, columns: list[str]) -> dict[str, pl.Series]:
    """The distinct non-null values of each of ``columns`` that repeats a lot (fewer than 1 distinct in 4 rows).

    Whether a column repeats is judged first on a sample (the first :data:`_SAMPLE_ROWS` rows), as finding
    every distinct value of a near-unique column costs about as much as cleaning it directly. Each step is
    one select over all the columns, so polars works on them in parallel.
    """
    columns = list(dict.fromkeys(columns))
    if not columns:
        return {}
    sample = raw.head(_SAMPLE_ROWS).select(
        [(pl.col(c).drop_nulls().n_unique() * 2 <= pl.col(c).count()).alias(c) for c in columns]
    )
    columns = [c for c in columns if sample.get_column(c).item()]
    if not columns:
        return {}
    found = raw.lazy().select([pl.col(c).drop_nulls().unique().implode() for c in columns]).collect(engine="in-memory")
    values = {c: found.get_column(c).explode() for c in columns}
    return {c: v for c, v in values.items() if v.len() * _REPEATS <= raw.height}


def _per_distinct(column: str, values: pl.Series | None, build: Callable[[pl.Expr], pl.Expr]) -> pl.Expr:
    """``build(pl.col(column))``, evaluated once per distinct value when ``values`` (the column's distinct
    non-null values, from :func:`_repeating_values`) is given; directly otherwise.

    Websites, labels, names, cities... repeat across an export; computing their expressions on the distinct
    values and mapping back measured ~2-4x faster on 1M rows than building them for every row.
    """
    if values is None:
        return build(pl.col(column))
    mapped = values.to_frame(column).select(build(pl.col(column))).to_series()
    return pl.lit(mapped).gather(_position_in(values.to_frame(column), [column]))  # null position: null


def _position_in(distinct: pl.DataFrame, columns: list[str]) -> pl.Expr:
    """Each row's position among the ``distinct`` rows of ``columns`` (null for a row not there, such as a null).

    Rows are matched by a 64-bit hash of their values, which is cheaper than matching the text (~2x on 250k
    rows), and exact: it is used only when no two distinct rows share a hash, nor (when ``distinct`` has no row
    of nulls, so such rows must find nothing) a distinct row and a row of nulls. Otherwise (odds ~n**2 / 2**65)
    the values themselves are matched.
    """
    key = _row_key(columns)
    hashes = distinct.select(key).to_series()
    has_null_row = functools.reduce(operator.and_, (distinct.get_column(c).is_null() for c in columns)).any()
    nulls = None if has_null_row else _null_row_key(len(columns))
    position = pl.Series(range(distinct.height), dtype=pl.UInt32)
    if _hashes_are_exact(hashes, nulls):
        return key.replace_strict(hashes, position, default=None, return_dtype=pl.UInt32)
    if len(columns) == 1:
        texts = distinct.get_column(columns[0])
        return pl.col(columns[0]).replace_strict(texts, position, default=None, return_dtype=pl.UInt32)
    joined = pl.concat_str(  # length-prefixed, so no two different rows join to the same text
        [
            pl.when(pl.col(c).is_null())
            .then(pl.lit("-"))
            .otherwise(pl.concat_str([pl.col(c).str.len_bytes().cast(pl.String), pl.lit(":"), pl.col(c)]))
            for c in columns
        ]
    )
    texts = distinct.select(joined).to_series()
    return joined.replace_strict(texts, position, default=None, return_dtype=pl.UInt32)


def _row_key(columns: list[str]) -> pl.Expr:
    """A 64-bit hash of each row's ``columns`` (u64 arithmetic wraps; ~2x cheaper than hashing a struct)."""
    key = pl.col(columns[0]).hash()
    for column in columns[1:]:
        key = key * pl.lit(0x9E3779B97F4A7C15, dtype=pl.UInt64) + pl.col(column).hash()
    return key


@functools.cache
def _null_row_key(width: int) -> int:
    """The :func:`_row_key` of a row of ``width`` null strings."""
    names = [f"c{i}" for i in range(width)]
    return pl.DataFrame({c: [None] for c in names}, schema={c: pl.String for c in names}).select(_row_key(names)).item()


def _hashes_are_exact(hashes: pl.Series, nulls: int | None) -> bool:
    """True when no two distinct rows share a hash, nor one has the hash ``nulls`` of a row of nulls."""
    return hashes.n_unique() == hashes.len() and (nulls is None or not (hashes == nulls).any())


def _address(raw: pl.DataFrame, parts: dict[str, tuple[str, ...]]) -> pl.Expr | None:
    """``present_raw_address`` from city, state and country columns ("Austin, TX, USA"), or None without any.

    The columns' combinations repeat far more than rows do, so the address is built once per distinct combination
    (when there are fewer than 1 in 4 rows) and mapped back, which saves joining text for every row.
    """
    if not parts:
        return None
    columns = [c for cs in parts.values() for c in cs]
    address = pl.concat_str(
        [ex.first_present([ex.clean_text(pl.col(c)) for c in cs]) for cs in parts.values()],
        separator=", ",
        ignore_nulls=True,
    ).replace("", None)
    combinations = raw.lazy().select(columns).unique().collect()
    if combinations.height * _REPEATS > raw.height:
        return address
    mapped = combinations.select(address).to_series()
    return pl.lit(mapped).gather(_position_in(combinations, columns))


def _with_constant(expr: pl.Expr, value: object) -> pl.Expr:
    return expr if value is None else pl.coalesce(expr, pl.lit(value, dtype=pl.String))


def _finish(cleaned: pl.DataFrame, region: str, phones: list[str]) -> tuple[pl.DataFrame, pl.Series]:
    """(rows with the final email, phones, reason and identity; phones dropped per row).

    The fast paths decided most values; the rest (a few percent) are patched in place: each is looked
    up once per distinct value (email-validator, phonenumbers) and scattered back to its rows, so no
    step here reads a whole column more than once. Why fast paths: email-validator costs ~24 us and
    phonenumbers ~20-50 us per value, i.e. 20-50 s for a 1M-row export of mostly unique values, while the
    regexes take ~0.05 s per column. The property tests check that whatever a fast path decides, the
    library decides the same.
    """
    email = cleaned.get_column("email")
    given = email.is_not_null()
    open_rows = (given & ~cleaned.get_column("_email_fast")).arg_true()
    if open_rows.len():
        normal = email.gather(open_rows).to_frame("e").select(ex.normalized_email(pl.col("e"))).to_series()
        given = given.scatter(open_rows, normal.is_not_null())  # a cell of only whitespace gives no email
        email = email.scatter(open_rows, _lookup(normal, _email_verdicts(normal.drop_nulls().unique())))

    dropped = pl.repeat(0, cleaned.height, dtype=pl.Int32, eager=True)
    found = {n: cleaned.get_column(n) for n in phones}
    open_phone = {n: (found[n].is_null() & cleaned.get_column(_PHONE_RAW + n).is_not_null()).arg_true() for n in phones}
    if any(rows.len() for rows in open_phone.values()):
        texts = {  # cleaned here, for these rows only: a cell of only whitespace holds no phone
            n: _select(cleaned.get_column(_PHONE_RAW + n).gather(rows).to_frame("t"), ex.clean_text(pl.col("t")))
            .to_series()
            for n, rows in open_phone.items()
        }
        all_e164 = _phones_e164(pl.concat(list(texts.values())), region)
        start = 0
        for n, rows in open_phone.items():
            e164 = all_e164.slice(start, rows.len())
            start += rows.len()
            found[n] = found[n].scatter(rows, e164)
            lost = (texts[n].is_not_null() & e164.is_null()).cast(pl.Int32)
            dropped = dropped.scatter(rows, dropped.gather(rows) + lost)

    out = _without(cleaned, "_email_fast", *[_PHONE_RAW + n for n in phones]).with_columns(
        email.alias("email"), *[found[n].alias(n) for n in phones]
    )
    named = _select(out, _named()).to_series()
    no_email = email.is_null()
    reason = pl.repeat(None, out.height, dtype=pl.String, eager=True).alias(_REASON)  # set for the few rejected
    for why, rows in (
        (settings.REJECT_INVALID_EMAIL, no_email & given),
        (settings.REJECT_MISSING_IDENTITY, no_email & ~given & ~named),
    ):
        if rows.any():
            reason = reason.scatter(rows.arg_true(), why)
    out = out.with_columns(reason)
    # A rejected row gets no identity (the merge drops it with the duplicates).
    email_identity = pl.when(pl.col(_REASON).is_null()).then(pl.lit("email:") + pl.col("email"))
    identity = _select(out, email_identity.alias("identity")).to_series()
    by_name = (no_email & named & reason.is_null()).arg_true()
    if by_name.len():
        parts = _pick(out, "first_name", "last_name", "organization_name")[by_name]
        key = parts.select(
            pl.lit("name:") + pl.concat_str(pl.all(), separator="|").str.to_lowercase()
        ).to_series()
        identity = identity.scatter(by_name, key)
    return out.with_columns(identity), dropped


def _named() -> pl.Expr:
    """True where a row has first name, last name and organization (an identity without email)."""
    return pl.col("first_name").is_not_null() & pl.col("last_name").is_not_null() & pl.col("organization_name").is_not_null()


def _lookup(values: pl.Series, verdicts: pl.DataFrame) -> pl.Series:
    """``values`` replaced through ``verdicts`` (columns ``key``, ``value``); anything else becomes null."""
    if verdicts.height == 0:
        return pl.repeat(None, values.len(), dtype=pl.String, eager=True)
    keys, found = verdicts.get_column("key"), verdicts.get_column("value")
    return values.replace_strict(keys, found, default=None, return_dtype=pl.String)


def _email_verdicts(emails: pl.Series) -> pl.DataFrame:
    """key -> normalised address or null (invalid) for distinct normalised emails the fast-valid path left open.

    Certainly invalid ones are decided by :func:`apollo_sync.expressions.email_fast_invalid`, valid ones of
    the common shape by :func:`~apollo_sync.expressions.email_fast_valid` (the multi-column and whitespace
    cases arrive here), and email-validator checks the rest, once each.
    """
    frame = emails.rename("key").to_frame().with_columns(
        ex.email_fast_invalid(pl.col("key")).fill_null(False).alias("bad"),
        ex.email_fast_valid(pl.col("key")).fill_null(False).alias("good"),
    )
    undecided = frame.filter(~pl.col("bad") & ~pl.col("good")).get_column("key")
    checked = pl.Series([_validated_email(v) for v in undecided.to_list()], dtype=pl.String)
    return pl.concat(
        [
            frame.filter(pl.col("good")).select("key", pl.col("key").alias("value")),
            frame.filter(pl.col("bad")).select("key", pl.lit(None, dtype=pl.String).alias("value")),
            pl.DataFrame({"key": undecided, "value": checked}),
        ]
    )


def _phones_e164(texts: pl.Series, region: str) -> pl.Series:
    """E.164, or null (dropped), for each cleaned phone text the North American fast path left open.

    ``+<code> ...`` numbers of known calling codes are decided row by row by the vectorised rule of
    :func:`apollo_sync.expressions.phone_international_e164` (they hardly repeat, so looking them up per distinct
    value cost more than it saved); phonenumbers parses the rest once per distinct value (junk such as "123"
    repeats).
    """
    verdicts = ex.phone_international_e164(texts, _country_rules(texts))
    e164 = verdicts.get_column("e164")
    undecided = (~verdicts.get_column("decided") & texts.is_not_null()).arg_true()
    if undecided.len():
        values = texts.gather(undecided)
        distinct = values.unique()
        parsed = pl.Series([_e164(value, region) for value in distinct.to_list()], dtype=pl.String)
        e164 = e164.scatter(undecided, values.replace_strict(distinct, parsed, default=None, return_dtype=pl.String))
    return e164


def _country_rules(phones: pl.Series) -> dict[str, ex.CountryRule]:
    """phonenumbers' rules for the calling codes that ``+...`` phones among ``phones`` may start with."""
    # The three characters after a "+" (a slice: a regex capture cost ~5x more), then their leading digits.
    heads = phones.filter(phones.str.starts_with("+")).str.slice(1, 3).unique().to_list()
    digits = [h[: next((i for i, ch in enumerate(h) if ch not in "0123456789"), len(h))] for h in heads]
    wanted = {d[:size] for d in digits for size in (1, 2, 3) if len(d) >= size}
    rules: dict[str, ex.CountryRule] = {}
    for code in sorted(wanted):
        rule = _country_rule(int(code)) if code[0] != "0" else None
        if rule is not None:
            rules[code] = rule
    return rules


@functools.cache
def _country_rule(code: int) -> ex.CountryRule | None:
    """The rule for one calling code, or None when it is unknown or its prefix regex is not portable."""
    if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE or code == 1:
        return None  # +1 has its own fast path (national prefix "1" makes the generic one unsafe)
    region = phonenumbers.region_code_for_country_code(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    if metadata is None or metadata.general_desc is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix is not None:
        try:  # the pattern is written for Python's re; use it only where polars' regex engine reads it too
            pl.select(pl.lit("0").str.contains(f"^(?:{prefix})"))
        except pl.exceptions.ComputeError:
            return None
    desc = metadata.general_desc
    local = set(desc.possible_length_local_only or ())
    lengths = tuple(n for n in (desc.possible_length or ()) if n > 0 and n not in local)
    return ex.CountryRule(national_prefix=prefix, lengths=lengths)


def _validated_email(value: str) -> str | None:
    """email-validator's normalised form of one address, or None when its syntax is invalid (no DNS)."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def _e164(value: str, region: str) -> str | None:
    """One phone as E.164, or None when phonenumbers cannot parse it or its length is not a possible number."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# --- Results -------------------------------------------------------------------------------


def _rejected(raw: pl.DataFrame, cleaned: pl.DataFrame) -> pl.DataFrame:
    originals = [c for c in raw.columns if c != SOURCE_ROW]
    original = (
        raw.select(pl.struct(originals).struct.json_encode().alias("original"))
        if originals
        else pl.DataFrame({"original": pl.Series(["{}"] * raw.height, dtype=pl.String)})
    )
    return pl.DataFrame(
        {
            SOURCE_ROW: cleaned.get_column(SOURCE_ROW),
            "email": cleaned.get_column(_EMAIL_READ),
            "reason": cleaned.get_column(_REASON),
            "original": original.get_column("original"),
        }
    )


def _identity_keys(cleaned: pl.DataFrame, offset: int) -> pl.DataFrame:
    """``h`` (an in-process 64-bit hash of the identity) and ``p`` (the row's position among all rows: the batch
    starts at ``offset``) of the rows that have an identity (not rejected), sorted by ``h``: sorted in the batch's
    worker, they merge cheaply in the dedupe."""
    return (
        cleaned.lazy()
        .with_row_index("p", offset=offset)
        .filter(pl.col("identity").is_not_null())
        .select(pl.col("identity").hash().alias("h"), "p")
        .sort("h")
        .collect(engine="in-memory")
    )


def _hash_groups(identity_keys: list[pl.DataFrame]) -> pl.DataFrame:
    """``p`` (position) and ``_g`` (rows sharing an identity hash share it) of each row whose identity hash another
    row shares, by position."""
    keys = pl.concat(identity_keys).sort("h")  # runs already sorted: ~3x faster than is_duplicated over the hashes
    h = keys.get_column("h")
    repeated = (h == h.shift(1)).fill_null(False) | (h == h.shift(-1)).fill_null(False)
    return keys.filter(repeated).select("p", pl.col("h").rle_id().alias("_g")).sort("p")


def _duplicate_groups(
    parts: _Parts, identity_keys: list[pl.DataFrame], offsets: list[int], heights: list[int]
) -> tuple[pl.DataFrame, _Groups]:
    """(duplicates frame, groups) for the cleaned rows of every batch, found across batches.

    ``identity_keys`` holds each batch's 64-bit identity hashes (:func:`_identity_keys`); only the rows whose hash
    repeats somewhere are kept (with their global position ``_pos``, as ``candidates`` parts) and grouped by that
    hash once every group is checked to hold one identity text; otherwise (a hash collision, odds ~n**2 / 2**65)
    by the text itself, so a collision only costs a little work, never a merge. A group (one identity seen more
    than once) has the positions of its rows (``_pos``, survivor first) and the first non-null value of each
    field in row order, computed one field at a time from Parquet parts so only a column of the candidates is in
    memory at once.
    """
    hashed = _hash_groups(identity_keys)
    positions = hashed.get_column("p")
    keys = []
    for index, (offset, height) in enumerate(zip(offsets, heights)):
        first, last = positions.search_sorted(offset), positions.search_sorted(offset + height)
        rows = parts.get("clean", index)
        mask = pl.repeat(False, height, eager=True).scatter(positions.slice(first, last - first) - offset, True)
        candidates = rows.with_row_index("_pos", offset=offset).filter(mask)  # a filter: ~20% faster than a gather
        parts.put("candidates", candidates)
        keys.append(_pick(candidates, "_pos", "identity", SOURCE_ROW))
    fields = [c for c in candidates.columns if c not in (SOURCE_ROW, "identity", "_pos")]
    key_frame = pl.concat(keys, how="vertical") if len(keys) > 1 else keys[0]
    del keys
    key_frame = key_frame.with_columns(hashed.get_column("_g"))  # both by position
    one_text = key_frame.select((pl.col("identity") == pl.col("identity").first().over("_g")).all()).item()
    if not one_text:
        key_frame = key_frame.with_columns(pl.col("identity").rank("dense").cast(pl.UInt32).alias("_g"))
    groups = (
        key_frame.group_by("_g", maintain_order=True)  # groups in order of first appearance, like the rows
        .agg(pl.col("_pos"), pl.col(SOURCE_ROW).alias("_rows"))
        .filter(pl.col("_rows").list.len() > 1)
    )
    # Each candidate row's group (null: its hash met another identity's, and its identity is unique).
    group = key_frame.get_column("_g")
    if groups.height < group.n_unique():
        group = group.set(~group.is_in(groups.get_column("_g").implode()), None)
    del key_frame
    firsts: dict[str, pl.Series] = {}
    # In memory every field at once; from Parquet parts one column at a time, to bound memory.
    for names in [fields] if parts.dir is None else [[name] for name in fields]:
        columns = parts.column("candidates", names).with_columns(group).filter(group.is_not_null())
        agg = columns.group_by("_g", maintain_order=True).agg(pl.col(name).drop_nulls().first() for name in names)
        firsts.update({name: agg.get_column(name) for name in names})
    parts.drop("candidates")
    groups = groups.with_columns(**firsts) if groups.height else groups.with_columns(
        pl.lit(None, dtype=candidates.schema[name]).alias(name) for name in fields
    )
    duplicates = (
        groups.select(pl.col("_rows").list.first().alias("merged_into"), "email", "_rows")
        .explode("_rows")
        .filter(pl.col("_rows") != pl.col("merged_into"))
        .select(pl.col("_rows").alias(SOURCE_ROW), "email", "merged_into")
        .sort(SOURCE_ROW)
    )
    return duplicates, _Groups.of(groups.drop("_rows", "_g"))


@dataclass(frozen=True)
class _Groups:
    """What the merge needs of the dedupe: the groups, their survivors' positions and the dropped rows' positions."""

    frame: pl.DataFrame
    """One row per identity seen more than once: ``_pos`` (positions, survivor first) and each field's first value."""
    survivors: pl.Series
    """The first position of each group, ascending (groups are numbered in order of first appearance)."""
    dropped: pl.Series
    """The other positions of every group, ascending."""

    @classmethod
    def of(cls, frame: pl.DataFrame) -> _Groups:
        positions = frame.get_column("_pos")
        return cls(frame, positions.list.first(), positions.list.slice(1).explode().drop_nulls().sort())


def _merge_batch(rows: pl.DataFrame, groups: _Groups, offset: int) -> pl.DataFrame:
    """One batch's cleaned rows (global positions from ``offset``) without the rejected ones (null identity) and the
    dropped duplicates, survivors filled (and, with a ``fingerprint`` column, their fingerprints redone).

    A survivor's own non-null value is its group's first non-null, so coalescing fills only its gaps.
    """
    end = offset + rows.height
    first, last = groups.survivors.search_sorted(offset), groups.survivors.search_sorted(end)
    survivor_rows = groups.survivors.slice(first, last - first) - offset
    dropped = groups.dropped.slice(
        groups.dropped.search_sorted(offset), groups.dropped.search_sorted(end) - groups.dropped.search_sorted(offset)
    )
    keep = rows.get_column("identity").is_not_null()  # a rejected row has none
    if survivor_rows.len() == 0 and dropped.len() == 0:
        return rows if keep.all() else rows.filter(keep)
    here = groups.frame.slice(first, last - first)
    keep = keep.scatter(dropped - offset, False)
    # Fill only the fields where some survivor is empty and its group has a value (usually few or none).
    fields = [c for c in here.columns if c != "_pos"]
    own = _pick(rows, *fields)[survivor_rows]  # the survivors' own values, one gather for all fields
    gap = {c: own.get_column(c).is_null() & here.get_column(c).is_not_null() for c in fields}
    gaps = [c for c in fields if gap[c].any()]
    if not gaps:
        return rows.filter(keep)
    changed = functools.reduce(operator.or_, (gap[c] for c in gaps))  # survivors that get some value
    final = own.filter(changed).with_columns(  # their values once filled
        pl.coalesce(pl.col(c), pl.lit(here.get_column(c).filter(changed))).alias(c) for c in gaps
    )
    merged = rows.filter(keep)
    # Where those survivors are once the dropped rows are gone; a scatter of a few values each costs less than
    # coalescing whole columns.
    refilled = keep.cast(pl.UInt32).cum_sum().gather(survivor_rows.filter(changed)) - 1
    patched = [merged.get_column(c).scatter(refilled, final.get_column(c)) for c in gaps]
    if "fingerprint" in merged.columns:  # a filled survivor's fingerprint is redone from its final fields
        patched.append(merged.get_column("fingerprint").scatter(refilled, _fingerprints(final)))
    return merged.with_columns(patched)


def _fingerprints(rows: pl.DataFrame) -> pl.Series:
    """The ``fingerprint`` of each row (:func:`apollo_sync.payload.contact_fingerprint` of its payload fields)."""
    # A null adds nothing to the sum: columns null in every row here need no hashing.
    fields = [c for c in payload_fields(rows.columns) if rows.get_column(c).null_count() < rows.height]
    return _with_columns(rows, contact_fingerprint(fields).alias("fingerprint")).get_column("fingerprint")


def _contact_columns(contacts: pl.DataFrame) -> pl.DataFrame:
    """``contacts`` in :data:`CONTACT_COLUMNS` order, custom fields last."""
    return _pick(contacts, *CONTACT_COLUMNS, *[c for c in contacts.columns if c.startswith(CUSTOM_PREFIX)])
