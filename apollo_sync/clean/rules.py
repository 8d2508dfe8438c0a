"""What a clean, valid, deduplicated contact is: the specification, written row by row in plain Python.

Read this module to know what apollo-sync does to an export. :func:`apollo_sync.clean.prepare` gives the same
results over whole columns, fast (``apollo_sync/clean/engine.py`` and the modules it uses);
tests/test_clean_reference.py generates messy exports and checks that both agree on every row: each cleaned
field, the rejection reason, the row a duplicate merged into, the fingerprint. Nothing here is tuned: str methods, ``re``, and email-validator and
phonenumbers called once per value. :func:`prepare_rows` is the whole stage:

1. **Mapping** (:mod:`apollo_sync.clean.mapping`): headers auto-map to Apollo fields, a mapping file overrides;
   columns that feed nothing are unmapped and never sent. A target fed by several columns takes, per row, the
   first column whose cleaned value is not empty (for websites and LinkedIn: whose *normalised* value is not
   empty; for labels: every column's labels).
2. **Cleaning**, per field (:func:`clean_row`): text trimmed and whitespace collapsed (:func:`clean_text`, with
   :data:`WHITESPACE` spelled out), email lower-cased and checked by email-validator, phones to E.164 when
   phonenumbers holds them valid, read in the row's country or the default region, ``00`` as ``+``
   (:mod:`apollo_sync.clean.phones`; the others dropped and counted by reason), websites to ``https://<host>``,
   LinkedIn URLs to ``https://www.linkedin.com/<path>``, labels split, a full name split into first and last, an
   address joined from city/state/country, the mapping's constants where a row has no value of its own, custom
   fields as text.
3. **Validation** (:func:`rejection`): a cell of a column that feeds a field longer than
   :data:`~apollo_sync.settings.MAX_CELL_BYTES` rejects the row (``too_large``); a present but invalid email
   rejects it (``invalid_email``); a row with no email and not all of first name, last name and organization is
   rejected (``missing_identity``).
4. **Identity and dedupe** (:func:`identity`, :func:`dedupe`): ``email:<address>``, or without email
   ``name:<first|last|organization>`` lower-cased. The first row of an identity survives; each of its empty
   fields takes the first value later duplicates have, in row order; every dropped row names the row it merged
   into.
5. **Fingerprint** (:func:`fingerprint`): a 64-bit sum of MurmurHash3 hashes of the contact's final fields.

Where a plain reading would differ from what polars does, the rule below says which holds: whitespace is
Unicode's White_Space (not Python's ``str.isspace``), lower-casing is Unicode 16's (Python 3.11 knows Unicode 14),
and case-insensitive words match as polars' regex engine matches them (:func:`fold`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping as Row
from collections.abc import Sequence
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from apollo_sync import settings
from apollo_sync.clean.mapping import ADDRESS_PARTS, COUNTRY, CUSTOM_PREFIX, FULL_NAME, MAPPABLE_FIELDS, Mapping
from apollo_sync.clean.mapping import plan_columns, require_identity
from apollo_sync.clean.phones import check_region, country_region, phone_e164, phone_verdict  # noqa: F401

Value = str | list[str] | None
"""A cleaned field: text, a list of labels (``label_names``), or None (empty)."""

# --- Text ---------------------------------------------------------------------------------------------------

WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
"""Whitespace: the 25 characters of Unicode's White_Space property, which polars' ``strip_chars()`` and regex
``\\s`` use. Not whitespace, though Python's ``str.isspace`` says so: U+001C..U+001F (file, group, record and unit
separators), which stay in the text; nor U+200B (zero-width space) or U+FEFF."""

_WS_CHARS = "".join(sorted(WHITESPACE))
_WS = re.escape(_WS_CHARS)  # for a regex character class
_WS_RUN = re.compile(f"[{_WS}]+")

LOWER_SINCE_UNICODE_14 = {
    0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
    0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
    **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},  # Garay
    **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)},  # Beria Erfe
}
"""Lower-case mappings of capitals added in Unicode 15-16, which polars knows and Python 3.11's ``str.lower`` does
not (a test compares :func:`lower` with polars on every code point). The Final_Sigma rule (a Σ ending a word
becomes ς) is Python's: the two differ only for a Σ right after one of these new letters."""


def strip(value: str) -> str:
    """``value`` without :data:`WHITESPACE` at either end."""
    return value.strip(_WS_CHARS)


