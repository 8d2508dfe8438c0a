"""apollo_sync.sources on local files and SQLite: formats agree, CSV details, and every bad input is one line.

The last part is issue 14's safe reading (items 4b and 6): SQLite paths read as given, queries that only read,
cursor values bound, an .xlsx opened once, JSON arrays refused above a size while NDJSON streams. PostgreSQL's side
of the same promises is in tests/test_sources_services.py.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import os
import sqlite3
import struct
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.sources import Source, SourceOptions, detect_delimiter, read_source
from apollo_sync.sources.sql import check_reads, connect

COLUMNS = ["email", "first_name", "last_name", "organization_name", "zip", "phone"]
ROWS = [
    ["ada@example.com", "Ada", "Lovelace", "Analytical, Engines", "02134", "0044 20 7946 0000"],
    ["grace@example.com", "Grace", "Hopper", 'Navy "Research"', "00501", None],
    [None, "Alan", "Turing", "Bletchley\nPark", "01001", "+44 1908 640404"],
    ["ada@example.com", "Ada", "L.", None, None, None],
    ["linus@example.com", "Linus", "Torvalds", "Linux Foundation", "97035", "(503) 555-0100"],
    ["margaret@example.com", "Margaret", "Hamilton", "MIT", "02139", None],
]


def expected_frame() -> pl.DataFrame:
    data = {c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)}
    frame = pl.DataFrame(data, schema={c: pl.String for c in COLUMNS})
    return frame.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))


def write_csv(path: Path, rows=ROWS, delimiter=",", encoding="utf-8", lineterminator="\r\n", header=True) -> Path:
    with open(path, "w", encoding=encoding, newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator=lineterminator)
        if header:
            writer.writerow(COLUMNS)
        writer.writerows([["" if v is None else v for v in r] for r in rows])
    return path


def collect(source: Source) -> pl.DataFrame:
    return source.frame.collect()


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    """The same contacts as CSV, TSV, Parquet, NDJSON, JSON, xlsx, a glob of three CSVs and a SQLite table."""
    frame = expected_frame().drop("source_row")
    out = {"csv": str(write_csv(tmp_path / "contacts.csv"))}
    out["tsv"] = str(write_csv(tmp_path / "contacts.tsv", delimiter="\t"))
    frame.write_parquet(tmp_path / "contacts.parquet")
    out["parquet"] = str(tmp_path / "contacts.parquet")
    with open(tmp_path / "contacts.ndjson", "w") as fh:
        for row in frame.iter_rows(named=True):
            fh.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    out["ndjson"] = str(tmp_path / "contacts.ndjson")
    (tmp_path / "contacts.json").write_text(json.dumps(frame.to_dicts()))
    out["json"] = str(tmp_path / "contacts.json")
    frame.write_excel(tmp_path / "contacts.xlsx")
    out["xlsx"] = str(tmp_path / "contacts.xlsx")
    parts = tmp_path / "parts"
    parts.mkdir()
    for n, (lo, hi) in enumerate([(0, 2), (2, 3), (3, 6)]):  # names sort in row order
        write_csv(parts / f"export-{n}.csv", ROWS[lo:hi])
    out["glob"] = str(parts / "*.csv")
    db = tmp_path / "contacts.db"
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE contacts ({', '.join(c + ' TEXT' for c in COLUMNS)})")
        conn.executemany(f"INSERT INTO contacts VALUES ({', '.join('?' * len(COLUMNS))})", ROWS)
    conn.close()
    out["sqlite"] = f"sqlite:///{db}"
    return out


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "ndjson", "json", "xlsx", "glob", "sqlite"])
def test_every_format_gives_the_same_frame(sources, kind):
    options = SourceOptions(query="contacts") if kind == "sqlite" else SourceOptions()
    source = read_source(sources[kind], options)
    assert isinstance(source.frame, pl.LazyFrame)
    assert_frame_equal(collect(source), expected_frame())


def test_glob_numbers_rows_across_files_and_unions_columns(tmp_path):
    (tmp_path / "a.csv").write_text("email,first_name\na@x.com,A\nb@x.com,B\n")
    (tmp_path / "b.csv").write_text("email,title\nc@x.com,CEO\n")
    source = read_source(str(tmp_path / "*.csv"))
    frame = collect(source)
    assert frame["source_row"].to_list() == [1, 2, 3]
    assert frame["email"].to_list() == ["a@x.com", "b@x.com", "c@x.com"]
    assert frame["first_name"].to_list() == ["A", "B", None]
    assert frame["title"].to_list() == [None, None, "CEO"]
    assert source.description == f"2 files: {tmp_path / '*.csv'}"


def test_fingerprint_follows_content_and_uri_is_absolute(tmp_path, sources):
    a = read_source(sources["csv"])
    assert a.fingerprint == read_source(sources["csv"]).fingerprint
    assert a.uri == Path(sources["csv"]).resolve().as_uri() and a.description == "contacts.csv"
    with open(sources["csv"], "a") as fh:
        fh.write("new@example.com,N,N,,,\r\n")
    assert read_source(sources["csv"]).fingerprint != a.fingerprint
    assert read_source(sources["csv"], SourceOptions(delimiter=",")).fingerprint != read_source(sources["csv"]).fingerprint


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_is_detected(tmp_path, delimiter):
    path = write_csv(tmp_path / "contacts.csv", delimiter=delimiter)
    assert_frame_equal(collect(read_source(str(path))), expected_frame())


def test_detect_delimiter_respects_quotes():
    assert detect_delimiter('name;email\n"Smith, J";a@x.com\n"Doe, K";b@x.com\n') == ";"
    assert detect_delimiter("email\na@x.com\n") == ","


def test_explicit_delimiter_wins(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("email:name\na@x.com:A\n")
    frame = collect(read_source(str(path), SourceOptions(delimiter=":")))
    assert frame.columns == ["source_row", "email", "name"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "latin-1", "cp1252"])
def test_encodings(tmp_path, encoding):
    rows = [["rene@example.com", "René", "Ørsted", "Café Crème", "02134", None]]
    path = write_csv(tmp_path / "contacts.csv", rows=rows, encoding=encoding)
    frame = collect(read_source(str(path), SourceOptions(encoding=encoding)))
    assert frame.columns == ["source_row", *COLUMNS]
    assert frame.row(0) == (1, *rows[0])


def test_utf16_is_recognised_and_readable(tmp_path):
    path = tmp_path / "unicode.txt"
    path.write_bytes("email\tfirst_name\r\nrene@example.com\tRené\r\n".encode("utf-16"))
    assert "--encoding utf-16" in bad(str(path), SourceOptions(format="tsv"))
    frame = collect(read_source(str(path), SourceOptions(format="tsv", encoding="utf-16")))
    assert frame.rows() == [(1, "rene@example.com", "René")]


def test_cp1252_curly_quotes_decoded(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("email,organization_name\na@x.com,\u201cQuoted\u201d \u20ac Ltd\n".encode("cp1252"))
    frame = collect(read_source(str(path), SourceOptions(encoding="cp1252")))
    assert frame["organization_name"].to_list() == ["\u201cQuoted\u201d \u20ac Ltd"]


def test_blank_lines_are_not_rows_and_crlf_and_quoted_newlines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b'email,note\r\n\r\na@x.com,"line one\r\nline two, with comma"\r\n\r\n\r\nb@x.com,plain\r\n\r\n')
    frame = collect(read_source(str(path)))
    assert frame["source_row"].to_list() == [1, 2]
    assert frame["note"].to_list() == ["line one\r\nline two, with comma", "plain"]
    assert frame["email"].to_list() == ["a@x.com", "b@x.com"]


def test_header_only_file_is_zero_rows(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("email,first_name\n")
    frame = collect(read_source(str(path)))
    assert frame.height == 0
    assert frame.schema == pl.Schema({"source_row": pl.Int64, "email": pl.String, "first_name": pl.String})


def test_non_string_columns_become_text(tmp_path):
    path = tmp_path / "typed.parquet"
    pl.DataFrame({"email": ["a@x.com"], "zip": [2134], "vip": [True], "labels": [["a", "b"]]}).write_parquet(path)
    frame = collect(read_source(str(path)))
    assert frame.row(0) == (1, "a@x.com", "2134", "true", "a;b")
    assert all(dtype == pl.String for name, dtype in frame.schema.items() if name != "source_row")


def test_format_override(tmp_path):
    path = tmp_path / "contacts.export"
    path.write_text("email\na@x.com\n")
    assert collect(read_source(str(path), SourceOptions(format="csv")))["email"].to_list() == ["a@x.com"]


def test_sqlite_query_with_cursor(tmp_path):
    db = tmp_path / "c.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (id INTEGER, email TEXT, updated TEXT)")
        conn.executemany("INSERT INTO people VALUES (?,?,?)",
                         [(1, "a@x.com", "2024-01-01"), (2, "b@x.com", "2024-01-02"), (10, "c@x.com", "2024-01-03")])
    conn.close()
    spec = f"sqlite:///{db}"
    first = read_source(spec, SourceOptions(query="SELECT * FROM people", cursor_column="id"))
    assert first.cursor_max == "10" and collect(first).height == 3
    after = read_source(spec, SourceOptions(query="SELECT * FROM people", cursor_column="id", cursor_after="2"))
    assert collect(after)["email"].to_list() == ["c@x.com"]  # 10 > 2 as numbers, not as text
    assert after.cursor_max == "10" and after.fingerprint != first.fingerprint
    none_new = read_source(spec, SourceOptions(query="people", cursor_column="id", cursor_after="10"))
    assert collect(none_new).height == 0 and none_new.cursor_max == "10"
    by_date = read_source(spec, SourceOptions(query="people", cursor_column="updated", cursor_after="2024-01-01"))
    assert collect(by_date)["id"].to_list() == ["2", "10"] and by_date.cursor_max == "2024-01-03"
    assert first.uri == f"sqlite://{db.resolve()}"
    assert read_source(spec, SourceOptions(query="people")).fingerprint == read_source(spec, SourceOptions(query="people")).fingerprint


def test_sqlite_fingerprint_follows_table_content(tmp_path):
    db = tmp_path / "c.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (email TEXT)")
        conn.execute("INSERT INTO people VALUES ('a@x.com')")
    conn.close()
    before = read_source(f"sqlite:///{db}", SourceOptions(query="people")).fingerprint
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE people SET email = 'b@x.com'")
    conn.close()
    assert read_source(f"sqlite:///{db}", SourceOptions(query="people")).fingerprint != before


# --- Bad input: one line, says what to do ----------------------------------------------------------------


def bad(spec: str, options: SourceOptions = SourceOptions()) -> str:
    with pytest.raises(InputError) as info:
        read_source(spec, options)
    message = str(info.value)
    assert "\n" not in message and message
    assert info.value.exit_code == 2
    return message


def test_missing_path(tmp_path):
    assert "does not exist" in bad(str(tmp_path / "nope.csv"))


def test_glob_matching_nothing(tmp_path):
    assert "matches no files" in bad(str(tmp_path / "*.csv"))


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"")
    assert "empty (0 bytes)" in bad(str(tmp_path / "e.csv"))


def test_binary_garbage(tmp_path):
    (tmp_path / "g.csv").write_bytes(bytes(range(256)) * 64)
    assert "binary" in bad(str(tmp_path / "g.csv"))


def test_parquet_that_is_not_parquet(tmp_path):
    (tmp_path / "g.parquet").write_text("email\na@x.com\n")
    assert "cannot read" in bad(str(tmp_path / "g.parquet"))


def test_wrong_encoding_suggests_latin1(tmp_path):
    (tmp_path / "l.csv").write_bytes("email,name\nrene@example.com,René\n".encode("latin-1"))
    message = bad(str(tmp_path / "l.csv"))
    assert "not valid utf-8" in message and "--encoding latin-1" in message and "line 2" in message


def test_unknown_extension_suggests_format(tmp_path):
    (tmp_path / "c.dat").write_text("email\na@x.com\n")
    assert "--format" in bad(str(tmp_path / "c.dat"))


def test_unknown_encoding_and_format_and_delimiter(tmp_path):
    path = str(write_csv(tmp_path / "c.csv"))
    assert "--encoding" in bad(path, SourceOptions(encoding="klingon"))
    assert "--format" in bad(path, SourceOptions(format="docx"))
    assert "--delimiter" in bad(path, SourceOptions(delimiter=";;"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = write_csv(tmp_path / "c.csv")
    path.chmod(0)
    assert "cannot read" in bad(str(path))


def test_unopenable_path(tmp_path):
    """A path that exists but cannot be opened (a Unix socket: fails even for root)."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "c.csv"))
    try:
        assert "cannot read" in bad(str(tmp_path / "c.csv"))
    finally:
        sock.close()


