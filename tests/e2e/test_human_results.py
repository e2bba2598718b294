"""A human task ended by a result published as `subjects.md` describes it (no inbox
bookkeeping by the publisher: a clerk tool in another language, or one that crashed
after publishing) leaves the inbox: the dispatcher withdraws it, the router removes
it. The dispatcher and router run in-process on a real server."""

from __future__ import annotations

import pytest

from hms_bus.messages import TaskCompleted, TaskFailed
from hms_bus.subjects import Lane, Namespace
from tests.e2e.harness import in_process_system
from tests.e2e.sla_system import inbox_items, run_state, start_text
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

DESK = """
id: result-desk
prefix: RES
start: DeskRequest
steps:
  - id: review
    actor: HUMAN:clerk
    retry: {attempts: 2}
  - id: file
    actor: HUMAN:clerk
"""
CLERK = Lane.parse("HUMAN:clerk")


async def test_a_result_published_by_hand_takes_the_task_out_of_the_inbox(
    nats_url: str, ns: Namespace
) -> None:
    async with in_process_system(nats_url, ns) as bus:
        run_id = await start_text(bus, DESK, "DeskRequest", "desk-1")

        async def listed(step: str, besides: str = "") -> str:
            """Until the inbox lists an attempt of `step` other than `besides`."""

            async def found() -> str | None:
                items = await inbox_items(bus, str(CLERK))
                tasks = [e.item.task.task for e in items if e.item.task.step == step]
                return next((task for task in tasks if task != besides), None)

            task = await eventually(found, timeout=20, what=f"{step} listed")
            assert task is not None
            return task

        first = await listed("review")
        await bus.publish(
            bus.ns.result(CLERK),
            TaskFailed(id="f-1", task=first, run=run_id, step="review", attempt=1,
                       error="form unreadable", by="alice"),
        )  # fmt: skip
        second = await listed("review", besides=first)  # the retry
        await bus.publish(
            bus.ns.result(CLERK),
            TaskCompleted(id="c-1", task=second, run=run_id, step="review", attempt=2,
                          output={"ok": True}, by="alice"),
        )  # fmt: skip
        filing = await listed("file")

        async def only_filing_left() -> bool:
            items = await inbox_items(bus, str(CLERK))
            return [e.item.task.task for e in items] == [filing]

        # Both review attempts leave: the failed one and the completed one.
        await eventually(only_filing_left, timeout=20, what="review out of the inbox")
        run = await run_state(bus, run_id)

    assert first != second
    assert run.tasks[first].status == "FAILED"
    assert run.tasks[second].status == "COMPLETED"
    assert run.steps["review"].status == "DONE"
