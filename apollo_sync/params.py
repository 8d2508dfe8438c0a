"""The one definition of a run's settings, in groups: used by both flows, the CLI and prefect.yaml.

A run of ``sync-contacts`` takes five groups, each a frozen pydantic model:

=============== ====================================================================================
``source``      where the contacts come from and how to read them (:class:`SourceParams`)
``cleaning``    the mapping file and the default phone region (:class:`CleaningParams`)
``apollo``      where they go: base URL, auth, the Secret block with the key, labels, dedupe
``load``        how they are sent: chunk size, concurrency, timeout, rate caps (:class:`LoadParams`)
``run``         create or upsert, dry run, full refresh, where the ledger and report live (:class:`RunParams`)
=============== ====================================================================================

``sync-partitions`` takes the same groups plus :class:`PartitionParams`. The Prefect run form shows each group as
one section (field titles and descriptions come from here, enums are dropdowns); ``apollo-sync run`` builds its
flags from the same fields (``apollo_sync.cli``), so a setting is declared once. A plain string is accepted
for ``source`` (``sync_contacts(source="contacts.csv")``), and an empty text field means "not set", as the UI
sends it.

No secret is a parameter: Prefect stores flow-run parameters. The API key comes from the Secret block named in
``apollo.api_key_block`` or from the environment at run time.
"""

from __future__ import annotations

import typing
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from apollo_sync import settings
from apollo_sync.redact import NO_SECRET_PATTERN, redact_url, secret_in_url


def _plain_optionals(schema: dict[str, Any]) -> None:
    """Show ``X | None`` fields as plain X inputs in the Prefect form (an empty input means "not set").

    Pydantic writes them as ``anyOf: [X, null]``, which the form renders as a type picker beside every field.
    """
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf")
        if not options:
            continue
        kept = [option for option in options if option.get("type") != "null"]
        if len(kept) == 1 and len(kept) < len(options):
            del prop["anyOf"]
            prop.update(kept[0])
            if prop.get("default", ...) is None:
                # a null default in a string field: Prefect's form fills it in and the server refuses null
                del prop["default"]


NO_SECRET = {"pattern": NO_SECRET_PATTERN}
"""``json_schema_extra`` of a URL setting: the run form and the Prefect server refuse a URL with a secret in it."""


def _refuse_secret(value: str | None, where_it_belongs: str) -> str | None:
    """``value`` unless it is a URL with a password or a signed query: Prefect stores every run setting (flow-run
    parameters, run names, events), so a secret must come from elsewhere at run time."""
    if value is not None and (found := secret_in_url(value)):
        raise ValueError(f"holds {found}; Prefect stores run settings, so {where_it_belongs}")
    return value


def _unhydrated(value: Any) -> bool:
    return isinstance(value, dict) and "__prefect_kind" in value