def test_directory(tmp_path):
    assert "is a directory" in bad(str(tmp_path))


def test_ragged_csv_fails_in_read_source_even_far_down(tmp_path):
    (tmp_path / "r.csv").write_text("email,name\na@x.com,A,extra,fields\n")
    assert "more fields than the header" in bad(str(tmp_path / "r.csv"))
    (tmp_path / "far.csv").write_text("email,name\n" + "a@x.com,A\n" * 5000 + "b@x.com,B,extra\n")
    assert "more fields than the header" in bad(str(tmp_path / "far.csv"))


def test_json_that_is_not_an_array(tmp_path):
    (tmp_path / "c.json").write_text('{"email": "a@x.com"}\n{"email": "b@x.com"}\n')
    assert "--format ndjson" in bad(str(tmp_path / "c.json"))


def test_sql_errors(tmp_path, sources):
    assert "needs --query" in bad(sources["sqlite"])
    message = bad(sources["sqlite"], SourceOptions(query="SELECT * FROM nowhere"))
    assert "query failed" in message and "nowhere" in message
    assert "does not exist" in bad(f"sqlite:///{tmp_path / 'missing.db'}", SourceOptions(query="t"))
    assert "--cursor-column" in bad(sources["sqlite"], SourceOptions(query="contacts", cursor_column="nope"))
    assert "only with" in bad(sources["csv"], SourceOptions(query="contacts"))


