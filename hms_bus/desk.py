"""The clerk's and supervisor's desk, in Python: the human inbox and moving tasks.

`Desk(bus)` (or `client.desk`) does what `hms task ...` does, for a console or a
desk app: list the inbox, claim and release a task, complete or fail it, reassign
it to other people or reroute it to any lane. Each is the protocol `subjects.md`
describes ("Serving human tasks from another tool"):

- a claim is a compare-and-set on the inbox entry, so two clerks never both hold a
  task (`ClaimedError` names the holder), then a `ClaimTask` so the run records it;
- a result claims first (nobody else finishes it meanwhile), publishes the
  `TaskCompleted` / `TaskFailed`, waits for its PubAck, and only then deletes the
  entry (the dispatcher withdraws it too, so a crash in between leaves none);
- every message has an id derived from the task (and for claims the entry's
  revision), so a retried call is stored once.

A checkpoint in the inbox is decided with `Client.approve` / `Client.reject`, never
completed as a task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from nats.js.kv import KeyValue

from hms_bus import inbox
from hms_bus.connection import Bus
from hms_bus.errors import InvalidNameError, NotFoundError
from hms_bus.inbox import InboxEntry
from hms_bus.messages import (
    ClaimTask,
    ReleaseTask,
    RerouteTask,
    TaskCompleted,
    TaskFailed,
)
from hms_bus.subjects import Lane

__all__ = ["Desk"]


class Desk:
    """The inbox of human tasks and the commands that move tasks, on an open `Bus`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def _inbox(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(self.bus.ns.inbox_bucket)
        return self._kv

    async def tasks(self, lane: str | Lane | None = None) -> list[InboxEntry]:
        """The tasks waiting (of one `HUMAN:<role>` lane, or all), oldest first."""
        only = Lane.parse(lane) if isinstance(lane, str) else lane
        return await inbox.list_items(await self._inbox(), only)

    async def claim(self, task: str, by: str) -> InboxEntry:
        """Take the task: nobody else can complete it until `by` releases it."""
        entry = await inbox.claim(await self._inbox(), task, by)
        await self._tell(ClaimTask, "claim", entry, by)
        return entry

    async def release(self, task: str, by: str) -> InboxEntry:
        """Give a task `by` holds back to its lane."""
        entry = await inbox.release(await self._inbox(), task, by)
        await self._tell(ReleaseTask, "release", entry, by)
        return entry

    async def _tell(
        self, kind: type[ClaimTask | ReleaseTask], verb: str, entry: InboxEntry, by: str
    ) -> None:
        """Tell the run what the inbox now says (an id per revision: stored once)."""
        t = entry.item.task
        message = kind(id=f"{t.task}/{verb}/{entry.revision}", run=t.run, task=t.task, by=by)
        await self.bus.publish(self.bus.ns.command(verb), message)

    async def complete(self, task: str, by: str, output: Mapping[str, Any]) -> None:
        """Finish a task with its output (it must be unclaimed or held by `by`)."""

        def result(entry: InboxEntry) -> TaskCompleted:
            t = entry.item.task
            return TaskCompleted(
                id=f"{task}/done", task=task, run=t.run, step=t.step, attempt=t.attempt,
                by=by, output=dict(output), at=datetime.now(UTC),
            )  # fmt: skip

        await self._finish(task, by, result)

    async def fail(self, task: str, by: str, reason: str, *, permanent: bool = False) -> None:
        """Report that the task cannot be done; the step's retry policy decides, unless
        `permanent` (no retry can help)."""

        def result(entry: InboxEntry) -> TaskFailed:
            t = entry.item.task
            return TaskFailed(
                id=f"{task}/failed", task=task, run=t.run, step=t.step, attempt=t.attempt,
                error=reason, by=by, retryable=not permanent, at=datetime.now(UTC),
            )  # fmt: skip

        await self._finish(task, by, result)

    async def _finish(
        self, task: str, by: str, result: Callable[[InboxEntry], TaskCompleted | TaskFailed]
    ) -> None:
        kv = await self._inbox()
        found = await inbox.find(kv, task)
        if found is not None and found.item.task.kind == "checkpoint":
            raise InvalidNameError(
                f"{task} is a checkpoint: decide it with `hms approve` or `hms reject`"
            )
        entry = await inbox.claim(kv, task, by)
        await self.bus.publish(self.bus.ns.result(entry.lane), result(entry))
        await inbox.remove(kv, task)

    async def reassign(
        self, task: str, to: str, by: str, reason: str = "", *, run: str | None = None
    ) -> None:
        """Hand a task to another human lane (`HUMAN:<role>`); its open attempt is
        cancelled and a new one goes there."""
        if Lane.parse(to).kind != "HUMAN":
            raise InvalidNameError(
                f"reassign moves a task to people (HUMAN:<role>), not {to}; use reroute"
            )
        await self._move(task, to, by, reason, run)

    async def reroute(
        self, task: str, to: str, by: str, reason: str = "", *, run: str | None = None
    ) -> None:
        """Send a task to any lane (`AI:x`, `SVC:x`, `HUMAN:x`); its open attempt is
        cancelled. `run` is needed only for a task not in the inbox whose id is not
        the engine's `<run>/<step>/<attempt>`."""
        Lane.parse(to)
        await self._move(task, to, by, reason, run)

    async def _move(self, task: str, to: str, by: str, reason: str, run: str | None) -> None:
        entry = await inbox.find(await self._inbox(), task)
        run_id = run or (entry.item.task.run if entry else None)
        if run_id is None:
            # Task ids are `<run>/<step>/<attempt>` (engine); run ids hold no `/`.
            head, sep, _ = task.partition("/")
            if not sep:
                raise NotFoundError(f"no task {task!r} in the inbox; name its run with --run")
            run_id = head
        await self.bus.publish(
            self.bus.ns.command("reroute"),
            RerouteTask(
                id=f"{task}/reroute/{to}", run=run_id, task=task, to=to, by=by, reason=reason
            ),
        )
