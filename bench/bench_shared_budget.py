"""Benchmark: the shared rate budget with 1, 2 and 4 sender processes (issue 17). Not a test: figures and ratios.

``uv run python bench/bench_shared_budget.py [--seconds 20] [--senders 1,2,4] [--backend ledger,prefect]``

One sandbox process with a fixed gateway window (``--server-rate`` requests per 1 s window) and, per backend and
number of senders, that many sender processes started together. Each sender runs ``--concurrency`` tasks that,
for ``--seconds`` seconds, await the shared acquire and post one contact to Bulk Create; every request is
time-stamped when the acquire lets it go. The budget is ``--per-minute`` (default 95 % of the server's limit, the
margin docs/scale-out.md recommends):

- ``ledger``: the token bucket in a PostgreSQL ledger (``tasks.budget.ledger_budget``; a private cluster from
  tests/services.py on 127.0.0.1);
- ``prefect``: Prefect's global rate limit with slot decay (``tasks.budget.prefect_rate_limit``; a throwaway
  ``prefect server start``), the path without a PostgreSQL ledger. Both take their rate from the same Prefect
  limit, created as ``deployments/setup.py --rate-per-minute`` does.

Per run: requests a second between the first and the last request of all senders together, as a share of the
configured budget (goal >= 90 %), the most requests started in any 1 s and any 10 s span (sliding) against the
budget's ``ceil(T * per_second)`` (a request stamped a few microseconds early or late at a span's edge can add
one), and 429s from the sandbox's counters (goal 0). The machine is shared: read the shares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

KEY = "sandbox-key"
NAME = "apollo-sync-rate"
GOAL_SHARE = 0.90


# --- one sender process ---------------------------------------------------------------------------------------


async def send_for(args: argparse.Namespace) -> dict:
    import httpx

    from tasks.budget import ledger_budget, prefect_rate_limit

    acquire = ledger_budget(NAME, args.state_url) if args.backend == "ledger" else prefect_rate_limit(NAME)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    stamps: list[float] = []
    statuses: dict[str, int] = {}
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    end = args.start_at + args.seconds
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=30) as client:

        async def worker(n: int) -> None:
            i = 0
            while time.time() < end:
                await acquire()
                if time.time() >= end:
                    break
                stamps.append(time.time())
                body = json.dumps({"contacts": [{"email": f"s{os.getpid()}-{n}-{i}@example.com"}]})
                response = await client.post("/contacts/bulk_create", content=body)
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                i += 1

        await asyncio.gather(*(worker(n) for n in range(args.concurrency)))
    return {"stamps": stamps, "statuses": statuses}


# --- the benchmark --------------------------------------------------------------------------------------------


def max_in_span(stamps: list[float], span: float) -> int:
    """The most time stamps in any half-open span of ``span`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(stamps):
        while t - stamps[lo] >= span:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_senders(args, backend: str, senders: int, base_url: str, env: dict[str, str], state_url: str | None) -> dict:
    start_at = time.time() + 4.0 + 0.5 * senders  # every process imported and connected before the start
    outs = [Path(tempfile.mkstemp(suffix=".json")[1]) for _ in range(senders)]
    cmd = [sys.executable, __file__, "--sender", "--backend", backend, "--base-url", base_url, "--start-at", str(start_at),
           "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)]  # fmt: skip
    if state_url:
        cmd += ["--state-url", state_url]
    procs = [subprocess.Popen([*cmd, "--out", str(out)], env=env, cwd=ROOT) for out in outs]
    codes = [p.wait(timeout=args.seconds + 120) for p in procs]
    if any(codes):
        raise RuntimeError(f"a sender exited with {codes}")
    results = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink()
    stamps = sorted(t for r in results for t in r["stamps"])
    statuses: dict[str, int] = {}
    for r in results:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    per_second = args.per_minute / 60.0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "backend": backend,
        "senders": senders,
        "requests": len(stamps),
        "requests_per_second": round(rate, 2),
        "budget_per_second": round(per_second, 2),
        "share_of_budget": round(rate / per_second, 3),
        "max_in_1s": max_in_span(stamps, 1.0),
        "budget_ceiling_1s": math.ceil(per_second),
        "max_in_10s": max_in_span(stamps, 10.0),
        "budget_ceiling_10s": math.ceil(10 * per_second),
        "statuses": statuses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--senders", default="1,2,4")
    parser.add_argument("--backend", default="ledger,prefect")
    parser.add_argument("--server-rate", type=int, default=20, help="sandbox requests per 1 s window")
    parser.add_argument("--per-minute", type=float, default=None, help="the budget (default 95%% of the server's)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per sender")
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--state-url", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sender:
        args.backend = args.backend.split(",")[0]
        Path(args.out).write_text(json.dumps(asyncio.run(send_for(args))))
        return 0
    args.per_minute = args.per_minute or 0.95 * args.server_rate * 60
    return 0 if measure(args) else 1


def measure(args) -> bool:
    from contextlib import ExitStack

    from apollo_sync.sandbox import SandboxConfig, SandboxProcess

    backends = args.backend.split(",")
    rows = []
    with ExitStack() as stack:
        sandbox = stack.enter_context(SandboxProcess(SandboxConfig(rate=args.server_rate, window=1.0, shuffle=False)))
        env, state_url = dict(os.environ), None
        if backends:  # both take the rate from the Prefect limit
            from prefect_server import running_server

            server = stack.enter_context(running_server())
            env = server.env() | {"PGPASSWORD": os.environ.get("PGPASSWORD", "")}
            asyncio.run(create_limit(server, args.per_minute))
        if "ledger" in backends:
            from services import PG_PASSWORD, postgres_cluster

            pg = stack.enter_context(postgres_cluster())
            state_url = f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.database}"
            env["PGPASSWORD"] = PG_PASSWORD
        for backend in backends:
            for senders in (int(n) for n in args.senders.split(",")):
                before = sandbox.stats()["status_counts"].get("429", 0)
                url = state_url if backend == "ledger" else None  # one bucket row; idle (full) between runs
                row = run_senders(args, backend, senders, sandbox.gateway_base_url, env, url)
                row["server_429"] = sandbox.stats()["status_counts"].get("429", 0) - before
                rows.append(row)
                print(json.dumps(row), flush=True)
    ok = all(r["share_of_budget"] >= GOAL_SHARE and r["server_429"] == 0 for r in rows if r["backend"] == "ledger")
    print(f"\nbudget {args.per_minute:g}/min against a server allowing {args.server_rate}/s, {args.seconds:g} s per run, "
          f"{args.concurrency} in flight per sender")  # fmt: skip
    print("| backend | senders | requests | requests/s | share of budget | most in any 1 s (ceiling) "
          "| most in any 10 s (ceiling) | 429 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['senders']} | {r['requests']} | {r['requests_per_second']} | "
              f"{100 * r['share_of_budget']:.1f} % | {r['max_in_1s']} ({r['budget_ceiling_1s']}) | "
              f"{r['max_in_10s']} ({r['budget_ceiling_10s']}) | {r['server_429']} |")
    print(f"goal (ledger): >= {100 * GOAL_SHARE:.0f} % of the budget and no 429: {'met' if ok else 'MISSED'}")
    return ok


async def create_limit(server, per_minute: float) -> None:
    sys.path.insert(0, str(ROOT / "deployments"))
    from setup import ensure_rate_limit, rate_limit_for

    async with server.client() as client:
        await ensure_rate_limit(client, rate_limit_for(int(per_minute), NAME))


if __name__ == "__main__":
    sys.exit(main())
