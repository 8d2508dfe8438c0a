"""Benchmark: reading a large CSV through apollo_sync.sources with bounded memory (issue 6, item 3).

Generates an N-row contacts CSV (default 10,000,000 rows, about 1 GB) in a temp dir (never committed), then runs
each scenario in a fresh child process and reports wall time and peak RSS (VmHWM of that child):

  sha256_only        stream the file through sha256 (the floor for any content fingerprint)   [reference]
  polars_collect     pl.scan_csv(all text).collect(): plain polars, the whole file in memory  [reference]
  read_source        read_source() alone: hash + encoding check pass, delimiter sniff, head parse
  stream_count       read_source() + streaming-engine count of rows and distinct emails
  identity_pass      read_source() + collect only (source_row, lower(email)) and keep first per email:
                     the global dedupe key set a batched transform needs
  identity_hash      the same with a 64-bit hash of the key instead of the text (8 bytes a row)
  batches            read_source() + collect_batches() over the whole frame, one batch in memory at a time
  read_latin1        read_source(encoding=latin-1): the same pass plus transcoding into a UTF-8 spill file
  collect_all        read_source() + frame.collect(): what a transform that collects everything costs

Usage: uv run python bench/bench_sources.py [--rows 10000000] [--keep DIR] [--only a,b]
Ratios are against the references measured in the same run (shared, noisy 2-core machine: read as rough).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK_ROWS = 1_000_000

SCENARIOS = {
    "sha256_only": """
import hashlib
h = hashlib.sha256()
with open(PATH, "rb") as fh:
    while chunk := fh.read(1 << 20):
        h.update(chunk)
result = {"sha": h.hexdigest()[:12]}
""",
    "polars_collect": """
import polars as pl
result = {"rows": pl.scan_csv(PATH, infer_schema=False).collect().height}
""",
    "read_source": """
from apollo_sync.sources import read_source
src = read_source(PATH)
result = {"columns": len(src.frame.collect_schema())}
""",
    "stream_count": """
import polars as pl
from apollo_sync.sources import read_source
src = read_source(PATH)
out = src.frame.select(pl.len().alias("rows"), pl.col("email").str.to_lowercase().n_unique().alias("emails")).collect(engine="streaming")
result = {"rows": out["rows"][0], "distinct_emails": out["emails"][0]}
""",
    "identity_pass": """
import polars as pl
from apollo_sync.sources import read_source
src = read_source(PATH)
keys = (src.frame.select("source_row", pl.col("email").str.strip_chars().str.to_lowercase().alias("key"))
        .group_by("key").agg(pl.col("source_row").min()).collect(engine="streaming"))
result = {"distinct_keys": keys.height}
""",
    "identity_hash": """
import polars as pl
from apollo_sync.sources import read_source
src = read_source(PATH)
key = pl.col("email").str.strip_chars().str.to_lowercase().hash(seed=0).alias("key")
keys = src.frame.select("source_row", key).group_by("key").agg(pl.col("source_row").min()).collect(engine="streaming")
result = {"distinct_keys": keys.height}
""",
    "batches": """
import polars as pl
from apollo_sync.sources import read_source
src = read_source(PATH)
rows = batches = 0
for batch in src.frame.collect_batches(chunk_size=100_000):
    rows += batch.height
    batches += 1
result = {"rows": rows, "batches": batches}
""",
    "read_latin1": """
from apollo_sync.sources import SourceOptions, read_source
src = read_source(PATH, SourceOptions(encoding="latin-1"))
result = {"columns": len(src.frame.collect_schema())}
""",
    "collect_all": """
from apollo_sync.sources import read_source
result = {"rows": read_source(PATH).frame.collect().height}
""",
}

CHILD = """
import json, sys, time
PATH = sys.argv[1]
t0 = time.perf_counter()
{body}
result["seconds"] = round(time.perf_counter() - t0, 2)
# VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
result["peak_rss_mb"] = round(int(hwm) / 1024)
print(json.dumps(result))
"""


def generate(path: Path, rows: int) -> None:
    """Write ``rows`` synthetic contacts (1 in 10 emails repeated, leading-zero zips) in 1M-row chunks."""
    import polars as pl

    with open(path, "wb") as fh:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            i = pl.int_range(start, start + n, eager=True)
            j = i - (i % 10 == 9).cast(pl.Int64)  # every tenth row repeats the previous row's email
            frame = pl.DataFrame({
                "email": "Person" + j.cast(pl.String) + "@example" + (j % 1000).cast(pl.String) + ".com",
                "first_name": "First" + (i % 5000).cast(pl.String),
                "last_name": "Last" + (i % 7919).cast(pl.String),
                "organization_name": "Company " + (i % 20011).cast(pl.String) + ", Inc.",
                "title": pl.Series(["VP Sales", "Engineer", "CEO", "Head of \"Growth\""])[(i % 4)],
                "zip": (i % 99999).cast(pl.String).str.zfill(5),
                "phone": "+1 415 555 " + (i % 10000).cast(pl.String).str.zfill(4),
            })
            frame.write_csv(fh, include_header=start == 0)


def run(name: str, path: Path) -> dict:
    code = CHILD.format(body=SCENARIOS[name])
    env = dict(os.environ, POLARS_MAX_THREADS=os.environ.get("POLARS_MAX_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--keep", help="directory to keep (and reuse) the generated CSV in")
    parser.add_argument("--only", help="comma-separated scenario names")
    args = parser.parse_args()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-sources-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"contacts-{args.rows}.csv"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, args.rows)
        print(f"generated {args.rows:,} rows, {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    names = args.only.split(",") if args.only else list(SCENARIOS)
    results = {}
    print(f"{'scenario':<16} {'seconds':>8} {'peak RSS MB':>12}  detail")
    for name in names:
        results[name] = r = run(name, path)
        detail = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss_mb")}
        print(f"{name:<16} {r.get('seconds', '-'):>8} {r.get('peak_rss_mb', '-'):>12}  {detail}", flush=True)
    ref = results.get("polars_collect", {})
    if "seconds" in ref:
        for name, r in results.items():
            if "seconds" in r and name != "polars_collect":
                print(f"{name}: time x{r['seconds'] / max(ref['seconds'], 0.01):.2f}, "
                      f"peak RSS x{r['peak_rss_mb'] / max(ref['peak_rss_mb'], 1):.2f} of polars_collect")
    if not args.keep:
        path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
