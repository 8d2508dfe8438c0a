"""Generate a messy CRM contact export (CSV) of any size, with the true counts a transform must find.

Made on the fly for the benchmark and tests; never committed as data. Deterministic for a seed.

Each row is one of these kinds (shares of the rows):

- ``valid`` (~88%): a unique email in mixed case with padding, names with stray spaces, various phone formats;
- ``name_only`` (3%): no email, but first, last name and a unique company: identified by name;
- ``invalid_email`` (2%): an email that is present but not an address (``n/a``, ``a..b@x.com``, no @, ...);
- ``missing_identity`` (1%): no email and no company;
- ``duplicate`` (6%): a copy of a ``valid`` or ``name_only`` row with its email or names re-cased and padded
  and some fields blanked, anywhere in the file (a row may be copied more than once).

So the truth is: rejected invalid_email = the invalid rows, missing_identity = the missing rows,
duplicates_in_source = the duplicate rows.

Phones (``Phone`` in 82% of the rows, ``Mobile`` in a quarter of those), in one of two kinds (``phones=``):

- ``realistic`` (the default): numbers that exist, in the row's country (``Country``: USA, United States, UK,
  Germany or empty, which reads as the default region US): 91% a number of that country phonenumbers holds valid,
  written as people write it (US: ``(415) 555-0100``, ``415-555-0100``, ``+1 415 555 0100``...; UK and Germany:
  national ``020 7946 0958`` or international ``+44 20 7946 0958``), 4% a valid number of another country
  (``+44``, ``+49``, ``+33``, ``+91``, ``+1``), 3% a typo (a digit of the number, not of its calling code,
  missing or doubled: mostly invalid), 2% junk (``n/a``, ``call me``...). The valid ones come from a pool of
  number heads (all but the last 3 digits) that phonenumbers holds valid with a random tail, drawn per chunk, so
  the numbers rarely repeat (93% of the (phone, country) pairs of 1M rows are distinct); a few heads are valid
  only for some tails, so the share of valid numbers is measured by the transform (phones dropped), not promised
  here: 4.5% of the phones of 1M rows (seed 7) are dropped.
- ``random`` (the worst case for the phone rule): ~70% US shapes of random digits (area code 201-989, exchange
  200-999: 43% of them no valid number), ~8% international, ~4% junk, whatever the row's country, so 40% of the
  US shapes are read in the UK or German rules. The rows are the same as ``realistic``'s but for the phones.

Usage: ``uv run python bench/make_crm_export.py --rows 1000000 --out /tmp/export.csv [--phones random]``
"""

from __future__ import annotations

import argparse
import json
import random
import unicodedata
from pathlib import Path

import phonenumbers
import polars as pl

FIRST = [
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William", "Elizabeth",
    "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Mary Ann", "José", "Zoë", "Siobhán", "Li", "Ngozi", "Ahmed", "Priya", "Søren", "Chloé",
]
LAST = [
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "McDonald", "O'Brien", "van der Berg", "de la Cruz", "Nguyen", "Müller", "Kowalski", "Okafor", "Patel", "Lee",
]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries", "Wayne Enterprises",
             "Tyrell", "Cyberdyne", "Soylent", "Vandelay Industries", "Massive Dynamic"]
TITLES = ["CEO", "CTO", "VP Sales", "Account Executive", "Software Engineer", "Head of Marketing",
          "  Director of Ops ", "Analyst", None, None]
DOMAINS = ["gmail.com", "yahoo.com", "acme.com", "globex.io", "initech.co.uk", "hooli.xyz", "example.org"]
CITIES = ["New York", "Austin", "London", "Berlin", "San Francisco", None]
STATES = ["NY", "TX", None, None, "CA", None]
COUNTRIES = ["USA", "United States", "UK", "Germany", None]
TAGS = ["Q4 import", "webinar; trade show", "vip,Q4 import", None, None, "  partner  "]
WEBSITES = ["www.acme.com", "https://globex.io/", "HTTP://Initech.co.uk/about", "hooli.xyz", None, "n/a"]
INVALID = ["n/a", "{u}@", "{u}..x@{d}", "{u}@@{d}", "{u} at {d}", "{u}@{d}.", "@{d}", "{u}@localhost", "none"]
KINDS = ("valid", "name_only", "invalid_email", "missing_identity", "duplicate")
WEIGHTS = (88, 3, 2, 1, 6)


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _phone(rng: random.Random) -> str | None:
    r = rng.random()
    area, exch, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    if r < 0.18:
        return None
    if r < 0.88:
        fmt = rng.randrange(6)
        return [
            f"({area}) {exch}-{line:04d}", f"{area}-{exch}-{line:04d}", f"+1 {area} {exch} {line:04d}",
            f"{area}.{exch}.{line:04d}", f"1{area}{exch}{line:04d}", f" {area} {exch} {line:04d} ",
        ][fmt]
    if r < 0.96:
        return rng.choice([f"+44 20 {rng.randint(7000, 8999)} {line:04d}", f"+49 30 {rng.randint(100000, 999999)}",
                           f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
                           f"+91 98{rng.randint(10000000, 99999999)}", f"+1 {area} {exch} {line:04d} x{rng.randint(1, 999)}"])
    return rng.choice(["123", "n/a", "call me", "555-01", "0000000000000000000"])


