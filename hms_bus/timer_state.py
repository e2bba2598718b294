"""The SLA timer's state machine: the timers of the partitions one replica holds, kept by
applying the timers log in order. Pure: no I/O, no clock (the actor passes `now`).

The log is the timers stream: `ArmTimer`, `DisarmTimer` and `TimerFired` entries with
increasing sequence numbers. Applying an entry to the partition its timer belongs to:

- `ArmTimer`: arm (or re-arm: replace the due time);
- `DisarmTimer`: disarm;
- `TimerFired`: disarm, *if* the timer is still armed for that due time (a firing of
  an older arm leaves a re-arm alone).

A partition starts from a snapshot taken at some log position (its `floor`) and
skips the entries at or below it. Applying the same stretch of log twice ends in the
same state (arm and disarm set a state, a firing only removes an exact match), but a
partition must not fire from a half-replayed state, so it becomes `ready` only once
the log is read up to its `target`: the end of the log when the partition was taken.

Firing: `take_due()` pops what is due from ready partitions and remembers it as in
flight; `settle()` forgets it once published, or puts it back if publishing failed
(unless an arm or a disarm came meanwhile). A snapshot (`copy()`) counts the timers
in flight as armed: their firing is not in the log yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import datetime

from hms_bus.messages import ArmTimer, DisarmTimer, TimerFired
from hms_bus.timers import (
    Armed,
    Interner,
    Schedule,
    fired_id,
    from_micros,
    partition_of,
    run_of,
    to_micros,
)

__all__ = ["NEVER", "Due", "Partition", "TimerState"]

log = logging.getLogger(__name__)

#: A due time later than any (microseconds): "nothing planned".
NEVER = 2**62

Due = tuple["Partition", str, Armed]


class Partition:
    __slots__ = (
        "changes",
        "floor",
        "inflight",
        "number",
        "ready",
        "retiring",
        "schedule",
        "snap_at",
        "snap_position",
        "target",
    )

    def __init__(
        self, number: int, schedule: Schedule | None = None, floor: int = 0, target: int = 0
    ) -> None:
        self.number = number
        self.schedule = schedule if schedule is not None else Schedule()
        self.floor = floor  # log entries at or below it are in the schedule already
        self.target = target  # ready to fire once the log is read up to here
        self.ready = False
        self.retiring = False  # being handed over: fires no more
        self.inflight: dict[str, Armed] = {}  # taken to fire, not yet settled
        self.changes = 0  # entries applied since the last snapshot
        self.snap_position = floor
        self.snap_at = time.monotonic()


class TimerState:
    def __init__(self, partitions: int, interner: Interner | None = None) -> None:
        self.partitions = partitions
        self.interner = interner or Interner()
        self.parts: dict[int, Partition] = {}
        self.position = 0  # the last log sequence applied
        self.became_ready = False  # set when a partition becomes ready; the reader clears it
        self._next_target = NEVER  # the lowest target of a partition not ready yet

    def armed(self) -> int:
        return sum(len(p.schedule) for p in self.parts.values())

    def add(self, fresh: Iterable[Partition], *, reading: bool = True) -> int | None:
        """Hold freshly loaded partitions. Returns the log sequence to (re)start reading
        from: where the oldest of their snapshots stops, if the reader is past it (or
        not `reading` at all); None if the reader may go on where it is."""
        fresh = list(fresh)
        if not fresh:
            return None
        start = min(p.floor for p in fresh) + 1
        restart = start <= self.position or not reading
        if restart:
            # What is held already has seen the log up to here: it skips the re-read.
            for part in self.parts.values():
                part.floor = max(part.floor, self.position)
            self.position = start - 1
        for part in fresh:
            self.parts[part.number] = part
        self.check_ready()
        return start if restart else None

    def drop(self, number: int) -> Partition | None:
        return self.parts.pop(number, None)

    def apply(self, seq: int, entry: ArmTimer | DisarmTimer | TimerFired) -> int | None:
        """Apply log entry `seq`; returns the due time of a timer it armed, if any."""
        self.position = seq
        due = None
        part = self.parts.get(partition_of(entry.timer, self.partitions))
        if part is not None and seq > part.floor:
            name = entry.timer
            match entry:
                case ArmTimer():
                    due = to_micros(entry.due_at)
                    armed = self.interner.armed(
                        name, due, entry.run, entry.purpose, entry.step, entry.data
                    )
                    part.schedule.arm(name, armed)
                    part.inflight.pop(name, None)
                case DisarmTimer():
                    part.schedule.disarm(name)
                    part.inflight.pop(name, None)
                case TimerFired():
                    fired = to_micros(entry.due_at)
                    part.schedule.disarm(name, fired)
                    flying = part.inflight.get(name)
                    if flying is not None and flying[0] == fired:
                        del part.inflight[name]  # in the log: done, whatever its ack says
            part.changes += 1
        if seq >= self._next_target:
            self.check_ready()
        return due

    def skip(self, seq: int) -> None:
        """Log entry `seq` is not a timer message: only the position moves."""
        self.position = seq
        if seq >= self._next_target:
            self.check_ready()

    def check_ready(self) -> list[Partition]:
        """Mark the partitions whose replay is complete ready; return them."""
        waiting, ready = [], []
        for part in self.parts.values():
            if part.ready or part.retiring:
                continue
            if self.position >= part.target:
                part.ready = self.became_ready = True
                ready.append(part)
                log.debug("partition %d ready: %d timers armed", part.number, len(part.schedule))
            else:
                waiting.append(part.target)
        self._next_target = min(waiting, default=NEVER)
        return ready

    def next_due(self) -> int | None:
        dues = [p.schedule.next_due() for p in self.parts.values() if p.ready]
        return min((d for d in dues if d is not None), default=None)

    def take_due(self, now: int, limit: int) -> list[Due]:
        """Pop up to `limit` due timers of ready partitions, now in flight."""
        out: list[Due] = []
        for part in self.parts.values():
            if part.ready and len(out) < limit:
                for name, armed in part.schedule.pop_due(now, limit - len(out)):
                    part.inflight[name] = armed
                    out.append((part, name, armed))
        return out

    def settle(self, batch: Iterable[Due], *, published: bool) -> None:
        """Forget fired timers; if publishing failed, arm them again (unless an arm or
        a disarm of the same name came meanwhile, or the partition is gone)."""
        for part, name, armed in batch:
            if part.inflight.get(name) is not armed:
                continue
            del part.inflight[name]
            if not published and name not in part.schedule and self.parts.get(part.number) is part:
                part.schedule.arm(name, armed)

    def firing(self, name: str, armed: Armed, fired_at: datetime) -> TimerFired:
        """The message that fires timer `name`, with its deterministic id."""
        due, _, purpose, step, data = armed
        return TimerFired(
            id=fired_id(name, due),
            timer=name,
            run=run_of(name, armed),
            due_at=from_micros(due),
            fired_at=fired_at,
            purpose=purpose,
            step=step,
            data=self.interner.decoded(data),
        )

    def copy(self, part: Partition) -> tuple[int, list[tuple[str, Armed]]]:
        """What a snapshot of `part` holds now: its log position and its timers."""
        position = max(part.floor, self.position)
        entries = list(part.schedule.items())
        entries += [(n, a) for n, a in part.inflight.items() if n not in part.schedule]
        return position, entries
