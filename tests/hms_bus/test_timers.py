"""The SLA timer's pure schedule: due order, replace-on-rearm, disarm, stale firings,
exact microsecond times, stable partitions, and what a timer costs in memory."""

from __future__ import annotations

import gc
import tracemalloc
import zlib
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from hms_bus.timers import (
    Armed,
    Interner,
    Schedule,
    from_micros,
    partition_of,
    run_of,
    to_micros,
)

T0 = to_micros(datetime(2026, 11, 20, 9, 0, tzinfo=UTC))
interner = Interner()


def armed(name: str, due: int, purpose: str = "sla") -> Armed:
    return interner.armed(name, due, name.partition("/")[0], purpose, "review", {})


def test_timers_pop_in_due_order_and_only_when_due() -> None:
    s = Schedule()
    s.arm("R1/b/sla", armed("R1/b/sla", T0 + 20))
    s.arm("R1/a/sla", armed("R1/a/sla", T0 + 10))
    s.arm("R1/c/sla", armed("R1/c/sla", T0 + 30))
    assert s.next_due() == T0 + 10
    assert s.pop_due(T0 + 9) == []
    assert [n for n, _ in s.pop_due(T0 + 20)] == ["R1/a/sla", "R1/b/sla"]
    assert len(s) == 1
    assert s.next_due() == T0 + 30


def test_rearming_replaces_the_due_time_both_earlier_and_later() -> None:
    s = Schedule()
    s.arm("R1/x/sla", armed("R1/x/sla", T0 + 10))
    s.arm("R1/x/sla", armed("R1/x/sla", T0 + 50))
    assert s.pop_due(T0 + 40) == []  # the old due time is gone
    s.arm("R1/x/sla", armed("R1/x/sla", T0 + 5))
    fired = s.pop_due(T0 + 100)
    assert [(n, a[0]) for n, a in fired] == [("R1/x/sla", T0 + 5)]  # once, at the new time
    assert s.pop_due(T0 + 1000) == []


def test_rearming_at_the_same_due_time_replaces_the_data() -> None:
    s = Schedule()
    s.arm("R1/x/sla", interner.armed("R1/x/sla", T0, "R1", "rung", "x", {"point": 0}))
    s.arm("R1/x/sla", interner.armed("R1/x/sla", T0, "R1", "rung", "x", {"point": 1}))
    ((_, entry),) = s.pop_due(T0)
    assert interner.decoded(entry[4]) == {"point": 1}
    assert s.statistics().heap == 0


def test_a_disarmed_timer_never_pops() -> None:
    s = Schedule()
    s.arm("R1/x/sla", armed("R1/x/sla", T0))
    assert s.disarm("R1/x/sla") is not None
    assert s.disarm("R1/x/sla") is None
    assert s.next_due() is None
    assert s.pop_due(T0 + 10**9) == []


def test_a_firing_of_an_older_arm_does_not_disarm_the_rearmed_timer() -> None:
    s = Schedule()
    s.arm("R1/x/sla", armed("R1/x/sla", T0 + 20))
    assert s.disarm("R1/x/sla", due=T0 + 10) is None  # stale: armed for another time
    assert "R1/x/sla" in s
    assert s.disarm("R1/x/sla", due=T0 + 20) is not None


def test_pop_due_honours_its_limit() -> None:
    s = Schedule((f"R{i}/x/sla", armed(f"R{i}/x/sla", T0 + i)) for i in range(10))
    assert len(s.pop_due(T0 + 100, limit=3)) == 3
    assert len(s) == 7


def test_stale_heap_pairs_are_compacted_away() -> None:
    s = Schedule()
    for i in range(5000):
        s.arm("R1/x/sla", armed("R1/x/sla", T0 + i))  # 5,000 re-arms of one timer
    assert len(s) == 1
    assert s.statistics().heap <= 2 + 1024 + 1


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["arm", "disarm"]),
            st.integers(0, 7),  # timer
            st.integers(0, 50),  # due offset
        ),
        max_size=60,
    ),
    st.integers(0, 60),
)
def test_the_schedule_agrees_with_a_plain_dict(
    ops: list[tuple[str, int, int]], now_offset: int
) -> None:
    s, model = Schedule(), {}
    for op, timer, due in ops:
        name = f"R{timer}/s/sla"
        if op == "arm":
            s.arm(name, armed(name, T0 + due))
            model[name] = T0 + due
        else:
            s.disarm(name)
            model.pop(name, None)
    now = T0 + now_offset
    due_now = sorted((d, n) for n, d in model.items() if d <= now)
    assert [(a[0], n) for n, a in s.pop_due(now)] == due_now
    rest = {n: d for n, d in model.items() if d > now}
    assert {n: a[0] for n, a in s.items()} == rest
    assert s.next_due() == (min(rest.values()) if rest else None)


def test_times_are_exact_to_the_microsecond() -> None:
    at = datetime(2026, 11, 20, 14, 2, 16, 123457, tzinfo=UTC)
    assert from_micros(to_micros(at)) == at
    assert to_micros(at + timedelta(microseconds=1)) == to_micros(at) + 1


def test_partitions_are_stable_and_spread() -> None:
    name = "FTC-20261120-00042/human_review/sla"
    assert partition_of(name, 16) == zlib.crc32(name.encode()) % 16
    counts = [0] * 16
    for i in range(16_000):
        counts[partition_of(f"FTC-20261120-{i:05d}/review/sla", 16)] += 1
    assert min(counts) > 800


def test_the_run_is_left_out_when_the_name_starts_with_it() -> None:
    mine = interner.armed("FTC-1/review/sla", T0, "FTC-1", "sla", "review", {})
    other = interner.armed("task-9/retry", T0, "FTC-1", "retry", "review", {})
    assert mine[1] is None
    assert run_of("FTC-1/review/sla", mine) == "FTC-1"
    assert run_of("task-9/retry", other) == "FTC-1"


def test_equal_data_is_shared_and_entries_hold_no_container() -> None:
    a = interner.armed("R1/x/sla", T0, "R1", "rung", "x", {"point": 1})
    b = interner.armed("R2/x/sla", T0, "R2", "rung", "x", {"point": 1})
    assert a[4] is b[4]
    assert interner.decoded(a[4]) is interner.decoded(b[4])
    assert not any(isinstance(v, (dict, list, tuple)) for v in a)  # the collector can untrack it
    gc.collect()
    assert not gc.is_tracked(a)


def test_a_timer_costs_under_400_bytes() -> None:
    n = 50_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        s = Schedule()
        for i in range(n):
            run = f"FTC-20261120-{i:05d}"
            name = f"{run}/human_review/sla"
            s.arm(name, interner.armed(name, T0 + i * 1000, run, "sla", "human_review", {}))
        per_timer = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(s) == n
    assert per_timer < 400, per_timer