class Group(BaseModel):
    """Base of every settings group: frozen, unknown keys refused, "" read as "not set" for optional text."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra=_plain_optionals, hide_input_in_errors=True
    )  # a refused value may be a URL with a password: errors name the field, never echo the value

    @model_validator(mode="before")
    @classmethod
    def _empty_text_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if type(None) in typing.get_args(f.annotation)}
        return {k: (None if k in optional and isinstance(v, str) and not v.strip() else v) for k, v in data.items()}

    def over(self, saved: Any) -> Group:
        """This group, with the fields it was not given taken from ``saved`` (a deployment's value for it).

        A Prefect server merges a run's parameters into its deployment's by top-level name only, so a run given
        ``load={"chunk_size": 10}`` would otherwise drop the deployment's ``load.rate_limit_name``. A value
        still to be hydrated (a ``{{ prefect.variables.x }}`` template) is not taken.
        """
        if isinstance(saved, str) and "path" in type(self).model_fields:
            saved = {"path": saved}
        if not isinstance(saved, dict):
            return self
        kept = {k: v for k, v in saved.items() if k in type(self).model_fields and not _unhydrated(v)}
        return type(self).model_validate(kept | self.model_dump(include=self.model_fields_set))

    def as_json(self) -> dict[str, Any]:
        """This group as a Prefect server accepts it for a deployment run. The form's schema has no null (see
        ``_plain_optionals``), so a field left unset is left out and a text field set to None is ``""``."""
        values = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                if type(self).model_fields[name].default is None:
                    continue
                value = ""
            values[name] = value
        return values


class Format(str, Enum):
    """A source format; ``auto`` reads it from the file extension."""

    auto = "auto"
    csv = "csv"
    tsv = "tsv"
    parquet = "parquet"
    json = "json"
    ndjson = "ndjson"
    xlsx = "xlsx"


class Auth(str, Enum):
    """How the key is sent; ``auto`` follows the host (Bearer for the gateway, X-Api-Key for Apollo direct)."""

    auto = "auto"
    bearer = "bearer"
    x_api_key = "x-api-key"


class SourceParams(Group):
    """Where the contacts come from and how to read them."""

    model_config = ConfigDict(title="Source settings")

    path: str = Field(
        min_length=1,
        title="Path or URL",
        description="A file or glob (csv, tsv, parquet, json, ndjson, xlsx), sqlite:///file.db or postgresql://… "
        "with a query, or an s3:// or https:// URL. No password or signed URL: Prefect stores run settings.",
        json_schema_extra=NO_SECRET,
    )
    format: Format = Field(Format.auto, title="File format", description="The file format, when the extension does not say it.")
    delimiter: str | None = Field(
        None, min_length=1, max_length=3, title="CSV delimiter", description="One character (or tab); detected when empty."
    )
    encoding: str = Field("utf-8", min_length=1, title="Encoding", description="utf-8, utf-8-sig, latin-1, cp1252, utf-16…")
    query: str | None = Field(None, title="SQL query or table", description="For sqlite:/// and postgresql:// sources.")
    cursor_column: str | None = Field(
        None,
        title="Incremental cursor column",
        description="For SQL sources: read only rows past the last confirmed value of this column.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("path")
    @classmethod
    def _no_secret_in_path(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme.startswith("postgres"):
            belongs = "give the URL without it and put the password in PGPASSWORD or ~/.pgpass"
        else:
            belongs = ("use s3://bucket/key with AWS credentials in the environment (AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY), or a local copy of the file")  # fmt: skip
        return _refuse_secret(value, belongs)  # type: ignore[return-value]


class CleaningParams(Group):
    """How source columns become Apollo fields."""

    model_config = ConfigDict(title="Cleaning settings")

    mapping: str | None = Field(
        None,
        title="Mapping file (TOML)",
        description="Source columns to Apollo fields, custom fields, constants; headers are auto-mapped without it.",
    )
    phone_region: str = Field(
        settings.DEFAULT_PHONE_REGION,
        min_length=2,
        max_length=2,
        title="Default phone region",
        description="Region for phones written without a country code (ISO code: US, GB, DE…).",
    )

    @field_validator("phone_region")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


class ApolloParams(Group):
    """Where the contacts go, and what Apollo does with them."""

    model_config = ConfigDict(title="Apollo settings")

    base_url: str = Field(
        settings.GATEWAY_BASE_URL,
        title="Base URL",
        description=f"The AISA gateway (default) or Apollo direct ({settings.APOLLO_BASE_URL}).",
        json_schema_extra=NO_SECRET,
    )
    auth: Auth = Field(Auth.auto, title="Auth header", description="auto follows the host.")
    api_key_block: str | None = Field(
        settings.DEFAULT_SECRET_BLOCK,
        title="Secret block with the API key",
        description=f"Used when it exists; else the {settings.ENV_API_KEY} environment variable.",
    )
    labels: list[str] = Field(
        default_factory=list, title="Labels", description="Label (list) names added to every contact created."
    )
    run_dedupe: bool = Field(
        True,
        title="Server-side dedupe",
        description="Apollo returns contacts it already has instead of creating duplicates. Retries after an "
        "unknown outcome always dedupe.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {redact_url(value)!r}")
        if not urlsplit(value).hostname:
            raise ValueError(f"has no host: {redact_url(value)!r}; give e.g. {settings.GATEWAY_BASE_URL}")
        belongs = f"give it without credentials: the key comes from a Secret block or {settings.ENV_API_KEY}"
        return _refuse_secret(value, belongs)  # type: ignore[return-value]

    @field_validator("labels")
    @classmethod
    def _labels_named(cls, value: list[str]) -> list[str]:
        labels = [label.strip() for label in value]
        if any(not label for label in labels):
            raise ValueError("an empty label: give each --label a name")
        return list(dict.fromkeys(labels))


class LoadParams(Group):
    """How the contacts are sent."""

    model_config = ConfigDict(title="Load settings")

    chunk_size: int = Field(
        settings.DEFAULT_CHUNK_SIZE,
        ge=1,
        le=settings.MAX_CONTACTS_PER_REQUEST,
        title="Contacts per request",
        description=f"Apollo takes at most {settings.MAX_CONTACTS_PER_REQUEST}.",
    )
    concurrency: int = Field(
        settings.DEFAULT_CONCURRENCY, ge=1, le=32, title="Requests in flight", description="All share one rate budget."
    )
    timeout: float = Field(
        settings.DEFAULT_TIMEOUT_SECONDS, gt=0, le=600, title="Request timeout (s)", description="Seconds to wait for one answer."
    )
    max_rpm: int | None = Field(
        None, ge=1, title="Max requests per minute", description="A cap for APIs that send no rate headers."
    )
    rate_limit_name: str | None = Field(
        None,
        title="Shared rate limit (Prefect)",
        description="A Prefect global concurrency limit with slot decay, shared by every run and worker.",
    )


class Mode(str, Enum):
    """``create``: new contacts through Bulk Create; a contact Apollo already has is left as it is. ``upsert``:
    also update, through Bulk Update, contacts that changed and contacts Apollo already had (non-empty source
    fields only; labels only added)."""

    create = "create"
    upsert = "upsert"


class RunParams(Group):
    """What kind of run, and where its memory and report live."""

    model_config = ConfigDict(title="Run settings")

    mode: Mode = Field(
        Mode.create,
        title="Sync mode",
        description="create: only add new contacts. upsert: also update changed and already-existing contacts "
        "(never blanks a field, never removes a label).",
    )
    dry_run: bool = Field(False, title="Dry run", description="Read, clean and plan only; send nothing, need no key.")
    full_refresh: bool = Field(
        False, title="Full refresh", description="Ignore the ledger and send every valid row (dedupe still guards)."
    )
    state_dir: str = Field(
        settings.DEFAULT_STATE_DIR,
        min_length=1,
        title="State directory",
        description="Where the sync ledger lives; a re-run with the same one sends only what changed.",
    )
    state_url: str | None = Field(
        None,
        title="Shared ledger (postgresql:// URL)",
        description="A ledger shared by several workers instead of the one in the state directory (password in "
        "PGPASSWORD or ~/.pgpass, not here).",
        json_schema_extra=NO_SECRET,
    )
    report_dir: str | None = Field(
        None, title="Report directory", description="Where summary.json and the results go (default: under the state directory)."
    )
    parent_partition: str | None = Field(
        None,
        pattern=r"^[^\s:]+:[0-9]+$",
        title="Partition of a sync-partitions run",
        description="Set by sync-partitions for each child (<parent run id>:<partition number>), so rows whose "
        "contact another partition sends are reported as duplicate; leave it empty.",
    )

    @field_validator("state_url")
    @classmethod
    def _shared_ledger_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if urlsplit(value).scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"must be a postgresql:// URL, got {redact_url(value)!r}")
        return _refuse_secret(value, "give the URL without it and put the password in PGPASSWORD or ~/.pgpass")


class PartitionParams(Group):
    """How ``sync-partitions`` splits the source and runs its children."""

    model_config = ConfigDict(title="Partitions settings")

    partitions: int | None = Field(
        None, ge=1, le=1000, title="Partitions", description="Key ranges (SQL) or row ranges (one file); a glob ignores it."
    )
    partition_column: str | None = Field(
        None, title="Partition column (SQL)", description="Any orderable column; NULLs go to the first partition."
    )
    deployment: str = Field(
        "sync-contacts/sync-contacts-partition",
        min_length=1,
        title="Child deployment",
        description="A sync-contacts deployment on the work pool.",
    )
    max_in_flight: int = Field(
        2, ge=1, le=100, title="Child runs at once", description="The shared rate limit bounds requests, not this."
    )
    split_dir: str | None = Field(
        None,
        title="Directory for row-range parts",
        description="Every worker must read it (default: under the report directory).",
    )
    # 1 s (5 s before): a partition waiting for a free slot leaves the shared budget idle until the parent looks.
    poll_seconds: float = Field(
        1.0, gt=0, le=60, title="Poll interval (s)",
        description="How often the parent checks whether a child finished: the next partition waits that long.",
    )


class SyncParams(BaseModel):
    """Every setting of one ``sync-contacts`` run: the five groups."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    source: SourceParams
    cleaning: CleaningParams = CleaningParams()
    apollo: ApolloParams = ApolloParams()
    load: LoadParams = LoadParams()
    run: RunParams = RunParams()

    def over(self, saved: dict[str, Any]) -> SyncParams:
        """Each group over its value in ``saved`` (a deployment's parameters): see :meth:`Group.over`."""
        return SyncParams(**{group: getattr(self, group).over(saved.get(group)) for group in RUN_GROUPS})

    def as_json(self) -> dict[str, dict[str, Any]]:
        """Every group as JSON for a deployment run (``Group.as_json``): ``--params``, ``run_deployment``."""
        return {group: getattr(self, group).as_json() for group in RUN_GROUPS}


