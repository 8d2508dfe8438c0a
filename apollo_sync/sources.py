"""Read a contact source into a polars LazyFrame of text columns, numbered by ``source_row``.

A source is named by one string (the CLI's ``SOURCE``):

- a local path or glob: ``contacts.csv``, ``exports/*.csv``; format from the extension (``.csv``, ``.tsv``,
  ``.parquet``, ``.json`` = array of objects, ``.ndjson``/``.jsonl``, ``.xlsx`` = first sheet) or
  ``SourceOptions.format``. A glob's files are read in sorted order, their columns unioned by name, and
  ``source_row`` keeps counting across files.
- ``sqlite:///path.db`` or ``postgresql://user:pw@host:port/db`` with ``SourceOptions.query`` (a SELECT or a bare
  table name), read through ADBC. With ``cursor_column`` only rows whose cursor is greater than
  ``cursor_after`` are read, and ``Source.cursor_max`` reports the new high-water mark.
- ``s3://bucket/key`` and ``https://...`` read by polars' own object-store support, credentials from the
  standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server.

Every column comes back as ``pl.String`` (zip codes and phones keep their leading zeros) plus ``source_row``
(Int64, from 1). Lines or rows whose every field is empty are not rows. Files are scanned lazily where the
format allows (CSV, NDJSON, Parquet); non-UTF-8 text and SQL results are streamed once into a private spill
file that is scanned the same way, so memory stays bounded. Whatever is wrong with the input is raised as
one :class:`~apollo_sync.errors.InputError` line before anything is sent; passwords never appear in it.

Why ADBC rather than connectorx for SQL: ADBC streams Arrow record batches (``fetch_record_batch``), so a large
table goes to the spill file batch by batch instead of into memory whole; its errors are typed DB-API
exceptions with SQLSTATE, which lets a bad query and an unreachable server get different messages; and the
PostgreSQL driver is libpq, so every libpq URL option (sslmode, ...) works as users expect. The batches are
taken from the DB-API cursor rather than ``pl.read_database`` because PostgreSQL NUMERIC arrives as an Arrow
extension type that polars cannot cast, while its Arrow storage is already the exact decimal text.

Fingerprints: local files hash their bytes (plus the options that change the frame); SQL hashes the URL without
password, the query, the cursor and the rows read; s3/https objects hash their rows in one streaming pass.
"""

from __future__ import annotations

import atexit
import codecs
import csv
import glob as globlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.redact import redact_url
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
SNIFF_BYTES = 64 * 1024
"""Head of a text file used to tell binary from text and to detect the delimiter."""
CHECK_ROWS = 100
"""Rows of a typed or already-read format parsed by read_source to prove it reads (CSV is parsed whole)."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_MAGIC_CHARS = re.compile(r"[*?\[]")


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


def read_source(spec: str, options: SourceOptions = SourceOptions()) -> Source:
    """Open the source named by ``spec``; raise :class:`InputError` (one line) if it cannot be read."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("no source given: pass a file, a glob, a sqlite:///… or postgresql://… URL, or an s3:// URL")
    scheme = _scheme(spec)
    if scheme in SQL_SCHEMES:
        return _read_sql(spec, scheme, options)
    if options.query or options.cursor_column:
        raise InputError("--query and --cursor-column work only with sqlite:/// and postgresql:// sources")
    if scheme in REMOTE_SCHEMES:
        return _read_remote(spec, scheme, options)
    if scheme and scheme != "file":
        raise InputError(f"unsupported source scheme '{scheme}://': use a path, sqlite:///, postgresql://, s3:// or https://")
    if scheme == "file":
        spec = unquote(urlsplit(spec).path)
    return _read_files(spec, options)


# --- Local files ----------------------------------------------------------------------------------------


def _read_files(spec: str, options: SourceOptions) -> Source:
    paths = _expand(spec)
    digest = hashlib.sha256(_options_key(options).encode())
    frames = []
    for path in paths:
        frame, file_sha = _scan_file(path, options)
        frames.append(frame)
        digest.update(f"\0{path.name}\0{file_sha}".encode())
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    if len(paths) == 1:
        description, uri = paths[0].name, paths[0].resolve().as_uri()
    else:
        description = f"{len(paths)} files: {spec}"
        uri = "file://" + os.path.abspath(os.path.expanduser(spec))
    return Source(_numbered(frame), description, digest.hexdigest(), uri, None)


