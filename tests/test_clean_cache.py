"""clean_contacts with a prepared dir: Parquet parts that outlive the run, a cache read only while they are whole."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
from prefect import flow

from apollo_sync.sources import SourceOptions, read_source
from apollo_sync.clean import DONE_MARKER, prepare, prune_prepared
from tasks.extract import clean_contacts

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_harness")]


@flow
def _clean_twice(spec: str, prepared_dir: str) -> list:
    src = read_source(spec, SourceOptions())
    return [clean_contacts(src, None, "US", prepared_dir, return_state=True) for _ in range(2)]


def test_parts_are_cached_and_recomputed_when_gone(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("Email,Title\na@x.com,CEO\nb@x.com,\n A@X.com ,CTO\nnot-an-email,\n", encoding="utf-8")
    root = tmp_path / "prepared"

    first, second = _clean_twice(str(csv), str(root))
    dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(dirs) == 1 and (dirs[0] / DONE_MARKER).is_file()
    assert first.name != "Cached"  # no parts before: computed (and the cache is not consulted)
    assert second.name == "Cached"
    prepared = second.result()
    assert isinstance(prepared.contacts, pl.LazyFrame)
    assert prepared.contacts.collect().sort("source_row").select("source_row", "title").rows() == [(1, "CEO"), (2, None)]
    assert (prepared.contacts_count, prepared.rejected_count, prepared.duplicates_count) == (2, 1, 1)

    shutil.rmtree(dirs[0])  # the parts a cached result points at are gone: compute again, never read stale paths
    third, fourth = _clean_twice(str(csv), str(root))
    assert third.name != "Cached" and fourth.name == "Cached"
    assert fourth.result().contacts.collect().height == 2
    assert not list(root.glob("*.tmp")) and not list(root.glob("*.cache-token"))


def test_prune_removes_old_parts_only(tmp_path: Path) -> None:
    frame = pl.DataFrame({"Email": ["a@x.com"]})
    old, new = tmp_path / "old", tmp_path / "new"
    prepare(frame, out_dir=old)
    prepare(frame, out_dir=new)
    stamp = time.time() - 3 * 86400
    os.utime(old / DONE_MARKER, (stamp, stamp))
    prune_prepared(tmp_path, 86400)
    assert not old.exists() and new.exists()


def test_a_second_run_of_the_same_digest_leaves_the_whole_parts_another_run_may_be_reading(tmp_path: Path) -> None:
    """Two runs sharing a state dir clean the same source at once: the second finds the first's parts whole and
    keeps them (same digest, same rows) instead of replacing the files under a reader. Both are private."""
    csv = tmp_path / "c.csv"
    csv.write_text("Email,Title\na@x.com,CEO\nb@x.com,CTO\n", encoding="utf-8")
    root = tmp_path / "prepared"
    src = read_source(str(csv), SourceOptions())
    first = clean_contacts.fn(src, None, "US", str(root))  # the task's body, no cache: as two runs would
    [generation] = [d for d in root.iterdir() if d.is_dir()]
    inodes = {p.name: p.stat().st_ino for p in generation.iterdir()}

    second = clean_contacts.fn(src, None, "US", str(root))

    assert {p.name: p.stat().st_ino for p in generation.iterdir()} == inodes  # not rewritten
    assert first.contacts.collect().height == second.contacts.collect().height == 2
    assert not list(root.glob("*.tmp"))
    assert os.stat(root).st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in generation.rglob("*") if p.is_file()} == {0o600}
