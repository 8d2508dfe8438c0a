"""The library verdicts the fast paths leave open: email-validator and phonenumbers, once per distinct value.

The verdict for one value is the rule itself (:func:`apollo_sync.clean.rules.validated_email`,
:func:`apollo_sync.clean.phones.phone_verdict`); this module decides in bulk what it can without calling them (the
vectorised paths of :mod:`apollo_sync.clean.expressions` and :mod:`apollo_sync.clean.numbering`) and calls them
once per distinct value for the rest. Why: email-validator costs ~24 us and phonenumbers ~20-50 us per value, i.e.
20-50 s for a 1M-row export of mostly unique values, while the regexes take ~0.05 s per column. The property tests
check that whatever a fast path decides, the library decides the same."""

from __future__ import annotations

import polars as pl

from apollo_sync import settings
from apollo_sync.clean import expressions as ex
from apollo_sync.clean import numbering as nb
from apollo_sync.clean.frames import lazy_select
from apollo_sync.clean.phones import phone_verdict
from apollo_sync.clean.rules import validated_email


def lookup(values: pl.Series, verdicts: pl.DataFrame) -> pl.Series:
    """``values`` replaced through ``verdicts`` (columns ``key``, ``value``); anything else becomes null."""
    if verdicts.height == 0:
        return pl.repeat(None, values.len(), dtype=pl.String, eager=True)
    keys, found = verdicts.get_column("key"), verdicts.get_column("value")
    return values.replace_strict(keys, found, default=None, return_dtype=pl.String)


def email_verdicts(emails: pl.Series) -> pl.DataFrame:
    """key -> normalised address or null (invalid) for distinct normalised emails the fast-valid path left open.

    Certainly invalid ones are decided by :func:`apollo_sync.clean.expressions.email_fast_invalid`, valid ones of
    the common shape by :func:`~apollo_sync.clean.expressions.email_fast_valid` (the multi-column and whitespace
    cases arrive here), and email-validator checks the rest, once each.
    """
    frame = emails.rename("key").to_frame().with_columns(
        ex.email_fast_invalid(pl.col("key")).fill_null(False).alias("bad"),
        ex.email_fast_valid(pl.col("key")).fill_null(False).alias("good"),
    )
    undecided = frame.filter(~pl.col("bad") & ~pl.col("good")).get_column("key")
    checked = pl.Series([validated_email(v) for v in undecided.to_list()], dtype=pl.String)
    return pl.concat(
        [
            frame.filter(pl.col("good")).select("key", pl.col("key").alias("value")),
            frame.filter(pl.col("bad")).select("key", pl.lit(None, dtype=pl.String).alias("value")),
            pl.DataFrame({"key": undecided, "value": checked}),
        ]
    )


def phones_e164(texts: pl.Series, regions: pl.Series | str, fast: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(E.164 or null, drop reason or null) of each phone: ``fast`` holds the North American path's E.164 where it
    read one, ``texts`` the cleaned text of the others (null: no phone), ``regions`` each row's region (or one for
    all).

    :mod:`apollo_sync.clean.numbering` validates what the North American path read and reads (``+<code>``
    numbers, then each region's national ones, on their rows only) and validates the other common shapes;
    phonenumbers (:func:`apollo_sync.clean.phones.phone_verdict`) decides the rest once per distinct text and
    region (junk such as "123" repeats).
    """
    height = texts.len()
    valid = pl.repeat(None, height, dtype=pl.Boolean, eager=True)
    read = fast.is_not_null().arg_true()
    if read.len():  # +1 and the ten digits
        valid = valid.scatter(read, nb.code_verdict(nb.code_rules(1), fast.gather(read).str.slice(2)))
    rows = texts.is_not_null().arg_true()
    written = texts.gather(rows).str.replace(r"^00", "+")  # a leading 00 is the international prefix
    plus = written.str.starts_with("+")
    here = None if isinstance(regions, str) else regions.gather(rows)
    groups = [(plus, nb.international_numbers)]
    for region in [regions] if here is None else here.filter(~plus).unique().to_list():
        mask = ~plus if here is None else ~plus & (here == region)
        groups.append((mask, lambda values, region=region: nb.national_numbers(values, region)))
    parts = []
    for mask, reading in groups:
        at = mask.arg_true()
        if at.len():
            parts.append(reading(written.gather(at)).with_columns(rows.gather(at).alias("i")))
    e164 = fast
    if parts:
        numbers = pl.concat(parts).drop_nulls()
        verdicts = lazy_select(
            numbers.with_columns(nb.valid_numbers(numbers).alias("v")), "i", "v",
            pl.when("v").then("+" + pl.col("code") + pl.col("nsn")).alias("e164"),
        )  # fmt: skip
        at = verdicts.get_column("i")
        valid, e164 = valid.scatter(at, verdicts.get_column("v")), e164.scatter(at, verdicts.get_column("e164"))
    found = lazy_select(
        pl.DataFrame([e164.rename("e"), valid.rename("v")]),
        pl.when("v").then("e").alias("e164"),
        pl.when(~pl.col("v")).then(pl.lit(settings.PHONE_INVALID)).alias("reason"),
    )
    e164, reason = found.get_column("e164"), found.get_column("reason")
    undecided = (valid.is_null() & (texts.is_not_null() | fast.is_not_null())).arg_true()
    if undecided.len():  # what the fast paths did not read, or codes without rules: phonenumbers decides
        many = isinstance(regions, pl.Series)
        where = regions.gather(undecided) if many else pl.repeat(regions, undecided.len(), eager=True)
        values = pl.DataFrame({"t": fast.fill_null(texts).gather(undecided), "r": where})
        distinct = values.unique()
        verdict = [phone_verdict(value, region) for value, region in distinct.iter_rows()]
        distinct = distinct.with_columns(
            pl.Series("e164", [v[0] for v in verdict], dtype=pl.String),
            pl.Series("reason", [v[1] for v in verdict], dtype=pl.String),
        )
        found = values.join(distinct, on=["t", "r"], how="left", maintain_order="left")
        e164 = e164.scatter(undecided, found.get_column("e164"))
        reason = reason.scatter(undecided, found.get_column("reason"))
    return e164, reason