def test_unsupported_scheme():
    assert "unsupported" in bad("ftp://example.com/c.csv")


def test_spill_files_are_private_and_discardable(tmp_path):
    from apollo_sync.sources import discard_spill_files

    discard_spill_files()
    path = write_csv(tmp_path / "l.csv", rows=[["rene@example.com", "René", None, None, None, None]], encoding="latin-1")
    source = read_source(str(path), SourceOptions(encoding="latin-1"))
    assert source.frame.collect()["first_name"].to_list() == ["René"]
    assert discard_spill_files() == 1
    with pytest.raises(Exception):
        source.frame.collect()


def test_remote_json_is_refused_with_advice():
    assert "local files only" in bad("s3://bucket/contacts.json")


@pytest.mark.parametrize("kind", ["parquet", "ndjson", "glob", "sqlite"])
def test_every_format_gives_the_same_counts_after_cleaning(sources, kind):
    """Issue 6's promise at the level a user sees: rows_read, rows_valid and duplicates_in_source agree."""
    from apollo_sync.clean import prepare

    def counts(spec, options=SourceOptions()):
        prepared = prepare(read_source(spec, options).frame)
        valid = prepared.rows_read - prepared.rejected.height
        return prepared.rows_read, valid, prepared.duplicates.height

    options = SourceOptions(query="contacts") if kind == "sqlite" else SourceOptions()
    assert counts(sources[kind], options) == counts(sources["csv"]) == (6, 6, 1)


