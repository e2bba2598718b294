"""Crashes, with real processes: the actors run as `hms actor run ...`, the workers as
`hms worker run ...`, and they die by SIGKILL (no cleanup of any kind).

- A worker killed mid-task: the lane redelivers the task, the run completes, and the
  step's result is applied once (one attempt, one `task.completed` fact).
- Two dispatchers and two routers under 600 runs, one of each killed in the middle:
  every run finishes DONE, no run is lost or doubled, no step is completed twice.
- A human task survives a restart of every actor process and of the server itself
  (kill -9, started again on the same port and store) and is completed afterwards
  with `hms task complete`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from hms_bus import inbox
from hms_bus.client import Client
from hms_bus.connection import Bus, open_bus
from hms_bus.demo.events import demo_event, run_key
from hms_bus.demo.progress import wait_run
from hms_bus.health import live_heartbeats
from hms_bus.lanes import lane_config
from hms_bus.messages import Event, Fact
from hms_bus.runs import RunStore
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import live_workers
from hms_bus.workflow.loader import load_workflow_text
from hms_bus.workflow.state import RunState
from tests.e2e.harness import REPO, Processes, Progress, read_facts
from tests.helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

CRASH = """
id: e2e-crash
prefix: CRS
start: CrashTest
steps:
  - id: work
    actor: SVC:e2e-slow
  - id: finish
    actor: SVC:e2e-echo
"""

LOAD = """
id: e2e-load
prefix: LOD
start: LoadTest
steps:
  - id: first
    actor: SVC:e2e-echo
  - id: second
    actor: SVC:e2e-echo
