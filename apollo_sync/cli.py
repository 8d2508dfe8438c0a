"""The ``apollo-sync`` command line: ``run``, ``demo`` and ``sandbox``.

``run``'s flags are made from the run's settings (:mod:`apollo_sync.params`): one flag per field, named after it
(``--chunk-size``; ``--label`` and ``--no-dedupe`` are the two exceptions), grouped in ``--help`` as the Prefect
form groups them, so a setting is declared once. Bad input is caught before Prefect starts (a second, not ten):
the settings are validated, the source opened, the mapping read and the columns checked first, so a mistake costs one clear line on stderr, exit code 2, and nothing sent.

Exit codes: 0 every row accounted for and none failed; 1 some rows failed or stayed unconfirmed (the report says
which), or the run stopped (a wrong key); 2 bad input or usage, nothing sent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import tempfile
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from apollo_sync import settings
from apollo_sync.errors import ApolloSyncError, InputError
from apollo_sync.params import FIELD_GROUPS, RUN_GROUPS, SyncParams, flow_parameters, sync_params
from apollo_sync.redact import api_key_from

app = typer.Typer(
    name="apollo-sync",
    help="Load contacts from files, databases and buckets into Apollo (Bulk Create Contacts), orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SAMPLE_CSV = Path(__file__).parent / "data" / "sample_contacts.csv"


# --- run: flags made from the settings model ---------------------------------------------------------------------

FLAG_NAMES = {"labels": "--label", "run_dedupe": "--no-dedupe"}
"""Settings whose flag is not ``--<name>``: ``--label`` repeats, ``--no-dedupe`` turns dedupe off."""
ENV_VARS = {"base_url": settings.ENV_BASE_URL}
INVERTED = frozenset({"run_dedupe"})
"""Switches that turn a setting that defaults to true off."""


def flag_for(name: str) -> str:
    """The ``run`` flag of a setting's flat name (``chunk_size`` -> ``--chunk-size``; ``source`` is the argument)."""
    return "SOURCE" if name == "source" else FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _flag_type(annotation: Any) -> Any:
    """The type Typer gets for a field: ``X | None`` as ``Optional[X]``, lists as optional lists."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return Optional[_flag_type(args[0])]
    if typing.get_origin(annotation) is list:
        return Optional[list[args[0]]]  # type: ignore[valid-type]
    return annotation


def _bounds(field: FieldInfo) -> dict[str, Any]:
    """min/max for Typer from a field's ge/le constraints (``--help`` shows the range; a ``gt`` bound is left to
    the model, whose message names the flag)."""
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        for attr, key in (("ge", "min"), ("le", "max")):
            if getattr(rule, attr, None) is not None:
                bounds[key] = getattr(rule, attr)
    return bounds


def run_flags() -> list[inspect.Parameter]:
    """One Typer parameter per settings field (flat names, see ``params.FIELD_GROUPS``), each in its group's help
    panel, in the order the Prefect form shows them; plus ``--api-key``."""
    flags = []
    for flat, (group, name) in FIELD_GROUPS.items():
        field = RUN_GROUPS[group].model_fields[name]
        help_text = " ".join(filter(None, [f"{field.title}." if field.title else None, field.description]))
        if flat in INVERTED:
            help_text = f"Turn off: {help_text}"
        if flat == "source":
            info: Any = typer.Argument(..., help=help_text, show_default=False)
            flags.append(inspect.Parameter(flat, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=str))
            continue
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:
            default = False  # a switch changes the default: --dry-run, --full-refresh, --no-dedupe
        info = typer.Option(
            None if isinstance(default, list) else default.value if isinstance(default, Enum) else default,
            flag_for(flat), help=help_text, rich_help_panel=group.capitalize(), envvar=ENV_VARS.get(flat),
            show_default=default not in (None, False, []), **_bounds(field),
        )  # fmt: skip
        flags.append(inspect.Parameter(flat, inspect.Parameter.KEYWORD_ONLY, default=info,
                                       annotation=_flag_type(field.annotation)))  # fmt: skip
    api_key = typer.Option(None, "--api-key", show_default=False, rich_help_panel="Apollo",
                           help=f"API key for this run only, never stored (prefer the {settings.ENV_API_KEY} "
                           "environment variable or a Secret block).")  # fmt: skip
    flags.append(inspect.Parameter("api_key", inspect.Parameter.KEYWORD_ONLY, default=api_key, annotation=Optional[str]))
    flags.append(inspect.Parameter("ephemeral", inspect.Parameter.KEYWORD_ONLY, default=EPHEMERAL, annotation=bool))
    return flags


EPHEMERAL_HELP = (
    "Run on a temporary Prefect server started for this run only (about 10 s more), instead of the local server "
    "apollo-sync starts once and reuses (see 'apollo-sync server'). PREFECT_API_URL, when set, always wins."
)
EPHEMERAL = typer.Option(False, "--ephemeral", rich_help_panel="Prefect", help=EPHEMERAL_HELP)


def params_from_flags(flags: dict[str, Any]) -> SyncParams:
    """The run's settings from ``run``'s parsed flags (unset ones keep the model's default); InputError naming
    the flag when a value is refused."""
    given = {}
    for flat, value in flags.items():
        if flat in INVERTED:
            value = not value
        if value is None or value == [] or (isinstance(value, bool) and value == (flat in INVERTED)):
            continue
        given[flat] = value.value if isinstance(value, Enum) else value
    try:
        return sync_params(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        group, name = (list(error["loc"]) + ["", ""])[:2]
        flat = next((f for f, where in FIELD_GROUPS.items() if where == (group, name)), None)
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InputError(f"{flag_for(flat) if flat else 'settings'}: {message}") from None


def run(**flags: Any) -> None:
    """Sync SOURCE into Apollo and report every row's outcome."""
    api_key = flags.pop("api_key")
    ephemeral = flags.pop("ephemeral")
    if api_key:
        flags["api_key_block"] = None  # the key of this run is the one given, never a stored one
    params = params_from_flags(flags)
    from apollo_sync.sync import preflight  # polars and the stages: only the commands that run need them

    preflight(params)
    if api_key:
        os.environ[settings.ENV_API_KEY] = api_key  # read by the flow at run time; never a flow parameter
    if not params.run.dry_run:
        check_api_key(params.apollo.api_key_block)
    use_prefect_server(ephemeral)
    summary = run_flow(params, progress=not params.run.dry_run)
    print_summary(summary)
    raise typer.Exit(exit_code_for(summary))


run.__signature__ = inspect.Signature(run_flags())  # type: ignore[attr-defined]
app.command()(run)


@app.command()
def demo(
    report_dir: Annotated[Path, typer.Option(help="Where the demo's report goes.")] = Path("apollo-sync-demo"),
    ephemeral: Annotated[bool, typer.Option("--ephemeral", help=EPHEMERAL_HELP)] = False,
) -> None:
    """Sync the bundled sample export into a local sandbox server, then sync it again: no key, no network."""
    from apollo_sync.sandbox import SandboxConfig, SandboxServer

    use_prefect_server(ephemeral)

    with SandboxServer(SandboxConfig()) as sandbox, tempfile.TemporaryDirectory(prefix="apollo-sync-demo-") as state:
        os.environ[settings.ENV_API_KEY] = sandbox.config.api_key
        out.print(f"[bold]apollo-sync demo[/]: sandbox at {sandbox.gateway_base_url}, source {SAMPLE_CSV.name}")
        settings_of = dict(source=str(SAMPLE_CSV), base_url=sandbox.gateway_base_url, labels=["apollo-sync demo"],
                           state_dir=state, api_key_block=None)  # fmt: skip
        first = run_flow(sync_params(**settings_of, report_dir=str(report_dir / "first-run")))
        print_summary(first, title="First run")
        second = run_flow(sync_params(**settings_of, report_dir=str(report_dir / "second-run")))
        print_summary(second, title="Second run: only what changed is sent")
        stats = sandbox.stats()
        out.print(
            f"Sandbox received {stats['requests']} requests (largest {stats['max_contacts_in_request']} contacts) and "
            f"holds {stats['contacts_stored']} contacts. Reports: {report_dir.resolve()}"
        )
    raise typer.Exit(exit_code_for(first))


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1 (0: a free one).")] = 8765,
    api_key: Annotated[str, typer.Option(help="The key the sandbox accepts.")] = "sandbox-key",
    rate: Annotated[Optional[int], typer.Option(min=1, help="Requests allowed per --window.")] = None,
    window: Annotated[float, typer.Option(min=0.01, help="Rate window in seconds.")] = 60.0,
    hourly_limit: Annotated[Optional[int], typer.Option(min=1, help="Requests allowed per hour.")] = None,
    daily_limit: Annotated[Optional[int], typer.Option(min=1, help="Requests allowed per day.")] = None,
    latency: Annotated[float, typer.Option(min=0, help="Seconds added to every answer.")] = 0.0,
    fail_before_store: Annotated[float, typer.Option(min=0, max=1, help="Share of requests answered 503 without storing.")] = 0.0,
    fail_after_store: Annotated[float, typer.Option(min=0, max=1, help="Share of requests stored, then answered 500.")] = 0.0,
    slow: Annotated[float, typer.Option(min=0, max=1, help="Share of requests answered after --slow-seconds.")] = 0.0,
    slow_seconds: Annotated[float, typer.Option(min=0, help="Delay of a slow answer.")] = 2.0,
    drop: Annotated[float, typer.Option(min=0, max=1, help="Share of connections closed without an answer.")] = 0.0,
    burst_429: Annotated[float, typer.Option("--burst-429", min=0, max=1, help="Share of requests answered 429.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the faults.")] = None,
) -> None:
    """Run the Apollo-compatible sandbox server on 127.0.0.1 until interrupted."""
    from apollo_sync.sandbox import SandboxConfig, serve_forever

    config = SandboxConfig(
        api_key=api_key, rate=rate, window=window, hourly_limit=hourly_limit, daily_limit=daily_limit,
        latency=latency, fail_before_store=fail_before_store, fail_after_store=fail_after_store, slow=slow,
        slow_seconds=slow_seconds, drop=drop, burst_429=burst_429, seed=seed,
    )
    serve_forever(config, port)


