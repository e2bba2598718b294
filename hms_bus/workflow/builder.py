"""Build a workflow in Python: the same language as the YAML, with the same checks.

    from hms_bus.workflow.builder import Task, workflow

    vaccine = workflow(
        "vaccine-card", prefix="VAX", start="VaccineCardRequested", sla="48h",
        steps=[
            Task("verify_identity", ai="dmv-verifier", sla="2h"),
            Task("fetch_vaccine_log", ai="immunization-registry", sla="4h"),
            Task("generate_pdf", svc="pdf-generator", sla="1h", needs=["fetch_vaccine_log"]),
            Task("ship_physical", human="county-clerk", sla="24h", optional=True),
        ],
    )

Every keyword takes what the YAML key takes (durations as text, expressions as
text, `on_timeout` as a step id, `"fail"`, an action mapping or a `Ladder`), and model
objects too (`Duration`, `Retry`, `Escalation`, `CalendarSpec`). `workflow()` turns
the whole into the plain data a YAML file would hold and runs the loader's own
validation on it, so an invalid workflow raises `WorkflowError` whose problems point
at the line of the `Task(...)` call that is wrong.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from hms_bus.workflow import model
from hms_bus.workflow.source import WorkflowError, from_data
from hms_bus.workflow.validate import build

__all__ = [
    "Action",
    "Calendar",
    "Checkpoint",
    "Fanout",
    "Ladder",
    "Retry",
    "Rung",
    "Step",
    "StepSpec",
    "Switch",
    "Task",
    "Wait",
    "WorkflowError",
    "workflow",
]

Data = dict[str, Any]


def _caller() -> tuple[str, int]:
    """The file and line of the first frame outside this module: the author's call."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


def _plain(value: Any) -> Any:
    """Model objects and tuples as the plain data the YAML would hold."""
    if isinstance(value, model.Duration):
        text = value.text or value.seconds
        return {"duration": text, "calendar": value.calendar} if value.calendar else text
    if isinstance(value, model.Retry):
        return _drop_none(
            attempts=value.attempts,
            backoff=_plain(value.backoff),
            max_backoff=_plain(value.max_backoff),
            multiplier=value.multiplier,
            jitter=value.jitter,
        )
    if isinstance(value, model.Action):
        return _action(value)
    if isinstance(value, model.Escalation):
        return {"ladder": [{"at": rung.at, **_action(rung.action)} for rung in value.rungs]}
    if isinstance(value, model.CalendarSpec):
        return Calendar(
            value.timezone,
            list(value.hours),
            [_day_name(d) for d in value.weekdays],
            value.holidays,
        )
    if isinstance(value, model.Join):
        return value.mode if value.mode != "at_least" else {"at_least": value.n}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _day_name(day: int) -> str:
    return ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[day]


def _action(action: model.Action) -> Data:
    return _drop_none(
        reassign=action.reassign,
        escalate=action.escalate,
        notify=list(action.notify) or None,
        fail=action.fail or None,
        reset_clock=action.reset_clock or None,
    )


def _drop_none(**fields: Any) -> Data:
    return {key: _plain(value) for key, value in fields.items() if value is not None}


class StepSpec:
    """One step as plain data, with the line of the call that built it."""

    __slots__ = ("data", "file", "line")

    def __init__(self, **fields: Any) -> None:
        self.data: Data = _drop_none(**fields)
        self.file, self.line = _caller()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


def _actor(actor: str | None, ai: str | None, human: str | None, svc: str | None) -> str | None:
    """`ai="x"` is `actor="AI:x"` (the seeds write `Step("validate_form", svc="FSA")`)."""
    given = [
        f"{kind}:{name}" for kind, name in (("AI", ai), ("HUMAN", human), ("SVC", svc)) if name
    ]
    if actor is not None:
        given.insert(0, actor)
    if len(given) > 1:
        raise TypeError(f"give one of actor=, ai=, human=, svc=; got {', '.join(given)}")
    return given[0] if given else None


