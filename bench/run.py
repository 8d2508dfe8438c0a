"""The one benchmark entry point (issue 7): every figure beside a reference measured in the same run.

``uv run python bench/run.py`` (full, about 15 minutes on 2 cores) or ``--quick`` (under 2 minutes) starts the
sandbox servers itself, runs the benchmarks below, prints one table and writes the figures as JSON to
``bench/out/results-{full,quick}.json``. The scaling plot goes to ``bench/scaling.png`` on a full run (the one
BENCHMARKS.md shows) and to ``bench/out/scaling-quick.png`` on a quick run.

  transform   bench_transform.run: messy CRM CSV (1M rows; quick 100k), read_source-style scan + prepare()
              vs plain polars read_csv + email lower/filter/unique, each in its own child (rows/s, peak RSS)
  load        bench_flow.run: 30,000 contacts through the sync_contacts flow (Prefect, ledger on) vs a plain
              asyncio+httpx loop at the same concurrency, unlimited sandbox with 20 ms latency; LoadSession alone
  rate limit  bench_load.bench_rate_limited: achieved requests per window vs allowed, 429s served
              (full run: also Apollo's minute window, about 4 minutes)
  throughput  bench_load.bench_throughput (full run): LoadSession with/without ledger vs the plain loop, 100k
  ledger      bench_load.bench_ledger_plan (full run): Ledger.plan over 1M identities
  start-up    bench_flow.bench_startup: a 10-row run in a fresh process, ephemeral Prefect (warm home) and
              (full run) against a running Prefect server, vs `import flows.sync_contacts`
  scaling     bench_flow: total flow time for 10k, 100k, 1M contacts (quick: 10k, 100k) vs the plain loop

Exit status 1 when a goal is missed (the table's goal column says which). The machine is shared: read ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_flow  # noqa: E402
import bench_load  # noqa: E402
import bench_transform  # noqa: E402

OUT = HERE / "out"
MIB = 1024**2


def machine() -> dict:
    """What the figures were measured on."""
    import os

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem_gib = round(int(mem.split()[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        mem_gib = None
    return {
        "nproc": os.cpu_count(),
        "memory_gib": mem_gib,
        "cpu": cpu,
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("polars", "prefect", "httpx")},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def measure(quick: bool) -> dict:
    """Run every benchmark; returns {part: figures} (and the seconds each part took)."""
    parts: dict = {"machine": machine(), "quick": quick, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    took: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        parts[name] = fn(*args)
        took[name] = round(time.perf_counter() - t0, 1)

    timed("transform", bench_transform.run, 100_000 if quick else 1_000_000, 7, 2 if quick else 3)
    timed("flow", bench_flow.run, quick)
    timed("rate_limited", bench_load.bench_rate_limited, quick)
    if not quick:
        timed("throughput", bench_load.bench_throughput, quick)
        timed("ledger_plan", bench_load.bench_ledger_plan, quick)
        timed("rate_limited_apollo", bench_load.bench_rate_limited, quick, "apollo")
    parts["part_seconds"] = took
    return parts


def rows(r: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(area, measure, apollo-sync, reference, ratio, goal) rows of the table."""
    out = []
    t = r["transform"]
    out.append(("transform", f"{t['rows']:,} messy CSV rows: rows/s (read+prepare vs read_csv+email filter+unique)",
                f"{t['prepare']['rows_per_second']:,.0f}", f"{t['reference']['rows_per_second']:,.0f}",
                f"{t['ratio']:.2f}x time", f"<= {bench_transform.GOAL_RATIO:g}x: {_yes(t['ratio'] <= bench_transform.GOAL_RATIO)}"))
    rss_ok = t["prepare"]["peak_rss_bytes"] <= bench_transform.GOAL_RSS_BYTES
    out.append(("transform", "peak RSS (MiB)", f"{t['prepare']['peak_rss_bytes'] / MIB:,.0f}",
                f"{t['reference']['peak_rss_bytes'] / MIB:,.0f}",
                f"{t['prepare']['peak_rss_bytes'] / t['reference']['peak_rss_bytes']:.2f}x", f"<= 1536: {_yes(rss_ok)}"))
    f = r["flow"]
    load = f["load"]
    cps = load["contacts_per_s"]
    out.append(("load", f"flow, {load['contacts']:,} contacts, beyond start-up: contacts/s vs plain loop",
                f"{cps['flow_beyond_startup']:,}", f"{cps['plain']:,}", f"{load['ratio_flow_beyond_startup_vs_plain']:.2f}x",
                f">= {bench_flow.GOAL_RATIO:g}x: {_yes(load['goal_met'])}"))
    out.append(("load", f"flow incl. its fixed cost ({load['flow_fixed_cost_s']:.2f} s a run): contacts/s",
                f"{cps['flow_total']:,}", f"{cps['plain']:,}", f"{load['ratio_flow_total_vs_plain']:.2f}x", ""))
    out.append(("load", "LoadSession alone, ledger on, same process: contacts/s",
                f"{cps['load_session']:,}", f"{cps['plain']:,}", f"{load['ratio_load_session_vs_plain']:.2f}x", ""))
    spans = load["send_span_s_medians"]
    out.append(("load", "flow's send span, first to last request, sandbox clock (s, medians; ratio: paired)",
                f"{spans['flow']:.2f}", f"{spans['plain']:.2f}",
                f"{load['ratio_send_span_plain_vs_flow_paired']['median']:.2f}x", ""))
    if "throughput" in r:
        th = r["throughput"]
        c = th["contacts_per_s"]
        out.append(("load", f"bench_load: LoadSession {th['contacts']:,}, ledger on / off: contacts/s",
                    f"{c['loader_ledger']:,} / {c['loader']:,}", f"{c['plain']:,}",
                    f"{th['ratio_loader_ledger_vs_plain']:.2f}x / {th['ratio_loader_no_ledger_vs_plain']:.2f}x",
                    f">= 0.8x: {_yes(th['goal_met'])}"))
    for key in ("rate_limited", "rate_limited_apollo"):
        if key in r:
            rl = r[key]
            out.append(("rate limit", f"{rl['way']}: requests per {rl['window_seconds']:g} s window "
                        f"({rl['full_windows']} full windows; min-max {rl['min_per_window']}-{rl['max_per_window']})",
                        f"{rl['achieved_per_window']:g}", f"{rl['allowed_per_window']} allowed", f"{rl['rate_share']:.1%}",
                        f">= 95%: {_yes(rl['rate_share'] >= bench_load.GOAL_RATE_SHARE)}"))
            out.append(("rate limit", f"{rl['way']}: 429s served", f"{rl['http_429']}", f"{rl['requests']} requests",
                        f"{rl['share_429']:.1%}", f"<= 1%: {_yes(rl['share_429'] <= bench_load.GOAL_429_SHARE)}"))
    if "ledger_plan" in r:
        lp = r["ledger_plan"]
        out.append(("ledger", f"Ledger.plan over {lp['rows']:,} identities (half confirmed): rows/s",
                    f"{lp['rows_per_s']:,}", "", f"{lp['plan_s']} s", ""))
    s = f["startup"]
    med, ratio = s["median_s"], s["ratio_vs_import_flow"]
    out.append(("start-up", "python -c pass / import flows.sync_contacts (s)", f"{med['python_floor']:.2f}",
                f"{med['import_flow']:.2f}", "", ""))
    out.append(("start-up", "10-row run, fresh process, ephemeral Prefect (warm home) (s)",
                f"{med['ephemeral_warm']:.2f}", f"{med['import_flow']:.2f} import", f"{ratio['ephemeral_warm']:.1f}x", ""))
    if "server" in med:
        out.append(("start-up", "10-row run, fresh process, running Prefect server (s; first run "
                    f"{med['server_first']:.2f})", f"{med['server']:.2f}", f"{med['import_flow']:.2f} import",
                    f"{ratio['server']:.1f}x", ""))
    for p in f["scaling"]["points"]:
        out.append(("scaling", f"{p['contacts']:,} contacts: total flow time in a warm process (s)",
                    f"{p['flow_s']:.1f}", f"{p['plain_s']:.1f} plain", f"{p['ratio_vs_plain']:.2f}x speed", ""))
    return out


