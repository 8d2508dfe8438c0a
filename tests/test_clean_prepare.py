"""prepare(): each cleaning, validation and dedupe rule with its edge cases; payloads and fingerprints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from apollo_sync.clean import expressions as ex
from apollo_sync.errors import InputError
from apollo_sync.clean.mapping import Mapping
from apollo_sync.report import escape_for_spreadsheet
from apollo_sync.clean.payload import contact_fingerprint, field_weight, with_payload
from apollo_sync.clean import EngineOptions, prepare, rules

ROOT = Path(__file__).resolve().parent.parent


def frame(**columns: list[str | None]) -> pl.DataFrame:
    """An all-String frame like the one sources.read_source gives (without source_row)."""
    return pl.DataFrame({k: pl.Series(v, dtype=pl.String) for k, v in columns.items()})


def payloads(prepared) -> list[dict]:
    """The JSON bodies the loader would send for ``prepared``'s contacts."""
    return [json.loads(p) for p in with_payload(prepared.contacts).get_column("payload").to_list()]


# --- Cleaning ------------------------------------------------------------------------------


def test_clean_text_trims_collapses_and_nulls_empty() -> None:
    got = frame(x=["  a  b ", "\tx\u00a0 y\n", "", "   ", None, "McDonald", "van der Berg"]).select(
        ex.clean_text(pl.col("x"))
    )
    assert_frame_equal(got, frame(x=["a b", "x y", None, None, None, "McDonald", "van der Berg"]))


def test_names_are_trimmed_and_keep_their_case() -> None:
    p = prepare(frame(**{"First Name": ["  Ronald ", "Jan"], "Last Name": ["McDonald  ", " van  der Berg"],
                         "Email": ["r@mcd.com", "jan@vdb.nl"]}))
    assert_frame_equal(
        p.contacts.select("first_name", "last_name"),
        frame(first_name=["Ronald", "Jan"], last_name=["McDonald", "van der Berg"]),
    )


def test_email_is_trimmed_and_lower_cased() -> None:
    p = prepare(frame(Email=["  Tim.Zheng@Example.COM\t", "ANN+tag@Sub.Example.co.uk"]))
    assert p.contacts.get_column("email").to_list() == ["tim.zheng@example.com", "ann+tag@sub.example.co.uk"]
    assert p.contacts.get_column("identity").to_list() == [
        "email:tim.zheng@example.com",
        "email:ann+tag@sub.example.co.uk",
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("linkedin.com/in/JDoe/", "https://www.linkedin.com/in/jdoe"),
        ("  uk.linkedin.com/in/y#top ", "https://www.linkedin.com/in/y"),
        ("https://www.linkedin.com/in/linkedin.com/", "https://www.linkedin.com/in/linkedin.com"),
        ("http://linkedin.com//x?a=b/c", "https://www.linkedin.com//x"),
        ("linkedin.com/in/a b", "https://www.linkedin.com/in/a"),
        ("https://www.linkedin.com/in/zoë", "https://www.linkedin.com/in/zoë"),
        ("linkedin.com/", None),
        ("linkedin.com", None),
        ("linkedin.com/?trk=1", None),
        ("https://linkedin.com.evil.io/x", None),
        ("www.example.com/linkedin.com/in/x", None),
    ],
)
def test_linkedin_urls(url: str, expected: str | None) -> None:
    got = pl.DataFrame({"u": [url]}).select(ex.linkedin(pl.col("u"))).item()
    assert got == expected


@pytest.mark.parametrize(
    "bad",
    ["n/a", "tim@", "@example.com", "tim..z@example.com", "tim@@example.com", "tim at example.com",
     "tim@example", "tim@localhost", "tim@example.com.", "tim@-x.com", "tim@mail.test", "a b@example.com"],
)
def test_present_invalid_email_rejects_the_row(bad: str) -> None:
    p = prepare(frame(**{"Email": [bad], "First Name": ["Tim"], "Last Name": ["Z"], "Company": ["Apollo"]}))
    assert p.contacts.height == 0
    assert_frame_equal(
        p.rejected.select("source_row", "email", "reason"),
        pl.DataFrame({"source_row": [1], "email": [bad], "reason": ["invalid_email"]}),
    )


