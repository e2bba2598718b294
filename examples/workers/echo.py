"""`SVC:echo`: the smallest useful worker; it answers with its input.

    hms worker run examples.workers.echo:fn          # serves SVC:echo

The input can ask for behaviours, for demos and tests of the worker SDK:

| input key | effect |
|---|---|
| `fail: "why"` | raise an error: a retryable `TaskFailed` |
| `refuse: "why"` | raise `PermanentTaskError`: a `TaskFailed` that is not retried |
| `hold: "<subject>"` | report progress, then wait until a message arrives on that core NATS subject (`nats pub <subject> go`) or the task is cancelled: a long task released by hand |
"""

from __future__ import annotations

from typing import Any

import anyio

from hms_bus.messages import Task
from hms_bus.worker import PermanentTaskError, TaskContext, lane


@lane("SVC:echo", concurrency=4, version="v1")
async def fn(task: Task, ctx: TaskContext) -> dict[str, Any]:
    if "fail" in task.input:
        raise RuntimeError(str(task.input["fail"]))
    if "refuse" in task.input:
        raise PermanentTaskError(str(task.input["refuse"]))
    released = None
    if hold := task.input.get("hold"):
        released = await _hold(str(hold), ctx)
    return {
        "echo": task.input,
        "by": ctx.worker,
        "delivery": ctx.delivery,
        "released": released,
        "cancelled": ctx.is_cancelled,
    }


async def _hold(subject: str, ctx: TaskContext) -> bool:
    """Wait for a message on `subject` (True) or a cancel of the task (False)."""
    nc = ctx.bus.nc
    sub = await nc.subscribe(subject)
    try:
        await nc.flush()  # subscribed before anyone hears that we hold
        await ctx.progress(f"holding until a message on {subject}")
        got_message = False
        async with anyio.create_task_group() as tg:

            async def on_message() -> None:
                nonlocal got_message
                await sub.next_msg(timeout=None)
                got_message = True
                tg.cancel_scope.cancel()

            async def on_cancel() -> None:
                await ctx.cancelled.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on_message)
            tg.start_soon(on_cancel)
        return got_message
    finally:
        await sub.unsubscribe()
