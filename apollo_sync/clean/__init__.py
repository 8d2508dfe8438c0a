"""The clean stage: exported rows -> contacts ready for Bulk Create, and what happened to every row.

:func:`prepare` is the fast engine (:mod:`apollo_sync.clean.engine`); :mod:`apollo_sync.clean.rules` states, in
plain Python, what it computes: the place to read what a clean, valid, deduplicated contact is. Header mapping
and the mapping file: :mod:`apollo_sync.clean.mapping`. Phones (the region from a row's country, which numbers are
sent): :mod:`apollo_sync.clean.phones`, over whole columns :mod:`apollo_sync.clean.numbering`. The JSON body and
the fingerprint: :mod:`apollo_sync.clean.payload`.
"""

from apollo_sync.clean.columns import CONTACT_COLUMNS
from apollo_sync.clean.engine import Prepared, identities, prepare
from apollo_sync.clean.mapping import Mapping, load_mapping
from apollo_sync.clean.options import EngineOptions
from apollo_sync.clean.parts import DONE_MARKER, prune_prepared, reopen_parts

__all__ = [
    "CONTACT_COLUMNS",
    "DONE_MARKER",
    "EngineOptions",
    "Mapping",
    "Prepared",
    "identities",
    "load_mapping",
    "prepare",
    "prune_prepared",
    "reopen_parts",
]
