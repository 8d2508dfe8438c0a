"""Property tests: the vectorised fast paths agree with the libraries; cleaning is idempotent; no identity is lost."""

from __future__ import annotations

import json

import phonenumbers
import polars as pl
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apollo_sync.clean import expressions as ex
from apollo_sync.clean.payload import with_payload
from apollo_sync.clean import prepare
from apollo_sync.clean import numbering as nb

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WHOLE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""prepare() costs ~15 ms a call: fewer examples keep these files under 20 s."""

# --- Email fast paths agree with email-validator ---------------------------------------------

_latin = st.characters(min_codepoint=0xC0, max_codepoint=0x24F)
_atom_char = st.one_of(st.sampled_from("ab0_%+'-"), _latin, st.sampled_from(["\u0301", "\u00d7", "ı", "ǅ"]))
_atoms = st.lists(st.text(alphabet=_atom_char, min_size=0, max_size=4), min_size=1, max_size=3).map(".".join)
_local = st.one_of(_atoms, _atoms, st.text(alphabet="ab.!#\"() é", max_size=8))  # empty atoms give "..", ".a"
_random_domain = st.builds(
    lambda labels, tld: ".".join(labels + [tld]),
    st.lists(st.text(alphabet="ab0-", min_size=0, max_size=5), min_size=1, max_size=3),
    st.sampled_from(["com", "io", "c", "co1", "test", "local", "xn--p1ai", "", "COM", "onion"]),
)
_domain = st.one_of(
    st.sampled_from(["a.com", "ab0.io", "x-y.co.uk", "a..com", "-a.com", "a-.com", "a.test", "b.a.local", "a.c",
                     "b.xn--p1ai", "x" * 64 + ".com", "a.c0m", "mail.example.org"]),
    _random_domain,
)
emails = st.one_of(
    st.emails().map(str.lower),
    st.builds(lambda l, at, d: f"{l}{at}{d}", _local, st.sampled_from(["@", "@", "@@", "", "@."]), _domain),
    st.text(alphabet="a@.-_ +", max_size=12),
)


def _validator(value: str) -> str | None:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


@FAST
@given(st.lists(emails, min_size=1, max_size=20))
def test_email_fast_paths_agree_with_email_validator(values: list[str]) -> None:
    df = pl.DataFrame({"e": values}).select(
        "e", ex.email_fast_valid(pl.col("e")).alias("valid"), ex.email_fast_invalid(pl.col("e")).alias("invalid")
    )
    for value, valid, invalid in df.iter_rows():
        verdict = _validator(value)
        assert not (valid and invalid), value
        if valid:
            assert verdict == value, value
        if invalid:
            assert verdict is None, value


EMAIL_EDGES = [
    "a@" + "x" * 63 + ".com", "a@" + "x" * 64 + ".com", "a" * 64 + "@b.com", "a" * 65 + "@b.com",
    "a@" + ".".join(["x" * 60] * 4) + ".com", "a@b.c0m", "a@b.c", "a@b.onion", "a@b.local", "a@b.test",
    "a@xn--p1ai.com", "o'brien@b.com", "søren.müller@b.com", "e\u0301@b.com", "\u00d7@b.com", "ǆ@b.com", "a+b%c@b-c.co.uk", "a.b@c.com", ".a@c.com", "a.@c.com", "a..b@c.com",
    "a@-b.com", "a@b-.com", "a@b..com", "a@@b.com", "a b@c.com", "zoë@b.com", "a@bücher.de", "\"a\"@b.com",
    "0@00--0.com", "a@x.ab--c.com", "a@abc--d.com", "ab--c@x.com", "a@xn--abc.com",  # reserved "??--" labels
]


def test_email_fast_paths_agree_with_email_validator_on_edges() -> None:
    test_email_fast_paths_agree_with_email_validator.hypothesis.inner_test(EMAIL_EDGES)


# --- Phone fast paths agree with phonenumbers -------------------------------------------------


def _read(value: str, region: str) -> tuple[str, str] | None:
    """(calling code, national significant number) phonenumbers parses from ``value``, or None."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    return str(number.country_code), phonenumbers.national_significant_number(number)


