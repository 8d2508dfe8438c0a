"""The library verdicts the fast paths leave open: email-validator and phonenumbers, once per distinct value.

The verdict for one value is the rule itself (:func:`apollo_sync.clean.rules.validated_email`,
:func:`~apollo_sync.clean.rules.phone_e164`); this module decides in bulk what it can without calling them (the
vectorised paths of :mod:`apollo_sync.clean.expressions`) and calls them once per distinct value for the rest.
Why: email-validator costs ~24 us and phonenumbers ~20-50 us per value, i.e. 20-50 s for a 1M-row export of mostly
unique values, while the regexes take ~0.05 s per column. The property tests check that whatever a fast path
decides, the library decides the same.
"""

from __future__ import annotations

import functools

import phonenumbers
import polars as pl
from phonenumbers.phonemetadata import PhoneMetadata

from apollo_sync.clean import expressions as ex
from apollo_sync.clean.rules import phone_e164, validated_email


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


def phones_e164(texts: pl.Series, region: str) -> pl.Series:
    """E.164, or null (dropped), for each cleaned phone text the North American fast path left open.

    ``+<code> ...`` numbers of known calling codes are decided row by row by the vectorised rule of
    :func:`apollo_sync.clean.expressions.phone_international_e164` (they hardly repeat, so looking them up per
    distinct value cost more than it saved); phonenumbers parses the rest once per distinct value (junk such as
    "123" repeats).
    """
    verdicts = ex.phone_international_e164(texts, country_rules(texts))
    e164 = verdicts.get_column("e164")
    undecided = (~verdicts.get_column("decided") & texts.is_not_null()).arg_true()
    if undecided.len():
        values = texts.gather(undecided)
        distinct = values.unique()
        parsed = pl.Series([phone_e164(value, region) for value in distinct.to_list()], dtype=pl.String)
        e164 = e164.scatter(undecided, values.replace_strict(distinct, parsed, default=None, return_dtype=pl.String))
    return e164


def country_rules(phones: pl.Series) -> dict[str, ex.CountryRule]:
    """phonenumbers' rules for the calling codes that ``+...`` phones among ``phones`` may start with."""
    # The three characters after a "+" (a slice: a regex capture cost ~5x more), then their leading digits.
    heads = phones.filter(phones.str.starts_with("+")).str.slice(1, 3).unique().to_list()
    digits = [h[: next((i for i, ch in enumerate(h) if ch not in "0123456789"), len(h))] for h in heads]
    wanted = {d[:size] for d in digits for size in (1, 2, 3) if len(d) >= size}
    rules: dict[str, ex.CountryRule] = {}
    for code in sorted(wanted):
        rule = country_rule(int(code)) if code[0] != "0" else None
        if rule is not None:
            rules[code] = rule
    return rules


@functools.cache
def country_rule(code: int) -> ex.CountryRule | None:
    """The rule for one calling code, or None when it is unknown or its prefix regex is not portable."""
    if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE or code == 1:
        return None  # +1 has its own fast path (national prefix "1" makes the generic one unsafe)
    region = phonenumbers.region_code_for_country_code(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    if metadata is None or metadata.general_desc is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix is not None:
        try:  # the pattern is written for Python's re; use it only where polars' regex engine reads it too
            pl.select(pl.lit("0").str.contains(f"^(?:{prefix})"))
        except pl.exceptions.ComputeError:
            return None
    desc = metadata.general_desc
    local = set(desc.possible_length_local_only or ())
    lengths = tuple(n for n in (desc.possible_length or ()) if n > 0 and n not in local)
    return ex.CountryRule(national_prefix=prefix, lengths=lengths)
