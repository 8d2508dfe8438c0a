"""SQL sources, ``sqlite:///path.db`` and ``postgresql://user:pw@host:port/db``, read through ADBC.

``SourceOptions.query`` is a SELECT or a bare table name. With ``cursor_column`` only rows whose cursor is greater
than ``cursor_after`` are read, and ``Source.cursor_max`` reports the new high-water mark. The result is streamed
once, as text, into a Parquet spill file that is scanned like any other source, so memory stays bounded.

Why ADBC rather than connectorx: ADBC streams Arrow record batches (``fetch_record_batch``), so a large table goes
to the spill file batch by batch instead of into memory whole; its errors are typed DB-API exceptions with
SQLSTATE, which lets a bad query and an unreachable server get different messages; and the PostgreSQL driver is
libpq, so every libpq URL option (sslmode, ...) works as users expect. The batches are taken from the DB-API
cursor rather than ``pl.read_database`` because PostgreSQL NUMERIC arrives as an Arrow extension type that polars
cannot cast, while its Arrow storage is already the exact decimal text.

The fingerprint hashes the URL without password, the query, the cursor and the rows read. Passwords never appear
in an error: driver messages go through :func:`scrub`. The connection, quoting and message helpers are public
for ``apollo_sync.partitions``, which splits a SQL source by key ranges over the same connection.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import polars as pl

from apollo_sync.errors import InputError
from apollo_sync.redact import redact_url
from apollo_sync.sources.base import Source, SourceOptions, first_line, numbered, scheme_of, sha256_file
from apollo_sync.sources.spill import spill_path

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def read_sql(spec: str, options: SourceOptions) -> Source:
    """The rows of ``options.query`` (a SELECT or a table name) on the database at ``spec``, as a Source."""
    shown = redact_url(spec)
    query = (options.query or "").strip().rstrip(";").strip()
    if not query:
        raise InputError(f"{shown} needs --query: a SELECT statement or a table name")
    table = query if is_identifier(query) else None
    if table:
        query = table_query(table)
    if options.cursor_column:
        query = f"SELECT * FROM ({query}) AS apollo_sync_source"
        if options.cursor_after is not None:
            query += f" WHERE {quote_identifier(options.cursor_column)} > {quote_literal(options.cursor_after)}"
    what = f"table {table}" if table else "query"
    if _kind(spec) == "sqlite":
        path = _sqlite_path(spec)
        uri = "sqlite://" + str(path.resolve())
        description = f"sqlite {what}: {path.name}"
    else:
        uri = _postgres_uri(spec)
        description = f"postgresql {what}"
    spill, cursor_max = _spill_query(spec, query, options, shown)
    # URL (no password) + query + cursor, as planned, plus the rows themselves (the spill file is written
    # deterministically): a table that changed under the same query must not hit a cached transform.
    key = "\0".join([shown, query, options.cursor_column or "", options.cursor_after or "", sha256_file(spill)])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    if options.cursor_column and cursor_max is None:
        cursor_max = options.cursor_after
    frame = numbered(pl.scan_parquet(spill).filter(~pl.all_horizontal(pl.all().is_null())))
    return Source(frame, description, fingerprint, uri, cursor_max)


def connect(spec: str):
    """An ADBC DB-API connection to ``spec``: SQLite read-only, PostgreSQL in autocommit.

    Raises ``adbc_driver_manager.Error`` when the server refuses (pass it through :func:`driver_message` and
    :func:`scrub` before showing it), InputError for a SQLite file that does not exist.
    """
    if _kind(spec) == "sqlite":
        import adbc_driver_sqlite.dbapi as driver

        path = _sqlite_path(spec)
        return driver.connect(f"file:{path.resolve()}?mode=ro")
    import adbc_driver_postgresql.dbapi as driver

    url = "postgresql://" + spec.split("://", 1)[1]
    return driver.connect(url, autocommit=True)


def is_identifier(query: str) -> bool:
    """Whether ``query`` is a bare table name (``contacts`` or ``schema.contacts``) rather than a SELECT."""
    return _IDENTIFIER.match(query) is not None


def table_query(table: str) -> str:
    """``SELECT * FROM`` the table named ``table`` (``name`` or ``schema.name``), each part quoted."""
    return "SELECT * FROM " + ".".join(quote_identifier(p) for p in table.split("."))


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal. Both databases coerce it to the column's type (integer, timestamp, text)."""
    if "\0" in value:
        raise InputError("the cursor value contains a NUL character: reset the mark in the state dir")
    return "'" + value.replace("'", "''") + "'"


def driver_message(exc: BaseException) -> str:
    """The driver's message without the ADBC status prefix and the echoed query."""
    text = first_line(exc)
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^(\[libpq\] )?(Failed to (prepare|execute) query: )?(ERROR:\s+)?", "", text)
    return text.strip() or type(exc).__name__


def scrub(text: str, password: str | None) -> str:
    """``text`` with ``password`` (raw or URL-decoded) and any ``user:password@`` in a URL replaced by ``***``."""
    if password:
        text = text.replace(password, "***").replace(unquote(password), "***")
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _kind(spec: str) -> str:
    return "sqlite" if scheme_of(spec) == "sqlite" else "postgresql"


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


def _postgres_uri(spec: str) -> str:
    parts = urlsplit(spec)
    host = parts.hostname or "localhost"
    if parts.port:
        host += f":{parts.port}"
    return f"postgresql://{host}{parts.path}"


def _spill_query(spec: str, query: str, options: SourceOptions, shown: str) -> tuple[Path, str | None]:
    """Run the query and stream its batches, as text, into a Parquet spill file; return it and the cursor max."""
    import adbc_driver_manager
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    password = urlsplit(spec).password
    try:
        conn = connect(spec)
    except adbc_driver_manager.Error as exc:
        reason = scrub(driver_message(exc), password)
        raise InputError(f"cannot connect to {shown}: {reason}; check the host, port, database, user and password") from None
    path = spill_path(".parquet")
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
        reason = scrub(driver_message(exc), password)
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