def clean_text(value: str | None) -> str | None:
    """Trimmed, every run of :data:`WHITESPACE` turned into one space, "" -> None. Case is kept."""
    if value is None:
        return None
    return " ".join(word for word in _WS_RUN.split(value) if word) or None


def lower(value: str) -> str:
    """Unicode 16 lower-casing: Python's ``str.lower`` plus :data:`LOWER_SINCE_UNICODE_14`."""
    return value.lower().translate(LOWER_SINCE_UNICODE_14)


def fold(word: str) -> str:
    """``word`` as a case-insensitive pattern of ASCII letters sees it: A-Z as a-z, and the two other letters that
    Unicode's simple case folding maps to ASCII ones, ``ſ`` (long s) as s and ``K`` (Kelvin sign) as k. Nothing
    else matches an ASCII letter (not ``ı`` or ``İ``, which Python's ``re.IGNORECASE`` would match to i)."""
    return "".join(
        "s" if c == "\u017f" else "k" if c == "\u212a" else c.lower() if "A" <= c <= "Z" else c for c in word
    )


# --- Email: the library's verdict (phones: apollo_sync.clean.phones) --------------------------------------


def normalized_email(value: str | None) -> str | None:
    """An email cell as an address to check: :func:`clean_text`, then :func:`lower`."""
    text = clean_text(value)
    return None if text is None else lower(text)


def validated_email(address: str) -> str | None:
    """email-validator's normalised form of one address, or None when its syntax is invalid (no DNS lookup)."""
    try:
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


# --- Websites, LinkedIn, labels, names ---------------------------------------------------------------------

_SITE_HOST = re.compile(rf"(?:[a-z][a-z0-9+.\-]*://)?(?:www\.)?([^/:?#@{_WS}]+)")
_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,63}")


def website(value: str | None) -> str | None:
    """A company website as ``https://<host>``, or None without a usable host name.

    The value is :func:`strip`-ped and lower-cased; a scheme (``http://``...) and ``www.`` are dropped, the host
    ends at ``/ : ? #``, ``@`` or whitespace (so port, path and query go), one trailing dot goes, and what is left
    must be a host name: dot-separated labels of a-z, 0-9 and inner dashes, ending in a 2-63 letter TLD.
    """
    if value is None:
        return None
    found = _SITE_HOST.match(lower(strip(value)))
    if found is None:
        return None
    host = found.group(1).removesuffix(".")
    return "https://" + host if _HOSTNAME.fullmatch(host) else None


_LINKEDIN = re.compile(rf"[{_WS}]*(?:https?://)?(?:[a-z]{{2,3}}\.)?linkedin\.com/[^?#{_WS}]*")


def linkedin(value: str | None) -> str | None:
    """A LinkedIn URL as ``https://www.linkedin.com/<path>``, or None when it is not one.

    Lower-cased, the value must start (after whitespace) with an optional ``http(s)://``, an optional 2-3 letter
    subdomain (``www.``, ``uk.``) and ``linkedin.com/``; the path runs to a query, fragment or whitespace, loses
    its trailing slashes and must not be empty.
    """
    if value is None:
        return None
    found = _LINKEDIN.match(lower(value))
    if found is None:
        return None
    path = found.group(0).split("linkedin.com", 1)[1].rstrip("/")
    return "https://www.linkedin.com" + path if path else None


def labels(value: str | None) -> list[str] | None:
    """Label names from text split on ``;`` or ``,``: each :func:`clean_text`-ed, empty ones dropped, the first of
    equal ones kept, in order; None when none is left."""
    if value is None:
        return None
    found: list[str] = []
    for part in value.replace(";", ",").split(","):
        label = clean_text(part)
        if label is not None and label not in found:
            found.append(label)
    return found or None


NAME_PARTICLES = (
    "van", "von", "de", "der", "den", "del", "della", "da", "di", "du", "la", "le", "dos", "das",
    "ter", "ten", "st", "st.", "bin", "al", "el",
)
"""Words that start a surname when a full name is split (``Jan van der Berg`` -> ``van der Berg``), any case."""
NAME_SUFFIXES = ("jr", "sr", "ii", "iii", "iv", "phd", "md")
"""Words (any case, optionally with one trailing dot) that end a surname: ``John Smith, Jr.``."""


def is_suffix(word: str) -> bool:
    """True for a :data:`NAME_SUFFIXES` word (as :func:`fold` sees it), with or without one trailing dot."""
    word = fold(word)
    return (word[:-1] if word.endswith(".") else word) in NAME_SUFFIXES


