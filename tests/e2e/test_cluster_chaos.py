"""The whole system on a 3-server JetStream cluster, with two replicas of every actor,
under load, while one server and one replica of each actor die by SIGKILL.

Every actor runs as a real `hms actor run <name>` process (two of each), the workers as
`hms worker run` processes, all given the three servers' URLs; streams and buckets are
R3. A third of the way through 2,000 runs, one server and one replica of each actor
are killed; then the server is started again on its ports and store, and a fresh
replica of each actor joins. Afterwards every run is DONE, no step was applied twice,
every run's ledger chain verifies, and the run-state and ledger counts agree.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats.errors
import pytest

from actors import REGISTRY
from hms_bus.client import Client
from hms_bus.cluster import NatsCluster
from hms_bus.connection import Bus, open_bus
from hms_bus.demo.events import run_key
from hms_bus.health import live_heartbeats
from hms_bus.ledger import store as ledger_store
from hms_bus.ledger.chain import decode_entry, lines
from hms_bus.ledger.reader import verify_all
from hms_bus.messages import Event
from hms_bus.runs import RunStore
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import live_workers
from hms_bus.workflow.loader import load_workflow_text
from hms_bus.workflow.state import RunState
from tests.e2e.harness import Processes, Progress, read_facts
from tests.helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOTAL = 2_000
REPLICAS = "3"

LOAD = """
id: e2e-cluster
prefix: CLU
start: ClusterLoad
sla: 1h
steps:
  - id: first
    actor: SVC:e2e-echo
    sla: 30m
  - id: second
    actor: SVC:e2e-echo
    sla: 30m
