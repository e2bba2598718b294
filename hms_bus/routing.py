"""The routing table and the one decision the router makes: which lane takes a task.

Pure: no NATS here, so every rule is unit-tested without a server. The router
actor (`actors/router.py`) feeds `choose_lane()` what it knows (the table entry
from KV, the live lanes from the worker registry, pending counts) and acts on the
`Decision`.

The table lives in the routes bucket, one JSON `RouteEntry` per actor under
`route_key(actor)` (`AI:fraud-labeler` -> `AI.fraud-labeler`). Parked requests
(nothing could take them yet) live in the same bucket under `parked_key(task)`.

Resolution, in order:
1. An explicit `request.lane` (a reroute or a reassignment) wins; the value
   `backup` means "this actor's backup pool". A lane that has no worker but is an
   actor with an entry resolves through that entry.
2. No entry: the lane named like the actor, if it exists: a live worker
   registered for it, or it is a HUMAN lane (the inbox always exists).
3. An entry: its lanes that offer the request's skills and have a live worker.
   Different weights are a canary: a hash of the task id picks the lane, so a
   redelivered request picks the same one and the shares match the weights.
   Equal weights balance: the lane with the least pending work. None live: the
   entry's backup pool.
4. Otherwise the task is unroutable, with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

import msgspec

from hms_bus.errors import InvalidNameError
from hms_bus.messages import RouteTask
from hms_bus.subjects import Lane, check_token

__all__ = [
    "BACKUP",
    "PARKED",
    "Decision",
    "LaneChoice",
    "LiveLanes",
    "Parked",
    "PendingCache",
    "RouteEntry",
    "check_entry",
    "choose_lane",
    "decode_entry",
    "decode_parked",
    "encode",
    "key_token",
    "parked_key",
    "route_key",
]

#: The value of `RouteTask.lane` that asks for the actor's backup pool.
BACKUP = "backup"

#: Key prefix of parked requests in the routes bucket (actor kinds are upper case).
PARKED = "parked"


class LaneChoice(msgspec.Struct, frozen=True, kw_only=True):
    """One lane of an entry. `weight` 0 takes the lane out of rotation (it can still
    be named explicitly); `skills` are what the lane offers."""

    lane: str
    weight: int = 1
    skills: tuple[str, ...] = ()


class RouteEntry(msgspec.Struct, frozen=True, kw_only=True):
    """How one actor's tasks are spread. No lanes: the actor's own lane (useful to
    give it just a backup pool)."""

    actor: str
    lanes: tuple[LaneChoice, ...] = ()
    backup: str | None = None
    updated_by: str | None = None
    updated_at: datetime | None = None

    def effective(self) -> tuple[LaneChoice, ...]:
        return self.lanes or (LaneChoice(lane=self.actor),)


class Parked(msgspec.Struct, frozen=True, kw_only=True):
    """A request no lane could take. `lane` is set by the replica that won the
    compare-and-set to route it, so a crash after that routes it to the same lane."""

    request: RouteTask
    reason: str
    parked_at: datetime
    lane: str | None = None
    lane_reason: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    lane: str | None
    reason: str

    @property
    def routable(self) -> bool:
        return self.lane is not None


_encoder = msgspec.json.Encoder()
_entry_decoder = msgspec.json.Decoder(RouteEntry)
_parked_decoder = msgspec.json.Decoder(Parked)


def encode(value: RouteEntry | Parked) -> bytes:
    return _encoder.encode(value)


def decode_entry(data: bytes) -> RouteEntry:
    return _entry_decoder.decode(data)


def decode_parked(data: bytes) -> Parked:
    return _parked_decoder.decode(data)


# -- keys ------------------------------------------------------------------------------
_ESCAPE = re.compile(r"[^A-Za-z0-9_/-]")


def _escaped(match: re.Match[str]) -> str:
    return "".join(f"={b:02X}" for b in match.group().encode())


def key_token(text: str) -> str:
    """`text` as one KV key token: `[A-Za-z0-9_/-]` kept, every other byte as `=XX`.

    Injective (`=` itself is escaped), so two task ids never share a key; `.` is
    escaped because it would add a level to the key's subject."""
    if not text:
        raise InvalidNameError("an empty id cannot be a key")
    return _ESCAPE.sub(_escaped, text)


