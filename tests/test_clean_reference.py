"""The fast engine (prepare()) against the plain reference (apollo_sync.clean.rules) on generated messy exports.

Every row must come out the same both ways: each cleaned field, the rejection reason and email as read, the row a
duplicate merged into, the fingerprint; in memory in one batch, in small batches (so duplicates cross batches)
with the engine's shortcuts turned on and off, and with Parquet parts. The reference's own text rules (whitespace,
lower-casing, case-insensitive words) are checked against polars on every code point they concern.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apollo_sync import settings as settings_module
from apollo_sync.clean import EngineOptions, Mapping, prepare, rules
from apollo_sync.clean.payload import field_weight
from apollo_sync.errors import InputError

CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


# --- The reference's text rules are polars' ---------------------------------------------------------------


def test_whitespace_is_what_polars_strips_and_matches_as_whitespace() -> None:
    chars = pl.Series([chr(c) for c in CODE_POINTS])
    stripped = chars.str.strip_chars() == ""
    matched = chars.str.contains(r"^\s$")
    assert {chr(c) for c, s in zip(CODE_POINTS, stripped) if s} == rules.WHITESPACE
    assert {chr(c) for c, m in zip(CODE_POINTS, matched) if m} == rules.WHITESPACE
    assert not {"\x1c", "\x1d", "\x1e", "\x1f"} & rules.WHITESPACE  # str.isspace says otherwise


def test_lower_is_polars_lower_case_on_every_code_point() -> None:
    chars = [chr(c) for c in CODE_POINTS]
    assert pl.Series(chars).str.to_lowercase().to_list() == [rules.lower(c) for c in chars]
    words = ["ΑΣ", "ΑΣ|Β", "ΑΣ.Β", "ΑΣ:x", "ǅΣ", "aΣ\u0301", "ΟΔΥΣΣΕΥΣ", "İstanbul", "ẞ"]
    assert pl.Series(words).str.to_lowercase().to_list() == [rules.lower(w) for w in words]


def test_fold_is_how_polars_matches_ascii_letters_case_insensitively() -> None:
    chars = pl.Series([chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF])
    for letter in "abcdefghijklmnopqrstuvwxyz":
        matched = chars.filter(chars.str.contains(f"(?i)^{letter}$")).to_list()
        assert sorted(matched) == sorted(c for c in chars.to_list() if rules.fold(c) == letter), letter


def test_murmur3_matches_published_vectors_and_weights_match_the_engine() -> None:
    assert rules.murmur3_32(b"") == 0
    assert rules.murmur3_32(b"", seed=1) == 0x514E28B7
    assert rules.murmur3_32(b"hello") == 0x248BFA47
    assert rules.murmur3_32(b"The quick brown fox jumps over the lazy dog") == 0x2E4FF723
    for name in ("email", "label_names", "custom.f1"):
        assert rules.field_weight(name) == field_weight(name)


# --- Generated exports -------------------------------------------------------------------------------------

_SPACE = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\xa0", "\u2003", "\u3000", "\x85", "\x0b", "\u2028"])
_NOT_SPACE = st.sampled_from(["\x1f", "\u200b", "\ufeff", "\x1c"])  # kept: not whitespace


@st.composite
def messy(draw, values: st.SearchStrategy[str]) -> str | None:
    """A value with whitespace of every kind around or inside it, its case changed, or an empty cell."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.sampled_from(["", " ", "\t\xa0"]))
    value = draw(values)
    if kind == 2:
        value = value.upper()
    elif kind == 3:
        value = value.swapcase()
    if draw(st.booleans()):
        value = draw(_SPACE) + value + draw(st.one_of(_SPACE, st.just("")))
    if kind == 4 and " " in value:
        value = value.replace(" ", draw(_SPACE), 1)
    if kind == 5:
        value += draw(_NOT_SPACE)
    return value


