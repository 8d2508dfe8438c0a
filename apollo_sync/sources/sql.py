"""SQL sources, ``sqlite:///path.db`` and ``postgresql://user:pw@host:port/db``, read through ADBC.

``SourceOptions.query`` is a SELECT or a bare table name. With ``cursor_column`` only rows whose cursor is greater
than ``cursor_after`` are read, and ``Source.cursor_max`` reports the new high-water mark. The result is streamed
once, as text, into a Parquet spill file that is scanned like any other source, so memory stays bounded.

Sources only read. A query that does not start with SELECT, WITH, VALUES or TABLE is refused before it is sent,
and the database itself refuses any write the query hides (a data-modifying CTE, a function with side effects):
SQLite is opened ``mode=ro``; on PostgreSQL every transaction of the session is read-only and none is committed.
Either way the read stops with one InputError line and nothing in the database has changed.

The SQLite path is the rest of the URL as given: ``sqlite:////data/a#b?c%d e.db`` names the file ``a#b?c%d e.db``
(only when no file has that name is the path percent-decoded, for URLs written as ``my%20file.db``). It reaches
SQLite as a ``file:`` URI with the path percent-encoded, so no ``#`` or ``?`` in a name can cut off ``mode=ro``
or make SQLite open (and create) another file.

The cursor value is a parameter, never SQL text. SQLite binds it (``WHERE c > ?``), compared under the column's
affinity as a literal would be. PostgreSQL streams results only for statements without parameters (COPY); bound
parameters make libpq hold the whole result in memory (2M rows: 1 GB peak against 0.2 GB streamed). So the value
is bound once into a transaction-local setting, ``set_config('apollo_sync.cursor_after', $1, true)``, and the
query compares ``c > CAST(current_setting('apollo_sync.cursor_after') AS <c's type>)``, the type asked of the
server (``pg_typeof``), since a text parameter compares with no integer or timestamp.

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
_LEADING = re.compile(r"\s+|--[^\n]*|/\*.*?\*/|\(", re.S)
"""What may come before a statement's first keyword: blanks, comments, opening parentheses."""
_KEYWORD = re.compile(r"[A-Za-z]+")
READ_KEYWORDS = ("SELECT", "WITH", "VALUES", "TABLE")
"""The first keywords of a query that reads; any other (INSERT, DELETE, CREATE, ATTACH, PRAGMA...) is refused."""
_WRITE_REFUSED = ("in a read-only transaction", "attempt to write a readonly database")
"""How a refused write reads when it comes without a SQLSTATE (mid-stream, as an Arrow error)."""
CURSOR_SETTING = "apollo_sync.cursor_after"
"""The transaction-local PostgreSQL setting the cursor value is bound into (see the module docstring)."""


def read_sql(spec: str, options: SourceOptions) -> Source:
    """The rows of ``options.query`` (a SELECT or a table name) on the database at ``spec``, as a Source."""
    shown = redact_url(spec)
    query = (options.query or "").strip().rstrip(";").strip()
    if not query:
        raise InputError(f"{shown} needs --query: a SELECT statement or a table name")
    table = query if is_identifier(query) else None
    if table:
        query = table_query(table)
    else:
        check_reads(query)
    what = f"table {table}" if table else "query"
    if _kind(spec) == "sqlite":
        path = _sqlite_path(spec)
        uri = "sqlite://" + str(path.resolve())
        description = f"sqlite {what}: {path.name}"
    else:
        uri = _postgres_uri(spec)
        description = f"postgresql {what}"
    spill, cursor_max = _spill_query(spec, query, options, shown)
    # URL (no password) + query + cursor, as asked, plus the rows themselves (the spill file is written
    # deterministically): a table that changed under the same query must not hit a cached transform.
    key = "\0".join([shown, query, options.cursor_column or "", options.cursor_after or "", sha256_file(spill)])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    if options.cursor_column and cursor_max is None:
        cursor_max = options.cursor_after
    frame = numbered(pl.scan_parquet(spill).filter(~pl.all_horizontal(pl.all().is_null())))
    return Source(frame, description, fingerprint, uri, cursor_max)


def connect(spec: str):
    """An ADBC DB-API connection to ``spec`` that can only read.

    SQLite: the file opened ``mode=ro`` through a ``file:`` URI whose path is percent-encoded. PostgreSQL: every
    transaction of the session read-only, and not in autocommit: what runs on it is never committed, and closing
    the connection ends it. Raises ``adbc_driver_manager.Error`` when the server refuses (pass it through
    :func:`driver_message` and :func:`scrub` before showing it), InputError for a SQLite file that does not exist.
    """
    if _kind(spec) == "sqlite":
        import adbc_driver_sqlite.dbapi as driver

        return driver.connect(_sqlite_path(spec).resolve().as_uri() + "?mode=ro")
    import adbc_driver_postgresql.dbapi as driver

    url = "postgresql://" + spec.split("://", 1)[1]
    conn = driver.connect(url, autocommit=False)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        conn.commit()  # the setting holds once committed; the transaction begun next is read-only already
    except BaseException:
        conn.close()
        raise
    return conn