server_app = typer.Typer(help="The local Prefect server that ad hoc runs share: status, start, stop.", no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("status")
def server_status() -> None:
    """Whether apollo-sync's local Prefect server is running, and where."""
    from apollo_sync import local_server

    server = local_server.status()
    if server is None:
        out.print(f"No local Prefect server of apollo-sync is running (PREFECT_HOME {local_server.prefect_home()}).")
        raise typer.Exit(3)
    out.print(f"Running: UI at {server.url}, process {server.pid}, home {server.home}, log {server.log}")


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server now (runs start it on first use anyway)."""
    from apollo_sync import local_server

    server, started = local_server.ensure()
    out.print(f"{'Started' if started else 'Already running'}: UI at {server.url}, process {server.pid}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server apollo-sync started; nothing of it keeps running."""
    from apollo_sync import local_server

    server = local_server.stop()
    out.print(f"Stopped the local Prefect server (process {server.pid})." if server else "Nothing was running.")


def check_api_key(block_name: str | None) -> None:
    """Fail with one line (ConfigError, exit 2) before the flow starts when no key can be found.

    Inside the flow the same error would be logged by Prefect with a traceback.
    """
    if key := os.environ.get(settings.ENV_API_KEY):
        os.environ[settings.ENV_API_KEY] = api_key_from(key)
        return
    from tasks.credentials import resolve_api_key

    asyncio.run(resolve_api_key(block_name))


class _NoTracebackForExpected(logging.Filter):
    """Drops the traceback from a console log record whose exception apollo-sync raised on purpose (a stopped run,
    bad input): the line stays, and the Prefect API log handler still gets the whole record for the UI."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ApolloSyncError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """Install :class:`_NoTracebackForExpected` on the console handlers Prefect configured (the root logger's;
    ``import prefect`` sets them up)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTracebackForExpected) for f in handler.filters):
            handler.addFilter(_NoTracebackForExpected())


