"""What readers ask of the ledger: a run's timeline, a case's, following a run, and
verification of one chain or all of them. Used by the SDK (`Client.timeline`) and
the CLI (`hms run timeline`, `hms case timeline`, `hms ledger verify`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import anyio
import msgspec
from nats.aio.msg import Msg

from hms_bus.connection import Bus
from hms_bus.errors import NotFoundError
from hms_bus.ledger import store
from hms_bus.ledger.chain import LedgerEntry, decode_entry, lines
from hms_bus.ledger.timeline import TimelineEntry, timeline_entries
from hms_bus.ledger.verify import Broken, ChainCheck, verify_chain
from hms_bus.subjects import check_token

__all__ = [
    "VerifyReport",
    "follow_run",
    "routed_lanes",
    "run_timeline",
    "timeline_of",
    "verify_all",
    "verify_run",
]


def _entries(messages: Iterable[store.StoredMessage]) -> list[tuple[int, LedgerEntry]]:
    out = []
    for m in messages:
        for line in lines(m.body):
            try:
                out.append((m.seq, decode_entry(line)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # `hms ledger verify` reports it; a timeline shows what it can
    return out


async def _require(bus: Bus, run_id: str) -> list[store.StoredMessage]:
    check_token(run_id, "run id")
    stored = await store.read_run(bus, run_id)
    if not stored:
        raise NotFoundError(f"run {run_id} has no ledger entries (unknown run, or not chained yet)")
    return stored


async def run_timeline(bus: Bus, run_id: str) -> list[TimelineEntry]:
    """The run's history in its stable order; `NotFoundError` for a run with none."""
    return timeline_entries(_entries(await _require(bus, run_id)))


async def routed_lanes(bus: Bus, run_id: str) -> dict[str, str]:
    """Where the router put each task of the run, from its `task.routed` facts (a task
    routed twice, after a reroute, maps to its latest lane); empty if none is chained."""
    lanes: dict[str, str] = {}
    for _, entry in _entries(await store.read_run(bus, check_token(run_id, "run id"))):
        fact = entry.fact
        lane = fact.data.get("lane") if fact.kind == "task.routed" else None
        if fact.task is not None and isinstance(lane, str):
            lanes[fact.task] = lane
    return lanes


async def timeline_of(bus: Bus, run_ids: Iterable[str]) -> list[TimelineEntry]:
    """The merged history of several runs (a case), in time order."""
    pairs: list[tuple[int, LedgerEntry]] = []
    for run_id in run_ids:
        pairs.extend(_entries(await store.read_run(bus, check_token(run_id, "run id"))))
    return timeline_entries(pairs)


async def follow_run(
    bus: Bus, run_id: str, *, fallback: float = 5.0
) -> AsyncIterator[TimelineEntry]:
    """The run's entries as they are appended, from the first, until it finishes.

    A JetStream publish is also a plain NATS message on its subject, so a core
    subscription to the run's ledger subject hears every append as it happens; each
    one wakes a read of the stream from the last sequence seen (the message itself
    is only a hint: a publish the stream refused, a lost race, is heard too). A read
    every `fallback` seconds covers hints lost to a reconnect.
    """
    subject = bus.ns.ledger(check_token(run_id, "run id"))
    wake = anyio.Event()

    async def hint(_: Msg) -> None:
        wake.set()

    sub = await bus.nc.subscribe(subject, cb=hint)
    try:
        start = 1
        while True:
            wake = anyio.Event()
            finished = False
            async for page in store.scan(bus, subject, start):
                for item in timeline_entries(_entries(page)):
                    finished = finished or item.kind == "run.finished"
                    yield item
                start = page[-1].seq + 1
            if finished:
                return
            with anyio.move_on_after(fallback):
                await wake.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


@dataclass(frozen=True)
class VerifyReport:
    runs: int
    entries: int
    broken: list[Broken]


async def verify_run(bus: Bus, run_id: str) -> VerifyReport:
    stored = await _require(bus, run_id)
    count, broken = verify_chain(run_id, (m.entry() for m in stored))
    return VerifyReport(1, count, [] if broken is None else [broken])


async def verify_all(bus: Bus) -> VerifyReport:
    """Every chain in one scan of the stream, keeping only each run's position and
    last hash."""
    prefix = bus.ns.ledger_all[:-1]
    checks: dict[str, ChainCheck] = {}
    async for page in store.scan(bus, bus.ns.ledger_all):
        for m in page:
            run_id = m.subject[len(prefix) :]
            check = checks.get(run_id)
            if check is None:
                check = checks[run_id] = ChainCheck(run_id)
            check.feed(m.entry())
    broken = sorted(
        (c.broken for c in checks.values() if c.broken is not None),
        key=lambda b: (b.run, b.index),
    )
    return VerifyReport(len(checks), sum(c.count for c in checks.values()), broken)
