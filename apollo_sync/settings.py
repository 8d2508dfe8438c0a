"""Constants in one place: endpoints, limits, defaults, names."""

from __future__ import annotations

# --- The endpoint, both ways in -------------------------------------------------------------
GATEWAY_BASE_URL = "https://api.aisa.one/apis/v1/apollo"
"""The AISA gateway (default). Auth ``Authorization: Bearer <key>``; writes land in a shared workspace."""
APOLLO_BASE_URL = "https://api.apollo.io/api/v1"
"""Apollo direct. Auth ``X-Api-Key: <key>``."""
BULK_CREATE_PATH = "/contacts/bulk_create"
GATEWAY_PATH_PREFIX = "/apis/v1/apollo"
APOLLO_PATH_PREFIX = "/api/v1"

MAX_CONTACTS_PER_REQUEST = 100
BULK_UPDATE_PATH = "/contacts/bulk_update"
"""Bulk Update Contacts: ``contact_attributes`` (each with ``id``) and/or ``contact_ids`` + shared fields."""
CONTACT_PATH = "/contacts/{contact_id}"
"""One contact: ``PATCH`` updates it."""
MAX_CONTACTS_PER_UPDATE = 1000
"""Bulk Update refuses more (a 422)."""
MAX_SYNC_UPDATE = 100
"""Bulk Update answers requests of at most this many with the updated contacts; larger ones run asynchronously
and their answer lists none, so apollo-sync never sends more than this in one update."""

# --- Defaults -------------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 100
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_STATE_DIR = ".apollo-sync"
DEFAULT_PHONE_REGION = "US"
DEFAULT_SECRET_BLOCK = "apollo-api-key"
CLAIM_LEASE_SECONDS = 300.0
"""A pending claim whose run sent no heartbeat for this long belongs to a dead run: another run may take it over."""
HEARTBEAT_SECONDS = 30.0
"""How often a loading run renews its claims' lease (must be well under CLAIM_LEASE_SECONDS)."""
RUN_RETENTION_SECONDS = 7 * 86400.0
"""``sync_runs`` rows (and a parent run's partition losers) with no heartbeat for this long are pruned by the next
``sync-partitions`` run: finished runs, or runs that died (their claims expired long before)."""
CHUNKS_PER_LOAD_TASK = 100
"""Chunks handled by one Prefect task run: keeps task runs bounded (1M contacts -> 100 task runs; fewer group
boundaries, where in-flight requests drain, measured 0.77x -> 0.80-0.87x of a plain loop at 30k)."""
RECORD_SECONDS = 0.1
"""The load session writes Apollo's answers to the ledger at most this often (one transaction, in a thread beside
the requests): a killed run loses at most this much of them, and those rows (still pending) go again with dedupe."""

# --- Environment ----------------------------------------------------------------------------
ENV_API_KEY = "APOLLO_API_KEY"
ENV_BASE_URL = "APOLLO_BASE_URL"

# --- Rate-limit headers ---------------------------------------------------------------------
APOLLO_WINDOWS = {"minute": 60.0, "hourly": 3600.0, "daily": 86400.0}
"""Apollo direct reports ``x-rate-limit-<window>`` and ``x-<window>-requests-left`` per window."""
GATEWAY_LIMIT_HEADER = "X-RateLimit-Limit"
GATEWAY_REMAINING_HEADER = "X-RateLimit-Remaining"
GATEWAY_RESET_HEADER = "X-RateLimit-Reset"
RETRY_AFTER_HEADER = "Retry-After"

# --- Contacts -------------------------------------------------------------------------------
CONTACT_FIELDS = (
    "first_name",
    "last_name",
    "email",
    "title",
    "organization_name",
    "account_id",
    "owner_id",
    "website_url",
    "linkedin_url",
    "label_names",
    "contact_stage_id",
    "present_raw_address",
    "direct_phone",
    "corporate_phone",
    "mobile_phone",
    "home_phone",
    "other_phone",
    "typed_custom_fields",
)
PHONE_FIELDS = ("direct_phone", "corporate_phone", "mobile_phone", "home_phone", "other_phone")

# --- Outcomes: every input row ends in exactly one ------------------------------------------
OUTCOMES = ("created", "existing", "updated", "rejected", "duplicate", "failed", "unconfirmed", "unchanged")
REJECT_INVALID_EMAIL = "invalid_email"
REJECT_MISSING_IDENTITY = "missing_identity"

SOURCE_ROW = "source_row"
"""Column carried from extraction to the results file: 1-based record number in the source."""

# --- Appended: source limits and the sandbox key (issue 14) ---------------------------------
JSON_ARRAY_MAX_BYTES = 100_000_000
"""Largest ``.json`` array file read (100 MB). polars parses a JSON array whole, peaking near ten times the file's
size (a 61 MB array of contacts: 610 MB); NDJSON, one object per line, is scanned in a stream whatever its size,
so a larger array is refused with the advice to convert it."""
ENV_SANDBOX_KEY = "APOLLO_SANDBOX_KEY"
"""The key the sandbox command line (``python -m apollo_sync.sandbox``) expects when no ``--api-key`` is given; how
:class:`~apollo_sync.sandbox.SandboxProcess` hands the key to its child, so it never shows in ``ps``."""

# --- Appended: phones that exist, and a bounded cell (issue 14) -----------------------------
PHONE_INVALID = "invalid"
"""A phone dropped because phonenumbers reads a number that it does not hold valid (a length or a range that its
metadata gives no number of the country: ``+1 032 351 1114``)."""
PHONE_UNPARSEABLE = "unparseable"
"""A phone dropped because phonenumbers cannot read a number from its text (no digits, too few or too many, an
unknown country calling code)."""
PHONE_DROP_REASONS = (PHONE_INVALID, PHONE_UNPARSEABLE)
MAX_CELL_BYTES = 10_000
"""Longest cell (UTF-8 bytes, as read) of a column that feeds a contact field. No Apollo field needs more (names,
titles and URLs run to a few hundred characters); a longer cell is nearly always a broken quote that swallowed
the rows after it, so its row is rejected (:data:`REJECT_TOO_LARGE`) rather than sent."""
REJECT_TOO_LARGE = "too_large"
MAX_REQUEST_BYTES = 4_000_000
"""Largest request body apollo-sync sends (4 MB). A chunk whose contacts would make a larger body is split in halves
before anything is sent; with cells bounded by :data:`MAX_CELL_BYTES` a single contact stays far below it, and a
contact that does not is failed with the reason, never sent."""
