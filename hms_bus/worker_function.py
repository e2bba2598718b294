"""A lane's task function: how it is declared (`@lane`, `Worker`), what it gets
(`TaskContext`), and how the outcome of one attempt becomes a result message.

A task function is `async def fn(task: Task, ctx: TaskContext) -> dict | None`. What it
does decides the result the worker publishes on the lane's results subject:

| the function | result (id) |
|---|---|
| returns a dict, a msgspec Struct or None (= `{}`) | `TaskCompleted` (`<task>/done`) with it as `output` |
| raises `PermanentTaskError` (or `PermanentError`) | `TaskFailed(retryable=False)` (`<task>/failed`): no more retries |
| raises anything else | `TaskFailed(retryable=True)`: the step's retry policy decides |
| returns something that is not a JSON object | `TaskFailed(retryable=False)`: the same code would do it again |

An ExceptionGroup is permanent only when every exception in it is; its error text
names all of them. The task id is unique per attempt, so result ids are deterministic:
a result published twice (a crash between publish and ack) is stored once.

This module does no I/O of its own: `TaskContext` reaches the server through the
callbacks its runner (`hms_bus.worker_runner`) gives it, so declarations and the
outcome mapping are tested without NATS.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import anyio
import msgspec

from hms_bus.errors import HmsError, PermanentError
from hms_bus.messages import Task, TaskCompleted, TaskFailed, TaskProgress
from hms_bus.subjects import Lane

if TYPE_CHECKING:
    from hms_bus.connection import Bus

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MAX_ERROR_CHARS",
    "PermanentTaskError",
    "TaskContext",
    "TaskFunction",
    "TaskResult",
    "Worker",
    "WorkerDefinitionError",
    "as_worker",
    "completion",
    "describe",
    "failure",
    "lane",
    "run_attempt",
]

log = logging.getLogger(__name__)

#: An error text longer than this is cut: a result must stay far below max_payload.
MAX_ERROR_CHARS = 2000

DEFAULT_CONCURRENCY = 10
_ATTR = "__hms_worker__"

TaskResult: TypeAlias = TaskCompleted | TaskFailed
TaskFunction: TypeAlias = Callable[[Task, "TaskContext"], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Any])


class PermanentTaskError(HmsError):
    """Raise from a task function when retrying cannot help (invalid input, a refusal
    by the service): the attempt fails with `retryable=False`."""


class WorkerDefinitionError(HmsError, ValueError):
    """A task function or its lane options are unusable (the CLI exits 2 on it)."""


@dataclass(frozen=True, slots=True)
class Worker:
    """A task function with its lane and how to run it.

    `ack_wait` / `max_deliver` (None: keep the lane's, or the defaults 30 s / 3 for a
    new lane) set the lane's durable, shared by every worker of the lane.
    """

    fn: TaskFunction
    lane: Lane
    concurrency: int = DEFAULT_CONCURRENCY
    version: str = ""
    ack_wait: float | None = None
    max_deliver: int | None = None

    def __post_init__(self) -> None:
        if self.lane.kind == "HUMAN":
            raise WorkerDefinitionError(
                f"lane {self.lane} is a HUMAN lane: clerks serve it through the inbox; "
                "workers serve AI: and SVC: lanes"
            )
        if self.concurrency < 1:
            raise WorkerDefinitionError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.ack_wait is not None and self.ack_wait <= 0:
            raise WorkerDefinitionError(f"ack_wait must be positive, got {self.ack_wait}")
        if self.max_deliver is not None and (self.max_deliver == 0 or self.max_deliver < -1):
            raise WorkerDefinitionError(
                f"max_deliver must be -1 (unlimited) or at least 1, got {self.max_deliver}"
            )
        # An async function, or an object whose `__call__` is one (a stateful worker).
        call = inspect.getattr_static(self.fn, "__call__", None)
        if not (inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(call)):
            raise WorkerDefinitionError(
                f"{self.function} must be an async function: async def fn(task, ctx) -> dict"
            )

    @property
    def function(self) -> str:
        """`module:qualname` of the function, for logs and the registry."""
        fn = self.fn
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"{getattr(fn, '__module__', '?')}:{name}"


def lane(
    spec: str | Lane,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    version: str = "",
    ack_wait: float | None = None,
    max_deliver: int | None = None,
) -> Callable[[F], F]:
    """Mark an async task function as the worker of a lane (`"AI:fraud-labeler"`).

    The function itself is returned unchanged (callable and testable as before);
    `as_worker(fn)` reads the marking."""
    parsed = spec if isinstance(spec, Lane) else Lane.parse(spec)

    def mark(fn: F) -> F:
        setattr(fn, _ATTR, Worker(fn, parsed, concurrency, version, ack_wait, max_deliver))
        return fn

    return mark


def as_worker(
    obj: object,
    *,
    lane: str | Lane | None = None,
    concurrency: int | None = None,
    version: str | None = None,
    ack_wait: float | None = None,
    max_deliver: int | None = None,
) -> Worker:
    """A `Worker` from a Worker, a `@lane` function or a plain async function, with
    the options given here (not None) overriding its own."""
    base = obj if isinstance(obj, Worker) else getattr(obj, _ATTR, None)
    the_lane = Lane.parse(lane) if isinstance(lane, str) else lane
    if not isinstance(base, Worker):
        name = getattr(obj, "__qualname__", repr(obj))
        if not callable(obj):
            raise WorkerDefinitionError(f"{name} is not a task function")
        if the_lane is None:
            raise WorkerDefinitionError(
                f"{name} has no @lane(...) marking: say which lane it serves "
                "(--lane KIND:name, or lane= in code)"
            )
        base = Worker(obj, the_lane)
    changes: dict[str, Any] = {
        "lane": the_lane,
        "concurrency": concurrency,
        "version": version,
        "ack_wait": ack_wait,
        "max_deliver": max_deliver,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base


class TaskContext:
    """What a running task function can use besides its `Task`.

    - `cancelled`: an `anyio.Event`, set when the router broadcasts a `CancelTask` for
      this task (run cancelled, attempt superseded); `is_cancelled` reads it. Stopping
      early is up to the function: whatever it then returns or raises is still
      published, and the engine records it as superseded.
    - `progress(note)`: report that work is under way. The first call publishes a
      `TaskProgress` (id `<task>/progress`: later ones would be duplicates); every call
      tells the server the task is alive (`in_progress`). Long tasks are kept alive
      without it, too.
    - `worker` (the `by` of results), `lane`, `deadline` (the step's, may be None),
      `delivery` (1 on the first delivery; more after a worker died holding it), and
      `bus`, the worker's connection, for functions that publish or read KV.
    """

    __slots__ = (
        "_cancel_requested",
        "_cancelled",
        "_keep_alive",
        "_progressed",
        "_report",
        "bus",
        "cancel_reason",
        "delivery",
        "lane",
        "task",
        "worker",
    )

    def __init__(
        self,
        task: Task,
        *,
        lane: Lane,
        worker: str,
        bus: Bus,
        delivery: int = 1,
        keep_alive: Callable[[], Awaitable[None]],
        report: Callable[[TaskProgress], Awaitable[None]],
    ) -> None:
        self.task = task
        self.lane = lane
        self.worker = worker
        self.bus = bus
        self.delivery = delivery
        self.cancel_reason: str | None = None
        self._keep_alive = keep_alive
        self._report = report
        self._progressed = False
        self._cancel_requested = False
        # Created on first use: most tasks are never cancelled nor asked about it.
        self._cancelled: anyio.Event | None = None

    @property
    def deadline(self) -> datetime | None:
        return self.task.deadline

    @property
    def cancelled(self) -> anyio.Event:
        if self._cancelled is None:
            self._cancelled = anyio.Event()
            if self._cancel_requested:
                self._cancelled.set()
        return self._cancelled

    @property
    def is_cancelled(self) -> bool:
        return self._cancel_requested

    def cancel(self, reason: str) -> None:
        """Called by the worker when a CancelTask for this task arrives."""
        if self._cancel_requested:
            return
        self._cancel_requested = True
        self.cancel_reason = reason
        if self._cancelled is not None:
            self._cancelled.set()

    async def progress(self, note: str = "") -> None:
        await self._keep_alive()
        if self._progressed:
            return
        self._progressed = True
        t = self.task
        await self._report(
            TaskProgress(
                id=f"{t.task}/progress",
                task=t.task,
                run=t.run,
                step=t.step,
                attempt=t.attempt,
                by=self.worker,
                note=note,
                at=datetime.now(UTC),
            )
        )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _is_permanent(exc: BaseException) -> bool:
    return all(isinstance(leaf, PermanentTaskError | PermanentError) for leaf in _leaves(exc))


def describe(exc: BaseException) -> str:
    """`Type: message`, or every exception of a group, on one line, bounded."""
    leaves = _leaves(exc)
    text = "; ".join(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__ for e in leaves)
    if len(leaves) > 1:
        text = f"{len(leaves)} errors: {text}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def failure(task: Task, by: str, error: str, *, retryable: bool) -> TaskFailed:
    return TaskFailed(
        id=f"{task.task}/failed",
        task=task.task,
        run=task.run,
        step=task.step,
        attempt=task.attempt,
        error=error,
        by=by,
        retryable=retryable,
        at=datetime.now(UTC),
    )


def completion(task: Task, by: str, output: Any) -> TaskResult:
    """A TaskCompleted carrying `output`, or a permanent failure if it is no JSON object."""
    if output is None:
        output = {}
    elif isinstance(output, msgspec.Struct):
        output = msgspec.to_builtins(output)
    elif isinstance(output, Mapping) and not isinstance(output, dict):
        output = dict(output)
    if not isinstance(output, dict):
        return failure(
            task,
            by,
            f"the task function returned {type(output).__name__}; it must return a dict "
            "(a JSON object), a msgspec Struct or None",
            retryable=False,
        )
    return TaskCompleted(
        id=f"{task.task}/done",
        task=task.task,
        run=task.run,
        step=task.step,
        attempt=task.attempt,
        by=by,
        output=output,
        at=datetime.now(UTC),
    )


async def run_attempt(fn: TaskFunction, task: Task, ctx: TaskContext) -> TaskResult:
    """Run the function once and map its outcome onto a result (never raises,
    except cancellation, which is not an outcome)."""
    try:
        output = await fn(task, ctx)
    except Exception as exc:  # the boundary where a task function's error becomes a result
        permanent = _is_permanent(exc)
        if permanent:
            log.warning(
                "task %s (run %s, step %s) failed permanently: %s",
                task.task,
                task.run,
                task.step,
                describe(exc),
            )
        else:
            log.warning(
                "task %s (run %s, step %s, attempt %d) failed",
                task.task,
                task.run,
                task.step,
                task.attempt,
                exc_info=exc,
            )
        return failure(task, ctx.worker, describe(exc), retryable=not permanent)
    return completion(task, ctx.worker, output)
