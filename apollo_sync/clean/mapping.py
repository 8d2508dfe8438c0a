"""Which source column feeds which Apollo contact field: header auto-mapping and the mapping file.

Auto-mapping compares a header with known aliases after lower-casing it and removing spaces,
``_``, ``-`` and ``.`` (so ``First Name``, ``first_name`` and ``FIRST-NAME`` all read ``firstname``).
See :data:`ALIASES` for the list. A ``Name`` / ``Full Name`` column is split into first and last
name when neither of those is mapped; ``City``, ``State`` and ``Country`` are joined into
``present_raw_address`` when no address column is mapped. A ``Country`` column (``Country Code``, ``Nation``...)
also gives each row its phone region (:mod:`apollo_sync.clean.phones`), address column or not.

The mapping file (``--mapping FILE``) is TOML::

    # Source column -> Apollo field. Overrides auto-mapping: a field named here takes its value
    # only from the columns named here. "custom.<field id>" goes into typed_custom_fields.
    [columns]
    "Work Email" = "email"
    "Acct" = "organization_name"
    "Lead Score" = "custom.6521f0c2a1b2c3d4e5f60718"

    # A value for every row that has none of its own (a default). label_names takes a list and
    # is appended to each row's labels.
    [constants]
    contact_stage_id = "6095a710bd01d100a506d4ae"
    label_names = ["Q4 import"]

    # Columns never sent, not even by auto-mapping (they are listed as unmapped).
    ignore = ["Internal ID", "Notes"]

Target fields are those of :data:`apollo_sync.settings.CONTACT_FIELDS` (without
``typed_custom_fields``, which is built from ``custom.*``) and ``name`` (a full name to split).
Anything else raises :class:`~apollo_sync.errors.InputError`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from apollo_sync import settings
from apollo_sync.errors import InputError

CUSTOM_PREFIX = "custom."
"""Target prefix for Apollo custom fields: ``custom.<field id>`` goes to ``typed_custom_fields``."""
FULL_NAME = "name"
"""Pseudo-field: a full name, split into ``first_name`` and ``last_name`` when those are absent."""
ADDRESS_PARTS = ("city", "state", "country")
"""Pseudo-fields joined (in this order, with ", ") into ``present_raw_address`` when no address column exists."""
COUNTRY = "country"
"""The pseudo-field whose columns also give a row its phone region."""

_CUSTOM_ID = re.compile(r"[A-Za-z0-9_\-]+\Z")

MAPPABLE_FIELDS = tuple(f for f in settings.CONTACT_FIELDS if f != "typed_custom_fields")
"""Apollo fields a column (or constant) can feed directly."""

ALIASES: dict[str, tuple[str, ...]] = {
    "first_name": ("first name", "firstname", "given name", "forename", "first"),
    "last_name": ("last name", "lastname", "surname", "family name", "last"),
    "email": (
        "email", "e-mail", "email address", "e-mail address", "work email", "business email",
        "email 1", "primary email", "mail",
    ),
    "organization_name": (
        "company", "company name", "organization", "organisation", "organization name",
        "organisation name", "account name", "employer",
    ),
    "title": ("title", "job title", "position", "job position", "role"),
    "website_url": ("website", "company website", "domain", "company domain", "url", "website url", "web site"),
    "linkedin_url": ("linkedin", "linkedin url", "linkedin profile", "person linkedin url", "linkedin profile url"),
    "direct_phone": ("phone", "phone number", "direct phone", "work phone", "direct dial", "telephone"),
    "mobile_phone": ("mobile", "mobile phone", "cell", "cell phone", "mobile number"),
    "corporate_phone": ("company phone", "corporate phone", "office phone", "main phone", "hq phone"),
    "home_phone": ("home phone",),
    "other_phone": ("other phone",),
    "present_raw_address": ("address", "location", "present raw address", "full address"),
    "label_names": ("labels", "lists", "tags", "label names", "label", "list", "tag"),
    "owner_id": ("owner id",),
    "account_id": ("account id",),
    "contact_stage_id": ("contact stage id",),
    FULL_NAME: ("name", "full name", "contact name"),
    "city": ("city", "town"),
    "state": ("state", "province", "state province", "state/province"),
    "country": (
        "country", "country name", "country code", "country/region", "nation", "country iso", "iso country",
        "iso country code",
    ),
}
"""Apollo field (or pseudo-field) -> header spellings that auto-map to it."""


def header_key(header: str) -> str:
    """The comparison key of a header: lower-cased, without spaces, ``_``, ``-`` or ``.``."""
    return re.sub(r"[\s_\-.]+", "", header.lower())


_ALIAS_INDEX: dict[str, str] = {}
for _target, _names in ALIASES.items():
    for _name in (_target, *_names):
        _ALIAS_INDEX.setdefault(header_key(_name), _target)


def auto_target(header: str) -> str | None:
    """The Apollo field (or pseudo-field) a header auto-maps to, or None."""
    return _ALIAS_INDEX.get(header_key(header))


@dataclass(frozen=True)
class Mapping:
    """An explicit mapping: source column -> target, constants per field, columns to ignore."""

    columns: dict[str, str] = field(default_factory=dict)
    constants: dict[str, object] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for source, target in self.columns.items():
            check_target(target, f"[columns] {source!r}")
        for target, value in self.constants.items():
            check_target(target, "[constants]")
            if target == "email":
                raise InputError("[constants] cannot set email: every row would be the same contact; map an email column")
            if target == FULL_NAME or target in ADDRESS_PARTS:
                raise InputError(f"[constants] cannot set {target!r}; set first_name/last_name or present_raw_address")
            if target == "label_names":
                if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise InputError("[constants] label_names must be a list of strings, e.g. [\"Q4 import\"]")
            elif not isinstance(value, str):
                raise InputError(f"[constants] {target} must be a string, got {type(value).__name__}")


def check_target(target: str, where: str) -> None:
    """Raise InputError unless ``target`` is an Apollo field, ``custom.<id>`` or a pseudo-field."""
    if target in MAPPABLE_FIELDS or target == FULL_NAME or target in ADDRESS_PARTS:
        return
    if target.startswith(CUSTOM_PREFIX) and _CUSTOM_ID.match(target[len(CUSTOM_PREFIX):]):
        return
    raise InputError(
        f"{where}: unknown target field {target!r}; use one of {', '.join(MAPPABLE_FIELDS)}, "
        f"{FULL_NAME}, city, state, country or custom.<field id>"
    )


def load_mapping(path: str | Path) -> Mapping:
    """Read a mapping file (TOML, format in the module docstring). Raises InputError when it is unusable."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"mapping file {str(p)!r} not found; check the --mapping path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"mapping file {str(p)!r} cannot be read ({exc}); check its permissions and encoding") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"mapping file {str(p)!r} is not valid TOML ({exc}); fix its syntax") from None
    unknown = set(data) - {"columns", "constants", "ignore"}
    if unknown:
        raise InputError(
            f"mapping file {str(p)!r} has unknown keys {sorted(unknown)}; use [columns], [constants] and ignore"
        )
    columns = data.get("columns", {})
    constants = data.get("constants", {})
    ignore = data.get("ignore", [])
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise InputError(f"mapping file {str(p)!r}: [columns] must map column names to field names (strings)")
    if not isinstance(constants, dict):
        raise InputError(f"mapping file {str(p)!r}: [constants] must be a table of field = value")
    if not isinstance(ignore, list) or not all(isinstance(v, str) for v in ignore):
        raise InputError(f"mapping file {str(p)!r}: ignore must be a list of column names")
    return Mapping(columns=dict(columns), constants=dict(constants), ignore=tuple(ignore))


