"""Turn a frame of exported contact rows into contacts ready for Bulk Create, and say what happened to each row.

:func:`prepare` runs, over whole columns:

1. **Mapping** (:mod:`apollo_sync.mapping`): headers auto-map to Apollo fields, a mapping file overrides;
   columns that feed nothing are listed in ``unmapped_columns`` and never sent.
2. **Cleaning** (:mod:`apollo_sync.expressions`): every text trimmed with whitespace collapsed, "" -> null,
   names keep their case; email lower-cased and its syntax checked (email-validator, no network); phones to
   E.164 (phonenumbers, default region ``phone_region``; an unusable phone is dropped and counted);
   website to ``https://<host>``; labels split on ``;``/``,``.
3. **Validation**: a present but invalid email rejects the row (``invalid_email``); a row with no email and
   not all of first name, last name and organization is rejected (``missing_identity``).
4. **Dedupe** within the source: by email, and rows without email by case-insensitive
   first+last+organization. The first row survives, its empty fields filled from later duplicates; each
   dropped row names the row it merged into.
5. **Payload**: JSON text of the non-null Apollo fields per contact, and a stable fingerprint of it.

Library calls happen once per distinct value and only for values the vectorised fast paths do not decide.
:func:`escape_for_spreadsheet` makes a frame safe to open in a spreadsheet (formula injection).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import phonenumbers
import polars as pl
from email_validator import EmailNotValidError, validate_email

from apollo_sync import expressions as ex
from apollo_sync import settings
from apollo_sync.errors import InputError
from apollo_sync.mapping import (
    ADDRESS_PARTS,
    CUSTOM_PREFIX,
    FULL_NAME,
    MAPPABLE_FIELDS,
    Mapping,
    load_mapping,
    plan_columns,
)

__all__ = ["Prepared", "prepare", "load_mapping", "escape_csv_cell", "escape_for_spreadsheet", "payload_fingerprint"]

SOURCE_ROW = settings.SOURCE_ROW
_EMAIL_READ = "_email_read"
_REASON = "_reason"
_PHONE_RAW = "_raw_"  # prefix: cleaned phone text before E.164
TEXT_FIELDS = tuple(f for f in MAPPABLE_FIELDS if f not in ("label_names", "website_url", "linkedin_url", "email"))
CONTACT_COLUMNS = (SOURCE_ROW, "identity", "fingerprint", "payload", *MAPPABLE_FIELDS)
"""Columns of ``Prepared.contacts``: the Apollo fields as cleaned (custom fields are only in the payload)."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made of a frame. Every row read is in exactly one of the three frames."""

    contacts: pl.DataFrame
    """One row per contact to send, in source order: see :data:`CONTACT_COLUMNS`."""
    rejected: pl.DataFrame
    """source_row, email (as read), reason (invalid_email | missing_identity), original (JSON of the row as read)."""
    duplicates: pl.DataFrame
    """source_row, email, merged_into (source_row of the surviving row)."""
    rows_read: int
    unmapped_columns: list[str]
    phones_dropped: int
    """Phone values (in rows not rejected) that were present but not usable as E.164, so not sent."""
    column_map: dict[str, str] = field(default_factory=dict)
    """source column -> Apollo field (or ``custom.<id>``, ``name``, ``city``...) it fed."""


