"""phonenumbers' metadata as polars expressions: how the common shapes of phones are read, and which are valid.

:func:`apollo_sync.clean.phones.phone_verdict` is the rule: parse, then ``is_valid_number``. Calling phonenumbers
costs ~20-50 us a value, 20-50 s for a 1M-row export of mostly unique phones, so the common shapes are decided
here over whole columns from the same metadata phonenumbers reads, in three steps:

1. **Read** each phone as (calling code, national significant number): ``+<code> <digits>``
   (:func:`international_numbers`), digits written nationally in the row's region (:func:`national_numbers`), or
   the North American shapes (:func:`apollo_sync.clean.expressions.phone_nanp_e164`). Where phonenumbers' parse
   could take another turn (an international prefix, a national prefix after ``+<code>``, a region whose prefix
   rules are regexes with groups), nothing is read: the value goes to phonenumbers.
2. **Validate** (:func:`valid_numbers`): phonenumbers' ``is_valid_number`` over its metadata: the region of the
   code that claims the number (by leading digits, else by being valid there), then the number's length and
   pattern for that region's general description and one of its number types.
3. What neither step decides goes to phonenumbers once per distinct value (:mod:`apollo_sync.clean.checks`).

Every metadata pattern is used only where polars' regex engine compiles it (they are written for Python's ``re``);
a code or region with one that does not compile is left to phonenumbers. tests/test_clean_props.py compares every
decision with phonenumbers over all calling codes and regions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers
import polars as pl
from phonenumbers.phonemetadata import PhoneMetadata

from apollo_sync.clean.frames import lazy_select, lazy_with_columns

TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan", "voicemail",
         "fixed_line", "mobile")  # fmt: skip
"""The number types phonenumbers' ``_number_type_helper`` tries: a number valid for a region matches one of them."""
MIN_NSN, MAX_NSN = 2, 17
"""National significant numbers phonenumbers' parse accepts (shorter or longer ones raise)."""
INTERNATIONAL_SHAPE = r"^\+[0-9]+(?:[ .\-][0-9]+)*$"
"""``+`` and ASCII digit groups separated by single spaces, dots or dashes (no ``(0)``, no extension)."""
NATIONAL_SHAPE = r"^\(?[0-9]+\)?(?:[ .\-]?\(?[0-9]+\)?)*$"
"""ASCII digit groups, optionally in parentheses, separated by at most one space, dot or dash: phonenumbers drops
that punctuation and reads the digits."""
_PUNCTUATION = ["+", " ", ".", "-", "(", ")"]


def portable(pattern: str) -> bool:
    """True when polars' regex engine compiles ``pattern`` (metadata patterns are written for Python's ``re``)."""
    try:
        pl.select(pl.lit("0").str.contains(pattern))
    except pl.exceptions.ComputeError:
        return False
    return True


@dataclass(frozen=True)
class Desc:
    """Numbers of one description: their lengths (empty: any) and pattern (matched whole)."""

    lengths: tuple[int, ...]
    pattern: str

    def matches(self, nsn: pl.Expr) -> pl.Expr:
        found = nsn.str.contains(f"^(?:{self.pattern})$")
        return found & nsn.str.len_bytes().is_in(self.lengths) if self.lengths else found


@dataclass(frozen=True)
class RegionRule:
    """What makes a national significant number valid in one region of a calling code."""

    region: str
    leading_digits: str | None
    """The digits that put a number in this region (of a code several regions share), else None."""
    general: Desc
    types: tuple[Desc, ...]
    """The region's number types, those of equal lengths as one pattern."""

    def valid(self, nsn: pl.Expr) -> pl.Expr:
        """True where ``nsn`` is valid in this region (``_number_type_helper`` is not UNKNOWN)."""
        if not self.types:
            return pl.lit(False)
        return self.general.matches(nsn) & pl.any_horizontal([t.matches(nsn) for t in self.types])


