"""Benchmark: a dry run of a 10,000,000-row CSV through the product's path, with bounded memory (issue 6).

``uv run python bench/bench_dry_run.py --rows 10000000`` generates a messy CRM export (bench/make_crm_export.py,
written 1M rows at a time; ~870 MB for 10M rows) in a temp dir, then runs each phase in its own child process
and reports wall time and peak RSS (VmHWM of that child; the Prefect server the CLI starts is another process):

- ``reference``: plain polars ``pl.scan_csv(all text).collect()``, the whole file in memory (same run, same file);
- ``prepare``:   ``read_source`` + ``prepare(out_dir=...)``: the transform alone, writing its Parquet parts;
- ``dry_run``:   ``apollo-sync run FILE --dry-run`` with a fresh state dir: read_source -> clean_contacts (Prefect
                 task, parts under state_dir/prepared) -> ledger plan -> report (summary.json, results.parquet,
                 results.csv, rejected.csv) -> artifacts. Its time includes the ephemeral Prefect server start.

Each phase runs ``--repeat`` times (default 1 for 10M rows), interleaved; best time and highest RSS are kept.
The dry run's summary is checked against the generator's truth (rejected by reason, duplicates_in_source,
would_send = rows - rejected - duplicates). Exits non-zero when a count is wrong or the dry run's peak RSS
exceeds 2 GiB. ``--keep DIR`` keeps (and reuses) the CSV there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_RSS_BYTES = 2 * 1024**3
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_HWM = """
import atexit, json, os, time
T0 = time.perf_counter()
def _report():
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    with open(os.environ["BENCH_FIGURES"], "w") as fh:
        json.dump({"seconds": time.perf_counter() - T0, "peak_rss_bytes": int(hwm) * 1024, **RESULT}, fh)
RESULT = {}
atexit.register(_report)
"""

PHASES = {
    "reference": """
import polars as pl
RESULT["rows"] = pl.scan_csv(CSV, infer_schema=False).collect().height
""",
    "prepare": """
from apollo_sync.sources import read_source
from apollo_sync.clean import prepare
p = prepare(read_source(CSV).frame, out_dir=WORK + "/prepared")
RESULT.update(rows_read=p.rows_read, contacts=p.contacts_count, rejected=p.rejected_count,
              duplicates_in_source=p.duplicates_count)
""",
    "dry_run": """
import sys
sys.argv = ["apollo-sync", "run", CSV, "--dry-run", "--state-dir", WORK + "/state", "--report-dir", WORK + "/report"]
from apollo_sync.cli import main
main()
""",
}


def _run_phase(name: str, csv: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures = work / "figures.json"
    code = _HWM + f"CSV = {str(csv)!r}\nWORK = {str(work)!r}\n" + PHASES[name]
    env = dict(os.environ, BENCH_FIGURES=str(figures), PREFECT_HOME=str(work / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if not figures.exists():
        raise RuntimeError(f"phase {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(figures.read_text())
    result["exit_code"] = proc.returncode
    if name == "dry_run":
        result["summary"] = json.loads((work / "report" / "summary.json").read_text())
    return result


def _best(samples: list[dict]) -> dict:
    best = dict(min(samples, key=lambda f: f["seconds"]))
    best["all_seconds"] = [round(f["seconds"], 2) for f in samples]
    best["peak_rss_bytes"] = max(f["peak_rss_bytes"] for f in samples)
    return best


def run(rows: int, seed: int = 7, repeat: int = 1, keep: str | None = None) -> dict:
    """Generate (or reuse) the export, run the phases ``repeat`` times interleaved, return the figures."""
    sys.path.insert(0, str(HERE))
    from make_crm_export import write_export

    tmp = Path(tempfile.mkdtemp(prefix="apollo-sync-dryrun-"))
    try:
        folder = Path(keep) if keep else tmp
        folder.mkdir(parents=True, exist_ok=True)
        csv, truth_file = folder / f"crm-{rows}-{seed}.csv", folder / f"crm-{rows}-{seed}.truth.json"
        if not (csv.exists() and truth_file.exists()):
            truth_file.write_text(json.dumps(write_export(rows, csv, seed)))
        truth = json.loads(truth_file.read_text())
        runs: dict[str, list[dict]] = {name: [] for name in PHASES}
        for _ in range(repeat):
            for name in PHASES:
                runs[name].append(_run_phase(name, csv, tmp / name))
        figures = {name: _best(samples) for name, samples in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = figures["dry_run"]["summary"]
    rejected_true = {"invalid_email": truth["invalid_email"], "missing_identity": truth["missing_identity"]}
    expected_send = rows - sum(rejected_true.values()) - truth["duplicates_in_source"]
    counts_ok = (
        summary["rows_read"] == rows
        and summary["rejected"] == rejected_true
        and summary["duplicates_in_source"] == truth["duplicates_in_source"]
        and summary.get("would_send") == expected_send
        and figures["prepare"]["contacts"] == expected_send
    )
    ref = figures["reference"]
    return {
        "rows": rows,
        "csv_bytes": csv.stat().st_size if keep else None,
        "truth": truth,
        **figures,
        "dry_run_time_ratio": figures["dry_run"]["seconds"] / ref["seconds"],
        "prepare_time_ratio": figures["prepare"]["seconds"] / ref["seconds"],
        "counts_match_truth": counts_ok,
        "goal_met": counts_ok and figures["dry_run"]["peak_rss_bytes"] <= GOAL_RSS_BYTES,
    }


def _print(figures: dict) -> None:
    mib = 1024**2
    ref = figures["reference"]
    for name in PHASES:
        f = figures[name]
        ratio = f"x{f['seconds'] / ref['seconds']:.2f} time, x{f['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f} RSS of reference"
        print(f"{name:>9}: {f['seconds']:7.1f} s  peak RSS {f['peak_rss_bytes'] / mib:6.0f} MiB  "
              f"(runs {f['all_seconds']} s)  {'' if name == 'reference' else ratio}")
    s = figures["dry_run"]["summary"]
    print(f"  dry run summary: rows_read {s['rows_read']:,}, rejected {s['rejected']}, "
          f"duplicates {s['duplicates_in_source']:,}, would_send {s.get('would_send', 0):,}")
    print(f"  truth: {figures['truth']}")
    print(f"  counts match truth: {figures['counts_match_truth']}; peak RSS goal <= {GOAL_RSS_BYTES / mib:.0f} MiB")
    print("goal met" if figures["goal_met"] else "GOAL MISSED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", help="directory to keep (and reuse) the generated CSV in")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    figures = run(args.rows, args.seed, args.repeat, args.keep)
    figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, indent=2, default=str)) if args.json else _print(figures)
    sys.exit(0 if figures["goal_met"] else 1)


if __name__ == "__main__":
    main()
