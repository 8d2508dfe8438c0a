"""Read a contact source into a polars LazyFrame of text columns, numbered by ``source_row``.

A source is named by one string (the CLI's ``SOURCE``):

- a local path or glob: ``contacts.csv``, ``exports/*.csv``; format from the extension (``.csv``, ``.tsv``,
  ``.parquet``, ``.json`` = array of objects, ``.ndjson``/``.jsonl``, ``.xlsx`` = first sheet) or
  ``SourceOptions.format``. A glob's files are read in sorted order, their columns unioned by name, and
  ``source_row`` keeps counting across files (:mod:`.files`). An .xlsx is opened once; a JSON array over
  ``settings.JSON_ARRAY_MAX_BYTES`` is refused (it is parsed whole): NDJSON of any size is streamed.
- ``sqlite:///path.db`` or ``postgresql://user:pw@host:port/db`` with ``SourceOptions.query`` (a SELECT or a bare
  table name), read through ADBC, read-only: a query that would write is refused, by apollo-sync and by the
  database. The SQLite path is taken as given (``#``, ``?``, ``%`` and spaces included). With ``cursor_column``
  only rows whose cursor is greater than ``cursor_after`` (bound as a parameter, never spliced into the SQL) are
  read, and ``Source.cursor_max`` reports the new high-water mark (:mod:`.sql`).
- ``s3://bucket/key`` and ``https://...`` read by polars' own object-store support, credentials from the
  standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server (:mod:`.remote`).

Every column comes back as ``pl.String`` (zip codes and phones keep their leading zeros) plus ``source_row``
(Int64, from 1). Lines or rows whose every field is empty are not rows. Files are scanned lazily where the
format allows (CSV, NDJSON, Parquet); non-UTF-8 text and SQL results are streamed once into a private spill
file (:mod:`.spill`) that is scanned the same way, so memory stays bounded. Whatever is wrong with the input is
raised as one :class:`~apollo_sync.errors.InputError` line before anything is sent; passwords never appear in it.

Fingerprints: local files hash their bytes (plus the options that change the frame); SQL hashes the URL without
password, the query, the cursor and the rows read; s3/https objects hash their rows in one streaming pass.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from apollo_sync.errors import InputError
from apollo_sync.sources.base import FORMATS, REMOTE_SCHEMES, SQL_SCHEMES, Source, SourceOptions, scheme_of
from apollo_sync.sources.files import detect_delimiter, expand_files, has_glob, read_files
from apollo_sync.sources.remote import read_remote
from apollo_sync.sources.spill import discard_spill_files
from apollo_sync.sources.sql import read_sql

__all__ = [
    "FORMATS",
    "REMOTE_SCHEMES",
    "SQL_SCHEMES",
    "Source",
    "SourceOptions",
    "detect_delimiter",
    "discard_spill_files",
    "expand_files",
    "has_glob",
    "read_source",
    "scheme_of",
]


def read_source(spec: str, options: SourceOptions = SourceOptions()) -> Source:
    """Open the source named by ``spec``; raise :class:`InputError` (one line) if it cannot be read."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("no source given: pass a file, a glob, a sqlite:///… or postgresql://… URL, or an s3:// URL")
    scheme = scheme_of(spec)
    if scheme in SQL_SCHEMES:
        return read_sql(spec, options)
    if options.query or options.cursor_column:
        raise InputError("--query and --cursor-column work only with sqlite:/// and postgresql:// sources")
    if scheme in REMOTE_SCHEMES:
        return read_remote(spec, scheme, options)
    if scheme and scheme != "file":
        raise InputError(f"unsupported source scheme '{scheme}://': use a path, sqlite:///, postgresql://, s3:// or https://")
    if scheme == "file":
        spec = unquote(urlsplit(spec).path)
    return read_files(spec, options)