def test_internationalised_email_is_checked_by_email_validator() -> None:
    p = prepare(frame(Email=["zoë@bücher.de", "ok@xn--bcher-kva.de"]))
    assert p.rejected.height == 0
    assert p.contacts.get_column("email").to_list() == ["zoë@bücher.de", "ok@bücher.de"]


def test_blank_email_is_no_email_not_an_invalid_one() -> None:
    p = prepare(frame(Email=["   "], **{"First Name": ["Tim"], "Last Name": ["Z"], "Company": ["Apollo"]}))
    assert p.rejected.height == 0
    assert p.contacts.get_column("identity").to_list() == ["name:tim|z|apollo"]


def test_rejected_rows_keep_their_original_values_as_json() -> None:
    p = prepare(frame(Email=[" BAD "], Phone=["=1+2"], Notes=[None]))
    assert json.loads(p.rejected.get_column("original")[0]) == {"Email": " BAD ", "Phone": "=1+2", "Notes": None}
    assert p.rejected.get_column("email").to_list() == [" BAD "]


@pytest.mark.parametrize(
    ("first", "last", "company"),
    [(None, None, None), ("Tim", "Z", None), ("Tim", None, "Apollo"), (None, "Z", "Apollo"), ("  ", "Z", "Apollo")],
)
def test_no_email_and_incomplete_name_is_missing_identity(first, last, company) -> None:
    p = prepare(frame(Email=[None], **{"First Name": [first], "Last Name": [last], "Company": [company]}))
    assert p.rejected.get_column("reason").to_list() == ["missing_identity"]
    assert p.contacts.height == 0


def test_no_identity_columns_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"no email or first/last name \+ company columns found in \['Name', 'Title'\]"):
        prepare(frame(Name=["Tim"], Title=["CEO"]))


def test_identity_columns_may_come_from_a_mapping_or_constants() -> None:
    mapping = Mapping(columns={"Mail": "email"})
    assert prepare(frame(Mail=["a@b.co"]), mapping=mapping).contacts.height == 1
    mapping = Mapping(constants={"organization_name": "Apollo"})
    p = prepare(frame(**{"First Name": ["Tim"], "Last Name": ["Z"]}), mapping=mapping)
    assert p.contacts.get_column("identity").to_list() == ["name:tim|z|apollo"]


# --- Phones --------------------------------------------------------------------------------


def test_phones_become_e164_and_unusable_ones_are_dropped_and_counted() -> None:
    raw = ["(415) 555-0123", "+1 415.555.0123 x12", "1-415-555-0123", "+44 20 7946 0958", "+44 (0)20 7946 0958",
           "020 7946 0958", "123", "call me", None, "+49 30 901820"]
    p = prepare(frame(Email=[f"p{i}@x.com" for i in range(len(raw))], Phone=raw))
    assert p.contacts.get_column("direct_phone").to_list() == [
        "+14155550123", "+14155550123", "+14155550123", "+442079460958", "+442079460958",
        None, None, None, None, "+4930901820",
    ]
    assert p.phones_dropped_by_reason == {"invalid": 2, "unparseable": 1}  # 020... in US and 123; "call me"
    assert p.phones_dropped == 3


def test_phone_region_decides_national_numbers() -> None:
    mobiles = ["020 7946 0958", "(415) 555-0123", "+1 (415) 555-0123", "12"]
    p = prepare(frame(Email=["a@x.com", "b@x.com", "c@x.com", "d@x.com"], Mobile=mobiles), phone_region="gb")
    # "(415) 555-0123" read in GB is +44 4155 550123: a possible length, but no such UK number.
    assert p.contacts.get_column("mobile_phone").to_list() == ["+442079460958", None, "+14155550123", None]
    assert p.phones_dropped_by_reason == {"invalid": 2, "unparseable": 0}  # "12" parses, as no valid number
    assert p.phones_dropped == 2


