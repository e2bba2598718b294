"""Flow: which steps start, which can never run, and when the run is over.

After an input has been applied, `settle` brings the run to rest: it activates the
steps that flow reached (fall-through, `next`, a switch case, an escalation, an
`on_failure` or `on_reject` target) and the steps whose `needs` are all finished
(done or skipped); it skips, as soon as it is certain, every waiting step that no
live step can reach any more (a branch not taken; a step that needs a failed one),
so that a step needing it sees it as skipped; and it finishes the run when nothing
is active: DONE, or FAILED when a step failed the run.

A step runs at most once in a run (the language has no loops): flow reaching a
running step joins it, flow reaching a finished one ends there. Every activation is
of a WAITING step, so `settle` always terminates.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from hms_bus.workflow.clocks import start_run_clock, start_step_clock, stop_run_clock
from hms_bus.workflow.expr import ExprError, compile_expr
from hms_bus.workflow.model import FanoutStep, SwitchStep, WaitStep
from hms_bus.workflow.outcome import end_step, fail_step, follow, skip_step
from hms_bus.workflow.state import ACTIVE_STEP, Clock, StepState, Unit, step_status
from hms_bus.workflow.tasks import dispatch, join
from hms_bus.workflow.txn import Txn

__all__ = ["activate", "case_key", "derive_status", "finish", "settle", "sync_run_clock"]

#: A need that ended like this will never be done: its dependents can never run.
_BAD = frozenset({"FAILED", "TIMED_OUT", "CANCELLED", "REJECTED"})
_GOOD = frozenset({"DONE", "SKIPPED"})


def case_key(value: Any) -> str:
    """A switch value's string form, which case keys are compared with."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    return msgspec.json.encode(value).decode()


def activate(tx: Txn, sid: str, *, by_needs: bool = False) -> None:
    """Flow (or its needs) reached `sid`: run its guard, then start it.

    A step runs at most once in a run: flow arriving at a step that is running joins
    it, and flow arriving at a step that has run ends there (the language has no
    loops). A step with needs, even `needs: []`, is started by its needs only.
    """
    sp = tx.plan.steps.get(sid)
    if sp is None or tx.status(sid) != "WAITING":
        return
    step = sp.step
    if step.needs is not None and not by_needs:
        return
    st = StepState(status="READY", ready_at=tx.now)
    tx.put_step(sid, st)
    if step.when is not None:
        try:
            go = compile_expr(step.when).test(tx.scope())
        except ExprError as exc:
            fail_step(tx, sid, f"when: {exc}")
            return
        if not go:
            skip_step(tx, sid, f"when: {step.when}", go_on=True)
            return
    kind = sp.kind
    if kind == "task" or kind == "checkpoint":
        st.units = [Unit(status="READY")]
        _start(tx, sid)
    elif kind == "switch":
        assert isinstance(step, SwitchStep)
        _switch(tx, sid, step, tx.scope())
    elif kind == "wait":
        assert isinstance(step, WaitStep)
        _wait(tx, sid, step)
    else:
        assert isinstance(step, FanoutStep)
        _fanout(tx, sid, step, tx.scope())


def _start(tx: Txn, sid: str, data: dict[str, Any] | None = None) -> None:
    """Start the step's clock and hand out its units. `step.ready` is recorded when
    that is not said by the dispatch itself: a fan-out (its items), a paused run."""
    if tx.run.paused is not None:
        tx.fact("step.ready", sid, reason="run paused", data=data)
        if tx.plan.steps[sid].duration is not None:
            tx.step(sid).clock = Clock()
        return
    if data is not None:
        tx.fact("step.ready", sid, data=data)
    start_step_clock(tx, sid)
    for index in range(len(tx.peek(sid).units)):
        dispatch(tx, sid, index)


def _switch(tx: Txn, sid: str, step: SwitchStep, scope: dict[str, Any]) -> None:
    try:
        value = compile_expr(step.expr).evaluate(scope)
    except ExprError as exc:
        fail_step(tx, sid, f"expr: {exc}")
        return
    key = case_key(value)
    target = step.cases.get(key, step.default)
    if target is None:
        fail_step(tx, sid, f"no case for {key!r} and no default")
        return
    tx.step(sid).chosen = target
    end_step(tx, sid, "DONE")
    tx.fact("step.done", sid, data={"value": key, "next": target})
    follow(tx, target)


def _wait(tx: Txn, sid: str, step: WaitStep) -> None:
    signals = tx.run.signals
    for i, signal in enumerate(signals):
        if signal.name == step.event:
            tx.run.signals = signals[:i] + signals[i + 1 :]
            tx.set_result(sid, signal.payload)
            end_step(tx, sid, "DONE")
            tx.fact("wait.signalled", sid, data={"event": step.event, "buffered": signal.id})
            follow(tx, tx.plan.steps[sid].fall)
            return
    tx.step(sid).status = "WAITING_EVENT"
    data: dict[str, Any] = {"event": step.event}
    if step.limit is not None:
        data["limit"] = step.limit.text or step.limit.seconds
    tx.fact("wait.started", sid, data=data)
    if tx.run.paused is None:
        start_step_clock(tx, sid)
    elif step.limit is not None:
        tx.step(sid).clock = Clock()


def _fanout(tx: Txn, sid: str, step: FanoutStep, scope: dict[str, Any]) -> None:
    try:
        values = compile_expr(step.over).evaluate(scope)
    except ExprError as exc:
        fail_step(tx, sid, f"over: {exc}")
        return
    if not isinstance(values, list):
        fail_step(tx, sid, f"over: {step.over} is not a list")
        return
    st = tx.step(sid)
    st.values = list(values)
    st.units = [Unit(status="READY") for _ in values]
    if not values:
        tx.fact("step.ready", sid, data={"items": 0})
        join(tx, sid)
        return
    _start(tx, sid, {"items": len(values)})


