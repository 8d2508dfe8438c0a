"""The Prefect project as a whole: prefect.yaml, the UI form of the flow's parameters, setup.py, the automation.

No server: entrypoints are imported the way `prefect deploy` imports them, and schemas are read off the Flow.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
AUTOMATION = ROOT / "deployments" / "automation-failed-contacts.yaml"


def _config() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _config()["deployments"]}


def _setup_module():
    spec = importlib.util.spec_from_file_location("apollo_sync_setup", ROOT / "deployments" / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _schema(deployment: str = "sync-contacts-adhoc") -> dict:
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = str(ROOT / _deployments()[deployment]["entrypoint"])
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    return flow.parameters.model_dump_for_openapi()


@pytest.mark.parametrize("name", ["sync-contacts-nightly", "sync-contacts-adhoc"])
def test_every_entrypoint_imports_and_is_the_sync_flow(name, monkeypatch):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # `prefect deploy` runs from the clone; entrypoints are relative to it
    # no placeholder: `prefect deploy` would fall back to one built from the source text when the import fails,
    # and deploy a form without titles or the defaults that come from settings
    flow = load_flow_from_entrypoint(_deployments()[name]["entrypoint"], use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    assert flow.name == "sync-contacts"
    assert flow.isasync


def test_deployments_share_one_process_pool_and_only_nightly_is_scheduled():
    config = _config()
    pools = config["definitions"]["work_pools"]
    assert len(pools) == 1
    (pool,) = pools.values()
    deployments = _deployments()
    assert set(deployments) == {"sync-contacts-nightly", "sync-contacts-adhoc", "sync-contacts-partition", "sync-partitions"}
    assert all(d["work_pool"] == pool for d in deployments.values())  # the YAML anchor, not a copy

    nightly, adhoc = deployments["sync-contacts-nightly"], deployments["sync-contacts-adhoc"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] and schedule["active"] is False
    assert nightly["concurrency_limit"]["limit"] == 1
    assert nightly["parameters"]["source"]["path"]
    assert not adhoc["schedules"]
    assert "source" not in adhoc["parameters"]  # asked for at each run


def _run_steps(steps: list[dict], outputs: dict | None = None) -> dict:
    """Run prefect.yaml steps as Prefect's ``run_steps`` does (templating from earlier outputs and the
    environment, outputs kept under each step's id), minus its API client: these steps reference no block or
    variable, which is all the client would resolve."""
    import asyncio
    import inspect

    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values, find_placeholders

    outputs = dict(outputs or {})
    for step in steps:
        ((name, inputs),) = step.items()
        assert not [p for p in find_placeholders(inputs) if p.name.startswith("prefect.")], step
        inputs = apply_values(apply_values(dict(inputs), outputs), dict(os.environ))
        step_id = inputs.pop("id", None)
        result = import_object(name)(**inputs)
        result = asyncio.run(result) if inspect.iscoroutine(result) else result
        outputs |= result | ({step_id: result} if step_id else {})
    return outputs


def test_runs_go_to_the_clone_prefect_deploy_ran_in_unless_the_worker_names_another(tmp_path, monkeypatch):
    """The build step records the directory `prefect deploy` runs in; at run time the pull steps change into it,
    or into APOLLO_SYNC_HOME from the worker's environment, and stop with one line where there is no clone."""
    from prefect.utilities.templating import apply_values

    config = _config()
    clone, other, workspace = tmp_path / "clone", tmp_path / "other", tmp_path / "workspace"
    for root in (clone, other):
        (root / "flows").mkdir(parents=True)
        (root / "flows" / "sync_contacts.py").write_text("", encoding="utf-8")
    workspace.mkdir()
    monkeypatch.delenv("APOLLO_SYNC_HOME", raising=False)

    monkeypatch.chdir(clone)  # `prefect deploy` from the clone
    recorded = apply_values(config["pull"], _run_steps(config["build"]), remove_notset=False)  # as `prefect deploy` stores them
    assert str(clone.resolve()) in str(recorded) and "{{ clone.stdout }}" in str(recorded)

    def run_in() -> Path:
        monkeypatch.chdir(workspace)  # a worker starts each run in a fresh temporary directory
        _run_steps(recorded)
        return Path.cwd()

    assert run_in() == clone.resolve()
    monkeypatch.setenv("APOLLO_SYNC_HOME", str(other))
    assert run_in() == other.resolve()
    monkeypatch.setenv("APOLLO_SYNC_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="no clone at .*nowhere.*set APOLLO_SYNC_HOME"):
        run_in()

    monkeypatch.chdir(other)  # APOLLO_SYNC_HOME set for `prefect deploy` is what it records
    monkeypatch.setenv("APOLLO_SYNC_HOME", str(clone))
    assert _run_steps(config["build"])["deployed-from"]["stdout"] == str(clone)


def test_no_parameter_in_prefect_yaml_is_unknown_to_the_flow_and_each_validates(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    for deployment in _deployments().values():
        flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        schema = flow.parameters.model_dump_for_openapi()
        assert set(deployment["parameters"]) <= set(schema["properties"]), deployment["name"]
        for group, values in deployment["parameters"].items():  # every nested key is a field of its group
            definition = schema["definitions"][schema["properties"][group]["$ref"].rsplit("/", 1)[-1]]
            assert set(values) <= set(definition["properties"]), (deployment["name"], group)
        given = {"source": "x.csv"} | deployment["parameters"]
        flow.validate_parameters(given)  # a deployment whose defaults the flow refuses could never run


def _definition(schema: dict, group: str) -> dict:
    return schema["definitions"][schema["properties"][group]["$ref"].rsplit("/", 1)[-1]]


@pytest.mark.parametrize("deployment", ["sync-contacts-adhoc", "sync-partitions"])
def test_parameter_form_is_a_few_titled_groups_with_titled_fields_enums_and_bounds(deployment):
    from apollo_sync.params import RUN_GROUPS

    schema = _schema(deployment)
    properties = schema["properties"]
    assert schema["required"] == ["source"]
    assert set(RUN_GROUPS) <= set(properties) and len(properties) <= 8  # sections; partitions adds one
    assert list(properties)[0] == "source"
    for group, prop in properties.items():
        # Prefect sets the title to the parameter name and overwrites Field(title=...); a human title needs
        # Field(json_schema_extra={"title": ...}), which survives (checked on 3.9.1)
        assert prop.get("title") and prop["title"] != group, f"{group} has no title of its own"
        definition = _definition(schema, group)
        assert definition.get("description"), f"{group} has no description"
        for name, field in definition["properties"].items():
            assert field.get("title") and field.get("description"), f"{group}.{name}"
            assert "anyOf" not in field, f"{group}.{name} would show a type picker in the form"
    apollo, load = _definition(schema, "apollo")["properties"], _definition(schema, "load")["properties"]
    assert schema["definitions"]["Auth"]["enum"] == ["auto", "bearer", "x-api-key"]  # a dropdown
    assert schema["definitions"]["Format"]["enum"][0] == "auto"
    assert (load["chunk_size"]["minimum"], load["chunk_size"]["maximum"]) == (1, 100)
    assert (load["concurrency"]["minimum"], load["concurrency"]["maximum"]) == (1, 32)
    assert load["chunk_size"]["default"] == 100
    assert apollo["api_key_block"]["default"] == "apollo-api-key"
    assert apollo["base_url"]["default"].startswith("https://")
    every_field = {name for group in properties for name in _definition(schema, group)["properties"]}
    assert "api_key" not in every_field  # the key is never a parameter: it would be stored on the flow run


def test_out_of_range_parameters_are_refused_before_the_run_starts():
    from prefect.exceptions import ParameterTypeError
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(ROOT / "flows" / "sync_contacts.py") + ":sync_contacts", use_placeholder_flow=False)
    validated = flow.validate_parameters({"source": "x.csv", "load": {"chunk_size": "50"}})
    assert validated["load"].chunk_size == 50 and validated["source"].path == "x.csv"
    assert flow.validate_parameters({"source": {"path": "x.csv", "delimiter": ""}})["source"].delimiter is None
    for bad in ({"load": {"chunk_size": 101}}, {"load": {"concurrency": 0}}, {"apollo": {"auth": "basic"}},
                {"apollo": {"base_url": "ftp://x"}}, {"load": {"chunk_sise": 10}}):  # fmt: skip
        with pytest.raises(ParameterTypeError):
            flow.validate_parameters({"source": "x.csv", **bad})


def test_setup_reads_the_pool_name_from_prefect_yaml():
    setup = _setup_module()
    (pool,) = _config()["definitions"]["work_pools"].values()
    assert setup.pool_name_from(PREFECT_YAML) == pool["name"]


def test_setup_check_looks_for_the_rate_limits_the_deployments_use_and_changes_nothing():
    setup = _setup_module()
    assert setup.rate_limits_from(PREFECT_YAML) == {"apollo-sync-rate": ["sync-partitions"]}
    with pytest.raises(SystemExit) as exit_:  # refused before connecting: --check never writes
        setup.main(["--check", "--save-key"])
    assert exit_.value.code == 2


def test_setup_rate_limit_refills_at_the_requested_rate():
    setup = _setup_module()
    assert setup.rate_limit_for(60) == setup.RateLimit("apollo-sync-rate", limit=1, per_second=1.0)
    rate = setup.rate_limit_for(600, "shared")
    assert (rate.name, rate.limit, rate.per_second) == ("shared", 10, 10.0)
    assert setup.rate_limit_for(30).limit == 1
    with pytest.raises(setup.SetupError):
        setup.rate_limit_for(0)


def test_setup_without_the_key_in_the_environment_refuses_save_key(capsys):
    setup = _setup_module()
    assert setup.main(["--save-key"]) == 2  # no server needed: it stops before connecting
    assert "APOLLO_API_KEY" in capsys.readouterr().err


def test_example_automation_is_a_valid_automation_on_the_run_event():
    from prefect.events.schemas.automations import AutomationCore

    from tasks.artifacts import RUN_COMPLETED_EVENT, RUN_RESOURCE_PREFIX

    data = yaml.safe_load(AUTOMATION.read_text(encoding="utf-8"))
    automation = AutomationCore.model_validate(data)
    trigger = automation.trigger
    assert RUN_COMPLETED_EVENT in trigger.expect
    assert trigger.match.root["prefect.resource.id"] == f"{RUN_RESOURCE_PREFIX}*"
    assert trigger.match.root["apollo-sync.has-failures"] == "true"


@pytest.mark.parametrize("deployment", ["sync-contacts-adhoc", "sync-partitions"])
def test_grouped_json_passes_the_servers_schema_check_and_validates_back_to_the_same_settings(deployment):
    """A Prefect server checks a deployment run's parameters against the form's schema, which has no null: what
    the e2e tests, the partition parent and the docs send must pass it, unset and cleared fields included."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.schema_tools import validate

    from apollo_sync.params import sync_params

    flow = load_flow_from_entrypoint(str(ROOT / _deployments()[deployment]["entrypoint"]), use_placeholder_flow=False)
    schema = flow.parameters.model_dump_for_openapi()
    for settings in (sync_params(source="x.csv"),
                     sync_params(source="x.csv", api_key_block=None, max_rpm=5, delimiter=";", labels=["a"])):  # fmt: skip
        given = settings.as_json()
        validate(given, schema, raise_on_error=True, preprocess=True, ignore_required=False)
        validated = flow.validate_parameters(given)
        assert {group: validated[group] for group in given} == {group: getattr(settings, group) for group in given}
    # What Prefect's run form sends for an optional text field left as it loads: null. The schema gives such a
    # field no default (a null default made the server refuse the form's own submission), and null passes.
    source = schema["definitions"]["SourceParams"]["properties"]
    assert "default" not in source["query"] and "default" not in source["delimiter"]
    sent = {"source": {"path": "x.csv", "query": None, "delimiter": None}}
    validate(sent, schema, raise_on_error=True, preprocess=True)
    assert flow.validate_parameters(sent)["source"].query is None


@pytest.mark.parametrize("deployment", ["sync-contacts-adhoc", "sync-partitions"])
def test_a_group_given_to_a_deployment_run_keeps_the_deployments_other_fields_of_it(deployment):
    """The server merges a run's parameters into the deployment's by top-level name, so ``load={"chunk_size": 10}``
    arrives without the deployment's ``load``; the flow puts the deployment's fields under the ones given."""
    from prefect.flows import load_flow_from_entrypoint

    from apollo_sync.params import SyncParams

    flow = load_flow_from_entrypoint(str(ROOT / _deployments()[deployment]["entrypoint"]), use_placeholder_flow=False)
    saved = {"source": {"path": "saved.csv", "delimiter": ";"},
             "load": {"rate_limit_name": "shared-rate", "concurrency": 2, "timeout": {"__prefect_kind": "jinja"}},
             "apollo": {"api_key_block": "team-key", "labels": ["nightly"]}}  # fmt: skip
    given = flow.validate_parameters({"source": "given.csv", "load": {"chunk_size": 10, "concurrency": 3},
                                      "apollo": {"api_key_block": ""}})  # fmt: skip
    params = SyncParams(**{g: given[g] for g in ("source", "cleaning", "apollo", "load", "run")}).over(saved)
    assert (params.load.chunk_size, params.load.concurrency, params.load.rate_limit_name) == (10, 3, "shared-rate")
    assert params.load.timeout == given["load"].timeout  # a template still to hydrate is not taken
    assert (params.source.path, params.source.delimiter) == ("given.csv", ";")
    assert params.apollo.api_key_block is None and params.apollo.labels == ["nightly"]  # "" clears a saved field
    assert SyncParams(source="x.csv").over({}) == SyncParams(source="x.csv")
