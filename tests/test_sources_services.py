"""apollo_sync.sources against real services on 127.0.0.1: PostgreSQL, a moto S3 server, a plain HTTP server."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from services import PG_PASSWORD, S3_SECRET_KEY, free_port, postgres, s3  # noqa: F401 - fixtures

from apollo_sync.errors import InputError
from apollo_sync.sources import SourceOptions, read_source

pytestmark = pytest.mark.e2e


@pytest.fixture
def people(postgres):  # noqa: F811
    """A PostgreSQL table with integer, text, timestamptz and numeric columns (made afresh for each test: the
    ``postgres`` fixture is per test, so it checks each test that reaches it is marked e2e)."""
    import adbc_driver_postgresql.dbapi as driver

    with driver.connect(postgres.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS people")
        cur.execute("CREATE TABLE people (id integer, email text, zip text, score numeric(6,2), "
                    "updated_at timestamptz, tags text[])")
        cur.execute("""INSERT INTO people VALUES
            (1, 'ada@example.com', '02134', 1.50, '2024-01-01 00:00:00+00', '{a,b}'),
            (2, 'grace@example.com', '00501', NULL, '2024-01-02 10:00:00.123456+02', NULL),
            (10, 'alan@example.com', NULL, 3, '2024-03-01 12:00:00+00', '{}')""")
    return postgres


def test_postgres_table_reads_as_text(people):
    source = read_source(people.url, SourceOptions(query="people"))
    frame = source.frame.collect()
    assert frame["source_row"].to_list() == [1, 2, 3]
    assert frame["zip"].to_list() == ["02134", "00501", None]
    assert frame["score"].to_list() == ["1.50", None, "3.00"]
    assert all(dtype == pl.String for name, dtype in frame.schema.items() if name != "source_row")
    assert source.uri == f"postgresql://127.0.0.1:{people.port}/contacts"
    assert PG_PASSWORD not in source.uri + source.description + source.fingerprint + repr(source)
    assert source.cursor_max is None


def test_postgres_cursor_integer_and_timestamp(people):
    query = "SELECT id, email, updated_at FROM people"
    first = read_source(people.url, SourceOptions(query=query, cursor_column="id", cursor_after="2"))
    assert first.frame.collect()["email"].to_list() == ["alan@example.com"]
    assert first.cursor_max == "10"

    by_time = read_source(people.url, SourceOptions(query=query, cursor_column="updated_at"))
    assert by_time.frame.collect().height == 3
    mark = by_time.cursor_max
    assert mark is not None and mark.startswith("2024-03-01 12:00:00")
    again = read_source(people.url, SourceOptions(query=query, cursor_column="updated_at", cursor_after=mark))
    assert again.frame.collect().height == 0 and again.cursor_max == mark  # the mark round-trips exactly
    middle = read_source(people.url, SourceOptions(query=query, cursor_column="updated_at",
                                                   cursor_after="2024-01-02 08:00:00.123455+00"))
    assert middle.frame.collect()["id"].to_list() == ["2", "10"]


def test_postgres_fingerprint_has_no_password_and_follows_cursor(people):
    a = read_source(people.url, SourceOptions(query="people", cursor_column="id", cursor_after="1"))
    b = read_source(people.url, SourceOptions(query="people", cursor_column="id", cursor_after="2"))
    assert a.fingerprint != b.fingerprint


def one_line_error(spec: str, options: SourceOptions) -> str:
    with pytest.raises(InputError) as info:
        read_source(spec, options)
    message = str(info.value)
    assert "\n" not in message and PG_PASSWORD not in message and PG_PASSWORD not in repr(info.value)
    return message


def test_postgres_bad_query(people):
    message = one_line_error(people.url, SourceOptions(query="SELECT * FROM nowhere"))
    assert "query failed" in message and "nowhere" in message and "--query" in message


def test_postgres_unreachable_and_wrong_password(people):
    closed = people.url.replace(f":{people.port}/", f":{free_port()}/")
    assert "cannot connect" in one_line_error(closed, SourceOptions(query="people"))
    wrong = people.url.replace(PG_PASSWORD, PG_PASSWORD + "-wrong")
    message = one_line_error(wrong, SourceOptions(query="people"))
    assert "cannot connect" in message and "password" in message and PG_PASSWORD + "-wrong" not in message


# --- S3 (moto server) -------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3, monkeypatch) -> str:  # noqa: F811
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    client = s3.client()
    name = "contacts-bucket"
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)
    frame = pl.DataFrame({"email": ["a@x.com", "b@x.com"], "zip": ["02134", None]})
    client.put_object(Bucket=name, Key="in/contacts.csv", Body=b"email;zip\r\na@x.com;02134\r\nb@x.com;\r\n")
    buf = __import__("io").BytesIO()
    frame.write_parquet(buf)
    client.put_object(Bucket=name, Key="in/contacts.parquet", Body=buf.getvalue())
    return name


def test_s3_csv_and_parquet_agree(bucket):
    csv_source = read_source(f"s3://{bucket}/in/contacts.csv")
    parquet_source = read_source(f"s3://{bucket}/in/contacts.parquet")
    expected = pl.DataFrame({"source_row": [1, 2], "email": ["a@x.com", "b@x.com"], "zip": ["02134", None]},
                            schema={"source_row": pl.Int64, "email": pl.String, "zip": pl.String})
    assert_frame_equal(csv_source.frame.collect(), expected)
    assert_frame_equal(parquet_source.frame.collect(), expected)
    assert csv_source.uri == f"s3://{bucket}/in/contacts.csv" and csv_source.description == "contacts.csv"
    assert S3_SECRET_KEY not in repr(csv_source)
    assert csv_source.fingerprint == read_source(f"s3://{bucket}/in/contacts.csv").fingerprint
    assert csv_source.fingerprint != parquet_source.fingerprint


def test_s3_missing_object(bucket):
    with pytest.raises(InputError) as info:
        read_source(f"s3://{bucket}/in/nope.csv")
    assert "\n" not in str(info.value) and S3_SECRET_KEY not in str(info.value)


# --- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture
def web_root(tmp_path) -> Iterator[tuple[Path, str]]:
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range support, as object stores and CDNs serve them."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        first = int(match.group(1) or 0)
        last = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[first : last + 1])


def test_http_csv(web_root):
    root, url = web_root
    (root / "contacts.csv").write_text("email|first_name\na@x.com|Ada\n")
    source = read_source(f"{url}/contacts.csv")
    assert source.frame.collect().rows() == [(1, "a@x.com", "Ada")]
    assert source.uri == f"{url}/contacts.csv"


# --- Read-only sessions and bound cursor values (issue 14, item 6) ------------------------------------------


def people_rows(pg) -> list[tuple]:
    """Every row of ``people``, and whether a table ``more`` exists, over a connection of the test's own."""
    import adbc_driver_postgresql.dbapi as driver

    with driver.connect(pg.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, email, zip, score::text, updated_at::text FROM people ORDER BY id")
        rows = cur.fetchall()
        cur.execute("SELECT to_regclass('more') IS NOT NULL")
        rows.append(("more exists", cur.fetchone()[0]))
        cur.execute("SELECT to_regclass('people_ids') IS NULL OR (SELECT NOT is_called FROM people_ids)")
        return [*rows, ("sequence unused", cur.fetchone()[0])]


@pytest.mark.parametrize("query", [
    "INSERT INTO people (id, email) VALUES (99, 'new@example.com')",
    "UPDATE people SET email = 'changed@example.com'",
    "DELETE FROM people",
    "CREATE TABLE more (a text)",
    "DROP TABLE people",
    "WITH doomed AS (DELETE FROM people RETURNING *) SELECT * FROM doomed",
    "SELECT * FROM people FOR UPDATE",
    "SELECT set_config('default_transaction_read_only', 'off', false), nextval('people_ids')",
])  # fmt: skip
def test_postgres_writing_query_is_refused_and_nothing_changes(people, query):
    import adbc_driver_postgresql.dbapi as driver

    with driver.connect(people.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE SEQUENCE IF NOT EXISTS people_ids")
    before = people_rows(people)
    message = one_line_error(people.url, SourceOptions(query=query))
    assert message.startswith("--query must only read") and "SELECT or a table name" in message
    assert people_rows(people) == before


def test_postgres_write_behind_with_is_refused_by_the_read_only_transaction(people):
    before = people_rows(people)
    query = "WITH doomed AS (DELETE FROM people RETURNING *) SELECT * FROM doomed"
    message = one_line_error(people.url, SourceOptions(query=query))
    assert "tried to change" in message and "read-only transaction" in message
    assert people_rows(people) == before


def test_postgres_connection_itself_is_read_only(people):
    """``connect`` is what apollo_sync.partitions uses too: nothing sent on it can write, in any transaction."""
    import adbc_driver_manager

    from apollo_sync.sources.sql import connect

    before = people_rows(people)
    conn = connect(people.url)
    try:
        with conn.cursor() as cur:
            with pytest.raises(adbc_driver_manager.Error) as info:
                cur.execute("DELETE FROM people")
            assert info.value.sqlstate == "25006"
        conn.rollback()  # a new transaction: read-only as well
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('transaction_read_only')")
            assert cur.fetchone() == ("on",)
    finally:
        conn.close()
    assert people_rows(people) == before


def test_postgres_cursor_value_with_quotes_is_bound_as_data(people):
    """With standard_conforming_strings off a backslash escapes a quote, so a value spliced in as a doubled-quote
    literal would end the string early and select every row; bound, it is only a value."""
    url = people.url + "?options=-c%20standard_conforming_strings%3Doff%20-c%20escape_string_warning%3Doff"
    hostile = "zzz\\' OR TRUE --"
    none = read_source(url, SourceOptions(query="people", cursor_column="email", cursor_after=hostile))
    assert none.frame.collect().height == 0 and none.cursor_max == hostile
    quoted = read_source(people.url, SourceOptions(query="people", cursor_column="email", cursor_after="b'"))
    assert quoted.frame.collect()["email"].to_list() == ["grace@example.com"]


def test_postgres_bad_cursor_value_and_missing_cursor_column(people):
    message = one_line_error(people.url, SourceOptions(query="people", cursor_column="id", cursor_after="ten"))
    assert "query failed" in message and "ten" in message
    missing = one_line_error(people.url, SourceOptions(query="people", cursor_column="nope", cursor_after="1"))
    assert "--cursor-column nope is not a column" in missing and "email" in missing