def test_unknown_phone_region_is_an_input_error() -> None:
    with pytest.raises(InputError, match="phone region"):
        prepare(frame(Email=["a@x.com"]), phone_region="XX")


def test_phones_in_rejected_rows_are_not_counted() -> None:
    p = prepare(frame(Email=["bad"], Phone=["123"]))
    assert p.phones_dropped == 0


# --- Other fields --------------------------------------------------------------------------


def test_website_linkedin_labels_and_address() -> None:
    p = prepare(
        frame(
            Email=["a@x.com", "b@x.com", "c@x.com"],
            Website=["HTTP://WWW.Acme.com/about?x=1", "acme.com", "not a site"],
            LinkedIn=["linkedin.com/in/JDoe/", "https://www.linkedin.com/in/jdoe?trk=1", "twitter.com/x"],
            Tags=["vip; Q4 import, vip", " ; ", None],
            City=["Austin", None, None],
            State=["TX", None, None],
            Country=["USA", "UK", None],
        )
    )
    got = p.contacts.select("website_url", "linkedin_url", "label_names", "present_raw_address")
    expected = pl.DataFrame(
        {
            "website_url": ["https://acme.com", "https://acme.com", None],
            "linkedin_url": ["https://www.linkedin.com/in/jdoe", "https://www.linkedin.com/in/jdoe", None],
            "label_names": [["vip", "Q4 import"], None, None],
            "present_raw_address": ["Austin, TX, USA", "UK", None],
        }
    )
    assert_frame_equal(got, expected)


@pytest.mark.parametrize(
    ("full", "first", "last"),
    [
        ("Jan van der Berg", "Jan", "van der Berg"),
        ("Mary Ann Smith", "Mary Ann", "Smith"),
        ("Smith, John", "John", "Smith"),
        ("John Smith, Jr.", "John", "Smith, Jr."),
        ("  Ronald   McDonald ", "Ronald", "McDonald"),
        ("Cher", "Cher", None),
    ],
)
def test_full_name_is_split(full: str, first: str, last: str | None) -> None:
    p = prepare(frame(Name=[full], Company=["Acme"], Email=["x@y.com"]))
    assert p.contacts.select("first_name", "last_name").row(0) == (first, last)


def test_mapping_custom_fields_and_constants_reach_the_payload() -> None:
    mapping = Mapping(
        columns={"Score": "custom.64f0a1", "Tier": "custom.64f0b2"},
        constants={"contact_stage_id": "stage-1", "label_names": ["Q4 import"], "title": "Unknown"},
    )
    p = prepare(frame(Email=["a@x.com", "b@x.com"], Score=["42", None], Tier=[None, None],
                      Title=["CEO", None], Tags=["vip", None]), mapping=mapping)
    assert payloads(p) == [
        {"email": "a@x.com", "title": "CEO", "label_names": ["vip", "Q4 import"], "contact_stage_id": "stage-1",
         "typed_custom_fields": {"64f0a1": "42"}},
        {"email": "b@x.com", "title": "Unknown", "label_names": ["Q4 import"], "contact_stage_id": "stage-1"},
    ]
    assert p.column_map == {"Email": "email", "Score": "custom.64f0a1", "Tier": "custom.64f0b2",
                            "Title": "title", "Tags": "label_names"}


def test_payload_holds_only_non_null_apollo_fields_and_escapes_json() -> None:
    p = prepare(frame(Email=["a@x.com"], **{"Job Title": ['Head of "R&D" \\ ops'], "Notes": ["secret"]}))
    assert with_payload(p.contacts).get_column("payload").to_list() == [
        '{"email":"a@x.com","title":"Head of \\"R&D\\" \\\\ ops"}'
    ]
    assert p.unmapped_columns == ["Notes"]


# --- Dedupe --------------------------------------------------------------------------------