RUN_GROUPS: dict[str, type[Group]] = {
    "source": SourceParams,
    "cleaning": CleaningParams,
    "apollo": ApolloParams,
    "load": LoadParams,
    "run": RunParams,
}
"""The groups of :class:`SyncParams` by parameter name, in the order the form and ``--help`` show them."""


def ui_form(title: str, description: str | None = None) -> Any:
    """A top-level flow parameter's title in the Prefect form (Prefect titles parameters by their name and
    overwrites ``Field(title=...)``; a title given through ``json_schema_extra`` survives, checked on 3.9).

    Pydantic leaves out a title equal to the referenced model's own, so the groups are titled "<name> settings"
    and their parameters "<name>".
    """
    extra = {"title": title} | ({"description": description} if description else {})
    return Field(json_schema_extra=extra)


FIELD_GROUPS: dict[str, tuple[str, str]] = {
    ("source" if (group, name) == ("source", "path") else name): (group, name)
    for group, model in RUN_GROUPS.items()
    for name in model.model_fields
}
"""Each setting's flat name (as ``apollo-sync run`` flags and Python keywords spell it) -> (group, field).
``source.path`` is plainly ``source``; every other field name is unique across the groups."""


def sync_params(**fields: Any) -> SyncParams:
    """Settings from flat names: ``sync_params(source="x.csv", base_url=..., dry_run=True)``.

    Unknown names raise ``TypeError`` naming them; values are validated by the groups (``ValidationError``).
    """
    unknown = sorted(set(fields) - set(FIELD_GROUPS))
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
    groups: dict[str, dict[str, Any]] = {group: {} for group in RUN_GROUPS}
    for flat, value in fields.items():
        group, name = FIELD_GROUPS[flat]
        groups[group][name] = value
    return SyncParams(**{group: values for group, values in groups.items() if values or group == "source"})


def flow_parameters(params: SyncParams) -> dict[str, Group]:
    """The keyword arguments of the ``sync-contacts`` flow for ``params`` (one per group)."""
    return {group: getattr(params, group) for group in RUN_GROUPS}
