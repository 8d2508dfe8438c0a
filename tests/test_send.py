"""The sending side's shapes: how a run's chunks are grouped, its hold on the garbage collector, its first part."""

from __future__ import annotations

import gc

import polars as pl
import pytest

from apollo_sync import settings
from apollo_sync.clean import EngineOptions, prepare
from apollo_sync.load import ApolloClient, LoadConfig, LoadSession, Pacer
from apollo_sync.processes import RUN_GC_THRESHOLDS, run_gc
from apollo_sync.send import cut_groups


def _rows(n: int) -> pl.DataFrame:
    emails = [f"c{i}@x.io" for i in range(n)]
    return pl.DataFrame({"source_row": list(range(1, n + 1)), "identity": emails, "email": emails,
                         "payload": [f'{{"email":"{e}"}}' for e in emails]})  # fmt: skip


def test_groups_are_whole_numbered_on_across_parts_every_chunk_once_in_order():
    session = LoadSession(ApolloClient("http://127.0.0.1:9/apis/v1/apollo", "k"), Pacer(), None,
                          LoadConfig("t", concurrency=4, chunk_size=10))  # fmt: skip
    per = settings.CHUNKS_PER_LOAD_TASK
    groups = cut_groups(session, _rows(10 * 250))  # 250 chunks
    assert [len(g.chunks) for g in groups] == [per, per, 250 - 2 * per]
    assert [g.number for g in groups] == list(range(len(groups)))
    assert [chunk.number for g in groups for chunk in g.chunks] == list(range(250))
    # A later part's groups are numbered on from the run's groups so far, its chunks from the chunks so far.
    later = cut_groups(session, _rows(10 * 50), first=len(groups))
    assert [len(g.chunks) for g in later] == [50]
    assert later[0].number == len(groups) and later[0].chunks[0].number == 250


def test_a_run_holds_the_objects_alive_at_its_start_and_gives_them_back():
    assert gc.get_freeze_count() == 0
    alive = [object() for _ in range(1000)]
    with run_gc():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0


def test_a_run_leaves_a_process_that_froze_its_own_objects_alone(monkeypatch):
    # (the real count moves as frozen objects die, so the calls are what is checked)
    calls: list[str] = []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 1000)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    with run_gc():
        pass
    assert calls == []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 0)
    with run_gc():
        assert calls == ["freeze"]
    assert calls == ["freeze", "unfreeze"]


@pytest.fixture
def gc_thresholds():
    own = gc.get_threshold()
    yield own
    gc.set_threshold(*own)
    gc.enable()


def test_a_run_raises_the_collectors_thresholds_and_gives_the_processs_own_back(gc_thresholds):
    gc.set_threshold(700, 10, 10)
    with run_gc():
        assert gc.get_threshold() == RUN_GC_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)
    gc.set_threshold(50_000, 5, 10)  # a caller's higher threshold is kept, a lower one raised
    with run_gc():
        assert gc.get_threshold() == (50_000, RUN_GC_THRESHOLDS[1], 10)
    assert gc.get_threshold() == (50_000, 5, 10)


def test_overlapping_runs_give_the_settings_back_once_the_last_one_ends(gc_thresholds):
    gc.set_threshold(700, 10, 10)
    first, second = run_gc(), run_gc()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still sends
    assert gc.get_threshold() == RUN_GC_THRESHOLDS and gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0


def test_a_run_leaves_a_disabled_collector_alone(gc_thresholds):
    gc.set_threshold(700, 10, 10)
    gc.disable()
    with run_gc():
        assert gc.get_threshold() == (700, 10, 10) and not gc.isenabled()
    assert not gc.isenabled()


def test_a_sending_runs_first_part_is_a_few_thousand_rows_however_large_the_source(tmp_path):
    n = 30_000
    source = pl.DataFrame({"Email": [f"c{i}@x.io" for i in range(n)], "First Name": ["Ann"] * n}).lazy()
    parts: list[int] = []
    prepared = prepare(source, out_dir=tmp_path / "parts", on_ready=lambda part: parts.append(part.height))
    assert parts[0] == EngineOptions().first_batch_rows < n and sum(parts) == prepared.contacts_count == n