def ascii_digits(pattern: str) -> str:
    """``pattern`` with ``\\d`` as ``[0-9]``: the same on the ASCII digits it is matched against, and polars' Unicode
    ``\\d`` made the automata of the long North American patterns ~10x slower to build."""
    return pattern.replace("\\d", "[0-9]")


def desc(metadata_desc) -> Desc | None:
    """A phonenumbers PhoneNumberDesc as a :class:`Desc`, None when no number has it."""
    if metadata_desc is None or not metadata_desc.national_number_pattern:
        return None
    lengths = tuple(metadata_desc.possible_length or ())
    return None if lengths == (-1,) else Desc(lengths, ascii_digits(metadata_desc.national_number_pattern))


def region_rule(metadata: PhoneMetadata, region: str) -> RegionRule | None:
    """The rule of one region's metadata, None when a pattern is not portable."""
    general = desc(metadata.general_desc)
    by_lengths: dict[tuple[int, ...], list[str]] = {}
    for name in TYPES:
        found = desc(getattr(metadata, name))
        if found is not None:
            by_lengths.setdefault(found.lengths, []).append(f"(?:{found.pattern})")
    types = tuple(Desc(lengths, "|".join(patterns)) for lengths, patterns in by_lengths.items())
    if general is None:
        types = ()
        general = Desc((), "")
    leading = None if metadata.leading_digits is None else ascii_digits(metadata.leading_digits)
    if not all(portable(p) for p in (general.pattern, *[t.pattern for t in types], leading or "") if p):
        return None
    return RegionRule(region, leading, general, types)


@functools.cache
def code_rules(code: int) -> tuple[RegionRule, ...] | None:
    """The rules of the regions of calling code ``code``, in phonenumbers' order; None when unknown or not portable.

    For a code of one region, ``region_code_for_number`` names that region without looking at the number; of
    several, the first whose leading digits the number starts with, or (without leading digits) in which it is
    valid. Regions without metadata are skipped, as phonenumbers skips them.
    """
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code)
    if not regions:
        return None
    rules = []
    for region in regions:
        if len(regions) == 1:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
        else:
            metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:
            if len(regions) == 1:
                return None
            continue
        rule = region_rule(metadata, region)
        if rule is None:
            return None
        rules.append(rule if len(regions) > 1 else RegionRule(region, None, rule.general, rule.types))
    return tuple(rules)


def valid_numbers(numbers: pl.DataFrame) -> pl.Series:
    """``is_valid_number`` of each row of ``numbers`` (String columns ``code``, ``nsn``): True, False, or null
    where the code has no portable rule (phonenumbers decides) or the row is null."""
    verdict = pl.repeat(None, numbers.height, dtype=pl.Boolean, eager=True)
    indexed = numbers.select("code", "nsn").with_row_index("at").drop_nulls()
    for (code,), rows in indexed.partition_by("code", as_dict=True, include_key=False).items():
        rules = code_rules(int(code)) if code.isdigit() else None
        if rules is not None:
            verdict = verdict.scatter(rows.get_column("at"), code_verdict(rules, rows.get_column("nsn")))
    return verdict


