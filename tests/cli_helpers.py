"""Running ``apollo-sync`` as people do, in a subprocess, and what a refusal must look like."""

from __future__ import annotations

import os
import subprocess
import sys


def cli(*args, env_extra=None, timeout=180) -> subprocess.CompletedProcess:
    """``python -m apollo_sync.cli ARGS`` with no APOLLO_* variable inherited (``env_extra`` adds some). Runs use
    Prefect's temporary server unless ``env_extra`` sets APOLLO_SYNC_EPHEMERAL to "" (no test leaves a local
    server running in the developer's PREFECT_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APOLLO_")}
    env["APOLLO_SYNC_EPHEMERAL"] = "1"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "apollo_sync.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_one_clear_line(result: subprocess.CompletedProcess) -> None:
    """Exit 2, one line on stderr, no traceback anywhere."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
