"""Small DataFrame helpers the engine's modules share: column picks without copies, lazy selects, sparse columns."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl


def pick(frame: pl.DataFrame, *names: str) -> pl.DataFrame:
    """The columns ``names`` of ``frame``, without copying: DataFrame.select/drop copied every column of a frame whose
    columns are chunked differently (as after scatter and per-distinct gathers), ~5-10 ms a 250k-row batch."""
    return pl.DataFrame([frame.get_column(name) for name in names])


def without(frame: pl.DataFrame, *names: str) -> pl.DataFrame:
    """``frame`` without the columns ``names`` (see :func:`pick`)."""
    return pick(frame, *[c for c in frame.columns if c not in names])


def lazy_select(frame: pl.DataFrame, *exprs: pl.Expr) -> pl.DataFrame:
    """``frame.select(*exprs)`` through the lazy engine: DataFrame.select ran single-threaded (measured ~1.7x the wall
    time of the same lazy query on a 250k-row batch)."""
    return frame.lazy().select(*exprs).collect()


def lazy_with_columns(frame: pl.DataFrame, *exprs: pl.Expr) -> pl.DataFrame:
    """``frame.with_columns(*exprs)`` through the lazy engine (see :func:`lazy_select`)."""
    return frame.lazy().with_columns(*exprs).collect()


def is_sparse(values: pl.Series, share: float) -> bool:
    """True when more than ``share`` of ``values`` is null: :func:`on_values` then costs less than an expression over
    the column."""
    return values.null_count() > share * values.len()


def on_values(values: pl.Series, build: Callable[[pl.Expr], pl.Expr]) -> pl.Series:
    """``build`` over the non-null ``values`` only, scattered back (null elsewhere): 13-29% less CPU than over the
    whole column when 70-80% of it is null (measured on LinkedIn and mobile phones of a CRM export)."""
    rows = values.is_not_null().arg_true()
    built = lazy_select(values.gather(rows).to_frame("v"), build(pl.col("v")).alias("v")).to_series()
    return pl.repeat(None, values.len(), dtype=built.dtype, eager=True).scatter(rows, built)
