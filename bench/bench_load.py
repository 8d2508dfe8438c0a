"""Benchmark: the loader against the sandbox (issue 4). Not a test: figures, ratios and whether goals are met.

``uv run python bench/bench_load.py [--quick] [--part NAME]`` runs these parts and prints one JSON object:

- ``rate_limited``: a sandbox with a fixed gateway window (``rate`` per ``window`` s, in-process). The loader
  sends one-contact chunks with 4 in flight; requests are time-stamped as the pacer lets them go, counted per server window
  (windows are aligned to multiples of their length), and the full windows in the middle of the run give the
  achieved requests per window against the allowed. Goal: >= 95 % of the allowed rate, 429s <= 1 % of requests.
- ``rate_limited_apollo`` (full run only): the same through Apollo's ``x-minute-*`` headers, 40 a minute for about
  four minutes; the pacer has no reset header there: its first guess is clock-aligned minutes, probed at each
  reset until the server confirms one.
- ``throughput``: an unlimited sandbox in a child process with 20 ms latency. The loader (ledger on, and off)
  against a plain asyncio + httpx loop posting the same bodies at the same concurrency, in the same run,
  alternating, best of ``repeats``. Goal: loader >= 0.8x the plain loop's contacts/s.
- ``ledger_plan``: ``Ledger.plan`` on N identities of which half are confirmed (seconds, rows/s).

``run(quick: bool) -> dict`` does the same for bench/run.py. The machine is shared: read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections import Counter

import httpx
import polars as pl

from apollo_sync.ledger import open_ledger, target_for
from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, Pacer
from apollo_sync.sandbox import SandboxConfig, SandboxProcess, SandboxServer

KEY = "sandbox-key"
GOAL_RATE_SHARE = 0.95
GOAL_429_SHARE = 0.01
GOAL_THROUGHPUT_RATIO = 0.8


def contacts(n: int, start: int = 1) -> pl.DataFrame:
    """``n`` contacts with the columns prepare() gives (payload JSON, identity, fingerprint, ...)."""
    idx = pl.int_range(start, start + n, eager=True, dtype=pl.Int64)
    frame = pl.DataFrame({"source_row": idx}).with_columns(
        email=pl.format("bench{}@example.com", "source_row"),
        first_name=pl.format("First{}", "source_row"),
        last_name=pl.format("Last{}", "source_row"),
        organization_name=pl.format("Org{}", pl.col("source_row") % 97),
    )
    frame = frame.with_columns(
        payload=pl.concat_str(
            pl.lit('{"email":"'), "email", pl.lit('","first_name":"'), "first_name", pl.lit('","last_name":"'),
            "last_name", pl.lit('","organization_name":"'), "organization_name", pl.lit('","title":"Analyst"}'),
        ),
        identity=pl.format("email:{}", "email"),
    )
    return frame.with_columns(fingerprint=pl.col("payload").hash().cast(pl.String))


# --- (a) pacing against a rate-limited sandbox --------------------------------------------------------------------


class _StampingPacer(Pacer):
    """A pacer that notes the wall time each request is let go (for counting requests per server window)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[float] = []

    async def acquire(self):  # type: ignore[override]
        ticket = await super().acquire()
        self.sent.append(time.time())
        return ticket


async def _paced_run(base_url: str, n_requests: int, concurrency: int) -> list[float]:
    pacer = _StampingPacer()
    async with ApolloClient(base_url, KEY, timeout=10.0) as client:
        config = LoadConfig("bench", chunk_size=1, concurrency=concurrency, run_dedupe=True)
        session = LoadSession(client, pacer, None, config)
        await session.load(session.make_chunks(contacts(n_requests)))
    return pacer.sent


def bench_rate_limited(quick: bool, way: str = "gateway") -> dict:
    """Achieved requests per window vs allowed, and the 429 share.

    ``way="gateway"``: a 1 s window told by ``X-RateLimit-Reset``. ``way="apollo"``: Apollo's minute window
    (no reset header; the pacer first guesses clock-aligned minutes), 3 to 4 minutes long.
    """
    if way == "apollo":
        rate, window, windows = 40, 60.0, 4
    else:
        rate, window, windows = (20, 1.0, 8) if quick else (50, 1.0, 30)
    concurrency = 4
    with SandboxServer(SandboxConfig(api_key=KEY, rate=rate, window=window, latency=0.005)) as sb:
        base_url = sb.apollo_base_url if way == "apollo" else sb.gateway_base_url
        t0 = time.perf_counter()
        sent = asyncio.run(_paced_run(base_url, rate * windows, concurrency))
        elapsed = time.perf_counter() - t0
        stats = sb.stats()
    per_window = Counter(math.floor(t / window) for t in sent)
    indexes = sorted(per_window)
    full = [per_window[i] for i in indexes[1:-1]]  # the first and last windows are partial
    achieved = sum(full) / len(full) if full else float("nan")
    http_429 = stats["status_counts"].get("429", 0)
    return {
        "way": way,
        "allowed_per_window": rate,
        "window_seconds": window,
        "requests": stats["requests"],
        "full_windows": len(full),
        "achieved_per_window": round(achieved, 2),
        "min_per_window": min(full) if full else None,
        "max_per_window": max(full) if full else None,
        "rate_share": round(achieved / rate, 4),
        "http_429": http_429,
        "share_429": round(http_429 / max(1, stats["requests"]), 4),
        "elapsed_s": round(elapsed, 2),
        "goal_met": achieved / rate >= GOAL_RATE_SHARE and http_429 / max(1, stats["requests"]) <= GOAL_429_SHARE,
    }


