"""Header auto-mapping and the TOML mapping file."""

from __future__ import annotations

from pathlib import Path

import pytest

from apollo_sync.errors import InputError
from apollo_sync.clean.mapping import Mapping, auto_target, header_key, load_mapping, plan_columns


@pytest.mark.parametrize(
    ("header", "target"),
    [
        ("First Name", "first_name"),
        ("first_name", "first_name"),
        ("FIRST-NAME", "first_name"),
        ("Given Name", "first_name"),
        ("Surname", "last_name"),
        ("Family Name", "last_name"),
        ("E-mail", "email"),
        ("Email Address", "email"),
        ("Work Email", "email"),
        ("business.email", "email"),
        ("Company", "organization_name"),
        ("Company Name", "organization_name"),
        ("Organisation", "organization_name"),
        ("Account Name", "organization_name"),
        ("Employer", "organization_name"),
        ("Job Title", "title"),
        ("Position", "title"),
        ("Company Domain", "website_url"),
        ("Website", "website_url"),
        ("LinkedIn URL", "linkedin_url"),
        ("Phone", "direct_phone"),
        ("Work Phone", "direct_phone"),
        ("Cell", "mobile_phone"),
        ("Mobile Phone", "mobile_phone"),
        ("Office Phone", "corporate_phone"),
        ("Home Phone", "home_phone"),
        ("Other Phone", "other_phone"),
        ("Location", "present_raw_address"),
        ("Tags", "label_names"),
        ("Lists", "label_names"),
        ("Full Name", "name"),
        ("owner_id", "owner_id"),
        ("Contact Stage ID", "contact_stage_id"),
        ("City", "city"),
        ("Notes", None),
        ("Record ID", None),
    ],
)
def test_auto_target(header: str, target: str | None) -> None:
    assert auto_target(header) == target


def test_header_key_ignores_case_spaces_and_punctuation() -> None:
    assert header_key(" E-mail_Address. ") == "emailaddress"


def test_plan_lists_unmapped_and_keeps_header_order() -> None:
    plan = plan_columns(["source_row", "Email", "Notes", "Work Email", "Company"])
    assert plan.sources["email"] == ("Email", "Work Email")
    assert plan.unmapped == ["Notes"]
    assert plan.column_map == {"Email": "email", "Work Email": "email", "Company": "organization_name"}


def test_full_name_only_without_first_and_last() -> None:
    assert "name" in plan_columns(["Name", "Company"]).sources
    plan = plan_columns(["Name", "First Name", "Last Name"])
    assert "name" not in plan.sources and plan.unmapped == ["Name"]


def test_city_state_country_only_without_address() -> None:
    assert plan_columns(["City", "Country"]).sources == {"city": ("City",), "country": ("Country",)}
    plan = plan_columns(["Address", "City"])
    assert plan.sources == {"present_raw_address": ("Address",)} and plan.unmapped == ["City"]


def test_explicit_mapping_overrides_auto_mapping() -> None:
    mapping = Mapping(columns={"Work Email": "email", "Acct": "organization_name", "Score": "custom.abc123"})
    plan = plan_columns(["Email", "Work Email", "Acct", "Company", "Score"], mapping)
    assert plan.sources["email"] == ("Work Email",)
    assert plan.sources["organization_name"] == ("Acct",)
    assert plan.sources["custom.abc123"] == ("Score",)
    assert plan.unmapped == ["Email", "Company"]


def test_ignore_list_wins_over_auto_mapping() -> None:
    plan = plan_columns(["Email", "Phone"], Mapping(ignore=("Phone",)))
    assert plan.unmapped == ["Phone"] and "direct_phone" not in plan.sources


def test_mapping_of_a_missing_column_is_an_input_error() -> None:
    with pytest.raises(InputError, match="Wrk Email"):
        plan_columns(["Email"], Mapping(columns={"Wrk Email": "email"}))


def test_load_mapping_reads_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "map.toml"
    path.write_text(
        """
ignore = ["Internal ID"]

[columns]
"Work Email" = "email"
"Lead Score" = "custom.6521f0c2a1b2"

[constants]
contact_stage_id = "stage-1"
label_names = ["Q4 import"]
""",
        encoding="utf-8",
    )
    mapping = load_mapping(path)
    assert mapping == Mapping(
        columns={"Work Email": "email", "Lead Score": "custom.6521f0c2a1b2"},
        constants={"contact_stage_id": "stage-1", "label_names": ["Q4 import"]},
        ignore=("Internal ID",),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[columns]\n"Acct" = "company"\n', "unknown target field 'company'"),
        ('[columns]\n"Score" = "custom.bad id"\n', "unknown target field"),
        ('[constants]\nnot_a_field = "x"\n', "unknown target field"),
        ("[constants]\nlabel_names = \"Q4\"\n", "label_names must be a list"),
        ("[constants]\nowner_id = 5\n", "owner_id must be a string"),
        ('[constants]\nemail = "a@b.co"\n', "cannot set email"),
        ("[colums]\n", "unknown keys"),
        ("[columns\n", "not valid TOML"),
        ('ignore = "Notes"\n', "ignore must be a list"),
    ],
)
def test_bad_mapping_files_are_input_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "map.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_mapping(path)


def test_missing_mapping_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_mapping(tmp_path / "nope.toml")
