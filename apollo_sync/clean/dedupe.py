"""Dedupe across the source: identity hashes, candidate groups, and the merge that fills survivors.

The engine's first pass hashes every row's identity (:func:`identity_hashes`) and finds the positions whose hash
repeats (:func:`repeated_positions`): only those rows (the *candidates*) can be duplicates or survivors, so every
other row is final as soon as its batch is cleaned. The second pass keeps the candidates apart; once the source
is read, :func:`candidate_groups` checks that each hash group holds one identity text (else groups by the text:
a collision costs a little work, never a merge) and finds each group's first non-null value of every field, and
:func:`merge_candidates` drops the duplicates and fills the survivors' gaps. The rule it implements (first row
survives, its empty fields filled from later duplicates in row order) is stated in :mod:`apollo_sync.clean.rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from apollo_sync.clean.columns import GROUP, GROUP_ROWS, KEY_HASH, POSITION, SOURCE_ROW
from apollo_sync.clean.frames import lazy_select, lazy_with_columns
from apollo_sync.clean.options import EngineOptions
from apollo_sync.clean.parts import Parts
from apollo_sync.clean.payload import contact_fingerprint, payload_fields


def identity_hashes(cleaned: pl.DataFrame, options: EngineOptions) -> pl.Series:
    """The in-process 64-bit hash of each row's identity (null where the row has none: rejected), in row order."""
    identity = pl.col("identity")
    return lazy_select(cleaned, pl.when(identity.is_not_null()).then(options.hashed(identity.hash())).alias(KEY_HASH)).to_series()


def repeated_positions(hashes: pl.Series) -> pl.Series:
    """The positions (ascending) of the rows whose identity hash another row shares: the dedupe's candidates."""
    return (hashes.is_duplicated() & hashes.is_not_null()).arg_true()


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


def candidate_groups(parts: Parts, options: EngineOptions) -> tuple[pl.DataFrame, Groups]:
    """(duplicates frame, groups) of the ``candidates`` parts: the cleaned rows (with their position ``_pos``)
    whose identity hash repeats somewhere in the source.

    Candidates are grouped by that hash once every group is checked to hold one identity text; otherwise (a hash
    collision, odds ~n**2 / 2**65) by the text itself. A group (one identity seen more than once) has the
    positions of its rows (``_pos``, survivor first) and the first non-null value of each field in row order,
    computed one field at a time from Parquet parts so only a column of the candidates is in memory at once.
    """
    schema = parts.schema("candidates")
    fields = [c for c in schema if c not in (SOURCE_ROW, "identity", POSITION)]
    key_frame = parts.column("candidates", [POSITION, "identity", SOURCE_ROW])
    key_frame = key_frame.with_columns(options.hashed(pl.col("identity").hash()).rank("dense").cast(pl.UInt32).alias(GROUP))
    one_text = key_frame.select((pl.col("identity") == pl.col("identity").first().over(GROUP)).all()).item()
    if not one_text:
        key_frame = key_frame.with_columns(pl.col("identity").rank("dense").cast(pl.UInt32).alias(GROUP))
    groups = (
        key_frame.group_by(GROUP, maintain_order=True)  # groups in order of first appearance, like the rows
        .agg(pl.col(POSITION), pl.col(SOURCE_ROW).alias(GROUP_ROWS))
        .filter(pl.col(GROUP_ROWS).list.len() > 1)
    )
    # Each candidate row's group (null: its hash met another identity's or a rejected row's: it is unique).
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
    groups = groups.with_columns(**firsts) if groups.height else groups.with_columns(
        pl.lit(None, dtype=schema[name]).alias(name) for name in fields
    )
    duplicates = (
        groups.select(pl.col(GROUP_ROWS).list.first().alias("merged_into"), "email", GROUP_ROWS)
        .explode(GROUP_ROWS)
        .filter(pl.col(GROUP_ROWS) != pl.col("merged_into"))
        .select(pl.col(GROUP_ROWS).alias(SOURCE_ROW), "email", "merged_into")
        .sort(SOURCE_ROW)
    )
    return duplicates, Groups.of(groups.drop(GROUP_ROWS, GROUP))


def merge_candidates(rows: pl.DataFrame, groups: Groups) -> pl.DataFrame:
    """One part of candidate rows (with ``_pos``) without the dropped duplicates, survivors filled with their
    group's first value of every field, fingerprinted; ``_pos`` gone.

    A survivor's own non-null value is its group's first non-null (it comes first), so coalescing fills only its
    gaps; a candidate in no group (its hash repeated, its identity did not) is kept as it is.
    """
    kept = rows.filter(~pl.col(POSITION).is_in(groups.dropped.implode()))
    firsts = groups.frame.with_columns(pl.col(POSITION).list.first()).rename(
        {c: f"_first_{c}" for c in groups.frame.columns if c != POSITION}
    )
    fields = [c for c in groups.frame.columns if c != POSITION]
    merged = (
        kept.join(firsts, on=POSITION, how="left", maintain_order="left")
        .with_columns(pl.coalesce(pl.col(c), pl.col(f"_first_{c}")).alias(c) for c in fields)
        .select(c for c in kept.columns if c != POSITION)
    )
    return merged.with_columns(fingerprints(merged))


def fingerprints(rows: pl.DataFrame) -> pl.Series:
    """The ``fingerprint`` of each row (:func:`apollo_sync.clean.payload.contact_fingerprint` of its payload fields)."""
    # A null adds nothing to the sum: columns null in every row here need no hashing.
    fields = [c for c in payload_fields(rows.columns) if rows.get_column(c).null_count() < rows.height]
    return lazy_with_columns(rows, contact_fingerprint(fields).alias("fingerprint")).get_column("fingerprint")
