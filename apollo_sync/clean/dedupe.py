"""Dedupe across batches: identity hashes per batch, candidate groups, and the merge that fills survivors.

Each batch's worker gives the 64-bit hashes of its rows' identities, sorted (:func:`identity_keys`). The dedupe
then reads back only the rows whose hash repeats somewhere (:func:`duplicate_groups`), checks that each hash group
holds one identity text (else groups by the text: a collision costs a little work, never a merge), and finds each
group's first non-null value of every field. The merge runs per batch again (:func:`merge_batch`): it drops the
rejected rows and the duplicates in one filter and fills the survivors' gaps. The rule it implements (first row
survives, its empty fields filled from later duplicates in row order) is stated in :mod:`apollo_sync.clean.rules`.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import polars as pl

from apollo_sync.clean.columns import GROUP, GROUP_ROWS, KEY_HASH, KEY_POSITION, POSITION, SOURCE_ROW
from apollo_sync.clean.frames import lazy_with_columns, pick
from apollo_sync.clean.options import EngineOptions
from apollo_sync.clean.parts import Parts
from apollo_sync.clean.payload import contact_fingerprint, payload_fields


def identity_keys(cleaned: pl.DataFrame, offset: int, options: EngineOptions) -> pl.DataFrame:
    """``h`` (an in-process 64-bit hash of the identity) and ``p`` (the row's position among all rows: the batch
    starts at ``offset``) of the rows that have an identity (not rejected), sorted by ``h``: sorted in the batch's
    worker, they merge cheaply in the dedupe."""
    return (
        cleaned.lazy()
        .with_row_index(KEY_POSITION, offset=offset)
        .filter(pl.col("identity").is_not_null())
        .select(options.hashed(pl.col("identity").hash()).alias(KEY_HASH), KEY_POSITION)
        .sort(KEY_HASH)
        .collect(engine="in-memory")
    )


def hash_groups(keys_per_batch: list[pl.DataFrame]) -> pl.DataFrame:
    """``p`` (position) and ``_g`` (rows sharing an identity hash share it) of each row whose identity hash another
    row shares, by position."""
    keys = pl.concat(keys_per_batch).sort(KEY_HASH)  # runs already sorted: ~3x faster than is_duplicated
    h = keys.get_column(KEY_HASH)
    repeated = (h == h.shift(1)).fill_null(False) | (h == h.shift(-1)).fill_null(False)
    return keys.filter(repeated).select(KEY_POSITION, pl.col(KEY_HASH).rle_id().alias(GROUP)).sort(KEY_POSITION)


@dataclass(frozen=True)
class Groups:
    """What the merge needs of the dedupe: the groups, their survivors' positions and the dropped rows' positions."""

    frame: pl.DataFrame
    """One row per identity seen more than once: ``_pos`` (positions, survivor first) and each field's first value."""
    survivors: pl.Series
    """The first position of each group, ascending (groups are numbered in order of first appearance)."""
    dropped: pl.Series
    """The other positions of every group, ascending."""

    @classmethod
    def of(cls, frame: pl.DataFrame) -> Groups:
        positions = frame.get_column(POSITION)
        return cls(frame, positions.list.first(), positions.list.slice(1).explode().drop_nulls().sort())