"""

ACK_WAIT = "2"  # seconds before a dead worker's task is redelivered


@pytest.fixture
def procs(nats_url: str, ns: Namespace, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(nats_url, ns.root, tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()
        sys.stderr.write(p.logs())  # shown only when the test failed


@asynccontextmanager
async def connect(url: str, ns: Namespace) -> AsyncIterator[Bus]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), "e2e-test") as bus:
        yield bus


async def wait_actors(bus: Bus, *procs: subprocess.Popen[bytes]) -> None:
    """Until each actor process beats (it beats once its consumers are bound)."""
    kv = await bus.js.key_value(bus.ns.health_bucket)
    pids = {p.pid for p in procs}

    async def beating() -> bool:
        return pids <= {b.pid for b in await live_heartbeats(kv)}

    await eventually(beating, timeout=20, what=f"heartbeats of pids {sorted(pids)}")


async def wait_workers(bus: Bus, lane: str, *procs: subprocess.Popen[bytes]) -> None:
    kv = await bus.js.key_value(bus.ns.workers_bucket)
    pids = {p.pid for p in procs}

    async def registered() -> bool:
        return pids <= {w.pid for w in await live_workers(kv, Lane.parse(lane))}

    await eventually(registered, timeout=20, what=f"workers {sorted(pids)} on {lane}")


async def run_of(bus: Bus, key: str) -> str:
    return await Client(bus).wait_started(key, timeout=20)


async def test_a_worker_killed_mid_task_has_it_redelivered_and_applied_once(
    nats_url: str, ns: Namespace, procs: Processes
) -> None:
    async with connect(nats_url, ns) as bus:
        await ensure_topology(bus.js, bus.settings)
        await Client(bus).apply_workflow(load_workflow_text(CRASH))
        actors = [procs.actor("dispatcher"), procs.actor("router")]
        doomed = procs.worker("tests.e2e.workers:slow", "--ack-wait", ACK_WAIT)
        echo = procs.worker("tests.e2e.workers:echo")
        await wait_actors(bus, *actors)
        await wait_workers(bus, "SVC:e2e-slow", doomed)
        await wait_workers(bus, "SVC:e2e-echo", echo)

        await bus.publish(ns.event("CrashTest"), Event(id="crash-1", name="CrashTest"))
        run_id = await run_of(bus, run_key("crash-1", "e2e-crash"))
        runs_kv = await bus.js.key_value(ns.runs_bucket)
        mid = await wait_run(runs_kv, run_id, _working, timeout=20)
        assert mid is not None, "the slow task never started"
        # Routing to a lane its workers created keeps their ack wait (the router once
        # reset it to its own 30 s).
        lane = await lane_config(bus.js, ns, Lane.parse("SVC:e2e-slow"))
        assert lane is not None
        assert lane.ack_wait == float(ACK_WAIT)
        procs.kill(doomed)
        rescuer = procs.worker("tests.e2e.workers:slow", "--ack-wait", ACK_WAIT)
        await wait_workers(bus, "SVC:e2e-slow", rescuer)

        done = await wait_run(runs_kv, run_id, lambda r: r.finished, timeout=30)
        assert done is not None, "the run did not finish after the redelivery"

        async def every_fact() -> list[Fact]:
            # The dispatcher stores the state, then publishes its facts: wait for them.
            facts = [f for f in await read_facts(bus) if f.run == run_id]
            return facts if any(f.kind == "run.finished" for f in facts) else []

        facts = await eventually(every_fact, timeout=20, what="the run's facts")

    assert done.status == "DONE"
    work = done.steps["work"]
    assert [u.attempt for u in work.units] == [1]  # redelivered, not retried
    assert done.results["work"]["delivery"] >= 2  # the rescuer ran it on a redelivery
    completed = {(f.step, f.id) for f in facts if f.kind == "task.completed"}
    assert Counter(step for step, _ in completed) == {"work": 1, "finish": 1}
    assert len(done.applied) == len(set(done.applied))


def _working(run: RunState) -> bool:
    return run.steps["work"].status == "IN_PROGRESS"


async def test_replicas_killed_under_load_lose_no_run_and_double_no_step(
    nats_url: str, ns: Namespace, procs: Processes
) -> None:
    total = 600
    async with connect(nats_url, ns) as bus:
        await ensure_topology(bus.js, bus.settings)
        await Client(bus).apply_workflow(load_workflow_text(LOAD))
        dispatchers = [procs.actor("dispatcher") for _ in range(2)]
        routers = [procs.actor("router") for _ in range(2)]
        worker = procs.worker("tests.e2e.workers:echo")
        await wait_actors(bus, *dispatchers, *routers)
        await wait_workers(bus, "SVC:e2e-echo", worker)
        runs_kv = await bus.js.key_value(ns.runs_bucket)

        events = [
            (ns.event("LoadTest"), Event(id=f"load-{n}", name="LoadTest", payload={"n": n}))
            for n in range(total)
        ]
        async with anyio.create_task_group() as tg:
            done = Progress(total)
            tg.start_soon(done.follow, runs_kv)
            await bus.publish_all(events)
            with anyio.fail_after(60):
                await done.reached(total // 3)
            # In the middle of the load: one replica of each actor dies.
            procs.kill(dispatchers[0])
            procs.kill(routers[0])
            killed_at = done.count
            sys.stderr.write(
                f"one dispatcher and one router killed with {killed_at}/{total} done\n"
            )
            with anyio.fail_after(100):  # the dead replicas' messages return after 30 s
                await done.reached(total)
            tg.cancel_scope.cancel()

        async def every_run() -> list[RunState] | None:
            # A listing is a KV watch; read it until it shows every run (or fail).
            listed = [r async for r in RunStore(runs_kv).all()]
            return listed if len(listed) >= total else None

        runs = await eventually(every_run, timeout=30, what=f"all {total} runs listed")
        facts = await read_facts(bus)

    assert 0 < killed_at < total, "the kill did not come in the middle of the load"
    assert runs is not None
    assert len(runs) == total  # none lost, none doubled
    assert {r.key for r in runs} == {run_key(f"load-{n}", "e2e-load") for n in range(total)}
    assert {r.status for r in runs} == {"DONE"}
    # By fact id: a fact published again after a crash (its input redelivered to the
    # other replica) may be stored again, in another batch; the ledger drops it. Two
    # different facts would be two completions.
    completions = {(f.run, f.step, f.id) for f in facts if f.kind == "task.completed"}
    completed = Counter((run, step) for run, step, _ in completions)
    assert len(completed) == 2 * total
    assert set(completed.values()) == {1}, "a step was completed twice"
    for run in runs:
        assert [u.attempt for s in run.steps.values() for u in s.units] == [1, 1], run.run
        assert len(run.applied) == len(set(run.applied)), run.run


async def test_a_human_task_survives_a_restart_of_every_actor_and_the_server(
    ns: Namespace, own_server: NatsServer, tmp_path: Path
) -> None:
    procs = Processes(own_server.url, ns.root, tmp_path / "logs")
    demo = demo_event("ftc-complaint")
    try:
        actors = await _start_ftc(procs, own_server.url, ns)
        async with connect(own_server.url, ns) as bus:
            client = Client(bus)
            eid = await client.publish_event(demo.event, dict(demo.payload), id="human-1")
            run_id = await client.wait_started(run_key(eid, demo.example))
            await client.wait_for(run_id, {"IN_REVIEW"}, timeout=20)
            kv = await bus.js.key_value(ns.inbox_bucket)
            (entry,) = await eventually(lambda: inbox.list_items(kv), what="the inbox item")
        task = entry.item.task.task

        for proc in actors:  # every process, then the server: all at once, no goodbyes
            procs.kill(proc)
        own_server.kill()
        own_server.start()
        actors = await _start_ftc(procs, own_server.url, ns)

        listed = procs.hms("task", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [t["task"] for t in json.loads(listed.stdout)] == [task]
        data = json.dumps({"decision": "fraud"})
        done = procs.hms("task", "complete", task, "--by", "jdavis@ftc.gov", "--data", data)
        assert done.returncode == 0, done.stderr

        async with connect(own_server.url, ns) as bus:
            view = await Client(bus).wait_for(run_id, timeout=30)
            run = (await (await RunStore.open(bus)).require(run_id)).run
    except BaseException:
        sys.stderr.write(procs.logs())
        raise
    finally:
        procs.close()

    assert view.status == "DONE"
    assert run.results["human_review"]["decision"] == "fraud"
    assert run.steps["human_review"].by == ["jdavis@ftc.gov"]
    assert run.steps["notify_citizen"].status == "DONE"


async def _start_ftc(procs: Processes, url: str, ns: Namespace) -> list[subprocess.Popen[bytes]]:
    """The actors and the FTC example's workers as processes, ready."""
    async with connect(url, ns) as bus:
        await ensure_topology(bus.js, bus.settings)
        await Client(bus).apply_workflow(REPO / "examples" / "ftc-complaint.yaml")
        actors = [procs.actor("dispatcher"), procs.actor("router")]
        labeler = procs.worker("hms_bus.demo.workers:fraud_labeler")
        mailer = procs.worker("hms_bus.demo.workers:email_svc")
        await wait_actors(bus, *actors)
        await wait_workers(bus, "AI:fraud-labeler", labeler)
        await wait_workers(bus, "SVC:email-svc", mailer)
    return [*actors, labeler, mailer]
