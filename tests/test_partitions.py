"""Partitioning (files of a glob, SQL key ranges, row ranges of one file) and merging the children's summaries."""

from __future__ import annotations

import sqlite3

import polars as pl
import pytest

from apollo_sync.errors import InputError
from apollo_sync.partitions import Partition, merge_summaries, plan_partitions, row_ranges, write_summary
from apollo_sync.report import summary_problems
from apollo_sync.sources import SourceOptions, read_source
from services import postgres  # noqa: F401 - fixture


def _csv(path, emails):
    path.write_text("email,first_name\n" + "".join(f"{e},N{i}\n" for i, e in enumerate(emails)), encoding="utf-8")
    return path


def _emails(partition: Partition) -> list[str]:
    src = read_source(partition.source, SourceOptions(query=partition.query))
    return src.frame.collect()["email"].to_list()


def test_a_glob_gives_one_partition_per_file_in_sorted_order(tmp_path):
    for name in ("b.csv", "a.csv", "c.csv"):
        _csv(tmp_path / name, [f"{name}@x.com"])
    parts = plan_partitions(str(tmp_path / "*.csv"))
    assert [p.label for p in parts] == ["a.csv", "b.csv", "c.csv"]
    assert [p.number for p in parts] == [0, 1, 2] and all(p.query is None for p in parts)


@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_sql_key_ranges_cover_every_row_exactly_once(tmp_path, n):
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (id INTEGER, email TEXT)")
        ids = [5, 5, 5, 9, 12, 13, 20, 21, 22, 40, None]  # repeated keys and a NULL key
        conn.executemany("INSERT INTO people VALUES (?, ?)", [(k, f"p{i}@x.com") for i, k in enumerate(ids)])
    parts = plan_partitions(f"sqlite:///{db}", query="people", partition_column="id", partitions=n)
    assert 1 <= len(parts) <= n
    seen = [e for p in parts for e in _emails(p)]
    assert sorted(seen) == sorted(f"p{i}@x.com" for i in range(len(ids)))
    if n == 4:
        assert len(parts) == 4 and max(len(_emails(p)) for p in parts) <= 4  # nearly equal sizes


def test_postgres_key_ranges_cover_every_row_exactly_once(postgres):  # noqa: F811
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS partition_people")
        conn.execute("CREATE TABLE partition_people (id NUMERIC, signed_up TIMESTAMPTZ, email TEXT)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO partition_people VALUES (%s, now() - make_interval(days => %s), %s)",
                            [(None if i == 7 else i * 1.5, i % 9, f"pg{i}@x.com") for i in range(50)])  # fmt: skip
    for column in ("id", "signed_up"):
        parts = plan_partitions(postgres.url, query="partition_people", partition_column=column, partitions=4)
        assert len(parts) == 4 and all(p.kind == "sql" for p in parts)
        seen = [e for p in parts for e in _emails(p)]
        assert sorted(seen) == sorted(f"pg{i}@x.com" for i in range(50)), column


def test_sql_text_keys_with_quotes_split_too(tmp_path):
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (k TEXT, email TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(f"o'k{i:02d}", f"q{i}@x.com") for i in range(10)])
    parts = plan_partitions(f"sqlite:///{db}", query="SELECT * FROM t;", partition_column="k", partitions=3)
    assert len(parts) == 3
    assert sorted(e for p in parts for e in _emails(p)) == sorted(f"q{i}@x.com" for i in range(10))


def test_a_bad_partition_column_is_an_input_error(tmp_path):
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (k INTEGER)")
    with pytest.raises(InputError, match="partition_column"):
        plan_partitions(f"sqlite:///{db}", query="t", partition_column="nope", partitions=2)
    with pytest.raises(InputError, match="partition_column"):
        plan_partitions(f"sqlite:///{db}", query="t", partitions=2)


def test_row_ranges_are_contiguous_and_balanced():
    assert row_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert row_ranges(2, 5) == [(0, 1), (1, 2)]  # never an empty range
    assert row_ranges(7, 1) == [(0, 7)]


def test_one_file_splits_in_row_ranges_that_keep_every_row(tmp_path):
    lines = "Email,First Name\n" + "".join(f"r{i}@x.com,N{i}\n" + ("\n" if i == 3 else "") for i in range(10))
    (tmp_path / "big.csv").write_text(lines, encoding="utf-8")  # a blank line is not a row
    parts = plan_partitions(str(tmp_path / "big.csv"), partitions=3, split_dir=tmp_path / "split")
    assert [p.label for p in parts] == ["rows 1-4 of big.csv", "rows 5-7 of big.csv", "rows 8-10 of big.csv"]
    frames = [read_source(p.source).frame.collect() for p in parts]
    assert [f.height for f in frames] == [4, 3, 3]
    assert pl.concat(frames)["Email"].to_list() == [f"r{i}@x.com" for i in range(10)]
    assert frames[1]["source_row"].to_list() == [1, 2, 3]  # each part counts its own rows


def test_what_cannot_be_partitioned_says_how(tmp_path):
    _csv(tmp_path / "one.csv", ["a@x.com"])
    with pytest.raises(InputError, match="partitions N"):
        plan_partitions(str(tmp_path / "one.csv"))
    with pytest.raises(InputError, match="split_dir"):
        plan_partitions(str(tmp_path / "one.csv"), partitions=2)
    with pytest.raises(InputError, match="only with sqlite"):
        plan_partitions(str(tmp_path / "*.csv"), query="x")
    with pytest.raises(InputError, match="s3://"):
        plan_partitions("s3://bucket/key.csv", partitions=2)
    with pytest.raises(InputError, match="1 to"):
        plan_partitions(str(tmp_path / "*.csv"), partitions=0)


