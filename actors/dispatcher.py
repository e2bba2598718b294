"""The dispatcher: the only writer of run state.

Consumes: business events (`hms.events.>`), commands (`hms.cmd.>`), task results
and router outcomes (`hms.result.>`), timer firings (`hms.timer.fired`).
Emits: route requests and task cancellations (`hms.route.*`), timer arm/disarm
(`hms.timer.arm|disarm`), notifications (`hms.notify.<kind>`), facts
(`hms.audit.dispatcher`: the facts of the inputs handled together in one `Facts`
message).
Owns: run state (the runs bucket: `run.<id>`, idempotency keys, daily id sequences).

For each input: load the run and its KV revision (from the `RunCache` of states
this dispatcher wrote, else from KV), call the pure engine (`advance`), write the
new state with compare-and-set on that revision, publish the effects with their
deterministic ids, and only then ack (the consume loop acks when the handler
returns). The run state carries the outbox: the effects of each applied input,
written in the same compare-and-set as the state. A cached state that is stale
fails the compare-and-set and is re-read, and an input that a cached state calls a
duplicate is checked against KV before its outbox is re-published: the cache saves
reads and changes no outcome.

Crash anywhere and the input is redelivered: if the write had happened, the
engine sees the input's id among the applied ones and hands back the outbox
entry, which is published again (the streams' duplicate windows drop what was
already out); if not, it is applied afresh. Nothing is lost, nothing doubled.
Once every effect of an input is acknowledged by its stream, the dispatcher
remembers it, and the run's next write drops that outbox entry (`published=`):
a stored run then carries only effects that may not be out yet.

Replicas share the four durables. Within a replica, the inputs of one run are
applied one at a time (up to `concurrency` inputs of different runs at once, per
durable). Two replicas applying inputs of the same run race on the revision: the
loser re-reads and re-applies (the engine is a pure function of state and input, so
re-applying is exact). An event starts one run
per triggered workflow, exactly once per event id: the idempotency key is bound
to the run id with a KV `create`, which only one replica can win.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from hms_bus.clock import Clock, SystemClock
from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop, delivery_count
from hms_bus.errors import NotFoundError, PermanentError, RetryLater
from hms_bus.facts import FactSink
from hms_bus.messages import (
    COMMAND_TYPES,
    RESULT_TYPES,
    ArmTimer,
    CancelTask,
    DisarmTimer,
    Effect,
    Event,
    Fact,
    Message,
    Notify,
    RouteTask,
    Signal,
    StartRun,
    TimerFired,
    decoder_for,
)
from hms_bus.metrics import Metrics
from hms_bus.registry import Registry
from hms_bus.runs import Conflict, RunCache, RunStore, StoredRun
from hms_bus.serial import OneAtATime
from hms_bus.subjects import check_token
from hms_bus.workflow.engine import advance, outbox_effects, start_run

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

#: Compare-and-set attempts on one input before giving it back for redelivery.
MAX_RACES = 20
#: An event no applied workflow starts is looked up again on this many deliveries,
#: this many seconds apart, before it is dead-lettered.
UNKNOWN_EVENT_DELIVERIES = 3
UNKNOWN_EVENT_DELAY = 2.0
#: Inputs handled at once, per durable. More in flight means more of them share a
#: turn of the event loop, a socket write and a `Facts` message: CPU per step of the
#: 5-step end-to-end benchmark was 2.01 ms at 32, 1.87 at 64 and 1.82 at 128.
CONCURRENCY = 128
#: Published inputs remembered per run (see `Dispatcher._mark_published`).
_HINTS = 8


class Dispatcher:
    name = "dispatcher"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        concurrency: int = CONCURRENCY,
        cache_size: int = 10_000,
    ) -> None:
        self._bus = bus
        self._cache = RunCache(cache_size)
        # The inputs of one run are applied one at a time here: concurrent ones would
        # race on its compare-and-set (the loser reads the run again and re-applies).
        self._applying = OneAtATime()
        self._cache_size = cache_size
        # Per run, the latest inputs whose effects this process has published (every
        # PubAck back): a hint for the run's next write, which drops their outbox
        # entries. Losing one only keeps its entry until it expires.
        self._published: dict[str, tuple[str, ...]] = {}
        self._metrics = metrics
        self._clock = clock or SystemClock()
        ns = bus.ns
        self._runs: RunStore | None = None
        self._registry: Registry | None = None
        self._subjects: dict[type[Effect], str] = {
            RouteTask: ns.route("request"),
            CancelTask: ns.route("cancel"),
            ArmTimer: ns.timer("arm"),
            DisarmTimer: ns.timer("disarm"),
        }
        self._facts = FactSink(bus, ns.audit("dispatcher"))

        def loop(kind: str, stream: str, types: Any, handler: Any) -> ConsumeLoop[Any]:
            return ConsumeLoop(
                bus,
                stream=stream,
                durable=ns.durable("dispatcher", kind),
                decoder=decoder_for(types).decode,
                handler=handler,
                metrics=metrics,
                concurrency=concurrency,
            )

        self._loops = [
            loop("events", ns.events_stream, Event, self._on_event),
            loop("commands", ns.commands_stream, COMMAND_TYPES, self._on_input),
            loop("results", ns.results_stream, RESULT_TYPES, self._on_input),
            loop("timers", ns.timers_stream, TimerFired, self._on_input),
        ]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._runs = await RunStore.open(self._bus)
        self._registry = await Registry.open(self._bus)
        async with anyio.create_task_group() as tg:
            for consume in self._loops:
                await tg.start(consume.run)
            task_status.started()

    def stop(self) -> None:
        for consume in self._loops:
            consume.stop()

    @property
    def runs(self) -> RunStore:
        assert self._runs is not None, "dispatcher not running"
        return self._runs

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "dispatcher not running"
        return self._registry

    # -- inputs ----------------------------------------------------------------------
    async def _on_event(self, event: Event, msg: Msg) -> None:
        if event.run is not None:
            # A reply for a run that waits on it (stop-the-clock), not a new request.
            signal = Signal(id=event.id, run=event.run, name=event.name, payload=event.payload)
            await self._apply(signal.run, signal)
            return
        workflows = await self.registry.triggered_by(event.name)
        if not workflows:
            reason = f"no applied workflow starts on event {event.name!r}"
            if delivery_count(msg) < UNKNOWN_EVENT_DELIVERIES:
                # A listing read from a lagging replica (in a cluster) or a workflow
                # applied a moment after the event: look again before giving up.
                raise RetryLater(reason, delay=UNKNOWN_EVENT_DELAY)
            raise PermanentError(
                f"{reason}; apply one with `start: {event.name}` and replay this dead letter"
            )
        for workflow in workflows:
            await self._start(
                StartRun(
                    id=f"{event.id}/{workflow.id}",
                    workflow=workflow.id,
                    version=workflow.version,
                    key=f"event/{event.id}/{workflow.id}",
                    payload=event.payload,
                    case=event.case,
                    event=event.name,
                    at=event.at,
                )
            )

    async def _on_input(self, message: Message, msg: Msg) -> None:
        if isinstance(message, StartRun):
            await self._start(message)
            return
        run_id = getattr(message, "run", None)
        if not isinstance(run_id, str):
            raise PermanentError(f"{type(message).__name__} names no run")
        await self._apply(run_id, message)

    # -- the two transitions -----------------------------------------------------------
    async def _start(self, command: StartRun) -> None:
        try:
            workflow = await self.registry.get(command.workflow, command.version)
        except NotFoundError as exc:
            raise PermanentError(str(exc)) from None
        now = self._clock.now()
        # Claim the key with a fresh id straight away: a new key (the usual case)
        # then needs no read at all, since a run under a fresh id cannot exist yet.
        # A key bound already costs the id (a gap in the day's sequence).
        fresh = await self.runs.allocate_id(workflow.prefix, now.date())
        try:
            run_id = await self.runs.claim(command.key, fresh)
        except Conflict:
            raise RetryLater(f"idempotency key of {command.id} changed under us", 0.1) from None
        if run_id != fresh:
            stored = await self.runs.get(run_id)
            if stored is not None:
                # Started before (a duplicate event, or a crash after the write).
                await self._publish(outbox_effects(stored.run, command.id))
                return
        transition = start_run(workflow, command, run_id, now, salt=secrets.token_hex(16))
        try:
            revision = await self.runs.create(transition.run)
        except Conflict:
            raise RetryLater(f"run {run_id} is being created by another replica", 0.1) from None
        self._cache.put(StoredRun(transition.run, revision))
        await self._publish(transition.effects)
        self._mark_published(run_id, command.id, ())

    async def _apply(self, run_id: str, message: Message) -> None:
        async with self._applying.hold(run_id):
            await self._apply_one(run_id, message)

    async def _apply_one(self, run_id: str, message: Message) -> None:
        # The state this process last wrote saves the read; the compare-and-set on its
        # revision checks it is still what is stored (another replica may have written).
        guess = self._cache.take(run_id)
        published = self._published.get(run_id, ())
        for _ in range(MAX_RACES):
            stored = guess or await self.runs.get(run_id)
            if stored is None:
                raise PermanentError(f"unknown run {run_id!r}")
            try:
                workflow = await self.registry.get(stored.run.workflow, stored.run.version)
            except NotFoundError as exc:
                raise PermanentError(f"run {run_id}: {exc}") from None
            transition = advance(
                workflow,
                stored.run,
                message,  # type: ignore[arg-type]
                self._clock.now(),
                published=published,
            )
            if transition.duplicate:
                if guess is not None:
                    # Re-publish only from what is stored: the outbox there is the truth.
                    guess = None
                    continue
                self._cache.put(stored)
                await self._publish(transition.effects)
                self._mark_published(run_id, message.id, ())
                return
            try:
                revision = await self.runs.update(transition.run, stored.revision)
            except Conflict:
                if guess is None:
                    self._metrics.cas_conflicts.labels(self.name).inc()
                guess = None
                continue
            self._cache.put(StoredRun(transition.run, revision))
            await self._publish(transition.effects)
            self._mark_published(run_id, message.id, published)
            return
        raise RetryLater(f"run {run_id}: lost {MAX_RACES} compare-and-set races in a row", 0.5)

    # -- effects -----------------------------------------------------------------------
    def _mark_published(self, run_id: str, input_id: str, dropped: tuple[str, ...]) -> None:
        """Every effect of `input_id` is in its stream: the run's next write may drop
        its outbox entry. `dropped`: hints a write has just used (their entries are
        gone). A few per run (concurrent inputs of one run), bounded like the run
        cache (the oldest runs' hints go first)."""
        kept = [i for i in self._published.pop(run_id, ()) if i not in dropped]
        self._published[run_id] = (*kept[-(_HINTS - 1) :], input_id)
        if len(self._published) > self._cache_size:
            del self._published[next(iter(self._published))]

    async def _publish(self, effects: Iterable[Effect]) -> None:
        """Publish a transition's effects, its facts with those of the inputs handled
        alongside it (`FactSink`): most inputs yield two facts, and a message costs
        every actor on its way far more than its bytes."""
        out: list[tuple[str, Message]] = []
        facts: list[Fact] = []
        for effect in effects:
            if isinstance(effect, Fact):
                facts.append(effect)
            else:
                out.append((self._subject(effect), effect))
        await self._facts.publish(facts, out)

    def _subject(self, effect: Effect) -> str:
        subject = self._subjects.get(type(effect))
        if subject is not None:
            return subject
        if isinstance(effect, Notify):
            kind = effect.channel.partition(":")[0]
            try:
                return self._bus.ns.notify(check_token(kind, "channel kind"))
            except ValueError:
                return self._bus.ns.notify("other")
        raise PermanentError(f"the engine produced an unknown effect {type(effect).__name__}")