def test_duplicates_by_email_merge_into_the_first_and_fill_its_gaps() -> None:
    p = prepare(
        frame(
            Email=["a@x.com", "b@x.com", " A@X.COM ", "a@x.com"],
            **{"First Name": ["Ann", "Bob", "Annie", None], "Job Title": [None, "CTO", "CEO", "COO"],
               "Phone": [None, None, None, "(415) 555-0123"]},
        )
    )
    assert_frame_equal(
        p.contacts.sort("source_row").select("source_row", "email", "first_name", "title", "direct_phone"),
        pl.DataFrame({"source_row": [1, 2], "email": ["a@x.com", "b@x.com"], "first_name": ["Ann", "Bob"],
                      "title": ["CEO", "CTO"], "direct_phone": ["+14155550123", None]}),
    )
    assert_frame_equal(
        p.duplicates,
        pl.DataFrame({"source_row": [3, 4], "email": ["a@x.com", "a@x.com"], "merged_into": [1, 1]}),
    )


def test_rows_without_email_dedupe_by_name_and_company_case_insensitively() -> None:
    p = prepare(
        frame(
            Email=[None, None, "tim@apollo.io", None],
            **{"First Name": ["Tim", " TIM ", "Tim", "Tim"], "Last Name": ["Zheng", "zheng", "Zheng", "Zheng"],
               "Company": ["Apollo", "apollo", "Apollo", "Apollo Inc"]},
        )
    )
    assert sorted(p.contacts.get_column("source_row").to_list()) == [1, 3, 4]
    assert p.duplicates.select("source_row", "merged_into").rows() == [(2, 1)]


def test_source_row_is_kept_when_given_and_numbered_when_absent() -> None:
    given = frame(Email=["a@x.com", "b@x.com"]).with_columns(pl.Series("source_row", [10, 12], dtype=pl.Int64))
    assert prepare(given).contacts.get_column("source_row").to_list() == [10, 12]
    assert prepare(frame(Email=["a@x.com", "b@x.com"]).lazy()).contacts.get_column("source_row").to_list() == [1, 2]


def test_every_row_ends_in_exactly_one_result() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from make_crm_export import generate

    export, truth = generate(3000, seed=3)
    p = prepare(export)
    rows = pl.concat([p.contacts.select("source_row"), p.rejected.select("source_row"), p.duplicates.select("source_row")])
    assert rows.get_column("source_row").sort().to_list() == list(range(1, 3001))
    reasons = p.rejected.get_column("reason").to_list()
    assert reasons.count("invalid_email") == truth["invalid_email"]
    assert reasons.count("missing_identity") == truth["missing_identity"]
    assert p.duplicates.height == truth["duplicates_in_source"]
    assert p.contacts.filter(pl.col("organization_name").is_not_null()).height > 0  # Company -> organization_name
    assert p.column_map["Company"] == "organization_name" and p.column_map["Job Title"] == "title"
    for name in ("first_name", "last_name", "organization_name", "title"):
        values = p.contacts.get_column(name).drop_nulls()
        assert (values == values.str.strip_chars()).all() and not values.str.contains("  ").any()
    for name in ("direct_phone", "mobile_phone"):
        assert p.contacts.get_column(name).drop_nulls().str.contains(r"^\+[1-9]\d{6,14}$").all()


# --- Fingerprint ---------------------------------------------------------------------------


FINGERPRINT_ROWS = [
    {"email": "a@x.com", "first_name": None, "title": None, "label_names": None, "custom.f1": None},
    {"email": "a@x.com", "first_name": "Zoë", "title": "R&D ✓", "label_names": ["vip", "Q4"], "custom.f1": "42"},
    {"email": None, "first_name": "x" * 101, "title": "", "label_names": [], "custom.f1": "0"},
    {"email": None, "first_name": None, "title": None, "label_names": None, "custom.f1": None},
]


