"""Frames prepare() makes batch by batch, kept in memory or as Parquet parts in ``out_dir``; and the parts' upkeep.

With ``out_dir`` every intermediate (``clean-*``, ``candidates-*``) and result (``contacts-*``, ``rejected-*``,
``duplicates-*``) is a Parquet part on disk, and :data:`DONE_MARKER` is written last. That bounds memory on 10M-row
sources (bench/bench_dry_run.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import polars as pl

from apollo_sync.clean.frames import pick

if TYPE_CHECKING:
    from apollo_sync.clean.engine import Prepared

    P = TypeVar("P", bound=Prepared)

PART_KINDS = ("contacts", "rejected", "duplicates")
"""The result kinds: a Prepared has one frame of each."""
WORK_KINDS = ("source", "clean", "candidates")
"""Intermediate kinds (``source``: the Parquet copy of the source both passes read), gone once prepare() returns."""
DONE_MARKER = "prepared.json"
"""Written last in ``out_dir``: its presence means the Parquet parts are whole (and gives the counts)."""


def reopen_parts(prepared: P, out_dir: str | Path) -> P:
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


class Parts:
    """Frames made batch by batch, each kind a list of parts: kept in memory, or written as Parquet parts in ``out_dir``."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.dir = None if out_dir is None else Path(out_dir)
        self.memory: dict[str, list[pl.DataFrame | None]] = {}
        self.count: dict[str, int] = {}
        self.heights: dict[str, int] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / DONE_MARKER).unlink(missing_ok=True)
            for kind in (*PART_KINDS, *WORK_KINDS):
                for old in self.dir.glob(f"{kind}-*.parquet"):
                    old.unlink()

    def path(self, kind: str, index: int) -> Path:
        """The Parquet file of part ``index`` of ``kind`` (only with ``out_dir``)."""
        assert self.dir is not None
        return self.dir / f"{kind}-{index:05d}.parquet"

    def put(self, kind: str, df: pl.DataFrame) -> None:
        """Add ``df`` as the next part of ``kind``."""
        index = self.count.get(kind, 0)
        self.count[kind] = index + 1
        self.heights[kind] = self.heights.get(kind, 0) + df.height
        if self.dir is None:
            self.memory.setdefault(kind, []).append(df)
        else:
            df.write_parquet(self.path(kind, index), statistics=False)

    def get(self, kind: str, index: int) -> pl.DataFrame:
        """Part ``index`` of ``kind``."""
        if self.dir is None:
            df = self.memory[kind][index]
            assert df is not None
            return df
        return pl.read_parquet(self.path(kind, index))

    def take(self, kind: str, index: int) -> pl.DataFrame:
        """Like :meth:`get`, and the part is gone afterwards (its memory or file freed)."""
        df = self.get(kind, index)
        if self.dir is None:
            self.memory[kind][index] = None
        else:
            self.path(kind, index).unlink()
        return df

    def column(self, kind: str, columns: list[str]) -> pl.DataFrame:
        """``columns`` of every part of ``kind``, concatenated (Parquet reads only those columns)."""
        if self.dir is None:
            frames = [pick(df, *columns) for df in self.memory[kind] if df is not None]
            return pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
        return pl.read_parquet(self.dir / f"{kind}-*.parquet", columns=columns)

    def schema(self, kind: str) -> pl.Schema:
        """The columns of ``kind``'s parts (there must be one)."""
        if self.dir is None:
            return next(df for df in self.memory[kind] if df is not None).schema
        return pl.read_parquet_schema(self.path(kind, 0))

    def drop(self, kind: str) -> None:
        """Forget every part of ``kind`` (memory freed, files removed)."""
        self.memory.pop(kind, None)
        if self.dir is not None:
            for path in self.dir.glob(f"{kind}-*.parquet"):
                path.unlink()

    def frame(self, kind: str) -> pl.DataFrame | pl.LazyFrame:
        """Every part of ``kind`` as one frame: concatenated in memory, or a LazyFrame scanning the files."""
        if self.dir is None:
            frames = self.memory.pop(kind)
            return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical", rechunk=False)
        return pl.scan_parquet(self.dir / f"{kind}-*.parquet")

    def finish(self, **figures: int) -> dict[str, int]:
        """The ``<kind>_count`` of each result kind; with ``out_dir`` they and ``figures`` go into :data:`DONE_MARKER`."""
        counts = {f"{kind}_count": self.heights.get(kind, 0) for kind in PART_KINDS}
        if self.dir is not None:
            (self.dir / DONE_MARKER).write_text(json.dumps({**figures, **counts}) + "\n", encoding="utf-8")
        return counts
