"""The SLA timer against a real server: a timer fires once, at its due time, with its
deterministic id; re-arming replaces; disarming prevents; the state survives a crash
of the actor (snapshot + log), a restart of the server, and a SIGKILL of a real
`hms actor run sla-timer` process holding 10,000 timers; two replicas share the timers
and one takes over from the other. Hours pass on a `ManualClock`; the actor is woken
when it moves (`SlaTimer.wake`)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest

from actors.sla_timer import SlaTimer
from hms_bus.clock import ManualClock
from hms_bus.connection import Bus
from hms_bus.health import live_heartbeats
from hms_bus.messages import ArmTimer, DisarmTimer, Message, TimerFired, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.server import NatsServer
from hms_bus.subjects import Namespace
from hms_bus.timers import fired_id, to_micros
from tests.e2e.harness import Processes, read_stored
from tests.helpers import bus_for, eventually

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
_fired = decoder_for(TimerFired)


class Running:
    """SlaTimer replicas of one test: started as the daemon starts them; `crash()`
    cancels one without its graceful stop (no last snapshot, leases left to expire)."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.scopes: dict[int, anyio.CancelScope] = {}

    async def start(self, bus: Bus, **options: Any) -> SlaTimer:
        options.setdefault("lease_ttl", 1.5)
        metrics = options.pop("metrics", None) or Metrics.create()
        timer = SlaTimer(bus, metrics, **options)

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.CancelScope() as scope:
                self.scopes[id(timer)] = scope
                await timer.run(task_status=task_status)

        await self._tg.start(run)
        return timer

    def crash(self, timer: SlaTimer) -> None:
        self.scopes[id(timer)].cancel()


@asynccontextmanager
async def running() -> AsyncIterator[Running]:
    async with anyio.create_task_group() as tg:
        replicas = Running(tg)
        try:
            yield replicas
        finally:
            tg.cancel_scope.cancel()


def arm(name: str, due: datetime, purpose: str = "sla", **data: Any) -> ArmTimer:
    run = name.partition("/")[0]
    return ArmTimer(
        id=f"arm/{name}/{due.isoformat()}",
        timer=name,
        run=run,
        due_at=due,
        purpose=purpose,
        step="review",
        data=data,
    )


def disarm(name: str) -> DisarmTimer:
    return DisarmTimer(id=f"disarm/{name}", timer=name, run=name.partition("/")[0])


async def publish(bus: Bus, *messages: Message) -> int:
    """Publish timer commands in order; return the log sequence of the last."""
    ns = bus.ns
    verb = {ArmTimer: "arm", DisarmTimer: "disarm"}
    items = [(ns.timer(verb[type(m)]), m) for m in messages]
    last = 0
    for start in range(0, len(items), 2000):
        acks = await bus.publish_all(items[start : start + 2000])
        last = max([last, *(a.seq for a in acks)])
    return last


async def read_to(timer: SlaTimer, seq: int) -> None:
    """Wait until the timer has applied its log up to `seq` (before moving the clock
    past what those entries change)."""
    await eventually(lambda: timer.statistics().position >= seq, what=f"log read to {seq}")