def duplicate_groups(
    parts: Parts, keys_per_batch: list[pl.DataFrame], offsets: list[int], heights: list[int]
) -> tuple[pl.DataFrame, Groups]:
    """(duplicates frame, groups) for the cleaned rows of every batch (``clean`` parts), found across batches.

    Only the rows whose hash repeats somewhere are kept (with their global position ``_pos``, as ``candidates``
    parts) and grouped by that hash once every group is checked to hold one identity text; otherwise (a hash
    collision, odds ~n**2 / 2**65) by the text itself. A group (one identity seen more than once) has the
    positions of its rows (``_pos``, survivor first) and the first non-null value of each field in row order,
    computed one field at a time from Parquet parts so only a column of the candidates is in memory at once.
    """
    hashed = hash_groups(keys_per_batch)
    positions = hashed.get_column(KEY_POSITION)
    keys = []
    for index, (offset, height) in enumerate(zip(offsets, heights)):
        first, last = positions.search_sorted(offset), positions.search_sorted(offset + height)
        rows = parts.get("clean", index)
        mask = pl.repeat(False, height, eager=True).scatter(positions.slice(first, last - first) - offset, True)
        candidates = rows.with_row_index(POSITION, offset=offset).filter(mask)  # a filter: ~20% faster than a gather
        parts.put("candidates", candidates)
        keys.append(pick(candidates, POSITION, "identity", SOURCE_ROW))
    fields = [c for c in candidates.columns if c not in (SOURCE_ROW, "identity", POSITION)]
    key_frame = pl.concat(keys, how="vertical") if len(keys) > 1 else keys[0]
    del keys
    key_frame = key_frame.with_columns(hashed.get_column(GROUP))  # both by position
    one_text = key_frame.select((pl.col("identity") == pl.col("identity").first().over(GROUP)).all()).item()
    if not one_text:
        key_frame = key_frame.with_columns(pl.col("identity").rank("dense").cast(pl.UInt32).alias(GROUP))
    groups = (
        key_frame.group_by(GROUP, maintain_order=True)  # groups in order of first appearance, like the rows
        .agg(pl.col(POSITION), pl.col(SOURCE_ROW).alias(GROUP_ROWS))
        .filter(pl.col(GROUP_ROWS).list.len() > 1)
    )
    # Each candidate row's group (null: its hash met another identity's, and its identity is unique).
    group = key_frame.get_column(GROUP)
    if groups.height < group.n_unique():
        group = group.set(~group.is_in(groups.get_column(GROUP).implode()), None)
    del key_frame
    firsts: dict[str, pl.Series] = {}
    # In memory every field at once; from Parquet parts one column at a time, to bound memory.
    for names in [fields] if parts.dir is None else [[name] for name in fields]:
        columns = parts.column("candidates", names).with_columns(group).filter(group.is_not_null())
        agg = columns.group_by(GROUP, maintain_order=True).agg(pl.col(name).drop_nulls().first() for name in names)
        firsts.update({name: agg.get_column(name) for name in names})
    parts.drop("candidates")
    groups = groups.with_columns(**firsts) if groups.height else groups.with_columns(
        pl.lit(None, dtype=candidates.schema[name]).alias(name) for name in fields
    )
    duplicates = (
        groups.select(pl.col(GROUP_ROWS).list.first().alias("merged_into"), "email", GROUP_ROWS)
        .explode(GROUP_ROWS)
        .filter(pl.col(GROUP_ROWS) != pl.col("merged_into"))
        .select(pl.col(GROUP_ROWS).alias(SOURCE_ROW), "email", "merged_into")
        .sort(SOURCE_ROW)
    )
    return duplicates, Groups.of(groups.drop(GROUP_ROWS, GROUP))


def merge_batch(rows: pl.DataFrame, groups: Groups, offset: int) -> pl.DataFrame:
    """One batch's cleaned rows (global positions from ``offset``) without the rejected ones (null identity) and the
    dropped duplicates, survivors filled (and, with a ``fingerprint`` column, their fingerprints redone).

    A survivor's own non-null value is its group's first non-null, so coalescing fills only its gaps.
    """
    end = offset + rows.height
    first, last = groups.survivors.search_sorted(offset), groups.survivors.search_sorted(end)
    survivor_rows = groups.survivors.slice(first, last - first) - offset
    dropped_from, dropped_to = groups.dropped.search_sorted(offset), groups.dropped.search_sorted(end)
    dropped = groups.dropped.slice(dropped_from, dropped_to - dropped_from)
    keep = rows.get_column("identity").is_not_null()  # a rejected row has none
    if survivor_rows.len() == 0 and dropped.len() == 0:
        return rows if keep.all() else rows.filter(keep)
    here = groups.frame.slice(first, last - first)
    keep = keep.scatter(dropped - offset, False)
    # Fill only the fields where some survivor is empty and its group has a value (usually few or none).
    fields = [c for c in here.columns if c != POSITION]
    own = pick(rows, *fields)[survivor_rows]  # the survivors' own values, one gather for all fields
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
    patched = [patch(merged.get_column(c), refilled, final.get_column(c)) for c in gaps]
    if "fingerprint" in merged.columns:  # a filled survivor's fingerprint is redone from its final fields
        patched.append(merged.get_column("fingerprint").scatter(refilled, fingerprints(final)))
    return merged.with_columns(patched)


def patch(column: pl.Series, at: pl.Series, values: pl.Series) -> pl.Series:
    """``column`` with ``values`` at the positions ``at`` (where a value is null the column's own stays)."""
    if not isinstance(column.dtype, pl.List):
        return column.scatter(at, values)
    # Series.scatter does not take List columns (polars 2.1: "not yet implemented"): gather the values into place.
    where = pl.repeat(None, column.len(), dtype=pl.UInt32, eager=True)
    where = where.scatter(at, pl.int_range(values.len(), dtype=pl.UInt32, eager=True))
    return pl.select(pl.coalesce(pl.lit(values.gather(where)), pl.lit(column))).to_series().alias(column.name)


def fingerprints(rows: pl.DataFrame) -> pl.Series:
    """The ``fingerprint`` of each row (:func:`apollo_sync.clean.payload.contact_fingerprint` of its payload fields)."""
    # A null adds nothing to the sum: columns null in every row here need no hashing.
    fields = [c for c in payload_fields(rows.columns) if rows.get_column(c).null_count() < rows.height]
    return lazy_with_columns(rows, contact_fingerprint(fields).alias("fingerprint")).get_column("fingerprint")
