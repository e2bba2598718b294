"""Properties of the engine over generated workflows and generated input orders.

Workflows: 2-6 steps of every type (tasks with guards, optional, retries, SLAs and
escalations; switches; fan-outs with each join; checkpoints with four eyes and
separation of duties; waits), `needs` DAGs and forward routes (`next`, cases,
`on_failure`, `on_reject`, escalation targets). The world answers what the engine
asks, in an order hypothesis chooses, with duplicates, late results for superseded
attempts, stale timer firings, early events and the odd pause.

Properties: no step is dispatched before its needs are finished; each attempt is
dispatched at most once and every effect id is unique; a duplicate input changes
nothing; the state round-trips through JSON; once every dispatched task has ended
(and every timer, decision and event has come), the run is finished.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hms_bus.messages import (
    FACT_KINDS,
    Approve,
    ArmTimer,
    CancelRun,
    Effect,
    Fact,
    Input,
    PauseRun,
    Reject,
    ResumeRun,
    RouteTask,
    Signal,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TimerFired,
)
from hms_bus.workflow.engine import advance
from hms_bus.workflow.model import (
    END,
    Action,
    CheckpointStep,
    Duration,
    Escalation,
    FanoutStep,
    Join,
    Retry,
    Rung,
    Step,
    SwitchStep,
    TaskStep,
    WaitStep,
    Workflow,
)
from hms_bus.workflow.state import ACTIVE_STEP, RunState
from tests.workflow.engine_driver import RUN, Driver

_decoder = msgspec.json.Decoder(RunState)
HOUR = Duration(seconds=3600, text="1h")


@st.composite
def escalations(draw: st.DrawFn, later: list[str]) -> Escalation | None:
    actions = [Action(notify=("slack:#ops",)), Action(reassign="AI:backup"), Action(fail=True)]
    actions += [Action(escalate=t) for t in later]
    rungs = draw(st.lists(st.sampled_from(actions), max_size=2))
    if not rungs:
        return None
    return Escalation(rungs=tuple(Rung(at=0.5 + i * 0.5, action=a) for i, a in enumerate(rungs)))


@st.composite
def steps(draw: st.DrawFn, i: int, n: int) -> Step:
    sid = f"s{i}"
    earlier = [f"s{j}" for j in range(i)]
    later = [f"s{j}" for j in range(i + 1, n)]
    maybe_later = st.sampled_from([None, *later])
    common: dict[str, Any] = {
        "id": sid,
        "when": draw(st.sampled_from([None, None, "payload.flag", "not payload.flag"])),
        "optional": draw(st.booleans()),
        "on_failure": draw(maybe_later),
        "next": draw(st.sampled_from([None, None, END, *later])),
    }
    with_needs: bool = draw(st.booleans())
    if earlier and with_needs:
        common["needs"] = tuple(draw(st.sets(st.sampled_from(earlier), max_size=2)))
    kind = draw(st.sampled_from(["task", "task", "switch", "fanout", "checkpoint", "wait"]))
    if kind == "switch":
        targets = st.sampled_from([END, *later])
        cases = {"a": draw(targets), "b": draw(targets)}
        return SwitchStep(**common, expr="payload.k", cases=cases, default=draw(maybe_later))
    if kind == "wait":
        limit = draw(st.sampled_from([None, HOUR]))
        return WaitStep(**common, event=f"E{i}", limit=limit, on_timeout=draw(escalations(later)))
    if kind == "checkpoint":
        return CheckpointStep(
            **common, role="officer", approvals=draw(st.integers(1, 2)),
            not_by=tuple(draw(st.sets(st.sampled_from(earlier), max_size=1))) if earlier else (),
            on_reject=draw(maybe_later), sla=draw(st.sampled_from([None, HOUR])),
            on_timeout=draw(escalations(later)),
        )  # fmt: skip
    retry = Retry(
        attempts=draw(st.integers(1, 3)),
        backoff=draw(st.sampled_from([None, Duration(seconds=30)])),
    )
    sla = draw(st.sampled_from([None, HOUR]))
    if kind == "fanout":
        join = draw(st.sampled_from([Join(), Join(mode="any"), Join(mode="at_least", n=2)]))
        return FanoutStep(
            **common, over="payload.items", actor="SVC:each", join=join, retry=retry, sla=sla,
            on_timeout=draw(escalations(later)),
        )  # fmt: skip
    actor = draw(st.sampled_from(["AI:x", "SVC:y", "HUMAN:clerk"]))
    return TaskStep(
        **common, actor=actor, retry=retry, sla=sla, on_timeout=draw(escalations(later))
    )


@st.composite
def workflows(draw: st.DrawFn) -> Workflow:
    n = draw(st.integers(2, 6))
    sla = draw(st.sampled_from([None, Duration(seconds=6 * 3600)]))
    return Workflow(id="gen", prefix="G", sla=sla, steps=tuple(draw(steps(i, n)) for i in range(n)))


PAYLOADS = st.fixed_dictionaries({
    "flag": st.booleans(),
    "k": st.sampled_from(["a", "b", "c"]),
    "items": st.lists(st.integers(0, 9), max_size=3),
})  # fmt: skip


class World:
    """What the engine asked for, as inputs that may now be delivered."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self.pending: list[Input] = []
        self.delivered: list[Input] = []
        self.routes: set[str] = set()
        self.effect_ids: set[str] = set()
        self._n = 0
        self.waits = [s for s in wf.steps if isinstance(s, WaitStep)]
        for step in self.waits:
            self.pending.append(Signal(id=self.id(), run=RUN, name=step.event, payload={"x": 1}))

    def id(self) -> str:
        self._n += 1
        return f"w{self._n}"

    def answers(self, route: RouteTask) -> list[Input]:
        common: dict[str, Any] = {"task": route.task, "run": RUN, "step": route.step,
                                  "attempt": route.attempt}  # fmt: skip
        if route.kind == "checkpoint":
            decisions: list[Input] = [
                Approve(id=self.id(), run=RUN, step=route.step, by=name, reason="ok")
                # enough people that separation of duties never leaves nobody to approve
                for name in ("ann", "bob", "worker", "cy", "dan", "eve")
            ]
            decisions.append(Reject(id=self.id(), run=RUN, step=route.step, by="rex", reason="no"))
            return decisions
        return [
            TaskCompleted(id=self.id(), by="worker", output={"v": route.attempt}, **common),
            TaskFailed(id=self.id(), by="worker", error="e", **common),
            TaskFailed(id=self.id(), by="worker", error="fatal", retryable=False, **common),
            TaskProgress(id=self.id(), by="worker", **common),
        ]

    def observe(self, wf: Workflow, run: RunState, effects: tuple[Effect, ...]) -> None:
        needs = {s.id: s.needs or () for s in wf.steps}
        for effect in effects:
            assert effect.id not in self.effect_ids, f"effect id {effect.id} used twice"
            assert not isinstance(effect, Fact) or effect.kind in FACT_KINDS, effect
            self.effect_ids.add(effect.id)
            if isinstance(effect, RouteTask):
                assert effect.task not in self.routes, f"{effect.task} dispatched twice"
                self.routes.add(effect.task)
                for need in needs[effect.step]:
                    assert run.steps[need].status in ("DONE", "SKIPPED"), (
                        f"{effect.step} dispatched while its need {need} is "
                        f"{run.steps[need].status}"
                    )
                self.pending.extend(self.answers(effect))
            elif isinstance(effect, ArmTimer):
                self.pending.append(
                    TimerFired(id=f"fired-{effect.id}", timer=effect.timer, run=RUN,
                               due_at=effect.due_at, fired_at=effect.due_at,
                               purpose=effect.purpose, step=effect.step, data=effect.data)
                )  # fmt: skip