def split_name(full: str | None) -> tuple[str | None, str | None]:
    """(first, last) from a cleaned full name (single spaces only).

    ``Last, First`` (exactly one comma, followed by a space; ``First`` not a suffix) gives first ``First`` and
    last ``Last`` (without a space before the comma). Otherwise the last name is the shortest tail of the words
    that is: any number of :data:`NAME_PARTICLES`, one word, and optionally a suffix; the words before it are the
    first name. A single word is a first name with no last name.
    """
    if full is None:
        return None, None
    if full.count(",") == 1:
        surname, _, given = full.partition(",")
        if surname and given.startswith(" ") and given[1:] and not is_suffix(given[1:]):
            return given[1:], surname.rstrip(" ")
    words = full.split(" ")
    for start in range(1, len(words)):
        tail = words[start:]
        if all(fold(w) in NAME_PARTICLES for w in tail[:-1]) or (
            len(tail) >= 2 and is_suffix(tail[-1]) and all(fold(w) in NAME_PARTICLES for w in tail[:-2])
        ):
            return " ".join(words[:start]), " ".join(tail)
    return full, None


# --- One row -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanRow:
    """One row cleaned, before validation and dedupe."""

    fields: dict[str, Value]
    """Every Apollo field of :data:`~apollo_sync.clean.mapping.MAPPABLE_FIELDS` (None when empty), then the
    ``custom.<id>`` fields sorted by name."""
    email_given: bool
    """The row had an email (some email column's text not empty), valid or not."""
    email_read: str | None
    """The email cell as read: with one email column that column's cell (whatever it holds), with several the
    first whose text is not empty (None when none is)."""
    phone_drops: tuple[str, ...]
    """The drop reason of each phone field whose text was not empty but gave no valid number."""
    too_large: bool
    """Some cell of a column that feeds a field is longer than :data:`~apollo_sync.settings.MAX_CELL_BYTES`."""


def row_region(row: Row[str, str | None], sources: dict[str, tuple[str, ...]], default: str) -> str:
    """The region a row's phones are read in: the first country column whose cell names a country
    (:func:`apollo_sync.clean.phones.country_region`), else ``default`` (``--phone-region``)."""
    found = (country_region(row[column]) for column in sources.get(COUNTRY, ()))
    return next((region for region in found if region is not None), default)


def too_large(row: Row[str, str | None], sources: dict[str, tuple[str, ...]]) -> bool:
    """True when a cell of a column that feeds a field (any target of ``sources``) is longer than
    :data:`~apollo_sync.settings.MAX_CELL_BYTES` in UTF-8, as read: such a row is rejected, never sent."""
    cells = (row[column] for columns in sources.values() for column in columns)
    return any(cell is not None and len(cell.encode()) > settings.MAX_CELL_BYTES for cell in cells)


def clean_row(
    row: Row[str, str | None], sources: dict[str, tuple[str, ...]], mapping: Mapping, region: str
) -> CleanRow:
    """Clean one row as read (cells are text or None), given the mapping's ``sources`` (target -> columns).

    Every target takes its columns' first cleaned value that is not empty, else the mapping's constant *as given*
    (constants are not cleaned, except phones, which go through E.164 like any phone text). Phones are read in
    the row's region (:func:`row_region`; ``region`` is the default).
    """
    constants = mapping.constants
    region = row_region(row, sources, region)

    def first(target: str, clean=clean_text) -> Value:
        for column in sources.get(target, ()):
            value = clean(row[column])
            if value is not None:
                return value
        return None

    def with_constant(target: str, value: Value) -> Value:
        return constants.get(target) if value is None else value  # type: ignore[return-value]

    fields: dict[str, Value] = {}
    email_cols = sources.get("email", ())
    address = first("email", normalized_email)
    fields["email"] = None if address is None else validated_email(address)
    if len(email_cols) == 1:
        email_read = row[email_cols[0]]
    else:
        email_read = next((row[c] for c in email_cols if clean_text(row[c]) is not None), None)

    first_name, last_name = first("first_name"), first("last_name")
    if FULL_NAME in sources:  # only mapped when neither first nor last name is
        first_name, last_name = split_name(first(FULL_NAME))  # type: ignore[arg-type]
    fields["first_name"] = with_constant("first_name", first_name)
    fields["last_name"] = with_constant("last_name", last_name)

    drops: list[str] = []
    for name in MAPPABLE_FIELDS:
        if name in fields:
            continue
        if name == "label_names":
            fields[name] = label_names(row, sources.get(name, ()), constants.get(name))  # type: ignore[arg-type]
        elif name in settings.PHONE_FIELDS:  # the text (or the constant) cleaned, then phonenumbers' verdict
            text = clean_text(with_constant(name, first(name)))  # type: ignore[arg-type]
            fields[name], why = (None, None) if text is None else phone_verdict(text, region)
            drops += [why] if why else []
        elif name == "website_url":
            fields[name] = with_constant(name, first(name, website))
        elif name == "linkedin_url":
            fields[name] = with_constant(name, first(name, linkedin))
        elif name == "present_raw_address" and name not in sources:  # city, state, country: each its first text
            parts = [first(part) for part in ADDRESS_PARTS]
            fields[name] = with_constant(name, ", ".join(p for p in parts if p is not None) or None)  # type: ignore[misc]
        else:
            fields[name] = with_constant(name, first(name))
    fields = {name: fields[name] for name in MAPPABLE_FIELDS}  # in Apollo's field order, custom fields last
    customs = sorted({t for t in (*sources, *constants) if t.startswith(CUSTOM_PREFIX)})
    for name in customs:
        fields[name] = with_constant(name, first(name))
    return CleanRow(fields=fields, email_given=address is not None, email_read=email_read, phone_drops=tuple(drops),
                    too_large=too_large(row, sources))  # fmt: skip


