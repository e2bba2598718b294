"""The worker SDK: a lane's worker is one async function.

    from hms_bus.messages import Task
    from hms_bus.worker import TaskContext, lane

    @lane("AI:fraud-labeler", concurrency=8, version="v3")
    async def label(task: Task, ctx: TaskContext) -> dict[str, object]:
        score = await model.score(task.input["text"])
        return {"fraud": score > 0.8, "score": score}

Run it with `hms worker run mymodule:label` (a daemon: metrics, heartbeats, graceful
SIGTERM), or inside a program:

    async with open_worker(bus, label) as worker:   # serves the lane in the block
        ...

The same few lines make a notifier, or any other service behind an `SVC:` lane:

    @lane("SVC:notify-sms", concurrency=20)
    async def send_sms(task: Task, ctx: TaskContext) -> dict[str, str]:
        if not task.input.get("to"):
            raise PermanentTaskError("no phone number")   # failed, not retried
        return {"sid": await sms.send(task.input["to"], task.input["text"])}

What the function returns or raises becomes the result (`TaskCompleted`, or
`TaskFailed` retryable unless it raised `PermanentTaskError`), published with a
deterministic id before the task is acked; only a worker that dies leaves a task to
be redelivered. The pieces: `hms_bus.worker_function` (declaring a function, its
`TaskContext`, outcome -> result), `hms_bus.worker_runner` (consuming the lane,
cancels, registry, graceful stop), `hms_bus.worker_registry` (who is live),
`hms_bus.lanes` (the lane's durable). This module is the public face.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from hms_bus.connection import Bus
from hms_bus.metrics import Metrics
from hms_bus.worker_function import (
    DEFAULT_CONCURRENCY,
    PermanentTaskError,
    TaskContext,
    TaskFunction,
    Worker,
    WorkerDefinitionError,
    as_worker,
    lane,
)
from hms_bus.worker_registry import WorkerInfo, live_workers
from hms_bus.worker_runner import WorkerRunner, WorkerStatistics

__all__ = [
    "DEFAULT_CONCURRENCY",
    "PermanentTaskError",
    "TaskContext",
    "TaskFunction",
    "Worker",
    "WorkerDefinitionError",
    "WorkerInfo",
    "WorkerRunner",
    "WorkerStatistics",
    "as_worker",
    "lane",
    "live_workers",
    "open_worker",
    "run_worker",
]

log = logging.getLogger(__name__)


async def run_worker(
    bus: Bus,
    worker: Worker | TaskFunction,
    *,
    concurrency: int | None = None,
    metrics: Metrics | None = None,
    task_status: TaskStatus[WorkerRunner] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until it is stopped (`runner.stop()`; the runner is what
    `await tg.start(run_worker, bus, fn)` returns) or cancelled."""
    runner = WorkerRunner(bus, as_worker(worker, concurrency=concurrency), metrics=metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        task_status.started(runner)


@asynccontextmanager
async def open_worker(
    bus: Bus,
    worker: Worker | TaskFunction,
    *,
    concurrency: int | None = None,
    metrics: Metrics | None = None,
    grace: float = 10.0,
    heartbeat_seconds: float = 5.0,
) -> AsyncIterator[WorkerRunner]:
    """Serve a lane while the block runs; on exit stop intake, let the tasks in hand
    finish within `grace` seconds, then cancel them (they are nak'd, so redelivered)."""
    runner = WorkerRunner(
        bus,
        as_worker(worker, concurrency=concurrency),
        metrics=metrics,
        heartbeat_seconds=heartbeat_seconds,
    )
    done = anyio.Event()

    async def run(*, task_status: TaskStatus[None]) -> None:
        try:
            await runner.run(task_status=task_status)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        try:
            yield runner
        finally:
            runner.stop()
            with anyio.move_on_after(grace) as waited:
                await done.wait()
            if waited.cancelled_caught:
                log.warning(
                    "worker %s: grace of %.1fs over; cancelling in-flight tasks",
                    runner.instance,
                    grace,
                )
                tg.cancel_scope.cancel()
