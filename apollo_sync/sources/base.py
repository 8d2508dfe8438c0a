"""What every kind of source shares: the options, the :class:`Source` it gives, the format table, the all-text scan.

:func:`scan` is the one polars scan behind local files (:mod:`.files`) and remote objects (:mod:`.remote`): every
column turned to ``pl.String``, rows whose every field is empty dropped. SQL results (:mod:`.sql`) arrive as text
already and are scanned from their spill file directly.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.settings import SOURCE_ROW

FORMATS = ("csv", "tsv", "parquet", "json", "ndjson", "xlsx")
EXTENSION_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".xlsx": "xlsx",
}
TEXT_FORMATS = ("csv", "tsv", "json", "ndjson")
DELIMITERS = (",", ";", "\t", "|")
SQL_SCHEMES = ("sqlite", "postgresql", "postgres")
REMOTE_SCHEMES = ("s3", "https", "http")

READ_CHUNK_BYTES = 1 << 20
"""Files are hashed, checked and transcoded in chunks of this size: memory does not grow with the file."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source. ``None`` means detect (format from the extension, delimiter from the head)."""

    format: str | None = None
    delimiter: str | None = None
    encoding: str = "utf-8"
    query: str | None = None
    cursor_column: str | None = None
    cursor_after: str | None = None


@dataclass(frozen=True)
class Source:
    """A source ready to scan.

    ``frame``: every column ``pl.String`` plus ``source_row`` Int64 from 1.
    ``description``: short, for run names. ``fingerprint``: content hash for caching (never a password).
    ``uri``: for asset lineage, without credentials. ``cursor_max``: with ``cursor_column``, the greatest cursor
    value read (``cursor_after`` again when no row was newer), else ``None``.
    """

    frame: pl.LazyFrame
    description: str
    fingerprint: str
    uri: str
    cursor_max: str | None = None


def scheme_of(spec: str) -> str:
    """The lower-cased URL scheme of ``spec`` (``sqlite``, ``s3``, ...), or ``""`` for a plain path."""
    match = _SCHEME.match(spec)
    return match.group(1).lower() if match else ""


def file_format(name: str, options: SourceOptions) -> str:
    """The format of file ``name``: ``options.format`` (aliases allowed), else from its extension."""
    if options.format:
        fmt = options.format.lower().lstrip(".")
        fmt = {"jsonl": "ndjson", "excel": "xlsx", "pq": "parquet"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise InputError(f"unknown --format {options.format!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(name).suffix.lower()
    if suffix not in EXTENSION_FORMATS:
        shown = f"extension '{suffix}'" if suffix else "no extension"
        raise InputError(f"cannot tell the format of {name} ({shown}): pass --format {'|'.join(FORMATS)}")
    return EXTENSION_FORMATS[suffix]


def codec(encoding: str) -> codecs.CodecInfo:
    """The codec named by ``--encoding`` (UTF-8 when empty); InputError for an unknown name."""
    try:
        return codecs.lookup(encoding or "utf-8")
    except LookupError:
        raise InputError(f"unknown --encoding {encoding!r}: use utf-8, utf-8-sig, latin-1 or cp1252") from None


def given_delimiter(given: str | None, fmt: str) -> str | None:
    """The given delimiter (``\\t`` or ``tab`` for a tab), tab for TSV, else None: detect it."""
    if given:
        value = {"\\t": "\t", "tab": "\t", "tsv": "\t"}.get(given.lower(), given)
        if len(value) != 1:
            raise InputError(f"--delimiter must be one character, got {given!r}")
        return value
    if fmt == "tsv":
        return "\t"
    return None


def scan(target: str | Path | bytes, fmt: str, shown: str, *, delimiter: str = ",", head_text: str = "",
         storage_options: dict[str, str] | None = None) -> pl.LazyFrame:
    """The polars scan for one file or object, every column turned to text, blank rows dropped.

    ``target`` is a path or URL (for xlsx also the workbook's bytes, read once by the caller); ``shown`` names the
    source in errors; ``delimiter`` is used for CSV/TSV only; ``head_text`` (the decoded head of a local file, ``""``
    when there is none) tells a JSON array from NDJSON.
    """
    try:
        if fmt in ("csv", "tsv"):
            frame = pl.scan_csv(target, separator=delimiter, infer_schema=False, quote_char='"',
                                raise_if_empty=False, storage_options=storage_options, glob=False)
        elif fmt == "ndjson":
            frame = as_text(pl.scan_ndjson(target, infer_schema_length=None, storage_options=storage_options))
        elif fmt == "parquet":
            frame = as_text(pl.scan_parquet(target, storage_options=storage_options, glob=False))
        elif fmt == "json":
            if head_text and not head_text.lstrip().startswith("["):
                raise InputError(f"{shown} is not a JSON array of objects: pass --format ndjson if it has one object per line")
            frame = as_text(pl.read_json(target, infer_schema_length=None).lazy())
        else:  # xlsx: the first sheet, every cell as text
            frame = pl.read_excel(target, sheet_id=1, infer_schema_length=0, drop_empty_cols=False,
                                  raise_if_empty=False).lazy()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - polars/fastexcel raise many types; all mean "cannot read"
        raise InputError(f"cannot read {shown} as {fmt}: {first_line(exc)}; check the file or pass --format") from None
    return frame.filter(~pl.all_horizontal(pl.all().is_null()))


def as_text(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Every column to ``pl.String``: lists of plain values joined with ';', structs as JSON text."""
    exprs = []
    for name, dtype in frame.collect_schema().items():
        col = pl.col(name)
        if dtype == pl.String:
            exprs.append(col)
        elif isinstance(dtype, (pl.List, pl.Array)):
            exprs.append(col.cast(pl.List(pl.String)).list.join(";"))
        elif isinstance(dtype, pl.Struct):
            exprs.append(col.struct.json_encode())
        else:
            exprs.append(col.cast(pl.String))
    return frame.select(exprs)


def numbered(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``source_row`` (Int64, 1-based) as the first column."""
    return frame.with_row_index(SOURCE_ROW, offset=1).with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))


def options_key(options: SourceOptions) -> str:
    """The options that change the frame, as text for the fingerprint."""
    return json.dumps([options.format, options.delimiter, (options.encoding or "utf-8").lower()])


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip().rstrip(".:")
