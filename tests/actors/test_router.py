"""The router against a real server: lanes, the inbox, parking, cancels, exhausted
deliveries, duplicates, poison, restarts and two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from actors.router import Router
from hms_bus import inbox
from hms_bus.connection import Bus
from hms_bus.dead_letters import DLQ_REASON
from hms_bus.messages import (
    AUDIT_TYPES,
    RESULT_TYPES,
    TASK_TYPES,
    CancelTask,
    Fact,
    RouteTask,
    Task,
    TaskFailed,
    TaskRouted,
    TaskUnroutable,
    decoder_for,
    encode,
)
from hms_bus.metrics import Metrics
from hms_bus.routing import LaneChoice, RouteEntry, parked_key, route_key
from hms_bus.routing import encode as encode_kv
from hms_bus.runs import RunStore
from hms_bus.subjects import Lane, Namespace
from hms_bus.worker_registry import WorkerInfo, put_worker
from hms_bus.workflow.state import Attempts, RunState, TaskState, TaskStatus
from tests.e2e.harness import read_facts
from tests.helpers import bus_for, eventually

FRAUD = Lane.parse("AI:fraud-labeler")


@asynccontextmanager
async def routers(bus: Bus, n: int = 1, **options: Any) -> AsyncIterator[list[Router]]:
    options.setdefault("fetch_timeout", 0.2)  # stop() returns within one fetch
    started = [Router(bus, Metrics.create(), **options) for _ in range(n)]
    async with anyio.create_task_group() as tg:
        for router in started:
            await tg.start(router.run)  # as the daemon starts it
        try:
            yield started
        finally:
            for router in started:
                router.stop()


async def register(bus: Bus, lane: Lane, instance: str = "w1") -> None:
    now = datetime.now(UTC)
    kv = await bus.js.key_value(bus.ns.workers_bucket)
    info = WorkerInfo(
        lane=str(lane),
        version="1",
        capacity=2,
        instance=instance,
        host="test",
        pid=1,
        started_at=now,
        at=now,
    )
    await put_worker(kv, info)


def route_task(task: str, actor: str = str(FRAUD), **kw: Any) -> RouteTask:
    return RouteTask(
        id=f"{task}/route",
        task=task,
        run=task.split("/")[0],
        workflow="ftc",
        version=1,
        step="triage",
        attempt=1,
        actor=actor,
        **kw,
    )


async def take(bus: Bus, stream: str, subject: str, n: int = 1) -> list[Msg]:
    """The first `n` messages on `subject` (an ephemeral consumer: a reader, not a taker)."""
    sub = await bus.js.pull_subscribe(subject, stream=stream)
    got: list[Msg] = []
    with anyio.fail_after(5):
        while len(got) < n:
            try:
                got += await sub.fetch(n - len(got), timeout=1)
            except TimeoutError:
                continue
    await sub.unsubscribe()
    return got


async def results(bus: Bus, subject: str, n: int = 1) -> list[Any]:
    msgs = await take(bus, bus.ns.results_stream, subject, n)
    return [decoder_for(RESULT_TYPES).decode(m.data) for m in msgs]


async def lane_exists(bus: Bus, lane: Lane) -> None:
    """Wait for the lane's durable, which the router creates when it first routes there."""
    ns = bus.ns
    await eventually(
        lambda: bus.js.consumer_info(ns.tasks_stream, ns.lane_durable(lane)),
        what=f"lane {lane} exists",
        retry_on=(nats.js.errors.NotFoundError,),
    )


async def lane_tasks(bus: Bus, lane: Lane, n: int = 1) -> list[Task]:
    """Take `n` tasks from the lane as its worker would, once the router made the lane."""
    ns = bus.ns
    await lane_exists(bus, lane)
    sub = await bus.js.pull_subscribe_bind(durable=ns.lane_durable(lane), stream=ns.tasks_stream)
    got: list[Msg] = []
    with anyio.fail_after(5):
        while len(got) < n:
            try:
                got += await sub.fetch(n - len(got), timeout=5)
            except TimeoutError:
                continue
    for m in got:
        await m.ack()
    await sub.unsubscribe()
    return [decoder_for(TASK_TYPES).decode(m.data) for m in got]


