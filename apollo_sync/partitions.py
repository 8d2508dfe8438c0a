"""Split one large source into partitions, and merge the partitions' run summaries into one (no Prefect here).

The ``sync-partitions`` flow runs one ``sync-contacts`` child per :class:`Partition`; each partition is a source
spec (plus a query for SQL) that the child reads like any other source:

- a glob (``exports/*.csv``): one partition per file, in sorted order;
- a SQL URL with ``query``, ``partition_column`` and ``partitions`` N: N key ranges of nearly equal size. The
  boundaries are the last key of each ``NTILE(N)`` tile (works on SQLite and PostgreSQL, for any orderable key),
  and each partition's query is ``SELECT * FROM (query) WHERE key > lo AND key <= hi``; rows whose key is NULL go
  to the first partition, so no row is lost;
- one file with ``partitions`` N: the rows (as read by ``read_source``, so blank lines and encodings are handled
  the same way) are written as N Parquet files of nearly equal size under ``split_dir``, one per partition.
  Their ``source_row`` numbers count from 1 in each part; the file name says which rows of the original it holds.

**One version per contact.** A contact in several partitions (the same identity, maybe with other names or titles) is
sent from one of them: the first partition in partition order, its first row there (as within one source). The
parent reads each partition's identities, :func:`partition_losers` decides, the ledger keeps the losing rows under
the parent's run id, and each child reports those rows as ``duplicate`` (:func:`lost_rows`) instead of sending a
second version. An unchanged re-run therefore finds every sent version unchanged and sends nothing.

:func:`merge_summaries` adds the children's counts (``seconds`` is the parent's wall time) and keeps a line per
partition; a merged summary of consistent children adds up by the same rules (``report.summary_problems``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.files import private_dir, private_file, touch_private
from apollo_sync.ledger.base import LOSERS_SCHEMA, Ledger
from apollo_sync.params import RunParams
from apollo_sync.redact import redact_url
from apollo_sync.report import SUMMARY_FILE
from apollo_sync.settings import SOURCE_ROW
from apollo_sync.sources import SQL_SCHEMES, SourceOptions, expand_files, has_glob, read_source, scheme_of
from apollo_sync.sources.sql import (
    connect,
    driver_message,
    is_identifier,
    quote_identifier,
    quote_literal,
    scrub,
    table_query,
)

MAX_PARTITIONS = 1000
"""More partitions than this is almost surely a mistake (each is a flow run with its own start-up cost)."""
SUMMED_KEYS = (
    "rows_read", "rows_valid", "duplicates_in_source", "created", "updated", "existing", "failed", "unconfirmed",
    "unchanged", "would_send", "would_update", "requests", "retries", "rate_limited", "phones_dropped",
)  # fmt: skip
"""Summary counts that add across partitions."""


@dataclass(frozen=True)
class Partition:
    """One child run's share: ``source`` (and ``query`` for SQL); ``label`` names it in run names and reports.

    ``kind``: ``file`` (a file of a glob, read with the run's format options), ``sql`` (a key range) or ``part``
    (a Parquet part written by :func:`split_file`: read as Parquet, whatever the original format was).
    """

    number: int
    source: str
    label: str
    query: str | None = None
    kind: str = "file"


def plan_partitions(
    source: str,
    *,
    query: str | None = None,
    partition_column: str | None = None,
    partitions: int | None = None,
    split_dir: str | Path | None = None,
    options: SourceOptions = SourceOptions(),
) -> list[Partition]:
    """The partitions of ``source`` (see the module docstring); raises :class:`InputError` for what cannot split."""
    source = (source or "").strip()
    if partitions is not None and not 1 <= partitions <= MAX_PARTITIONS:
        raise InputError(f"partitions must be 1 to {MAX_PARTITIONS}, got {partitions}")
    scheme = scheme_of(source)
    if scheme in SQL_SCHEMES:
        if not (query and partition_column and partitions):
            raise InputError("a SQL source splits by key ranges: pass query, partition_column and partitions")
        return sql_partitions(source, query, partition_column, partitions)
    if query or partition_column:
        raise InputError("query and partition_column work only with sqlite:/// and postgresql:// sources")
    if scheme and scheme != "file":
        raise InputError(f"cannot partition a {scheme}:// source: use a glob of files or a SQL table")
    if has_glob(source):
        files = expand_files(source)
        return [Partition(i, str(path), path.name) for i, path in enumerate(files)]
    if not partitions:
        raise InputError(f"{source} is one file: pass partitions N to split it in N row ranges, or use a glob")
    if split_dir is None:
        raise InputError("splitting one file needs split_dir, a directory every worker can read")
    return split_file(source, partitions, split_dir, options)


# --- SQL key ranges -----------------------------------------------------------------------------------------


def sql_partitions(url: str, query: str, column: str, n: int) -> list[Partition]:
    """``n`` key ranges of ``column`` over ``query``'s rows, as one query per partition."""
    base = query.strip().rstrip(";").strip()
    if is_identifier(base):
        base = table_query(base)
    key = quote_identifier(column)
    bounds = _tile_bounds(url, base, column, n)
    inner = f"SELECT * FROM ({base}) AS apollo_sync_partition"
    parts = []
    edges = [None, *bounds[:-1], None]  # (lo, hi]: the last range has no upper bound
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        where = []
        if lo is not None:
            where.append(f"{key} > {_literal(lo)}")
        if hi is not None:
            where.append(f"{key} <= {_literal(hi)}")
        condition = " AND ".join(where) or "TRUE"
        if i == 0:
            condition = f"({condition}) OR {key} IS NULL"
        label = f"{column} in ({'' if lo is None else lo}, {'' if hi is None else hi}]"
        parts.append(Partition(i, url, label, f"{inner} WHERE {condition}", kind="sql"))
    return parts


def _tile_bounds(url: str, base: str, column: str, n: int) -> list[object]:
    """The greatest key of each non-empty NTILE(n) tile, ascending (fewer than n when there are fewer keys)."""
    import adbc_driver_manager

    key = quote_identifier(column)
    sql = (
        f"SELECT MAX(k) FROM (SELECT {key} AS k, NTILE({int(n)}) OVER (ORDER BY {key}) AS tile "
        f"FROM ({base}) AS apollo_sync_source WHERE {key} IS NOT NULL) AS tiles GROUP BY tile ORDER BY tile"
    )
    shown = redact_url(url)
    try:
        conn = connect(url)
    except adbc_driver_manager.Error as exc:
        raise InputError(f"cannot connect to {shown}: {_scrubbed(exc, url)}; check the URL") from None
    try:
        cursor = conn.cursor()
        cursor.execute(f"SELECT * FROM ({base}) AS apollo_sync_source LIMIT 0")  # SQLite reads "nope" as a string
        names = [d[0] for d in cursor.description]
        if column not in names:
            raise InputError(f"partition_column {column} is not a column of the query result: pick one of {', '.join(names)}")
        cursor.execute(sql)
        values = [row[0] for row in cursor.fetchall()]
    except adbc_driver_manager.Error as exc:
        raise InputError(f"cannot split {shown} by {key}: {_scrubbed(exc, url)}; check query and partition_column") from None
    finally:
        conn.close()
    bounds: list[object] = []
    for value in values:  # equal keys can end two tiles: keep each boundary once
        if not bounds or value != bounds[-1]:
            bounds.append(value)
    return bounds or [None]


def _scrubbed(exc: BaseException, url: str) -> str:
    return scrub(driver_message(exc), urlsplit(url).password)


def _literal(value: object) -> str:
    """A SQL literal for a key boundary: numbers as they are, everything else as a quoted string."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, Decimal)) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value) if isinstance(value, float) else str(value)
    return quote_literal(str(value))


# --- Row ranges of one file -------------------------------------------------------------------------------


def row_ranges(total: int, n: int) -> list[tuple[int, int]]:
    """``n`` (or fewer, never empty) half-open ranges [start, stop) of 0-based rows covering ``total`` rows."""
    n = max(1, min(n, total))
    size, extra = divmod(total, n)
    ranges, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def split_file(spec: str, n: int, split_dir: str | Path, options: SourceOptions = SourceOptions()) -> list[Partition]:
    """Write ``spec``'s rows as ``n`` Parquet parts under ``split_dir`` (text columns, as read); one partition each."""
    src = read_source(spec, options)
    out = Path(split_dir)
    try:
        private_dir(out)
    except OSError as exc:
        raise InputError(f"cannot create split_dir {out}: {exc.strerror or exc}") from None
    total = src.frame.select(pl.len()).collect().item()
    if total == 0:
        raise InputError(f"{spec} has no rows to split")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(spec).stem)[:60]
    parts = []
    for i, (start, stop) in enumerate(row_ranges(total, n)):
        path = out / f"{stem}.rows-{start + 1}-{stop}.parquet"
        rows = src.frame.filter(pl.col(SOURCE_ROW).is_between(start + 1, stop)).drop(SOURCE_ROW)
        rows.sink_parquet(path)
        private_file(path)
        parts.append(Partition(i, str(path), f"rows {start + 1}-{stop} of {Path(spec).name}", kind="part"))
    return parts