def test_fingerprint_is_the_documented_sum_of_murmur3_hashes() -> None:
    df = pl.DataFrame(FINGERPRINT_ROWS, schema={"email": pl.String, "first_name": pl.String, "title": pl.String,
                                                 "label_names": pl.List(pl.String), "custom.f1": pl.String})
    got = df.select(contact_fingerprint(df.columns)).to_series().to_list()
    assert got == [rules.fingerprint(row) for row in FINGERPRINT_ROWS]  # the pure-Python MurmurHash3 sum
    assert got[3] == "0" and len(set(got)) == 4
    # Weights above 2**63 make the sum wrap: the check above holds only if polars wraps modulo 2**64 too.
    assert any(field_weight(name) > 2**63 for name in df.columns)


def test_fingerprint_changes_with_any_field_and_ignores_absent_ones() -> None:
    base = {"email": "a@x.com", "first_name": "Ann", "title": "CEO"}

    def fp(row: dict) -> str:
        return pl.DataFrame([row], schema={k: pl.String for k in row}).select(contact_fingerprint(list(row))).item()

    assert len({fp(base), fp({**base, "title": "CFO"}), fp({**base, "first_name": "Anne"}),
                fp({**base, "first_name": "CEO", "title": "Ann"})}) == 4
    assert fp(base) == fp({**base, "home_phone": None})  # a field added later changes nothing while it is empty


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "import polars as pl\nfrom apollo_sync.clean import prepare\n"
        "p = prepare(pl.DataFrame({'Email': ['a@x.com', 'b@y.org'], 'Job Title': ['CEO', None]}))\n"
        "print(','.join(p.contacts.get_column('fingerprint')))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    here = prepare(frame(Email=["a@x.com", "b@y.org"], **{"Job Title": ["CEO", None]}))
    assert other.stdout.strip() == ",".join(here.contacts.get_column("fingerprint"))
    assert len(set(here.contacts.get_column("fingerprint"))) == 2


# --- Spreadsheet safety --------------------------------------------------------------------


def test_escape_for_spreadsheet_prefixes_formula_starts() -> None:
    df = pl.DataFrame({"a": ["=SUM(A1)", "+1", "-2", "@x", "\tx", "ok", None, "a=b"], "n": [1, 2, 3, 4, 5, 6, 7, 8]})
    assert_frame_equal(
        escape_for_spreadsheet(df),
        pl.DataFrame({"a": ["'=SUM(A1)", "'+1", "'-2", "'@x", "'\tx", "ok", None, "a=b"], "n": [1, 2, 3, 4, 5, 6, 7, 8]}),
    )