def prepare(
    frame: pl.LazyFrame | pl.DataFrame,
    *,
    mapping: Mapping | None = None,
    phone_region: str = settings.DEFAULT_PHONE_REGION,
) -> Prepared:
    """Map, clean, validate and dedupe exported rows (all ``pl.String`` columns, optional ``source_row``).

    Rows are numbered from 1 when ``source_row`` is absent. Raises InputError when no column can give a
    row an identity (no email, and not first/last name + company), or for a bad mapping or region.
    """
    region = phone_region.upper()
    if phonenumbers.country_code_for_region(region) == 0:
        raise InputError(f"unknown phone region {phone_region!r}; use a two-letter region code such as US or GB")
    lf = frame.lazy()
    names = lf.collect_schema().names()
    if SOURCE_ROW not in names:
        lf = lf.with_row_index(SOURCE_ROW, offset=1).with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))
    mapping = mapping or Mapping()
    plan = plan_columns(names, mapping)
    _require_identity(plan.sources, mapping, names)

    raw = lf.with_columns(pl.col(SOURCE_ROW).cast(pl.Int64)).collect()
    cleaned = raw.select(_clean_exprs(plan.sources, mapping, nanp=phonenumbers.country_code_for_region(region) == 1))
    cleaned = _finish(cleaned, region)

    reason = cleaned.get_column(_REASON)
    rejected_mask = reason.is_not_null()
    rejected = _rejected(raw.filter(rejected_mask), cleaned.filter(rejected_mask))
    kept = cleaned.filter(~rejected_mask)
    phones_dropped = int(kept.select(pl.col("_phones_dropped").sum()).item() or 0)
    contacts, duplicates = _dedupe(kept.drop("_phones_dropped", _REASON, _EMAIL_READ))
    contacts = _with_payload(contacts)
    return Prepared(
        contacts=contacts,
        rejected=rejected,
        duplicates=duplicates,
        rows_read=raw.height,
        unmapped_columns=plan.unmapped,
        phones_dropped=phones_dropped,
        column_map=plan.column_map,
    )


# --- Mapping checks ------------------------------------------------------------------------


def _require_identity(sources: dict[str, tuple[str, ...]], mapping: Mapping, names: list[str]) -> None:
    have = set(sources) | set(mapping.constants)
    by_name = ({"first_name", "last_name"} <= have or FULL_NAME in have) and "organization_name" in have
    if "email" not in have and not by_name:
        cols = [n for n in names if n != SOURCE_ROW]
        raise InputError(
            f"no email or first/last name + company columns found in {cols}; map them with --mapping FILE"
        )


# --- Cleaning ------------------------------------------------------------------------------


def _clean_exprs(sources: dict[str, tuple[str, ...]], mapping: Mapping, *, nanp: bool) -> list[pl.Expr]:
    """One expression per output column of the cleaning step (before per-value library checks)."""

    def cols(target: str) -> list[pl.Expr]:
        return [pl.col(c) for c in sources.get(target, ())]

    def text(target: str) -> pl.Expr:
        return ex.first_present([ex.clean_text(c) for c in cols(target)])

    constants = mapping.constants
    out: list[pl.Expr] = [pl.col(SOURCE_ROW)]

    email_cols = cols("email")
    out.append(
        ex.first_present([pl.when(ex.clean_text(c).is_not_null()).then(c) for c in email_cols]).alias(_EMAIL_READ)
    )
    out.append(ex.first_present([ex.normalized_email(c) for c in email_cols]).alias("email"))

    first, last = text("first_name"), text("last_name")
    if FULL_NAME in sources:
        split_first, split_last = ex.split_name(text(FULL_NAME))
        first, last = split_first, split_last
    for name, expr in (("first_name", first), ("last_name", last)):
        out.append(_with_constant(expr, constants.get(name)).alias(name))

    for name in TEXT_FIELDS:
        if name in ("first_name", "last_name") or name in settings.PHONE_FIELDS:
            continue
        expr = text(name)
        if name == "present_raw_address" and "present_raw_address" not in sources:
            parts = [text(p) for p in ADDRESS_PARTS if p in sources]
            if parts:
                joined = pl.concat_str(parts, separator=", ", ignore_nulls=True)
                expr = pl.when(joined.str.len_bytes() > 0).then(joined)
        out.append(_with_constant(expr, constants.get(name)).alias(name))

    out.append(_with_constant(ex.first_present([ex.website(c) for c in cols("website_url")]), constants.get("website_url")).alias("website_url"))
    out.append(_with_constant(ex.first_present([ex.linkedin(c) for c in cols("linkedin_url")]), constants.get("linkedin_url")).alias("linkedin_url"))

    label_lists = [ex.labels(c) for c in cols("label_names")]
    const_labels = constants.get("label_names")
    if const_labels:
        label_lists.append(pl.lit(pl.Series([list(const_labels)], dtype=pl.List(pl.String))))
    if not label_lists:
        out.append(pl.lit(None, dtype=pl.List(pl.String)).alias("label_names"))
    elif len(label_lists) == 1:
        out.append(label_lists[0].alias("label_names"))
    else:
        merged = pl.concat_list([lst.fill_null(pl.lit([], dtype=pl.List(pl.String))) for lst in label_lists])
        merged = merged.list.unique(maintain_order=True)
        out.append(pl.when(merged.list.len() > 0).then(merged).alias("label_names"))

    for name in settings.PHONE_FIELDS:
        raw_phone = _with_constant(text(name), constants.get(name))
        out.append(raw_phone.alias(_PHONE_RAW + name))
        out.append(ex.phone_fast_e164(raw_phone, nanp_region=nanp).alias(name))

    customs = sorted({t for t in sources if t.startswith(CUSTOM_PREFIX)} | {t for t in constants if t.startswith(CUSTOM_PREFIX)})
    for name in customs:
        out.append(_with_constant(text(name), constants.get(name)).alias(name))
    return out


