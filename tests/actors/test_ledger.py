"""The ledger actor against a real server: chains, duplicates, out-of-order facts,
two replicas, tampering caught by `hms ledger verify`, and a SIGKILLed
`hms actor run ledger` process under load."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from typer.testing import CliRunner

from actors.ledger import Ledger
from hms_bus.cli import app
from hms_bus.connection import MSG_ID, Bus, open_bus
from hms_bus.dead_letters import DLQ_REASON
from hms_bus.ledger import reader, store
from hms_bus.ledger.chain import (
    HASH_HEADER,
    LedgerEntry,
    body_hash,
    decode_entry,
    encode_entry,
    lines,
    pack,
)
from hms_bus.messages import Fact, Facts, encode
from hms_bus.metrics import Metrics
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import declare, ensure_topology, stream_config
from tests.e2e.harness import Processes
from tests.helpers import bus_for, eventually

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


@asynccontextmanager
async def ledgers(bus: Bus, n: int = 1, **options: Any) -> AsyncIterator[list[Ledger]]:
    options.setdefault("fetch_timeout", 0.2)
    started = [Ledger(bus, Metrics.create(), **options) for _ in range(n)]
    async with anyio.create_task_group() as tg:
        for ledger in started:
            await tg.start(ledger.run)
        try:
            yield started
        finally:
            for ledger in started:
                ledger.stop()


def fact(run: str, n: int, kind: str = "step.ready", **extra: Any) -> Fact:
    return Fact(
        id=f"{run}-input/{n}",
        run=run,
        kind=kind,
        at=T0 + timedelta(seconds=n),
        workflow="wf",
        step=f"s{n}",
        source="dispatcher",
        **extra,
    )


async def publish(bus: Bus, *facts: Fact, msg_id: str | None = None) -> None:
    for f in facts:
        headers = {MSG_ID: msg_id or f.id}
        await bus.publish_bytes(bus.ns.audit("dispatcher"), encode(f), headers)


def entries_of(messages: list[store.StoredMessage]) -> list[LedgerEntry]:
    return [decode_entry(line) for m in messages for line in lines(m.body)]


async def chain_ids(bus: Bus, run: str) -> list[str]:
    return [e.fact.id for e in entries_of(await store.read_run(bus, run))]


async def chained(bus: Bus, run: str, count: int) -> list[str]:
    async def enough() -> list[str] | None:
        ids = await chain_ids(bus, run)
        return ids if len(ids) >= count else None

    ids = await eventually(enough, timeout=20, what=f"{count} entries for {run}")
    assert ids is not None  # eventually() returns only something truthy
    return ids


async def test_facts_are_chained_per_run_and_verify(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus, ledgers(bus):
        await publish(bus, *(fact("R1", n) for n in range(1, 6)), *(fact("R2", n) for n in (1, 2)))
        assert await chained(bus, "R1", 5) == [f"R1-input/{n}" for n in range(1, 6)]
        assert await chained(bus, "R2", 2) == ["R2-input/1", "R2-input/2"]
        stored = await store.read_run(bus, "R1")
        entries = entries_of(stored)
        raw = [line for m in stored for line in lines(m.body)]
        assert [e.index for e in entries] == [0, 1, 2, 3, 4]
        assert entries[0].prev == "0" * 64
        assert all(e.prev == body_hash(p) for e, p in zip(entries[1:], raw, strict=False))
        report = await reader.verify_all(bus)
        assert (report.runs, report.entries, report.broken) == (2, 7, [])


async def test_a_fact_published_twice_is_chained_once(nats_url: str, ns: Namespace) -> None:
    """Past the audit stream's duplicate window (a different Nats-Msg-Id here) the
    ledger still finds the fact id in the chain; also across a restart (cold head)."""
    async with bus_for(nats_url, ns) as bus:
        async with ledgers(bus) as (ledger,):
            await publish(bus, fact("R1", 1), fact("R1", 2))
            await chained(bus, "R1", 2)
            await publish(bus, fact("R1", 2), msg_id="again-1")
            await publish(bus, fact("R1", 3))
            await chained(bus, "R1", 3)
            await eventually(lambda: ledger.statistics().duplicates == 1, timeout=20)
        await publish(bus, fact("R1", 1), msg_id="again-2")  # to a fresh ledger
        await publish(bus, fact("R1", 4))
        async with ledgers(bus) as (ledger,):
            await chained(bus, "R1", 4)
            await eventually(lambda: ledger.statistics().duplicates == 1, timeout=20)
        assert await chain_ids(bus, "R1") == [f"R1-input/{n}" for n in range(1, 5)]


async def test_a_batch_of_facts_is_chained_fact_by_fact_and_once(
    nats_url: str, ns: Namespace
) -> None:
    """A `Facts` message (an input's facts, as the dispatcher sends them) is chained as
    its facts would be one by one; redelivered past the duplicate window, it adds
    nothing; a bad run id in it dead-letters the message, and its good facts stay."""
    async with bus_for(nats_url, ns) as bus, ledgers(bus) as (ledger,):
        dead = await bus.js.subscribe(ns.dlq(ns.audit_stream), stream=ns.dlq_stream)
        batch = Facts(id="R1-input/1/facts", facts=(fact("R1", 1), fact("R1", 2)))
        await bus.publish(ns.audit("dispatcher"), batch)
        await publish(bus, fact("R1", 3))
        assert await chained(bus, "R1", 3) == ["R1-input/1", "R1-input/2", "R1-input/3"]
        await bus.publish(ns.audit("dispatcher"), batch, headers={MSG_ID: "again"})
        await eventually(lambda: ledger.statistics().duplicates == 2, timeout=20)
        mixed = Facts(id="R2-input/1/facts", facts=(fact("R2", 1), fact("bad run", 2)))
        await bus.publish(ns.audit("dispatcher"), mixed)
        letter = await dead.next_msg(timeout=20)
        await dead.unsubscribe()
        assert await chained(bus, "R2", 1) == ["R2-input/1"]
        assert await chain_ids(bus, "R1") == ["R1-input/1", "R1-input/2", "R1-input/3"]
    assert json.loads(letter.data)["id"] == "R2-input/1/facts"
    assert "fact bad run-input/2" in (letter.headers or {})[DLQ_REASON]


async def test_a_run_with_more_than_one_message_of_facts_is_chained_in_order(
    nats_url: str, ns: Namespace
) -> None:
    """With a small largest message, one batch of a run's facts takes several ledger
    messages (appended one after the other, each after the last), while the facts of
    other runs in the same batch go in one message each."""
    settings = BusSettings(root=ns.root, max_payload=8 * 1024)
    async with open_bus(NatsSettings(urls=(nats_url,)), settings, "test") as bus:
        await ensure_topology(bus.js, bus.settings)
        # In the stream before the ledger starts: its first pull brings them together.
        await publish(bus, *(fact("R1", n) for n in range(1, 61)), fact("R2", 1), fact("R3", 1))
        async with ledgers(bus) as (ledger,):
            ids = await chained(bus, "R1", 60)
            await chained(bus, "R3", 1)
            assert ledger.statistics().races == 0
        messages = await store.read_run(bus, "R1")
        report = await reader.verify_all(bus)
    assert ids == [f"R1-input/{n}" for n in range(1, 61)]
    assert len(messages) > 1
    assert all(len(m.body) <= 4096 for m in messages)
    assert (report.runs, report.entries, report.broken) == (3, 62, [])


async def test_facts_arriving_out_of_order_are_chained_in_their_stable_order(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        # In the stream before the ledger starts: its first pull brings them together.
        await publish(bus, *(fact("R1", n) for n in (3, 1, 10, 2, 5, 4)))
        async with ledgers(bus):
            ids = await chained(bus, "R1", 6)
        timeline = await reader.run_timeline(bus, "R1")
    order = [f"R1-input/{n}" for n in (1, 2, 3, 4, 5, 10)]
    assert ids == order
    assert [t.id for t in timeline] == order


async def test_late_facts_append_at_the_end_and_the_timeline_stays_in_order(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus, ledgers(bus):
        await publish(bus, fact("R1", 2), fact("R1", 3))
        await chained(bus, "R1", 2)
        await publish(bus, fact("R1", 1))  # later than the reorder window
        assert await chained(bus, "R1", 3) == ["R1-input/2", "R1-input/3", "R1-input/1"]
        timeline = await reader.run_timeline(bus, "R1")
        assert [t.id for t in timeline] == ["R1-input/1", "R1-input/2", "R1-input/3"]
        assert (await reader.verify_run(bus, "R1")).broken == []


async def test_two_replicas_never_fork_a_chain(nats_url: str, ns: Namespace) -> None:
    """Two ledgers on two connections take facts of the same five runs at once."""
    async with (
        bus_for(nats_url, ns) as bus,
        bus_for(nats_url, ns) as other,
        ledgers(bus, window=0.0),
        ledgers(other, window=0.0),
    ):
        runs = [f"R{i}" for i in range(5)]
        for n in range(1, 41):
            await publish(bus, *(fact(r, n) for r in runs))
        for r in runs:
            ids = await chained(bus, r, 40)
            assert sorted(ids) == sorted(f"{r}-input/{n}" for n in range(1, 41))
        report = await reader.verify_all(bus)
        assert (report.runs, report.entries, report.broken) == (5, 200, [])


async def test_an_entry_edited_behind_the_ledgers_back_fails_verify(
    nats_url: str, ns: Namespace
) -> None:
    """The server refuses to lift `deny_delete` on a stream (err 10052), so the forger
    recreates the ledger stream with deletes allowed, copies the entries back, then
    edits one through the raw stream API (delete + re-publish) and restores the flags."""
    runner = CliRunner()
    args = ["--url", nats_url, "--root", ns.root]
    approve = fact("R1", 3, "checkpoint.approved", by="jdavis", reason="income verified")
    async with bus_for(nats_url, ns) as bus:
        async with ledgers(bus):
            await publish(bus, fact("R1", 1), fact("R1", 2), approve, fact("R1", 4))
            await publish(bus, fact("R2", 1))
            await chained(bus, "R1", 4)
            await chained(bus, "R2", 1)
        ok = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "ledger", "verify"])
        assert ok.exit_code == 0, ok.output
        assert "2 chain(s), 5 entries" in ok.output

        js = bus.js
        saved = [m async for page in store.scan(bus, ns.ledger_all) for m in page]
        spec = next(s for s in declare(ns).streams if s.kind == "ledger")
        config = stream_config(spec, bus.settings)
        await js.delete_stream(ns.ledger_stream)
        config.deny_delete = config.deny_purge = False
        await js.add_stream(config)
        seqs = {}
        for m in saved:
            ack = await js.publish(m.subject, m.body, headers={HASH_HEADER: m.header_hash or ""})
            seqs[m.body] = ack.seq
        target = next(m for m in saved if b"checkpoint.approved" in m.body)
        edited = [
            encode_entry(
                msgspec.structs.replace(e, fact=msgspec.structs.replace(e.fact, by="mallory"))
            )
            if e.fact.kind == "checkpoint.approved"
            else line
            for line in lines(target.body)
            for e in [decode_entry(line)]
        ]
        body = pack(edited)
        await js.delete_msg(ns.ledger_stream, seqs[target.body])
        await js.publish(ns.ledger("R1"), body, headers={HASH_HEADER: body_hash(body)})
        config.deny_delete = config.deny_purge = True
        await js.update_stream(config)

    one = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "ledger", "verify", "R1"])
    assert one.exit_code == 1
    assert "run R1: entry 2 " in one.output, one.output
    every = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "ledger", "verify"])
    assert every.exit_code == 1
    assert "run R1: entry 2 " in every.output
    assert "1 of 2 chain(s) broken" in every.output
    fine = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "ledger", "verify", "R2"])
    assert fine.exit_code == 0, fine.output


async def test_timeline_cli_prints_lines_json_and_fails_on_an_unknown_run(
    nats_url: str, ns: Namespace
) -> None:
    runner = CliRunner()
    args = ["--url", nats_url, "--root", ns.root]
    async with bus_for(nats_url, ns) as bus, ledgers(bus):
        await publish(
            bus,
            fact("R1", 1, "run.paused", by="alice", reason="waiting for documents"),
            fact("R1", 2, "task.failed", attempt=1, reason="timeout", data={"try": "1/3"}),
        )
        await chained(bus, "R1", 2)
    lines = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "run", "timeline", "R1"])
    assert lines.exit_code == 0, lines.output
    assert lines.output.splitlines() == [
        "-- 2026-11-21 --",
        "[10:00:01] run paused by alice: waiting for documents",
        "[10:00:02] s2 failed (try 1/3): timeout",
    ]
    as_json = await anyio.to_thread.run_sync(
        runner.invoke, app, [*args, "run", "timeline", "R1", "--json"]
    )
    assert '"by": "alice"' in as_json.output
    unknown = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "run", "timeline", "R9"])
    assert unknown.exit_code == 1
    assert "hms: error: run R9 has no ledger entries" in unknown.output
    bad = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "run", "timeline", "a.b"])
    assert bad.exit_code == 2


@pytest.fixture
def procs(nats_url: str, ns: Namespace, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(nats_url, ns.root, tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()
        sys.stderr.write(p.logs())  # shown only when the test failed


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_sigkilled_ledger_process_loses_and_doubles_nothing(
    nats_url: str, ns: Namespace, procs: Processes
) -> None:
    """20,000 facts of 200 runs published while two real `hms actor run ledger`
    replicas chain them; one is SIGKILLed mid-way: the other takes over its unacked
    facts (after the ack wait), and afterwards every fact is in its chain exactly
    once and every chain verifies."""
    runs, per_run = 200, 100
    async with bus_for(nats_url, ns) as bus:
        first = procs.actor("ledger")
        survivor = procs.actor("ledger")
        facts = [fact(f"R{r:03d}", n) for n in range(1, per_run + 1) for r in range(runs)]
        for start in range(0, len(facts), 1000):
            await bus.publish_all((ns.audit("dispatcher"), f) for f in facts[start : start + 1000])

        async def some_chained() -> bool:
            report = await reader.verify_all(bus)
            return report.entries >= 2000

        await eventually(some_chained, timeout=60, interval=0.1, what="2,000 entries")
        procs.kill(first)

        async def all_chained() -> reader.VerifyReport | None:
            report = await reader.verify_all(bus)
            return report if report.entries >= len(facts) else None

        report = await eventually(all_chained, timeout=90, interval=0.5, what="every fact")
        assert report is not None
        assert (report.runs, report.entries, report.broken) == (runs, len(facts), [])
        ids: Counter[str] = Counter()
        async for page in store.scan(bus, ns.ledger_all):
            ids.update(e.fact.id for e in entries_of(page))
        assert set(ids.values()) == {1}
        assert len(ids) == len(facts)
        assert survivor.poll() is None


async def test_timeline_follow_streams_new_entries_until_the_run_finishes(
    nats_url: str, ns: Namespace, procs: Processes
) -> None:
    """A real `hms run timeline R1 --follow` process prints what is there, then each
    entry as it is chained, and exits 0 after `run.finished`."""
    async with bus_for(nats_url, ns) as bus, ledgers(bus):
        await publish(bus, fact("R1", 1, "run.started", data={"version": 1}))
        await chained(bus, "R1", 1)
        proc = procs.start("follow", ["run", "timeline", "R1", "--follow"])
        (out,) = procs.dir.glob("follow-*.log")
        await eventually(lambda: "run R1 started" in out.read_text(), timeout=30)
        await publish(bus, fact("R1", 2, "task.claimed", by="alice"))
        await eventually(lambda: "s2 claimed by alice" in out.read_text(), timeout=30)
        await publish(bus, fact("R1", 3, "run.finished", reason="done", data={"outcome": "DONE"}))
        code = await anyio.to_thread.run_sync(proc.wait, 30)
    assert code == 0, out.read_text()
    assert out.read_text().splitlines() == [
        "[10:00:01] run R1 started (wf v1)",
        "[10:00:02] s2 claimed by alice",
        "[10:00:03] run DONE: done",
    ]


async def test_a_fact_too_big_to_chain_is_dead_lettered_alone(nats_url: str, ns: Namespace) -> None:
    """It fits the audit stream but its entry would not fit a ledger message: it goes
    to the dead letters with the reason, and the facts of its run around it are
    chained."""
    big = fact("R1", 2, data={"blob": "x" * (BusSettings().max_payload - 2000)})
    async with bus_for(nats_url, ns) as bus, ledgers(bus):
        dead = await bus.js.subscribe(ns.dlq(ns.audit_stream), stream=ns.dlq_stream)
        await publish(bus, fact("R1", 1), big, fact("R1", 3))
        assert await chained(bus, "R1", 2) == ["R1-input/1", "R1-input/3"]
        letter = await dead.next_msg(timeout=20)
        await dead.unsubscribe()
    assert json.loads(letter.data)["id"] == "R1-input/2"
    assert "over the" in (letter.headers or {})[DLQ_REASON]


async def test_reads_page_through_a_long_chain(nats_url: str, ns: Namespace) -> None:
    """More messages than one batched direct get returns: all are read, in order."""
    total = store.PAGE + 500
    async with bus_for(nats_url, ns) as bus:
        for start in range(0, total, 500):
            for i in range(start, start + 500):
                await bus.nc.publish(ns.ledger("R1"), b"%d" % i)
            await bus.nc.flush()
        await bus.js.publish(ns.ledger("R2"), b"other")  # a fence: all above are stored
        stored = await store.read_run(bus, "R1")
    assert [m.body for m in stored] == [b"%d" % i for i in range(total)]


async def test_one_lookup_tells_which_runs_have_entries(nats_url: str, ns: Namespace) -> None:
    """What lets the ledger skip reading a new run's (empty) chain."""
    async with bus_for(nats_url, ns) as bus:
        for run in ("R1", "R3"):
            await bus.js.publish(ns.ledger(run), b"entry")
        have = await store.runs_with_entries(bus, ["R1", "R2", "R3", "R4"])
        none = await store.runs_with_entries(bus, ["R2", "R4"])
    assert (have, none) == ({"R1", "R3"}, set())