def check_reads(query: str) -> None:
    """Refuse, as one InputError line, a query whose first keyword is not one of :data:`READ_KEYWORDS`."""
    pos = 0
    while (match := _LEADING.match(query, pos)) is not None:
        pos = match.end()
    keyword = _KEYWORD.match(query, pos)
    word = keyword.group(0).upper() if keyword else ""
    if word not in READ_KEYWORDS:
        what = f"starts with {word}" if word else "does not start with SELECT"
        raise InputError(f"--query must only read, but it {what}: give a SELECT or a table name "
                         "(SQL sources are opened read-only)")


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
    """A SQL string literal. Both databases coerce it to the column's type (integer, timestamp, text).

    For key boundaries the database gave (``apollo_sync.partitions``); a source's cursor value is bound as a
    parameter instead.
    """
    return "'" + _without_nul(value).replace("'", "''") + "'"


def _without_nul(value: str) -> str:
    """``value`` as it may be sent: InputError for a NUL character, which neither database stores in text."""
    if "\0" in value:
        raise InputError("the cursor value contains a NUL character: reset the mark in the state dir")
    return value


def _cursor_filter(cursor, spec: str, query: str, options: SourceOptions) -> tuple[str, tuple[str, ...] | None]:
    """``query`` narrowed to rows whose cursor is greater than ``options.cursor_after``, and what to bind to it.

    SQLite binds the value; on PostgreSQL it is bound here, on ``cursor``, into :data:`CURSOR_SETTING` and the
    statement returned has no parameter, so its result streams (see the module docstring).
    """
    if not options.cursor_column:
        return query, None
    inner = f"SELECT * FROM ({query}) AS apollo_sync_source"
    if options.cursor_after is None:
        return inner, None
    column = quote_identifier(options.cursor_column)
    value = _without_nul(options.cursor_after)
    if _kind(spec) == "sqlite":
        return f"{inner} WHERE {column} > ?", (value,)
    cursor.execute(
        f"SELECT set_config('{CURSOR_SETTING}', $1, true), "
        f"pg_typeof((SELECT {column} FROM ({query}) AS apollo_sync_source LIMIT 0))::text",
        (value,),
    )
    type_name = cursor.fetchone()[1]  # the server's own spelling, quoted where it needs quotes
    return f"{inner} WHERE {column} > CAST(current_setting('{CURSOR_SETTING}') AS {type_name})", None


def driver_message(exc: BaseException) -> str:
    """The driver's message without the ADBC status prefix and the echoed query."""
    text = first_line(exc)
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^(\[libpq\] |\[SQLite\] )?(Failed to (prepare|execute|step) query: |Execution error \[\w+\]: )?"
                  r"(could not begin COPY: )?(ERROR:\s+)?", "", text)
    return text.strip() or type(exc).__name__


def scrub(text: str, password: str | None) -> str:
    """``text`` with ``password`` (raw or URL-decoded) and any ``user:password@`` in a URL replaced by ``***``."""
    if password:
        text = text.replace(password, "***").replace(unquote(password), "***")
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _kind(spec: str) -> str:
    return "sqlite" if scheme_of(spec) == "sqlite" else "postgresql"


def _sqlite_path(spec: str) -> Path:
    """The file a ``sqlite://`` URL names, read as given (``#``, ``?``, ``%`` and spaces are part of the name).

    sqlite:////abs.db and sqlite:///abs.db name /abs.db; sqlite:///rel.db names rel.db if /rel.db is absent.
    Only when no file has the name as given is it percent-decoded (``my%20file.db`` for ``my file.db``).
    """
    given = spec.split("://", 1)[1]
    candidates = [_sqlite_candidate(raw) for raw in dict.fromkeys((given, unquote(given)))]
    path = next((p for p in candidates if p.exists()), candidates[0])
    if not path.is_file():
        raise InputError(f"SQLite database {path} does not exist: check the path (sqlite:///relative.db or sqlite:////abs/path.db)")
    if path.stat().st_size == 0:
        raise InputError(f"SQLite database {path} is empty (0 bytes): check the path")
    return path


def _sqlite_candidate(raw: str) -> Path:
    path = Path(raw[1:] if raw.startswith("//") else raw).expanduser()
    if not path.exists() and raw.startswith("/") and Path(raw[1:]).exists():
        path = Path(raw[1:])
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
        if options.cursor_column:
            cursor.execute(f"SELECT * FROM ({query}) AS apollo_sync_source LIMIT 0")
            names = [d[0] for d in cursor.description]
            if options.cursor_column not in names:
                raise InputError(f"--cursor-column {options.cursor_column} is not a column of the query result: pick one of {', '.join(names)}")
        statement, parameters = _cursor_filter(cursor, spec, query, options)
        cursor.execute(statement, parameters)
        reader = cursor.fetch_record_batch()
        names = reader.schema.names
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
    except (adbc_driver_manager.Error, pa.ArrowException) as exc:  # a failure mid-stream comes as an Arrow error
        reason = scrub(driver_message(exc), password)
        if _refused_write(exc):
            raise InputError(f"--query must only read, but it tried to change {shown} ({reason}): give a SELECT or a "
                             "table name (SQL sources are opened read-only)") from None
        raise InputError(f"the query failed on {shown}: {reason}; check --query") from None
    finally:
        conn.close()
    cursor_max = None
    if maxima:
        top = max(maxima, key=lambda s: s.as_py())
        cursor_max = _text_array(pa.array([top.as_py()], type=top.type))[0].as_py()
    return path, cursor_max


def _refused_write(exc: BaseException) -> bool:
    """A write the database refused: PostgreSQL's SQLSTATE 25006 (read-only transaction), SQLite's SQLITE_READONLY."""
    text = str(exc)
    return getattr(exc, "sqlstate", None) == "25006" or any(t in text for t in _WRITE_REFUSED)


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