def _numbers(found: pl.DataFrame) -> list[tuple[str, str] | None]:
    return [None if code is None else (code, nsn) for code, nsn in found.iter_rows()]


_sep = st.sampled_from(["", " ", "-", ".", "  ", "/"])
_digits = st.text(alphabet="0123456789", min_size=1, max_size=5)
nanp_phones = st.builds(
    lambda prefix, area, s1, exch, s2, line, ext: f"{prefix}{area}{s1}{exch}{s2}{line}{ext}",
    st.sampled_from(["", "1", "1-", "+1 ", "+1", "+1-", "(", "+ 1 "]),
    st.text(alphabet="0123456789", min_size=3, max_size=3).flatmap(lambda a: st.sampled_from([a, f"({a})", f"{a})"])),
    _sep,
    st.text(alphabet="0123456789", min_size=3, max_size=3),
    _sep,
    st.text(alphabet="0123456789", min_size=3, max_size=5),
    st.sampled_from(["", " x12", "x9", " ext. 123", " ext 5", " #1"]),
)
_codes = sorted(str(c) for c in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
_regions = sorted(phonenumbers.SUPPORTED_REGIONS)
intl_phones = st.builds(
    lambda code, groups, seps: "+" + code + "".join(s + g for s, g in zip(seps, groups)),
    st.sampled_from(_codes),
    st.lists(_digits, min_size=1, max_size=4),
    st.lists(_sep, min_size=4, max_size=4),
)


def _example(region: str, kind: str, tail: str) -> str:
    """An example number of ``region`` in the ``kind`` format, its last digits replaced by ``tail``."""
    number = phonenumbers.example_number(region)
    if number is None:
        return tail
    text = phonenumbers.format_number(number, getattr(phonenumbers.PhoneNumberFormat, kind))
    return text[: max(0, len(text) - len(tail))] + tail


national_phones = st.one_of(
    st.builds(_example, st.sampled_from(_regions), st.sampled_from(["NATIONAL", "INTERNATIONAL", "E164"]),
              st.text(alphabet="0123456789", max_size=3)),
    st.builds(lambda text, gap: text.replace("+", "").replace(" ", gap, 1),  # the calling code without +
              st.builds(_example, st.sampled_from(_regions), st.sampled_from(["INTERNATIONAL", "E164"]),
                        st.text(alphabet="0123456789", max_size=2)), st.sampled_from(["", " "])),
    st.text(alphabet="0123456789 -.()", min_size=1, max_size=16),
    nanp_phones,
)


@FAST
@given(st.lists(nanp_phones, min_size=1, max_size=10), st.sampled_from(["US", "CA", "JM", "AG", "PR", "GB", "DE"]))
def test_north_american_fast_path_agrees_with_phonenumbers(values: list[str], region: str) -> None:
    nanp = phonenumbers.country_code_for_region(region) == 1
    got = pl.DataFrame({"p": values}).select(ex.phone_nanp_e164(pl.col("p"), nanp_region=nanp)).to_series()
    for value, fast in zip(values, got.to_list()):
        if fast is not None:
            assert ("1", fast[2:]) == _read(value, region), value


@FAST
@given(st.lists(intl_phones, min_size=1, max_size=10), st.sampled_from(["US", "GB", "IT"]))
def test_international_reading_agrees_with_phonenumbers(values: list[str], region: str) -> None:
    for value, read in zip(values, _numbers(nb.international_numbers(pl.Series("p", values)))):
        if read is not None:
            assert read == _read(value, region), value


@FAST
@given(st.lists(national_phones, min_size=1, max_size=10), st.sampled_from(_regions))
def test_national_reading_agrees_with_phonenumbers(values: list[str], region: str) -> None:
    texts = pl.Series("t", values).filter(~pl.Series(values).str.starts_with("+"))
    for value, read in zip(texts.to_list(), _numbers(nb.national_numbers(texts, region))):
        if read is not None:
            assert read == _read(value, region), (value, region)


@FAST
@given(st.lists(st.one_of(intl_phones, national_phones), min_size=1, max_size=10), st.sampled_from(_regions))
def test_validity_agrees_with_phonenumbers(values: list[str], region: str) -> None:
    read = [_read(v, region) for v in values]
    numbers = pl.DataFrame([r or (None, None) for r in read], schema=["code", "nsn"], orient="row")
    for value, pair, valid in zip(values, read, nb.valid_numbers(numbers).to_list()):
        if pair is not None:
            assert valid == phonenumbers.is_valid_number(phonenumbers.parse(value, region)), (value, region)


PHONE_EDGES = [
    "+7 8 916 123 4567", "+7 916 123 4567", "+375 80 29 123 4567", "+61 1831 2345 6789", "+61 2 9876 5432",
    "+86 1234 5678 9012 3", "+39 06 1234 5678", "+39 312 345 6789", "+44 7911 123456", "+44 020 7946 0958",
    "+49 0 30 901820", "+353 1 234 5678", "+1 415 555 0123", "+1 155 555 0123", "+999 123", "+0 123 456",
    "+81 3 1234 5678", "+81 0003 1234 567", "+36 06 1 234 5678", "+993 8 12 345678", "+44 1", "+33 1",
    "+1 268 464 1234", "+1 876 555 0123", "+44 1481 256789", "+7 7010 123456", "+262 269 61 1234",
]
NATIONAL_EDGES = [
    ("0323511114", "FR"), ("03 23 51 11 14", "FR"), ("(0)3 23 51 11 14", "FR"), ("33 323511114", "FR"),
    ("020 7946 0958", "GB"), ("1800201234567", "GB"), ("07911 123456", "GB"), ("030 901820", "DE"),
    ("4930901820", "DE"), ("0049 30 901820", "DE"), ("06 1234 5678", "IT"), ("8 916 123 4567", "RU"),
    ("810 49 30 901820", "RU"), ("(415) 555-0123", "DE"), ("415 555 0123", "GB"), ("12", "US"), ("123", "FR"),
    ("01", "FR"), ("0 1", "DE"), ("91 123 45 67", "ES"), ("98765 43210", "IN"), ("0 98765 43210", "IN"),
]


def test_phone_fast_paths_agree_with_phonenumbers_on_edges() -> None:
    for region in ("US", "GB"):
        test_international_reading_agrees_with_phonenumbers.hypothesis.inner_test(PHONE_EDGES, region)
        test_validity_agrees_with_phonenumbers.hypothesis.inner_test(PHONE_EDGES, region)
    for value, region in NATIONAL_EDGES:
        test_national_reading_agrees_with_phonenumbers.hypothesis.inner_test([value], region)
        test_validity_agrees_with_phonenumbers.hypothesis.inner_test([value], region)


def test_phone_fast_paths_decide_the_common_shapes() -> None:
    texts = pl.Series("p", ["+44 20 7946 0958", "+49 30 901820", "+33 1 23 45 67 89", "+44 020 7946 0958"])
    assert _numbers(nb.international_numbers(texts)) == [("44", "2079460958"), ("49", "30901820"),
                                                         ("33", "123456789"), None]  # fmt: skip
    national = nb.national_numbers(pl.Series("t", ["03 23 51 11 14", "0323511114", "(0)3-23-51-11-14"]), "FR")
    assert _numbers(national) == [("33", "323511114")] * 3
    assert nb.valid_numbers(national).to_list() == [True] * 3
    assert all(nb.code_rules(int(c)) is not None for c in _codes)  # every code's patterns run in polars


# --- prepare(): idempotent, and no identity lost -----------------------------------------------

_name = st.sampled_from(["Ann", " ann ", "ANN", "Bob", "Mary  Ann", "van der Berg", "", None, "Zoë"])
_company = st.sampled_from(["Acme", "acme ", "Globex", "", None])
_email = st.sampled_from(["a@x.com", " A@X.com", "b@y.io", "bad@", "", None, "zoë@bücher.de"])
_phone = st.sampled_from(["(415) 555-0123", "+44 20 7946 0958", "123", None, "020 7946 0958"])
rows = st.lists(st.tuples(_name, _name, _email, _company, _phone), min_size=1, max_size=25)
COLUMNS = ["First Name", "Last Name", "Email", "Company", "Phone"]


def _frame(data: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=dict.fromkeys(COLUMNS, pl.String), orient="row")


@WHOLE
@given(rows)
def test_cleaning_is_idempotent(data: list[tuple]) -> None:
    once = prepare(_frame(data))
    again_input = once.contacts.select(
        pl.col("first_name").alias("First Name"), pl.col("last_name").alias("Last Name"),
        pl.col("email").alias("Email"), pl.col("organization_name").alias("Company"),
        pl.col("direct_phone").alias("Phone"), pl.col("source_row"),
    )
    twice = prepare(again_input)
    assert twice.rejected.height == 0 and twice.duplicates.height == 0 and twice.phones_dropped == 0
    assert with_payload(twice.contacts).select("source_row", "identity", "fingerprint", "payload").equals(
        with_payload(once.contacts).select("source_row", "identity", "fingerprint", "payload")
    )


@WHOLE
@given(rows)
def test_no_row_loses_its_identity(data: list[tuple]) -> None:
    p = prepare(_frame(data))
    identity_of = dict(zip(p.contacts.get_column("source_row"), p.contacts.get_column("identity")))
    merged = dict(zip(p.duplicates.get_column("source_row"), p.duplicates.get_column("merged_into")))
    rejected = set(p.rejected.get_column("source_row"))
    assert len(identity_of) + len(merged) + len(rejected) == len(data)
    for row, (first, last, email, company, _) in enumerate(data, start=1):
        email_text = (email or "").strip().lower()
        if row in rejected:
            continue
        survivor = merged.get(row, row)
        identity = identity_of[survivor]
        if email_text:
            assert identity == f"email:{_validator(email_text)}"
        else:
            parts = [" ".join((v or "").split()).lower() for v in (first, last, company)]
            assert all(parts) and identity == "name:" + "|".join(parts)
    for payload in with_payload(p.contacts).get_column("payload"):
        body = json.loads(payload)
        assert body.get("email") or {"first_name", "last_name", "organization_name"} <= set(body)


@WHOLE
@given(st.lists(st.text(max_size=15), min_size=1, max_size=8))
def test_payload_is_valid_json_of_the_cleaned_values(texts: list[str]) -> None:
    df = pl.DataFrame({"Email": [f"u{i}@x.com" for i in range(len(texts))], "Title": texts, "Tags": texts})
    p = prepare(df)
    titles = df.select(ex.clean_text(pl.col("Title"))).to_series().to_list()
    labels = df.select(ex.labels(pl.col("Tags"))).to_series().to_list()
    for payload, title, label in zip(with_payload(p.contacts).get_column("payload"), titles, labels):
        body = json.loads(payload)
        assert body.get("title") == title
        assert body.get("label_names") == label


def test_email_fast_path_agrees_with_email_validator_on_every_latin_letter() -> None:
    values = [f"a{chr(c)}b@b.com" for c in range(0xC0, 0x250)] + [f"{chr(c)}@b.com" for c in range(0xC0, 0x250)]
    test_email_fast_paths_agree_with_email_validator.hypothesis.inner_test(values)
    fast = pl.DataFrame({"e": values}).select(ex.email_fast_valid(pl.col("e"))).to_series()
    assert fast.sum() == len(values) - 4  # all but the two symbols in the range (× and ÷)
