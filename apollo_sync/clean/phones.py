"""Phones, the plain rules: which region a row's number is read in, and phonenumbers' verdict on one number.

Part of the reference (:mod:`apollo_sync.clean.rules` imports it); the fast engine computes the same over whole
columns (:mod:`apollo_sync.clean.numbering`, :mod:`apollo_sync.clean.checks`).

- **Region**: a number written without ``+`` is read in its row's region: the first ``country`` column (any header
  :data:`~apollo_sync.clean.mapping.ALIASES` maps to ``country``, or a column mapped to it) whose cell names a
  country (:func:`country_region`), else ``--phone-region``.
- **00**: a phone whose text starts with ``00`` is read as ``+`` and the rest (:func:`phone_text`): ``001-212-555-0100``
  is ``+1 212 555 0100`` whatever the region, as in every region whose international prefix is 00.
- **Verdict** (:func:`phone_verdict`): the E.164 form of a number phonenumbers holds valid (``is_valid_number``:
  a length and a range its metadata gives for the number's country); else it is dropped, ``unparseable`` when
  phonenumbers cannot read a number from the text at all, ``invalid`` when it reads one that is not valid.
"""

from __future__ import annotations

import functools
import gettext

import phonenumbers
import pycountry

from apollo_sync import settings
from apollo_sync.errors import InputError

# --- Region ------------------------------------------------------------------------------------------------

COUNTRY_ALIASES = {"uk": "GB"}
"""Country spellings that no table below holds: ``UK``, which ISO 3166-1 reserves for the United Kingdom (GB) and
exports use as often as GB."""
NAME_LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "pl", "sv", "da", "nb_NO", "fi", "cs", "ru", "ja", "zh_CN",
                  "ko", "tr")  # fmt: skip
"""Languages whose country names (pycountry's translations of ISO 3166-1) name a region too."""


def country_key(text: str) -> str:
    """How country spellings are compared: whitespace collapsed (single spaces), case folded."""
    return " ".join(text.split()).casefold()


@functools.cache
def country_names() -> dict[str, str]:
    """Country spelling (as :func:`country_key` gives it) -> phonenumbers region, first source first:

    1. the ISO 3166-1 alpha-2 codes phonenumbers has regions for, and :data:`COUNTRY_ALIASES`;
    2. pycountry (ISO 3166-1 from Debian's iso-codes, kept up to date there): alpha-3 codes, names, official
       names, common names (``DEU``, ``Germany``, ``Federal Republic of Germany``, ``South Korea``);
    3. the same names in each of :data:`NAME_LANGUAGES`, in that order (``Deutschland``, ``Allemagne``,
       ``Российская Федерация``).
    """
    regions = set(phonenumbers.SUPPORTED_REGIONS)
    names: dict[str, str] = {}
    for region in sorted(regions):
        names.setdefault(country_key(region), region)
    for alias, region in COUNTRY_ALIASES.items():
        names.setdefault(country_key(alias), region)
    countries = [c for c in pycountry.countries if c.alpha_2 in regions]
    spellings = [(c.alpha_2, [getattr(c, key, None) for key in ("name", "official_name", "common_name")])
                 for c in countries]  # fmt: skip
    for country in countries:
        names.setdefault(country_key(country.alpha_3), country.alpha_2)
    for translate in [str, *[gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[lang]).gettext
                             for lang in NAME_LANGUAGES]]:  # fmt: skip
        for region, english in spellings:
            for name in english:
                if name:
                    names.setdefault(country_key(translate(name)), region)
    return names


def country_region(value: str | None) -> str | None:
    """The phonenumbers region a country cell names (``FR``, ``fra``, ``France``, ``Frankreich`` -> ``FR``), or None.

    The cell's text, trimmed, whitespace collapsed and case folded, must be one of :func:`country_names`' spellings.
    Nothing else is guessed: digits are never a country here (calling code 44 and ISO numeric 044, the Bahamas,
    would disagree), nor is a misspelling.
    """
    if value is None:
        return None
    return country_names().get(country_key(value))


def check_region(phone_region: str) -> str:
    """The default phone region, upper-cased; InputError when phonenumbers has no calling code for it."""
    region = phone_region.upper()
    if phonenumbers.country_code_for_region(region) == 0:
        raise InputError(f"unknown phone region {phone_region!r}; use a two-letter region code such as US or GB")
    return region


# --- Verdict -----------------------------------------------------------------------------------------------


def phone_text(text: str) -> str:
    """A cleaned phone's text as phonenumbers is given it: a leading ``00`` (ASCII) becomes ``+``."""
    return "+" + text[2:] if text.startswith("00") else text


def phone_verdict(text: str, region: str) -> tuple[str | None, str | None]:
    """(E.164, None) for a cleaned phone text phonenumbers holds valid, read in ``region`` unless it starts with
    ``+`` or ``00``; else (None, the drop reason): :data:`~apollo_sync.settings.PHONE_UNPARSEABLE` when
    phonenumbers cannot parse it, :data:`~apollo_sync.settings.PHONE_INVALID` when the number it parses is not
    valid. Extensions are dropped; any Unicode digits read as ASCII ones."""
    try:
        number = phonenumbers.parse(phone_text(text), region)
    except phonenumbers.NumberParseException:
        return None, settings.PHONE_UNPARSEABLE
    if not phonenumbers.is_valid_number(number):
        return None, settings.PHONE_INVALID
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def phone_e164(text: str, region: str) -> str | None:
    """The E.164 form of :func:`phone_verdict`, or None when the phone is dropped."""
    return phone_verdict(text, region)[0]