class Task(StepSpec):
    """`type: task`: one unit of work for an `AI:`, `HUMAN:` or `SVC:` lane."""

    __slots__ = ()

    def __init__(
        self,
        id: str,
        actor: str | None = None,
        *,
        ai: str | None = None,
        human: str | None = None,
        svc: str | None = None,
        input: Mapping[str, str] | None = None,
        skills: Sequence[str] | None = None,
        sla: str | float | model.Duration | Mapping[str, Any] | None = None,
        retry: int | Mapping[str, Any] | model.Retry | None = None,
        on_timeout: str | Mapping[str, Any] | model.Escalation | None = None,
        needs: Sequence[str] | None = None,
        when: str | None = None,
        next: str | None = None,
        optional: bool | None = None,
        on_failure: str | None = None,
    ) -> None:
        super().__init__(
            id=id, actor=_actor(actor, ai, human, svc), input=input, skills=skills, sla=sla,
            retry=retry, on_timeout=on_timeout, needs=needs, when=when, next=next,
            optional=optional, on_failure=on_failure,
        )  # fmt: skip


#: Source chapter 4 calls a task a step: `Step("eligibility_check", svc="IRS", sla="2m")`.
Step = Task


class Checkpoint(StepSpec):
    """`type: checkpoint`: a named human decision (approve / reject, who and why)."""

    __slots__ = ()

    def __init__(
        self,
        id: str,
        role: str,
        *,
        approvals: int | None = None,
        not_by: Sequence[str] | None = None,
        skills: Sequence[str] | None = None,
        on_reject: str | None = None,
        sla: str | float | model.Duration | Mapping[str, Any] | None = None,
        on_timeout: str | Mapping[str, Any] | model.Escalation | None = None,
        needs: Sequence[str] | None = None,
        when: str | None = None,
        next: str | None = None,
        optional: bool | None = None,
        on_failure: str | None = None,
    ) -> None:
        super().__init__(
            id=id, type="checkpoint", role=role, approvals=approvals, not_by=not_by,
            skills=skills, on_reject=on_reject, sla=sla, on_timeout=on_timeout, needs=needs,
            when=when, next=next, optional=optional, on_failure=on_failure,
        )  # fmt: skip


class Switch(StepSpec):
    """`type: switch`: route on the value of `expr`."""

    __slots__ = ()

    def __init__(
        self,
        id: str,
        expr: str,
        cases: Mapping[str | bool | int, str],
        *,
        default: str | None = None,
        needs: Sequence[str] | None = None,
        when: str | None = None,
        optional: bool | None = None,
        on_failure: str | None = None,
    ) -> None:
        super().__init__(
            id=id, type="switch", expr=expr, cases=dict(cases), default=default, needs=needs,
            when=when, optional=optional, on_failure=on_failure,
        )  # fmt: skip


class Fanout(StepSpec):
    """`type: fanout`: one task per item of `over`, joined by `join`."""

    __slots__ = ()

    def __init__(
        self,
        id: str,
        over: str,
        actor: str | None = None,
        *,
        ai: str | None = None,
        human: str | None = None,
        svc: str | None = None,
        as_: str | None = None,
        input: Mapping[str, str] | None = None,
        skills: Sequence[str] | None = None,
        join: str | Mapping[str, int] | model.Join | None = None,
        sla: str | float | model.Duration | Mapping[str, Any] | None = None,
        retry: int | Mapping[str, Any] | model.Retry | None = None,
        on_timeout: str | Mapping[str, Any] | model.Escalation | None = None,
        needs: Sequence[str] | None = None,
        when: str | None = None,
        next: str | None = None,
        optional: bool | None = None,
        on_failure: str | None = None,
    ) -> None:
        super().__init__(
            id=id, type="fanout", over=over, actor=_actor(actor, ai, human, svc), input=input,
            skills=skills, join=join, sla=sla, retry=retry, on_timeout=on_timeout, needs=needs,
            when=when, next=next, optional=optional, on_failure=on_failure,
        )  # fmt: skip
        if as_ is not None:
            self.data["as"] = as_


