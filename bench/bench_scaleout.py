"""Benchmark: scale-out as it runs in production (issue 17): two process workers, four overlapping partitions, one
shared budget, against a rate-limited sandbox. Not a test: the share of the budget used, and what must hold.

``uv run python bench/bench_scaleout.py [--per-file 1600] [--overlap 200] [--server-rate 10] [--per-minute 570]``

Starts a throwaway ``prefect server start``, a private PostgreSQL cluster (tests/services.py; the shared ledger,
whose token bucket is the budget), the sandbox in its own process allowing ``--server-rate`` requests per 1 s
window on the gateway path (20 ms latency), then ``deployments/setup.py --save-key --rate-per-minute N`` (the
budget, default 95 % of the server's limit as docs/scale-out.md recommends), ``prefect deploy --all`` and two
``prefect worker start --limit 2``. Four CSV files of ``--per-file`` contacts overlap by ``--overlap`` with the next
(the later copy with another first name); ``sync-partitions`` runs them with three children at once, 10 contacts
a request (so a small source makes many requests).

Figures: requests and 429s from the sandbox's counters; the rate the children achieved together, from the
sandbox's clock at the first and the last request: ``(requests - 1) / (last - first)``, as a share of the budget
(goal >= 90 %, and no 429: the server's windows were never passed); how many whole seconds of that clock saw
each number of requests, and which seconds (counted from the first) fell more than one request short of the
budget; every contact stored once, in the first file's
version; the unchanged re-run of the same partitions (goal: no request); which worker ran each child (the
server's ``prefect.worker.executed-flow-run`` events). Exit 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

FILES = 4
PARENT = "sync-partitions/sync-partitions"
GOAL_SHARE = 0.90
RUN_TIMEOUT = 900.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-file", type=int, default=1600, help="contacts per file")
    parser.add_argument("--overlap", type=int, default=200, help="contacts each file shares with the next")
    parser.add_argument("--server-rate", type=int, default=10, help="requests the sandbox allows per 1 s window")
    parser.add_argument("--per-minute", type=float, help="the shared budget (default 95 %% of the server's limit)")
    args = parser.parse_args(argv)
    per_minute = args.per_minute or round(args.server_rate * 60 * 0.95)
    figures = measure(args.per_file, args.overlap, args.server_rate, per_minute)
    print(json.dumps(figures, indent=2))
    return 1 if figures["problems"] else 0


def measure(per_file: int, overlap: int, server_rate: int, per_minute: float) -> dict:
    import psycopg
    from partition_files import write_overlapping
    from prefect_server import executed_by, prefect_cli, run_ok, running_server, start_run, stop_process, wait_final
    from services import PG_PASSWORD, postgres_cluster

    from apollo_sync.params import sync_params
    from apollo_sync.sandbox import SandboxConfig, SandboxProcess

    problems: list[str] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apollo-sync-bench-scaleout-")))
        pg = stack.enter_context(postgres_cluster())
        database = "ledger_" + uuid.uuid4().hex[:8]
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        state_url = f"postgresql://{pg.user}@{pg.host}:{pg.port}/{database}"  # the password stays in PGPASSWORD
        server = stack.enter_context(running_server())
        sandbox = stack.enter_context(SandboxProcess(SandboxConfig(rate=server_rate, window=1.0, latency=0.02)))
        env = server.env()
        run_ok([sys.executable, "deployments/setup.py", "--save-key", "--rate-per-minute", str(per_minute)],
               env | {"APOLLO_API_KEY": sandbox.config.api_key})  # fmt: skip
        run_ok(prefect_cli("--no-prompt", "deploy", "--all"), env)
        expected = write_overlapping(work / "parts", FILES, per_file, overlap)
        worker_env = env | {"APOLLO_SYNC_HOME": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1", "PGPASSWORD": PG_PASSWORD}
        for n in (1, 2):
            with (work / f"worker-{n}.log").open("wb") as log:
                worker = subprocess.Popen(
                    prefect_cli("worker", "start", "--pool", "apollo-sync", "--type", "process", "--limit", "2",
                                "--name", f"worker-{n}"),
                    env=worker_env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            stack.callback(stop_process, worker)

        def parameters(report: str) -> dict:
            settings = sync_params(source=str(work / "parts" / "*.csv"), base_url=sandbox.gateway_base_url,
                                   state_url=state_url, state_dir=str(work / "state"), report_dir=str(work / report),
                                   chunk_size=10, concurrency=4).as_json()  # fmt: skip
            return settings | {"partitions": {"max_in_flight": 3, "poll_seconds": 1.0}}

        started = time.monotonic()
        parent_id = asyncio.run(start_run(server, PARENT, parameters("report")))
        parent = asyncio.run(wait_final(server, parent_id, RUN_TIMEOUT, poll=1))
        parent_seconds = time.monotonic() - started
        stats = sandbox.stats()
        stored = Counter(c["email"] for c in sandbox.contacts())
        first_names = {c["email"]: c.get("first_name") for c in sandbox.contacts()}
        again_id = asyncio.run(start_run(server, PARENT, parameters("report-again")))
        again = asyncio.run(wait_final(server, again_id, RUN_TIMEOUT, poll=1))
        requests_again = sandbox.stats()["requests"] - stats["requests"]
        children = asyncio.run(_children(server, parent_id))
        ran_by = asyncio.run(executed_by(server, set(children)))

    budget_per_s = per_minute / 60
    span = (stats["last_request_at"] or 0) - (stats["first_request_at"] or 0)
    achieved = (stats["requests"] - 1) / span if span > 0 else 0.0
    share = achieved / budget_per_s
    rate_limited = stats["status_counts"].get("429", 0)
    # where the rate fell short: requests per whole second of the sandbox's clock (the first and last are partial)
    by_second = stats.get("requests_by_second") or []
    inner, start = by_second[1:-1], (by_second[0][0] if by_second else 0)
    per_second = dict(sorted(Counter(n for _, n in inner).items()))
    short_seconds = [[second - start, n] for second, n in inner if n < budget_per_s - 1]
    step = per_file - overlap
    shared = [f"person{i}@example.com" for k in range(1, FILES) for i in range(k * step, k * step + overlap)]
    if not parent.state.is_completed() or not again.state.is_completed():
        problems.append(f"parent runs ended {parent.state.name} and {again.state.name}")
    if share < GOAL_SHARE:
        problems.append(f"the children used {share:.1%} of the shared budget (goal >= {GOAL_SHARE:.0%})")
    if rate_limited:
        problems.append(f"{rate_limited} requests were answered 429")
    if set(stored) != expected or max(stored.values(), default=0) != 1:
        most = max(stored.values(), default=0)
        problems.append(f"{len(stored)} contacts stored ({len(expected)} expected), most copies of one: {most}")
    if {first_names.get(email, "?")[:1] for email in shared} != {"P"}:
        problems.append("a contact shared by two files was not sent in the first file's version")
    if requests_again:
        problems.append(f"the unchanged re-run sent {requests_again} requests")
    if set(ran_by.values()) != {"worker-1", "worker-2"}:
        problems.append(f"children ran on {sorted(set(ran_by.values()))} only")
    return {
        "partitions": FILES,
        "contacts": len(expected),
        "server_limit_per_s": server_rate,
        "budget_per_minute": per_minute,
        "requests": stats["requests"],
        "http_429": rate_limited,
        "sending_seconds": round(span, 2),
        "achieved_per_s": round(achieved, 2),
        "share_of_budget": round(share, 4),
        "seconds_by_requests_in_them": per_second,
        "short_seconds": short_seconds,
        "parent_seconds": round(parent_seconds, 1),
        "contacts_stored_once": len(stored) == len(expected) and max(stored.values(), default=0) == 1,
        "rerun_requests": requests_again,
        "children_by_worker": dict(Counter(ran_by.values())),
        "problems": problems,
    }


async def _children(server, parent_id: str) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async with server.client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return [str(run.id) for run in runs]


if __name__ == "__main__":
    sys.exit(main())
