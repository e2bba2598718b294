"""What the engine derives once per workflow version: routes, clock points, the DAG.

A `Workflow` is data as the author wrote it; the engine asks the same questions of it
on every input (where does this step flow, which steps does it need, at which
fractions of its SLA does something happen). `plan_for` answers them once per
workflow object and caches the answer, which keeps `advance` cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from hms_bus.workflow.expr import Expr, ExprError, compile_expr
from hms_bus.workflow.model import (
    END,
    Action,
    CheckpointStep,
    Duration,
    Escalation,
    FanoutStep,
    Rung,
    Step,
    SwitchStep,
    TaskStep,
    WaitStep,
    Workflow,
)

__all__ = ["Plan", "Point", "StepPlan", "plan_for"]

_FAIL = Escalation(rungs=(Rung(at=1.0, action=Action(fail=True)),))


@dataclass(frozen=True, slots=True)
class Point:
    """A moment on a step's clock: `at` times its duration. `breach` marks 100%."""

    at: float
    breach: bool
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class StepPlan:
    step: Step
    index: int
    #: where flow goes when the step ends with no explicit route (None: branch ends)
    fall: str | None
    #: every step this one may activate (for deciding which waiting steps can still run)
    flow: tuple[str, ...]
    #: steps that need this one
    dependents: tuple[str, ...]
    duration: Duration | None
    points: tuple[Point, ...]
    #: the clock timer's suffix: `sla`, or `wait` for a wait step's limit
    clock_name: str
    #: a human holds the work (a checkpoint, a `HUMAN:` actor) unless reassigned
    human: bool
    #: the event a wait step waits for
    event: str | None
    #: `task`, `switch`, `checkpoint`, `fanout` or `wait`
    kind: str
    #: paths in this step's result that the ledger gets as hashes (`sensitive`)
    sensitive: tuple[tuple[str, ...], ...]
    #: a task's or fan-out's `input` mapping, compiled; None when it has none, or when
    #: an expression does not compile (the engine then reports it as it evaluates)
    inputs: tuple[tuple[str, Expr], ...] | None


@dataclass(frozen=True, slots=True)
class Plan:
    workflow: Workflow
    steps: dict[str, StepPlan]
    order: tuple[str, ...]
    #: steps with `needs` (`needs: []` included), in file order: only their needs
    #: start them, once; flow arriving at them does not
    with_needs: tuple[str, ...]
    #: the step flow starts the run at: the first, unless it has needs
    initial: tuple[str, ...]
    #: bit of each step (file order), and the bits of the steps each one can reach
    #: through flow (itself included; never entering a step with needs, which only
    #: its needs start): what decides, cheaply, which waiting steps can still run
    bit: dict[str, int]
    reach: dict[str, int]
    #: some expression reads `run.*` (the scope then carries the run's fields)
    reads_run: bool
    #: the points of the run's own clock (its `sla`, escalated by its `on_timeout`)
    run_points: tuple[Point, ...]
    #: what the run's `on_timeout` escalations can activate (their targets' `reach`)
    run_reach: int


_KINDS: dict[type, str] = {
    TaskStep: "task",
    SwitchStep: "switch",
    CheckpointStep: "checkpoint",
    FanoutStep: "fanout",
    WaitStep: "wait",
}


def _targets(escalation: Escalation | None) -> list[str]:
    if escalation is None:
        return []
    return [r.action.escalate for r in escalation.rungs if r.action.escalate]


def _points(escalation: Escalation | None) -> tuple[Point, ...]:
    by_at: dict[float, list[Action]] = {1.0: []}
    for rung in escalation.rungs if escalation else ():
        by_at.setdefault(rung.at, []).append(rung.action)
    return tuple(Point(at=at, breach=at == 1.0, actions=tuple(by_at[at])) for at in sorted(by_at))


