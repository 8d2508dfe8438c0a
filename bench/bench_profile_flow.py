"""Profile one sync_contacts flow run with pyinstrument: where the flow's time goes beyond the HTTP waits.

``uv run python bench/bench_profile_flow.py [--contacts 30000] [--out bench/out/profile-flow.txt]`` starts the
sandbox (child process, 20 ms latency, no limits), runs a child with bench_flow's environment that warms Prefect
up with a 10-row flow run, then profiles one flow run of ``--contacts`` contacts (the event loop thread, wall
time; the profiler slows the run by roughly 1.5x) and writes the text report. BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


async def _profile(url: str, n: int, out: Path) -> float:
    from pyinstrument import Profiler

    import bench_flow
    from apollo_sync.params import flow_parameters, sync_params
    from flows.sync_contacts import sync_contacts

    work = Path(tempfile.mkdtemp(prefix="apollo-sync-bench-profile-"))
    base = url + "/apis/v1/apollo"
    small, big = bench_flow._write_csv(10, work / "c10.csv"), bench_flow._write_csv(n, work / "cn.csv")

    async def flow(csv: Path, name: str) -> None:
        bench_flow._reset(url)
        await sync_contacts(**flow_parameters(sync_params(source=str(csv), base_url=base, state_dir=str(work / name),
                                                          report_dir=str(work / name / "report"),
                                                          api_key_block=None)))  # fmt: skip

    await flow(small, "warm-up")
    profiler = Profiler(async_mode="disabled", interval=0.001)
    profiler.start()
    t0 = time.perf_counter()
    await flow(big, "profiled")
    seconds = time.perf_counter() - t0
    profiler.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=30_000)
    parser.add_argument("--out", default=str(HERE / "out" / "profile-flow.txt"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.child:
        seconds = asyncio.run(_profile(args.child, args.contacts, Path(args.out)))
        print(f"profiled flow run of {args.contacts:,} contacts: {seconds:.2f} s; report in {args.out}")
        return
    import bench_flow
    from apollo_sync.sandbox import SandboxConfig, SandboxProcess

    with SandboxProcess(SandboxConfig(api_key=bench_flow.KEY, latency=bench_flow.LATENCY)) as sb:
        cmd = [sys.executable, __file__, "--child", sb.url, "--contacts", str(args.contacts), "--out", args.out]
        done = subprocess.run(cmd, env=bench_flow._env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"profile child failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