def use_prefect_server(ephemeral: bool) -> None:
    """Point this process at the local Prefect server (started on first use, one line saying so), unless
    ``--ephemeral`` or a PREFECT_API_URL already says which server to use (``apollo_sync.local_server``)."""
    from apollo_sync import local_server

    if not local_server.wanted(ephemeral):
        return
    server, started = local_server.ensure()
    os.environ["PREFECT_API_URL"] = server.api_url
    if started:
        line = (f"Started a local Prefect server for apollo-sync runs: UI at {server.url} (it keeps running; "
                "'apollo-sync server stop' stops it)")  # fmt: skip
        err.print(line, soft_wrap=True)


def run_flow(params: SyncParams, progress: bool = False) -> dict:
    """Run the flow in this process (on PREFECT_API_URL's server, else a temporary one); with ``progress``, a
    progress bar on an interactive terminal while contacts are sent."""
    from flows.sync_contacts import sync_contacts

    quiet_expected_tracebacks()
    if not (progress and err.is_terminal):
        return asyncio.run(sync_contacts(**flow_parameters(params)))
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from apollo_sync.send import watching_progress

    columns = (TextColumn("sending"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("send", total=None, rate="")

        def show(done: int, total: int, per_second: float) -> None:
            bar.update(task, completed=done, total=total, rate=f"{per_second:,.0f} contacts/s")

        with watching_progress(show):
            return asyncio.run(sync_contacts(**flow_parameters(params)))


def exit_code_for(summary: dict) -> int:
    return 1 if summary.get("failed") or summary.get("unconfirmed") else 0


def print_summary(summary: dict, title: str = "Summary") -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_row("rows read", f"{summary['rows_read']:,}")
    for reason, count in summary["rejected"].items():
        table.add_row(f"rejected: {reason}", f"{count:,}")
    table.add_row("duplicates in source", f"{summary['duplicates_in_source']:,}")
    for key in ("created", "updated", "existing", "unchanged", "would_send", "would_update", "failed", "unconfirmed"):
        if key in summary and (summary[key] or key in ("created", "failed")):
            style = "red" if key in ("failed", "unconfirmed") and summary[key] else ""
            table.add_row(key.replace("_", " "), f"[{style}]{summary[key]:,}[/]" if style else f"{summary[key]:,}")
    table.add_row("requests (retries)", f"{summary['requests']:,} ({summary['retries']:,})")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    out.print(table)
    out.print(f"Report: {summary.get('report_dir')}")


def _fail(line: str) -> None:
    """One plain line on stderr: no markup, no wrapping (a path with brackets stays as it is)."""
    sys.stderr.write(" ".join(line.split()) + "\n")


def main() -> None:
    """Console entry point: one clear line and an exit code for every expected failure, never a traceback."""
    # Offline machines log a telemetry error at every ephemeral server start; a user's setting still wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted: rows confirmed so far are in the ledger; run again to continue")
        sys.exit(130)
    except ApolloSyncError as exc:
        _fail(f"error: {exc}")
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: an unknown option, a value out of range
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"error: {message}; see 'apollo-sync --help'")
        sys.exit(2)
    except Exception as exc:
        if type(exc).__name__ == "ParameterTypeError":  # Prefect's parameter validation, before any request
            _fail(f"error: {str(exc).splitlines()[0]}")
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