# === Safe reading (issue 14, items 4b and 6) ===========================================================


def make_db(path: Path, emails: list[str]) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE people (id INTEGER, email TEXT)")
        conn.executemany("INSERT INTO people VALUES (?, ?)", list(enumerate(emails, start=1)))
    conn.close()
    return path


def emails(spec: str, options: SourceOptions = SourceOptions(query="people")) -> list[str]:
    return read_source(spec, options).frame.collect()["email"].to_list()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- SQLite paths: read as given ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a#b?c%d e.db", "x#y.db", "50% off.db", "with space.db", "q?mode=rwc.db"])
def test_sqlite_path_with_special_characters_reads_that_file_and_creates_none(tmp_path, name):
    db = make_db(tmp_path / name, ["ada@example.com"])
    before = sorted(os.listdir(tmp_path))
    assert emails(f"sqlite:///{db}") == ["ada@example.com"]
    assert sorted(os.listdir(tmp_path)) == before == [name]  # no stray file (a cut-off name, a journal)


def test_sqlite_path_is_not_percent_decoded_when_the_name_as_given_exists(tmp_path):
    make_db(tmp_path / "a%41.db", ["given@example.com"])
    make_db(tmp_path / "aA.db", ["decoded@example.com"])
    assert emails(f"sqlite:///{tmp_path}/a%41.db") == ["given@example.com"]


def test_sqlite_percent_encoded_url_still_names_the_decoded_file(tmp_path):
    make_db(tmp_path / "my file.db", ["ada@example.com"])
    assert emails(f"sqlite:///{tmp_path}/my%20file.db") == ["ada@example.com"]
    assert sorted(os.listdir(tmp_path)) == ["my file.db"]


