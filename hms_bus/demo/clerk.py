"""The auto-clerk: plays the people behind the human lanes of the demo.

It watches the inbox bucket and, after a short delay (a person reading the task),
does what a clerk does with `hms task claim` / `complete` / `hms approve`: claims
the task in the inbox and tells the dispatcher (`ClaimTask`), then either completes
it with a plausible answer (`TaskCompleted` on the lane's result subject, and the
item leaves the inbox) or, for a checkpoint, approves it with who and why, one
distinct person per approval needed (four eyes: two lawyers).

Every action is idempotent (deterministic message ids, a claim by the same person
is a no-op, approvals are checked against the run's decisions first), so a clerk
restarted mid-task, or two clerks, finish the work once. A task somebody else has
claimed is left to them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.js.kv import KeyValue

from hms_bus import inbox
from hms_bus.connection import Bus
from hms_bus.demo.progress import wait_run
from hms_bus.errors import HmsError
from hms_bus.messages import Approve, ClaimTask, Task, TaskCompleted
from hms_bus.runs import RunStore
from hms_bus.subjects import Lane
from hms_bus.workflow.state import FINISHED_STEP, RunState

__all__ = ["CHECKPOINT_REASONS", "HUMAN_ANSWERS", "ROSTER", "Clerk", "human_answer"]

log = logging.getLogger(__name__)

_NETWORK = (nats.errors.Error, OSError, TimeoutError)
_item_decoder = msgspec.json.Decoder(inbox.InboxItem)

#: Who staffs each role in the demo (as many as its checkpoints need approvers).
ROSTER: dict[str, tuple[str, ...]] = {
    "legal-staff": ("counsel-amy", "counsel-raj"),
    "senior-counsel": ("counsel-chen",),
    "investigator": ("investigator-lee",),
    "intake-clerk": ("intake-sam",),
    "supervisor": ("supervisor-kim",),
    "county-clerk": ("alice@county.gov",),
    "fsa-officer": ("officer-jdavis@fsa.gov",),
    "fsa-supervisor": ("supervisor-ruiz@fsa.gov",),
    "passport-clerk": ("clerk-ana", "clerk-ben"),
    "passport-clerk-backup": ("clerk-cho",),
}


def _digits(text: str, n: int) -> str:
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return str(value % 10**n).zfill(n)


def _investigate(task: Task) -> dict[str, Any]:
    return {"caseNumber": f"INV-{_digits(task.run, 4)}", "assigned": True}


def _review(task: Task) -> dict[str, Any]:
    high = task.input.get("severity") == "High"
    if high:
        return {"decision": "fraud", "notes": "impostor scam: refer for enforcement"}
    return {"decision": "no-action", "notes": "no fraud found"}


def _escalated(task: Task) -> dict[str, Any]:
    return {"decision": "fraud", "escalated": True}


def _ship(task: Task) -> dict[str, Any]:
    return {"tracking": f"1Z999{_digits(task.run, 6)}", "shipped": True}


#: Answers to human *tasks*, by (workflow, step); anything else gets `{"done": true}`.
HUMAN_ANSWERS: dict[tuple[str, str], Callable[[Task], dict[str, Any]]] = {
    ("fcc-robocall", "hand_off"): _investigate,
    ("fcc-robocall", "triage"): lambda t: {"needs_human": True, "score": 0.9},
    ("ftc-complaint", "human_review"): _review,
    ("ftc-complaint", "escalate"): _escalated,
    ("vaccine-card", "ship_physical"): _ship,
}

#: Why a checkpoint is approved, by (workflow, step).
CHECKPOINT_REASONS: dict[tuple[str, str], str] = {
    ("fcc-robocall", "legal_review"): "meets the enforcement threshold",
    ("loan-forgiveness", "human_review"): "income and documents verified",
    ("passport-renewal", "human_verify"): "photo meets ICAO specs",
    ("passport-renewal", "verify_new_photo"): "new photo meets ICAO specs",
}


def human_answer(task: Task) -> dict[str, Any]:
    """The demo's answer to a human task."""
    answer = HUMAN_ANSWERS.get((task.workflow, task.step))
    return answer(task) if answer is not None else {"done": True}


