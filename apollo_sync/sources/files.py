"""Local files and globs: expand the spec, check the bytes are the text they claim to be, detect the delimiter.

A glob's files are read in sorted order, their columns unioned by name, and ``source_row`` keeps counting across
files. Text files are hashed and decoded in one streaming pass (binary data and wrong encodings fail there);
non-UTF-8 text is transcoded into a UTF-8 spill file, since polars reads only UTF-8. Every file is parsed once in
:func:`read_files`, so a malformed one fails before anything is sent, as one line. The fingerprint hashes the
files' bytes plus the options that change the frame.

An ``.xlsx`` is opened once: its bytes are read into memory, hashed and parsed from there (a workbook is a zip that
is read whole in any case). A JSON array is parsed whole by polars, so one larger than
``settings.JSON_ARRAY_MAX_BYTES`` is refused, with the advice to convert it to NDJSON, which is scanned in a stream.
"""

from __future__ import annotations

import codecs
import csv
import glob as globlib
import hashlib
import io
import os
import re
import shlex
from pathlib import Path

import polars as pl

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.sources.base import (
    DELIMITERS,
    READ_CHUNK_BYTES,
    TEXT_FORMATS,
    Source,
    SourceOptions,
    codec,
    file_format,
    first_line,
    given_delimiter,
    numbered,
    options_key,
    scan,
    sha256_file,
)
from apollo_sync.sources.spill import spill_path

SNIFF_BYTES = 64 * 1024
"""Head of a text file used to tell binary from text and to detect the delimiter."""
CHECK_ROWS = 100
"""Rows of a typed or already-read format parsed by read_source to prove it reads (CSV is parsed whole)."""

_MAGIC_CHARS = re.compile(r"[*?\[]")


def read_files(spec: str, options: SourceOptions) -> Source:
    """The file or glob ``spec`` as one Source (a plain path, ``file://`` already removed)."""
    paths = expand_files(spec)
    digest = hashlib.sha256(options_key(options).encode())
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
    return Source(numbered(frame), description, digest.hexdigest(), uri, None)


def has_glob(spec: str) -> bool:
    """Whether ``spec`` is a glob pattern (has ``*``, ``?`` or ``[``) rather than one path."""
    return _MAGIC_CHARS.search(spec) is not None


def expand_files(spec: str) -> list[Path]:
    """One path, or the sorted files a glob matches; InputError for a missing path or an empty match."""
    expanded = os.path.expanduser(spec)
    if has_glob(expanded):
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


def _scan_file(path: Path, options: SourceOptions) -> tuple[pl.LazyFrame, str]:
    """A lazy, all-text frame for one file (no source_row yet) and the sha256 of its bytes."""
    fmt = file_format(path.name, options)
    if fmt == "xlsx":
        return _scan_workbook(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if size == 0:
        raise InputError(_empty(path))
    if fmt in TEXT_FORMATS:
        scan_path, sha, head_text = _checked_text(path, head, options.encoding)
    else:
        scan_path, sha, head_text = path, sha256_file(path), ""
    if fmt == "json" and size > settings.JSON_ARRAY_MAX_BYTES and head_text.lstrip().startswith("["):
        limit = _megabytes(settings.JSON_ARRAY_MAX_BYTES)
        raise InputError(
            f"{path} is a JSON array of {_megabytes(size)}, and arrays over {limit} are not read (they are parsed "
            f"whole, in memory): convert it to NDJSON, one object per line, which is streamed "
            f"(jq -c '.[]' {shlex.quote(path.name)} > {shlex.quote(path.stem + '.ndjson')})"
        )
    delimiter = ","
    if fmt in ("csv", "tsv"):
        delimiter = given_delimiter(options.delimiter, fmt) or detect_delimiter(head_text)
    frame = scan(scan_path, fmt, str(path), delimiter=delimiter, head_text=head_text)
    _check_parses(frame, path.name, fmt)
    return frame, sha


def _scan_workbook(path: Path) -> tuple[pl.LazyFrame, str]:
    """The first sheet of an .xlsx and the sha256 of its bytes, from one read of the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if not data:
        raise InputError(_empty(path))
    frame = scan(data, "xlsx", str(path))
    _check_parses(frame, path.name, "xlsx")
    return frame, hashlib.sha256(data).hexdigest()


def _empty(path: Path) -> str:
    return f"{path} is empty (0 bytes): export the contacts again or pick another file"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 1_000_000 else f"{size:,} bytes"


def _checked_text(path: Path, head: bytes, encoding: str) -> tuple[Path, str, str]:
    """Hash and decode the file in one streaming pass: binary data and wrong encodings fail here.

    UTF-8 (with or without BOM) is scanned in place; any other encoding is transcoded, chunk by chunk, into a
    UTF-8 spill file, since polars reads only UTF-8. Returns (path to scan, sha256 of the original bytes, head text).
    """
    info = codec(encoding)
    wide = info.name.startswith(("utf-16", "utf-32"))
    if not wide and head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path} is UTF-16 text (Excel's 'Unicode Text'): pass --encoding utf-16")
    if not wide and _looks_binary(head):
        raise InputError(f"{path} looks like binary data, not {path.suffix.lstrip('.') or 'text'}: check the path, or pass --format")
    utf8 = info.name == "utf-8"
    decoder = codecs.getincrementaldecoder("utf-8-sig" if utf8 else info.name)("strict")
    digest = hashlib.sha256()
    out = None if utf8 else open(spill_path(".csv"), "w", encoding="utf-8", newline="")
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


def _looks_binary(head: bytes) -> bool:
    """NUL bytes, or more than 10% control characters other than tab/CR/LF/FF, in the head of the file."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13))
    return controls > len(head) // 10


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
        reason = first_line(exc)
        if "more fields" in reason:
            reason = "a row has more fields than the header (check quoting, or pass --delimiter)"
        raise InputError(f"cannot read {name} as {fmt}: {reason}; fix the file or pass --format/--delimiter") from None
