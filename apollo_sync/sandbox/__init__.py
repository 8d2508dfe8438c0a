"""A real HTTP server on 127.0.0.1 that behaves like Apollo's Bulk Create and Bulk Update Contacts endpoints.

It serves the demo, the tests and the benchmarks: real sockets, real headers, real faults, so the
production client never needs test switches. Both ways in are served from one port, ``<prefix>`` being
``/apis/v1/apollo`` for the AISA gateway (``Authorization: Bearer <key>``, ``{"error": {...}}`` error bodies,
``X-RateLimit-*`` headers) or ``/api/v1`` for Apollo direct (``X-Api-Key: <key>`` or Bearer,
``{"status": ..., "message": ...}`` error bodies, ``x-rate-limit-minute`` / ``x-minute-requests-left`` ...):

- ``POST <prefix>/contacts/bulk_create``: up to 100 contacts, stored or (``run_dedupe``) matched.
- ``POST <prefix>/contacts/bulk_update``: up to 1,000 contacts changed by id; 100 or fewer (not ``async``) are
  answered with the updated contacts, larger ones with ``{"contacts": [], "async": true, ...}``.
- ``PATCH <prefix>/contacts/{id}``: one contact changed; 404 for an unknown id.

Contacts live in memory. ``run_dedupe`` matches by case-insensitive email, or for a contact without
email by first name + last name + organization (all three present); a match comes back in
``existing_contacts`` unchanged. An update replaces each field given, blanks one given as ``""`` or null, replaces
``label_names`` whole, and moves the dedupe indexes when an email or name changes. Rate limits are fixed windows
aligned to multiples of their length since the epoch (plus ``phase`` seconds; ``sliding=True`` counts the last
``window`` seconds instead), counted per API key, one budget for creates and updates.
Faults (drop, 503, burst 429, slow, 500 after store) are drawn per request from one seeded ``random.Random``.

Every request must name a loopback host (``Host: 127.0.0.1``, ``localhost`` or ``[::1]``, any port), else it gets a
421 before anything else: a web page cannot reach the sandbox through DNS rebinding. The key it accepts comes from
``--api-key``, else ``APOLLO_SANDBOX_KEY``, else ``sandbox-key``; :class:`SandboxProcess` passes it by environment,
never on the command line.

Admin endpoints (no auth, loopback only, outside the counters): ``GET /_sandbox/contacts``,
``POST /_sandbox/contacts`` (seed contacts that exist before a sync), ``GET /_sandbox/stats``,
``POST /_sandbox/reset``.

Use :class:`SandboxServer` (in-process thread; ``clock=`` takes a fake clock for tests of rate windows) or
:class:`SandboxProcess` (child process, same API), or run ``python -m apollo_sync.sandbox --port 8765 --rate 60``.

Modules: :mod:`.state` (config, store, windows, faults, counters: no HTTP), :mod:`.endpoint` (the routes and the
pipeline every request runs through, Bulk Create's body, the admin routes), :mod:`.update` (Bulk Update's and
PATCH's bodies), :mod:`.wire` (replies, error shapes, field checks), :mod:`.server` (sockets, the in-process
server, ``serve_forever``), :mod:`.process` (the child process and the command line). The package imports the
standard library only, so the child process starts fast.
"""

from apollo_sync.sandbox.process import SandboxProcess, config_to_argv
from apollo_sync.sandbox.server import ANNOUNCE_PREFIX, SandboxServer, serve_forever
from apollo_sync.sandbox.state import SandboxConfig

__all__ = ["ANNOUNCE_PREFIX", "SandboxConfig", "SandboxProcess", "SandboxServer", "config_to_argv", "serve_forever"]