def code_verdict(rules: tuple[RegionRule, ...], nsn: pl.Series) -> pl.Series:
    """``is_valid_number`` of the national significant numbers ``nsn`` of one calling code (with ``rules``).

    The first region's patterns run on every number (it claims nearly all); the others' only on what it left,
    and those of regions with leading digits only on the numbers that start with some region's leading digits.
    """
    n = pl.col("nsn")
    first = rules[0]
    if len(rules) == 1:
        return lazy_select(nsn.to_frame("nsn"), first.valid(n)).to_series()
    if first.leading_digits is None:  # it claims the numbers valid in it
        verdict = lazy_select(nsn.to_frame("nsn"), first.valid(n)).to_series()
        rest = (~verdict).arg_true()
    else:
        leading = n.str.contains(f"^(?:{first.leading_digits})")
        found = lazy_select(nsn.to_frame("nsn"), leading, first.valid(n).alias("v"))
        verdict, rest = found.get_column("v"), (~found.get_column("nsn")).arg_true()
    if rest.len() == 0:
        return verdict
    others = rules[1:]
    left = nsn.gather(rest).to_frame("nsn")
    marked = [f"(?:{r.leading_digits})" for r in others if r.leading_digits is not None]
    plain = [r for r in others if r.leading_digits is None]
    # A number with no region's leading digits can be claimed only by a region without them: by being valid there.
    any_plain = pl.any_horizontal([r.valid(n) for r in plain]) if plain else pl.lit(False)
    if not marked:
        return verdict.scatter(rest, lazy_select(left, any_plain).to_series())
    found = lazy_select(left, n.str.contains("^(?:" + "|".join(marked) + ")").alias("m"), any_plain.alias("p"))
    some = found.get_column("m").arg_true()
    out = found.get_column("p")
    if some.len():
        out = out.scatter(some, first_claims(others, left[some].get_column("nsn")))
    return verdict.scatter(rest, out)


def first_claims(rules: tuple[RegionRule, ...], nsn: pl.Series) -> pl.Series:
    """Each number's validity in the first of ``rules`` that claims it (False when none does): every region's
    claim in one select, then each claiming region's patterns on its own numbers only."""
    n = pl.col("nsn")
    claims = [
        (r.valid(n) if r.leading_digits is None else n.str.contains(f"^(?:{r.leading_digits})")).alias(str(i))
        for i, r in enumerate(rules)
    ]
    first = pl.coalesce([pl.when(pl.col(str(i))).then(pl.lit(i)) for i in range(len(rules))])
    claimer = lazy_select(nsn.to_frame("nsn"), *claims).select(first.alias("by"), pl.lit(nsn).alias("nsn"))
    by = pl.col("by")
    present = claimer.get_column("by").drop_nulls().unique().to_list()
    verdicts = [pl.when(by == i).then(rules[i].valid(n)) for i in present]
    out = lazy_select(claimer, pl.coalesce([*verdicts, pl.lit(False)])).to_series()
    return out


# --- Reading: +<code> digits ---------------------------------------------------------------------------------


