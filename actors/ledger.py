"""The ledger: chains every fact into a tamper-evident, append-only record per run.

Consumes: facts (`<root>.audit.>`, durable `ledger-audit`), one `Fact` or several
(`Facts`) per message.
Emits: ledger entries (`<root>.ledger.<run>`: one per fact, hash-chained per run, a
run's entries appended together in one message; the format in `hms_bus.ledger.chain`
and subjects.md); business statistics (`hms_bus.stats.StatsRecorder`, the stats
bucket).
Owns: the ledger stream (its only writer; it refuses deletes and purges) and the
statistics derived from it.

The consume loop hands facts over in batches: what came in within a short reorder
window (0.1 s) of the first, up to half of `batch`. The `ChainWriter` appends what a
batch holds of each run, sorted by the fact's time and id, in one message per run;
each fact's message is acked on its own once the fact is in the chain (or found
there already), while the next batch gathers. `StatsRecorder.observe` sees each fact
exactly when it is newly appended, never for a duplicate (a fact appended just
before a crash and found in the chain on redelivery is not observed again:
statistics may miss it, the chain never does); `flush` runs every `stats_every`
seconds and at shutdown.

Duplicates: a fact re-published within two minutes is dropped by the audit stream
(its `Nats-Msg-Id`); later copies (an outbox re-published for a redelivered input)
are found in the chain head's set of fact ids and acked without an append.

Replicas share the one durable, so each fact goes to one replica at a time, but the
facts of one run may reach two replicas at once. Every append names the stream
sequence of the run's newest entry as it knows it
(`Nats-Expected-Last-Subject-Sequence`): the server stores the append only if no
one else appended in between, so two replicas can never fork a chain; the loser
re-reads the run's chain (a batched direct get), drops what is there already and
appends the rest after the new head. A replica that dies (even by SIGKILL) leaves
its unacked facts to be redelivered after the ack wait (30 s) to a live replica:
those it appended before dying are found in the chain and acked, the others
appended; nothing is lost or doubled. Crash between append and ack: the same.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop
from hms_bus.errors import InvalidNameError, PermanentError
from hms_bus.facts import facts_of
from hms_bus.ledger.writer import ChainWriter, WriterStatistics
from hms_bus.messages import AUDIT_TYPES, Fact, Facts, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.stats import StatsRecorder
from hms_bus.subjects import check_token

__all__ = ["Ledger"]

log = logging.getLogger(__name__)


class Ledger:
    name = "ledger"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        window: float = 0.1,
        batch: int = 8_000,
        stats_every: float = 1.0,
        fetch_timeout: float = 2.0,
    ) -> None:
        self._bus = bus
        self._stats = StatsRecorder(bus)
        self._stats_every = stats_every
        self._writer = ChainWriter(bus, on_appended=self._observe)
        ns = bus.ns
        self._loop: ConsumeLoop[Fact | Facts] = ConsumeLoop(
            bus,
            stream=ns.audit_stream,
            durable=ns.durable("ledger", "audit"),
            decoder=decoder_for(AUDIT_TYPES).decode,
            batch_handler=self._on_facts,
            # The reorder window: facts of one run published together but delivered
            # apart are chained in their stable order rather than their arrival order.
            linger=window,
            metrics=metrics,
            fetch_timeout=fetch_timeout,
            # Facts held at most (half handed over, half gathering meanwhile): the
            # rate is at most batch / 2 / max(window, time to chain a batch). Under
            # the consumer's max_ack_pending (10,000), so a second replica gets some.
            batch=batch,
        )

    def statistics(self) -> WriterStatistics:
        return self._writer.statistics()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flush_stats_every)
            try:
                async with anyio.create_task_group() as loop:
                    await loop.start(self._loop.run)
                    task_status.started()
                # The loop has returned: stopped, and every fact in hand settled.
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                    await self._flush_stats()
                    await self._writer.close()
                tg.cancel_scope.cancel()

    def stop(self) -> None:
        self._loop.stop()

    async def _on_facts(self, batch: list[tuple[Fact | Facts, Msg]]) -> list[Exception | None]:
        """One outcome per message; a `Facts` message's is its first fact's failure
        (the facts of it that were chained are found there on its redelivery)."""
        outcomes: list[Exception | None] = [None] * len(batch)
        facts: list[Fact] = []
        where: list[int] = []  # the message of each fact in `facts`
        bad_runs: dict[str, InvalidNameError | None] = {}  # checked once per run
        for i, (message, _) in enumerate(batch):
            for fact in facts_of(message):
                run = fact.run
                if run not in bad_runs:
                    try:
                        check_token(run, "run id")
                        bad_runs[run] = None
                    except InvalidNameError as exc:
                        bad_runs[run] = exc
                if (error := bad_runs[run]) is not None:
                    outcomes[i] = outcomes[i] or PermanentError(f"fact {fact.id}: {error}")
                    continue
                facts.append(fact)
                where.append(i)
        for i, outcome in zip(where, await self._writer.append(facts), strict=True):
            outcomes[i] = outcomes[i] or outcome
        return outcomes

    def _observe(self, fact: Fact) -> None:
        # Called once the fact is stored in its chain: a statistics bug must not make
        # that append look failed (the fact would be redelivered for nothing).
        try:
            self._stats.observe(fact)
        except Exception:  # logged once per fact, here, and the chain goes on
            log.exception("statistics could not take fact %s (%s)", fact.id, fact.kind)

    async def _flush_stats_every(self) -> None:
        while True:
            await anyio.sleep(self._stats_every)
            await self._flush_stats()

    async def _flush_stats(self) -> None:
        try:
            await self._stats.flush()
        except Exception:  # statistics must never stop the chain; logged once here
            log.exception("flushing the ledger's statistics failed; will try again")
