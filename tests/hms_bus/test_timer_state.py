"""The SLA timer's state machine over the timers log, without NATS: replaying the log
from a snapshot rebuilds exactly, firings in the log are not fired again, partitions
fire only once their replay is complete, and a failed firing is armed again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hms_bus.messages import ArmTimer, DisarmTimer, TimerFired
from hms_bus.timer_state import Partition, TimerState
from hms_bus.timers import Schedule, partition_of, to_micros

P = 4
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
Entry = ArmTimer | DisarmTimer | TimerFired


def arm(name: str, minutes: float) -> ArmTimer:
    return ArmTimer(
        id=f"arm/{name}/{minutes}",
        timer=name,
        run=name.partition("/")[0],
        due_at=T0 + timedelta(minutes=minutes),
        purpose="sla",
        step="review",
    )


def disarm(name: str) -> DisarmTimer:
    return DisarmTimer(id=f"disarm/{name}", timer=name, run=name.partition("/")[0])


def fired(name: str, minutes: float) -> TimerFired:
    due = T0 + timedelta(minutes=minutes)
    return TimerFired(
        id=f"{name}@{minutes}",
        timer=name,
        run=name.partition("/")[0],
        due_at=due,
        fired_at=due,
        purpose="sla",
    )


def holding_all(state: TimerState, target: int = 0) -> TimerState:
    state.add(Partition(p, target=target) for p in range(P))
    return state


def replay(log: list[Entry], state: TimerState, start: int = 1) -> None:
    for seq, entry in enumerate(log[start - 1 :], start):
        state.apply(seq, entry)


def names(state: TimerState) -> dict[str, int]:
    return {n: a[0] for p in state.parts.values() for n, a in p.schedule.items()}


def at(minutes: float) -> int:
    return to_micros(T0 + timedelta(minutes=minutes))


LOG: list[Entry] = [
    arm("A/x/sla", 10),
    arm("B/x/sla", 20),
    arm("C/x/sla", 30),
    disarm("B/x/sla"),
    arm("A/x/sla", 40),  # re-armed later
    fired("C/x/sla", 30),  # fired by a previous owner
    arm("D/x/sla", 5),
    fired("A/x/sla", 10),  # a stale firing of A's first arm
]


def test_replaying_the_log_arms_disarms_and_forgets_what_fired() -> None:
    state = holding_all(TimerState(P))
    replay(LOG, state)
    assert names(state) == {"A/x/sla": at(40), "D/x/sla": at(5)}


def test_a_snapshot_plus_the_rest_of_the_log_equals_the_whole_log() -> None:
    whole = holding_all(TimerState(P))
    replay(LOG, whole)
    for cut in range(len(LOG) + 1):
        first = holding_all(TimerState(P))
        replay(LOG[:cut], first)
        copies = {n: first.copy(p) for n, p in first.parts.items()}
        rebuilt = TimerState(P)
        rebuilt.add(Partition(n, Schedule(e), floor=pos) for n, (pos, e) in copies.items())
        replay(LOG, rebuilt)  # from the start: what the snapshots hold is skipped
        assert names(rebuilt) == names(whole), cut


def test_reading_the_log_twice_changes_nothing() -> None:
    once, twice = holding_all(TimerState(P)), holding_all(TimerState(P))
    replay(LOG, once)
    replay(LOG, twice)
    for p in twice.parts.values():
        p.floor = 0
    twice.position = 0
    replay(LOG, twice)
    assert names(twice) == names(once)


def test_a_partition_fires_only_once_the_log_is_read_to_its_target() -> None:
    state = holding_all(TimerState(P), target=len(LOG))
    replay(LOG[:-1], state)
    assert state.take_due(at(1000), 100) == []
    assert not any(p.ready for p in state.parts.values())
    state.apply(len(LOG), LOG[-1])
    assert all(p.ready for p in state.parts.values())
    assert sorted(n for _, n, _ in state.take_due(at(1000), 100)) == ["A/x/sla", "D/x/sla"]


def test_a_new_partition_behind_the_reader_asks_for_a_reread() -> None:
    state = TimerState(P)
    mine = partition_of("A/x/sla", P)
    state.add([Partition(p) for p in range(P) if p != mine])
    replay(LOG, state)
    assert "A/x/sla" not in names(state)
    start = state.add([Partition(mine, floor=2)])
    assert start == 3
    assert state.position == 2
    replay(LOG, state, start=3)  # the others skip what they have seen already
    assert names(state) == {"A/x/sla": at(40), "D/x/sla": at(5)}


def test_a_failed_firing_is_armed_again_unless_rearmed_or_disarmed_meanwhile() -> None:
    state = holding_all(TimerState(P))
    replay([arm("A/x/sla", 1), arm("B/x/sla", 1), arm("C/x/sla", 1)], state)
    batch = state.take_due(at(1), 10)
    assert len(batch) == 3
    state.apply(4, arm("B/x/sla", 9))  # re-armed while in flight
    state.apply(5, disarm("C/x/sla"))  # disarmed while in flight
    _, entries = state.copy(state.parts[partition_of("A/x/sla", P)])
    assert "A/x/sla" in dict(entries)  # a snapshot counts it as armed
    state.settle(batch, published=False)
    assert names(state) == {"A/x/sla": at(1), "B/x/sla": at(9)}


def test_a_published_firing_is_forgotten() -> None:
    state = holding_all(TimerState(P))
    state.apply(1, arm("A/x/sla", 1))
    batch = state.take_due(at(1), 10)
    state.settle(batch, published=True)
    assert names(state) == {}
    assert all(not p.inflight for p in state.parts.values())


def test_a_firing_in_the_log_settles_one_in_flight() -> None:
    state = holding_all(TimerState(P))
    state.apply(1, arm("A/x/sla", 1))
    batch = state.take_due(at(1), 10)
    state.apply(2, fired("A/x/sla", 1))  # stored, though its ack was lost
    _, entries = state.copy(state.parts[partition_of("A/x/sla", P)])
    assert "A/x/sla" not in dict(entries)  # a snapshot now would not fire it again
    state.settle(batch, published=False)
    assert names(state) == {}