# --- (b) throughput against an unlimited sandbox ------------------------------------------------------------------


async def _plain_loop(base_url: str, frame: pl.DataFrame, concurrency: int, chunk_size: int) -> int:
    """The reference: post pre-built bodies with an asyncio.Semaphore, parse each answer."""
    payloads = frame["payload"].to_list()
    bodies = [
        ('{"contacts":[' + ",".join(payloads[i : i + chunk_size]) + '],"run_dedupe":true}').encode()
        for i in range(0, len(payloads), chunk_size)
    ]
    limit = asyncio.Semaphore(concurrency)
    landed = 0
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30.0) as client:

        async def post(body: bytes) -> None:
            nonlocal landed
            async with limit:
                response = await client.post("/contacts/bulk_create", content=body)
                response.raise_for_status()
                data = response.json()
                landed += len(data["created_contacts"]) + len(data["existing_contacts"])

        await asyncio.gather(*(post(b) for b in bodies))
    return landed


async def _loader(base_url: str, frame: pl.DataFrame, concurrency: int, chunk_size: int, state_dir: str | None) -> int:
    ledger = open_ledger(state_dir) if state_dir else None
    target = target_for(base_url)
    try:
        to_send = ledger.plan(target, frame)[0] if ledger else frame
        async with ApolloClient(base_url, KEY, timeout=30.0) as client:
            config = LoadConfig(target, run_id="bench", concurrency=concurrency, chunk_size=chunk_size)
            session = LoadSession(client, Pacer(), ledger, config)
            result = await session.load(session.make_chunks(to_send))
        return int(result.outcomes["outcome"].is_in(["created", "existing"]).sum())
    finally:
        if ledger:
            ledger.close()


def bench_throughput(quick: bool) -> dict:
    """Contacts/s of the loader (with and without ledger) vs a plain asyncio+httpx loop, same concurrency."""
    n, repeats = (20_000, 2) if quick else (100_000, 3)
    concurrency, chunk_size = 4, 100
    frame = contacts(n)
    best: dict[str, float] = {}
    with SandboxProcess(SandboxConfig(api_key=KEY, latency=0.02)) as sb:
        base = sb.gateway_base_url
        for _ in range(repeats):
            for name in ("plain", "loader", "loader_ledger"):
                sb.reset()
                with tempfile.TemporaryDirectory(prefix="apollo-sync-bench-") as state:
                    t0 = time.perf_counter()
                    if name == "plain":
                        landed = asyncio.run(_plain_loop(base, frame, concurrency, chunk_size))
                    else:
                        landed = asyncio.run(
                            _loader(base, frame, concurrency, chunk_size, state if name == "loader_ledger" else None)
                        )
                    seconds = time.perf_counter() - t0
                if landed != n:
                    raise RuntimeError(f"{name}: {landed} of {n} contacts landed")
                best[name] = max(best.get(name, 0.0), n / seconds)
    ratio = best["loader_ledger"] / best["plain"]
    return {
        "contacts": n,
        "concurrency": concurrency,
        "chunk_size": chunk_size,
        "latency_ms": 20,
        "contacts_per_s": {k: round(v) for k, v in best.items()},
        "ratio_loader_ledger_vs_plain": round(ratio, 3),
        "ratio_loader_no_ledger_vs_plain": round(best["loader"] / best["plain"], 3),
        "goal_met": ratio >= GOAL_THROUGHPUT_RATIO,
    }


# --- (c) ledger planning ------------------------------------------------------------------------------------------


def bench_ledger_plan(quick: bool) -> dict:
    """Seconds for plan() over N identities, half of them confirmed in the ledger."""
    n = 200_000 if quick else 1_000_000
    frame = contacts(n)
    with tempfile.TemporaryDirectory(prefix="apollo-sync-bench-") as state:
        with open_ledger(state) as ledger:
            half = frame.filter(pl.col("source_row") % 2 == 0)
            t0 = time.perf_counter()
            ledger.mark_pending("bench", half, "r")
            ledger.record("bench", half.with_columns(outcome=pl.lit("created"), apollo_id=pl.lit("x")), "r")
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            to_send, unchanged = ledger.plan("bench", frame)
            plan_s = time.perf_counter() - t0
    assert unchanged.height == n // 2 and to_send.height == n - n // 2
    return {"rows": n, "plan_s": round(plan_s, 2), "rows_per_s": round(n / plan_s), "write_half_s": round(write_s, 2)}


def run(quick: bool) -> dict:
    """All three parts; ``goal_met`` is the and of the parts' goals."""
    out = {
        "rate_limited": bench_rate_limited(quick),
        **({} if quick else {"rate_limited_apollo": bench_rate_limited(quick, "apollo")}),
        "throughput": bench_throughput(quick),
        "ledger_plan": bench_ledger_plan(quick),
    }
    out["goal_met"] = all(part.get("goal_met", True) for part in out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument("--part", choices=("rate_limited", "rate_limited_apollo", "throughput", "ledger_plan"),
                        help="run one part only")
    args = parser.parse_args()
    if args.part == "rate_limited_apollo":
        result = {args.part: bench_rate_limited(args.quick, "apollo")}
    elif args.part:
        result = {args.part: globals()[f"bench_{args.part}"](args.quick)}
    else:
        result = run(args.quick)
    print(json.dumps(result, indent=2))
    goal_met = result["goal_met"] if "goal_met" in result else all(p.get("goal_met", True) for p in result.values())
    if not goal_met:
        sys.exit(1)


if __name__ == "__main__":
    main()
