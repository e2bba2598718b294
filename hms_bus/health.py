"""Health: heartbeats in a KV bucket with a TTL, and `check()` behind `hms check`.

Each daemon writes `Heartbeat` values under `<actor>.<instance>` in the health
bucket every few seconds; the bucket's TTL (15 s) removes the key of a daemon that
stopped beating, so "alive" is simply "has a key". `check()` answers the operator's
question (and a container's liveness probe): is NATS reachable, is the topology in
place, does every expected actor have a live heartbeat?
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.connection import Bus, ConnectError, open_bus
from hms_bus.settings import Settings
from hms_bus.topology import declare

__all__ = ["CheckReport", "Heartbeat", "check", "live_heartbeats", "write_heartbeat"]

log = logging.getLogger(__name__)


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a health key: who beats, where, since when."""

    actor: str
    instance: str
    host: str = msgspec.field(default_factory=socket.gethostname)
    pid: int = msgspec.field(default_factory=os.getpid)
    started_at: datetime
    at: datetime
    version: str = ""


_hb_encoder = msgspec.json.Encoder()
_hb_decoder = msgspec.json.Decoder(Heartbeat)


async def write_heartbeat(kv: KeyValue, bus: Bus, beat: Heartbeat) -> None:
    await kv.put(bus.ns.heartbeat_key(beat.actor, beat.instance), _hb_encoder.encode(beat))


async def live_heartbeats(kv: KeyValue) -> list[Heartbeat]:
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    beats = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # expired between keys() and get()
        if entry.value:
            try:
                beats.append(_hb_decoder.decode(entry.value))
            except msgspec.DecodeError:
                log.warning("health key %s holds no heartbeat; ignored", key)
    return beats


@dataclass
class CheckReport:
    url: str
    problems: list[str] = field(default_factory=list)
    alive: list[Heartbeat] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check(settings: Settings, expected: Sequence[str]) -> CheckReport:
    """Probe NATS, the topology and the heartbeats of `expected` actor names."""
    url = ", ".join(settings.nats.urls)
    report = CheckReport(url=url)
    try:
        async with open_bus(settings.nats, settings.bus, "hms-check") as bus:
            missing = await _missing_topology(bus)
            if missing:
                shown = ", ".join(missing[:5]) + (
                    f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                )
                report.problems.append(
                    f"topology under root {settings.bus.root!r} is incomplete: missing {shown} "
                    f"(run `hms up` or `hms topology ensure`)"
                )
                return report
            kv = await bus.js.key_value(bus.ns.health_bucket)
            report.alive = await live_heartbeats(kv)
            live = {b.actor for b in report.alive}
            for actor in expected:
                if actor not in live:
                    report.problems.append(f"actor {actor!r} has no live heartbeat")
    except ConnectError as exc:
        report.problems.append(str(exc))
    return report


async def _missing_topology(bus: Bus) -> list[str]:
    topology = declare(bus.ns)
    probes = [
        *((f"stream {s.name}", bus.js.stream_info(s.name)) for s in topology.streams),
        *(
            (f"consumer {c.durable}", bus.js.consumer_info(c.stream, c.durable))
            for c in topology.consumers
        ),
        *((f"bucket {b.name}", bus.js.stream_info(f"KV_{b.name}")) for b in topology.buckets),
    ]
    return [name for name, probe in probes if not await _exists(probe)]


async def _exists(probe: object) -> bool:
    try:
        await probe  # type: ignore[misc]
    except nats.js.errors.NotFoundError:
        return False
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        log.debug("probe failed: %s", exc)
        return False
    return True


def new_heartbeat(actor: str, instance: str, started_at: datetime) -> Heartbeat:
    return Heartbeat(actor=actor, instance=instance, started_at=started_at, at=datetime.now(UTC))