def _expand(spec: str) -> list[Path]:
    """One path, or the sorted files a glob matches; InputError for a missing path or an empty match."""
    expanded = os.path.expanduser(spec)
    if _MAGIC_CHARS.search(expanded):
        matches = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"the pattern {spec} matches no files: check the directory and the pattern")
        return matches
    path = Path(expanded)
    if not path.exists():
        raise InputError(f"{spec} does not exist: check the path")
    if path.is_dir():
        raise InputError(f"{spec} is a directory: name a file, or a glob such as {spec.rstrip('/')}/*.csv")
    return [path]


def _file_format(name: str, options: SourceOptions) -> str:
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


def _scan_file(path: Path, options: SourceOptions) -> tuple[pl.LazyFrame, str]:
    """A lazy, all-text frame for one file (no source_row yet) and the sha256 of its bytes."""
    fmt = _file_format(path.name, options)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes): export the contacts again or pick another file")
    if fmt in TEXT_FORMATS:
        scan_path, sha, head_text = _checked_text(path, head, options.encoding)
    else:
        scan_path, sha, head_text = path, _sha256_file(path), ""
    frame = _scan(scan_path, fmt, head_text, options, str(path))
    _check_parses(frame, path.name, fmt)
    return frame, sha


def _checked_text(path: Path, head: bytes, encoding: str) -> tuple[Path, str, str]:
    """Hash and decode the file in one streaming pass: binary data and wrong encodings fail here.

    UTF-8 (with or without BOM) is scanned in place; any other encoding is transcoded, chunk by chunk, into a
    UTF-8 spill file, since polars reads only UTF-8. Returns (path to scan, sha256 of the original bytes, head text).
    """
    codec = _codec(encoding)
    wide = codec.name.startswith(("utf-16", "utf-32"))
    if not wide and head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path} is UTF-16 text (Excel's 'Unicode Text'): pass --encoding utf-16")
    if not wide and _looks_binary(head):
        raise InputError(f"{path} looks like binary data, not {path.suffix.lstrip('.') or 'text'}: check the path, or pass --format")
    utf8 = codec.name == "utf-8"
    decoder = codecs.getincrementaldecoder("utf-8-sig" if utf8 else codec.name)("strict")
    digest = hashlib.sha256()
    out = None if utf8 else open(_spill_path(".csv"), "w", encoding="utf-8", newline="")
    offset, line = 0, 1
    head_text = ""
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(READ_CHUNK_BYTES):
                digest.update(chunk)
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    at = offset + exc.start
                    line += chunk[: exc.start].count(b"\n")
                    raise InputError(
                        f"{path} is not valid {encoding} (line {line}, byte {at}): "
                        f"pass --encoding latin-1 (or cp1252) if it came from Excel or an older system"
                    ) from None
                if not head_text:
                    head_text = text[:SNIFF_BYTES]
                if out is not None:
                    out.write(text)
                offset += len(chunk)
                line += chunk.count(b"\n")
            tail = decoder.decode(b"", final=True)
            if out is not None:
                out.write(tail)
    except UnicodeDecodeError:
        raise InputError(f"{path} ends in the middle of a {encoding} character: pass --encoding latin-1 if it is not UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    finally:
        if out is not None:
            out.close()
    return (path if out is None else Path(out.name)), digest.hexdigest(), head_text


def _codec(encoding: str) -> codecs.CodecInfo:
    try:
        return codecs.lookup(encoding or "utf-8")
    except LookupError:
        raise InputError(f"unknown --encoding {encoding!r}: use utf-8, utf-8-sig, latin-1 or cp1252") from None


def _looks_binary(head: bytes) -> bool:
    """NUL bytes, or more than 10% control characters other than tab/CR/LF/FF, in the head of the file."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13))
    return controls > len(head) // 10


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _scan(target: str | Path, fmt: str, head_text: str, options: SourceOptions, shown: str,
          storage_options: dict[str, str] | None = None) -> pl.LazyFrame:
    """The polars scan for one file or object, every column turned to text, blank rows dropped."""
    try:
        if fmt in ("csv", "tsv"):
            delimiter = _delimiter(options.delimiter, fmt, head_text, target, storage_options)
            frame = pl.scan_csv(target, separator=delimiter, infer_schema=False, quote_char='"',
                                raise_if_empty=False, storage_options=storage_options, glob=False)
        elif fmt == "ndjson":
            frame = _as_text(pl.scan_ndjson(target, infer_schema_length=None, storage_options=storage_options))
        elif fmt == "parquet":
            frame = _as_text(pl.scan_parquet(target, storage_options=storage_options, glob=False))
        elif fmt == "json":
            if head_text and not head_text.lstrip().startswith("["):
                raise InputError(f"{shown} is not a JSON array of objects: pass --format ndjson if it has one object per line")
            frame = _as_text(pl.read_json(target, infer_schema_length=None).lazy())
        else:  # xlsx: the first sheet, every cell as text
            frame = pl.read_excel(target, sheet_id=1, infer_schema_length=0, drop_empty_cols=False,
                                  raise_if_empty=False).lazy()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - polars/fastexcel raise many types; all mean "cannot read"
        raise InputError(f"cannot read {shown} as {fmt}: {_first_line(exc)}; check the file or pass --format") from None
    return frame.filter(~pl.all_horizontal(pl.all().is_null()))


def _as_text(frame: pl.LazyFrame) -> pl.LazyFrame:
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


def _delimiter(given: str | None, fmt: str, head_text: str, target, storage_options) -> str:
    """The given delimiter (``\\t`` or ``tab`` for a tab), tab for TSV, else the one detected in the head."""
    if given:
        value = {"\\t": "\t", "tab": "\t", "tsv": "\t"}.get(given.lower(), given)
        if len(value) != 1:
            raise InputError(f"--delimiter must be one character, got {given!r}")
        return value
    if fmt == "tsv":
        return "\t"
    if storage_options is not None:
        return _delimiter_from_header(target, storage_options)
    return detect_delimiter(head_text)


def detect_delimiter(text: str) -> str:
    """Pick , ; tab or | from the head of a CSV: the one that splits the header widest and rows consistently.

    Each candidate parses the head with the csv module (quotes respected); score = (rows whose field count
    equals the header's, header field count). A file with one column comes back as ','.
    """
    lines = text.splitlines(keepends=True)
    if len(lines) > 1 and not text.endswith(("\n", "\r")):
        lines = lines[:-1]  # the head may cut the last record short
    sample = "".join(lines)
    best, best_score = ",", (0, 1)
    for candidate in DELIMITERS:
        try:
            rows = [r for r in csv.reader(io.StringIO(sample), delimiter=candidate) if r]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        score = (sum(len(r) == width for r in rows), width)
        if score > best_score:
            best, best_score = candidate, score
    return best


def _delimiter_from_header(target: str, storage_options: dict[str, str]) -> str:
    """For a remote CSV (no cheap byte access): the candidate that splits the header into most columns."""
    best, width = ",", 1
    for candidate in DELIMITERS:
        n = len(pl.scan_csv(target, separator=candidate, n_rows=0, infer_schema=False,
                            storage_options=storage_options, glob=False).collect_schema())
        if n > width:
            best, width = candidate, n
    return best


def _check_parses(frame: pl.LazyFrame, name: str, fmt: str) -> None:
    """Parse the file now so a malformed one fails in read_source, as one line, not later in the transform.

    CSV/TSV are parsed whole by the streaming engine (a ragged row can be anywhere; about 1.4 s and little memory
    for 10M rows); the other formats were already read whole (JSON, xlsx), are typed (Parquet) or had their
    schema inferred over every line (NDJSON), so their first rows are enough.
    """
    try:
        if fmt in ("csv", "tsv"):
            frame.select(pl.all().null_count()).collect(engine="streaming")
        else:
            frame.head(CHECK_ROWS).collect()
    except Exception as exc:  # noqa: BLE001
        reason = _first_line(exc)
        if "more fields" in reason:
            reason = "a row has more fields than the header (check quoting, or pass --delimiter)"
        raise InputError(f"cannot read {name} as {fmt}: {reason}; fix the file or pass --format/--delimiter") from None


def _numbered(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``source_row`` (Int64, 1-based) as the first column."""
    return frame.with_row_index(SOURCE_ROW, offset=1).with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))


def _options_key(options: SourceOptions) -> str:
    """The options that change the frame, as text for the fingerprint."""
    return json.dumps([options.format, options.delimiter, (options.encoding or "utf-8").lower()])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip().rstrip(".:")


# --- Remote objects: s3:// and https:// -----------------------------------------------------------------


def _read_remote(spec: str, scheme: str, options: SourceOptions) -> Source:
    parts = urlsplit(spec)
    name = Path(parts.path).name or parts.netloc
    fmt = _file_format(name, options)
    if fmt in ("json", "xlsx"):
        raise InputError(f"{fmt} is read from local files only: download {name} first, or use CSV, NDJSON or Parquet")
    if _codec(options.encoding).name != "utf-8":
        raise InputError(f"--encoding {options.encoding} works only for local files: download {name} first")
    storage_options = _storage_options(scheme)
    frame = _numbered(_scan(spec, fmt, "", options, spec if scheme == "s3" else redact_url(spec), storage_options))
    shown = f"s3://{parts.netloc}{parts.path}" if scheme == "s3" else redact_url(spec)
    fingerprint = _frame_fingerprint(frame, shown, options)
    return Source(frame, name, fingerprint, shown, None)


def _storage_options(scheme: str) -> dict[str, str]:
    """polars/object_store options from the standard AWS variables (read at call time, never stored)."""
    if scheme != "s3":
        return {}
    names = {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "AWS_SESSION_TOKEN": "aws_session_token",
        "AWS_DEFAULT_REGION": "aws_region",
        "AWS_REGION": "aws_region",
        "AWS_ENDPOINT_URL_S3": "aws_endpoint_url",
        "AWS_ENDPOINT_URL": "aws_endpoint_url",
    }
    options: dict[str, str] = {}
    for env, key in names.items():
        if os.environ.get(env) and key not in options:
            options[key] = os.environ[env]
    if options.get("aws_endpoint_url", "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return options


def _frame_fingerprint(frame: pl.LazyFrame, shown: str, options: SourceOptions) -> str:
    """A content fingerprint for a remote object: one streaming pass hashing every row (order-sensitive).

    It reads the object once more, but it is what a content fingerprint costs without a byte-level client, and
    the pass also proves the whole object parses, so a bad object fails here rather than mid-load.
    """
    try:
        stats = frame.select(
            pl.len().alias("rows"),
            pl.struct(pl.all()).hash(seed=0).sum().alias("hash"),
        ).collect(engine="streaming")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read {shown}: {_first_line(exc)}; check the URL, the credentials (AWS_*) and --format") from None
    columns = ",".join(frame.collect_schema().names())
    key = f"{shown}\0{_options_key(options)}\0{columns}\0{stats['rows'][0]}\0{stats['hash'][0]}"
    return hashlib.sha256(key.encode()).hexdigest()


# --- SQL: sqlite:/// and postgresql:// -------------------------------------------------------------------


def _read_sql(spec: str, scheme: str, options: SourceOptions) -> Source:
    shown = redact_url(spec)
    query = (options.query or "").strip().rstrip(";").strip()
    if not query:
        raise InputError(f"{shown} needs --query: a SELECT statement or a table name")
    table = query if _IDENTIFIER.match(query) else None
    if table:
        query = "SELECT * FROM " + ".".join(_quote_identifier(p) for p in table.split("."))
    if options.cursor_column:
        query = f"SELECT * FROM ({query}) AS apollo_sync_source"
        if options.cursor_after is not None:
            query += f" WHERE {_quote_identifier(options.cursor_column)} > {_quote_literal(options.cursor_after)}"
    kind = "sqlite" if scheme == "sqlite" else "postgresql"
    what = f"table {table}" if table else "query"
    if kind == "sqlite":
        path = _sqlite_path(spec)
        uri = "sqlite://" + str(path.resolve())
        description = f"sqlite {what}: {path.name}"
    else:
        uri = _postgres_uri(spec)
        description = f"postgresql {what}"
    spill, cursor_max = _spill_query(spec, kind, query, options, shown)
    # URL (no password) + query + cursor, as planned, plus the rows themselves (the spill file is written
    # deterministically): a table that changed under the same query must not hit a cached transform.
    key = "\0".join([shown, query, options.cursor_column or "", options.cursor_after or "", _sha256_file(spill)])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    if options.cursor_column and cursor_max is None:
        cursor_max = options.cursor_after
    frame = _numbered(pl.scan_parquet(spill).filter(~pl.all_horizontal(pl.all().is_null())))
    return Source(frame, description, fingerprint, uri, cursor_max)


def _sqlite_path(spec: str) -> Path:
    """sqlite:////abs.db and sqlite:///abs.db name /abs.db; sqlite:///rel.db names rel.db if /rel.db is absent."""
    raw = unquote(spec.split("://", 1)[1].split("?", 1)[0])
    path = Path(raw[1:] if raw.startswith("//") else raw).expanduser()
    if not path.exists() and raw.startswith("/") and Path(raw[1:]).exists():
        path = Path(raw[1:])
    if not path.is_file():
        raise InputError(f"SQLite database {path} does not exist: check the path (sqlite:///relative.db or sqlite:////abs/path.db)")
    if path.stat().st_size == 0:
        raise InputError(f"SQLite database {path} is empty (0 bytes): check the path")
    return path


def _connect(spec: str, kind: str):
    if kind == "sqlite":
        import adbc_driver_sqlite.dbapi as driver

        path = _sqlite_path(spec)
        return driver.connect(f"file:{path.resolve()}?mode=ro")
    import adbc_driver_postgresql.dbapi as driver

    url = "postgresql://" + spec.split("://", 1)[1]
    return driver.connect(url, autocommit=True)


def _spill_query(spec: str, kind: str, query: str, options: SourceOptions, shown: str) -> tuple[Path, str | None]:
    """Run the query and stream its batches, as text, into a Parquet spill file; return it and the cursor max."""
    import adbc_driver_manager
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    password = urlsplit(spec).password
    try:
        conn = _connect(spec, kind)
    except adbc_driver_manager.Error as exc:
        reason = _scrub(_adbc_message(exc), password)
        raise InputError(f"cannot connect to {shown}: {reason}; check the host, port, database, user and password") from None
    path = _spill_path(".parquet")
    maxima = []
    try:
        cursor = conn.cursor()
        cursor.execute(query)
        reader = cursor.fetch_record_batch()
        names = reader.schema.names
        if options.cursor_column and options.cursor_column not in names:
            raise InputError(f"--cursor-column {options.cursor_column} is not a column of the query result: pick one of {', '.join(names)}")
        schema = pa.schema([(n, pa.string()) for n in names])
        with pq.ParquetWriter(path, schema) as writer:
            for batch in reader:
                if options.cursor_column and batch.num_rows:
                    native = _unwrap(batch.column(names.index(options.cursor_column)))
                    top = pc.max(native)
                    if top.is_valid:
                        maxima.append(top)
                writer.write_batch(pa.record_batch([_text_array(batch.column(i)) for i in range(len(names))], schema=schema))
    except InputError:
        raise
    except adbc_driver_manager.Error as exc:
        reason = _scrub(_adbc_message(exc), password)
        raise InputError(f"the query failed on {shown}: {reason}; check --query") from None
    finally:
        conn.close()
    cursor_max = None
    if maxima:
        top = max(maxima, key=lambda s: s.as_py())
        cursor_max = _text_array(pa.array([top.as_py()], type=top.type))[0].as_py()
    return path, cursor_max


def _unwrap(array):
    """Extension arrays (ADBC returns PostgreSQL NUMERIC and unknown types that way) as their storage."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.storage if isinstance(array.type, pa.ExtensionType) else array


def _text_array(array):
    """One Arrow column as strings: plain types by cast, nested ones as JSON text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = _unwrap(array)
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_large_string(array.type) or pa.types.is_string_view(array.type):
        return pc.cast(array, pa.string())
    if pa.types.is_nested(array.type) or pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        values = [None if v is None else (v.hex() if isinstance(v, bytes) else json.dumps(v, default=str)) for v in array.to_pylist()]
        return pa.array(values, type=pa.string())
    return pc.cast(array, pa.string())


def _adbc_message(exc: BaseException) -> str:
    """The driver's message without the ADBC status prefix and the echoed query."""
    text = _first_line(exc)
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^(\[libpq\] )?(Failed to (prepare|execute) query: )?(ERROR:\s+)?", "", text)
    return text.strip() or type(exc).__name__


def _scrub(text: str, password: str | None) -> str:
    if password:
        text = text.replace(password, "***").replace(unquote(password), "***")
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    """A SQL string literal. Both databases coerce it to the column's type (integer, timestamp, text)."""
    if "\0" in value:
        raise InputError("the cursor value contains a NUL character: reset the mark in the state dir")
    return "'" + value.replace("'", "''") + "'"


def _postgres_uri(spec: str) -> str:
    parts = urlsplit(spec)
    host = parts.hostname or "localhost"
    if parts.port:
        host += f":{parts.port}"
    return f"postgresql://{host}{parts.path}"


def _scheme(spec: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return match.group(1).lower() if match else ""


# --- Spill files ---------------------------------------------------------------------------------------

_spill_dir: str | None = None


def discard_spill_files() -> int:
    """Delete this process's spill files (transcoded text, SQL results); return how many were removed.

    Call it when the frames of a run are no longer needed (a long-lived worker serving many runs); frames
    read from them fail afterwards. Spill files are removed at process exit in any case.
    """
    if _spill_dir is None or not os.path.isdir(_spill_dir):
        return 0
    removed = 0
    for entry in os.scandir(_spill_dir):
        os.unlink(entry.path)
        removed += 1
    return removed


def _spill_path(suffix: str) -> Path:
    """A new file in this process's private spill directory (removed when the process exits)."""
    global _spill_dir
    if _spill_dir is None:
        _spill_dir = tempfile.mkdtemp(prefix="apollo-sync-spill-")
        atexit.register(shutil.rmtree, _spill_dir, True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=_spill_dir)
    os.close(fd)
    return Path(name)

