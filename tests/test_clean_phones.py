"""Phones that exist: the region from the row's country, the 00 prefix, drops by reason; and the cell size limit."""

from __future__ import annotations

import json

import phonenumbers
import polars as pl
import pytest

from apollo_sync import settings
from apollo_sync.clean import Mapping, prepare, rules
from apollo_sync.clean.mapping import plan_columns
from apollo_sync.clean.payload import with_payload
from apollo_sync.clean.phones import country_region


def frame(**columns: list[str | None]) -> pl.DataFrame:
    return pl.DataFrame({k: pl.Series(v, dtype=pl.String) for k, v in columns.items()})


def phones_of(df: pl.DataFrame, **kwargs) -> list[str | None]:
    """The direct phones prepare() sends for ``df``, after checking the reference says the same."""
    prepared = prepare(df, **kwargs)
    reference = rules.prepare_rows(df.columns, df.to_dicts(), **kwargs)
    got = prepared.contacts.get_column("direct_phone").to_list()
    assert got == [c["direct_phone"] for c in reference.contacts]
    assert prepared.phones_dropped_by_reason == reference.phones_dropped
    return got


def emails(n: int) -> list[str]:
    return [f"p{i}@x.com" for i in range(n)]


# --- The region of a row -----------------------------------------------------------------------------------


def test_a_french_national_number_is_read_in_its_rows_country() -> None:
    df = frame(Email=emails(2), Phone=["0323511114", "03 23 51 11 14"], Country=["France", "FR"])
    assert phones_of(df) == ["+33323511114", "+33323511114"]


def test_the_same_number_without_a_country_is_invalid_in_the_default_region_and_dropped() -> None:
    p = prepare(frame(Email=emails(1), Phone=["0323511114"]), phone_region="US")
    assert p.contacts.get_column("direct_phone").to_list() == [None]  # not +10323511114, which does not exist
    assert p.phones_dropped == 1 and p.phones_dropped_by_reason == {"invalid": 1, "unparseable": 0}


@pytest.mark.parametrize("country", ["FRA", "fra", "France", "  france ", "Frankreich", "Francia", "French Republic"])
def test_iso3_codes_and_names_in_several_languages_name_the_region(country: str) -> None:
    df = frame(Email=emails(1), Phone=["03 23 51 11 14"], **{"Country Code": [country]})
    assert phones_of(df) == ["+33323511114"]


def test_country_spellings() -> None:
    spellings = ("DEU", "Deutschland", "UK", "gb", "United States", "USA", "Российская Федерация", "日本")
    assert [country_region(v) for v in spellings] == ["DE", "DE", "GB", "GB", "US", "US", "RU", "JP"]
    assert [country_region(v) for v in ("44", "033", "Narnia", "", None)] == [None] * 5  # digits are not countries


def test_an_unknown_country_falls_back_to_the_phone_region() -> None:
    df = frame(Email=emails(2), Phone=["020 7946 0958", "(415) 555-0134"], Country=["Narnia", None])
    assert phones_of(df, phone_region="GB") == ["+442079460958", None]  # a US shape read in the UK: invalid
    assert phones_of(df, phone_region="US") == [None, "+14155550134"]


def test_the_first_country_column_that_names_a_country_wins() -> None:
    df = frame(Email=emails(2), Phone=["030 901820"] * 2, Country=["Atlantis", "France"], Nation=["DE", "DE"])
    assert phones_of(df) == ["+4930901820", None]


def test_country_headers_feed_the_region_even_beside_an_address_and_are_never_sent() -> None:
    df = frame(Email=emails(1), Phone=["030 901820"], Address=["Unter den Linden 1, Berlin"], Nation=["Germany"])
    plan = plan_columns(df.columns)
    assert plan.sources["country"] == ("Nation",) and plan.unmapped == []
    p = prepare(df)
    body = json.loads(with_payload(p.contacts).get_column("payload").item())
    assert body["direct_phone"] == "+4930901820"
    assert body["present_raw_address"] == "Unter den Linden 1, Berlin" and "country" not in body


def test_a_country_mapped_by_the_mapping_file() -> None:
    df = frame(Email=emails(1), Phone=["06 1234 5678"], Land=["Italy"])
    assert phones_of(df, mapping=Mapping(columns={"Land": "country"})) == ["+390612345678"]
    assert phones_of(df) == [None]  # "Land" is no country header: read in US, invalid


