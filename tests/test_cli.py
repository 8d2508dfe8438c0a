"""The command line as people use it: bad input is one line and exit 2 with nothing sent; a real run exits 0."""

import os
import subprocess
import sys

import pytest

from apollo_sync.settings import ENV_API_KEY


def cli(*args, env_extra=None, timeout=180):
    env = {k: v for k, v in os.environ.items() if not k.startswith("APOLLO_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "apollo_sync.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def assert_one_clear_line(result):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


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