def test_the_next_part_is_planned_only_once_the_first_request_is_out(sandbox, tmp_path, monkeypatch):
    # Two parts (2,000 rows, then the rest): the first group's claim goes first, then the first request, and only
    # then the second part's plan, which would otherwise compete with that claim for the ledger and the CPU.
    import asyncio
    import dataclasses

    from apollo_sync.ledger.sqlite import SQLiteLedger
    from apollo_sync.load.client import ApolloClient as Client
    from apollo_sync.params import sync_params
    from apollo_sync.settings import ENV_API_KEY
    from apollo_sync.sync import PLAIN_STEPS, run_sync

    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    n = EngineOptions().first_batch_rows + 700
    path = tmp_path / "contacts.csv"
    pl.DataFrame({"Email": [f"c{i}@x.io" for i in range(n)], "First Name": ["Ann"] * n}).write_csv(path)
    events: list[str] = []
    claim, bulk_create = SQLiteLedger.claim, Client.bulk_create

    def claiming(self, *args, **kwargs):
        result = claim(self, *args, **kwargs)
        events.append("claim")
        return result

    async def sending(self, *args, **kwargs):
        events.append("request")
        return await bulk_create(self, *args, **kwargs)

    async def planning(*args, **kwargs):
        events.append(f"plan {args[3]}")
        return await PLAIN_STEPS.plan(*args, **kwargs)

    monkeypatch.setattr(SQLiteLedger, "claim", claiming)
    monkeypatch.setattr(Client, "bulk_create", sending)
    params = sync_params(source=str(path), base_url=sandbox.gateway_base_url, state_dir=str(tmp_path / "state"))
    summary = asyncio.run(run_sync(params, steps=dataclasses.replace(PLAIN_STEPS, plan=planning)))
    # (More requests may go before the second plan starts: the stream wakes a few loop turns after the first.)
    firsts = sorted(["plan 0", "claim", "request", "plan 1"], key=events.index)
    assert summary["created"] == n and firsts == ["plan 0", "claim", "request", "plan 1"]
    # The figure is the first request's moment, after the run started and within the run.
    assert 0 < summary["first_request_seconds"] < summary["seconds"]


def test_clients_share_one_tls_context_per_set_of_trust_variables(tmp_path, monkeypatch):
    import shutil

    import certifi

    from apollo_sync.load.client import tls_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first, second = ApolloClient("https://a.example/api/v1", "k"), ApolloClient("http://127.0.0.1:9/x", "k")
    assert first._http._transport._pool._ssl_context is tls_context() is second._http._transport._pool._ssl_context
    # Pointing SSL_CERT_FILE elsewhere gives a context built from that file, not the cached one.
    bundle = shutil.copy(certifi.where(), tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert tls_context() is not first._http._transport._pool._ssl_context
    assert ApolloClient("https://a.example/api/v1", "k")._http._transport._pool._ssl_context is tls_context()


def test_sending_goes_on_while_the_progress_display_is_busy(sandbox, tmp_path, monkeypatch):
    # One request in flight at a time, and a progress display that answers only once every request has been made:
    # were a chunk's worker to wait for the display (an API call in the flow), the run would never finish.
    import asyncio
    import dataclasses

    from apollo_sync.load.client import ApolloClient as Client
    from apollo_sync.params import sync_params
    from apollo_sync.settings import ENV_API_KEY
    from apollo_sync.sync import PLAIN_STEPS, run_sync

    monkeypatch.setenv(ENV_API_KEY, sandbox.config.api_key)
    n, size = 50, 5
    path = tmp_path / "contacts.csv"
    pl.DataFrame({"Email": [f"c{i}@x.io" for i in range(n)]}).write_csv(path)
    made, shown = [0], []
    everything_sent = asyncio.Event()
    bulk_create = Client.bulk_create

    async def sending(self, *args, **kwargs):
        made[0] += 1
        if made[0] == n // size:
            everything_sent.set()
        return await bulk_create(self, *args, **kwargs)

    async def show_progress():
        async def show(rows: int, total: int) -> None:
            await everything_sent.wait()
            shown.append((rows, total))

        return show

    monkeypatch.setattr(Client, "bulk_create", sending)
    params = sync_params(source=str(path), base_url=sandbox.gateway_base_url, state_dir=str(tmp_path / "state"),
                         concurrency=1, chunk_size=size)  # fmt: skip
    steps = dataclasses.replace(PLAIN_STEPS, show_progress=show_progress)
    summary = asyncio.run(asyncio.wait_for(run_sync(params, steps=steps), timeout=30))
    assert summary["created"] == n and made[0] == n // size
    # Told of every row by the end of the run, in fewer calls than chunks (rows done meanwhile go to the next).
    assert sum(rows for rows, _ in shown) == n and shown[-1][1] == n and len(shown) < n // size