def deliver(d: Driver, world: World, message: Input, hours: float) -> None:
    if isinstance(message, TimerFired):
        d.now = max(d.now, message.due_at)
    else:
        d.now += timedelta(hours=hours)
    before = d.run
    snapshot = msgspec.json.encode(before)
    transition = advance(d.wf, before, message, d.now)
    assert msgspec.json.encode(before) == snapshot, "advance changed the run it was given"
    if message in world.delivered:
        assert transition.duplicate
        assert transition.run is before
        return
    assert not transition.duplicate
    world.delivered.append(message)
    run = _decoder.decode(msgspec.json.encode(transition.run))
    assert run == transition.run
    # The engine's index of active steps says what a scan of every step would.
    assert run.active == [s for s, st in run.steps.items() if st.status in ACTIVE_STEP]
    world.observe(d.wf, run, transition.effects)
    d.run = run
    again = advance(d.wf, run, message, d.now)
    assert again.duplicate
    assert again.run is run
    assert msgspec.json.encode(again.effects) == msgspec.json.encode(transition.effects)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wf=workflows(), payload=PAYLOADS, data=st.data())
def test_engine_properties_hold_in_any_order_with_duplicates(
    wf: Workflow, payload: dict[str, Any], data: st.DataObject
) -> None:
    d = Driver(wf, payload)
    world = World(wf)
    world.observe(wf, d.run, tuple(d.effects))
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        if d.run.finished or not world.pending:
            break
        choice = data.draw(st.integers(0, len(world.pending) - 1), label="which")
        if world.delivered and data.draw(st.integers(0, 5), label="dup") == 0:
            message = world.delivered[choice % len(world.delivered)]  # a redelivery
        elif (op := data.draw(st.integers(0, 40), label="op")) < 2:
            kind = PauseRun if d.run.paused is None else ResumeRun
            message = kind(id=world.id(), run=RUN, by="ops", reason="x")
        elif op == 2:
            message = CancelRun(id=world.id(), run=RUN, by="citizen", reason="withdrawn")
        else:
            message = world.pending.pop(choice)
        deliver(d, world, message, data.draw(st.sampled_from([0, 0.01, 0.6, 2]), label="h"))
    drain(d, world, timers_first=data.draw(st.booleans(), label="timers first"))
    assert d.run.finished, (d.run.status, d.statuses())
    event(f"run {d.run.status}")
    event(f"{len(world.routes) // 3 * 3}+ dispatches")
    for status in {step.status for step in d.run.steps.values()}:
        event(f"a step ended {status}")


def drain(d: Driver, world: World, *, timers_first: bool) -> None:
    """End everything: resume, let every task complete, every checkpoint get its
    approvals, every event and every timer come. The run must then be finished."""
    if d.run.paused is not None:
        deliver(d, world, ResumeRun(id=world.id(), run=RUN, by="ops", reason="end"), 0)
    for _ in range(400):
        if d.run.finished:
            return
        useful = [
            m for m in world.pending
            if isinstance(m, TaskCompleted | Approve | Signal | TimerFired)
        ]  # fmt: skip
        if not useful:
            return
        message = min(useful, key=lambda m: isinstance(m, TimerFired) != timers_first)
        world.pending.remove(message)
        deliver(d, world, message, 0.01)
