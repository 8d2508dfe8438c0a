"""The sandbox over real sockets on 127.0.0.1: the HTTP handler, the threading server, :class:`SandboxServer` (in a
thread of this process) and :func:`serve_forever` (in the foreground, for ``python -m apollo_sync.sandbox``).

The handler is a thin adapter: it reads the body (always, so a keep-alive connection stays in step), asks
:func:`.endpoint.answer` for the reply and writes it. Both ways in are served from one port.

Two fences: the socket is bound to 127.0.0.1 only (no other machine reaches it), and :func:`.endpoint.answer`
answers 421 to any request whose ``Host`` header is not 127.0.0.1, localhost or [::1] (any port), so a web page
that rebinds its DNS name to 127.0.0.1 cannot drive the sandbox from a browser. The key clients must send is
``SandboxConfig.api_key``; the command line takes it from ``--api-key`` or ``APOLLO_SANDBOX_KEY`` (:mod:`.process`).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.sandbox.endpoint import MAX_BODY_BYTES, answer, checked_seed
from apollo_sync.sandbox.state import Clock, SandboxConfig, SandboxState
from apollo_sync.sandbox.wire import BadRequest, Reply

LOOPBACK_HOST = "127.0.0.1"
_LOOPBACK_ALIASES = (LOOPBACK_HOST, "localhost")
ANNOUNCE_PREFIX = "sandbox listening on "
"""First stdout line of ``python -m apollo_sync.sandbox``, followed by the base URL."""


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP adapter over :func:`.endpoint.answer`."""

    protocol_version = "HTTP/1.1"
    server_version = "apollo-sync-sandbox"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: no request log (and so never a header value)."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._respond("GET", b"")

    def do_POST(self) -> None:  # noqa: N802
        self._respond("POST", self._read_body())  # always read it, so a keep-alive connection stays in step

    def do_PATCH(self) -> None:  # noqa: N802
        self._respond("PATCH", self._read_body())

    def do_PUT(self) -> None:  # noqa: N802
        self._respond("PUT", self._read_body())

    def do_DELETE(self) -> None:  # noqa: N802
        self._respond("DELETE", self._read_body())

    def _respond(self, method: str, body: bytes | None) -> None:
        path = self.path.split("?", 1)[0]
        self._send(answer(self.server.state, method, path, self.headers, body))

    def _read_body(self) -> bytes | None:
        """The request body, or None (and the connection marked to close) when it cannot be read in step."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, reply: Reply) -> None:
        if reply.body is None:
            self.close_connection = True
            return
        payload = json.dumps(reply.body, separators=(",", ":")).encode()
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        head = [
            f"HTTP/1.1 {reply.status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        head.extend(f"{k}: {v}" for k, v in reply.headers.items())
        if self.close_connection:
            head.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:  # the client gave up (a timed-out slow request): nothing to tell anyone
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: SandboxState):
        self.state = state
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open keep-alive connection so no handler thread outlives the server."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away is not news
        super().handle_error(request, client_address)


def _make_server(config: SandboxConfig, port: int, host: str, clock: Clock = time.time) -> _Server:
    if host not in _LOOPBACK_ALIASES:
        raise InputError(f"the sandbox binds {LOOPBACK_HOST} only; got host {host!r}: leave the host out or use {LOOPBACK_HOST}")
    if not 0 <= port <= 65535:
        raise InputError(f"port must be in 0..65535 (0 = any free port); got {port}")
    try:
        return _Server((LOOPBACK_HOST, port), SandboxState(config, clock))
    except OSError as exc:
        raise InputError(f"cannot listen on {LOOPBACK_HOST}:{port} ({exc.strerror}): pick another port or 0 for a free one") from None


class SandboxURLs:
    """The base URLs of a running sandbox (``url`` is its root), for either way in."""

    url: str

    @property
    def gateway_base_url(self) -> str:
        """Base URL to give the client for the gateway way in."""
        return self.url + settings.GATEWAY_PATH_PREFIX

    @property
    def apollo_base_url(self) -> str:
        """Base URL to give the client for the Apollo-direct way in."""
        return self.url + settings.APOLLO_PATH_PREFIX


class SandboxServer(SandboxURLs):
    """The sandbox in a background thread of this process. Use as a context manager.

    ``clock`` (default ``time.time``) is the sandbox's time for rate windows, ids and timestamps: a test can
    pass a fake one and step it over a window boundary instead of sleeping.

    >>> with SandboxServer(SandboxConfig(rate=60)) as sb:
    ...     client = ApolloClient(base_url=sb.gateway_base_url, api_key="sandbox-key")
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, port: int = 0, host: str = LOOPBACK_HOST, clock: Clock = time.time
    ):
        self.config = config or SandboxConfig()
        self.clock = clock
        self._port = port
        self._host = host
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> SandboxServer:
        """Bind and start serving; ``.url`` is set on return."""
        if self._server is not None:
            return self
        self._server = _make_server(self.config, self._port, self._host, self.clock)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="apollo-sync-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _state(self) -> SandboxState:
        if self._server is None:
            raise RuntimeError("the sandbox is not running: use it inside 'with SandboxServer(...)'")
        return self._server.state

    def contacts(self) -> list[dict[str, Any]]:
        """Every stored contact (copies), in creation order, with id, created_at and all stored fields."""
        return self._state().contacts()

    def seed(self, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store contacts that exist before a sync, as if created earlier: ids assigned, labels kept, dedupe
        indexes updated, outside every counter and rate window. Validated as bulk_create's contacts (InputError
        naming the field). Returns their public shapes, in the order given (as ``POST /_sandbox/contacts``)."""
        try:
            checked = checked_seed(contacts)
        except BadRequest as exc:
            raise InputError(f"cannot seed the sandbox: {exc}") from None
        return self._state().seed(checked)

    def stats(self) -> dict[str, Any]:
        """The counters, as ``GET /_sandbox/stats`` gives them.

        ``requests`` counts every rate-counted request answered (or dropped), creates and updates together, and
        ``requests_by_endpoint`` splits it (``bulk_create``, ``bulk_update``, ``update_one`` for PATCH);
        ``status_counts`` maps ``"200"``, ``"429"``... to counts, with ``"dropped"`` for connections closed without
        an answer; ``faults`` counts each fault kind drawn; ``contacts_stored`` is the store's size (seeded ones
        included). ``max_contacts_in_request`` is the largest bulk_create list seen and ``max_contacts_in_update``
        the largest bulk_update (``contact_attributes`` + ``contact_ids``), refused ones included; ``created`` and
        ``existing`` count bulk_create's contacts; ``updated`` counts contacts an update was applied to (known ids,
        once per request each, an async one or one answered 500 after applying included); ``async_updates``
        counts bulk_update requests answered "accepted, asynchronous"; ``created_again`` counts creates of an email
        already stored (lean store only); ``first_request_at`` and ``last_request_at`` are the server's clock (epoch
        seconds) at the first and latest rate-counted request (None before one), for the rate a run achieved;
        ``requests_by_second`` lists ``[second, requests]`` per whole second of that clock (the last hour), to see
        where a run fell short of a rate.
        """
        return self._state().stats()

    def reset(self) -> None:
        """Clear the store, counters and rate windows."""
        self._state().reset()


def serve_forever(
    config: SandboxConfig, port: int, host: str = LOOPBACK_HOST, announce: Callable[[str], Any] = print
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C or SIGTERM).

    ``announce`` receives ``"sandbox listening on http://127.0.0.1:PORT"`` once the socket is bound.
    Raises InputError for a non-loopback host or a port that cannot be bound.
    """
    server = _make_server(config, port, host)
    bound_host, bound_port = server.server_address[:2]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        announce(f"{ANNOUNCE_PREFIX}http://{bound_host}:{bound_port}")
        sys.stdout.flush()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close_connections()
        server.server_close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
