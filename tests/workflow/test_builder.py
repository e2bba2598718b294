from __future__ import annotations

from datetime import date

import pytest

from hms_bus.workflow import model
from hms_bus.workflow.builder import (
    Action,
    Calendar,
    Checkpoint,
    Fanout,
    Ladder,
    Retry,
    Rung,
    Step,
    Switch,
    Task,
    Wait,
    WorkflowError,
    workflow,
)
from hms_bus.workflow.loader import load_workflow_text


def test_seed_shapes_build_a_workflow() -> None:
    wf = workflow(
        "vaccine-card",
        prefix="VAX",
        sla="48h",
        steps=[
            Task("verify_identity", ai="dmv", sla="2h"),
            Task("fetch_vaccine_log", ai="registry", sla="4h"),
            Task("generate_pdf", svc="pdf", sla="1h", needs=["fetch_vaccine_log"]),
            Task("ship_physical", human="clerk", sla="24h", optional=True),
        ],
    )
    assert [s.id for s in wf.steps] == [
        "verify_identity",
        "fetch_vaccine_log",
        "generate_pdf",
        "ship_physical",
    ]
    ship = wf.step("ship_physical")
    assert isinstance(ship, model.TaskStep)
    assert ship.actor == "HUMAN:clerk"
    assert ship.optional
    assert ship.sla == model.Duration(seconds=86400, text="24h")


def test_builder_equals_the_same_yaml() -> None:
    yaml_text = """\
id: flow
version: 3
title: Every step type
prefix: FLW
start: [Go, Again]
sla: 2 business days
calendar: office
calendars:
  office:
    timezone: Europe/Paris
    hours: "08:30-17:30"
    weekdays: [mon, tue, wed, thu, fri]
    holidays: [2026-12-25]
steps:
  - id: fan
    type: fanout
    over: payload.items
    as: thing
    actor: AI:x
    input: {it: thing, i: index}
    join: {at_least: 2}
    retry: {attempts: 3, backoff: 30s, max_backoff: 5m, multiplier: 2, jitter: 0.1}
  - id: pick
    type: switch
    expr: results.fan[0].kind
    cases: {a: approve, true: end}
    default: wait
  - id: approve
    type: checkpoint
    role: officer
    approvals: 2
    not_by: [fan]
    sla: 4 business hours
    on_timeout:
      ladder:
        - {at: 75%, notify: ["slack:#ops"]}
        - {at: 100%, reassign: "HUMAN:chief", reset_clock: true}
    on_reject: wait
    next: end
  - id: wait
    type: wait
    event: Reply
    limit: 10d
    on_timeout: fail
    when: payload.ask
  - id: last
    actor: SVC:mail
    sla: 1h
    on_timeout: {escalate: end, notify: ["email:x@y.gov"]}
    on_failure: end
"""
    built = workflow(
        "flow",
        version=3,
        title="Every step type",
        prefix="FLW",
        start=["Go", "Again"],
        sla="2 business days",
        calendar="office",
        calendars={
            "office": Calendar("Europe/Paris", "08:30-17:30", holidays=[date(2026, 12, 25)])
        },
        steps=[
            Fanout(
                "fan",
                "payload.items",
                ai="x",
                as_="thing",
                input={"it": "thing", "i": "index"},
                join={"at_least": 2},
                retry=Retry(3, "30s", max_backoff="5m", multiplier=2, jitter=0.1),
            ),
            Switch("pick", "results.fan[0].kind", {"a": "approve", True: "end"}, default="wait"),
            Checkpoint(
                "approve",
                "officer",
                approvals=2,
                not_by=["fan"],
                sla="4 business hours",
                on_timeout=Ladder(
                    Rung("75%", notify=["slack:#ops"]),
                    Rung("100%", reassign="HUMAN:chief", reset_clock=True),
                ),
                on_reject="wait",
                next="end",
            ),
            Wait("wait", "Reply", limit="10d", on_timeout="fail", when="payload.ask"),
            Step(
                "last",
                svc="mail",
                sla="1h",
                on_timeout=Action(escalate="end", notify=["email:x@y.gov"]),
                on_failure="end",
            ),
        ],
    )
    assert built == load_workflow_text(yaml_text)


def test_builder_accepts_model_objects() -> None:
    from_text = workflow(
        "m",
        prefix="M",
        steps=[Task("a", "AI:x", sla="90s", retry=Retry(2, "30s"), on_timeout="fail")],
    )
    step = from_text.steps[0]
    assert isinstance(step, model.TaskStep)
    from_models = workflow(
        "m",
        prefix="M",
        steps=[Task("a", "AI:x", sla=step.sla, retry=step.retry, on_timeout=step.on_timeout)],
    )
    assert from_models == from_text


def test_an_invalid_builder_workflow_names_the_step_field_and_line() -> None:
    with pytest.raises(WorkflowError) as info:
        workflow(
            "x",
            prefix="X",
            steps=[
                Task("a", actor="BOT:x", sla="2 hourz"),
                Checkpoint("b", role="fsa.officer", approvals=0),
                Task("c", svc="y", needs=["zz"], when="payload.a =="),
            ],
        )
    problems = info.value.problems
    assert all(p.file.endswith("test_builder.py") for p in problems)
    messages = [p.message for p in problems]
    assert "unknown actor kind 'BOT' in 'BOT:x'; allowed: AI, HUMAN, SVC" in messages
    assert any("'sla' of step 'a'" in m and "unknown unit 'hourz'" in m for m in messages)
    assert any("'approvals' of step 'b' must be >= 1" in m for m in messages)
    assert any("role 'fsa.officer' of step 'b'" in m for m in messages)
    assert any("'needs' of step 'c' names step 'zz'" in m for m in messages)
    assert any("bad expression in 'when' of step 'c'" in m for m in messages)
    sla_line = next(p.line for p in problems if "'sla' of step 'a'" in p.message)
    approvals_line = next(p.line for p in problems if "'approvals' of step 'b'" in p.message)
    assert sla_line + 1 == approvals_line  # each problem points at its own call


def test_one_actor_keyword_only() -> None:
    with pytest.raises(TypeError, match="give one of actor=, ai=, human=, svc="):
        Task("a", "AI:x", svc="y")


def test_steps_must_be_step_specs() -> None:
    with pytest.raises(TypeError, match="steps must be Task"):
        workflow("x", prefix="X", steps=[{"id": "a"}])  # type: ignore[list-item]


def test_step_spec_repr_shows_its_data() -> None:
    assert repr(Task("a", "AI:x")) == "Task({'id': 'a', 'actor': 'AI:x'})"