async def fired_count(bus: Bus) -> int:
    subject = bus.ns.timer("fired")
    info = await bus.js.stream_info(bus.ns.timers_stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def wait_fired(bus: Bus, n: int, timeout: float = 20.0) -> None:
    async def enough() -> bool:
        return await fired_count(bus) >= n

    await eventually(enough, timeout=timeout, interval=0.05, what=f"{n} firings stored")


async def stored_firings(bus: Bus) -> list[TimerFired]:
    """Every firing in the timers stream, in order (an ephemeral reader)."""
    stored = await read_stored(bus, bus.ns.timers_stream, bus.ns.timer("fired"))
    return [_fired.decode(data) for data in stored]


def move(clock: ManualClock, to: datetime, *timers: SlaTimer) -> None:
    clock.advance(to - clock.now())
    for timer in timers:
        timer.wake()


async def test_a_timer_fires_once_at_its_due_time_with_a_deterministic_id(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    due = T0 + timedelta(hours=4)
    metrics = Metrics.create()
    async with bus_for(nats_url, ns) as bus, running() as replicas:
        timer = await replicas.start(bus, clock=clock, metrics=metrics)
        await publish(bus, arm("FTC-1/review/sla", due, point=1))
        move(clock, due - timedelta(seconds=1), timer)
        # A sentinel due now: once it has fired, the 4h timer was looked at and kept.
        await publish(bus, arm("FTC-0/review/sla", clock.now()))
        await wait_fired(bus, 1)
        move(clock, due, timer)
        await wait_fired(bus, 2)
        first, second = await stored_firings(bus)
        await publish(bus, arm("FTC-9/review/sla", due))  # a later sentinel
        await wait_fired(bus, 3)
        assert len(await stored_firings(bus)) == 3
    assert first.timer == "FTC-0/review/sla"
    assert second.timer == "FTC-1/review/sla"
    assert (
        second.id
        == "FTC-1/review/sla@2026-11-20T13:00:00Z"
        == fired_id(second.timer, to_micros(due))
    )
    assert (second.due_at, second.fired_at) == (due, due)
    assert (second.run, second.purpose, second.step, second.data) == (
        "FTC-1",
        "sla",
        "review",
        {"point": 1},
    )
    sample = metrics.registry.get_sample_value
    assert sample("hms_timer_firings_total", {"purpose": "sla"}) == 3
    assert sample("hms_timer_lateness_seconds_count") == 3
    assert sample("hms_timer_lateness_seconds_sum") == 0  # on a manual clock: never late


async def test_rearming_replaces_and_disarming_prevents(nats_url: str, ns: Namespace) -> None:
    clock = ManualClock(T0)
    h = timedelta(hours=1)
    async with bus_for(nats_url, ns) as bus, running() as replicas:
        timer = await replicas.start(bus, clock=clock)
        last = await publish(
            bus,
            arm("A/s/sla", T0 + 1 * h),
            arm("A/s/sla", T0 + 3 * h),  # later
            arm("B/s/sla", T0 + 3 * h),
            arm("B/s/sla", T0 + 2 * h),  # earlier
            arm("C/s/sla", T0 + 1 * h),
            disarm("C/s/sla"),
            disarm("never-armed/s/sla"),
        )
        await read_to(timer, last)  # else the clock may pass A's first due time first
        move(clock, T0 + 2 * h, timer)
        await wait_fired(bus, 1)
        move(clock, T0 + 3 * h, timer)
        await wait_fired(bus, 2)
        await publish(bus, arm("Z/s/sla", T0 + 3 * h))  # read after all the above
        await wait_fired(bus, 3)
        firings = await stored_firings(bus)
        assert timer.statistics().armed == 0
    assert [(f.timer, f.due_at) for f in firings] == [
        ("B/s/sla", T0 + 2 * h),
        ("A/s/sla", T0 + 3 * h),
        ("Z/s/sla", T0 + 3 * h),
    ]


async def test_a_crashed_timer_is_rebuilt_from_its_snapshot_and_the_log(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    m = timedelta(minutes=1)
    names = [f"R{i:03d}/s/sla" for i in range(300)]
    async with bus_for(nats_url, ns) as bus, running() as replicas:
        first = await replicas.start(bus, clock=clock, snapshot_entries=50)
        await publish(bus, *(arm(n, T0 + (10 + i % 50) * m) for i, n in enumerate(names[:200])))
        await eventually(lambda: first.statistics().snapshots >= 16, what="snapshots of all")
        # After the snapshots, only in the log: 100 more arms, 40 disarms, 30 firings.
        await publish(bus, *(arm(n, T0 + (10 + i % 50) * m) for i, n in enumerate(names[200:])))
        await publish(bus, *(disarm(n) for n in names[:40]))
        await publish(bus, *(arm(n, T0 + 5 * m) for n in names[40:70]))
        await eventually(lambda: first.statistics().armed == 260, what="260 armed")
        move(clock, T0 + 5 * m, first)
        await wait_fired(bus, 30)
        replicas.crash(first)  # no last snapshot, leases left to expire
        await publish(bus, *(disarm(n) for n in names[70:90]))  # while it is down
        second = await replicas.start(bus, clock=clock)
        await eventually(lambda: len(second.statistics().ready) == 16, timeout=15, what="takeover")
        assert second.statistics().armed == 210
        move(clock, T0 + 60 * m, second)
        await wait_fired(bus, 240)
        await publish(bus, arm("sentinel/s/sla", T0))
        await wait_fired(bus, 241)
        firings = await stored_firings(bus)
        assert second.statistics().duplicates == 0
    counts = Counter(f.timer for f in firings)
    assert set(counts) == {*names[40:70], *names[90:], "sentinel/s/sla"}
    assert set(counts.values()) == {1}


async def test_two_replicas_share_the_timers_and_one_takes_over_from_the_other(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    m = timedelta(minutes=1)
    async with (
        bus_for(nats_url, ns, "a") as bus_a,
        bus_for(nats_url, ns, "b") as bus_b,
        running() as replicas,
    ):
        a = await replicas.start(bus_a, clock=clock)
        b = await replicas.start(bus_b, clock=clock)

        def shared() -> bool:
            mine, theirs = a.statistics().ready, b.statistics().ready
            return len(mine) == len(theirs) == 8 and not set(mine) & set(theirs)

        await eventually(shared, timeout=15, what="8 partitions each")
        await publish(bus_a, *(arm(f"R{i}/s/sla", T0 + (1 + i % 10) * m) for i in range(1000)))
        await eventually(lambda: a.statistics().armed + b.statistics().armed == 1000)
        move(clock, T0 + 10 * m, a, b)
        await wait_fired(bus_a, 1000)
        assert a.statistics().fired > 0
        assert b.statistics().fired > 0
        assert a.statistics().fired + b.statistics().fired == 1000

        replicas.crash(a)
        await publish(bus_b, *(arm(f"S{i}/s/sla", T0 + (20 + i % 10) * m) for i in range(500)))
        await eventually(lambda: len(b.statistics().ready) == 16, timeout=15, what="takeover")
        move(clock, T0 + 30 * m, b)
        await wait_fired(bus_a, 1500)
        firings = await stored_firings(bus_b)
        assert a.statistics().duplicates == b.statistics().duplicates == 0
    assert len(firings) == len({f.id for f in firings}) == 1500


async def test_timers_survive_a_restart_of_the_server(
    own_server: NatsServer, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    m = timedelta(minutes=1)
    async with bus_for(own_server.url, ns) as bus, running() as replicas:
        timer = await replicas.start(bus, clock=clock)
        await publish(bus, *(arm(f"R{i}/s/sla", T0 + (1 + i % 2) * m) for i in range(100)))
        await eventually(lambda: timer.statistics().armed == 100)
        move(clock, T0 + m, timer)
        await wait_fired(bus, 50)
        # In a thread: the actor runs on this event loop and, as in production, must
        # go on (and see the restart) while the server goes down and comes back.
        await anyio.to_thread.run_sync(own_server.kill)
        await anyio.to_thread.run_sync(own_server.start)
        await eventually(lambda: bus.connected, timeout=20, what="the test's reconnection")
        disarms = [disarm(f"R{i}/s/sla") for i in range(1, 100, 4)]  # 25 of them

        async def disarmed() -> bool:
            await publish(bus, *disarms)  # the same ids: published twice, stored once
            return True

        await eventually(disarmed, timeout=20, retry_on=(nats.errors.Error,))
        await eventually(lambda: timer.statistics().armed == 25, timeout=30, what="reloaded")
        move(clock, T0 + 2 * m, timer)
        await wait_fired(bus, 75, timeout=30)
        await publish(bus, arm("sentinel/s/sla", T0))
        await wait_fired(bus, 76)
        firings = await stored_firings(bus)
    counts = Counter(f.timer for f in firings)
    assert set(counts.values()) == {1}
    assert not {f"R{i}/s/sla" for i in range(1, 100, 4)} & set(counts)


@pytest.fixture
def procs(nats_url: str, ns: Namespace, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(nats_url, ns.root, tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()
        sys.stderr.write(p.logs())  # shown only when the test failed


async def _beating(bus: Bus, process: subprocess.Popen[bytes]) -> None:
    kv = await bus.js.key_value(bus.ns.health_bucket)

    async def beats() -> bool:
        assert process.poll() is None, f"hms actor run sla-timer exited {process.returncode}"
        beats = await live_heartbeats(kv)
        return any(b.pid == process.pid and b.actor == "sla-timer" for b in beats)

    await eventually(beats, timeout=30, interval=0.1, what=f"sla-timer pid {process.pid}")


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_sigkilled_timer_process_fires_every_due_timer_once_after_restart(
    nats_url: str, ns: Namespace, procs: Processes
) -> None:
    """10,000 armed: 1,000 fire before the kill, 2,000 are due 3 s after arming (around
    the kill: before or after it, each fires once), 7,000 are due in an hour. While the
    process is dead, 500 of those are re-armed to fire at once (due while it is down)
    and 500 are re-armed to fire at once and then disarmed. After the restart: every
    due timer fired exactly once, at its latest due time; no disarmed one and no
    future one fired. Nothing depends on how fast the machine is: what falls due while
    the process is dead is armed while it is dead."""
    async with bus_for(nats_url, ns) as bus:
        process = procs.actor("sla-timer")
        await _beating(bus, process)
        now = datetime.now(UTC)
        early = [f"E{i:04d}/s/sla" for i in range(1000)]
        soon = [f"S{i:04d}/s/sla" for i in range(2000)]
        later = [f"L{i:04d}/s/sla" for i in range(7000)]
        rearmed, disarmed = later[:500], later[500:1000]
        await publish(
            bus,
            *(arm(n, now) for n in early),
            *(arm(n, now + timedelta(seconds=3)) for n in soon),
            *(arm(n, now + timedelta(hours=1)) for n in later),
        )
        await wait_fired(bus, 1000)
        procs.kill(process)
        again = datetime.now(UTC)
        await publish(bus, *(arm(n, again) for n in rearmed + disarmed))
        await publish(bus, *(disarm(n) for n in disarmed))

        restarted = procs.actor("sla-timer")
        await _beating(bus, restarted)
        await wait_fired(bus, 1000 + 2000 + 500, timeout=40)
        await publish(bus, arm("sentinel/s/sla", datetime.now(UTC)))
        await wait_fired(bus, 3501)
        firings = await stored_firings(bus)
    by_timer = Counter(f.timer for f in firings)
    assert set(by_timer) == {*early, *soon, *rearmed, "sentinel/s/sla"}
    assert set(by_timer.values()) == {1}
    rearmed_set = set(rearmed)
    assert all(f.due_at == again for f in firings if f.timer in rearmed_set)
    assert all(f.fired_at >= f.due_at for f in firings)  # late, never early