def _with_constant(expr: pl.Expr, value: object) -> pl.Expr:
    return expr if value is None else pl.coalesce(expr, pl.lit(value, dtype=pl.String))


def _finish(cleaned: pl.DataFrame, region: str) -> pl.DataFrame:
    """Email and phone checks the fast paths left open (once per distinct value), reasons and identity."""
    email = pl.col("email")
    undecided = cleaned.filter(email.is_not_null() & ~ex.email_fast_valid(email)).get_column("email").unique()
    email_lookup = {value: _validated_email(value) for value in undecided.to_list()}
    checked_email = pl.when(ex.email_fast_valid(email)).then(email).otherwise(
        email.replace_strict(list(email_lookup), list(email_lookup.values()), default=None, return_dtype=pl.String)
    )

    phone_values: set[str] = set()
    for name in settings.PHONE_FIELDS:
        undecided_phones = cleaned.filter(pl.col(name).is_null() & pl.col(_PHONE_RAW + name).is_not_null())
        phone_values.update(undecided_phones.get_column(_PHONE_RAW + name).unique().to_list())
    phone_lookup = {value: _e164(value, region) for value in phone_values}
    keys, values = list(phone_lookup), list(phone_lookup.values())
    phone_exprs = [
        pl.coalesce(
            pl.col(name),
            pl.col(_PHONE_RAW + name).replace_strict(keys, values, default=None, return_dtype=pl.String),
        ).alias(name)
        for name in settings.PHONE_FIELDS
    ]
    dropped = pl.sum_horizontal(
        [(pl.col(_PHONE_RAW + n).is_not_null() & pl.col(n).is_null()).cast(pl.Int32) for n in settings.PHONE_FIELDS]
    )
    out = cleaned.with_columns(checked_email.alias("email"), *phone_exprs)
    out = out.with_columns(dropped.alias("_phones_dropped")).drop([_PHONE_RAW + n for n in settings.PHONE_FIELDS])

    named = pl.col("first_name").is_not_null() & pl.col("last_name").is_not_null() & pl.col("organization_name").is_not_null()
    reason = (
        pl.when(pl.col("email").is_null() & pl.col(_EMAIL_READ).is_not_null())
        .then(pl.lit(settings.REJECT_INVALID_EMAIL))
        .when(pl.col("email").is_null() & ~named)
        .then(pl.lit(settings.REJECT_MISSING_IDENTITY))
    )
    identity = (
        pl.when(pl.col("email").is_not_null())
        .then(pl.lit("email:") + pl.col("email"))
        .otherwise(
            pl.lit("name:")
            + pl.concat_str(
                [pl.col("first_name"), pl.col("last_name"), pl.col("organization_name")], separator="|"
            ).str.to_lowercase()
        )
    )
    return out.with_columns(reason.alias(_REASON), identity.alias("identity"))


def _validated_email(value: str) -> str | None:
    """email-validator's normalised form of one address, or None when its syntax is invalid (no DNS)."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def _e164(value: str, region: str) -> str | None:
    """One phone as E.164, or None when phonenumbers cannot parse it or its length is not a possible number."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# --- Results -------------------------------------------------------------------------------