def test_repeating_columns_are_cleaned_per_distinct_value_with_the_same_result() -> None:
    # 2 distinct values in 12 rows: prepare evaluates these columns once per distinct value and maps back.
    n = 12
    p = prepare(
        frame(
            Email=[f"u{i}@x.com" for i in range(n)],
            Website=["WWW.Acme.com/", None] * (n // 2),
            Tags=["vip; b", None] * (n // 2),
            City=[None, " Austin "] * (n // 2),
            LinkedIn=["linkedin.com/in/a/", None] * (n // 2),
        )
    )
    expected = pl.DataFrame(
        {
            "website_url": ["https://acme.com", None] * (n // 2),
            "label_names": [["vip", "b"], None] * (n // 2),
            "present_raw_address": [None, "Austin"] * (n // 2),
            "linkedin_url": ["https://www.linkedin.com/in/a", None] * (n // 2),
        }
    )
    assert_frame_equal(p.contacts.select(expected.columns), expected)


def test_per_distinct_shortcuts_give_what_cleaning_every_row_gives() -> None:
    n = 48
    df = frame(
        Email=[f"u{i}@x.com" for i in range(n)],
        **{"First Name": [" Ann", "Bob  ", None, "ann"] * (n // 4), "Job Title": ["CEO", None, " cto "] * (n // 3)},
        Website=["WWW.Acme.com/", None, "acme.com"] * (n // 3),
        City=[None, " Austin ", "Paris", "a\x1f"] * (n // 4),  # "a\x1f" + "b" must not meet "a" + "\x1fb"
        State=["TX", None, "\x1fb"] * (n // 3),
        Country=[None, "USA", "France  ", "UK"] * (n // 4),
        # Mostly empty: built on their values only, then scattered back.
        LinkedIn=["linkedin.com/in/A/", None, None, None] * (n // 4),
        Mobile=([None, " (469) 650-5107 ", None, "+44 20 7946 0958"] + [None] * 4 + ["12", None, None, None] * 2) * 3,
    )
    shortcut = prepare(df)
    by_value = prepare(df, options=EngineOptions(hash_bits=1))  # distinct values matched by text after collisions
    # Nothing repeats enough (every row cleaned), and no column is built on its values only.
    every_row = prepare(df, options=EngineOptions(repeats=10**9, sparse_share=1.0))
    assert_frame_equal(shortcut.contacts, every_row.contacts)
    assert_frame_equal(by_value.contacts, every_row.contacts)
    assert shortcut.phones_dropped == every_row.phones_dropped == 6
    assert shortcut.contacts.get_column("mobile_phone").drop_nulls().to_list() == ["+14696505107", "+442079460958"] * 3
    linkedin = shortcut.contacts.get_column("linkedin_url").drop_nulls().unique().to_list()
    assert linkedin == ["https://www.linkedin.com/in/a"]
    addresses = every_row.contacts.get_column("present_raw_address").to_list()
    assert addresses[:4] == ["TX", "Austin, USA", "Paris, \x1fb, France", "a\x1f, TX, UK"]


def test_an_empty_frame_gives_empty_results_with_their_schemas() -> None:
    p = prepare(frame(Email=[], Phone=[]).lazy())
    assert p.rows_read == 0 and p.contacts.height == 0
    assert p.contacts.schema["label_names"] == pl.List(pl.String)
    assert p.rejected.schema == pl.Schema({"source_row": pl.Int64, "email": pl.String, "reason": pl.String,
                                           "original": pl.String})
    assert p.duplicates.schema == pl.Schema({"source_row": pl.Int64, "email": pl.String, "merged_into": pl.Int64})


def test_constant_labels_without_a_labels_column_and_non_string_input() -> None:
    mapping = Mapping(constants={"label_names": ["Q4 import"]})
    p = prepare(pl.DataFrame({"Email": ["a@x.com", "b@x.com"], "Score": [1, 2]}), mapping=mapping)
    assert payloads(p) == [
        {"email": "a@x.com", "label_names": ["Q4 import"]},
        {"email": "b@x.com", "label_names": ["Q4 import"]},
    ]
    assert p.unmapped_columns == ["Score"]


# --- Fixed after the reference found them ------------------------------------------------------------------


def test_a_survivor_gets_its_labels_from_a_later_duplicate() -> None:
    p = prepare(frame(Email=["a@x.com", "b@x.com", " A@x.com"], Tags=[None, "x", "vip; q4"]))
    contacts = p.contacts.sort("source_row")
    assert contacts.get_column("label_names").to_list() == [["vip", "q4"], ["x"]]
    assert json.loads(with_payload(contacts).get_column("payload")[0]) == {"email": "a@x.com", "label_names": ["vip", "q4"]}


def test_last_name_before_a_spaced_comma_has_no_trailing_space() -> None:
    p = prepare(frame(Name=["Smith , John", "Smith, John"], Company=["Acme", "Acme"]))
    assert p.contacts.select("first_name", "last_name").rows() == [("John", "Smith")]
    assert p.duplicates.get_column("merged_into").to_list() == [1]


def test_phones_in_other_digits_are_read_as_phonenumbers_reads_them() -> None:
    raw = ["(415) ٥٥٥-0123", "+44 ٢٠ 7946 0958", "+49 30 ٩٠١٨٢٠", "４１５-555-0123"]
    p = prepare(frame(Email=[f"p{i}@x.com" for i in range(len(raw))], Phone=raw))
    assert p.contacts.get_column("direct_phone").to_list() == [
        "+14155550123", "+442079460958", "+4930901820", "+14155550123"
    ]