# --- 00, validity, reasons ---------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["US", "GB", "FR", "JP"])
def test_a_leading_00_is_the_international_prefix_in_every_region(region: str) -> None:
    df = frame(Email=emails(3), Phone=["001-212-555-0100", "0044 20 7946 0958", "00 33 1 23 45 67 89"])
    assert phones_of(df, phone_region=region) == ["+12125550100", "+442079460958", "+33123456789"]


def test_only_valid_numbers_are_sent_and_drops_are_counted_by_reason() -> None:
    raw = ["+1 415 555 0123", "+1 155 555 0123", "+44 20 7946 0958", "+44 20 7946", "123", "call me", "+999 123",
           "00", "   "]
    p = prepare(frame(Email=emails(len(raw)), Phone=raw))
    assert p.contacts.get_column("direct_phone").to_list() == [
        "+14155550123", None, "+442079460958", None, None, None, None, None, None]
    # +1 155 (no area code starts with 1), +44 20 7946 (too short), 123: numbers phonenumbers reads, not valid;
    # "call me", +999 (no such calling code) and "00" ("+"): nothing phonenumbers can read. "   " is no phone.
    assert p.phones_dropped_by_reason == {"invalid": 3, "unparseable": 3} and p.phones_dropped == 6


def test_a_multinational_export_sends_only_valid_numbers_and_every_valid_national_one() -> None:
    """Example numbers of eight regions written nationally, their countries spelled as exports do, plus the same
    digits altered past validity: every phone sent is valid for phonenumbers, and every valid one is sent."""
    countries = {"US": "United States", "GB": "UK", "DE": "Deutschland", "FR": "FRA", "IT": "Italy", "ES": "ES",
                 "IN": "India", "JP": "Japan"}  # fmt: skip
    phones, places = [], []
    for region, country in countries.items():
        for kind in ("fixed_line", "mobile"):
            number = phonenumbers.example_number_for_type(region, getattr(phonenumbers.PhoneNumberType, kind.upper()))
            national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            phones += [national, national[:-2]]  # the second: two digits short
            places += [country, country]
    p = prepare(frame(Email=emails(len(phones)), Phone=phones, Country=places))
    sent = p.contacts.get_column("direct_phone").to_list()
    for text, place, e164 in zip(phones, places, sent):
        want = phonenumbers.parse(text, country_region(place))
        valid = phonenumbers.is_valid_number(want)
        assert e164 == (phonenumbers.format_number(want, phonenumbers.PhoneNumberFormat.E164) if valid else None)
    assert sum(e is not None for e in sent) >= len(countries) * 2  # every example number is sent
    assert all(phonenumbers.is_valid_number(phonenumbers.parse(e)) for e in sent if e is not None)


# --- The cell size limit -----------------------------------------------------------------------------------


def test_a_cell_over_the_limit_rejects_its_row_as_too_large() -> None:
    big = "x" * (settings.MAX_CELL_BYTES + 1)
    df = frame(Email=["a@x.com", "b@x.com", "c@x.com", "d@x.com"], Title=[big, "x" * settings.MAX_CELL_BYTES,
               "é" * (settings.MAX_CELL_BYTES // 2 + 1), "CEO"], Phone=["123"] * 4, Notes=[None, None, None, big])
    p = prepare(df, mapping=Mapping(ignore=("Notes",)))
    rejected = p.rejected.to_dicts()
    assert [(r["source_row"], r["reason"]) for r in rejected] == [(1, "too_large"), (3, "too_large")]  # bytes count
    assert rejected[0]["email"] == "a@x.com"  # rejected though its email is valid
    assert p.contacts.get_column("source_row").to_list() == [2, 4]  # at the limit, and a long unmapped cell: kept
    assert p.phones_dropped == 2  # the rejected rows' phones are not counted
    reference = rules.prepare_rows(df.columns, df.to_dicts(), mapping=Mapping(ignore=("Notes",)))
    assert [(r["source_row"], r["reason"]) for r in reference.rejected] == [(1, "too_large"), (3, "too_large")]


def test_a_40_mb_cell_is_never_sent() -> None:
    huge = "a@x.com" + "y" * 40_000_000
    p = prepare(frame(Email=[huge, "b@x.com"], Phone=["(415) 555-0123" + "0" * 40_000_000, "(415) 555-0199"]))
    assert p.rejected.get_column("reason").to_list() == [settings.REJECT_TOO_LARGE]
    payloads = with_payload(p.contacts).get_column("payload").to_list()
    assert len(payloads) == 1 and max(len(b) for b in payloads) < 200