"""


@pytest.fixture
def procs(cluster3: NatsCluster, ns: Namespace, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(",".join(cluster3.urls), ns.root, tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()
        sys.stderr.write(p.logs())  # shown only when the test failed


@asynccontextmanager
async def connect(urls: list[str], ns: Namespace) -> AsyncIterator[Bus]:
    settings = BusSettings(root=ns.root, replicas=int(REPLICAS))
    async with open_bus(NatsSettings(urls=tuple(urls)), settings, "e2e-cluster") as bus:
        yield bus


async def listed_runs(bus: Bus) -> list[RunState]:
    """Every run in the runs bucket, read afresh (a watch that may meet a dying server:
    the caller retries)."""
    kv = await bus.js.key_value(bus.ns.runs_bucket)
    return [run async for run in RunStore(kv).all()]


async def finished(bus: Bus) -> int:
    with anyio.fail_after(20):
        return sum(run.finished for run in await listed_runs(bus))


async def wait_finished(bus: Bus, n: int, timeout: float) -> int:
    async def reached() -> int:
        count = await finished(bus)
        sys.stderr.write(f"{count}/{n} runs finished\n")  # shown if the test fails
        return count if count >= n else 0

    return await eventually(
        reached,
        timeout=timeout,
        interval=1.0,
        retry_on=(nats.errors.Error, TimeoutError),
        what=f"{n} runs finished",
    )


async def wait_beating(bus: Bus, procs: Sequence[subprocess.Popen[bytes]]) -> None:
    pids = {p.pid for p in procs}

    async def beating() -> bool:
        kv = await bus.js.key_value(bus.ns.health_bucket)
        return pids <= {b.pid for b in await live_heartbeats(kv)}

    await eventually(
        beating, timeout=60, interval=0.5, retry_on=(nats.errors.Error,), what="heartbeats"
    )


async def ledger_fact_ids(bus: Bus) -> list[str]:
    """The id of every fact in every chain, in stream order."""
    ids: list[str] = []
    async for page in ledger_store.scan(bus, bus.ns.ledger_all):
        ids.extend(decode_entry(line).fact.id for m in page for line in lines(m.body))
    return ids


async def test_a_cluster_loses_a_server_and_a_replica_of_each_actor_under_load(
    cluster3: NatsCluster, ns: Namespace, procs: Processes
) -> None:
    env = {"HMS_REPLICAS": REPLICAS}
    async with connect(cluster3.urls, ns) as bus:
        await ensure_topology(bus.js, bus.settings)
        await Client(bus).apply_workflow(load_workflow_text(LOAD))
        actors = {
            name: [
                procs.start(name, ["actor", "run", name, "--no-ensure"], **env) for _ in range(2)
            ]
            for name in sorted(REGISTRY)
        }
        workers = [
            procs.start("worker", ["worker", "run", "tests.e2e.workers:echo", "--no-ensure"], **env)
            for _ in range(2)
        ]
        await wait_beating(bus, [p for ps in actors.values() for p in ps])
        workers_kv = await bus.js.key_value(ns.workers_bucket)

        async def registered() -> bool:
            live = await live_workers(workers_kv, Lane.parse("SVC:e2e-echo"))
            return {w.pid for w in workers} <= {w.pid for w in live}

        await eventually(registered, timeout=60, what="the workers registered")

        events = [
            (ns.event("ClusterLoad"), Event(id=f"c-{n}", name="ClusterLoad", payload={"n": n}))
            for n in range(TOTAL)
        ]
        # A watch tells the moment a third is done (a listing takes seconds: by its
        # answer the load could be over); it stops before the server dies.
        done = Progress(TOTAL)
        async with anyio.create_task_group() as tg:
            tg.start_soon(done.follow, await bus.js.key_value(ns.runs_bucket))
            await bus.publish_all(events)
            with anyio.fail_after(120):
                await done.reached(TOTAL // 3)
            killed_at = done.count
            tg.cancel_scope.cancel()
        victim = 1
        # Synchronous (it waits for the process): off the event loop, so this test's
        # own connection keeps its heartbeats while the server goes and comes.
        await anyio.to_thread.run_sync(cluster3.kill_server, victim)
        for replicas in actors.values():
            procs.kill(replicas[0])
        sys.stderr.write(f"server {victim} and one replica of each actor killed at {killed_at}\n")
        await anyio.to_thread.run_sync(cluster3.start_server, victim)
        fresh = [procs.start(n, ["actor", "run", n, "--no-ensure"], **env) for n in actors]
        await wait_beating(bus, fresh)
        await wait_finished(bus, TOTAL, timeout=180)

        runs = await eventually(
            lambda: listed_runs(bus), timeout=30, retry_on=(nats.errors.Error,), what="runs"
        )
        facts = list({f.id: f for f in await read_facts(bus)}.values())  # ids are stable
        audit_ids = {f.id for f in facts}

        async def all_chained() -> list[str]:
            chained = await ledger_fact_ids(bus)
            return chained if set(chained) >= audit_ids else []

        chained = await eventually(
            all_chained, timeout=90, interval=1.0, retry_on=(nats.errors.Error,), what="ledger"
        )
        report = await verify_all(bus)

    assert killed_at < TOTAL, "the kill did not come in the middle of the load"
    assert len(runs) == TOTAL
    assert {r.key for r in runs} == {run_key(f"c-{n}", "e2e-cluster") for n in range(TOTAL)}
    assert {r.status for r in runs} == {"DONE"}
    completed = Counter((f.run, f.step) for f in facts if f.kind == "task.completed")
    assert len(completed) == 2 * TOTAL
    assert set(completed.values()) == {1}, "a step was completed twice"
    for run in runs:
        assert [u.attempt for s in run.steps.values() for u in s.units] == [1, 1], run.run
        assert len(run.applied) == len(set(run.applied)), run.run
    assert report.broken == [], report.broken
    assert report.runs == TOTAL  # the ledger knows every run, no more, no less
    assert len(chained) == len(set(chained)), "a fact was chained twice"
    assert set(chained) == audit_ids, "the ledger and the audit stream disagree"
    finishes = Counter(f.run for f in facts if f.kind == "run.finished")
    assert set(finishes) == {r.run for r in runs}
    assert set(finishes.values()) == {1}
