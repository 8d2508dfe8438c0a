"""The ``apollo-sync`` command line: ``run``, ``demo`` and ``sandbox``.

Bad input is caught before Prefect starts (a second, not ten): the source is opened, the mapping read and the
columns checked first, so a mistake costs one clear line on stderr, exit code 2, and nothing sent.

Exit codes: 0 every row accounted for and none failed; 1 some rows failed or stayed unconfirmed (the report says
which), or the run stopped (a wrong key); 2 bad input or usage, nothing sent.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from apollo_sync import settings
from apollo_sync.errors import ApolloSyncError, InputError

app = typer.Typer(
    name="apollo-sync",
    help="Load contacts from files, databases and buckets into Apollo (Bulk Create Contacts), orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

SAMPLE_CSV = Path(__file__).parent / "data" / "sample_contacts.csv"


class Auth(str, Enum):
    auto = "auto"
    bearer = "bearer"
    x_api_key = "x-api-key"


class Format(str, Enum):
    csv = "csv"
    tsv = "tsv"
    parquet = "parquet"
    json = "json"
    ndjson = "ndjson"
    xlsx = "xlsx"


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="File, glob, sqlite:///… or postgresql://… (with --query), s3:// or https:// URL.")],
    mapping: Annotated[Optional[Path], typer.Option(help="TOML file mapping source columns to Apollo fields.")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Label added to every contact (repeatable).")] = None,
    no_dedupe: Annotated[bool, typer.Option("--no-dedupe", help="Let Apollo create duplicates of existing contacts (retries still dedupe).")] = False,
    chunk_size: Annotated[int, typer.Option(min=1, max=settings.MAX_CONTACTS_PER_REQUEST, help="Contacts per request.")] = settings.DEFAULT_CHUNK_SIZE,
    concurrency: Annotated[int, typer.Option(min=1, max=32, help="Requests in flight.")] = settings.DEFAULT_CONCURRENCY,
    timeout: Annotated[float, typer.Option(min=0.1, max=600, help="Seconds to wait for one answer.")] = settings.DEFAULT_TIMEOUT_SECONDS,
    base_url: Annotated[str, typer.Option(envvar=settings.ENV_BASE_URL, help="Gateway (default) or https://api.apollo.io/api/v1.")] = settings.GATEWAY_BASE_URL,
    api_key: Annotated[Optional[str], typer.Option(help=f"API key (prefer the {settings.ENV_API_KEY} environment variable or a Secret block).", show_default=False)] = None,
    api_key_block: Annotated[str, typer.Option(help="Prefect Secret block holding the key, used when present.")] = settings.DEFAULT_SECRET_BLOCK,
    auth: Annotated[Auth, typer.Option(help="How the key is sent; auto follows the host.")] = Auth.auto,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read, clean and plan; send nothing.")] = False,
    report_dir: Annotated[Optional[Path], typer.Option(help="Where summary.json and results go (default: under --state-dir).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the sync ledger lives.")] = Path(settings.DEFAULT_STATE_DIR),
    state_url: Annotated[Optional[str], typer.Option(help="postgresql://… ledger shared by several workers (instead of --state-dir's).", show_default=False)] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="Ignore the ledger; send every valid row.")] = False,
    max_rpm: Annotated[Optional[int], typer.Option(min=1, help="Requests per minute at most when the API sends no rate headers.")] = None,
    rate_limit_name: Annotated[Optional[str], typer.Option(help="Prefect global rate limit shared by all runs.")] = None,
    phone_region: Annotated[str, typer.Option(help="Region for phones without a country code.")] = settings.DEFAULT_PHONE_REGION,
    format: Annotated[Optional[Format], typer.Option("--format", help="Source format when the extension does not say.")] = None,
    delimiter: Annotated[Optional[str], typer.Option(help="CSV delimiter (detected when absent).")] = None,
    encoding: Annotated[str, typer.Option(help="Source text encoding.")] = "utf-8",
    query: Annotated[Optional[str], typer.Option(help="SQL query or table for database sources.")] = None,
    cursor_column: Annotated[Optional[str], typer.Option(help="Incremental SQL: read rows past the last confirmed value.")] = None,
) -> None:
    """Sync SOURCE into Apollo and report every row's outcome."""
    params = dict(
        source=source,
        base_url=base_url,
        labels=list(label or []),
        run_dedupe=not no_dedupe,
        chunk_size=chunk_size,
        concurrency=concurrency,
        timeout=timeout,
        dry_run=dry_run,
        report_dir=str(report_dir) if report_dir else None,
        state_dir=str(state_dir),
        state_url=state_url,
        mapping=str(mapping) if mapping else None,
        auth=auth.value,
        api_key_block=None if api_key else api_key_block,
        full_refresh=full_refresh,
        max_rpm=max_rpm,
        rate_limit_name=rate_limit_name,
        phone_region=phone_region.upper(),
        format=format.value if format else None,
        delimiter=delimiter,
        encoding=encoding,
        query=query,
        cursor_column=cursor_column,
    )
    preflight(params)
    if api_key:
        os.environ[settings.ENV_API_KEY] = api_key  # read by the flow at run time; never a flow parameter
    if not dry_run:
        check_api_key(params["api_key_block"])
    summary = run_flow(params)
    print_summary(summary)
    raise typer.Exit(exit_code_for(summary))