def _skip_dead(tx: Txn) -> bool:
    """Skip every waiting step that can no longer run; True if any was skipped.

    A waiting step can still run if flow can reach it from a live step, or from a
    step with needs that can still start (none of its needs ended badly): such a
    step waits for its needs, and a need that can never run is skipped, which
    satisfies it.
    """
    plan = tx.plan
    # Statuses as they are now (a step skipped below changes only its own).
    status = {sid: step_status(st) for sid, st in dict.items(tx.run.steps)}
    reach = plan.reach
    possible = 0
    waiting = False
    for sid, st_status in status.items():
        if st_status in ACTIVE_STEP:
            possible |= reach[sid]
        elif st_status == "WAITING":
            waiting = True
    if not waiting:
        return False
    clock = tx.run.clock
    if plan.run_reach and clock is not None and clock.next < len(plan.run_points):
        possible |= plan.run_reach  # the run's on_timeout may still start these
    for sid in plan.with_needs:
        if status.get(sid) == "WAITING" and not any(
            status.get(n) in _BAD for n in plan.steps[sid].step.needs or ()
        ):
            possible |= reach[sid]
    dead = False
    for sid in plan.order:
        if status[sid] != "WAITING" or possible & plan.bit[sid]:
            continue
        needs = plan.steps[sid].step.needs or ()
        bad = [n for n in needs if status.get(n) in _BAD]
        reason = f"needs {bad[0]}, which ended {status[bad[0]]}" if bad else "not on the path taken"
        skip_step(tx, sid, reason, go_on=False)
        dead = True
    return dead


def _needs_met(tx: Txn, needs: tuple[str, ...]) -> bool:
    steps = tx.run.steps
    return all(tx.status(n) in _GOOD for n in needs if n in steps)


def settle(tx: Txn) -> None:
    """Activate what flow reached, skip what can never run, finish if nothing is left."""
    plan = tx.plan
    while tx.failure is None:
        while tx.queue and tx.failure is None:
            activate(tx, tx.queue.popleft())
        if tx.failure is not None:
            break
        progressed = False
        for sid in plan.with_needs:
            if tx.status(sid) == "WAITING" and _needs_met(tx, plan.steps[sid].step.needs or ()):
                activate(tx, sid, by_needs=True)
                progressed = True
        if tx.branched:
            # Waiting steps that can never run are skipped as soon as that is certain.
            # Once the run has started, that can only change when a step with several
            # ways on ends, or a step ends badly: a step that ends DONE (or skipped)
            # with one way on hands the run to that successor, which reaches all it
            # reached, so the search is skipped then.
            tx.branched = False
            progressed = _skip_dead(tx) or progressed
        if not progressed and not tx.queue:
            break
    if tx.failure is not None:
        finish(tx, "FAILED", tx.failure)
    elif not derive_status(tx):
        finish(tx, "DONE", None)


def sync_run_clock(tx: Txn, *, waiting: bool | None = None) -> None:
    """The run's clock runs unless the run is paused or a wait step waits (stop-the-clock)."""
    if tx.wf.sla is None or tx.run.clock is None:
        return
    if waiting is None:
        waiting = any(step_status(st) == "WAITING_EVENT" for st in dict.values(tx.run.steps))
    if tx.run.paused is None and not waiting:
        start_run_clock(tx)
    else:
        stop_run_clock(tx)


def derive_status(tx: Txn) -> bool:
    """What the run's user is told, from what its active steps hold; the run's clock
    follows (stopped while it waits on the citizen). False: no step is active."""
    run = tx.run
    # Called on every input: only the (few) active steps are looked at.
    active = tx.active()
    if not active:
        return False
    human = False
    waits: list[str] = []
    plans = tx.plan.steps
    for sid in active:
        sp = plans[sid]
        st = tx.peek(sid)
        if sp.event is not None:
            waits.append(sp.event)
        elif st.actor is not None:
            human = human or st.actor.startswith("HUMAN:")
        else:
            human = human or sp.human
    sync_run_clock(tx, waiting=bool(waits))
    if run.paused is not None:
        run.status = "PAUSED"
        run.reason = f"paused by {run.paused.by}: {run.paused.reason}"
    elif human:
        run.status = "IN_REVIEW"
        run.reason = None
    elif waits:
        run.status = "WAITING"
        run.reason = f"waiting for {', '.join(waits)}"
    else:
        run.status = "DISPATCHED" if run.responded else "QUEUED"
        run.reason = None
    return True


def finish(tx: Txn, outcome: Literal["DONE", "FAILED", "CANCELLED"], reason: str | None) -> None:
    """End the run: cancel what is open, skip what was never reached, disarm timers."""
    run = tx.run
    for sid in tx.plan.order:
        status = tx.status(sid)
        if status in ACTIVE_STEP:
            end_step(tx, sid, "CANCELLED", reason or f"run {outcome.lower()}")
        elif status == "WAITING":
            skip_step(tx, sid, f"not reached (run {outcome.lower()})", go_on=False)
    stop_run_clock(tx)
    for name in list(run.timers):
        tx.disarm(name)
    tx.queue.clear()
    run.status = outcome
    run.reason = reason
    run.finished_at = tx.now
    run.paused = None
    data: dict[str, Any] = {"outcome": outcome}
    tx.fact("run.finished", reason=reason, data=data)