def _step_plan(wf: Workflow, index: int, step: Step, dependents: tuple[str, ...]) -> StepPlan:
    flow: list[str] = []
    fall = wf.fall_through(step.id)
    if fall is not None:
        flow.append(fall)
    if isinstance(step, SwitchStep):
        flow.extend(step.cases.values())
        if step.default is not None:
            flow.append(step.default)
    if step.on_failure is not None:
        flow.append(step.on_failure)
    duration: Duration | None = None
    points: tuple[Point, ...] = ()
    clock_name = "sla"
    if isinstance(step, CheckpointStep) and step.on_reject is not None:
        flow.append(step.on_reject)
    if isinstance(step, TaskStep | CheckpointStep | FanoutStep):
        flow.extend(_targets(step.on_timeout))
        duration = step.sla
        if duration is not None:
            points = _points(step.on_timeout)
    elif isinstance(step, WaitStep):
        escalation = step.on_timeout or _FAIL
        flow.extend(_targets(escalation))
        duration = step.limit
        clock_name = "wait"
        if duration is not None:
            points = _points(escalation)
    names = {s.id for s in wf.steps}
    return StepPlan(
        step=step,
        index=index,
        fall=fall,
        flow=tuple(dict.fromkeys(t for t in flow if t != END and t in names)),
        dependents=dependents,
        duration=duration,
        points=points,
        clock_name=clock_name,
        human=isinstance(step, CheckpointStep)
        or (isinstance(step, TaskStep | FanoutStep) and step.actor.startswith("HUMAN:")),
        event=step.event if isinstance(step, WaitStep) else None,
        kind=_KINDS[type(step)],
        sensitive=tuple(
            tuple(p.split(".")[2:]) for p in wf.sensitive if p.startswith(f"results.{step.id}.")
        ),
        inputs=_inputs(step),
    )


def _inputs(step: Step) -> tuple[tuple[str, Expr], ...] | None:
    if not isinstance(step, TaskStep | FanoutStep) or step.input is None:
        return None
    try:
        return tuple((name, compile_expr(source)) for name, source in step.input.items())
    except ExprError:
        return None


def _build(wf: Workflow) -> Plan:
    dependents: dict[str, list[str]] = {s.id: [] for s in wf.steps}
    for step in wf.steps:
        for need in step.needs or ():
            if need in dependents:
                dependents[need].append(step.id)
    steps = {
        step.id: _step_plan(wf, i, step, tuple(dependents[step.id]))
        for i, step in enumerate(wf.steps)
    }
    # `needs: []` steps are not here: `settle` starts them, as steps whose needs are met.
    initial = [wf.steps[0].id] if wf.steps and wf.steps[0].needs is None else []
    bit = {sid: 1 << i for i, sid in enumerate(steps)}
    reach = {sid: _reach(sid, steps, bit) for sid in steps}
    run_reach = 0
    for target in _targets(wf.on_timeout):
        run_reach |= reach.get(target, 0)
    return Plan(
        workflow=wf,
        steps=steps,
        order=tuple(steps),
        with_needs=tuple(s.id for s in wf.steps if s.needs is not None),
        initial=tuple(initial),
        bit=bit,
        reach=reach,
        reads_run=_reads_run(wf),
        run_points=_points(wf.on_timeout) if wf.sla is not None else (),
        run_reach=run_reach,
    )


def _reach(start: str, steps: dict[str, StepPlan], bit: dict[str, int]) -> int:
    mask = bit[start]
    stack = [start]
    while stack:
        for target in steps[stack.pop()].flow:
            if not mask & bit[target] and steps[target].step.needs is None:
                mask |= bit[target]
                stack.append(target)
    return mask


def _reads_run(wf: Workflow) -> bool:
    sources: list[str] = [wf.case] if wf.case else []
    for step in wf.steps:
        sources.extend(s for s in (step.when,) if s)
        if isinstance(step, SwitchStep):
            sources.append(step.expr)
        if isinstance(step, FanoutStep):
            sources.append(step.over)
        if isinstance(step, TaskStep | FanoutStep) and step.input:
            sources.extend(step.input.values())
    for source in sources:
        try:
            if "run" in compile_expr(source).roots():
                return True
        except ExprError:
            return True  # the engine reports it when it evaluates it
    return False


_cache: dict[int, Plan] = {}
_CACHE_MAX = 256


def plan_for(wf: Workflow) -> Plan:
    """The plan of `wf`, built once per workflow object (kept alive by the cache, so an
    `id` is never reused for another workflow while its entry exists)."""
    plan = _cache.get(id(wf))
    if plan is not None and plan.workflow is wf:
        return plan
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    plan = _cache[id(wf)] = _build(wf)
    return plan