_text = st.text(alphabet=st.sampled_from(list("aZé Σσς,;.-@/:'ſ\u212aİı") + ["\t", "\xa0", "\x1f"]), max_size=10)
_any = st.one_of(_text, st.text(max_size=6))
EMAILS = st.one_of(
    st.sampled_from(["a@x.com", "Bob@Y.io", "zoë@bücher.de", "ok@xn--bcher-kva.de", "ann+tag@sub.example.co.uk",
                     "bad@", "a..b@x.com", "x@localhost", "tim at x.com", "a b@x.com", "x@mail.test", "ab--c@x.com"]),
    st.emails().map(str), _text,
)
FIRST = st.one_of(st.sampled_from(["Ann", "ann", "Bob", "Zoë", "Mary Ann", "ΑΣ", "ſt"]), _text)
LAST = st.one_of(st.sampled_from(["Smith", "van der Berg", "McDonald", "Ο'ΔΥΣ"]), _text)
COMPANY = st.one_of(st.sampled_from(["Acme", "Acme Inc", "Globex", "İnc"]), _text)
FULL = st.one_of(
    st.sampled_from(["Jan van der Berg", "Smith, John", "Smith , John", "John Smith, Jr.", "Cher", "Mary Ann Smith",
                     "ST. John Doe", "Ann ſt Smith", "Maria DE LA Cruz", "John Smith , Jr.", "Doe, PhD", "A, B, C",
                     "Bob Smith iii", "Bob Smith ııı", "Ed Ka"]),
    st.lists(st.sampled_from(["Ann", "van", "De", "Jr.", "sr", "st.", "Smith,", ",", "Lee"]), min_size=1, max_size=5)
    .map(" ".join),
)
PHONES = st.one_of(
    st.sampled_from(["(415) 555-0123", "+1 415.555.0123 x12", "1-415-555-0123", "+44 20 7946 0958",
                     "+44 (0)20 7946 0958", "020 7946 0958", "123", "call me", "+49 30 901820", "(415) ٥٥٥-0123",
                     "４１５-555-0123", "+33 1 23 45 67 89", "+7 916 123 4567", "+1 155 555 0123", "+39 06 1234 5678",
                     "415 555 0123 ext. 7", "+61 2 9876 5432", "+999 123",
                     # national numbers of several regions: valid only where the row's country (or region) fits
                     "03 23 51 11 14", "0323511114", "(0)3-23-51-11-14", "030 901820", "07911 123456", "06 1234 5678",
                     "91 123 45 67", "98765 43210", "03-1234-5678", "8 916 123 4567", "(876) 555-0123",
                     # the 00 international prefix, and what is left of it
                     "001-212-555-0100", "0044 20 7946 0958", "00 33 1 23 45 67 89", "0049 30 901820", "00", "0012",
                     "00 1 268 464 1234"]),
    st.builds("".join, st.lists(st.sampled_from(list("0123456789+- ().x")), max_size=16)),
)
WEBSITES = st.one_of(
    st.sampled_from(["HTTP://WWW.Acme.com/about?x=1", "acme.com", "not a site", "https://sub.example.co.uk:8080/x",
                     "www.x.io.", "ftp://a-b.com", "a@b.com", "bücher.de", "-a.com", "x.c0m", "WWW.Acme.com/"]),
    _text,
)
LINKEDINS = st.one_of(
    st.sampled_from(["linkedin.com/in/JDoe/", "  uk.linkedin.com/in/y#top ", "http://linkedin.com//x?a=b/c",
                     "linkedin.com/", "twitter.com/x", "https://www.linkedin.com/in/zoë", "linkedin.com/in/a b",
                     "https://linkedin.com.evil.io/x", "\u3000linkedin.com/in/q"]),
    _text,
)
LABELS = st.one_of(st.sampled_from(["vip; Q4 import, vip", " ; ", "a,b", "Vip;vip", "x\\y", 'say "hi"']), _text)
PLACES = st.one_of(st.sampled_from(["Austin", "TX", "USA", "a\x1f", "\x1fb", "Paris", "France"]), _text)
COUNTRIES = st.one_of(  # names, ISO-2 and ISO-3 codes, phonenumbers' names in other languages, and what is none
    st.sampled_from(["France", "FR", "fra", "Deutschland", "DEU", "Germany", "UK", "United Kingdom", "gb", "Japan",
                     "IT", "Spain", "India", "JM", "United States", "USA", "Narnia", "44", "Российская Федерация",
                     "Kingdom"]),
    PLACES,
)
HUGE = [  # cells at the limit and just past it, in bytes (é is two)
    "x" * settings_module.MAX_CELL_BYTES, "x" * (settings_module.MAX_CELL_BYTES + 1),
    "é" * (settings_module.MAX_CELL_BYTES // 2), "é" * (settings_module.MAX_CELL_BYTES // 2) + "x",
    "a@x.com" + " " * settings_module.MAX_CELL_BYTES, "(415) 555-0123" + "0" * settings_module.MAX_CELL_BYTES,
]

COLUMNS = {  # header -> values (spellings from the alias list; several may feed one field)
    "Email": EMAILS, "Work Email": EMAILS, "First Name": FIRST, "given_name": FIRST, "Last Name": LAST,
    "Surname": LAST, "Full Name": FULL, "Company": COMPANY, "Employer": COMPANY, "Job Title": _any,
    "Website": WEBSITES, "Company Domain": WEBSITES, "LinkedIn": LINKEDINS, "LinkedIn URL": LINKEDINS,
    "Phone": PHONES, "Work Phone": PHONES, "Mobile": PHONES, "Office Phone": PHONES, "Home Phone": PHONES,
    "Other Phone": PHONES, "Tags": LABELS, "Lists": LABELS, "City": PLACES, "Town": PLACES, "State": PLACES,
    "Country": COUNTRIES, "Country Code": COUNTRIES, "Address": _any, "Owner ID": _any, "Contact Stage ID": _any,
    "Notes": _any,
    "Score": _any, "Tier": _any,
}
CONSTANTS = {
    "title": st.sampled_from(["Unknown", " padded ", ""]), "contact_stage_id": st.just("stage-1"),
    "label_names": st.sampled_from([["Q4 import"], ["vip", "vip"], [], [" raw "]]),
    "direct_phone": st.sampled_from(["(415) 555-0199", " +44 20 7946 0958 ", "junk", "   "]),
    "organization_name": st.just("Apollo"), "first_name": st.just("Pat"), "custom.tier": st.just("gold"),
    "website_url": st.just("Acme.com"), "present_raw_address": st.just("Somewhere"),
}


@st.composite
def exports(draw) -> tuple[list[str], list[dict], Mapping, str, bool]:
    """(columns, rows, mapping, phone region, source_row given) of a generated messy export."""
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, max_size=12, unique=True))
    # Mostly with columns that can give an identity (else prepare() only raises InputError).
    anchor = draw(st.sampled_from(
        [(), ("Email",), ("Email",), ("First Name", "Last Name", "Company"), ("Full Name", "Company")]
    ))
    names += [c for c in anchor if c not in names]
    customs = {c: f"custom.{c.lower()}" for c in ("Score", "Tier") if c in names and draw(st.booleans())}
    constants = {k: draw(v) for k, v in CONSTANTS.items() if draw(st.integers(0, 4)) == 0}
    ignore = tuple(c for c in names if c == "Notes" or draw(st.integers(0, 15)) == 0)
    mapping = Mapping(columns=customs, constants=constants, ignore=ignore)
    height = draw(st.integers(0, 24))
    # Values from small pools per column, so identities repeat across the frame.
    pools = {c: draw(st.lists(messy(COLUMNS[c]), min_size=1, max_size=5)) for c in names}
    rows = [{c: draw(st.sampled_from(pools[c])) for c in names} for _ in range(height)]
    if rows and draw(st.integers(0, 3)) == 0:  # an oversized cell (or one at the limit) somewhere
        rows[draw(st.integers(0, height - 1))][draw(st.sampled_from(names))] = draw(st.sampled_from(HUGE))
    numbered = draw(st.booleans())
    if numbered:
        order = draw(st.permutations(range(height)))
        for row, n in zip(rows, order):
            row["source_row"] = 10 * n + 7
    region = draw(st.sampled_from(["US", "GB", "de", "CA", "IN", "FR", "JP", "JM"]))
    return names, rows, mapping, region, numbered