@dataclass(frozen=True)
class ColumnPlan:
    """Resolved mapping for one frame: which source columns feed which target, in header order."""

    sources: dict[str, tuple[str, ...]]
    """target (Apollo field, pseudo-field or custom.<id>) -> source columns, first non-empty wins."""
    column_map: dict[str, str]
    """source column -> target it feeds (for the summary)."""
    unmapped: list[str]
    """source columns that feed nothing (never sent)."""


def plan_columns(columns: list[str], mapping: Mapping | None = None) -> ColumnPlan:
    """Decide which of ``columns`` feed which target: explicit mapping first, then auto-mapping.

    A target named in the mapping's [columns] takes values only from the columns named there. A
    mapped column that the source lacks raises InputError (a typo would otherwise pass unseen).
    """
    mapping = mapping or Mapping()
    present = set(columns)
    missing = [c for c in mapping.columns if c not in present]
    if missing:
        raise InputError(f"mapping names columns {missing} that the source does not have (it has {columns})")
    explicit_targets = set(mapping.columns.values())
    ignored = set(mapping.ignore)
    column_map: dict[str, str] = {}
    for col in columns:
        if col == settings.SOURCE_ROW or col in ignored:
            continue
        if col in mapping.columns:
            column_map[col] = mapping.columns[col]
            continue
        target = auto_target(col)
        if target is not None and target not in explicit_targets:
            column_map[col] = target
    sources: dict[str, tuple[str, ...]] = {}
    for col, target in column_map.items():
        sources[target] = sources.get(target, ()) + (col,)
    # A full name only helps when first and last are absent; address parts only without an address.
    if FULL_NAME in sources and ("first_name" in sources or "last_name" in sources):
        for col in sources.pop(FULL_NAME):
            del column_map[col]
    if "present_raw_address" in sources:  # the country stays: it is also each row's phone region
        for part in ("city", "state"):
            for col in sources.pop(part, ()):
                del column_map[col]
    unmapped = [c for c in columns if c != settings.SOURCE_ROW and c not in column_map]
    return ColumnPlan(sources=sources, column_map=column_map, unmapped=unmapped)


def require_identity(sources: dict[str, tuple[str, ...]], mapping: Mapping, names: list[str]) -> None:
    """Raise InputError unless some row could have an identity: an email column, or first and last name (or a full
    name) and organization, from columns or constants."""
    have = set(sources) | set(mapping.constants)
    by_name = ({"first_name", "last_name"} <= have or FULL_NAME in have) and "organization_name" in have
    if "email" not in have and not by_name:
        cols = [n for n in names if n != settings.SOURCE_ROW]
        raise InputError(
            f"no email or first/last name + company columns found in {cols}; map them with --mapping FILE"
        )
