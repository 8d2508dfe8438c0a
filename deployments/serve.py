"""Serve ``sync-contacts`` from this process: the alternative to a work pool and a worker.

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py --cron "0 2 * * *"

``flow.serve`` registers a deployment named ``sync-contacts-serve`` and runs its flow runs itself, in
subprocesses started from this clone; it polls every PREFECT_RUNNER_POLL_FREQUENCY seconds (10 by default).
Runs start from the UI or ``prefect deployment run 'sync-contacts/sync-contacts-serve' --param source=...``.
On SIGTERM or Ctrl-C it stops and pauses the deployment, so no run is scheduled for a server nobody serves.
Use prefect.yaml and a worker instead when runs must survive this process or run elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # `python deployments/serve.py` from a clone that is not installed
    sys.path.insert(0, str(PROJECT_ROOT))

DEPLOYMENT_NAME = "sync-contacts-serve"


def main(argv: list[str] | None = None) -> None:
    """Parse the options and serve until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument("--cron", help='schedule, e.g. "0 2 * * *" (default: no schedule, runs on demand only)')
    parser.add_argument("--timezone", default="UTC", help="timezone of the schedule (default: %(default)s)")
    parser.add_argument("--source", help="default source for scheduled runs")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once in this process (default: 1)")
    args = parser.parse_args(argv)

    from prefect.schedules import Cron

    from flows.sync_contacts import sync_contacts

    if args.cron and not args.source:
        parser.error("--cron needs --source: a scheduled run has nobody to ask for one")
    sync_contacts.serve(
        name=args.name,
        schedules=[Cron(args.cron, timezone=args.timezone)] if args.cron else None,
        parameters={"source": {"path": args.source}} if args.source else None,
        tags=["apollo-sync"],
        limit=args.limit,
    )


if __name__ == "__main__":
    main()
