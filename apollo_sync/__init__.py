"""apollo-sync: load contacts into Apollo through Bulk Create Contacts.

The plain modules in this package hold the logic and import no Prefect:

- ``settings``: endpoint paths, limits, defaults, field names (one place for constants).
- ``errors``: the typed errors and the exit code each maps to.
- ``sources``: read a file, glob, database or bucket into a polars LazyFrame.
- ``transform``: header mapping, cleaning, validation and in-source dedupe as polars expressions.
- ``client``: the Apollo Bulk Create client on httpx (both ways in, both error shapes).
- ``pacing``: one rate budget shared by every request of a run, driven by the rate headers.
- ``ledger``: what was confirmed in Apollo, per contact identity, so re-runs send only changes.
- ``loader``: chunks, concurrency, retries, bisection and reconciliation of responses to rows.
- ``report``: summary.json and the per-row results files.
- ``sandbox``: a real HTTP server that behaves like the endpoint, for the demo, tests and benchmarks.

``flows/`` and ``tasks/`` wrap these in Prefect; ``apollo_sync.cli`` is the command line.
"""

__version__ = "0.1.0"
