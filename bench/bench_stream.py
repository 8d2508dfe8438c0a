"""Benchmark: real (sending) syncs that stream, memory against source size, and the first request (issue 16).

``uv run python bench/bench_stream.py [--rows 1000000 2000000] [--repeat 1] [--concurrency 8]`` writes a CSV of N
unique contacts (Email, First Name, Last Name, Company, Title, Phone) per size, starts a lean sandbox in a child
process (``keep_contacts=False``: ids under emails only, so ten million contacts fit; no latency, no rate limit)
and runs one real ``sync-contacts`` flow run per size in a fresh child process (ephemeral Prefect, home in
bench/out/prefect-home, a fresh state dir: the SQLite ledger starts empty). For each run it reports:

- ``peak_rss_bytes``: VmHWM of that child (the flow, its cleaning threads, the ledger; the sandbox and Prefect's
  temporary API server are other processes);
- ``seconds``: the flow run's wall time; ``first_request_seconds``: when the first request went, counted from
  the start of the run inside the flow (``summary.json``); ``first_request_at_sandbox_s``:
  when the first request reached the sandbox (its clock), counted from the run's ``started_at``: the figure the
  goal is held to; and ``first_request_from_call_s``: the same from the call of ``sync_contacts`` in a fresh
  process (Prefect's temporary API server starts first: seconds of start-up, see bench_prefect_startup.py);
- every contact landed once: the sandbox's ``created`` equals the rows, ``created_again`` is 0, and the summary
  says ``created`` = rows with nothing failed or unconfirmed.

Goals (issue 16): the 2M run's peak within 1.25x the 1M run's and under 1.5 GiB; the first request within 3 s on
1M rows. ``--rows 10000000`` gives the 10M figure (goal: peak <= 1.5 GiB). Exits 1 when a goal or a count fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
KEY = "sandbox-key"
GIB = 1024**3
GOAL_RSS_BYTES = 1.5 * GIB
GOAL_RSS_RATIO = 1.25
GOAL_FIRST_REQUEST_S = 3.0

_CHILD = """
import asyncio, json, os, sys, time
sys.path.insert(0, {root!r})
from apollo_sync.params import flow_parameters, sync_params
from flows.sync_contacts import sync_contacts
params = sync_params(source={csv!r}, base_url={base!r}, state_dir={state!r}, report_dir={report!r},
                     api_key_block=None, concurrency={concurrency})
called_at = time.time()
summary = asyncio.run(sync_contacts(**flow_parameters(params)))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
with open(os.environ["BENCH_FIGURES"], "w") as out:
    json.dump({{"summary": summary, "peak_rss_bytes": int(hwm) * 1024, "called_at": called_at}}, out)
"""


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def write_contacts(rows: int, path: Path) -> Path:
    """``rows`` unique contacts as a CRM-style CSV, written a million rows at a time."""
    import polars as pl

    with path.open("wb") as out:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            idx = pl.int_range(start + 1, start + n + 1, eager=True, dtype=pl.Int64).alias("i")
            frame = idx.to_frame().select(
                pl.format("person{}@example.com", "i").alias("Email"),
                pl.format("First{}", "i").alias("First Name"),
                pl.format("Last{}", "i").alias("Last Name"),
                pl.format("Company {}", pl.col("i") % 5003).alias("Company"),
                pl.lit("Analyst").alias("Title"),
                pl.format("+1 415 555 {}", (pl.col("i") % 10_000).cast(pl.String).str.zfill(4)).alias("Phone"),
            )
            frame.write_csv(out, include_header=start == 0)
    return path


def run_one(csv: Path, rows: int, base: str, work: Path, concurrency: int) -> dict:
    from bench_flow import prefect_home

    state = work / f"state-{rows}"
    figures = work / f"figures-{rows}.json"
    script = _CHILD.format(root=str(ROOT), csv=str(csv), base=base, state=str(state), report=str(state / "report"),
                           concurrency=concurrency)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "APOLLO_"))}
    env |= {"PREFECT_HOME": str(prefect_home()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_TASKS_REFRESH_CACHE": "true", "APOLLO_API_KEY": KEY, "BENCH_FIGURES": str(figures),
            "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=ROOT)
    return json.loads(figures.read_text())


def run(sizes: list[int], concurrency: int = 8) -> dict:
    from apollo_sync.sandbox import SandboxConfig, SandboxProcess

    OUT.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="apollo-sync-bench-stream-") as tmp:
        work = Path(tmp)
        with SandboxProcess(SandboxConfig(api_key=KEY, keep_contacts=False)) as sb:
            for rows in sizes:
                csv = write_contacts(rows, work / f"contacts-{rows}.csv")
                sb.reset()
                figures = run_one(csv, rows, sb.gateway_base_url, work, concurrency)
                csv.unlink()
                summary, stats = figures["summary"], sb.stats()
                landed_once = (stats["created"] == rows and stats["created_again"] == 0 and summary["created"] == rows
                               and summary["failed"] == 0 and summary["unconfirmed"] == 0)  # fmt: skip
                if not landed_once:
                    problems.append(f"{rows:,} rows: sandbox created {stats['created']:,} (again {stats['created_again']}),"
                                    f" summary created {summary['created']:,}, failed {summary['failed']}")  # fmt: skip
                results[str(rows)] = {
                    "rows": rows,
                    "peak_rss_mib": round(figures["peak_rss_bytes"] / 2**20),
                    "seconds": summary["seconds"],
                    "first_request_seconds": summary["first_request_seconds"],
                    # when the first request reached the sandbox (its clock, this machine's), from the run's start
                    # inside the flow run and from the call of sync_contacts (Prefect's API server start included)
                    "first_request_at_sandbox_s": round(stats["first_request_at"] - _epoch(summary["started_at"]), 3),
                    "first_request_from_call_s": round(stats["first_request_at"] - figures["called_at"], 3),
                    "requests": summary["requests"],
                    "contacts_per_s": round(rows / summary["seconds"]),
                    "landed_once": landed_once,
                }
                print(json.dumps(results[str(rows)]), flush=True)
    peaks = {int(k): v["peak_rss_mib"] * 2**20 for k, v in results.items()}
    for rows, peak in peaks.items():
        if peak > GOAL_RSS_BYTES:
            problems.append(f"{rows:,} rows: peak RSS {peak / GIB:.2f} GiB > 1.5 GiB")
    if 1_000_000 in peaks and 2_000_000 in peaks and peaks[2_000_000] > GOAL_RSS_RATIO * peaks[1_000_000]:
        problems.append(f"2M peak is {peaks[2_000_000] / peaks[1_000_000]:.2f}x the 1M peak (goal <= 1.25x)")
    first = results.get("1000000", {}).get("first_request_at_sandbox_s")
    if first is not None and first > GOAL_FIRST_REQUEST_S:
        problems.append(f"first request {first:.2f}s after the start on 1M rows (goal <= 3 s)")
    return {"runs": results, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    figures = run(args.rows, args.concurrency)
    print(json.dumps(figures, indent=2))
    sys.exit(1 if figures["problems"] else 0)


if __name__ == "__main__":
    main()
