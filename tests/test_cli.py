"""The command line as people use it: bad input is one line and exit 2 with nothing sent; a real run exits 0."""

import pytest
from cli_helpers import assert_one_clear_line, cli

from apollo_sync.settings import ENV_API_KEY


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_source, expected",
    [
        (lambda d: d / "missing.csv", "does not exist"),
        (lambda d: write(d / "empty.csv", b""), "empty"),
        (lambda d: write(d / "garbage.csv", bytes(range(256)) * 50), "binary"),
        (lambda d: write(d / "noid.csv", b"Title,Phone\nCEO,555\n"), "email"),
    ],
    ids=["missing", "empty", "binary", "no-identity-columns"],
)
def test_bad_input_is_one_line_exit_2_and_nothing_sent(sandbox, tmp_path, make_source, expected):
    source = make_source(tmp_path)
    result = cli("run", str(source), "--base-url", sandbox.gateway_base_url, "--state-dir", str(tmp_path / "s"),
                 env_extra={ENV_API_KEY: sandbox.config.api_key})
    assert_one_clear_line(result)
    assert expected in result.stderr.lower()
    assert sandbox.stats()["requests"] == 0


def test_usage_error_exits_2(tmp_path):
    result = cli("run", str(tmp_path / "x.csv"), "--chunk-size", "101")
    assert_one_clear_line(result)
    assert "--chunk-size" in result.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_run_syncs_a_file_and_exits_0(sandbox, tmp_path):
    from prefect.settings import PREFECT_API_URL

    source = tmp_path / "contacts.csv"
    source.write_text("email,first name,last name,company\na@x.io,A,One,X\nb@x.io,B,Two,Y\n")
    result = cli("run", str(source), "--base-url", sandbox.apollo_base_url, "--api-key", sandbox.config.api_key,
                 "--state-dir", str(tmp_path / "s"), "--report-dir", str(tmp_path / "r"),
                 env_extra={"PREFECT_API_URL": PREFECT_API_URL.value()})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(c["email"] for c in sandbox.contacts()) == ["a@x.io", "b@x.io"]
    assert (tmp_path / "r" / "summary.json").exists()
    assert sandbox.config.api_key not in result.stdout + result.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_missing_key_is_one_line_exit_2_before_the_flow_starts(sandbox, tmp_path):
    from prefect.settings import PREFECT_API_URL

    source = tmp_path / "contacts.csv"
    source.write_text("email,first name\na@x.io,A\n")
    result = cli("run", str(source), "--base-url", sandbox.gateway_base_url, "--api-key-block", "no-such-block",
                 "--state-dir", str(tmp_path / "s"), env_extra={"PREFECT_API_URL": PREFECT_API_URL.value()})
    assert_one_clear_line(result)
    assert "APOLLO_API_KEY" in result.stderr
    assert sandbox.stats()["requests"] == 0


BASELINE_FLAGS = {
    "--mapping", "--label", "--no-dedupe", "--chunk-size", "--concurrency", "--timeout", "--base-url", "--api-key",
    "--api-key-block", "--auth", "--dry-run", "--report-dir", "--state-dir", "--state-url", "--full-refresh",
    "--max-rpm", "--rate-limit-name", "--phone-region", "--format", "--delimiter", "--encoding", "--query",
    "--cursor-column",
}  # fmt: skip
"""The flags ``apollo-sync run`` had before they were made from the settings model: scripts use them."""


def _run_command():
    import typer.main

    from apollo_sync.cli import app

    group = typer.main.get_command(app)
    return group.commands["run"]


def test_run_has_one_flag_per_setting_and_keeps_every_old_flag_name():
    from apollo_sync.cli import flag_for
    from apollo_sync.params import FIELD_GROUPS

    command = _run_command()
    options = {opt for param in command.params for opt in param.opts if opt.startswith("--")} - {"--help"}
    assert options == {flag_for(name) for name in FIELD_GROUPS if name != "source"} | {"--api-key", "--ephemeral"}
    assert BASELINE_FLAGS <= options
    assert [p.name for p in command.params if p.param_type_name == "argument"] == ["source"]


def test_flags_become_the_grouped_settings_and_unset_flags_keep_the_models_defaults():
    from apollo_sync.cli import params_from_flags
    from apollo_sync.params import sync_params

    command = _run_command()
    argv = ["in.csv", "--label", "a", "--label", "b", "--no-dedupe", "--chunk-size", "50", "--format", "tsv",
            "--dry-run", "--state-url", "postgresql://h/db", "--phone-region", "gb"]  # fmt: skip
    context = command.make_context("run", argv)
    flags = dict(context.params)
    flags.pop("api_key"), flags.pop("ephemeral")
    params = params_from_flags(flags)
    assert params.apollo.labels == ["a", "b"] and params.apollo.run_dedupe is False
    assert (params.load.chunk_size, params.source.format.value, params.run.dry_run) == (50, "tsv", True)
    assert (params.run.state_url, params.cleaning.phone_region) == ("postgresql://h/db", "GB")
    bare = {k: v for k, v in command.make_context("run", ["in.csv"]).params.items() if k not in ("api_key", "ephemeral")}
    assert params_from_flags(bare) == sync_params(source="in.csv")  # every default is the model's


def test_the_local_server_is_used_unless_ephemeral_or_a_server_is_configured(monkeypatch):
    from apollo_sync import local_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(local_server.ENV_EPHEMERAL, raising=False)
    assert local_server.wanted(ephemeral=False)
    assert not local_server.wanted(ephemeral=True)
    monkeypatch.setenv(local_server.ENV_EPHEMERAL, "1")
    assert not local_server.wanted(ephemeral=False)
    monkeypatch.delenv(local_server.ENV_EPHEMERAL)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert not local_server.wanted(ephemeral=False)  # a configured server is always used as it is


def test_the_progress_bar_is_told_after_every_chunk_up_to_the_total(sandbox, tmp_path, monkeypatch):
    import asyncio

    from apollo_sync.params import sync_params
    from apollo_sync.send import watching_progress
    from apollo_sync.sync import run_sync

    source = tmp_path / "contacts.csv"
    source.write_text("email\n" + "".join(f"p{i}@x.io\n" for i in range(25)))
    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    seen = []
    params = sync_params(source=str(source), base_url=sandbox.gateway_base_url, state_dir=str(tmp_path / "s"),
                         chunk_size=10, concurrency=1)  # fmt: skip
    with watching_progress(lambda done, total, rate: seen.append((done, total))):
        asyncio.run(run_sync(params))
    # One call per chunk (10, 10, 5 rows; the short one may go between the others). The total is the rows planned
    # so far: it may grow while the source is still being cleaned (the 5 rows of a short chunk wait for its end),
    # never shrinks, and ends at all 25.
    totals = [total for _, total in seen]
    assert len(seen) == 3 and seen[-1] == (25, 25) and totals == sorted(totals)
    assert all(done <= total for done, total in seen) and set(totals) <= {20, 25}
    assert sorted(b - a for a, b in zip([0] + [d for d, _ in seen], [d for d, _ in seen])) == [5, 10, 10]
