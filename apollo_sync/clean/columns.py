"""Column names of the clean stage: the columns prepare() returns, and the few hidden working columns.

Every column the engine adds for its own use is named here, with what it carries and between which steps, so
that no other module spells a hidden name. They never reach a result frame.
"""

from __future__ import annotations

from apollo_sync import settings
from apollo_sync.clean.mapping import MAPPABLE_FIELDS

SOURCE_ROW = settings.SOURCE_ROW
"""1-based record number in the source (given, or numbered by prepare())."""

TEXT_FIELDS = tuple(f for f in MAPPABLE_FIELDS if f not in ("label_names", "website_url", "linkedin_url", "email"))
"""Apollo fields cleaned as plain text (phones are cleaned as text before they become E.164)."""

CONTACT_COLUMNS = (SOURCE_ROW, "identity", "fingerprint", *MAPPABLE_FIELDS)
"""First columns of ``Prepared.contacts``: the Apollo fields as cleaned; a ``custom.<id>`` column per custom field
follows (sorted by name). :func:`apollo_sync.clean.payload.with_payload` turns them into the JSON Bulk Create gets."""

# --- Hidden columns: inside one batch's cleaning (apollo_sync.clean.batch) ------------------

PHONE_TEXT = "_raw_"
"""Prefix: ``_raw_<phone field>`` is a phone's text before E.164 (only trimmed for a single column without a
constant). Made by the first pass, read by the North American fast path of the second; then split off the frame
and handed to the per-value step as Series."""

SPARSE_TEXT = "_sparse_"
"""Prefix: ``_sparse_linkedin_url`` is a mostly empty LinkedIn column as read, which the second pass builds on its
values only (see :func:`apollo_sync.clean.frames.on_values`); it replaces itself by ``linkedin_url``."""

EMAIL_FAST = "_email_fast"
"""True where the email is certainly valid (:func:`apollo_sync.clean.expressions.email_fast_valid`): computed in the
second pass alongside the phones, then split off the frame as a Series."""

# --- Hidden columns: the dedupe (apollo_sync.clean.dedupe) -----------------------------------

KEY_HASH = "h"
"""Identity keys: the 64-bit hash of a row's identity."""
KEY_POSITION = "p"
"""Identity keys: the row's position among all rows read (0-based, in frame order)."""
POSITION = "_pos"
"""Candidate rows (whose identity hash repeats) and groups: position among all rows read."""
GROUP = "_g"
"""Candidate rows: the group (one identity) a row belongs to."""
GROUP_ROWS = "_rows"
"""Groups: the source_row of each member, survivor first."""