def _yes(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(r: dict) -> str:
    """The rows as a Markdown table (readable in a terminal too)."""
    head = ("area", "measure", "apollo-sync", "reference (same run)", "ratio", "goal")
    body = rows(r)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def goals_met(r: dict) -> bool:
    checks = [r["transform"]["goal_met"], r["flow"]["load"]["goal_met"], r["rate_limited"]["goal_met"]]
    checks += [r[k]["goal_met"] for k in ("throughput", "rate_limited_apollo") if k in r]
    return all(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 2 minutes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = measure(args.quick)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    OUT.mkdir(exist_ok=True)
    name = "quick" if args.quick else "full"
    png = bench_flow.plot(results["flow"]["scaling"], OUT / "scaling-quick.png" if args.quick else HERE / "scaling.png")
    results["plot"] = str(png.relative_to(HERE.parent))
    (OUT / f"results-{name}.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(f"\napollo-sync benchmarks ({name}), {results['date_utc']}: {m['nproc']} cores, {m['memory_gib']} GiB, "
          f"{m['cpu']}; Python {m['python']}, polars {m['polars']}, prefect {m['prefect']}; "
          f"load average at start {m['load_average_at_start']}\n")
    print(table(results))
    print(f"\ntook {results['total_seconds']} s; figures in bench/out/results-{name}.json; plot {results['plot']}")
    sys.exit(0 if goals_met(results) else 1)


if __name__ == "__main__":
    main()
