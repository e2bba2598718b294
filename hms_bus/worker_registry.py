"""The worker registry: who serves which lane, right now.

Every running worker keeps one key in the workers bucket (`ns.workers_bucket`),
`<KIND>.<name>.<instance>`, holding a `WorkerInfo` (JSON) that it re-puts every few
seconds with its current load. The bucket's TTL (15 s) removes the key of a worker
that stopped beating (SIGKILL, lost host), so "alive" is simply "has a key"; a worker
that stops cleanly deletes its key. Readers are `hms worker list` and the router
(capacity per lane); a watch on `<KIND>.<name>.*` follows one lane.

The value is a msgspec Struct defined here rather than in `hms_bus.messages`: it is
a KV value, never a stream message, and only this module writes it. Like a message,
it only ever gains fields with defaults.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from datetime import datetime

import msgspec
from nats.js.kv import KeyValue

from hms_bus.keys import snapshot
from hms_bus.subjects import Lane, check_token

__all__ = [
    "WorkerInfo",
    "live_workers",
    "new_instance_id",
    "put_worker",
    "remove_worker",
    "worker_key",
]

log = logging.getLogger(__name__)

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a live worker says about itself.

    `capacity` is its concurrency (tasks it runs at once), `in_flight` how many it runs
    now, `state` is `running` or `draining` (stopping: finishing in-flight work, taking
    no more). `at` is when this value was written; `started_at` when the worker started.
    """

    lane: str
    version: str
    capacity: int
    instance: str
    host: str
    pid: int
    started_at: datetime
    at: datetime
    in_flight: int = 0
    state: str = "running"
    function: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerInfo)


def new_instance_id() -> str:
    """`<host>-<pid>-<random>`: unique even for several workers in one process, and
    a valid key token (a host name's dots would add key levels)."""
    host = _NOT_TOKEN.sub("-", socket.gethostname().split(".")[0]).strip("-") or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def worker_key(lane: Lane, instance: str) -> str:
    """The registry key of one worker, `<KIND>.<name>.<instance>`. (Key names belong
    in `Namespace`; until it has a `worker_key`, this is the one place that builds it.)"""
    return f"{lane.kind}.{lane.name}.{check_token(instance, 'worker instance')}"


async def put_worker(kv: KeyValue, info: WorkerInfo) -> None:
    await kv.put(worker_key(Lane.parse(info.lane), info.instance), _encoder.encode(info))


async def remove_worker(kv: KeyValue, lane: Lane, instance: str) -> None:
    await kv.delete(worker_key(lane, instance))


async def live_workers(kv: KeyValue, lane: Lane | None = None) -> list[WorkerInfo]:
    """Every live worker (of one lane), sorted by lane then instance, read in one
    snapshot (one consumer, not a round trip per worker)."""
    pattern = f"{lane.kind}.{lane.name}.*" if lane is not None else ">"
    found: list[WorkerInfo] = []
    for entry in await snapshot(kv, pattern):
        if not entry.value:
            continue
        try:
            found.append(_decoder.decode(entry.value))
        except msgspec.DecodeError:
            log.warning("worker key %s holds no WorkerInfo; ignored", entry.key)
    found.sort(key=lambda w: (w.lane, w.instance))
    return found