def test_sqlite_missing_file_with_special_characters_is_one_line_and_creates_nothing(tmp_path):
    assert "does not exist" in bad(f"sqlite:///{tmp_path}/no#such?file.db", SourceOptions(query="people"))
    assert os.listdir(tmp_path) == []


# --- SQLite queries only read ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO people VALUES (99, 'new@example.com')",
        "UPDATE people SET email = 'changed@example.com'",
        "  -- a comment first\n DELETE FROM people",
        "/* SELECT */ DROP TABLE people",
        "CREATE TABLE more (a TEXT)",
        "ATTACH DATABASE '{dir}/new.db' AS other",
        "PRAGMA user_version = 7",
    ],
)
def test_sqlite_writing_query_is_refused_by_its_keyword_and_nothing_changes(tmp_path, query):
    db = make_db(tmp_path / "c.db", ["ada@example.com", "grace@example.com"])
    before = sha256(db)
    message = bad(f"sqlite:///{db}", SourceOptions(query=query.format(dir=tmp_path)))
    assert message.startswith("--query must only read") and "SELECT or a table name" in message
    assert sha256(db) == before and sorted(os.listdir(tmp_path)) == ["c.db"]


def test_sqlite_write_hidden_behind_with_is_refused_by_the_database(tmp_path):
    """WITH passes the keyword check; the read-only connection refuses the DELETE it leads to."""
    db = make_db(tmp_path / "c.db", ["ada@example.com", "grace@example.com"])
    before = sha256(db)
    message = bad(f"sqlite:///{db}", SourceOptions(query="WITH doomed AS (SELECT 1) DELETE FROM people"))
    assert message.startswith("--query must only read, but it tried to change") and "readonly" in message
    assert sha256(db) == before and sorted(os.listdir(tmp_path)) == ["c.db"]
    assert emails(f"sqlite:///{db}") == ["ada@example.com", "grace@example.com"]


def test_sqlite_connection_itself_is_read_only(tmp_path):
    """``connect`` is what apollo_sync.partitions uses too: it cannot write whatever is sent on it."""
    import adbc_driver_manager

    db = make_db(tmp_path / "odd #name.db", ["ada@example.com"])
    before = sha256(db)
    conn = connect(f"sqlite:///{db}")
    try:
        with conn.cursor() as cursor, pytest.raises(adbc_driver_manager.Error, match="readonly"):
            cursor.execute("DELETE FROM people")
    finally:
        conn.close()
    assert sha256(db) == before


def test_reading_queries_still_pass_the_keyword_check(tmp_path):
    db = make_db(tmp_path / "c.db", ["ada@example.com", "grace@example.com"])
    spec = f"sqlite:///{db}"
    assert emails(spec, SourceOptions(query="-- newest first\nselect * from people order by id desc")) == [
        "grace@example.com", "ada@example.com"]  # fmt: skip
    assert emails(spec, SourceOptions(query="WITH p AS (SELECT * FROM people) SELECT * FROM p")) == [
        "ada@example.com", "grace@example.com"]  # fmt: skip
    for query in ("(SELECT 1)", "/* x */ ((select 1))", "VALUES (1)", "TABLE people", "with x as (select 1) select 1"):
        check_reads(query)  # PostgreSQL takes all of these
    for query in ("EXPLAIN SELECT 1", "", "'; DELETE FROM people", "SELECTED"):
        with pytest.raises(InputError, match="--query must only read"):
            check_reads(query)


# --- Cursor values are parameters -------------------------------------------------------------------------


def test_sqlite_cursor_value_with_quotes_is_bound_as_data(tmp_path):
    db = make_db(tmp_path / "c.db", ["a@example.com", "o'brien@example.com", "zed@example.com"])
    spec = f"sqlite:///{db}"
    newer = read_source(spec, SourceOptions(query="people", cursor_column="email", cursor_after="o'b"))
    assert newer.frame.collect()["email"].to_list() == ["o'brien@example.com", "zed@example.com"]
    assert newer.cursor_max == "zed@example.com"
    hostile = "zzz' OR '1'='1"  # spliced in without escaping, this would select every row
    none = read_source(spec, SourceOptions(query="people", cursor_column="email", cursor_after=hostile))
    assert none.frame.collect().height == 0 and none.cursor_max == hostile


