"""Issue 14's refusals and protections, tried as a user (the CLI in a subprocess) or a prober would: no secret in a
setting Prefect stores, a key with a newline, mistakes refused in one line before anything starts, private files."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest
from cli_helpers import assert_one_clear_line, cli
from pydantic import ValidationError

from apollo_sync.params import sync_params
from apollo_sync.redact import redact, register_secret
from apollo_sync.settings import ENV_API_KEY
from apollo_sync.sync import open_run, run_sync

SECRET = "s3cret-Pw-1234"
CSV = "email,first name,last name,company\na@x.io,A,One,X\nb@x.io,B,Two,Y\n"


def source(tmp_path: Path) -> Path:
    path = tmp_path / "contacts.csv"
    path.write_text(CSV)
    return path


@pytest.mark.parametrize("settings, where", [
    (dict(source=f"postgresql://apollo:{SECRET}@db:5432/crm", query="people"), "PGPASSWORD"),
    (dict(source="x.csv", state_url=f"postgresql://apollo:{SECRET}@db/apollo_sync"), "PGPASSWORD"),
    (dict(source=f"https://bucket.s3.amazonaws.com/c.csv?X-Amz-Credential=a&X-Amz-Signature={SECRET}"), "AWS_"),
    (dict(source=f"https://user:{SECRET}@files.example.com/c.csv"), "s3://"),
    (dict(source="x.csv", base_url=f"https://api.example.com/v1?api_key={SECRET}"), ENV_API_KEY),
], ids=["sql-source", "state-url", "signed-s3", "https-password", "base-url-key"])  # fmt: skip
def test_a_url_with_a_secret_is_refused_with_where_the_secret_belongs_and_never_echoed(settings, where):
    with pytest.raises(ValidationError) as info:
        sync_params(**settings)
    assert where in str(info.value) and SECRET not in str(info.value)


def test_the_run_form_refuses_a_url_with_a_secret_so_a_server_never_stores_it():
    """A Prefect server checks a deployment run's parameters against the form's schema before it stores the run."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    flow = load_flow_from_entrypoint("flows/sync_contacts.py:sync_contacts", use_placeholder_flow=False)
    schema = flow.parameters.model_dump_for_openapi()
    fine = sync_params(source="postgresql://apollo@db/crm", query="people", state_url="postgresql://apollo@db/s").as_json()
    validate(fine, schema, raise_on_error=True, preprocess=True, ignore_required=False)
    for group, field, value in (("source", "path", f"postgresql://apollo:{SECRET}@db/crm"),
                                ("run", "state_url", f"postgresql://a:{SECRET}@db/s"),
                                ("source", "path", f"https://b.example/c.csv?x=1&X-Amz-Signature={SECRET}"),
                                ("apollo", "base_url", f"https://u:{SECRET}@api.example.com/v1")):  # fmt: skip
        bad = fine | {group: fine[group] | {field: value}}
        with pytest.raises(SchemaError):
            validate(bad, schema, raise_on_error=True, preprocess=True, ignore_required=False)


def test_cli_refuses_a_password_in_the_source_in_one_line_without_showing_it(sandbox, tmp_path):
    result = cli("run", f"postgresql://apollo:{SECRET}@127.0.0.1:9/crm", "--query", "people",
                 "--base-url", sandbox.gateway_base_url, "--state-dir", str(tmp_path / "s"),
                 env_extra={ENV_API_KEY: sandbox.config.api_key})  # fmt: skip
    assert_one_clear_line(result)
    assert SECRET not in result.stderr + result.stdout and "PGPASSWORD" in result.stderr
    assert sandbox.stats()["requests"] == 0 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--base-url", "ftp://api.example.com"], "--base-url"),
    (["--base-url", "api.example.com/v1"], "http://"),
    (["--label", "  "], "--label"),
    (["--state-url", "mysql://db/x"], "postgresql://"),
    (["--chunk-size", "0"], "--chunk-size"),
], ids=["ftp", "no-scheme", "empty-label", "not-postgres", "chunk-size"])  # fmt: skip
def test_mistakes_are_one_line_and_exit_2_before_prefect_starts(sandbox, tmp_path, flags, expected):
    result = cli("run", str(source(tmp_path)), "--state-dir", str(tmp_path / "s"), *flags,
                 env_extra={ENV_API_KEY: sandbox.config.api_key})  # fmt: skip
    assert_one_clear_line(result)
    assert expected in result.stderr and "Flow run" not in result.stderr
    assert sandbox.stats()["requests"] == 0


