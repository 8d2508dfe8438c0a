"""Benchmark: what a 10-row ad hoc run costs to start, ephemeral vs a running Prefect server (issue 5, item 8).

Each scenario is a fresh ``python -c`` child (as a user would type it) that syncs the same 10-row CSV into a
sandbox in a child process; wall time is measured around the child. Scenarios:

  python_floor        python -c pass                                                         [reference]
  import_prefect      python -c "import prefect"                                             [reference]
  import_flow         import flows.sync_contacts (Prefect, polars, httpx and the project)    [reference]
  ephemeral_fresh     no PREFECT_API_URL, empty PREFECT_HOME: temporary server + DB migrations
  ephemeral_warm      no PREFECT_API_URL, PREFECT_HOME already migrated: temporary server only
  ephemeral_warm_lean ephemeral_warm with the settings below that skip start-up work
  server              PREFECT_API_URL set to a `prefect server start` already running
  cli_server          `apollo-sync run` against the running server (the CLI's own checks included)
  cli_ephemeral_warm  `apollo-sync run --ephemeral`, PREFECT_HOME already migrated
  cli_local           `apollo-sync run` with no PREFECT_API_URL: the local server it started on an earlier run
                      (apollo_sync.local_server) is reused; the ad hoc default from the second run on

Usage: uv run python bench/bench_prefect_startup.py [--repeat 3]
Medians of --repeat runs; ratios against import_flow and import_prefect from the same run (shared noisy machine:
read as rough). Issue 15's goal: cli_local at most 3x import_prefect.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))

LEAN = {
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
}
"""Settings that skip start-up work in the temporary server: block type registration on every start, and the
task-run recorder (its backlog is what prints 'Error flushing' tracebacks at exit)."""

RUN = """
import asyncio, os, sys
from apollo_sync.params import flow_parameters, sync_params
from flows.sync_contacts import sync_contacts
s = asyncio.run(sync_contacts(**flow_parameters(sync_params(source=sys.argv[1], base_url=sys.argv[2],
    state_dir=sys.argv[3], report_dir=sys.argv[3] + "/report", api_key_block=None, full_refresh=True))))
assert s["created"] + s["existing"] == 10, s
"""


def _contacts(path: Path) -> Path:
    rows = [f"P{i},Bench,p{i}@bench.example,Acme" for i in range(10)]
    path.write_text("First Name,Last Name,Email,Company\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _time(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from apollo_sync.sandbox import SandboxConfig, SandboxProcess
    from prefect_server import running_server

    from apollo_sync import local_server

    work = Path(tempfile.mkdtemp(prefix="apollo-sync-bench-startup-"))
    csv = _contacts(work / "contacts.csv")
    local_home = work / "home-local"
    results: dict[str, list[float]] = {}
    with SandboxProcess(SandboxConfig()) as sandbox, running_server() as server:
        base = server.env(APOLLO_API_KEY=sandbox.config.api_key)
        ephemeral = {k: v for k, v in base.items() if k != "PREFECT_API_URL"}

        def run_flow(name: str, env: dict[str, str], home: Path | None = None) -> None:
            state = work / f"{name}-{len(results.get(name, []))}"
            env = env | ({"PREFECT_HOME": str(home)} if home else {})
            cmd = [sys.executable, "-c", RUN, str(csv), sandbox.gateway_base_url, str(state)]
            results.setdefault(name, []).append(_time(cmd, env, ROOT))

        try:
            warm_home = work / "home-warm"
            run_flow("ephemeral_fresh", ephemeral, warm_home)  # also migrates warm_home for the warm runs
            for i in range(args.repeat):
                results.setdefault("python_floor", []).append(_time([sys.executable, "-c", "pass"], base, ROOT))
                results.setdefault("import_prefect", []).append(_time([sys.executable, "-c", "import prefect"], base, ROOT))
                results.setdefault("import_flow", []).append(
                    _time([sys.executable, "-c", "import flows.sync_contacts"], base, ROOT)
                )
                if i:
                    run_flow("ephemeral_fresh", ephemeral, work / f"home-fresh-{i}")
                run_flow("ephemeral_warm", ephemeral, warm_home)
                run_flow("ephemeral_warm_lean", ephemeral | LEAN, warm_home)
                run_flow("server", base)
                state = work / f"cli-{i}"
                cli = [str(Path(sys.executable).parent / "apollo-sync"), "run", str(csv), "--base-url", sandbox.gateway_base_url,
                       "--state-dir", str(state), "--report-dir", str(state / "report"), "--full-refresh"]  # fmt: skip
                results.setdefault("cli_server", []).append(_time(cli, base, ROOT))
                cli[cli.index(str(state))] = str(work / f"cli-eph-{i}")
                results.setdefault("cli_ephemeral_warm", []).append(
                    _time(cli, ephemeral | {"PREFECT_HOME": str(warm_home), "APOLLO_SYNC_EPHEMERAL": "1"}, ROOT)
                )
                cli[cli.index(str(work / f"cli-eph-{i}"))] = str(work / f"cli-local-{i}")
                if i == 0:  # the first run starts the local server (not timed: that is a one-off)
                    _time(cli[:-1] + ["--dry-run"], ephemeral | {"PREFECT_HOME": str(local_home)}, ROOT)
                results.setdefault("cli_local", []).append(_time(cli, ephemeral | {"PREFECT_HOME": str(local_home)}, ROOT))

        finally:
            local_server.stop(local_home)  # nothing of the benchmark keeps running
    shutil.rmtree(work, ignore_errors=True)
    reference, prefect_only = statistics.median(results["import_flow"]), statistics.median(results["import_prefect"])
    print(f"{'scenario':22} {'median s':>9} {'min s':>7} {'max s':>7} {'x import_flow':>14} {'x import_prefect':>17}   (n)")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:22} {median:9.2f} {min(times):7.2f} {max(times):7.2f} {median / reference:14.2f} "
              f"{median / prefect_only:17.2f}   ({len(times)})")


if __name__ == "__main__":
    main()