def route_key(actor: str) -> str:
    lane = Lane.parse(actor)
    return f"{lane.kind}.{lane.name}"


def parked_key(task_id: str) -> str:
    return f"{PARKED}.{key_token(task_id)}"


def check_entry(entry: RouteEntry) -> RouteEntry:
    """Raise `InvalidNameError` naming what is wrong with `entry`; else return it."""
    Lane.parse(entry.actor)
    seen: set[str] = set()
    for choice in entry.lanes:
        Lane.parse(choice.lane)
        if choice.lane in seen:
            raise InvalidNameError(f"lane {choice.lane} is listed twice for {entry.actor}")
        seen.add(choice.lane)
        if choice.weight < 0:
            raise InvalidNameError(f"lane {choice.lane}: weight {choice.weight} is below 0")
        for skill in choice.skills:
            check_token(skill, "skill")
    if entry.lanes and not any(c.weight > 0 for c in entry.lanes):
        raise InvalidNameError(f"{entry.actor}: every lane has weight 0; give one a weight above 0")
    if entry.backup is not None:
        Lane.parse(entry.backup)
    return entry


# -- the decision ------------------------------------------------------------------------
def _unit(text: str) -> float:
    """A stable number in [0, 1) for `text`: the same in every process and release
    (Python's `hash` is salted per process)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _serves(lane: str, live: Collection[str]) -> bool:
    return lane.startswith("HUMAN:") or lane in live


def _pct(share: float) -> str:
    return f"{round(share * 100, 1):g}%"


def choose_lane(
    entry: RouteEntry | None,
    request: RouteTask,
    pending: Mapping[str, int],
    live: Collection[str],
) -> Decision:
    """Which lane takes `request`, and why (see the module docstring for the rules)."""
    actor = request.actor
    if request.lane == BACKUP:
        if entry is None or entry.backup is None:
            return Decision(
                None,
                f"no lane serves {actor}: its backup pool was asked for "
                "but its routing entry names none",
            )
        if _serves(entry.backup, live):
            return Decision(entry.backup, f"explicit backup pool {entry.backup} of {actor}")
        return Decision(
            None, f"no lane serves {actor}: backup pool {entry.backup} has no live worker"
        )
    if request.lane is not None:
        if _serves(request.lane, live):
            return Decision(request.lane, f"explicit lane {request.lane} (reroute or reassignment)")
        if entry is not None and entry.actor == request.lane:
            # A reroute to an actor (the engine then names it as actor and lane) goes
            # through that actor's entry: its canary and backup still apply.
            return _from_entry(entry, request, pending, live)
        return Decision(
            None, f"no lane serves {actor}: explicit lane {request.lane} has no live worker"
        )
    if entry is None:
        if _serves(actor, live):
            how = "human inbox" if actor.startswith("HUMAN:") else "live worker"
            return Decision(actor, f"default lane {actor} ({how}; no routing entry)")
        return Decision(None, f"no lane serves {actor}: no routing entry and no live worker")
    return _from_entry(entry, request, pending, live)


def _from_entry(
    entry: RouteEntry, request: RouteTask, pending: Mapping[str, int], live: Collection[str]
) -> Decision:
    actor = request.actor
    wanted = set(request.skills)
    able = [c for c in entry.effective() if c.weight > 0 and wanted <= set(c.skills)]
    live_able = [c for c in able if _serves(c.lane, live)]
    if not live_able:
        if not able:
            why = f"no lane offers skills {', '.join(sorted(wanted))}"
        else:
            why = f"{', '.join(c.lane for c in able)} {'has' if len(able) == 1 else 'have'} no live worker"
        if entry.backup is not None and _serves(entry.backup, live):
            return Decision(entry.backup, f"backup pool {entry.backup}: {why}")
        if entry.backup is not None:
            why += f"; backup pool {entry.backup} has no live worker either"
        return Decision(None, f"no lane serves {actor}: {why}")
    down = [c.lane for c in able if c not in live_able]
    note = f" ({', '.join(down)} not live)" if down else ""
    if len(live_able) == 1:
        only = live_able[0].lane
        return Decision(only, f"routing entry: only {only} can serve{note}")
    if len({c.weight for c in live_able}) == 1:
        return _least_pending(live_able, request.task, pending, note)
    total = sum(c.weight for c in live_able)
    point = _unit(request.task) * total
    for choice in live_able:
        point -= choice.weight
        if point < 0:
            break
    return Decision(choice.lane, f"canary {_pct(choice.weight / total)} -> {choice.lane}{note}")


def _least_pending(
    lanes: list[LaneChoice], task: str, pending: Mapping[str, int], note: str
) -> Decision:
    # Ties go by a hash of task and lane, so idle lanes share a burst instead of the
    # first listed taking all of it.
    ranked = sorted(lanes, key=lambda c: (pending.get(c.lane, 0), _unit(f"{task}|{c.lane}")))
    best = ranked[0]
    others = ", ".join(str(pending.get(c.lane, 0)) for c in ranked[1:])
    return Decision(
        best.lane, f"least pending ({pending.get(best.lane, 0)} vs {others}) -> {best.lane}{note}"
    )


# -- what the router remembers between messages ----------------------------------------------
class _Registration(msgspec.Struct, frozen=True):
    """The part of a worker registration (`worker_registry.WorkerInfo`) routing
    needs; other fields are ignored, so the two evolve independently."""

    lane: str
    capacity: int = 1
    state: str = "running"


_registration_decoder = msgspec.json.Decoder(_Registration)


class LiveLanes:
    """Which lanes have a live worker, from the workers bucket's watch.

    A registration counts for `stale_after` seconds after it was last seen: the
    bucket's TTL removes a dead worker's key without telling watchers, so a key that
    stops being refreshed has to age out here too. A worker with `capacity` 0 or in
    state `draining` takes nothing, so it does not make its lane live."""

    def __init__(self, stale_after: float = 15.0) -> None:
        self._stale_after = stale_after
        self._seen: dict[str, tuple[str, float]] = {}

    def seen(self, key: str, value: bytes, now: float) -> str | None:
        """Record a registration; return its lane if that lane was not live before."""
        try:
            reg = _registration_decoder.decode(value)
        except msgspec.DecodeError:
            self._seen.pop(key, None)
            return None
        if reg.capacity <= 0 or reg.state != "running":
            self._seen.pop(key, None)
            return None
        was_live = reg.lane in self.lanes(now)
        self._seen[key] = (reg.lane, now)
        return None if was_live else reg.lane

    def gone(self, key: str) -> None:
        self._seen.pop(key, None)

    def lanes(self, now: float) -> set[str]:
        limit = now - self._stale_after
        return {lane for lane, at in self._seen.values() if at >= limit}


class PendingCache:
    """Pending counts per lane, reused for `ttl` seconds (asking the server costs a
    round trip per lane). `bump` counts what this router just sent, so a burst within
    one `ttl` spreads over the lanes instead of piling onto the one that looked idle."""

    def __init__(self, ttl: float = 1.0) -> None:
        self._ttl = ttl
        self._values: dict[str, tuple[int, float]] = {}

    def get(self, lane: str, now: float) -> int | None:
        hit = self._values.get(lane)
        if hit is None or now - hit[1] > self._ttl:
            return None
        return hit[0]

    def put(self, lane: str, value: int, now: float) -> None:
        self._values[lane] = (value, now)

    def bump(self, lane: str) -> None:
        hit = self._values.get(lane)
        if hit is not None:
            self._values[lane] = (hit[0] + 1, hit[1])