def frame_of(names: list[str], rows: list[dict], numbered: bool) -> pl.DataFrame:
    schema = {c: pl.String for c in names} | ({"source_row": pl.Int64} if numbered else {})
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def collected(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    return frame.collect() if isinstance(frame, pl.LazyFrame) else frame


def assert_same(prepared, reference: rules.Reference) -> None:
    """prepare()'s results equal the reference's, row by row."""
    contacts = collected(prepared.contacts).sort("source_row")  # survivors of duplicates come last: compare by row
    if reference.contacts:
        assert contacts.columns == list(reference.contacts[0])
    wanted = sorted(reference.contacts, key=lambda contact: contact["source_row"])
    for got, want in zip(contacts.to_dicts(), wanted, strict=True):
        assert got == want, (got, want)
    rejected = collected(prepared.rejected).to_dicts()
    for got, want in zip(rejected, reference.rejected, strict=True):
        assert {**got, "original": json.loads(got["original"])} == want
    assert collected(prepared.duplicates).to_dicts() == reference.duplicates
    assert prepared.phones_dropped_by_reason == reference.phones_dropped
    assert prepared.phones_dropped == sum(reference.phones_dropped.values())
    assert prepared.rows_read == len(reference.outcomes)
    assert prepared.unmapped_columns == reference.unmapped_columns
    assert prepared.column_map == reference.column_map


@st.composite
def tunings(draw, height: int) -> EngineOptions:
    """Engine options that push ``height`` rows down the slower paths: in 1-4 batches (the first short), so
    duplicates cross batches; nothing or everything cleaned per distinct value; sparse columns built whole or on
    their values; identity and distinct-value hashes cut to 1 or 0 bits (every hash collides)."""
    batches = draw(st.integers(1, 4))
    return EngineOptions(
        batch_rows=max(1, -(-height // batches)),  # a batch count, not a size: each batch costs ~10 ms
        first_batch_rows=draw(st.integers(1, 5)),
        repeats=draw(st.sampled_from([1, 4, 10**9])),
        sample_rows=draw(st.sampled_from([1, 2_000])),
        sparse_share=draw(st.sampled_from([0.0, 0.5, 1.0])),
        hash_bits=draw(st.sampled_from([64, 64, 1, 0])),
    )


@settings(
    max_examples=int(os.environ.get("CLEAN_REFERENCE_EXAMPLES", 100)),  # more for a long run: ~65 ms an example
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # This test failed twice in full runs and passed on rerun, its output lost (no example was left in the
    # database either): a failure prints the @reproduce_failure blob, so the case can be replayed exactly.
    print_blob=True,
)
@given(exports(), st.data())
def test_prepare_gives_what_the_rules_say(tmp_path_factory, export, data: st.DataObject) -> None:
    names, rows, mapping, region, numbered = export
    df = frame_of(names, rows, numbered)
    try:
        reference = rules.prepare_rows([*names, *(["source_row"] if numbered else [])], rows, mapping=mapping,
                                       phone_region=region)
    except InputError as exc:
        event("no identity columns: InputError")
        with pytest.raises(InputError) as raised:
            prepare(df, mapping=mapping, phone_region=region)
        assert str(raised.value) == str(exc)
        return
    reasons = {r["reason"] for r in reference.rejected}
    event(f"rejected too_large: {'too_large' in reasons}")
    for why, count in reference.phones_dropped.items():
        event(f"phones dropped {why}: {bool(count)}")
    for what, happened in (("duplicates", reference.duplicates), ("rejected", reference.rejected),
                           ("phones dropped", sum(reference.phones_dropped.values())), ("contacts", reference.contacts)):
        event(f"has {what}: {bool(happened)}")
    assert_same(prepare(df, mapping=mapping, phone_region=region), reference)  # one batch, in memory
    tuning = data.draw(tunings(len(rows)), label="tuning")
    assert_same(prepare(df.lazy(), mapping=mapping, phone_region=region, options=tuning), reference)
    if data.draw(st.integers(0, 5), label="spill") == 0:  # with Parquet parts now and then (each costs files)
        out = Path(tmp_path_factory.mktemp("parts"))
        assert_same(prepare(df.lazy(), mapping=mapping, phone_region=region, out_dir=out, options=tuning), reference)


def test_a_collision_and_cross_batch_fill_example() -> None:
    """One fixed export through every path, so a failure here reads without hypothesis."""
    names = ["Email", "First Name", "Last Name", "Company", "Job Title", "Phone", "Full Name"]
    rows = [
        {"Email": " A@X.com", "First Name": None, "Last Name": "Z", "Company": "Acme", "Job Title": None,
         "Phone": "(415) ٥٥٥-0123", "Full Name": None},
        {"Email": None, "First Name": "Tim", "Last Name": "Zheng", "Company": "Apollo", "Job Title": "CEO",
         "Phone": "123", "Full Name": None},
        {"Email": "a@x.com", "First Name": "Ann", "Last Name": None, "Company": None, "Job Title": "CTO",
         "Phone": None, "Full Name": None},
        {"Email": "\u3000", "First Name": " TIM", "Last Name": "zheng\xa0", "Company": "apollo", "Job Title": None,
         "Phone": "+44 20 7946 0958", "Full Name": None},
    ]
    reference = rules.prepare_rows(names, rows)
    assert [c["source_row"] for c in reference.contacts] == [1, 2]
    assert reference.contacts[0]["first_name"] == "Ann" and reference.contacts[0]["direct_phone"] == "+14155550123"
    assert reference.duplicates == [{"source_row": 3, "email": "a@x.com", "merged_into": 1},
                                    {"source_row": 4, "email": None, "merged_into": 2}]
    df = frame_of(names, rows, numbered=False)
    for options in (EngineOptions(), EngineOptions(batch_rows=1, hash_bits=0), EngineOptions(batch_rows=3)):
        assert_same(prepare(df.lazy(), options=options), reference)
