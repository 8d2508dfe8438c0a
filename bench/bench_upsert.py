"""Benchmark: an upsert re-sync of a source in which 10 % of rows changed, against a plain loop that sends the whole
source through bulk_create again (issue 13). Not a test: figures and ratios.

``uv run python bench/bench_upsert.py [--rows 100000] [--repeat 2] [--json]``

One sandbox in a child process (20 ms latency, no rate limit). Set-up, not timed: a CSV of ``--rows`` contacts and
a first ``--mode upsert`` run that creates them all. Then, ``--repeat`` times, 10 % of the rows get a new title
(a different 10 % each round) and, in the same round:

- **apollo-sync**: ``run_sync`` in upsert mode (plain steps, no Prefect: read, clean, plan against the ledger,
  send, report), the same state directory as the set-up run;
- **plain loop**: read the same CSV with polars, build one JSON body per 100 rows, post every body to bulk_create
  with ``run_dedupe`` (what a script without a ledger does), 4 in flight, the same as apollo-sync's concurrency.

Reported per side: requests sent, wall seconds (best round), and how many of the changed titles Apollo shows
afterwards. The machine is shared: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import polars as pl

from apollo_sync.params import sync_params
from apollo_sync.sandbox import SandboxConfig, SandboxProcess
from apollo_sync.sync import run_sync

CONCURRENCY = 4
CHUNK = 100
CHANGED_SHARE = 10  # one row in this many changes each round


def source(n: int, round_: int) -> pl.DataFrame:
    """The source as it stands after ``round_`` rounds of edits (round 0: as first synced)."""
    i = pl.int_range(0, n, eager=True)
    title = pl.format("Title {}", pl.col("i"))
    for r in range(1, round_ + 1):
        title = pl.when(pl.col("i") % CHANGED_SHARE == r - 1).then(pl.format("Title {} (r{})", pl.col("i"), pl.lit(r))).otherwise(title)
    return pl.DataFrame({"i": i}).select(
        email=pl.format("bench{}@example.com", "i"),
        **{"first name": pl.format("First{}", "i"), "last name": pl.format("Last{}", "i")},
        company=pl.format("Org {}", pl.col("i") % 97),
        title=title,
    )


async def plain_loop(base_url: str, key: str, csv_path: Path) -> int:
    """Send every row of the CSV through bulk_create with dedupe; returns the requests made."""
    frame = pl.read_csv(csv_path)
    payloads = [
        json.dumps({"email": e, "first_name": f, "last_name": l, "organization_name": c, "title": t})
        for e, f, l, c, t in frame.iter_rows()
    ]
    bodies = [
        ('{"contacts":[' + ",".join(payloads[i : i + CHUNK]) + '],"run_dedupe":true}').encode()
        for i in range(0, len(payloads), CHUNK)
    ]
    limit = asyncio.Semaphore(CONCURRENCY)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30.0) as client:

        async def post(body: bytes) -> None:
            async with limit:
                (await client.post("/contacts/bulk_create", content=body)).raise_for_status()

        await asyncio.gather(*(post(body) for body in bodies))
    return len(bodies)


def landed(sandbox: SandboxProcess, frame: pl.DataFrame, round_: int) -> int:
    """How many of this round's changed titles Apollo now shows."""
    stored = {c["email"]: c["title"] for c in sandbox.contacts()}
    changed = frame.filter(pl.col("title").str.ends_with(f"(r{round_})"))
    return sum(stored.get(email) == title for email, title in changed.select("email", "title").iter_rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apollo-sync-bench-upsert-"))
    csv_path = work / "contacts.csv"
    config = SandboxConfig(latency=0.02, seed=1)
    figures: dict[str, list] = {"sync_seconds": [], "sync_requests": [], "sync_landed": [], "sync_updated": [],
                                "plain_seconds": [], "plain_requests": [], "plain_landed": []}  # fmt: skip
    with SandboxProcess(config) as sandbox:
        os.environ["APOLLO_API_KEY"] = config.api_key
        params = sync_params(source=str(csv_path), base_url=sandbox.gateway_base_url, state_dir=str(work / "state"),
                             mode="upsert", concurrency=CONCURRENCY)  # fmt: skip
        source(args.rows, 0).write_csv(csv_path)
        started = time.perf_counter()
        first = asyncio.run(run_sync(params))
        setup = time.perf_counter() - started
        print(f"set-up: {first['created']:,} created in {setup:.1f} s", file=sys.stderr)
        for round_ in range(1, args.repeat + 1):
            frame = source(args.rows, round_)
            frame.write_csv(csv_path)
            before = sandbox.stats()["requests"]
            started = time.perf_counter()
            summary = asyncio.run(run_sync(params))
            figures["sync_seconds"].append(time.perf_counter() - started)
            figures["sync_requests"].append(sandbox.stats()["requests"] - before)
            figures["sync_updated"].append(summary["updated"])
            figures["sync_landed"].append(landed(sandbox, frame, round_))
            # the plain loop sends the next round's edits, so its "landed" counts what bulk_create changed
            frame = source(args.rows, round_ + args.repeat)
            frame.write_csv(csv_path)
            started = time.perf_counter()
            figures["plain_requests"].append(asyncio.run(plain_loop(sandbox.gateway_base_url, config.api_key, csv_path)))
            figures["plain_seconds"].append(time.perf_counter() - started)
            figures["plain_landed"].append(landed(sandbox, frame, round_ + args.repeat))
    changed = args.rows // CHANGED_SHARE
    result = {"rows": args.rows, "changed_per_round": changed, **figures,
              "seconds_ratio": min(figures["sync_seconds"]) / min(figures["plain_seconds"]),
              "load_average": os.getloadavg()}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.rows:,} rows, {changed:,} changed per round, best of {args.repeat} rounds")
    print("| | requests | wall s (best) | changed titles Apollo shows |")
    print("|---|---:|---:|---:|")
    print(f"| apollo-sync `--mode upsert` | {max(figures['sync_requests']):,} | {min(figures['sync_seconds']):.1f} | "
          f"{min(figures['sync_landed']):,} of {changed:,} |")  # fmt: skip
    print(f"| plain loop, all rows to bulk_create | {max(figures['plain_requests']):,} | "
          f"{min(figures['plain_seconds']):.1f} | {max(figures['plain_landed']):,} of {changed:,} |")  # fmt: skip
    print(f"time ratio (apollo-sync / plain loop): {result['seconds_ratio']:.2f}x; per round: "
          f"{[round(s, 1) for s in figures['sync_seconds']]} vs {[round(s, 1) for s in figures['plain_seconds']]}")  # fmt: skip


if __name__ == "__main__":
    main()