def test_a_report_dir_that_is_a_file_is_refused_before_anything_is_sent(sandbox, tmp_path):
    taken = tmp_path / "report"
    taken.write_text("not a folder")
    result = cli("run", str(source(tmp_path)), "--base-url", sandbox.gateway_base_url, "--report-dir", str(taken),
                 "--state-dir", str(tmp_path / "s"), env_extra={ENV_API_KEY: sandbox.config.api_key})  # fmt: skip
    assert_one_clear_line(result)
    assert "--report-dir" in result.stderr and "is a file" in result.stderr
    assert sandbox.stats()["requests"] == 0 and taken.read_text() == "not a folder"


def test_a_key_with_a_control_character_inside_is_refused_and_never_shown(sandbox, tmp_path):
    bad = sandbox.config.api_key + "\x07x"
    result = cli("run", str(source(tmp_path)), "--base-url", sandbox.gateway_base_url,
                 "--state-dir", str(tmp_path / "s"), env_extra={ENV_API_KEY: bad})  # fmt: skip
    assert_one_clear_line(result)
    assert "control character" in result.stderr and sandbox.config.api_key not in result.stderr
    assert sandbox.stats()["requests"] == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_key_with_a_trailing_newline_works_and_a_wrong_key_ends_in_one_line_without_a_traceback(sandbox, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": PREFECT_API_URL.value()}
    args = ["run", str(source(tmp_path)), "--base-url", sandbox.gateway_base_url, "--state-dir", str(tmp_path / "s")]
    good = cli(*args, env_extra=env | {ENV_API_KEY: sandbox.config.api_key + "\n"})
    assert good.returncode == 0, good.stderr[-2000:]
    assert len(sandbox.contacts()) == 2

    wrong = cli(*args, "--full-refresh", env_extra=env | {ENV_API_KEY: "not-the-key-at-all\n"})
    assert wrong.returncode == 1
    assert "Traceback" not in wrong.stderr and "not-the-key-at-all" not in wrong.stderr + wrong.stdout
    [error] = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert "401" in error


def test_escaped_forms_of_a_registered_key_are_masked_too(caplog):
    key = "key-with-newline-9876\n"
    register_secret(key)
    assert "key-with-newline-9876" not in redact("header value b'Bearer key-with-newline-9876\\n'")
    with caplog.at_level(logging.INFO):
        logging.getLogger("apollo_sync.test").info("echo %r", "Bearer " + key)
    assert "key-with-newline-9876" not in caplog.text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_report_and_ledger_files_are_private(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    previous = os.umask(0o022)  # a usual umask: the run must make its files private itself
    try:
        params = sync_params(source=str(source(tmp_path)), base_url=sandbox.gateway_base_url,
                             state_dir=str(tmp_path / "state"), report_dir=str(tmp_path / "out" / "report"))  # fmt: skip
        summary = asyncio.run(run_sync(params))
    finally:
        os.umask(previous)
    assert summary["created"] == 2
    state, report = tmp_path / "state", tmp_path / "out" / "report"
    for folder in (state, report, tmp_path / "out"):
        assert _mode(folder) == 0o700, folder
    files = [p for p in [*state.rglob("*"), *report.rglob("*")] if p.is_file()]
    assert any(p.name == "ledger.sqlite3" for p in files) and any(p.name == "rejected.csv" for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_two_runs_started_in_the_same_second_get_their_own_report_folders(tmp_path):
    params = sync_params(source="x.csv", state_dir=str(tmp_path / "state"))
    first, second = open_run(params, "run-one-aaaa"), open_run(params, "run-two-bbbb")
    try:
        assert first.report_dir != second.report_dir
    finally:
        first.ledger.close()
        second.ledger.close()