def _child(rows_read, created, existing=0, dup=0, rejected=None, unchanged=0, requests=1, report="r", phones=(0, 0)):
    rejected = rejected or {}
    valid = rows_read - sum(rejected.values())
    summary = {"rows_read": rows_read, "rows_valid": valid, "rejected": rejected, "duplicates_in_source": dup,
               "created": created, "existing": existing, "failed": 0, "unconfirmed": 0, "unchanged": unchanged,
               "requests": requests, "retries": 0, "seconds": 9.9, "rate_limited": 1, "phones_dropped": sum(phones),
               "phones_dropped_by_reason": {"invalid": phones[0], "unparseable": phones[1]}, "unmapped_columns": ["zip"], "report_dir": report}  # fmt: skip
    assert not summary_problems(summary)
    return summary


def test_merged_summary_adds_counts_and_still_adds_up(tmp_path):
    parts = [Partition(i, f"f{i}.csv", f"f{i}.csv") for i in range(3)]
    children = [
        _child(10, 8, dup=2, report="a", phones=(3, 1)),
        _child(12, 5, existing=3, dup=1, rejected={"invalid_email": 2, "missing_identity": 1}, report="b", phones=(2, 0)),
        None,  # a failed child: listed, counted nowhere
    ]
    merged = merge_summaries(children, parts, seconds=3.21, extra={"report_dir": "/out"})
    assert not summary_problems(merged)
    assert (merged["rows_read"], merged["created"], merged["existing"], merged["duplicates_in_source"]) == (22, 13, 3, 3)
    assert merged["rejected"] == {"invalid_email": 2, "missing_identity": 1}
    assert merged["phones_dropped"] == 6 and merged["phones_dropped_by_reason"] == {"invalid": 5, "unparseable": 1}
    assert merged["rate_limited"] == 2 and merged["requests"] == 2 and merged["seconds"] == 3.21
    assert merged["unmapped_columns"] == ["zip"] and "would_send" not in merged
    assert [p["state"] for p in merged["partitions"]] == ["Completed", "Completed", "Failed"]
    assert merged["partitions_failed"] == 1 and merged["partitions"][1]["report_dir"] == "b"
    path = write_summary(tmp_path / "out", merged)
    assert path.name == "summary.json" and '"created": 13' in path.read_text()


def _flow_properties(entrypoint: str) -> set[str]:
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    return set(flow.parameters.model_dump_for_openapi()["properties"])


def test_the_parent_deployment_and_the_parameters_it_gives_children_are_known_to_their_flows(monkeypatch, tmp_path):
    import inspect

    import yaml

    from apollo_sync.params import sync_params
    from flows.sync_partitions import child_parameters, sync_partitions

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    deployments = {d["name"]: d for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]}
    parent, child = deployments["sync-partitions"], deployments["sync-contacts-partition"]
    assert set(parent["parameters"]) <= _flow_properties(parent["entrypoint"])
    child_props = _flow_properties(child["entrypoint"])
    assert parent["parameters"]["partitions"]["deployment"] == "sync-contacts/" + child["name"]
    assert not child["schedules"] and parent["work_pool"] == child["work_pool"]

    # the parent takes the child's groups (plus its own), and what it gives each kind of partition validates
    from flows.sync_contacts import sync_contacts

    assert set(child_props) < set(inspect.signature(sync_partitions.fn).parameters)
    params = sync_params(source="ignored.csv", format="csv", delimiter=";", encoding="latin-1", labels=["L"],
                         chunk_size=50, state_dir=str(tmp_path / "state"))  # fmt: skip
    for part in (Partition(0, "a.csv", "a", kind="file"), Partition(1, "sqlite:///x.db", "k", "SELECT 1", kind="sql"),
                 Partition(2, "p.parquet", "rows", kind="part")):  # fmt: skip
        given = child_parameters(part, params, tmp_path)
        assert set(given) <= child_props, part.kind
        child = sync_contacts.validate_parameters(given)
        assert child["run"].report_dir.endswith(f"partition-{part.number:03d}")
        assert (child["source"].path, child["apollo"].labels, child["load"].chunk_size) == (part.source, ["L"], 50)
        assert child["run"].state_dir == params.run.state_dir
    file_child = child_parameters(Partition(0, "a.csv", "a", kind="file"), params, tmp_path)["source"]
    assert (file_child["format"], file_child["delimiter"], file_child["encoding"]) == ("csv", ";", "latin-1")
    assert child_parameters(Partition(1, "sqlite:///x.db", "k", "SELECT 1", kind="sql"), params, tmp_path)["source"][
        "query"] == "SELECT 1"  # fmt: skip
    assert "format" not in child_parameters(Partition(2, "p.parquet", "r", kind="part"), params, tmp_path)["source"]


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_the_parent_fails_when_a_child_cannot_run_and_still_writes_the_merged_summary(tmp_path):
    import asyncio
    import json

    from flows.sync_partitions import PartitionsFailed, sync_partitions

    for name in ("a.csv", "b.csv"):
        _csv(tmp_path / name, [f"{name}@x.com"])
    report = tmp_path / "report"
    with pytest.raises(PartitionsFailed, match="2 of 2 partitions did not complete"):
        asyncio.run(sync_partitions(source=str(tmp_path / "*.csv"),
                                    partitions={"deployment": "sync-contacts/no-such-deployment", "poll_seconds": 0.1},
                                    run={"report_dir": str(report), "state_dir": str(tmp_path / "state")}))  # fmt: skip
    summary = json.loads((report / "summary.json").read_text())
    assert [p["state"] for p in summary["partitions"]] == ["Not run (ObjectNotFound)"] * 2
    assert summary["partitions_failed"] == 2 and summary["rows_read"] == 0 and not summary_problems(summary)
