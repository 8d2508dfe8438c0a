"""prepare() in batches and with Parquet parts (out_dir): the same results as one batch in memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync.clean.mapping import Mapping
from apollo_sync.clean.payload import contact_fingerprint, payload_fields, with_payload
from apollo_sync.clean import DONE_MARKER, EngineOptions, prepare
from apollo_sync.clean.engine import batches

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from make_crm_export import generate  # noqa: E402


@pytest.fixture(scope="module")
def export() -> tuple[pl.DataFrame, dict]:
    return generate(3000, seed=11)


def _collected(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    return frame.collect() if isinstance(frame, pl.LazyFrame) else frame


@pytest.mark.parametrize("lazy", [False, True])
def test_batches_give_the_same_results_as_one_batch(export, lazy: bool) -> None:
    df, truth = export
    whole = prepare(df, options=EngineOptions(batch_rows=10_000))
    batched = prepare(df.lazy() if lazy else df, options=EngineOptions(batch_rows=250))
    for name in ("contacts", "rejected", "duplicates"):
        assert_frame_equal(getattr(batched, name), getattr(whole, name))
    assert (batched.rows_read, batched.phones_dropped) == (whole.rows_read, whole.phones_dropped) == (3000, whole.phones_dropped)
    assert batched.duplicates.height == truth["duplicates_in_source"]
    assert batched.contacts_count == whole.contacts.height
    # duplicates cross batch boundaries: some survivor and its duplicate are in different batches
    crossing = batched.duplicates.filter((pl.col("source_row") - 1) // 250 != (pl.col("merged_into") - 1) // 250)
    assert crossing.height > 0


def test_out_dir_writes_parquet_parts_and_scans_them(export, tmp_path: Path) -> None:
    df, truth = export
    whole = prepare(df)
    out = tmp_path / "prepared"
    spilled = prepare(df.lazy(), out_dir=out, options=EngineOptions(batch_rows=700))
    assert isinstance(spilled.contacts, pl.LazyFrame)
    for name in ("contacts", "rejected", "duplicates"):
        assert_frame_equal(getattr(spilled, name).collect(), getattr(whole, name))
    assert spilled.contacts_count == whole.contacts.height
    assert spilled.rejected_count == truth["invalid_email"] + truth["missing_identity"]
    assert spilled.duplicates_count == truth["duplicates_in_source"]
    assert not list(out.glob("clean-*"))  # the cleaned rows between passes are gone
    assert not list(out.glob("source-*"))  # and so is the source's Parquet copy both passes read
    marker = json.loads((out / DONE_MARKER).read_text())
    assert marker["rows_read"] == 3000 and marker["contacts_count"] == whole.contacts.height
    # a second run into the same directory replaces the parts, never adds to them
    again = prepare(df.head(100), out_dir=out, options=EngineOptions(batch_rows=700))
    assert again.contacts.collect().height == again.contacts_count < 100


def test_fill_from_a_duplicate_in_a_later_batch() -> None:
    df = pl.DataFrame(
        {
            "Email": ["a@x.com", "b@x.com", "c@x.com", " A@X.com "],
            "Title": [None, "CTO", None, "CEO"],
        }
    )
    p = prepare(df, options=EngineOptions(batch_rows=2))
    assert p.contacts.sort("source_row").select("source_row", "title").rows() == [(1, "CEO"), (2, "CTO"), (3, None)]
    assert p.duplicates.rows() == [(4, "a@x.com", 1)]
    # The fingerprint is computed before the dedupe: a filled survivor's must be redone from its final fields.
    assert p.contacts.get_column("fingerprint").to_list() == _fingerprints_of(p.contacts)


def _fingerprints_of(contacts: pl.DataFrame) -> list[str]:
    return contacts.select(contact_fingerprint(payload_fields(contacts.columns))).to_series().to_list()


def test_fingerprints_match_the_final_contacts(export) -> None:
    df, _ = export
    p = prepare(df.lazy(), options=EngineOptions(batch_rows=250))
    assert p.contacts.get_column("fingerprint").to_list() == _fingerprints_of(p.contacts)


def test_empty_lazy_frame_keeps_schemas(tmp_path: Path) -> None:
    empty = pl.DataFrame({"Email": pl.Series([], dtype=pl.String)})
    mem = prepare(empty.lazy(), options=EngineOptions(batch_rows=2))
    disk = prepare(empty.lazy(), out_dir=tmp_path, options=EngineOptions(batch_rows=2))
    for name in ("contacts", "rejected", "duplicates"):
        assert_frame_equal(_collected(getattr(disk, name)), getattr(mem, name))
        assert getattr(mem, name).height == 0


def test_batches_are_batch_rows_long() -> None:
    df = pl.DataFrame({"a": [str(i) for i in range(1000)]})
    lf = df.lazy().with_row_index("source_row", offset=1)
    assert [b.height for b in batches(df, lf, EngineOptions(batch_rows=300))] == [300, 300, 300, 100]
    assert [b.height for b in batches(df, lf, EngineOptions(batch_rows=5000))] == [1000]
    assert pl.concat(list(batches(df.lazy(), lf, EngineOptions(batch_rows=300))))["source_row"].to_list() == list(
        range(1, 1001)
    )


def test_a_spilled_source_is_read_by_slices_the_first_one_short(tmp_path: Path) -> None:
    """The source's Parquet copy is read a slice at a time (never collect_batches, which reads ahead without
    bound): the same rows in order, the first batch short, one empty batch for no rows."""
    from apollo_sync.clean.engine import spill_source

    lf = pl.DataFrame({"a": [str(i) for i in range(1000)]}).lazy().with_row_index("source_row", offset=1)
    copy = spill_source(lf, tmp_path / "source.parquet")
    assert copy.height == 1000
    found = list(batches(copy.frame, copy.frame, EngineOptions(batch_rows=300, first_batch_rows=100), copy.height))
    assert [b.height for b in found] == [100, 300, 300, 300]
    assert pl.concat(found)["source_row"].to_list() == list(range(1, 1001))
    empty = spill_source(lf.head(0), tmp_path / "empty.parquet")
    assert [b.height for b in batches(empty.frame, empty.frame, EngineOptions(), empty.height)] == [0]


def test_the_first_batch_is_short_so_cleaning_starts_early() -> None:
    df = pl.DataFrame({"a": [str(i) for i in range(1000)]})
    lf = df.lazy().with_row_index("source_row", offset=1)
    found = list(batches(df.lazy(), lf, EngineOptions(batch_rows=300, first_batch_rows=100)))
    assert [b.height for b in found] == [100, 300, 300, 300]
    assert pl.concat(found)["source_row"].to_list() == list(range(1, 1001))
    # batches never exceed batch_rows
    assert [b.height for b in batches(df.lazy(), lf, EngineOptions(batch_rows=50, first_batch_rows=100))] == [50] * 20


def test_payload_escapes_only_where_needed_and_reads_back_exactly() -> None:
    titles = ["CEO", 'Head of "R&D"', "back\\slash", "tab\u0001ctl", "Plain"]
    df = pl.DataFrame(
        {
            "Email": [f"p{i}@x.com" for i in range(5)],
            "Title": titles,
            "Tags": ["a;b", 'say "hi"', None, "x\\y", "z"],
            "Score": ["1", "2", 'q"3', "4", "5"],
        }
    )
    mapping = Mapping(columns={"Score": "custom.abc"})
    whole = prepare(df, mapping=mapping)
    batched = prepare(df, mapping=mapping, options=EngineOptions(batch_rows=2))  # batches [0,1] [2,3] [4]: only some need escaping
    assert_frame_equal(batched.contacts, whole.contacts)
    # The loader writes payloads a chunk at a time: chunks [0,1] [2,3] [4] differ in what needs escaping.
    payload = with_payload(whole.contacts).get_column("payload")
    chunked = pl.concat([with_payload(whole.contacts.slice(i, 2)).get_column("payload") for i in range(0, 5, 2)])
    assert chunked.to_list() == payload.to_list()
    decoded = [json.loads(p) for p in payload.to_list()]
    assert [d["title"] for d in decoded] == titles
    assert [d.get("label_names") for d in decoded] == [["a", "b"], ['say "hi"'], None, ["x\\y"], ["z"]]
    assert [d["typed_custom_fields"]["abc"] for d in decoded] == ["1", "2", 'q"3', "4", "5"]


def test_parquet_parts_through_plan_and_report_match_the_in_memory_run(export, tmp_path: Path) -> None:
    """The path on Parquet parts, planned part by part (plan, results, summary, report files), equals the eager one."""
    from apollo_sync.ledger import open_ledger
    from apollo_sync.report import build_summary, results_frame, write_report

    df, truth = export
    eager, lazy = prepare(df), prepare(df.lazy(), out_dir=tmp_path / "parts", options=EngineOptions(batch_rows=800))
    ledger = open_ledger(tmp_path / "state")
    try:
        some = eager.contacts.head(500).select("identity", "fingerprint", pl.lit("created").alias("outcome"),
                                              pl.lit("id").alias("apollo_id"))
        ledger.record("t", some, "run-1")  # 500 confirmed: unchanged in both plans
        reports = {}
        for name, p in (("eager", eager), ("lazy", lazy)):
            parts = [p.contacts] if name == "eager" else list(p.contacts.collect_batches(chunk_size=300))
            assert len(parts) == (1 if name == "eager" else -(-p.contacts_count // 300))
            planned = [ledger.plan("t", part) for part in parts]
            outcomes = pl.concat([
                f.lazy().select("source_row", "email", pl.lit(o).alias("outcome")) for to_send, unchanged in planned
                for f, o in ((unchanged, "unchanged"), (to_send, "would_send"))
            ])
            results = results_frame(p.rejected, p.duplicates, outcomes if name == "lazy" else outcomes.collect())
            summary = build_summary(rows_read=p.rows_read, results=results)
            reports[name] = (summary, write_report(tmp_path / name, summary, results, p.rejected))
    finally:
        ledger.close()
    (s_eager, d_eager), (s_lazy, d_lazy) = reports["eager"], reports["lazy"]
    assert s_lazy == s_eager
    assert s_lazy["unchanged"] == 500 and s_lazy["duplicates_in_source"] == truth["duplicates_in_source"]
    assert_frame_equal(pl.read_parquet(d_lazy / "results.parquet"), pl.read_parquet(d_eager / "results.parquet"))
    for csv in ("results.csv", "rejected.csv"):
        assert (d_lazy / csv).read_text() == (d_eager / csv).read_text()


@pytest.mark.parametrize("bits", [0, 1])
def test_identity_hash_collisions_never_merge_different_identities(export, bits: int) -> None:
    df, truth = export
    honest = prepare(df.lazy(), options=EngineOptions(batch_rows=700))
    collided = prepare(df.lazy(), options=EngineOptions(batch_rows=700, hash_bits=bits))  # 1 or 2 hash values
    for name in ("contacts", "rejected", "duplicates"):  # more candidates (held to the end): the order moves
        assert_frame_equal(getattr(collided, name).sort("source_row"), getattr(honest, name).sort("source_row"))
    assert collided.duplicates.height == truth["duplicates_in_source"]
