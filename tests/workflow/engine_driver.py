"""A small driver for engine tests: one run, its inputs, and what came out.

It plays the dispatcher (apply an input, keep the new state, collect effects) and
the world around it (complete the latest attempt of a step, fire the timer a step
armed), so each test reads as the story it checks.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from hms_bus.messages import (
    ArmTimer,
    Effect,
    Fact,
    Input,
    Notify,
    RouteTask,
    StartRun,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TimerFired,
)
from hms_bus.workflow.engine import Transition, advance, start_run
from hms_bus.workflow.model import Step, Workflow
from hms_bus.workflow.state import ACTIVE_STEP, RunState

T0 = datetime(2026, 11, 16, 14, 0, tzinfo=UTC)  # a Monday, 09:00 in New York
RUN = "T-20261116-00001"

_decoder = msgspec.json.Decoder(RunState)


def workflow(*steps: Step, **options: Any) -> Workflow:
    return Workflow(id="t", prefix="T", steps=steps, **options)


class Driver:
    def __init__(
        self, wf: Workflow, payload: dict[str, Any] | None = None, now: datetime = T0
    ) -> None:
        self.wf = wf
        self.now = now
        self.start = StartRun(id="start", workflow=wf.id, key="key-1", payload=payload or {})
        transition = start_run(wf, self.start, RUN, now)
        self.run: RunState = transition.run
        self.last: tuple[Effect, ...] = transition.effects
        self.effects: list[Effect] = list(transition.effects)
        self._n = 0

    # -- applying inputs ----------------------------------------------------------------

    def next_id(self, prefix: str = "in") -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def at(self, **delta: float) -> Driver:
        self.now += timedelta(**delta)
        return self

    def apply(self, message: Input) -> Transition:
        transition = advance(self.wf, self.run, message, self.now)
        # As the dispatcher does: the state goes through JSON between two inputs.
        self.run = _decoder.decode(msgspec.json.encode(transition.run))
        # The engine's index of active steps says what a scan of every step would.
        assert self.run.active == [
            s for s, st in self.run.steps.items() if st.status in ACTIVE_STEP
        ], self.run.active
        self.last = transition.effects
        self.effects.extend(transition.effects)
        return transition

    def task(self, step: str, item: int | None = None) -> RouteTask:
        """The latest attempt dispatched for `step` (and fan-out `item`)."""
        routes = [r for r in self.routes(step) if item is None or r.item == item]
        assert routes, f"{step} was never dispatched"
        return routes[-1]

    def complete(
        self, step: str, output: dict[str, Any] | None = None, *, item: int | None = None,
        by: str = "worker",
    ) -> Transition:  # fmt: skip
        route = self.task(step, item)
        return self.apply(
            TaskCompleted(
                id=self.next_id("done"), task=route.task, run=RUN, step=step,
                attempt=route.attempt, by=by, output=output or {},
            )
        )  # fmt: skip

    def fail(
        self, step: str, error: str = "boom", *, item: int | None = None, retryable: bool = True,
        exhausted: bool = False,
    ) -> Transition:  # fmt: skip
        route = self.task(step, item)
        return self.apply(
            TaskFailed(
                id=self.next_id("fail"), task=route.task, run=RUN, step=step,
                attempt=route.attempt, error=error, by="worker", retryable=retryable,
                exhausted=exhausted,
            )
        )  # fmt: skip

    def progress(self, step: str, by: str = "worker") -> Transition:
        route = self.task(step)
        return self.apply(
            TaskProgress(
                id=self.next_id("p"), task=route.task, run=RUN, step=step,
                attempt=route.attempt, by=by,
            )
        )  # fmt: skip

    def armed(self, timer: str) -> ArmTimer:
        """The arm currently in force for `timer` (its latest ArmTimer)."""
        arms = [e for e in self.effects if isinstance(e, ArmTimer) and e.timer == timer]
        assert arms, f"{timer} was never armed"
        return arms[-1]

    def fire(self, timer: str) -> Transition:
        """Fire `timer` at its due time (the clock moves there)."""
        arm = self.armed(timer)
        self.now = max(self.now, arm.due_at)
        return self.apply(
            TimerFired(
                id=f"fired-{arm.id}", timer=timer, run=RUN, due_at=arm.due_at,
                fired_at=arm.due_at, purpose=arm.purpose, step=arm.step, data=arm.data,
            )
        )  # fmt: skip

    # -- reading what happened ----------------------------------------------------------

    def run_status(self) -> str:
        return self.run.status

    def status(self, step: str) -> str:
        return self.run.steps[step].status

    def statuses(self) -> dict[str, str]:
        return {sid: st.status for sid, st in self.run.steps.items()}

    def routes(self, step: str | None = None) -> list[RouteTask]:
        return [e for e in self.effects if isinstance(e, RouteTask) and step in (None, e.step)]

    def facts(self, kind: str | None = None, step: str | None = None) -> list[Fact]:
        return [
            e
            for e in self.effects
            if isinstance(e, Fact) and kind in (None, e.kind) and step in (None, e.step)
        ]

    def notified(self) -> list[str]:
        return [e.channel for e in self.effects if isinstance(e, Notify)]

    def timer(self, step: str, name: str = "sla") -> str:
        return f"{RUN}/{step}/{name}"
