"""Task functions the crash tests run as real worker processes
(`hms worker run tests.e2e.workers:echo`)."""

from __future__ import annotations

from typing import Any

import anyio

from hms_bus.messages import Task
from hms_bus.worker import TaskContext, lane

__all__ = ["echo", "slow"]

#: Seconds the slow lane's task takes: long enough to be killed in the middle of it.
SLOW_SECONDS = 2.0


@lane("SVC:e2e-echo", concurrency=64)
async def echo(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Answers at once with what it was given."""
    return {"step": task.step, "input": task.input}


@lane("SVC:e2e-slow", concurrency=4)
async def slow(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Says it started (so a test knows it is mid-task), works a while, answers with
    the delivery it ran on (1: first time; more: it was redelivered)."""
    await ctx.progress("started")
    await anyio.sleep(SLOW_SECONDS)
    return {"delivery": ctx.delivery, "worker": ctx.worker}