def label_names(row: Row[str, str | None], columns: Sequence[str], constant: list[str] | None) -> list[str] | None:
    """Every label column's :func:`labels` in column order, then the constant labels; the first of equal ones kept.

    Constant labels are taken as given: with no label column they are the list itself, duplicates and all; an empty
    constant list adds nothing.
    """
    lists = [labels(row[c]) for c in columns]
    if constant:
        lists.append(list(constant))
    if len(lists) <= 1:
        return lists[0] if lists else None
    merged: list[str] = []
    for found in lists:
        for label in found or ():
            if label not in merged:
                merged.append(label)
    return merged or None


def rejection(row: CleanRow) -> str | None:
    """Why the row is rejected, or None: ``too_large`` (a cell over the limit, whatever else the row holds),
    ``invalid_email`` (an email given, not valid), ``missing_identity`` (no email, and not all of first name, last
    name and organization)."""
    if row.too_large:
        return settings.REJECT_TOO_LARGE
    fields = row.fields
    if fields["email"] is not None:
        return None
    if row.email_given:
        return settings.REJECT_INVALID_EMAIL
    if fields["first_name"] is None or fields["last_name"] is None or fields["organization_name"] is None:
        return settings.REJECT_MISSING_IDENTITY
    return None


def identity(fields: dict[str, Value]) -> str:
    """What makes two rows one contact (of a row not rejected): ``email:<address>``, or without email
    ``name:`` + first name, last name and organization joined by ``|``, :func:`lower`-ed together."""
    if fields["email"] is not None:
        return f"email:{fields['email']}"
    return "name:" + lower("|".join([fields["first_name"], fields["last_name"], fields["organization_name"]]))  # type: ignore[list-item]


# --- Fingerprint ---------------------------------------------------------------------------------------------


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 of ``data``, written from the published algorithm (the hash Iceberg fixes for buckets)."""
    c1, c2, h, n, mask = 0xCC9E2D51, 0x1B873593, seed, len(data), 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    for i in range(0, n // 4 * 4, 4):
        k = rotl((int.from_bytes(data[i:i + 4], "little") * c1) & mask, 15) * c2 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail = data[n // 4 * 4:]
    if tail:
        h ^= rotl((int.from_bytes(tail, "little") * c1) & mask, 15) * c2 & mask
    h ^= n
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * mult) & mask
    return h ^ (h >> 16)


def field_weight(name: str) -> int:
    """The odd 64-bit multiplier of field ``name``: the first 8 bytes of its SHA-256, big-endian, with bit 0 set."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") | 1


def fingerprint(fields: dict[str, Value]) -> str:
    """The decimal 64-bit fingerprint of a contact's final fields: the sum over the fields with a value of
    ``field_weight(name) * (h + 1)`` modulo 2**64, where h is the :func:`murmur3_32` of the value's UTF-8 bytes,
    or for ``label_names`` the sum of its labels' h. An empty field adds nothing."""
    total = 0
    for name, value in fields.items():
        if value is None:
            continue
        hashed = sum(murmur3_32(v.encode()) for v in value) if isinstance(value, list) else murmur3_32(value.encode())
        total += field_weight(name) * (hashed + 1)
    return str(total % 2**64)