@app.command()
def demo(
    report_dir: Annotated[Path, typer.Option(help="Where the demo's report goes.")] = Path("apollo-sync-demo"),
) -> None:
    """Sync the bundled sample export into a local sandbox server, then sync it again: no key, no network."""
    from apollo_sync.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig()) as sandbox, tempfile.TemporaryDirectory(prefix="apollo-sync-demo-") as state:
        os.environ[settings.ENV_API_KEY] = sandbox.config.api_key
        out.print(f"[bold]apollo-sync demo[/]: sandbox at {sandbox.gateway_base_url}, source {SAMPLE_CSV.name}")
        params = dict(
            source=str(SAMPLE_CSV), base_url=sandbox.gateway_base_url, labels=["apollo-sync demo"],
            state_dir=state, report_dir=str(report_dir / "first-run"), api_key_block=None,
        )
        first = run_flow(params)
        print_summary(first, title="First run")
        second = run_flow({**params, "report_dir": str(report_dir / "second-run")})
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


def preflight(params: dict) -> None:
    """Open the source, read the mapping and check the columns, before Prefect starts; raises InputError."""
    from apollo_sync import transform
    from apollo_sync.sources import SourceOptions, read_source

    if params["mapping"] and not Path(params["mapping"]).is_file():
        raise InputError(f"mapping file not found: {params['mapping']}; pass an existing TOML file to --mapping")
    options = SourceOptions(
        format=params["format"], delimiter=params["delimiter"], encoding=params["encoding"], query=params["query"],
        cursor_column=params["cursor_column"],
    )
    source = read_source(params["source"], options)
    mapping = transform.load_mapping(params["mapping"]) if params["mapping"] else None
    transform.prepare(source.frame.head(0), mapping=mapping, phone_region=params["phone_region"])


def check_api_key(block_name: str | None) -> None:
    """Fail with one line (ConfigError, exit 2) before the flow starts when no key can be found.

    Inside the flow the same error would be logged by Prefect with a traceback.
    """
    if os.environ.get(settings.ENV_API_KEY):
        return
    from tasks.credentials import resolve_api_key

    asyncio.run(resolve_api_key(block_name))


def run_flow(params: dict) -> dict:
    """Run the flow in this process (on PREFECT_API_URL's server when set, else an ephemeral one)."""
    from flows.sync_contacts import sync_contacts

    return asyncio.run(sync_contacts(**params))


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
    for key in ("created", "existing", "unchanged", "would_send", "failed", "unconfirmed"):
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
