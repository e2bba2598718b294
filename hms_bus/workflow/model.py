"""The workflow definition: what the YAML loader and the Python builder produce.

A `Workflow` is a frozen msgspec Struct, so a validated definition round-trips
through JSON: that is how it is stored (versioned) in the workflows KV bucket and
how a dispatcher in another process gets exactly the version a run started with.
Expressions are kept as their source text; `hms_bus.workflow.expr` compiles them
(and the loader has already proved that they parse).

`examples/README.md` is the language reference; this module is its data model.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

import msgspec

__all__ = [
    "END",
    "Action",
    "CalendarSpec",
    "CheckpointStep",
    "Duration",
    "Escalation",
    "FanoutStep",
    "Join",
    "Retry",
    "Rung",
    "Step",
    "SwitchStep",
    "TaskStep",
    "WaitStep",
    "Workflow",
]

#: The pseudo-step a `next`, a switch case or an escalation can name to end a branch.
END = "end"


class Duration(msgspec.Struct, frozen=True):
    """A clock length: wall-clock `seconds`, or working seconds on a calendar.

    `3 business days` on a calendar with 8 working hours a day is
    `Duration(seconds=3*8*3600, business=True)`: business days count whole
    working days of the calendar's hours. `calendar` None means the workflow's.
    """

    seconds: float
    business: bool = False
    calendar: str | None = None
    text: str = ""


class CalendarSpec(msgspec.Struct, frozen=True):
    """Working time: `hours` ("09:00", "17:00") local, on `weekdays` (0 = Monday)."""

    timezone: str = "UTC"
    hours: tuple[str, str] = ("09:00", "17:00")
    weekdays: tuple[int, ...] = (0, 1, 2, 3, 4)
    holidays: tuple[date, ...] = ()


class Retry(msgspec.Struct, frozen=True):
    """`attempts` counts the first try. Delay n (n >= 1) before attempt n+1 is
    `min(backoff * multiplier**(n-1), max_backoff)`, spread by +-`jitter` (a fraction),
    the jitter drawn deterministically from the attempt's id so replays agree."""

    attempts: int = 1
    backoff: Duration | None = None
    max_backoff: Duration | None = None
    multiplier: float = 1.0
    jitter: float = 0.0


class Action(msgspec.Struct, frozen=True):
    """What happens when a clock runs out; several keys may combine in one rung."""

    reassign: str | None = None
    escalate: str | None = None
    notify: tuple[str, ...] = ()
    fail: bool = False
    reset_clock: bool = False


class Rung(msgspec.Struct, frozen=True):
    """One rung of a ladder: `action` at `at` times the SLA (0.75, 1.0, 1.5)."""

    at: float
    action: Action


class Escalation(msgspec.Struct, frozen=True):
    """`on_timeout`: rungs in ascending `at`; a single action is one rung at 1.0."""

    rungs: tuple[Rung, ...]


class Join(msgspec.Struct, frozen=True):
    mode: Literal["all", "any", "at_least"] = "all"
    n: int = 0


class _StepBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Keys every step has. `needs` None means "follows the step written before it"
    (fall-through, see `Workflow.fall_through`); an empty tuple means "at start"."""

    id: str
    needs: tuple[str, ...] | None = None
    when: str | None = None
    next: str | None = None
    optional: bool = False
    on_failure: str | None = None


class TaskStep(_StepBase, tag="task", frozen=True):
    """`skills`: what the lane that takes it must offer (see `hms_bus.routing`)."""

    actor: str
    input: dict[str, str] | None = None
    skills: tuple[str, ...] = ()
    sla: Duration | None = None
    retry: Retry = Retry()
    on_timeout: Escalation | None = None


class SwitchStep(_StepBase, tag="switch", frozen=True):
    expr: str
    cases: dict[str, str]
    default: str | None = None


class CheckpointStep(_StepBase, tag="checkpoint", frozen=True):
    role: str
    approvals: int = 1
    not_by: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()
    on_reject: str | None = None
    sla: Duration | None = None
    on_timeout: Escalation | None = None


class FanoutStep(_StepBase, tag="fanout", frozen=True):
    over: str
    actor: str
    as_: str = msgspec.field(default="item", name="as")
    input: dict[str, str] | None = None
    skills: tuple[str, ...] = ()
    join: Join = Join()
    sla: Duration | None = None
    retry: Retry = Retry()
    on_timeout: Escalation | None = None


class WaitStep(_StepBase, tag="wait", frozen=True):
    event: str
    limit: Duration | None = None
    on_timeout: Escalation | None = None


Step = TaskStep | SwitchStep | CheckpointStep | FanoutStep | WaitStep


class Workflow(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow version. `on_timeout` escalates the run's own `sla` (notify, run an
    escalation step, fail the run; or a ladder of these), as a step's does its own."""

    id: str
    version: int = 1
    title: str = ""
    prefix: str
    start: tuple[str, ...] = ()
    sla: Duration | None = None
    on_timeout: Escalation | None = None
    calendar: str | None = None
    case: str | None = None
    sensitive: tuple[str, ...] = ()
    calendars: dict[str, CalendarSpec] = msgspec.field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def index(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(step_id)

    def fall_through(self, step_id: str) -> str | None:
        """The step that follows `step_id` when it finishes with no explicit route.

        `next` wins; a switch never falls through; otherwise the step written after it,
        unless that one has `needs` (it starts from its needs instead). None: the
        branch ends here.
        """
        i = self.index(step_id)
        step = self.steps[i]
        if step.next is not None:
            return None if step.next == END else step.next
        if isinstance(step, SwitchStep) or i + 1 >= len(self.steps):
            return None
        following = self.steps[i + 1]
        return following.id if following.needs is None else None
