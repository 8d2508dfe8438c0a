"""Remote objects, ``s3://bucket/key`` and ``https://...``, read by polars' own object-store support.

Credentials come from the standard ``AWS_*`` variables (read at call time, never stored), ``AWS_ENDPOINT_URL`` for
an S3-compatible server. Only the streaming formats (CSV, NDJSON, Parquet) in UTF-8 are read remotely. With no
cheap byte access the delimiter comes from the header alone, and the fingerprint hashes the rows in one
streaming pass, which also proves the whole object parses.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.redact import redact_url
from apollo_sync.sources.base import (
    DELIMITERS,
    Source,
    SourceOptions,
    codec,
    file_format,
    first_line,
    given_delimiter,
    numbered,
    options_key,
    scan,
)

_AWS_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_DEFAULT_REGION": "aws_region",
    "AWS_REGION": "aws_region",
    "AWS_ENDPOINT_URL_S3": "aws_endpoint_url",
    "AWS_ENDPOINT_URL": "aws_endpoint_url",
}
"""Environment variable -> polars/object_store option; the first one set wins for a shared option."""


def read_remote(spec: str, scheme: str, options: SourceOptions) -> Source:
    """The object at ``spec`` (scheme ``s3``, ``https`` or ``http``) as a Source."""
    parts = urlsplit(spec)
    name = Path(parts.path).name or parts.netloc
    fmt = file_format(name, options)
    if fmt in ("json", "xlsx"):
        raise InputError(f"{fmt} is read from local files only: download {name} first, or use CSV, NDJSON or Parquet")
    if codec(options.encoding).name != "utf-8":
        raise InputError(f"--encoding {options.encoding} works only for local files: download {name} first")
    storage_options = _storage_options(scheme)
    named = spec if scheme == "s3" else redact_url(spec)
    delimiter = _delimiter(spec, fmt, options, named, storage_options)
    frame = numbered(scan(spec, fmt, named, delimiter=delimiter, storage_options=storage_options))
    shown = f"s3://{parts.netloc}{parts.path}" if scheme == "s3" else redact_url(spec)
    fingerprint = _frame_fingerprint(frame, shown, options)
    return Source(frame, name, fingerprint, shown, None)


def _storage_options(scheme: str) -> dict[str, str]:
    """polars/object_store options from the standard AWS variables (read at call time, never stored)."""
    if scheme != "s3":
        return {}
    options: dict[str, str] = {}
    for env, key in _AWS_VARIABLES.items():
        if os.environ.get(env) and key not in options:
            options[key] = os.environ[env]
    if options.get("aws_endpoint_url", "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return options


def _delimiter(spec: str, fmt: str, options: SourceOptions, shown: str, storage_options: dict[str, str]) -> str:
    """The given delimiter, tab for TSV, else the one that splits the object's header into most columns."""
    if fmt not in ("csv", "tsv"):
        return ","
    given = given_delimiter(options.delimiter, fmt)
    if given is not None:
        return given
    try:
        return _delimiter_from_header(spec, storage_options)
    except Exception as exc:  # noqa: BLE001 - as scan(): every object-store failure means "cannot read"
        raise InputError(f"cannot read {shown} as {fmt}: {first_line(exc)}; check the file or pass --format") from None


def _delimiter_from_header(target: str, storage_options: dict[str, str]) -> str:
    """For a remote CSV (no cheap byte access): the candidate that splits the header into most columns."""
    best, width = ",", 1
    for candidate in DELIMITERS:
        n = len(pl.scan_csv(target, separator=candidate, n_rows=0, infer_schema=False,
                            storage_options=storage_options, glob=False).collect_schema())
        if n > width:
            best, width = candidate, n
    return best


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
        raise InputError(f"cannot read {shown}: {first_line(exc)}; check the URL, the credentials (AWS_*) and --format") from None
    columns = ",".join(frame.collect_schema().names())
    key = f"{shown}\0{options_key(options)}\0{columns}\0{stats['rows'][0]}\0{stats['hash'][0]}"
    return hashlib.sha256(key.encode()).hexdigest()