def _rejected(raw: pl.DataFrame, cleaned: pl.DataFrame) -> pl.DataFrame:
    originals = [c for c in raw.columns if c != SOURCE_ROW]
    original = (
        raw.select(pl.struct(originals).struct.json_encode().alias("original"))
        if originals
        else pl.DataFrame({"original": pl.Series(["{}"] * raw.height, dtype=pl.String)})
    )
    return pl.DataFrame(
        {
            SOURCE_ROW: cleaned.get_column(SOURCE_ROW),
            "email": cleaned.get_column(_EMAIL_READ),
            "reason": cleaned.get_column(_REASON),
            "original": original.get_column("original"),
        }
    )


def _dedupe(kept: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Collapse rows of one identity into the first; fill its empty fields from the later ones."""
    dup_mask = kept.get_column("identity").is_duplicated()
    singles = kept.filter(~dup_mask)
    groups = kept.filter(dup_mask).sort(SOURCE_ROW)
    fields = [c for c in kept.columns if c not in (SOURCE_ROW, "identity")]
    merged = groups.group_by("identity", maintain_order=True).agg(
        pl.col(SOURCE_ROW).first(),
        *[pl.col(c).drop_nulls().first() for c in fields],
        pl.col(SOURCE_ROW).alias("_rows"),
    )
    duplicates = (
        merged.select(pl.col(SOURCE_ROW).alias("merged_into"), "email", "_rows")
        .explode("_rows")
        .filter(pl.col("_rows") != pl.col("merged_into"))
        .select(pl.col("_rows").alias(SOURCE_ROW), "email", "merged_into")
        .sort(SOURCE_ROW)
    )
    contacts = pl.concat([singles, merged.select(kept.columns)]).sort(SOURCE_ROW)
    return contacts, duplicates


# --- Payload -------------------------------------------------------------------------------


def _json_member(name: str, key: str | None = None) -> pl.Expr:
    """``"key":<json value>`` for a non-null column, else null (single-field struct, braces stripped)."""
    member = pl.struct(pl.col(name).alias(key or name)).struct.json_encode().str.strip_prefix("{").str.strip_suffix("}")
    return pl.when(pl.col(name).is_not_null()).then(member)


def _json_object(members: list[pl.Expr]) -> pl.Expr:
    """``{...}`` of the non-null members, null when all are null."""
    body = pl.concat_str(members, separator=",", ignore_nulls=True)
    return pl.when(body.str.len_bytes() > 0).then(pl.lit("{") + body + pl.lit("}"))


def _with_payload(contacts: pl.DataFrame) -> pl.DataFrame:
    customs = [c for c in contacts.columns if c.startswith(CUSTOM_PREFIX)]
    members = [_json_member(f) for f in MAPPABLE_FIELDS]
    if customs:
        custom_object = _json_object([_json_member(c, c[len(CUSTOM_PREFIX):]) for c in customs])
        members.append(pl.when(custom_object.is_not_null()).then(pl.lit('"typed_custom_fields":') + custom_object))
    with_payload = contacts.with_columns(_json_object(members).fill_null("{}").alias("payload"))
    fingerprint = payload_fingerprint(with_payload.get_column("payload"))
    return with_payload.with_columns(fingerprint.alias("fingerprint")).select(CONTACT_COLUMNS)


def payload_fingerprint(payloads: pl.Series) -> pl.Series:
    """SHA-1 hex of each payload's UTF-8 bytes: stable across processes, machines and polars versions.

    (polars' own ``hash`` is documented as unstable between versions, so it cannot key a ledger.)
    """
    return pl.Series(
        "fingerprint",
        [hashlib.sha1(p.encode("utf-8")).hexdigest() for p in payloads.to_list()],
        dtype=pl.String,
    )


# --- Spreadsheet safety --------------------------------------------------------------------

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""Cell starts that spreadsheets may run as a formula (OWASP CSV injection); such cells get a leading ``'``."""


def escape_csv_cell(expr: pl.Expr) -> pl.Expr:
    """A string expression with a ``'`` put before values that start like a formula."""
    risky = expr.str.contains(r"^[=+\-@\t\r]")
    return pl.when(risky).then(pl.lit("'") + expr).otherwise(expr)


def escape_for_spreadsheet(df: pl.DataFrame) -> pl.DataFrame:
    """The frame with every String column escaped by :func:`escape_csv_cell`; other columns unchanged."""
    return df.with_columns(
        escape_csv_cell(pl.col(name)).alias(name) for name, dtype in df.schema.items() if dtype == pl.String
    )