class Wait(StepSpec):
    """`type: wait`: wait for an external event, with the run's clock stopped."""

    __slots__ = ()

    def __init__(
        self,
        id: str,
        event: str,
        *,
        limit: str | float | model.Duration | Mapping[str, Any] | None = None,
        on_timeout: str | Mapping[str, Any] | model.Escalation | None = None,
        needs: Sequence[str] | None = None,
        when: str | None = None,
        next: str | None = None,
        optional: bool | None = None,
        on_failure: str | None = None,
    ) -> None:
        super().__init__(
            id=id, type="wait", event=event, limit=limit, on_timeout=on_timeout, needs=needs,
            when=when, next=next, optional=optional, on_failure=on_failure,
        )  # fmt: skip


def Retry(
    attempts: int,
    backoff: str | float | None = None,
    *,
    max_backoff: str | float | None = None,
    multiplier: float | None = None,
    jitter: float | None = None,
) -> Data:
    """`retry: {attempts, backoff, max_backoff, multiplier, jitter}`."""
    return _drop_none(
        attempts=attempts,
        backoff=backoff,
        max_backoff=max_backoff,
        multiplier=multiplier,
        jitter=jitter,
    )


def Action(
    *,
    reassign: str | None = None,
    escalate: str | None = None,
    notify: Sequence[str] | None = None,
    fail: bool | None = None,
    reset_clock: bool | None = None,
) -> Data:
    """One `on_timeout` action: `Action(reassign="AI:backup", notify=["slack:#ops"])`."""
    return _drop_none(
        reassign=reassign, escalate=escalate, notify=notify, fail=fail, reset_clock=reset_clock
    )


def Rung(at: str | float, **action: Any) -> Data:
    """One rung of a ladder: `Rung("75%", notify=["slack:#ops"])`."""
    return {"at": at, **Action(**action)}


def Ladder(*rungs: Mapping[str, Any]) -> Data:
    """`on_timeout: {ladder: [...]}`."""
    return {"ladder": [dict(rung) for rung in rungs]}


def Calendar(
    timezone: str = "UTC",
    hours: str | Sequence[str] = "09:00-17:00",
    weekdays: Sequence[str] = ("mon", "tue", "wed", "thu", "fri"),
    holidays: Sequence[date | str] = (),
) -> Data:
    """A calendar declaration, as under `calendars:` in YAML."""
    return {
        "timezone": timezone,
        "hours": hours if isinstance(hours, str) else list(hours),
        "weekdays": list(weekdays),
        "holidays": list(holidays),
    }


def workflow(
    id: str,
    *,
    prefix: str,
    steps: Sequence[StepSpec],
    version: int = 1,
    title: str | None = None,
    start: str | Sequence[str] = (),
    sla: str | float | model.Duration | Mapping[str, Any] | None = None,
    on_timeout: str | Mapping[str, Any] | model.Escalation | None = None,
    retry: int | Mapping[str, Any] | model.Retry | None = None,
    calendar: str | None = None,
    case: str | None = None,
    sensitive: Sequence[str] = (),
    calendars: Mapping[str, Mapping[str, Any] | model.CalendarSpec] | None = None,
) -> model.Workflow:
    """Validate and return the Workflow; raises WorkflowError listing every problem."""
    file, line = _caller()
    for step in steps:
        if not isinstance(step, StepSpec):
            raise TypeError(f"steps must be Task, Checkpoint, Switch, Fanout or Wait; got {step!r}")
    data = _drop_none(
        id=id, version=version, title=title, prefix=prefix,
        start=[start] if isinstance(start, str) else list(start), sla=sla,
        on_timeout=on_timeout, retry=retry, calendar=calendar, case=case,
        sensitive=list(sensitive) or None,
        calendars=calendars,
    )  # fmt: skip
    # The step dicts themselves (not copies): `where` finds each one's call site by id.
    data["steps"] = [step.data for step in steps]
    where = {
        builtins.id(spec.data): (spec.line if spec.file == file else line, 1) for spec in steps
    }
    root = from_data(data, line, 1, where)
    built, problems = build(root, _display(file))
    if built is None:
        raise WorkflowError(problems)
    return built


def _display(file: str) -> str:
    """The caller's file relative to the working directory when it is under it."""
    path = Path(file)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return file
