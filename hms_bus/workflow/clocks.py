"""Clocks: a step's SLA (or a wait's limit) and the run's SLA, as stoppable clocks.

A clock counts from the moment its step became READY (queue time counts). It arms
one timer at a time, for its next point: the ladder rungs at their fractions of the
duration and the breach at 100%, in order. Pause stops every clock and keeps the time
used; resume restarts them, so what is left is what was left. The run's clock also
stops while a wait step waits on the citizen (stop-the-clock).

Timer names are deterministic, so re-arming replaces and a stale firing is
recognised: `<run>/<step>/sla`, `<run>/<step>/wait`, `<run>/run-sla`, and
`<task>/retry` for a retry's backoff.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from hms_bus.workflow.calendar import elapsed
from hms_bus.workflow.model import Duration
from hms_bus.workflow.plan import Point
from hms_bus.workflow.state import Clock
from hms_bus.workflow.txn import Txn

__all__ = [
    "arm_next",
    "clock_timer",
    "run_deadline",
    "run_timer",
    "start_run_clock",
    "start_step_clock",
    "stop_run_clock",
    "stop_step_clock",
    "take_point",
    "take_run_point",
]

_replace = msgspec.structs.replace


def clock_timer(tx: Txn, sid: str) -> str:
    return f"{tx.run.run}/{sid}/{tx.plan.steps[sid].clock_name}"


def run_timer(tx: Txn) -> str:
    return f"{tx.run.run}/run-sla"


def _used(tx: Txn, duration: Duration, clock: Clock) -> float:
    if clock.started is None:
        return clock.used
    if not duration.business:
        return clock.used + (tx.now - clock.started).total_seconds()
    return clock.used + elapsed(tx.wf, duration, clock.started, tx.now)


def _running(tx: Txn, duration: Duration, clock: Clock, points: tuple[Point, ...]) -> Clock:
    """`clock` restarted now, with its deadline and the due time of its next point."""
    left = duration.seconds - clock.used
    deadline = tx.after(duration, left, tx.now)
    due = None
    if clock.next < len(points):
        at = points[clock.next].at * duration.seconds - clock.used
        due = deadline if points[clock.next].breach else tx.after(duration, at, tx.now)
    return _replace(clock, started=tx.now, deadline=deadline, due=due, left=None)


def start_step_clock(tx: Txn, sid: str, *, reset: bool = False) -> None:
    """Start (or restart after a pause) the step's clock and arm its next point.

    `reset` starts the duration over (a reassignment with `reset_clock`); points
    already passed do not fire again.
    """
    sp = tx.plan.steps[sid]
    if sp.duration is None:
        return
    st = tx.step(sid)
    clock = st.clock or Clock()
    if reset:
        clock = _replace(clock, used=0.0, started=None)
    elif clock.started is not None:
        clock = _replace(clock, used=_used(tx, sp.duration, clock), started=None)
    clock = _running(tx, sp.duration, clock, sp.points)
    st.clock = clock
    if clock.due is not None:
        tx.arm(clock_timer(tx, sid), clock.due, sp.clock_name, sid, {"point": clock.next})


def stop_step_clock(tx: Txn, sid: str) -> None:
    """Stop the step's clock, keeping the time used (pause, or the step ended)."""
    sp = tx.plan.steps[sid]
    st = tx.peek(sid)
    if sp.duration is None or st.clock is None or st.clock.started is None:
        return
    st = tx.step(sid)
    assert st.clock is not None
    used = _used(tx, sp.duration, st.clock)
    left = max(0.0, sp.duration.seconds - used)
    st.clock = _replace(st.clock, started=None, used=used, due=None, deadline=None, left=left)
    tx.disarm(clock_timer(tx, sid))


def take_point(tx: Txn, sid: str, point: int) -> Point | None:
    """The point whose timer fired, if it is still the clock's next one; moves the
    clock past it (the caller applies the point's actions, then re-arms)."""
    sp = tx.plan.steps[sid]
    st = tx.peek(sid)
    if st.clock is None or st.clock.next != point or point >= len(sp.points):
        return None
    st = tx.step(sid)
    assert st.clock is not None
    st.clock = _replace(st.clock, next=point + 1, due=None)
    return sp.points[point]


def arm_next(tx: Txn, sid: str) -> None:
    """Arm the timer for the clock's next point (after one fired), if it is running."""
    st = tx.peek(sid)
    if st.clock is None or st.clock.started is None:
        return
    start_step_clock(tx, sid)


def start_run_clock(tx: Txn, *, again: bool = False) -> None:
    """Start the run's clock (or restart it after a pause, a wait, or with `again` a
    point that fired) and arm its next point, if it has one left."""
    duration = tx.wf.sla
    run = tx.run
    if duration is None or run.clock is None:
        return
    clock = run.clock
    if clock.started is not None:
        if not again:
            return
        clock = _replace(clock, used=_used(tx, duration, clock), started=None)
    clock = _running(tx, duration, clock, tx.plan.run_points)
    run.clock = clock
    if clock.due is not None:
        tx.arm(run_timer(tx), clock.due, "run-sla", None, {"point": clock.next})


def take_run_point(tx: Txn, point: int) -> Point | None:
    """The run clock's point whose timer fired, if it is still the next one; moves the
    clock past it (the caller applies its actions, then re-arms)."""
    clock = tx.run.clock
    points = tx.plan.run_points
    if clock is None or clock.next != point or point >= len(points):
        return None
    tx.run.clock = _replace(clock, next=point + 1, due=None)
    return points[point]


def stop_run_clock(tx: Txn) -> None:
    duration = tx.wf.sla
    run = tx.run
    if duration is None or run.clock is None or run.clock.started is None:
        return
    used = _used(tx, duration, run.clock)
    left = max(0.0, duration.seconds - used)
    run.clock = _replace(run.clock, started=None, used=used, due=None, deadline=None, left=left)
    tx.disarm(run_timer(tx))


def run_deadline(tx: Txn) -> datetime | None:
    return tx.run.clock.deadline if tx.run.clock is not None else None
