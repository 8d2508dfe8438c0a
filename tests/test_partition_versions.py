"""One version per contact across partitions (issue 17): which rows lose, how the ledger keeps them, how a child
finds its lost rows, and pruning of old runs. Ledger tests run on SQLite and on PostgreSQL."""

from __future__ import annotations

import random

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync.ledger import open_ledger
from apollo_sync.ledger.base import LOSERS_SCHEMA
from apollo_sync.params import RunParams
from apollo_sync.partitions import lost_rows, parent_partition, partition_losers
from services import postgres  # noqa: F401 - fixture


def ids(rows: list[tuple[int, str | None]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"source_row": pl.Int64, "identity": pl.String}, orient="row")


def reference_losers(frames, labels):
    """The rule, spelled out: an identity's winner is its first row in the first partition holding it."""
    winner: dict[str, tuple[int, int]] = {}
    for p, frame in enumerate(frames):
        for row, identity in sorted(frame.iter_rows()):
            if identity is not None and identity not in winner:
                winner[identity] = (p, row)
    out = []
    for p, frame in enumerate(frames):
        for row, identity in sorted(frame.iter_rows()):
            if identity is not None and winner[identity][0] != p:
                wp, wr = winner[identity]
                out.append((p, row, identity, wp, labels[wp], wr))
    return pl.DataFrame(out, schema=LOSERS_SCHEMA, orient="row")


def test_the_first_partition_and_its_first_row_win_every_later_copy_loses():
    frames = [
        ids([(1, "a"), (2, "b"), (3, "a")]),  # a twice in partition 0: the child's own dedupe, not a loser
        ids([(1, "c"), (2, "a"), (3, None)]),
        ids([(5, "b"), (1, "c"), (2, "d")]),  # rows out of order: row 1 still comes first
    ]
    losers = partition_losers(frames, ["p0.csv", "p1.csv", "p2.csv"])
    expected = pl.DataFrame(
        [(1, 2, "a", 0, "p0.csv", 1), (2, 1, "c", 1, "p1.csv", 1), (2, 5, "b", 0, "p0.csv", 2)],
        schema=LOSERS_SCHEMA, orient="row",
    )  # fmt: skip
    assert_frame_equal(losers, expected)
    assert partition_losers([], []).schema == pl.Schema(LOSERS_SCHEMA)
    assert partition_losers([ids([(1, "a")]), ids([(1, "b")])]).height == 0
    with pytest.raises(ValueError, match="2 partitions but 1 labels"):
        partition_losers(frames[:2], ["x"])


def test_losers_agree_with_the_plain_rule_on_generated_partitions():
    rng = random.Random(17)
    for _ in range(30):
        frames = []
        for _p in range(rng.randint(1, 5)):
            rows = rng.sample(range(1, 60), rng.randint(0, 25))
            frames.append(ids([(r, rng.choice([None, *"abcdefghij"])) for r in rows]))
        labels = [f"part-{i}" for i in range(len(frames))]
        assert_frame_equal(partition_losers(frames, labels), reference_losers(frames, labels))


def test_a_child_knows_its_parent_and_number_and_a_plain_run_is_no_child():
    assert parent_partition(RunParams()) is None
    assert parent_partition(RunParams(parent_partition="0b3c-uuid:12")) == ("0b3c-uuid", 12)
    with pytest.raises(ValueError):
        RunParams(parent_partition="no-number")




@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.e2e])])
def ledger(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with open_ledger(tmp_path / "state", url) as opened:
        yield opened


def test_the_ledger_keeps_a_parents_losers_and_a_retried_parent_replaces_them(ledger):
    first = partition_losers([ids([(1, "a"), (2, "b")]), ids([(4, "b"), (9, "a"), (10, "z")])], ["one", "two"])
    ledger.store_losers("parent-1", first)
    ledger.store_losers("parent-2", first.head(1))
    assert_frame_equal(ledger.losers("parent-1", 1, 1, 100), first)
    assert ledger.losers("parent-1", 1, 5, 9)["source_row"].to_list() == [9]  # only the part's rows
    assert ledger.losers("parent-1", 0, 1, 100).height == 0
    ledger.store_losers("parent-1", first.tail(1))  # a retried parent decides again
    assert ledger.losers("parent-1", 1, 1, 100)["source_row"].to_list() == [9]
    assert ledger.losers("parent-2", 1, 1, 100)["source_row"].to_list() == [4]


def test_lost_rows_are_the_parts_rows_another_partition_sends_with_the_reason(ledger):
    losers = partition_losers([ids([(1, "a"), (2, "b")]), ids([(3, "x"), (4, "b"), (17, "a")])], ["one", "two"])
    ledger.store_losers("parent", losers)
    part = pl.DataFrame({"source_row": [3, 4, 17], "identity": ["x", "b", "a"], "email": ["x@e", "b@e", "a@e"]})
    child = RunParams(parent_partition="parent:1")
    lost = lost_rows(ledger, child, part)
    assert lost.columns == [*part.columns, "reason"]
    assert lost.select("source_row", "email", "reason").rows() == [
        (4, "b@e", "also in partition 000 (row 2), which is sent"),
        (17, "a@e", "also in partition 000 (row 1), which is sent"),
    ]
    # the winning partition, a plain run and an identity that changed since the parent looked lose nothing
    assert lost_rows(ledger, RunParams(parent_partition="parent:0"), part).height == 0
    plain = lost_rows(ledger, RunParams(), part)
    assert plain.height == 0 and plain.columns == [*part.columns, "reason"]
    assert lost_rows(ledger, child, part.with_columns(identity=pl.lit("other"))).height == 0


def test_pruning_deletes_old_runs_and_their_losers_and_keeps_recent_ones_and_the_ledger_rows(ledger):
    ledger.store_losers("parent", partition_losers([ids([(1, "a")]), ids([(1, "a")])], ["p", "q"]))
    rows = pl.DataFrame({"identity": ["a"], "fingerprint": ["f"]})
    ledger.claim("t", rows, "child")
    ledger.record("t", rows.with_columns(outcome=pl.lit("created"), apollo_id=pl.lit("A1")), "child")
    ledger.finish("child")
    assert ledger.prune_runs(7 * 86400) == 0
    assert ledger.prune_runs(0.0) == 0  # a retention is never shorter than the claim lease
    ledger.lease_seconds = 0.0  # now everything is older than the retention
    assert ledger.prune_runs(0.0) == 2
    assert ledger.losers("parent", 1, 1, 10).height == 0
    assert ledger.status_counts("t") == {"created": 1}  # the memory of what was sent stays
    ledger.lease_seconds = 300.0
    ledger.store_losers("parent", partition_losers([ids([(1, "a")]), ids([(2, "a")])], ["p", "q"]))
    assert ledger.prune_runs(3600.0) == 0 and ledger.losers("parent", 1, 1, 10).height == 1
