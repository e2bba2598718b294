"""The loader's checks of clocks, one test per kind of problem with the LINE:COL the
author is sent to: durations, business time and calendars, SLA ladders and
escalations."""

from __future__ import annotations

from textwrap import dedent

import pytest

from hms_bus.workflow.loader import load_workflow_text
from hms_bus.workflow.model import CheckpointStep, Duration, FanoutStep, TaskStep
from tests.workflow.loader_helpers import HEAD, at, only, problems, steps


@pytest.mark.parametrize(
    ("value", "col", "fragment"),
    [
        ("4 hourz", 12, "unknown unit 'hourz'"),
        ('"  4x"', 14, "unknown unit 'x'"),
        ("-5m", 10, "expected a number"),
        ("[4h]", 10, "must be a duration like '4h'"),
    ],
)
def test_malformed_duration(value: str, col: int, fragment: str) -> None:
    p = only(HEAD + f"  - id: a\n    actor: AI:x\n    sla: {value}\n")
    assert at(p) == (6, col)
    assert fragment in p.message


def test_zero_sla_is_refused() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    sla: 0s\n")
    assert "must be longer than zero" in p.message


def test_unknown_calendar() -> None:
    text = dedent(
        """\
        id: w
        prefix: W
        calendar: federal
        calendars:
          fedral: {timezone: America/New_York}
        steps:
          - id: a
            actor: AI:x
            sla: {duration: 3 business days, calendar: state}
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(3, 11), (9, 48)]
    assert found[0].message == "unknown calendar 'federal'; did you mean 'fedral'? declared: fedral"
    assert "unknown calendar 'state'" in found[1].message


def test_business_duration_without_a_calendar() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    sla: 3 business days\n")
    assert at(p) == (6, 10)
    assert "business time ('3 business days'), which needs a calendar" in p.message


def test_business_days_use_the_calendar_working_day() -> None:
    text = dedent(
        """\
        id: w
        prefix: W
        calendar: long
        calendars:
          long: {hours: "08:00-18:00"}
        steps:
          - id: a
            actor: AI:x
            sla: 2 business days
        """
    )
    step = load_workflow_text(text).steps[0]
    assert isinstance(step, TaskStep)
    assert step.sla == Duration(seconds=20 * 3600, business=True, text="2 business days")


@pytest.mark.parametrize(
    ("calendar", "line", "col", "fragment"),
    [
        ("    timezone: Mars/Base\n", 5, 15, "unknown time zone 'Mars/Base'"),
        ('    hours: "17:00-09:00"\n', 5, 12, "must open before they close"),
        ('    hours: "9-5"\n', 5, 12, "is not HH:MM"),
        (
            "    weekdays: [mon, fry]\n",
            5,
            21,
            "unknown weekday 'fry' in calendar 'c'; did you mean 'fri'?",
        ),
        ("    holidays: [2026-02-30]\n", 5, 16, "holiday in calendar 'c' must be a date"),
    ],
)
def test_bad_calendar_declarations(calendar: str, line: int, col: int, fragment: str) -> None:
    text = (
        "id: w\nprefix: W\ncalendars:\n  c:\n" + calendar + "steps:\n  - id: a\n    actor: AI:x\n"
    )
    p = only(text)
    assert at(p) == (line, col)
    assert fragment in p.message


def test_ladder_rungs_must_ascend_and_escalations_need_a_clock() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
            sla: 4h
            on_timeout:
              ladder:
                - {at: 100%, notify: ["slack:#x"]}
                - {at: 75%, reassign: "HUMAN:boss"}
                - {at: 0.5}
          - id: b
            actor: AI:x
            on_timeout: fail
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(10, 16), (11, 11), (14, 5)]
    assert "rungs go in ascending order" in found[0].message
    assert "does nothing: give at least one of reassign, escalate, notify, fail" in found[1].message
    assert "has no clock to run out: give the step 'sla'" in found[2].message


def test_escalation_forms() -> None:
    text = steps(
        """\
          - id: a
            type: checkpoint
            role: clerk
            sla: 4h
            on_timeout: sup
            next: end
          - id: sup
            actor: HUMAN:supervisor
            sla: 1h
            on_timeout: {reassign: "HUMAN:chief", reset_clock: true, notify: "sms:+1-202-555-0123"}
        """
    )
    wf = load_workflow_text(text)
    first, second = wf.steps
    assert isinstance(first, CheckpointStep)
    assert isinstance(second, TaskStep)
    assert first.on_timeout is not None
    assert first.on_timeout.rungs[0].action.escalate == "sup"
    assert second.on_timeout is not None
    action = second.on_timeout.rungs[0].action
    assert (action.reassign, action.reset_clock, action.notify) == (
        "HUMAN:chief",
        True,
        ("sms:+1-202-555-0123",),
    )


RUN_LADDER = """\
id: w
prefix: W
sla: 48h
on_timeout:
  ladder:
    - {at: 75%, notify: ["slack:#desk"]}
    - {at: 100%, escalate: supervisor_review}
steps:
  - id: review
    actor: HUMAN:clerk
    next: end
  - id: supervisor_review
    actor: HUMAN:supervisor
"""


def test_the_run_escalates_by_its_own_on_timeout() -> None:
    wf = load_workflow_text(RUN_LADDER)
    assert wf.on_timeout is not None
    assert [(r.at, r.action.notify, r.action.escalate) for r in wf.on_timeout.rungs] == [
        (0.75, ("slack:#desk",), None),
        (1.0, (), "supervisor_review"),
    ]
    # the step only the run's escalation starts is not unreachable
    assert [s.id for s in wf.steps] == ["review", "supervisor_review"]


@pytest.mark.parametrize(
    ("edit", "line", "col", "fragment"),
    [
        (
            ("sla: 48h\n", ""),
            3,
            1,
            "on_timeout of the run has no clock to run out: give the workflow 'sla'",
        ),
        (
            ('notify: ["slack:#desk"]', "reassign: HUMAN:boss"),
            5,
            3,
            "on_timeout of the run cannot 'reassign' (a run has no lane",
        ),
    ],
)
def test_run_on_timeout_problems(edit: tuple[str, str], line: int, col: int, fragment: str) -> None:
    p = only(RUN_LADDER.replace(*edit))
    assert at(p) == (line, col)
    assert fragment in p.message


def test_a_run_escalation_to_an_unknown_step_and_what_it_leaves_unreachable() -> None:
    first, second = problems(RUN_LADDER.replace("escalate: supervisor_review", "escalate: nobody"))
    assert at(first) == (7, 28)
    assert first.message.startswith(
        "'escalate' of rung 2 of the ladder of the run names step 'nobody', which does not exist"
    )
    assert at(second) == (12, 9)
    assert second.message.startswith("step 'supervisor_review' is unreachable")


def test_the_workflow_retry_is_every_task_s_unless_it_names_its_own() -> None:
    wf = load_workflow_text(
        dedent(
            """\
            id: w
            prefix: W
            retry: {attempts: 3, backoff: 30s}
            steps:
              - id: a
                actor: SVC:irs
              - id: b
                actor: SVC:irs
                retry: 1
              - id: c
                type: fanout
                over: payload.items
                actor: AI:x
            """
        )
    )
    a, b, c = wf.steps
    assert isinstance(a, TaskStep)
    assert isinstance(b, TaskStep)
    assert isinstance(c, FanoutStep)
    assert (a.retry.attempts, a.retry.backoff) == (3, Duration(seconds=30, text="30s"))
    assert b.retry.attempts == 1
    assert c.retry.attempts == 3


def test_a_bad_workflow_retry_is_reported_where_it_is() -> None:
    p = only("id: w\nprefix: W\nretry: {attempts: 0}\nsteps:\n  - id: a\n    actor: AI:x\n")
    assert at(p) == (3, 19)
    assert p.message == "'attempts' of retry of the workflow must be >= 1, got 0"
