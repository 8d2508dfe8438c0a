"""One batch of rows as read -> its cleaned rows, its rejected rows and the phones it dropped.

Two passes over whole columns, then a per-value step for what the fast paths left open:

1. one wide ``select`` cleans every column (text, names, website, LinkedIn, labels, address, constants, custom
   fields; an email only trimmed and lower-cased where that is all it needs; phones as text);
2. one ``with_columns`` on the materialised clean text runs the fast paths that need it: the email's fast-valid
   shape and the North American phone shape (mostly empty phone and LinkedIn columns on their values only);
3. :func:`finish` patches in place the few emails those paths left open (email-validator, once per distinct
   value), reads and validates every phone in its row's region (:func:`phones`: phonenumbers' metadata over the
   column, the library once per distinct value for the rest: :mod:`apollo_sync.clean.checks`), and gives each
   row its reason (``too_large`` first: a cell over the limit) or its identity.

What the result is, value for value, is stated in :mod:`apollo_sync.clean.rules`; this is the fast way to it.
"""

from __future__ import annotations

import phonenumbers
import polars as pl

from apollo_sync import settings
from apollo_sync.clean import expressions as ex
from apollo_sync.clean.checks import email_verdicts, lookup, phones_e164
from apollo_sync.clean.columns import EMAIL_FAST, PHONE_TEXT, SOURCE_ROW, SPARSE_TEXT, TEXT_FIELDS
from apollo_sync.clean.distinct import address, per_distinct, repeating_values, row_regions
from apollo_sync.clean.frames import is_sparse, lazy_select, lazy_with_columns, on_values, pick, without
from apollo_sync.clean.mapping import ADDRESS_PARTS, COUNTRY, CUSTOM_PREFIX, FULL_NAME, Mapping
from apollo_sync.clean.options import EngineOptions

NANP_REGIONS = tuple(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])
"""The regions of calling code 1, where the North American national shapes are read as +1 numbers."""
REJECTED_SCHEMA = {SOURCE_ROW: pl.Int64, "email": pl.String, "reason": pl.String, "original": pl.String}


