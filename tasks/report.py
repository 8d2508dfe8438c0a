"""Writing the run's report files as a task (the content is built in ``apollo_sync.report``)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from apollo_sync.report import Frame, write_report


@task(name="write_report", cache_policy=NO_CACHE, persist_result=False)
def write_report_files(report_dir: str, summary: dict, results: Frame, rejected: Frame) -> Path:
    """summary.json, results.parquet/.csv and rejected.csv under ``report_dir`` (lazy frames are streamed)."""
    return write_report(report_dir, summary, results, rejected)