# --- One version per contact across partitions --------------------------------------------------------------


def partition_losers(frames: Sequence[pl.DataFrame], labels: Sequence[str] | None = None) -> pl.DataFrame:
    """The rows that another partition's version of the same contact wins over (:data:`LOSERS_SCHEMA`).

    ``frames[i]`` is partition i's rows that have an identity (``source_row``, ``identity``); ``labels[i]`` its
    label. An identity's winner is its first row in the first partition holding it; every row of that identity in
    a later partition loses to it. Rows of the winning partition itself are left to the child's own dedupe.
    """
    labels = list(labels) if labels is not None else [f"{i:03d}" for i in range(len(frames))]
    if len(labels) != len(frames):
        raise ValueError(f"{len(frames)} partitions but {len(labels)} labels")
    if not frames:
        return pl.DataFrame(schema=LOSERS_SCHEMA)
    rows = pl.concat(
        [
            frame.select(pl.col(SOURCE_ROW).cast(pl.Int64), pl.col("identity").cast(pl.String))
            .drop_nulls("identity")
            .with_columns(partition=pl.lit(i, pl.Int64))
            for i, frame in enumerate(frames)
        ]
    )
    winners = (
        rows.sort("partition", SOURCE_ROW, maintain_order=True)
        .unique("identity", keep="first", maintain_order=True)
        .select("identity", winner_partition="partition", winner_row=SOURCE_ROW)
    )
    names = pl.DataFrame({"winner_partition": range(len(labels)), "winner_label": labels},
                         schema={"winner_partition": pl.Int64, "winner_label": pl.String})  # fmt: skip
    return (
        rows.join(winners, on="identity")
        .filter(pl.col("partition") != pl.col("winner_partition"))
        .join(names, on="winner_partition", how="left")
        .select(list(LOSERS_SCHEMA))
        .sort("partition", SOURCE_ROW)
    )