def clean_batch(
    raw: pl.DataFrame, sources: dict[str, tuple[str, ...]], mapping: Mapping, region: str, options: EngineOptions
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """(cleaned rows, rejected rows, phones dropped by reason) of one batch of rows as read (with ``source_row``).

    The cleaned rows are all the batch's rows; a rejected one has a null ``identity`` (every other has one).
    """
    phones = [n for n in settings.PHONE_FIELDS if n in sources or n in mapping.constants]
    regions = row_regions(raw, sources.get(COUNTRY, ()), region, options) if phones else region
    # With one region for all, the North American national shapes are read only in a +1 region; with a region per
    # row they are read everywhere, and finish() keeps them only in the rows of +1 regions.
    nanp = isinstance(regions, pl.Series) or phonenumbers.country_code_for_region(region) == 1
    mapped = [c for cs in sources.values() for c in cs]
    too_large = lazy_select(
        raw, pl.any_horizontal([pl.col(c).str.len_bytes() > settings.MAX_CELL_BYTES for c in mapped] or [pl.lit(False)])
        .fill_null(False).alias("big"),
    ).to_series()
    # The in-memory engine runs this wide select in ~15% less CPU than the streaming one; the narrower second pass
    # (and the fingerprints) the other way round (measured on 250k-row batches).
    cleaned = raw.lazy().select(clean_exprs(raw, sources, mapping, phones, options)).collect(engine="in-memory")
    # Second pass on the materialised clean text: each regex reads a column once. Mostly empty columns are worked
    # on their values only: string kernels cost per row, null or not.
    sparse = {n for n in phones if is_sparse(cleaned.get_column(PHONE_TEXT + n), options.sparse_share)}
    cleaned = lazy_with_columns(
        cleaned,
        ex.email_fast_valid(pl.col("email")).fill_null(False).alias(EMAIL_FAST),
        *[ex.phone_nanp_e164(pl.col(PHONE_TEXT + n), nanp_region=nanp).alias(n) for n in phones if n not in sparse],
    )
    later = {
        n: on_values(cleaned.get_column(PHONE_TEXT + n), lambda e: ex.phone_nanp_e164(e, nanp_region=nanp))
        for n in sparse
    }
    if SPARSE_TEXT + "linkedin_url" in cleaned.columns:
        later["linkedin_url"] = on_values(cleaned.get_column(SPARSE_TEXT + "linkedin_url"), ex.linkedin)
    email_fast = cleaned.get_column(EMAIL_FAST)
    texts = {n: cleaned.get_column(PHONE_TEXT + n) for n in phones}
    hidden = (EMAIL_FAST, SPARSE_TEXT + "linkedin_url", *[PHONE_TEXT + n for n in phones])
    cleaned = without(cleaned, *hidden).with_columns(values.alias(name) for name, values in later.items())
    # Keep the rows as read only where a rejection is possible (their originals go to the report);
    # the rest are freed before the heavy steps. Fast-valid emails are never rejected.
    maybe_rejected = lazy_select(
        cleaned, pl.when(pl.col("email").is_not_null()).then(pl.lit(~email_fast)).otherwise(~named()).alias("m")
    ).to_series() | too_large
    raw_maybe = raw.filter(maybe_rejected)
    cleaned, reason, drops = finish(cleaned, email_fast, texts, regions, too_large)

    rejected_mask = reason.is_not_null()
    if not rejected_mask.any():
        dropped = {why: int(drops.get_column(why).sum()) for why in settings.PHONE_DROP_REASONS}
        return cleaned, rejected_rows(raw_maybe.head(0), sources, reason.head(0)), dropped
    rejected = rejected_rows(
        raw_maybe.filter(reason.filter(maybe_rejected).is_not_null()), sources, reason.filter(rejected_mask)
    )
    # Rejected rows stay (without identity) until the merge, which drops them with the duplicates in one filter.
    kept = drops.filter(~rejected_mask)
    return cleaned, rejected, {why: int(kept.get_column(why).sum()) for why in settings.PHONE_DROP_REASONS}


def clean_exprs(
    raw: pl.DataFrame,
    sources: dict[str, tuple[str, ...]],
    mapping: Mapping,
    phones: list[str],
    options: EngineOptions,
) -> list[pl.Expr]:
    """One expression per output column of the first pass (before the fast paths and per-value library checks).

    A single email column is only trimmed and lower-cased here: that is its whole normalisation for every
    address the fast path accepts (they hold no whitespace), and :func:`finish` normalises the rest.
    """

    def cols(target: str) -> list[pl.Expr]:
        return [pl.col(c) for c in sources.get(target, ())]

    skip = {c for t in ("email", *settings.PHONE_FIELDS, *ADDRESS_PARTS) for c in sources.get(t, ())}  # not per value
    repeating = repeating_values(raw, [c for cs in sources.values() for c in cs if c not in skip], options)

    def distinct(target: str, build) -> list[pl.Expr]:
        return [per_distinct(c, repeating.get(c), build, options) for c in sources.get(target, ())]

    def text(target: str) -> pl.Expr:
        return ex.first_present(distinct(target, ex.clean_text))

    constants = mapping.constants
    out: list[pl.Expr] = [pl.col(SOURCE_ROW)]

    email_cols = cols("email")
    if len(email_cols) == 1:
        email = email_cols[0].str.strip_chars().str.to_lowercase()
    else:  # "" must not hide a later column's address
        email = ex.first_present([ex.normalized_email(c) for c in email_cols])
    out.append(email.alias("email"))

    first, last = text("first_name"), text("last_name")
    if FULL_NAME in sources:
        first, last = ex.split_name(text(FULL_NAME))
    for name, expr in (("first_name", first), ("last_name", last)):
        out.append(with_constant(expr, constants.get(name)).alias(name))

    for name in TEXT_FIELDS:
        if name in ("first_name", "last_name") or name in settings.PHONE_FIELDS:
            continue
        expr = text(name)
        if name == "present_raw_address" and "present_raw_address" not in sources:
            built = address(raw, {p: sources[p] for p in ADDRESS_PARTS if p in sources}, options)
            expr = expr if built is None else built
        out.append(with_constant(expr, constants.get(name)).alias(name))

    website = ex.first_present(distinct("website_url", ex.website))
    out.append(with_constant(website, constants.get("website_url")).alias("website_url"))
    linkedin_cols = sources.get("linkedin_url", ())
    if (
        len(linkedin_cols) == 1
        and "linkedin_url" not in constants
        and linkedin_cols[0] not in repeating
        and is_sparse(raw.get_column(linkedin_cols[0]), options.sparse_share)
    ):
        out.append(pl.col(linkedin_cols[0]).alias(SPARSE_TEXT + "linkedin_url"))  # built on its values in pass 2
    else:
        linkedin = ex.first_present(distinct("linkedin_url", ex.linkedin))
        out.append(with_constant(linkedin, constants.get("linkedin_url")).alias("linkedin_url"))

    out.append(label_names(distinct("label_names", ex.labels), constants.get("label_names")).alias("label_names"))

    for name in settings.PHONE_FIELDS:
        phone_cols = cols(name)
        if name not in phones:
            out.append(pl.lit(None, dtype=pl.String).alias(name))
        elif len(phone_cols) == 1 and name not in constants:
            # Only trimmed (no copy): the fast path reads it so, and finish() cleans the values it leaves open.
            out.append(phone_cols[0].str.strip_chars().alias(PHONE_TEXT + name))
        else:
            out.append(with_constant(text(name), constants.get(name)).alias(PHONE_TEXT + name))

    customs = sorted({t for t in (*sources, *constants) if t.startswith(CUSTOM_PREFIX)})
    for name in customs:
        out.append(with_constant(text(name), constants.get(name)).alias(name))
    return out


def label_names(lists: list[pl.Expr], constant: object) -> pl.Expr:
    """The labels of each label column, then the constant labels (as given): one list, first of each kept."""
    if constant:
        lists = [*lists, pl.lit(pl.Series([list(constant)], dtype=pl.List(pl.String))).first()]  # a scalar
    if not lists:
        return pl.lit(None, dtype=pl.List(pl.String))
    if len(lists) == 1:
        return lists[0]
    merged = pl.concat_list([lst.fill_null(pl.lit([], dtype=pl.List(pl.String))) for lst in lists])
    merged = merged.list.unique(maintain_order=True)
    return pl.when(merged.list.len() > 0).then(merged)


def with_constant(expr: pl.Expr, value: object) -> pl.Expr:
    """``expr``, or where it is null the mapping's constant (as given, not cleaned)."""
    return expr if value is None else pl.coalesce(expr, pl.lit(value, dtype=pl.String))


def named() -> pl.Expr:
    """True where a row has first name, last name and organization (an identity without email)."""
    return pl.all_horizontal(pl.col("first_name", "last_name", "organization_name").is_not_null())


def finish(
    cleaned: pl.DataFrame,
    email_fast: pl.Series,
    texts: dict[str, pl.Series],
    regions: pl.Series | str,
    too_large: pl.Series,
) -> tuple[pl.DataFrame, pl.Series, pl.DataFrame]:
    """(rows with the final email, phones and identity; each row's rejection reason or null; phones dropped per row,
    a column per reason).

    ``email_fast`` says which emails the fast path found valid, ``texts`` holds each phone field's text, ``regions``
    each row's phone region (or one for all), ``too_large`` the rows with a cell over the limit (rejected: their
    values go to no library). The fast paths decided most emails and read the North American phones; the rest is
    patched in place: each looked up once per distinct value (:mod:`apollo_sync.clean.checks`) and scattered back
    to its rows, so no step here reads a whole column more than once.
    """
    keep = ~too_large
    email = cleaned.get_column("email")
    given = email.is_not_null()
    open_rows = (given & ~email_fast & keep).arg_true()
    if open_rows.len():
        normal = email.gather(open_rows).to_frame("e").select(ex.normalized_email(pl.col("e"))).to_series()
        given = given.scatter(open_rows, normal.is_not_null())  # a cell of only whitespace gives no email
        email = email.scatter(open_rows, lookup(normal, email_verdicts(normal.drop_nulls().unique())))

    found, drops = phones(cleaned, texts, regions, keep)
    out = cleaned.with_columns(email.alias("email"), *[found[n].alias(n) for n in texts])
    has_name = lazy_select(out, named()).to_series()
    no_email = email.is_null()
    reason = pl.repeat(None, out.height, dtype=pl.String, eager=True).alias("reason")  # set for the few rejected
    for why, rows in (
        (settings.REJECT_TOO_LARGE, too_large),
        (settings.REJECT_INVALID_EMAIL, no_email & given & keep),
        (settings.REJECT_MISSING_IDENTITY, no_email & ~given & ~has_name & keep),
    ):
        if rows.any():
            reason = reason.scatter(rows.arg_true(), why)
    # A rejected row gets no identity (the merge drops it with the duplicates).
    email_identity = pl.when(pl.lit(reason.is_null())).then(pl.lit("email:") + pl.col("email"))
    identity = lazy_select(out, email_identity.alias("identity")).to_series()
    by_name = (no_email & has_name & reason.is_null()).arg_true()
    if by_name.len():
        parts = pick(out, "first_name", "last_name", "organization_name")[by_name]
        key = parts.select(pl.lit("name:") + pl.concat_str(pl.all(), separator="|").str.to_lowercase()).to_series()
        identity = identity.scatter(by_name, key)
    return out.with_columns(identity), reason, drops


def phones(
    cleaned: pl.DataFrame, texts: dict[str, pl.Series], regions: pl.Series | str, keep: pl.Series
) -> tuple[dict[str, pl.Series], pl.DataFrame]:
    """(each phone field's E.164 or null, phones dropped per row by reason) of the ``keep`` rows.

    Every field's phones go to :func:`apollo_sync.clean.checks.phones_e164` together: those the North American
    path read (``cleaned``'s phone columns) to be validated, the others cleaned (for these rows only: a cell of
    only whitespace holds no phone) to be read and validated.
    """
    height = cleaned.height
    found = {n: pl.repeat(None, height, dtype=pl.String, eager=True) for n in texts}
    drops = {why: pl.repeat(0, height, dtype=pl.Int32, eager=True) for why in settings.PHONE_DROP_REASONS}
    rows = {n: (texts[n].is_not_null() & keep).arg_true() for n in texts}
    if any(r.len() for r in rows.values()):
        every = pl.concat(list(rows.values()))
        here = regions if isinstance(regions, str) else regions.gather(every)
        given = pl.DataFrame([
            pl.concat([cleaned.get_column(n).gather(r) for n, r in rows.items()]).rename("f"),
            pl.concat([texts[n].gather(r) for n, r in rows.items()]).rename("t"),
        ])
        if not isinstance(here, str):  # the national North American shapes are numbers only in +1 regions
            nanp = pl.lit(here.is_in(NANP_REGIONS)) | pl.col("t").str.starts_with("+")
            given = lazy_select(given, pl.when(nanp).then("f").alias("f"), "t")
        fast = given.get_column("f")
        rest = fast.is_null().arg_true()  # cleaned for these rows only: a cell of only whitespace holds no phone
        clean = lazy_select(given.get_column("t").gather(rest).to_frame("t"), ex.clean_text(pl.col("t"))).to_series()
        text = pl.repeat(None, fast.len(), dtype=pl.String, eager=True).scatter(rest, clean)
        e164, reason = phones_e164(text, here, fast)
        start = 0
        for n, r in rows.items():
            found[n] = found[n].scatter(r, e164.slice(start, r.len()))
            why = reason.slice(start, r.len())
            for w in settings.PHONE_DROP_REASONS:
                drops[w] = drops[w].scatter(r, drops[w].gather(r) + (why == w).fill_null(False).cast(pl.Int32))
            start += r.len()
    return found, pl.DataFrame(drops)


def email_as_read(email_cols: list[str]) -> pl.Expr:
    """The email cell as read that a row's email came from: the column's, with one email column; with several,
    the first whose text is not empty (null when none)."""
    if not email_cols:
        return pl.lit(None, dtype=pl.String)
    if len(email_cols) == 1:
        return pl.col(email_cols[0])
    return ex.first_present([pl.when(ex.clean_text(pl.col(c)).is_not_null()).then(pl.col(c)) for c in email_cols])


def rejected_rows(raw: pl.DataFrame, sources: dict[str, tuple[str, ...]], reason: pl.Series) -> pl.DataFrame:
    """source_row, email (as read), reason and original (JSON of the row as read) of the rejected rows ``raw``."""
    originals = [c for c in raw.columns if c != SOURCE_ROW]
    original = pl.struct(originals).struct.json_encode() if originals else pl.lit("{}", dtype=pl.String)
    return raw.select(
        pl.col(SOURCE_ROW),
        email_as_read(list(sources.get("email", ()))).alias("email"),
        pl.lit(reason.rename("reason")),
        original.alias("original"),
    ).cast(REJECTED_SCHEMA)