# --- The whole stage -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one row: a contact, a rejected row or a duplicate."""

    source_row: int
    row: CleanRow
    reason: str | None
    identity: str | None
    merged_into: int | None = None
    """source_row of the surviving row, for a duplicate."""


@dataclass(frozen=True)
class Reference:
    """What :func:`prepare_rows` made of rows: the frames of :class:`apollo_sync.clean.Prepared` as lists."""

    outcomes: list[Outcome]
    contacts: list[dict[str, object]]
    """source_row, identity, fingerprint and the final fields of each surviving row, in row order."""
    rejected: list[dict[str, object]]
    """source_row, email (as read), reason, original (the row as read, without source_row), in row order."""
    duplicates: list[dict[str, object]]
    """source_row, email (the survivor's), merged_into, by source_row."""
    phones_dropped: dict[str, int]
    """Phones dropped in rows not rejected (duplicates included), by reason (every one of
    :data:`~apollo_sync.settings.PHONE_DROP_REASONS`, 0 or more)."""
    unmapped_columns: list[str]
    column_map: dict[str, str]


def dedupe(outcomes: list[Outcome]) -> dict[int, dict[str, Value]]:
    """The final fields of each surviving row, by its index in ``outcomes``; the duplicates' outcomes are replaced
    by ones naming the row they merged into.

    Rows not rejected that share an identity are one contact: the first in row order survives, and each field it
    has no value for takes the first value that a later row of the same identity has.
    """
    first_of: dict[str, int] = {}
    final: dict[int, dict[str, Value]] = {}
    for index, outcome in enumerate(outcomes):
        if outcome.identity is None:
            continue
        survivor = first_of.setdefault(outcome.identity, index)
        if survivor == index:
            final[index] = dict(outcome.row.fields)
            continue
        outcomes[index] = Outcome(
            outcome.source_row, outcome.row, None, outcome.identity, merged_into=outcomes[survivor].source_row
        )
        fields = final[survivor]
        for name, value in outcome.row.fields.items():
            if fields[name] is None:
                fields[name] = value
    return final


def prepare_rows(
    columns: Sequence[str],
    rows: Sequence[Row[str, str | None]],
    *,
    mapping: Mapping | None = None,
    phone_region: str = settings.DEFAULT_PHONE_REGION,
) -> Reference:
    """Map, clean, validate and dedupe ``rows`` (each a mapping of ``columns`` to text or None; a ``source_row``
    int where given, else rows are numbered from 1). Raises InputError as prepare() does."""
    region = check_region(phone_region)
    mapping = mapping or Mapping()
    plan = plan_columns(list(columns), mapping)
    require_identity(plan.sources, mapping, list(columns))
    outcomes: list[Outcome] = []
    for number, row in enumerate(rows, start=1):
        cleaned = clean_row(row, plan.sources, mapping, region)
        reason = rejection(cleaned)
        key = None if reason else identity(cleaned.fields)
        source_row = int(row[settings.SOURCE_ROW]) if settings.SOURCE_ROW in columns else number  # type: ignore[arg-type]
        outcomes.append(Outcome(source_row, cleaned, reason, key))
    final = dedupe(outcomes)
    email_of = {outcomes[i].identity: fields["email"] for i, fields in final.items()}
    contacts = [
        {settings.SOURCE_ROW: outcomes[i].source_row, "identity": outcomes[i].identity,
         "fingerprint": fingerprint(fields), **fields}
        for i, fields in sorted(final.items())
    ]
    rejected = [
        {settings.SOURCE_ROW: o.source_row, "email": o.row.email_read, "reason": o.reason,
         "original": {c: row[c] for c in columns if c != settings.SOURCE_ROW}}
        for o, row in zip(outcomes, rows) if o.reason
    ]
    duplicates = sorted(
        ({settings.SOURCE_ROW: o.source_row, "email": email_of[o.identity], "merged_into": o.merged_into}
         for o in outcomes if o.merged_into is not None),
        key=lambda d: d[settings.SOURCE_ROW],  # type: ignore[arg-type,return-value]
    )
    dropped = {why: sum(o.row.phone_drops.count(why) for o in outcomes if o.reason is None)
               for why in settings.PHONE_DROP_REASONS}  # fmt: skip
    return Reference(outcomes, contacts, rejected, duplicates, dropped, plan.unmapped, plan.column_map)
