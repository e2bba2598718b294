"""`Desk`, the inbox from Python (what a console uses), against a real server with
the dispatcher and router running in-process."""

from __future__ import annotations

import pytest

from hms_bus.client import Client
from hms_bus.errors import InvalidNameError, NotFoundError
from hms_bus.inbox import ClaimedError
from hms_bus.subjects import Namespace
from tests.e2e.harness import in_process_system
from tests.e2e.sla_system import run_state, start_text
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

DESK = """
id: desk-sdk
prefix: DSK
start: DeskRequest
steps:
  - id: sort
    actor: HUMAN:clerk
  - id: sign_off
    type: checkpoint
    role: supervisor
"""


async def test_a_clerk_claims_and_completes_and_a_checkpoint_is_not_a_task(
    nats_url: str, ns: Namespace
) -> None:
    async with in_process_system(nats_url, ns) as bus:
        desk = Client(bus).desk
        run_id = await start_text(bus, DESK, "DeskRequest", "desk-1")
        [waiting] = await eventually(lambda: desk.tasks("HUMAN:clerk"), timeout=20, what="sort")
        task = waiting.item.task.task
        claimed = await desk.claim(task, "alice")
        with pytest.raises(ClaimedError, match="claimed by alice"):
            await desk.complete(task, "bob", {"pile": "b"})
        await desk.complete(task, "alice", {"pile": "a"})
        [checkpoint] = await eventually(
            lambda: desk.tasks("HUMAN:supervisor"), timeout=20, what="the sign-off"
        )
        with pytest.raises(InvalidNameError, match="is a checkpoint: decide it"):
            await desk.complete(checkpoint.item.task.task, "sam", {})
        run = await run_state(bus, run_id)
        left = await desk.tasks("HUMAN:clerk")

    assert claimed.item.claimed_by == "alice"
    assert run.results["sort"] == {"pile": "a"}
    assert run.tasks[task].by == "alice"
    assert run.steps["sort"].by == ["alice"]
    assert left == []


async def test_a_task_is_released_reassigned_and_refused_elsewhere(
    nats_url: str, ns: Namespace
) -> None:
    async with in_process_system(nats_url, ns) as bus:
        desk = Client(bus).desk
        await start_text(bus, DESK, "DeskRequest", "desk-2")
        [waiting] = await eventually(lambda: desk.tasks("HUMAN:clerk"), timeout=20, what="sort")
        task = waiting.item.task.task
        await desk.claim(task, "alice")
        with pytest.raises(ClaimedError, match="only they can release it"):
            await desk.release(task, "bob")
        released = await desk.release(task, "alice")
        with pytest.raises(InvalidNameError, match="not AI:robot; use reroute"):
            await desk.reassign(task, "AI:robot", "sup", "faster")
        await desk.reassign(task, "HUMAN:seniors", "sup", "needs experience")
        [moved] = await eventually(
            lambda: desk.tasks("HUMAN:seniors"), timeout=20, what="the task with seniors"
        )
        with pytest.raises(NotFoundError, match="name its run with --run"):
            await desk.reroute("no-such-task", "HUMAN:x", "sup")

    assert released.item.claimed_by is None
    assert moved.item.task.step == "sort"
    assert moved.item.task.attempt == 2
