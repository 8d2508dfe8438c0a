"""The sandbox in a child process: :class:`SandboxProcess` and the ``python -m apollo_sync.sandbox`` command line.

The child gets its own interpreter (benchmarks measure the client, not a server sharing its GIL) and can be
killed with -9 (``.process``). Flags mirror :class:`~.state.SandboxConfig` one for one (:func:`config_to_argv`,
:func:`config_from_args`).

The key: ``--api-key``, else the environment variable ``APOLLO_SANDBOX_KEY`` (``settings.ENV_SANDBOX_KEY``; unset or
empty means the default ``sandbox-key``). :class:`SandboxProcess` always hands its config's key to the child that
way, never on the command line, so it does not show in ``ps`` (and a key in the parent's environment does not
override the config's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from apollo_sync.errors import InputError
from apollo_sync.sandbox.endpoint import ADMIN_PREFIX
from apollo_sync.sandbox.server import ANNOUNCE_PREFIX, LOOPBACK_HOST, SandboxURLs, serve_forever
from apollo_sync.sandbox.state import SandboxConfig
from apollo_sync.settings import ENV_SANDBOX_KEY

DESCRIPTION = "A real HTTP server on 127.0.0.1 that behaves like Apollo's Bulk Create and Bulk Update Contacts."
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory holding apollo_sync/, put on the child's PYTHONPATH so it imports this very package."""


def config_to_argv(config: SandboxConfig) -> list[str]:
    """The ``python -m apollo_sync.sandbox`` flags that reproduce ``config`` (defaults left out)."""
    argv: list[str] = []
    defaults = SandboxConfig()
    for f in fields(SandboxConfig):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "shuffle":
            argv.append("--no-shuffle")
        elif f.name == "sliding":
            argv.append("--sliding")
        elif f.name == "keep_contacts":
            argv.append("--lean")
        else:
            argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


class SandboxProcess(SandboxURLs):
    """The sandbox in a child process (``python -m apollo_sync.sandbox``), same API as SandboxServer.

    For benchmarks (the server gets its own interpreter) and kill -9 tests (``.process``). The key goes to the
    child in ``APOLLO_SANDBOX_KEY``, not in its argv.
    ``contacts()``/``seed()``/``stats()``/``reset()`` go over the admin endpoints.
    """

    def __init__(self, config: SandboxConfig | None = None, *, port: int = 0, startup_timeout: float = 30.0):
        self.config = config or SandboxConfig()
        self._port = port
        self._startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> SandboxProcess:
        """Start the child and wait for its announce line; ``.url`` is set on return."""
        if self.process is not None:
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env[ENV_SANDBOX_KEY] = self.config.api_key  # not in argv: anyone can read a command line
        flags = config_to_argv(replace(self.config, api_key=SandboxConfig().api_key))
        cmd = [sys.executable, "-m", "apollo_sync.sandbox", "--port", str(self._port), *flags]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self._startup_timeout)
        first = line[0].strip() if line else ""
        if not first.startswith(ANNOUNCE_PREFIX):
            self.stop()
            raise RuntimeError(f"sandbox child did not announce its URL within {self._startup_timeout:g} s (got {first!r})")
        self.url = first[len(ANNOUNCE_PREFIX) :]
        return self

    def stop(self) -> None:
        """Terminate the child (kill it if it does not exit within 5 s)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def _admin(self, method: str, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.url:
            raise RuntimeError("the sandbox process is not running: use it inside 'with SandboxProcess(...)'")
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = urllib.request.Request(f"{self.url}{ADMIN_PREFIX}/{name}", method=method, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback URL we bound
            return json.loads(response.read())

    def contacts(self) -> list[dict[str, Any]]:
        """Every stored contact, via ``GET /_sandbox/contacts``."""
        return self._admin("GET", "contacts")["contacts"]

    def seed(self, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store contacts that exist before a sync, via ``POST /_sandbox/contacts`` (see ``SandboxServer.seed``);
        InputError naming the field when the sandbox refuses them."""
        try:
            return self._admin("POST", "contacts", {"contacts": contacts})["contacts"]
        except urllib.error.HTTPError as exc:
            if exc.code != 422:
                raise
            message = json.loads(exc.read())["error"]["message"]
            raise InputError(f"cannot seed the sandbox: {message}") from None

    def stats(self) -> dict[str, Any]:
        """The counters, via ``GET /_sandbox/stats`` (keys as ``SandboxServer.stats`` describes)."""
        return self._admin("GET", "stats")

    def reset(self) -> None:
        """Clear store, counters and windows, via ``POST /_sandbox/reset``."""
        self._admin("POST", "reset")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability in [0, 1]; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m apollo_sync.sandbox`` flags, mirroring SandboxConfig."""
    p = argparse.ArgumentParser(prog="python -m apollo_sync.sandbox", description=DESCRIPTION)
    d = SandboxConfig()
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port; default 8765)")
    p.add_argument("--host", default=LOOPBACK_HOST, help="only 127.0.0.1 (or localhost) is accepted")
    p.add_argument("--api-key", default=None, help=f"the key clients must send (default: ${ENV_SANDBOX_KEY}, "
                   f"else {d.api_key}; the variable keeps the key out of ps)")
    p.add_argument("--rate", type=int, default=None, help="requests per --window per key (default: no limit)")
    p.add_argument("--window", type=float, default=d.window, help="primary window length in seconds (default 60)")
    p.add_argument("--phase", type=float, default=d.phase,
                   help="fixed windows start at multiples of their length plus this many seconds (default 0)")
    p.add_argument("--sliding", action="store_true", help="windows count the last --window seconds, not fixed ones")
    p.add_argument("--hourly-limit", type=int, default=None, help="requests per hour per key")
    p.add_argument("--daily-limit", type=int, default=None, help="requests per day per key")
    p.add_argument("--latency", type=float, default=0.0, help="seconds slept on every create or update request")
    p.add_argument("--fail-before-store", type=_probability, default=0.0, help="probability of a 503, nothing stored")
    p.add_argument("--fail-after-store", type=_probability, default=0.0, help="probability of a 500 after storing")
    p.add_argument("--slow", type=_probability, default=0.0, help="probability of answering --slow-seconds late")
    p.add_argument("--slow-seconds", type=float, default=d.slow_seconds, help="delay of a slow answer (default 2)")
    p.add_argument("--drop", type=_probability, default=0.0, help="probability of closing without an answer")
    p.add_argument("--burst-429", type=_probability, default=0.0, help="probability of a spurious 429 (Retry-After: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for faults, ids and shuffles")
    p.add_argument("--no-shuffle", action="store_true", help="return contacts in request order")
    p.add_argument("--lean", action="store_true", help="keep only each contact's id under its email (millions of contacts)")
    return p


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """SandboxConfig from parsed ``build_parser()`` arguments (each flag is named after its field)."""
    values = {f.name: getattr(args, f.name) for f in fields(SandboxConfig) if f.name not in ("shuffle", "keep_contacts")}
    values["api_key"] = sandbox_key(args.api_key)
    return SandboxConfig(**values, shuffle=not args.no_shuffle, keep_contacts=not args.lean)


def sandbox_key(given: str | None) -> str:
    """The key to expect: ``given`` (``--api-key``), else ``$APOLLO_SANDBOX_KEY`` read now, else the default."""
    if given is not None:
        return given
    return os.environ.get(ENV_SANDBOX_KEY) or SandboxConfig().api_key


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m apollo_sync.sandbox``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        serve_forever(config_from_args(args), args.port, args.host, announce=lambda line: print(line, flush=True))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
