"""The engine's tuning knobs, as one frozen value passed to :func:`apollo_sync.clean.prepare`.

None of them changes a result: they trade speed and memory, and tests turn them to push the engine down its
slower paths (every row cleaned, no shortcut for sparse columns, hash collisions) and check it still gives what
:mod:`apollo_sync.clean.rules` says.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class EngineOptions:
    """How prepare() works through a frame (defaults as measured best: BENCHMARKS.md, "The transform")."""

    batch_rows: int = 250_000
    """Rows cleaned at a time (two batches at once, in threads). A batch of a 15-column export costs ~0.35 GB while
    it is cleaned; only its cleaned rows (in memory, or in Parquet files with ``out_dir``) and 16 bytes a row for
    the dedupe outlive it."""
    first_batch_rows: int = 2_000
    """Rows in the first batch read from a LazyFrame: a sending run plans and sends them while the rest is cleaned,
    so the first request waits for 2,000 rows, not 250,000 (BENCHMARKS.md: 2,000 against 5,000 and 50,000)."""
    repeats: int = 4
    """A column (or city/state/country combination) is cleaned once per distinct value and mapped back when it has
    at most one distinct value in this many rows of a batch."""
    sample_rows: int = 2_000
    """Rows of a batch's head on which a column is first judged to repeat (at most 1 distinct in 2 rows) before
    its distinct values are all found: finding those of a near-unique column costs about as much as cleaning it."""
    sparse_share: float = 0.5
    """A LinkedIn or phone column more than this share null is built on its values only and scattered back
    (13-29% less CPU when 70-80% is null); 1.0 never does that."""
    hash_bits: int = 64
    """Bits kept of the 64-bit hashes that match rows to distinct values and find repeated identities. The
    engine checks every hash match and falls back to the text on a collision; fewer bits force collisions
    (tests), 64 makes them ~n**2 / 2**65 unlikely."""

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.first_batch_rows < 1 or self.repeats < 1 or self.sample_rows < 1:
            raise ValueError("batch_rows, first_batch_rows, repeats and sample_rows must be positive")
        if not 0 <= self.hash_bits <= 64:
            raise ValueError("hash_bits must be between 0 and 64")

    def hashed(self, expr: pl.Expr) -> pl.Expr:
        """A UInt64 hash expression with only :attr:`hash_bits` of its bits kept."""
        if self.hash_bits == 64:
            return expr
        return expr & pl.lit((1 << self.hash_bits) - 1, dtype=pl.UInt64)