@functools.cache
def strippable_prefix(code: int) -> str | None:
    """The national prefix pattern phonenumbers may strip after ``+<code>`` (its main region's), "" for none;
    None when the code is unknown or the pattern is not portable. +1 is read here too: the North American fast
    path takes its common shapes first, and the rest (a digit missing or doubled, other groupings) would otherwise
    go to phonenumbers one by one (~1,100 distinct values, ~35 ms, a 250k-row batch of the benchmark's realistic
    export; ~240 with this)."""
    if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        return None
    region = phonenumbers.region_code_for_country_code(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing or ""
    return prefix if not prefix or portable(f"^(?:{prefix})") else None


def known_codes(texts: pl.Series) -> dict[str, str]:
    """Calling code -> :func:`strippable_prefix` for the codes that ``+...`` texts among ``texts`` may start with."""
    # The three characters after a "+" (a slice: a regex capture cost ~5x more), then their leading digits.
    heads = texts.filter(texts.str.starts_with("+")).str.slice(1, 3).unique().to_list()
    digits = [h[: next((i for i, ch in enumerate(h) if ch not in "0123456789"), len(h))] for h in heads]
    wanted = {d[:size] for d in digits for size in (1, 2, 3) if len(d) >= size and d[0] != "0"}
    found = {code: strippable_prefix(int(code)) for code in sorted(wanted)}
    return {code: prefix for code, prefix in found.items() if prefix is not None}


def leading_code(digits: pl.Expr, codes: list[str]) -> pl.Expr:
    """The calling code at the start of ``digits`` among ``codes`` (calling codes are prefix-free), else null."""
    out = pl.when(False).then(pl.lit(None, dtype=pl.String))
    for size in (1, 2, 3):
        head = digits.str.slice(0, size)
        out = out.when(head.is_in(codes)).then(head)
    return out


def international_numbers(texts: pl.Series) -> pl.DataFrame:
    """``code`` and ``nsn`` of ``+<code> ...`` texts whose reading is certain, null elsewhere.

    Certain: :data:`INTERNATIONAL_SHAPE`, a known code, and a national number that neither starts
    with 0 nor with the code's national prefix (phonenumbers may strip it), of a length parse accepts. Each step
    is its own ``with_columns`` of one lazy query, so the digits and code are computed once.
    """
    codes = known_codes(texts)
    code, national = pl.col("code"), pl.col("national")
    prefix_match = pl.lit(False)
    with_prefix = {c: p for c, p in codes.items() if p}
    if with_prefix:
        chain = pl.when(False).then(pl.lit(False))
        for c, pattern in with_prefix.items():
            chain = chain.when(code == c).then(national.str.contains(f"^(?:{pattern})"))
        prefix_match = chain.otherwise(pl.lit(False))
    length = national.str.len_bytes()
    certain = (
        pl.col("p").str.contains(INTERNATIONAL_SHAPE)
        & code.is_not_null()
        & ~national.str.starts_with("0")
        & ~prefix_match
        & length.is_between(MIN_NSN, MAX_NSN)
    ).fill_null(False)
    return (
        texts.rename("p").to_frame().lazy()
        .with_columns(pl.col("p").str.replace_many(_PUNCTUATION, [""] * len(_PUNCTUATION)).alias("digits"))
        .with_columns(leading_code(pl.col("digits"), list(codes)).alias("code"))
        .with_columns(pl.col("digits").str.slice(code.str.len_bytes()).alias("national"))
        .select(pl.when(certain).then(code).alias("code"), pl.when(certain).then(national).alias("nsn"))
        .collect()
    )  # fmt: skip


# --- Reading: digits written nationally ----------------------------------------------------------------------

_LITERALS = re.compile(r"[0-9]+(?:\|[0-9]+)*")


@dataclass(frozen=True)
class NationalRule:
    """How phonenumbers reads digits written without ``+`` in one region (of the simple kind)."""

    code: str
    international_prefix: str
    prefixes: tuple[str, ...]
    """National prefixes to strip, tried in order (``0``; GB: ``0``, ``180020``); empty for none."""
    general: Desc
    lengths: tuple[int, ...]
    local_lengths: tuple[int, ...]


@functools.cache
def national_rule(region: str) -> NationalRule | None:
    """The region's rule, None when its reading is not of the simple kind: its national prefix for parsing is not
    a list of literal digits (carrier codes, transform rules) or a pattern is not portable."""
    metadata = PhoneMetadata.metadata_for_region(region, None)
    if metadata is None or metadata.general_desc is None or not metadata.general_desc.national_number_pattern:
        return None
    prefix = metadata.national_prefix_for_parsing or ""
    if (prefix and not _LITERALS.fullmatch(prefix)) or metadata.national_prefix_transform_rule:
        return None
    idd = ascii_digits(metadata.international_prefix or "")
    general = Desc((), ascii_digits(metadata.general_desc.national_number_pattern))
    lengths = tuple(metadata.general_desc.possible_length or ())
    if not idd or not portable(idd) or not portable(general.pattern) or not lengths or lengths[0] == -1:
        return None
    local = tuple(metadata.general_desc.possible_length_local_only or ())
    return NationalRule(str(metadata.country_code), idd, tuple(prefix.split("|")) if prefix else (), general,
                        lengths, local)  # fmt: skip


def national_numbers(texts: pl.Series, region: str) -> pl.DataFrame:
    """``code`` and ``nsn`` of texts (not starting with ``+``) read in ``region`` where the reading is certain,
    null elsewhere (and everywhere for a region without a :func:`national_rule`).

    As phonenumbers' parse: the digits (3 to 17 of them, in :data:`NATIONAL_SHAPE`) must not start with the
    region's international prefix (not certain: phonenumbers may read a country code after it). Digits that start
    with the region's calling code lose it when, its national prefix stripped (:func:`strip_prefix`), the rest
    matches the general pattern and the whole does not, or the whole is too long. Then the national prefix is
    stripped with the length check.
    """
    rule = national_rule(region)
    if rule is None:
        return pl.DataFrame(schema=dict.fromkeys(("code", "nsn"), pl.String)).clear(texts.len())
    t, d = pl.col("t"), pl.col("d")
    ok = t.str.contains(NATIONAL_SHAPE) & d.str.len_bytes().is_between(3, MAX_NSN)
    read = (
        texts.rename("t").to_frame().lazy()
        .with_columns(t.str.replace_many(_PUNCTUATION, [""] * len(_PUNCTUATION)).alias("d"))
        .select(d, (ok & ~d.str.contains(f"^(?:{rule.international_prefix})")).fill_null(False).alias("ok"))
        .collect()
    )  # fmt: skip
    digits, ok = read.get_column("d"), read.get_column("ok")
    base = digits
    coded = (ok & digits.str.starts_with(rule.code)).arg_true()
    if coded.len():
        if phonenumbers.region_code_for_country_code(int(rule.code)) != region:  # read with another region's rules
            ok = ok.scatter(coded, False)
        else:
            whole = digits.gather(coded)
            rest = strip_prefix(whole.str.slice(len(rule.code)), rule, check_length=False)
            n = pl.col("whole").str.len_bytes()
            too_long = ~n.is_in(rule.local_lengths) & (n > max(rule.lengths))
            take = (~rule.general.matches(pl.col("whole")) & rule.general.matches(pl.col("rest"))) | too_long
            frame = pl.DataFrame([whole.rename("whole"), rest.rename("rest")])
            base = base.scatter(coded, lazy_select(frame, pl.when(take).then("rest").otherwise("whole")).to_series())
    nsn = strip_prefix(base, rule, check_length=True)
    certain = ok & (base.str.len_bytes() >= MIN_NSN) & (nsn.str.len_bytes() >= MIN_NSN)
    return lazy_select(
        pl.DataFrame([nsn.rename("nsn"), certain.rename("c")]),
        pl.when("c").then(pl.lit(rule.code)).alias("code"), pl.when("c").then("nsn").alias("nsn"),
    )


def strip_prefix(numbers: pl.Series, rule: NationalRule, *, check_length: bool) -> pl.Series:
    """``numbers`` without the first of the rule's national prefixes they start with, as phonenumbers strips it: not
    when the number matches the general pattern and the rest does not; with ``check_length`` (parse's own step)
    only when the rest's length is possible or too long (not too short, local only or impossible)."""
    if not rule.prefixes:
        return numbers
    d, sub = pl.col("d"), pl.col("sub")
    size = pl.when(False).then(pl.lit(0))
    for prefix in rule.prefixes:
        size = size.when(d.str.starts_with(prefix)).then(pl.lit(len(prefix)))
    sizes = lazy_select(numbers.rename("d").to_frame(), size.otherwise(pl.lit(0)).alias("size")).to_series()
    rows = (sizes > 0).arg_true()  # the general pattern runs only on the numbers with a prefix
    if rows.len() == 0:
        return numbers
    keep = rule.general.matches(d) & ~rule.general.matches(sub)
    if check_length:
        n = sub.str.len_bytes()
        keep = keep | ~(~n.is_in(rule.local_lengths) & (n.is_in(rule.lengths) | (n > max(rule.lengths))))
    some = pl.DataFrame([numbers.gather(rows).rename("d"), sizes.gather(rows).rename("size")])
    some = lazy_with_columns(some, d.str.slice(pl.col("size")).alias("sub"))
    return numbers.scatter(rows, lazy_select(some, pl.when(keep).then(d).otherwise(sub)).to_series())
