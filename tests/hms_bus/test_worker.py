"""The worker SDK against a real server: results, failures, keep-alive, concurrency,
cancellation, the registry and graceful stop. (Crashes of real processes:
test_worker_process.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from hms_bus.connection import Bus
from hms_bus.errors import InvalidNameError, PermanentError
from hms_bus.lanes import ensure_lane, lane_pending
from hms_bus.messages import (
    RESULT_TYPES,
    CancelTask,
    Task,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    decoder_for,
    encode,
)
from hms_bus.metrics import Metrics
from hms_bus.subjects import Lane, Namespace
from hms_bus.worker import (
    PermanentTaskError,
    TaskContext,
    Worker,
    WorkerDefinitionError,
    WorkerRunner,
    as_worker,
    lane,
    live_workers,
    open_worker,
    run_worker,
)
from hms_bus.worker_function import run_attempt
from tests.helpers import bus_for, eventually

LANE = Lane("AI", "labeler")
Result = TaskCompleted | TaskFailed | TaskProgress
_results = decoder_for(RESULT_TYPES)


def make_task(n: int, **input: Any) -> Task:
    return Task(
        id=f"tsk-{n}",
        task=f"tsk-{n}",
        run="COM-20261120-00001",
        workflow="ftc-complaint",
        version=1,
        step="label",
        attempt=1,
        actor=str(LANE),
        lane=str(LANE),
        input=input,
    )


async def publish_task(bus: Bus, task: Task) -> None:
    await bus.publish(bus.ns.task(LANE), task)


async def stored_results(bus: Bus) -> list[Result]:
    """Every result stored for LANE so far, in order (a fresh consumer each time)."""
    ns = bus.ns
    sub = await bus.js.pull_subscribe(
        ns.result(LANE),
        stream=ns.results_stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5.0),
    )
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        out: list[Result] = []
        while len(out) < pending:
            out += [_results.decode(m.data) for m in await sub.fetch(pending - len(out), 5)]
        return out
    finally:
        await sub.unsubscribe()


async def wait_results(bus: Bus, count: int, timeout: float = 10.0) -> list[Result]:
    async def enough() -> list[Result]:
        found = await stored_results(bus)
        return found if len(found) >= count else []

    return await eventually(enough, timeout=timeout, what=f"{count} stored results")


async def lane_is_empty(bus: Bus) -> bool:
    info = await bus.js.stream_info(bus.ns.tasks_stream)
    return info.state.messages == 0 and await lane_pending(bus.js, bus.ns, LANE) == 0


def worker_of(fn: Callable[..., Any], **options: Any) -> Worker:
    return as_worker(fn, lane=LANE, **options)


# -- declaring workers (no server) -----------------------------------------------------


def test_lane_marks_the_function_and_as_worker_applies_overrides() -> None:
    @lane("SVC:notify-slack", concurrency=3, version="v2")
    async def notify(task: Task, ctx: TaskContext) -> None:
        return None

    worker = as_worker(notify)
    assert (worker.lane, worker.concurrency, worker.version) == (
        Lane("SVC", "notify-slack"),
        3,
        "v2",
    )
    assert worker.fn is notify
    moved = as_worker(notify, lane="AI:other", concurrency=7)
    assert (moved.lane, moved.concurrency, moved.version) == (Lane("AI", "other"), 7, "v2")


def test_unusable_workers_are_refused_with_a_reason() -> None:
    async def fn(task: Task, ctx: TaskContext) -> None:
        return None

    def sync_fn(task: Task, ctx: TaskContext) -> None:
        return None

    with pytest.raises(WorkerDefinitionError, match="HUMAN lane"):
        as_worker(fn, lane="HUMAN:clerk")
    with pytest.raises(WorkerDefinitionError, match="must be an async function"):
        as_worker(sync_fn, lane="AI:x")
    with pytest.raises(WorkerDefinitionError, match="no @lane"):
        as_worker(fn)
    with pytest.raises(WorkerDefinitionError, match="concurrency"):
        as_worker(fn, lane="AI:x", concurrency=0)
    with pytest.raises(InvalidNameError, match="KIND:name"):
        as_worker(fn, lane="fraud-labeler")


@pytest.mark.parametrize(
    ("error", "retryable", "text"),
    [
        (ValueError("bad score"), True, "ValueError: bad score"),
        (PermanentTaskError("no such case"), False, "PermanentTaskError: no such case"),
        (PermanentError("refused"), False, "PermanentError: refused"),
        (
            ExceptionGroup("two", [PermanentTaskError("a"), PermanentTaskError("b")]),
            False,
            "2 errors: PermanentTaskError: a; PermanentTaskError: b",
        ),
        (
            ExceptionGroup("mixed", [PermanentTaskError("a"), KeyError("k")]),
            True,
            "2 errors: PermanentTaskError: a; KeyError: 'k'",
        ),
    ],
)
async def test_exceptions_map_onto_failures(error: Exception, retryable: bool, text: str) -> None:
    async def fn(task: Task, ctx: TaskContext) -> None:
        raise error

    async def nothing() -> None:
        return None

    async def ignore(progress: TaskProgress) -> None:
        return None

    task = make_task(1)
    ctx = TaskContext(
        task,
        lane=LANE,
        worker="w",
        bus=cast(Bus, None),  # run_attempt never touches the bus
        keep_alive=nothing,
        report=ignore,
    )
    result = await run_attempt(fn, task, ctx)
    assert isinstance(result, TaskFailed)
    assert (result.id, result.retryable, result.error) == ("tsk-1/failed", retryable, text)


# -- against the server ----------------------------------------------------------------


async def test_a_completed_task_is_reported_with_a_deterministic_id_and_acked(
    nats_url: str, ns: Namespace
) -> None:
    async def label(task: Task, ctx: TaskContext) -> dict[str, Any]:
        return {"fraud": task.input["text"] == "free cruise", "by": ctx.worker}

    metrics = Metrics.create()
    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(label), metrics=metrics):
        await publish_task(bus, make_task(1, text="free cruise"))
        [done] = await wait_results(bus, 1)
        await eventually(lambda: lane_is_empty(bus), what="task acked and gone")

    assert isinstance(done, TaskCompleted)
    assert (done.id, done.task, done.run, done.step, done.attempt) == (
        "tsk-1/done",
        "tsk-1",
        "COM-20261120-00001",
        "label",
        1,
    )
    assert done.output == {"fraud": True, "by": done.by}
    assert done.by.startswith("AI:labeler@")
    labels = {"lane": "AI:labeler", "outcome": "completed"}
    assert metrics.registry.get_sample_value("hms_worker_tasks_total", labels) == 1


async def test_an_exception_is_a_retryable_failure_and_the_task_is_acked(
    nats_url: str, ns: Namespace
) -> None:
    async def broken(task: Task, ctx: TaskContext) -> dict[str, Any]:
        raise ZeroDivisionError("division by zero in the scorer")

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(broken)) as worker:
        await publish_task(bus, make_task(1))
        [failed] = await wait_results(bus, 1)
        await eventually(lambda: lane_is_empty(bus), what="task acked and gone")

    assert isinstance(failed, TaskFailed)
    assert (failed.id, failed.retryable, failed.error) == (
        "tsk-1/failed",
        True,
        "ZeroDivisionError: division by zero in the scorer",
    )
    assert worker.statistics().failed == 1


async def test_a_permanent_task_error_is_not_retryable(nats_url: str, ns: Namespace) -> None:
    async def refuse(task: Task, ctx: TaskContext) -> dict[str, Any]:
        raise PermanentTaskError("complaint has no phone number")

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(refuse)):
        await publish_task(bus, make_task(1))
        [failed] = await wait_results(bus, 1)
        await eventually(lambda: lane_is_empty(bus), what="task acked and gone")

    assert isinstance(failed, TaskFailed)
    assert (failed.retryable, failed.error) == (
        False,
        "PermanentTaskError: complaint has no phone number",
    )


async def test_output_that_is_no_json_object_fails_permanently(
    nats_url: str, ns: Namespace
) -> None:
    async def odd(task: Task, ctx: TaskContext) -> Any:
        return ["a", "list"] if task.input["kind"] == "list" else {"when": object()}

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(odd)):
        await publish_task(bus, make_task(1, kind="list"))
        await publish_task(bus, make_task(2, kind="object"))
        results = await wait_results(bus, 2)

    by_task = {r.task: r for r in results}
    assert all(isinstance(r, TaskFailed) and not r.retryable for r in results)
    first, second = by_task["tsk-1"], by_task["tsk-2"]
    assert isinstance(first, TaskFailed)
    assert isinstance(second, TaskFailed)
    assert "returned list; it must return a dict" in first.error
    assert second.error.startswith("the output cannot be published: TypeError")


async def test_a_long_task_is_kept_alive_past_the_ack_wait(nats_url: str, ns: Namespace) -> None:
    deliveries: list[int] = []
    release = anyio.Event()

    async def slow(task: Task, ctx: TaskContext) -> dict[str, Any]:
        deliveries.append(ctx.delivery)
        await release.wait()
        return {}

    async with bus_for(nats_url, ns) as bus:
        await ensure_lane(bus.js, ns, LANE, ack_wait=1.0)
        async with open_worker(bus, worker_of(slow, concurrency=2)):
            await publish_task(bus, make_task(1))
            await eventually(lambda: deliveries == [1], what="task started")
            # Three ack waits: without in_progress the server would redeliver the task
            # to this worker's second free slot.
            with anyio.move_on_after(3.0):
                await eventually(lambda: len(deliveries) > 1, timeout=3.0)
            release.set()
            [done] = await wait_results(bus, 1)
        info = await bus.js.consumer_info(ns.tasks_stream, ns.lane_durable(LANE))

    assert deliveries == [1]
    assert isinstance(done, TaskCompleted)
    assert info.num_redelivered == 0


async def test_concurrency_n_runs_n_tasks_at_once(nats_url: str, ns: Namespace) -> None:
    running = 0
    most = 0
    release = anyio.Event()

    async def held(task: Task, ctx: TaskContext) -> dict[str, Any]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return {}

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(held, concurrency=3)):
        for n in range(7):
            await publish_task(bus, make_task(n))
        await eventually(lambda: running == 3, what="three tasks running")
        assert await lane_pending(bus.js, ns, LANE) == 7  # 4 waiting + 3 in hand
        release.set()
        results = await wait_results(bus, 7)

    assert most == 3
    assert sorted(r.task for r in results) == [f"tsk-{n}" for n in range(7)]


async def test_a_cancel_broadcast_sets_ctx_cancelled(nats_url: str, ns: Namespace) -> None:
    started = anyio.Event()

    async def cancellable(task: Task, ctx: TaskContext) -> dict[str, Any]:
        started.set()
        with anyio.fail_after(10):
            await ctx.cancelled.wait()
        return {"stopped": ctx.is_cancelled, "reason": ctx.cancel_reason}

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(cancellable)) as worker:
        await publish_task(bus, make_task(1))
        with anyio.fail_after(5):
            await started.wait()
        cancel = CancelTask(
            id="tsk-1/cancel",
            task="tsk-1",
            run="COM-1",
            step="label",
            attempt=1,
            reason="run cancelled",
        )
        await bus.nc.publish(ns.cancel(LANE), encode(cancel))
        [done] = await wait_results(bus, 1)

    assert isinstance(done, TaskCompleted)
    assert done.output == {"stopped": True, "reason": "run cancelled"}
    assert worker.statistics().cancel_requests == 1


async def test_a_task_cancelled_before_it_is_pulled_is_acked_without_running(
    nats_url: str, ns: Namespace
) -> None:
    ran: list[str] = []

    async def record(task: Task, ctx: TaskContext) -> dict[str, Any]:
        ran.append(task.task)
        return {}

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(record)) as worker:
        cancel = CancelTask(
            id="tsk-1/cancel",
            task="tsk-1",
            run="COM-1",
            step="label",
            attempt=1,
            reason="superseded",
        )
        await bus.nc.publish(ns.cancel(LANE), encode(cancel))
        await eventually(lambda: worker.statistics().cancel_requests == 1, what="cancel heard")
        await publish_task(bus, make_task(1))
        await publish_task(bus, make_task(2))
        [done] = await wait_results(bus, 1)
        await eventually(lambda: lane_is_empty(bus), what="both tasks acked")

    assert ran == ["tsk-2"]
    assert done.task == "tsk-2"
    assert worker.statistics().skipped == 1


async def test_progress_is_published_once_and_counts_as_a_first_response(
    nats_url: str, ns: Namespace
) -> None:
    async def chatty(task: Task, ctx: TaskContext) -> dict[str, Any]:
        await ctx.progress("reading the complaint")
        await ctx.progress("scoring")
        return {}

    async with bus_for(nats_url, ns) as bus, open_worker(bus, worker_of(chatty)):
        await publish_task(bus, make_task(1))
        progress, done = await wait_results(bus, 2)

    assert isinstance(progress, TaskProgress)
    assert (progress.id, progress.note) == ("tsk-1/progress", "reading the complaint")
    assert isinstance(done, TaskCompleted)


async def test_the_registry_lists_a_worker_marks_it_draining_and_drops_it_on_stop(
    nats_url: str, ns: Namespace
) -> None:
    release = anyio.Event()

    async def held(task: Task, ctx: TaskContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with bus_for(nats_url, ns) as bus:
        kv = await bus.js.key_value(ns.workers_bucket)
        worker = worker_of(held, concurrency=4, version="v7")
        async with anyio.create_task_group() as tg:
            runner: WorkerRunner = await tg.start(run_worker, bus, worker)
            [info] = await live_workers(kv, LANE)
            assert (info.lane, info.version, info.capacity, info.state) == (
                "AI:labeler",
                "v7",
                4,
                "running",
            )
            assert info.instance == runner.instance
            assert await live_workers(kv, Lane("AI", "someone-else")) == []

            await publish_task(bus, make_task(1))
            await eventually(lambda: runner.statistics().in_flight == 1, what="task in hand")
            runner.stop()

            async def draining() -> bool:
                return [w.state for w in await live_workers(kv, LANE)] == ["draining"]

            await eventually(draining, what="registry says draining")
            release.set()
        # run_worker returned: stopped, and gone from the registry.
        assert await live_workers(kv) == []
        [done] = await stored_results(bus)
        assert isinstance(done, TaskCompleted)
        assert await lane_is_empty(bus)


async def test_stopping_finishes_the_task_in_hand_before_returning(
    nats_url: str, ns: Namespace
) -> None:
    started = anyio.Event()

    async def slowish(task: Task, ctx: TaskContext) -> dict[str, Any]:
        started.set()
        await anyio.sleep(0.5)  # the in-flight work that a stop must not cut short
        return {"finished": True}

    async with bus_for(nats_url, ns) as bus:
        async with open_worker(bus, worker_of(slowish), grace=10.0):
            await publish_task(bus, make_task(1))
            with anyio.fail_after(5):
                await started.wait()
        # open_worker's exit stopped intake and waited for the task.
        [done] = await stored_results(bus)
        assert isinstance(done, TaskCompleted)
        assert done.output == {"finished": True}
        assert await lane_is_empty(bus)


async def test_after_the_grace_period_the_task_in_hand_is_handed_back_at_once(
    nats_url: str, ns: Namespace
) -> None:
    calls: list[int] = []

    async def stubborn(task: Task, ctx: TaskContext) -> dict[str, Any]:
        calls.append(ctx.delivery)
        if ctx.delivery == 1:
            await anyio.sleep_forever()
        return {"delivery": ctx.delivery}

    async with bus_for(nats_url, ns) as bus:
        await ensure_lane(bus.js, ns, LANE, ack_wait=60.0)
        async with open_worker(bus, worker_of(stubborn), grace=0.2):
            await publish_task(bus, make_task(1))
            await eventually(lambda: calls == [1], what="first delivery running")
        # Nak'd on the way out: the next worker gets it now, not after 60 s.
        async with open_worker(bus, worker_of(stubborn)):
            [done] = await wait_results(bus, 1, timeout=5.0)

    assert calls == [1, 2]
    assert isinstance(done, TaskCompleted)
    assert done.output == {"delivery": 2}