def test_sqlite_cursor_compares_as_the_column_does(tmp_path):
    """Bound as text, the value still compares under the column's affinity: 10 > 9 as numbers."""
    db = make_db(tmp_path / "c.db", [f"u{i}@example.com" for i in range(1, 11)])
    source = read_source(f"sqlite:///{db}", SourceOptions(query="people", cursor_column="id", cursor_after="9"))
    assert source.frame.collect()["id"].to_list() == ["10"] and source.cursor_max == "10"


# --- An .xlsx is opened once -------------------------------------------------------------------------------

_IN_ACCESS, _IN_CLOSE, _IN_OPEN = 0x001, 0x018, 0x020


def count_opens(path: Path, action) -> int:
    """How many times the kernel saw ``path`` opened while ``action()`` ran (inotify: opens made by polars' and
    fastexcel's Rust code count as well as Python's). Access and close events are watched too, so that two opens
    in a row are never merged into one event."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    try:
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_OPEN | _IN_ACCESS | _IN_CLOSE) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch failed")
        action()
        events = b""
        while True:
            try:
                events += os.read(fd, 65536)
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    opens, offset = 0, 0
    while offset < len(events):
        _, mask, _, length = struct.unpack_from("iIII", events, offset)
        opens += bool(mask & _IN_OPEN)
        offset += 16 + length
    return opens


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts opens with Linux inotify")
def test_xlsx_is_opened_once(tmp_path):
    path = tmp_path / "contacts.xlsx"
    pl.DataFrame({"email": ["a@x.com", "b@x.com"], "zip": ["02134", "00501"]}).write_excel(path)

    def twice() -> None:
        for _ in range(2):
            with open(path, "rb") as fh:
                fh.read(1)

    assert count_opens(path, twice) == 2  # the counter sees every open
    found: list = []
    assert count_opens(path, lambda: found.append(read_source(str(path)))) == 1
    (source,) = found
    assert count_opens(path, source.frame.collect) == 0  # the frame holds the sheet: no read later either
    assert source.frame.collect().rows() == [(1, "a@x.com", "02134"), (2, "b@x.com", "00501")]
    assert source.fingerprint == read_source(str(path)).fingerprint


# --- JSON arrays above a size are refused; NDJSON streams --------------------------------------------------

CONTACT = {"email": "someone@example.com", "first_name": "Ada", "organization_name": "Analytical Engines"}


def test_json_array_over_the_limit_is_refused_in_one_line_and_ndjson_of_that_size_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "JSON_ARRAY_MAX_BYTES", 20_000)
    rows = [dict(CONTACT, email=f"user{i}@example.com") for i in range(400)]
    array = tmp_path / "contacts.json"
    array.write_text(json.dumps(rows))
    lines = tmp_path / "contacts.ndjson"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert array.stat().st_size > 20_000 and lines.stat().st_size > 20_000

    message = bad(str(array), SourceOptions())
    assert f"JSON array of {array.stat().st_size:,} bytes" in message and "20,000 bytes" in message
    assert "convert it to NDJSON" in message and "jq -c '.[]' contacts.json > contacts.ndjson" in message

    source = read_source(str(lines))
    plan = source.frame.explain()
    assert "NDJSON SCAN" in plan.upper() and "DF [" not in plan  # scanned from the file, not loaded whole
    frame = source.frame.collect()
    assert frame.height == 400 and frame["email"][399] == "user399@example.com"


def test_json_array_within_the_limit_and_the_default_limit(tmp_path, monkeypatch):
    assert settings.JSON_ARRAY_MAX_BYTES == 100_000_000
    path = tmp_path / "contacts.json"
    path.write_text(json.dumps([CONTACT]))
    monkeypatch.setattr(settings, "JSON_ARRAY_MAX_BYTES", path.stat().st_size)  # at the limit: still read
    assert read_source(str(path)).frame.collect()["email"].to_list() == ["someone@example.com"]


def test_big_json_that_is_not_an_array_gets_the_ndjson_advice_not_the_size_one(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "JSON_ARRAY_MAX_BYTES", 100)
    path = tmp_path / "contacts.json"
    path.write_text("".join(json.dumps(CONTACT) + "\n" for _ in range(10)))
    message = bad(str(path), SourceOptions())
    assert "--format ndjson" in message and "MB" not in message and "bytes" not in message
