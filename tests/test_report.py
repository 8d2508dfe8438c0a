"""The report's arithmetic and its files, on small frames."""

import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync.report import (
    build_summary,
    escape_for_spreadsheet,
    results_frame,
    summary_problems,
    write_report,
)


def _frames():
    rejected = pl.DataFrame(
        {"source_row": [2, 5], "email": ["bad@", None], "reason": ["invalid_email", "missing_identity"],
         "original": ['{"Email":"bad@"}', "{}"]}
    )
    duplicates = pl.DataFrame({"source_row": [4], "email": ["a@x.io"], "merged_into": [1]})
    outcomes = pl.DataFrame(
        {"source_row": [1, 3, 6], "email": ["a@x.io", "b@x.io", "c@x.io"],
         "outcome": ["created", "failed", "unchanged"], "apollo_id": ["id1", None, None],
         "reason": [None, "422: bad title", None]}
    )
    return rejected, duplicates, outcomes


def test_results_cover_every_row_once_in_source_order():
    results = results_frame(*_frames())
    assert results["source_row"].to_list() == [1, 2, 3, 4, 5, 6]
    assert results["outcome"].to_list() == ["created", "rejected", "failed", "duplicate", "rejected", "unchanged"]
    assert results.filter(pl.col("outcome") == "duplicate")["reason"].item() == "merged into row 1"


def test_summary_adds_up_and_counts_each_outcome():
    results = results_frame(*_frames())
    summary = build_summary(rows_read=6, results=results, requests=3, retries=1, seconds=1.23456)
    assert summary["rejected"] == {"invalid_email": 1, "missing_identity": 1}
    assert (summary["rows_valid"], summary["duplicates_in_source"], summary["created"]) == (4, 1, 1)
    assert (summary["failed"], summary["unchanged"], summary["existing"], summary["unconfirmed"]) == (1, 1, 0, 0)
    assert summary["seconds"] == 1.235
    assert summary_problems(summary) == []


def test_summary_problems_names_the_broken_equation():
    summary = build_summary(rows_read=7, results=results_frame(*_frames()))  # one row missing from the results
    problems = summary_problems(summary)
    assert len(problems) == 1 and "rows_valid 5" in problems[0]


@pytest.mark.parametrize("cell", ["=1+2", "+33 1 23", "-2", "@SUM(A1)", "\tx"])
def test_spreadsheet_formulas_are_defused(cell):
    escaped = escape_for_spreadsheet(pl.DataFrame({"c": [cell]}))
    assert escaped["c"].item() == "'" + cell


def test_plain_cells_and_numbers_are_left_alone():
    frame = pl.DataFrame({"c": ["a-b", "ok", None], "n": [-1, 2, 3]})
    assert_frame_equal(escape_for_spreadsheet(frame), frame)


def test_write_report_writes_all_files(tmp_path):
    rejected, duplicates, outcomes = _frames()
    results = results_frame(rejected, duplicates, outcomes)
    summary = build_summary(rows_read=6, results=results)
    out = write_report(tmp_path / "r", summary, results, rejected)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert_frame_equal(pl.read_parquet(out / "results.parquet"), results)
    assert pl.read_csv(out / "results.csv").height == 6
    assert "invalid_email" in (out / "rejected.csv").read_text()


def test_a_lazy_report_is_written_in_source_order_a_bucket_at_a_time(tmp_path, monkeypatch):
    """Results parts in any order (groups finish out of order, retried rows last) come out sorted by source row in
    both files, whatever the bucket size, and with the rows of every bucket (none lost at a bucket's edge)."""
    import random

    import apollo_sync.report as report

    rows = list(range(1, 1001))
    random.Random(3).shuffle(rows)
    parts = tmp_path / "parts"
    parts.mkdir()
    for n, start in enumerate(range(0, 1000, 70)):
        chunk = sorted(rows[start : start + 70]) if n % 2 else rows[start : start + 70]
        pl.DataFrame({"source_row": chunk}, schema={"source_row": pl.Int64}).with_columns(
            email=pl.format("p{}@x.io", "source_row"), outcome=pl.lit("created"), apollo_id=pl.lit("id"),
            reason=pl.lit(None, pl.String),
        ).write_parquet(parts / f"results-{n:03d}.parquet")
    lazy = pl.scan_parquet(parts / "*.parquet")
    for bucket in (7, 250, 10_000):
        monkeypatch.setattr(report, "SORT_BUCKET_ROWS", bucket)
        out = write_report(tmp_path / f"r{bucket}", {"rows_read": 1000}, lazy, pl.DataFrame({"source_row": []}))
        written = pl.read_parquet(out / "results.parquet")
        assert written["source_row"].to_list() == list(range(1, 1001))
        assert_frame_equal(written, lazy.collect().sort("source_row"))
        assert pl.read_csv(out / "results.csv")["source_row"].to_list() == list(range(1, 1001))


def test_an_empty_lazy_report_has_the_header_only(tmp_path):
    empty = pl.LazyFrame(schema={"source_row": pl.Int64, "email": pl.String, "outcome": pl.String,
                                 "apollo_id": pl.String, "reason": pl.String})  # fmt: skip
    out = write_report(tmp_path / "r", {"rows_read": 0}, empty, pl.DataFrame({"source_row": []}))
    assert pl.read_parquet(out / "results.parquet").height == 0
    assert (out / "results.csv").read_text().splitlines() == ["source_row,email,outcome,apollo_id,reason"]


def test_results_added_from_several_threads_at_once_are_all_kept(tmp_path):
    """The send steps add a group's outcomes on the event loop while a part's settled rows are added from a thread:
    no part may take another's number (a lost file is lost outcomes) and the CSV gets one header."""
    from concurrent.futures import ThreadPoolExecutor

    from apollo_sync.report import ResultsStream

    stream = ResultsStream(tmp_path / "r")

    def add(start: int) -> None:
        rows = list(range(start, start + 50))
        stream.add(pl.DataFrame({"source_row": rows, "email": [f"p{i}@x.io" for i in rows], "outcome": "created"}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(1, 20_001, 50)))
    assert sorted(stream.frame().collect()["source_row"].to_list()) == list(range(1, 20_001))
    text = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert text[0].startswith("source_row") and len(text) == 20_001