PHONE_KINDS = ("realistic", "random")
COUNTRY_REGIONS = {"USA": "US", "United States": "US", "UK": "GB", "Germany": "DE", None: "US"}
"""The region each ``Country`` cell names (an empty one: the default region, US)."""
ELSEWHERE = ("US", "GB", "DE", "FR", "IN")
"""Regions of the numbers written internationally in any row."""
JUNK = ("123", "n/a", "call me", "555-01", "0000000000000000000", "-", "tbd")


def _replace_tail(text: str, tail: str) -> str:
    """``text`` with its last ``len(tail)`` digits replaced by ``tail``'s (separators kept)."""
    out, left = list(text), list(tail)
    for i in range(len(out) - 1, -1, -1):
        if not left:
            break
        if out[i].isdigit():
            out[i] = left.pop()
    return "".join(out)


class ValidPhones:
    """Numbers phonenumbers holds valid, per region: a pool of heads drawn once (checked with phonenumbers, a
    few thousand calls), then a random 3-digit tail per number, so 1M rows cost no phonenumbers call."""

    POOL = 400

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.us: list[tuple[int, int]] = []  # (area code, exchange)
        while len(self.us) < self.POOL:
            area, exch = rng.randint(201, 989), rng.randint(200, 999)
            if phonenumbers.is_valid_number(phonenumbers.parse(f"+1{area}{exch}{rng.randint(0, 9999):04d}")):
                self.us.append((area, exch))
        self.pools: dict[str, list[tuple[str, str]]] = {}  # region -> [(national text, international text)]
        for region in ELSEWHERE[1:]:
            pool = []
            types = (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE)
            examples = [str(phonenumbers.example_number_for_type(region, t).national_number) for t in types]
            while len(pool) < self.POOL:
                example = rng.choice(examples)
                nsn = example[:-6] + f"{rng.randint(0, 999999):06d}"
                number = phonenumbers.parse("+" + str(phonenumbers.country_code_for_region(region)) + nsn)
                if phonenumbers.is_valid_number(number):
                    pool.append((phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL),
                                 phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)))
            self.pools[region] = pool

    def number(self, region: str, international: bool = False) -> str:
        rng = self.rng
        if region == "US":
            (area, exch), line = rng.choice(self.us), rng.randint(0, 9999)
            if international:
                return rng.choice([f"+1 {area} {exch} {line:04d}", f"+1 {area}-{exch}-{line:04d}",
                                   f"+1{area}{exch}{line:04d}"])
            return [
                f"({area}) {exch}-{line:04d}", f"{area}-{exch}-{line:04d}", f"+1 {area} {exch} {line:04d}",
                f"{area}.{exch}.{line:04d}", f"1{area}{exch}{line:04d}", f" {area} {exch} {line:04d} ",
                f"{area}-{exch}-{line:04d} x{rng.randint(1, 999)}",
            ][rng.choices(range(7), weights=(20, 20, 20, 15, 10, 10, 5))[0]]
        national, whole = rng.choice(self.pools[region])
        text = whole if international or rng.random() < 0.3 else national
        return _replace_tail(text, f"{rng.randint(0, 999):03d}")

    def phone(self, country: str | None) -> str:
        """A phone as a row of ``country`` holds it (see the module's description)."""
        r = self.rng.random()
        if r < 0.91:
            return self.number(COUNTRY_REGIONS[country])
        if r < 0.95:
            return self.number(self.rng.choice(ELSEWHERE), international=True)
        if r < 0.98:
            text = self.number(COUNTRY_REGIONS[country])
            code = text.find(" ") + 1 if text.startswith("+") else 0  # a calling code is rarely mistyped
            at = self.rng.choice([i for i, ch in enumerate(text) if ch.isdigit() and i >= code])
            return text[:at] + text[at + 1:] if self.rng.random() < 0.5 else text[:at] + text[at] + text[at:]
        return self.rng.choice(JUNK)