async def route_queue_empty(bus: Bus) -> bool:
    info = await bus.js.consumer_info(bus.ns.route_stream, bus.ns.durable("router", "route"))
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def test_an_ai_task_lands_on_its_live_lane_with_a_routed_fact(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        await register(bus, FRAUD)
        async with routers(bus):
            await bus.publish(ns.route("request"), route_task("COM-1/triage/1", input={"n": 1}))

            [task] = await lane_tasks(bus, FRAUD)
            assert (task.id, task.task, task.lane, task.input) == (
                "COM-1/triage/1/task",
                "COM-1/triage/1",
                "AI:fraud-labeler",
                {"n": 1},
            )
            [msg] = await take(bus, ns.audit_stream, ns.audit("router"))
            fact = decoder_for(AUDIT_TYPES).decode(msg.data)
            assert isinstance(fact, Fact)
            assert fact.kind == "task.routed"
            assert fact.data["lane"] == "AI:fraud-labeler"
            assert "no routing entry" in fact.data["reason"]


async def test_a_canary_entry_sends_the_task_where_its_hash_says(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        v1, v2 = Lane.parse("AI:fraud-labeler-v1"), Lane.parse("AI:fraud-labeler-v2")
        await register(bus, v1)
        await register(bus, v2)
        routes = await bus.js.key_value(ns.routes_bucket)
        entry = RouteEntry(
            actor=str(FRAUD),
            lanes=(LaneChoice(lane=str(v1), weight=0), LaneChoice(lane=str(v2), weight=1)),
        )
        await routes.put(route_key(str(FRAUD)), encode_kv(entry))
        async with routers(bus):
            await bus.publish(ns.route("request"), route_task("COM-2/triage/1"))
            [task] = await lane_tasks(bus, v2)
            assert task.lane == str(v2)


async def test_a_human_task_waits_in_the_inbox(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus, routers(bus):
        await bus.publish(
            ns.route("request"), route_task("COM-3/review/1", actor="HUMAN:investigator")
        )
        kv = await bus.js.key_value(ns.inbox_bucket)
        entry = await eventually(lambda: inbox.find(kv, "COM-3/review/1"), what="task in the inbox")
        assert entry is not None
        assert entry.item.task.lane == "HUMAN:investigator"
        assert entry.item.claimed_by is None


async def test_unroutable_is_reported_parked_and_routed_once_a_worker_registers(
    nats_url: str, ns: Namespace
) -> None:
    ghost = Lane.parse("AI:ghost")
    async with bus_for(nats_url, ns) as bus, routers(bus):
        await bus.publish(ns.route("request"), route_task("COM-4/triage/1", actor=str(ghost)))

        [unroutable] = await results(bus, ns.router_result)
        assert isinstance(unroutable, TaskUnroutable)
        assert unroutable.id == "COM-4/triage/1/unroutable"
        assert unroutable.reason == "no lane serves AI:ghost: no routing entry and no live worker"
        routes = await bus.js.key_value(ns.routes_bucket)
        await eventually(lambda: routes.get(parked_key("COM-4/triage/1")), retry_on=(Exception,))

        await register(bus, ghost)
        [task] = await lane_tasks(bus, ghost)
        assert task.task == "COM-4/triage/1"
        _, routed = await results(bus, ns.router_result, 2)
        assert isinstance(routed, TaskRouted)
        assert (routed.id, routed.lane) == ("COM-4/triage/1/routed", "AI:ghost")


async def test_parked_requests_survive_a_router_restart(nats_url: str, ns: Namespace) -> None:
    ghost = Lane.parse("AI:late")
    async with bus_for(nats_url, ns) as bus:
        async with routers(bus):
            await bus.publish(ns.route("request"), route_task("COM-5/triage/1", actor=str(ghost)))
            await results(bus, ns.router_result)
            await eventually(lambda: route_queue_empty(bus), what="request settled")
        await register(bus, ghost)  # while no router runs
        async with routers(bus):
            [task] = await lane_tasks(bus, ghost)
            assert task.task == "COM-5/triage/1"


async def test_two_replicas_route_a_parked_request_once(nats_url: str, ns: Namespace) -> None:
    lane = Lane.parse("AI:pair")
    async with bus_for(nats_url, ns) as bus, routers(bus, 2):
        for i in range(5):
            await bus.publish(ns.route("request"), route_task(f"COM-6/s{i}/1", actor=str(lane)))
        await results(bus, ns.router_result, 5)
        await eventually(lambda: route_queue_empty(bus), what="requests settled")
        await register(bus, lane)
        got = await results(bus, ns.router_result, 10)
        assert sorted(r.id for r in got if isinstance(r, TaskRouted)) == [
            f"COM-6/s{i}/1/routed" for i in range(5)
        ]
        tasks = await lane_tasks(bus, lane, 5)
        assert sorted(t.task for t in tasks) == [f"COM-6/s{i}/1" for i in range(5)]


async def test_cancel_is_broadcast_and_removes_the_inbox_item(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus, routers(bus):
        await register(bus, FRAUD)
        human = Lane.parse("HUMAN:investigator")
        await bus.publish(ns.route("request"), route_task("COM-7/review/1", actor=str(human)))
        kv = await bus.js.key_value(ns.inbox_bucket)
        await eventually(lambda: inbox.find(kv, "COM-7/review/1"))
        to_humans = await bus.nc.subscribe(ns.cancel(human))
        to_ai = await bus.nc.subscribe(ns.cancel(FRAUD))
        await eventually(lambda: route_queue_empty(bus))

        cancel = CancelTask(
            id="COM-7/review/1/cancel",
            task="COM-7/review/1",
            run="COM-7",
            step="review",
            attempt=1,
            reason="run cancelled",
        )
        await bus.publish(ns.route("cancel"), cancel)
        got = await to_humans.next_msg(timeout=5)
        assert decoder_for(CancelTask).decode(got.data) == cancel
        assert await eventually(lambda: _gone(kv, "COM-7/review/1"), what="inbox item gone")

        ai_cancel = CancelTask(
            id="COM-8/triage/1/cancel",
            task="COM-8/triage/1",
            run="COM-8",
            step="triage",
            attempt=1,
            reason="superseded",
        )
        await bus.publish(ns.route("cancel"), ai_cancel)
        got = await to_ai.next_msg(timeout=5)
        assert decoder_for(CancelTask).decode(got.data).task == "COM-8/triage/1"


async def _gone(kv: Any, task_id: str) -> bool:
    return await inbox.find(kv, task_id) is None


async def test_a_cancel_right_behind_its_route_request_is_handled_after_it(
    nats_url: str, ns: Namespace
) -> None:
    # The router handles many requests at once, but a task's requests in their order:
    # a cancel that overtook its route request would leave the item in the inbox.
    human = Lane.parse("HUMAN:investigator")
    tasks = [f"COM-{n}/review/1" for n in range(20)]
    async with bus_for(nats_url, ns) as bus, routers(bus, concurrency=32):
        await bus.publish_all(
            pair
            for task in tasks
            for pair in (
                (ns.route("request"), route_task(task, actor=str(human))),
                (
                    ns.route("cancel"),
                    CancelTask(
                        id=f"{task}/cancel",
                        task=task,
                        run=task.split("/")[0],
                        step="review",
                        attempt=1,
                        reason="run cancelled",
                    ),
                ),
            )
        )
        await eventually(lambda: route_queue_empty(bus), what="requests handled")
        kv = await bus.js.key_value(ns.inbox_bucket)
        left = [task for task in tasks if not await _gone(kv, task)]

    assert left == []


async def store_run(bus: Bus, task: str, status: TaskStatus, actor: str) -> None:
    """A run whose one attempt, `task`, is `status` (as the dispatcher stores it)."""
    at = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    run = task.split("/")[0]
    attempt = TaskState(
        task=task, step="review", attempt=1, actor=actor, status=status, dispatched_at=at
    )
    await (await RunStore.open(bus)).create(
        RunState(run=run, workflow="ftc", version=1, status="DISPATCHED", key=run,
                 started_at=at, updated_at=at, tasks=Attempts({task: attempt}))
    )  # fmt: skip


async def test_a_redelivered_request_is_routed_only_if_its_run_still_waits_on_it(
    nats_url: str, ns: Namespace
) -> None:
    # Nakked (or timed out) once, a request may come back after its attempt's cancel.
    ended, live = "COM-8/triage/1", "COM-9/triage/1"
    async with bus_for(nats_url, ns) as bus:
        await register(bus, FRAUD)
        for task, status in ((ended, "CANCELLED"), (live, "DISPATCHED")):
            await store_run(bus, task, status, str(FRAUD))  # type: ignore[arg-type]
            await bus.publish(ns.route("request"), route_task(task))
        first = await bus.js.pull_subscribe_bind(
            durable=ns.durable("router", "route"), stream=ns.route_stream
        )
        for msg in await first.fetch(2, timeout=5):
            await msg.nak()  # the first delivery fails: the router gets the second
        await first.unsubscribe()
        async with routers(bus):
            [landed] = await lane_tasks(bus, FRAUD)
            await eventually(lambda: route_queue_empty(bus), what="requests handled")
            routed = [f.task for f in await read_facts(bus, ns.audit("router"))]

    assert landed.task == live
    assert routed == [live]


async def test_a_human_task_its_run_no_longer_waits_on_leaves_the_inbox_at_once(
    nats_url: str, ns: Namespace
) -> None:
    # Its cancel was handled by another replica before the item existed: the run's
    # state, written before the cancel went out, says the attempt has ended.
    human = Lane.parse("HUMAN:investigator")
    ended, live = "COM-8/review/1", "COM-9/review/1"
    async with bus_for(nats_url, ns) as bus, routers(bus):
        for task, status in ((ended, "CANCELLED"), (live, "DISPATCHED")):
            await store_run(bus, task, status, str(human))  # type: ignore[arg-type]
            await bus.publish(ns.route("request"), route_task(task, actor=str(human)))
        await eventually(lambda: route_queue_empty(bus), what="requests handled")
        kv = await bus.js.key_value(ns.inbox_bucket)
        gone = [task for task in (ended, live) if await _gone(kv, task)]

    assert gone == [ended]


async def test_an_exhausted_lane_task_fails_is_dead_lettered_and_leaves_the_lane(
    nats_url: str, ns: Namespace
) -> None:
    crashy = Lane.parse("AI:crashy")
    async with bus_for(nats_url, ns) as bus:
        await register(bus, crashy)
        async with routers(bus, lane_ack_wait=1.0, lane_max_deliver=1):
            await bus.publish(ns.route("request"), route_task("COM-9/triage/1", actor=str(crashy)))
            await lane_exists(bus, crashy)
            sub = await bus.js.pull_subscribe_bind(
                durable=ns.lane_durable(crashy), stream=ns.tasks_stream
            )
            [taken] = await sub.fetch(1, timeout=5)  # a worker that dies: never acks

            [failed] = await results(bus, ns.result(crashy))
            assert isinstance(failed, TaskFailed)
            assert failed.id == "COM-9/triage/1/exhausted"
            assert failed.exhausted
            assert failed.retryable
            assert failed.by == "router"
            assert (
                failed.error == "delivery exhausted after 1 attempts (worker crashed or timed out)"
            )
            [dead] = await take(bus, ns.dlq_stream, ns.dlq(ns.tasks_stream))
            assert dead.data == taken.data
            assert "delivery exhausted" in (dead.headers or {})[DLQ_REASON]

            async def lane_empty() -> bool:
                info = await bus.js.stream_info(ns.tasks_stream)
                return info.state.messages == 0

            await eventually(lane_empty, what="exhausted task deleted from the lane")


async def test_a_duplicate_request_routes_once(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        await register(bus, FRAUD)
        async with routers(bus):
            data = encode(route_task("COM-10/triage/1"))
            # Without Nats-Msg-Id the route stream keeps both: the router sees it twice.
            await bus.js.publish(ns.route("request"), data)
            await bus.js.publish(ns.route("request"), data)
            await eventually(lambda: route_queue_empty(bus), what="both requests settled")
            info = await bus.js.consumer_info(ns.tasks_stream, ns.lane_durable(FRAUD))
            assert info.num_pending == 1


async def test_malformed_requests_are_dead_lettered_and_the_router_keeps_serving(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        await register(bus, FRAUD)
        async with routers(bus):
            await bus.js.publish(ns.route("request"), b"\x00 not json")
            await bus.js.publish(ns.route("request"), b'{"type": "RouteTask", "id": "x"}')
            bad_lane = msgspec.structs.replace(route_task("COM-11/triage/1"), lane="nowhere")
            await bus.publish(ns.route("request"), bad_lane)
            await bus.publish(ns.route("request"), route_task("COM-12/triage/1"))

            [task] = await lane_tasks(bus, FRAUD)
            assert task.task == "COM-12/triage/1"
            dead = await take(bus, ns.dlq_stream, ns.dlq(ns.route_stream), 3)
            reasons = [(m.headers or {})[DLQ_REASON] for m in dead]
            assert reasons[0].startswith("undecodable")
            assert reasons[1].startswith("schema-invalid")
            assert "route request COM-11/triage/1/route: lane 'nowhere'" in reasons[2]