class Clerk:
    """Serves human lanes of the inbox (of `roles`, or every role) on a live bus.

    `delay`: seconds before claiming a task, and again before completing or deciding
    it (a person reading it). `roster` names the people of each role; `patience` is
    how long to wait for the dispatcher to apply a claim or an approval.
    """

    name = "demo-clerk"

    def __init__(
        self,
        bus: Bus,
        *,
        delay: float = 1.0,
        roles: Collection[str] | None = None,
        roster: Mapping[str, tuple[str, ...]] = ROSTER,
        patience: float = 10.0,
    ) -> None:
        self._bus = bus
        self._delay = delay
        self._roles = set(roles) if roles is not None else None
        self._roster = roster
        self._patience = patience
        self._busy: set[str] = set()
        self._finished: set[str] = set()
        self.done: list[str] = []  # task ids finished, in order (for tests and the summary)
        self._stop = anyio.Event()
        self._inbox: KeyValue | None = None
        self._runs_kv: KeyValue | None = None

    def people(self, role: str) -> tuple[str, ...]:
        return self._roster.get(role) or (f"demo-{role}",)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        js, ns = self._bus.js, self._bus.ns
        self._inbox = await js.key_value(ns.inbox_bucket)
        self._runs_kv = await js.key_value(ns.runs_bucket)
        async with anyio.create_task_group() as tg:
            watcher = await self._inbox.watchall()
            try:
                tg.start_soon(self._until_stopped, tg)
                log.info(
                    "demo clerk ready (roles: %s)", ", ".join(sorted(self._roles or ())) or "all"
                )
                task_status.started()
                async for entry in watcher:
                    if entry is None or entry.operation is not None or not entry.value:
                        continue  # the end of the initial values, a delete
                    self._consider(tg, entry.value)
            finally:
                with anyio.CancelScope(shield=True):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _until_stopped(self, tg: TaskGroup) -> None:
        await self._stop.wait()
        tg.cancel_scope.cancel()

    @property
    def _kv(self) -> KeyValue:
        assert self._inbox is not None, "clerk not running"
        return self._inbox

    def _consider(self, tg: TaskGroup, value: bytes) -> None:
        try:
            item = _item_decoder.decode(value)
        except msgspec.DecodeError as exc:
            log.warning("demo clerk: ignoring an inbox value: %s", exc)
            return
        task = item.task
        role = Lane.parse(task.lane).name
        if self._roles is not None and role not in self._roles:
            return
        if item.claimed_by is not None and item.claimed_by not in self.people(role):
            return  # a person took it: theirs
        if task.task in self._busy or task.task in self._finished:
            return
        self._busy.add(task.task)
        tg.start_soon(self._serve, task)

    async def _serve(self, task: Task) -> None:
        try:
            await anyio.sleep(self._delay)
            if task.kind == "checkpoint":
                await self._decide(task)
            else:
                await self._complete(task)
            self._finished.add(task.task)
            self.done.append(task.task)
        except (HmsError, *_NETWORK) as exc:
            # Gone from the inbox (cancelled, done by someone), held by a person, or
            # the server away: another look comes with the next change of the item.
            log.info("demo clerk: left task %s: %s", task.task, exc)
        finally:
            self._busy.discard(task.task)

    async def _claim(self, task: Task, by: str) -> None:
        await inbox.claim(self._kv, task.task, by)
        claim = ClaimTask(id=f"{task.task}/claim/{by}", run=task.run, task=task.task, by=by)
        await self._bus.publish(self._bus.ns.command("claim"), claim)
        # Act on the engine's view, not ahead of it: the claim is applied first.
        await self._wait_run(task.run, _applied(claim.id))

    async def _complete(self, task: Task) -> None:
        by = self.people(Lane.parse(task.lane).name)[0]
        await self._claim(task, by)
        await anyio.sleep(self._delay)
        done = TaskCompleted(
            id=f"{task.task}/done",
            task=task.task,
            run=task.run,
            step=task.step,
            attempt=task.attempt,
            by=by,
            output=human_answer(task),
            at=datetime.now(UTC),
        )
        await self._bus.publish(self._bus.ns.result(Lane.parse(task.lane)), done)
        await inbox.remove(self._kv, task.task)
        log.info("demo clerk %s completed %s of %s", by, task.step, task.run)

    async def _decide(self, task: Task) -> None:
        """Approve with as many distinct people as the checkpoint needs; someone the
        engine refuses (separation of duties) is followed by the next person."""
        needed = int(task.input.get("approvals", 1) or 1)
        people = list(self.people(Lane.parse(task.lane).name))
        people += [f"demo-approver-{n}" for n in range(1, needed + 1)]
        reason = CHECKPOINT_REASONS.get((task.workflow, task.step), "approved by the demo clerk")
        for by in people:
            run = await self._run(task.run)
            if run is None or _step_over(run, task.step):
                return
            if by in _deciders(run, task.step):
                continue
            holder = await _holder(self._kv, task.task)
            if holder is not None and holder != by:
                await inbox.release(self._kv, task.task, holder)
            await self._claim(task, by)
            await anyio.sleep(self._delay)
            approve = Approve(
                id=f"{task.task}/approve/{by}", run=task.run, step=task.step, by=by, reason=reason
            )
            await self._bus.publish(self._bus.ns.command("approve"), approve)
            await self._wait_run(task.run, _applied(approve.id))
            log.info("demo clerk %s approved %s of %s", by, task.step, task.run)

    async def _run(self, run_id: str) -> RunState | None:
        assert self._runs_kv is not None
        stored = await RunStore(self._runs_kv).get(run_id)
        return stored.run if stored is not None else None

    async def _wait_run(self, run_id: str, predicate: Callable[[RunState], bool]) -> None:
        """Until the run's state satisfies `predicate` (a KV watch: pushed, not polled),
        at most `patience` seconds; then go on regardless (every next step is idempotent)."""
        assert self._runs_kv is not None
        if await wait_run(self._runs_kv, run_id, predicate, self._patience) is not None:
            return
        log.warning(
            "demo clerk: run %s did not reach the expected state in %.0fs", run_id, self._patience
        )


def _applied(input_id: str) -> Callable[[RunState], bool]:
    """The run has applied this input (accepted, refused or ignored: it was seen)."""
    return lambda run: input_id in run.applied


def _deciders(run: RunState, step: str) -> list[str]:
    st = run.steps.get(step)
    return [d.by for d in st.decisions] if st is not None else []


def _step_over(run: RunState, step: str) -> bool:
    st = run.steps.get(step)
    return run.finished or st is None or st.status in FINISHED_STEP


async def _holder(kv: KeyValue, task_id: str) -> str | None:
    entry = await inbox.find(kv, task_id)
    return entry.item.claimed_by if entry is not None else None
