"""Real services for tests, on 127.0.0.1 only: a throwaway PostgreSQL cluster and a moto S3 server.

Both are plain context managers (usable from benchmarks too) with session-scoped pytest fixtures on top.
If a service cannot start, its tests skip with the reason, unless ``CI_REQUIRE_SERVICES=1`` (set by
``.ci/run``), in which case they fail: CI must never pass by skipping the real-service tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

PREFECT_SERVER_PORTS: set[int] = set()
"""Ports of the Prefect servers tests run against (the harness, the e2e server): tests/conftest.py lets through
the unclosed sockets Prefect's own clients leave to them, and only those."""


def url_port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 0


PG_USER = "apollo"
PG_PASSWORD = "s3cret-pg-pw"
PG_DATABASE = "contacts"
S3_ACCESS_KEY = "testing-access-key"
S3_SECRET_KEY = "testing-secret-key"
S3_REGION = "us-east-1"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; good enough for a test service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> str | None:
    """The directory with initdb/pg_ctl: Debian's /usr/lib/postgresql/<ver>/bin (newest), else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@dataclass(frozen=True)
class Postgres:
    """A running cluster: ``url`` carries the password, as a user's ``postgresql://`` spec would."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL binary as the ``postgres`` OS user when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """Start a private PostgreSQL cluster in a temp dir on a free loopback port; stop and delete it after."""
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries not found (initdb); install Debian's postgresql package")
    root = tempfile.mkdtemp(prefix="apollo-sync-pg-")
    os.chmod(root, 0o777)
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    os.chmod(sock, 0o777)
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as f:
        f.write(PG_PASSWORD)
    os.chmod(pwfile, 0o644)
    port = free_port()
    started = False
    try:
        _as_postgres([f"{bindir}/initdb", "-D", data, "-U", PG_USER, "--pwfile", pwfile,
                      "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} -c fsync=off"
        _as_postgres([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start"])
        started = True
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DATABASE],
                       check=True, capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=PG_PASSWORD))
        yield Postgres("127.0.0.1", port, PG_USER, PG_PASSWORD, PG_DATABASE)
    finally:
        if started:
            with contextlib.suppress(Exception):
                _as_postgres([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    """A moto S3 server: ``env`` holds the standard AWS variables pointing at it."""

    endpoint_url: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": S3_REGION,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client on the server (boto3 comes with moto, a dev dependency)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=S3_REGION,
                            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto's ThreadedMotoServer on a free loopback port, stopped after."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield S3(url)
    finally:
        server.stop()


def _unavailable(what: str, exc: BaseException) -> None:
    """Skip (developer machine) or fail (CI) when a real service cannot start."""
    reason = f"{what} could not start: {exc}".splitlines()[0]
    if os.environ.get("CI_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + " (CI_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def require_e2e_marker(request: pytest.FixtureRequest, what: str) -> None:
    """A test that reaches a real service must say so (marker e2e), so `-m "not e2e"` never needs one.

    Tests that ask for the fixture directly are marked by tests/conftest.py; one that reaches it through
    ``request.getfixturevalue`` (a parametrized backend) must carry the marker on that parameter.
    """
    node = getattr(request, "_pyfuncitem", None) or request.node
    if node.get_closest_marker("e2e") is None:
        pytest.fail(f"{node.nodeid} uses {what} but is not marked e2e: mark it (or its parameter) e2e")


@pytest.fixture
def postgres(postgres_cluster_once: Postgres, request: pytest.FixtureRequest) -> Postgres:
    """The session's real PostgreSQL on 127.0.0.1 (only for tests marked e2e)."""
    require_e2e_marker(request, "PostgreSQL")
    return postgres_cluster_once


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh database of the session's PostgreSQL per test (its URL carries the password), so tests do not see
    each other's rows."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def postgres_cluster_once() -> Iterator[Postgres]:
    """Session-wide real PostgreSQL on 127.0.0.1."""
    cm = postgres_cluster()
    try:
        pg = cm.__enter__()
    except Exception as exc:  # noqa: BLE001 - any failure to start is reported the same way
        _unavailable("PostgreSQL", exc)
    try:
        yield pg
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture
def s3(s3_server_once: S3, request: pytest.FixtureRequest) -> S3:
    """The session's moto S3 server on 127.0.0.1 (only for tests marked e2e)."""
    require_e2e_marker(request, "the S3 server")
    return s3_server_once


@pytest.fixture(scope="session")
def s3_server_once() -> Iterator[S3]:
    """Session-wide moto S3 server on 127.0.0.1."""
    cm = s3_server()
    try:
        srv = cm.__enter__()
    except Exception as exc:  # noqa: BLE001
        _unavailable("S3 (moto server)", exc)
    try:
        yield srv
    finally:
        cm.__exit__(None, None, None)