def generate(
    rows: int, seed: int = 7, start: int = 0, phones: str = "realistic"
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The export as an all-String frame (no source_row) and the true counts for it.

    ``start``: the number of rows before this frame in the file (record ids, emails and name-only companies
    carry the row number, so frames generated with their offsets never collide). ``phones``: one of
    :data:`PHONE_KINDS` (the module's description says what each holds); every other cell is the same in both.
    """
    if phones not in PHONE_KINDS:
        raise ValueError(f"phones must be one of {PHONE_KINDS}, got {phones!r}")
    rng = random.Random(seed)
    kinds = rng.choices(range(len(KINDS)), weights=WEIGHTS, k=rows)
    records: list[tuple] = []
    originals: list[int] = []  # indexes of valid/name_only rows a duplicate may copy
    truth = dict.fromkeys(KINDS, 0)
    for i, k in enumerate(kinds, start=start):
        kind = KINDS[k]
        if kind == "duplicate" and not originals:
            kind = "valid"
        truth[kind] += 1
        first, last = rng.choice(FIRST), rng.choice(LAST)
        user = f"{first.split()[0].lower()}.{last.split()[-1].lower()}{i}"
        if i % 100:  # most addresses are ASCII even when the name is not; 1% keep the accents
            user = _ascii(user)
        domain = rng.choice(DOMAINS)
        company = rng.choice(COMPANIES)
        email: str | None
        if kind == "duplicate":
            src = records[rng.choice(originals)]
            email = src[2]
            if email is not None:
                email = rng.choice([email.upper(), f"  {email.lower()} ", email])
                first_d, last_d = src[0], src[1]
            else:
                first_d = f" {src[0].upper()} " if src[0] else src[0]
                last_d = src[1].lower() if src[1] else src[1]
            records.append((first_d, last_d, email, src[3], None, _phone(rng), None, src[7], None,
                            src[9], src[10], src[11], src[12], "dup"))
            continue
        if kind == "valid":
            email = rng.choice([f"{user}@{domain}", f" {user.title()}@{domain.upper()} ", f"{user}@{domain}\t"])
        elif kind == "invalid_email":
            email = rng.choice(INVALID).format(u=user, d=domain)
        else:
            email = None
        if kind == "name_only":
            company = f"{company} {i}"
        elif kind == "missing_identity":
            company = None
        pad_first = rng.choice([first, f" {first}", f"{first}  ", first.upper() if i % 50 == 0 else first])
        pad_last = rng.choice([last, f"  {last}", last.replace(" ", "  ")])
        records.append((
            pad_first, pad_last, email, company, rng.choice(TITLES), _phone(rng), _phone(rng) if i % 4 == 0 else None,
            rng.choice(WEBSITES), f"linkedin.com/in/{user}/" if i % 3 == 0 else None,
            rng.choice(CITIES), rng.choice(STATES), rng.choice(COUNTRIES), rng.choice(TAGS), rng.choice(["", "  ", "note"]),
        ))
        if kind in ("valid", "name_only"):
            originals.append(len(records) - 1)
    if phones == "realistic":  # the same rows, each present phone redrawn from its row's country (own stream)
        valid = ValidPhones(random.Random(f"phones-{seed}"))
        records = [
            (*r[:5], r[5] and valid.phone(r[11]), r[6] and valid.phone(r[11]), *r[7:]) for r in records
        ]
    columns = ["First Name", "Last Name", "Email Address", "Company", "Job Title", "Phone", "Mobile", "Website",
               "LinkedIn", "City", "State", "Country", "Tags", "Notes"]
    frame = pl.DataFrame(records, schema=dict.fromkeys(columns, pl.String), orient="row")
    frame = frame.with_columns(pl.int_range(start + 1, start + rows + 1).cast(pl.String).alias("Record ID")).select(["Record ID", *columns])
    return frame, {
        "rows": rows,
        "invalid_email": truth["invalid_email"],
        "missing_identity": truth["missing_identity"],
        "duplicates_in_source": truth["duplicate"],
    }


CHUNK_ROWS = 1_000_000


def write_export(
    rows: int, out: Path, seed: int = 7, chunk_rows: int = CHUNK_ROWS, phones: str = "realistic"
) -> dict[str, int]:
    """Write the export CSV to ``out`` and return its true counts.

    Written ``chunk_rows`` at a time, so a 10M-row file needs no more memory than a 1M-row one; a
    duplicate then copies a row of its own chunk (chunk k uses seed ``seed + k``; one chunk is ``generate``).
    ``phones``: see :func:`generate`.
    """
    truth = {"rows": 0, "invalid_email": 0, "missing_identity": 0, "duplicates_in_source": 0}
    with open(out, "wb") as fh:
        for k, start in enumerate(range(0, rows, chunk_rows)):
            frame, part = generate(min(chunk_rows, rows - start), seed + k, start, phones)
            frame.write_csv(fh, include_header=start == 0)
            del frame
            truth = {key: truth[key] + part[key] for key in truth}
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--phones", choices=PHONE_KINDS, default="realistic",
                        help="realistic (default) or random (the worst case)")
    args = parser.parse_args()
    print(json.dumps(write_export(args.rows, args.out, args.seed, phones=args.phones)))


if __name__ == "__main__":
    main()