def parent_partition(run: RunParams) -> tuple[str, int] | None:
    """``(parent run id, partition number)`` of a ``sync-partitions`` child (``run.parent_partition``), else None."""
    if not run.parent_partition:
        return None
    parent, _, number = run.parent_partition.rpartition(":")
    return parent, int(number)


def lost_rows(ledger: Ledger, run_params: RunParams, contacts: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``contacts`` (one part of a child's rows: ``source_row``, ``identity``, ...) whose contact another
    partition of the same parent run sends, with all their columns and a ``reason`` ("also in partition 002 (row
    17), which is sent"); an empty frame of the same columns when none is, or this run is not a partition child."""
    empty = contacts.head(0).with_columns(pl.lit(None, pl.String).alias("reason"))
    child = parent_partition(run_params)
    if child is None or contacts.height == 0:
        return empty
    rows = contacts.get_column(SOURCE_ROW)
    losers = ledger.losers(child[0], child[1], int(rows.min()), int(rows.max()))  # type: ignore[arg-type]
    if losers.height == 0:
        return empty
    reason = pl.format("also in partition {} (row {}), which is sent",
                       pl.col("winner_partition").cast(pl.String).str.zfill(3), pl.col("winner_row"))  # fmt: skip
    found = losers.select(pl.col(SOURCE_ROW).cast(rows.dtype), "identity", reason.alias("reason"))
    return contacts.join(found, on=[SOURCE_ROW, "identity"], how="inner", maintain_order="left")


def store_versions(
    ledger: Ledger,
    parent_run_id: str,
    sources: Sequence[tuple[str, SourceOptions]],
    labels: Sequence[str],
    *,
    mapping: str | None,
    phone_region: str,
) -> pl.DataFrame:
    """Read every partition (``sources[i]``: its spec and how its child reads it), decide which version of each
    contact is sent (:func:`partition_losers`) and keep the losers in ``ledger`` under ``parent_run_id``; returns
    them. Each partition's identities come from ``apollo_sync.clean.identities``, as its child will compute them."""
    from apollo_sync.clean import identities, load_mapping

    loaded = load_mapping(mapping) if mapping else None
    frames = [identities(read_source(spec, options).frame, mapping=loaded, phone_region=phone_region)
              for spec, options in sources]  # fmt: skip
    losers = partition_losers(frames, labels)
    ledger.store_losers(parent_run_id, losers)
    return losers


# --- Summaries ----------------------------------------------------------------------------------------------


def merge_summaries(
    children: Sequence[Mapping[str, object] | None],
    partitions: Sequence[Partition],
    *,
    seconds: float,
    states: Sequence[str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict:
    """One summary for the whole source: children's counts added, ``seconds`` the parent's wall time.

    ``children[i]`` is partition i's summary, or None when that child produced none (failed or crashed); its
    line in ``partitions`` then says so, and its rows are in no count.
    """
    merged: dict[str, object] = {key: 0 for key in SUMMED_KEYS}
    rejected: dict[str, int] = {}
    phone_drops: dict[str, int] = {}
    unmapped: set[str] = set()
    lines = []
    for i, (summary, part) in enumerate(zip(children, partitions)):
        state = states[i] if states else ("Completed" if summary is not None else "Failed")
        line: dict[str, object] = {"partition": part.number, "label": part.label, "state": state}
        if summary is not None:
            for key in SUMMED_KEYS:
                merged[key] += int(summary.get(key) or 0)  # type: ignore[operator]
            for reason, count in (summary.get("rejected") or {}).items():  # type: ignore[union-attr]
                rejected[reason] = rejected.get(reason, 0) + int(count)
            for reason, count in (summary.get("phones_dropped_by_reason") or {}).items():  # type: ignore[union-attr]
                phone_drops[reason] = phone_drops.get(reason, 0) + int(count)
            unmapped.update(summary.get("unmapped_columns") or [])  # type: ignore[arg-type]
            line |= {key: summary.get(key, 0) for key in ("rows_read", "created", "updated", "existing", "failed",
                                                          "unconfirmed", "unchanged", "duplicates_in_source")}  # fmt: skip
            line["report_dir"] = summary.get("report_dir")
        lines.append(line)
    for dry in ("would_send", "would_update"):
        if not merged[dry]:
            del merged[dry]
    merged["rejected"] = dict(sorted(rejected.items()))
    merged["phones_dropped_by_reason"] = dict(sorted(phone_drops.items()))
    merged["unmapped_columns"] = sorted(unmapped)
    merged["seconds"] = round(seconds, 3)
    merged["partitions"] = lines
    merged["partitions_failed"] = sum(1 for line in lines if line["state"] != "Completed")
    merged |= dict(extra or {})
    order = ["rows_read", "rows_valid", "rejected", "duplicates_in_source", "created", "updated", "existing", "failed",
             "unconfirmed", "unchanged", "would_send", "would_update", "requests", "retries", "seconds"]  # fmt: skip
    return {key: merged[key] for key in order if key in merged} | {k: v for k, v in merged.items() if k not in order}


def write_summary(report_dir: str | Path, summary: Mapping[str, object]) -> Path:
    """Write ``summary.json`` under ``report_dir`` atomically; returns its path."""
    out = private_dir(report_dir)
    tmp = out / (SUMMARY_FILE + ".tmp")
    touch_private(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return tmp.replace(out / SUMMARY_FILE)
