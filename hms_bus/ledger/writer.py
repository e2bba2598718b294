"""`ChainWriter`: appends facts to their runs' chains, once each, in batches.

`append(facts)` takes a batch of facts of any runs (the ledger's consume loop hands
over what came in within its reorder window) and groups it by run. Each run's facts
are chained (`chain.extend`: duplicates dropped, the rest sorted by `fact_order`)
into one message (or a few, to stay under the largest message the stream takes),
and the messages of all runs are appended pipelined (`store.Appender`): a batch
costs a round trip, not one per run. It returns one outcome per fact: None once
the fact is in its chain (appended now, or found there already), or the error to
settle its message with. A fact whose entry could never fit fails alone with
`PermanentError` (a dead letter).

Each run's chain head (length, newest hash and stream sequence, fact ids) is kept
in an LRU cache. Runs not in it are first looked up together (one `multi_last`
direct get: a new run has no entry, so nothing to read); the others are read from
the stream (one batched direct get each, `parallel` at once).
An append names the head's sequence as the expected last one: if another writer
moved the chain on, or the stream drops our entry as a duplicate, the head is
re-read and the run's facts chained again against it, so a fact already there is
found and dropped, never doubled. After `MAX_RACES` lost races in a row the facts
fail with `RetryLater` (the consume loop redelivers them later).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import nats.errors

from hms_bus.connection import WRONG_LAST_SEQUENCE, Bus
from hms_bus.errors import PermanentError, RetryLater, ServerError
from hms_bus.ledger import store
from hms_bus.ledger.chain import Chained, ChainHead, commit, extend
from hms_bus.messages import Fact

__all__ = ["ChainWriter", "WriterStatistics"]

log = logging.getLogger(__name__)

MAX_RACES = 5


@dataclass(frozen=True)
class WriterStatistics:
    appended: int
    duplicates: int
    races: int
    cached_runs: int


class ChainWriter:
    def __init__(
        self,
        bus: Bus,
        *,
        parallel: int = 64,
        cache_size: int = 5_000,
        on_appended: Callable[[Fact], None] | None = None,
    ) -> None:
        self._bus = bus
        self._parallel = parallel
        self._cache: OrderedDict[str, ChainHead] = OrderedDict()
        self._cache_size = cache_size
        self._on_appended = on_appended
        # Headroom under the stream's largest message for the headers.
        self._max_bytes = max(4096, bus.settings.max_payload - 4096)
        self._counts = {"appended": 0, "duplicates": 0, "races": 0}
        self._appender = store.Appender(bus)

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            appended=self._counts["appended"],
            duplicates=self._counts["duplicates"],
            races=self._counts["races"],
            cached_runs=len(self._cache),
        )

    async def close(self) -> None:
        await self._appender.close()

    async def append(self, facts: Sequence[Fact]) -> list[Exception | None]:
        """Chain `facts`; one outcome per fact, in order (None: in its chain now)."""
        by_run: dict[str, list[Fact]] = {}
        for fact in facts:
            by_run.setdefault(fact.run, []).append(fact)
        errors: dict[str, Exception] = {}  # by run
        refused: dict[str, Exception] = {}  # by fact id
        await self._learn_new_runs(list(by_run))
        races: dict[str, int] = {}
        todo = by_run
        while todo:
            todo = await self._round(todo, races, errors, refused)
        return [refused.get(fact.id) or errors.get(fact.run) for fact in facts]

    async def _round(
        self,
        todo: dict[str, list[Fact]],
        races: dict[str, int],
        errors: dict[str, Exception],
        refused: dict[str, Exception],
    ) -> dict[str, list[Fact]]:
        """Chain and append (pipelined) one message for each run in `todo`; return what
        is left: facts past a run's first message, and runs that lost a race."""
        heads = await self._heads(list(todo), errors)
        sends: list[tuple[ChainHead, Chained, list[Fact], str]] = []
        appends: list[store.Append] = []
        for run_id, facts in todo.items():
            head = heads.get(run_id)
            if head is None:
                continue  # its chain could not be read: the error is in `errors`
            chained = extend(head, facts, max_line=self._max_bytes)
            for fact in chained.refused:
                refused[fact.id] = self._too_big(fact)
            if not chained.lines:
                self._counts["duplicates"] += len(chained.duplicates)
                continue
            body, block, last_hash = next(chained.blocks(self._max_bytes))
            sends.append((head, chained, block, last_hash))
            appends.append(store.Append(run_id, body, block[0].id, head.last_seq))
        left: dict[str, list[Fact]] = {}
        if not appends:
            return left
        outcomes = await self._appender.append_all(appends)
        for (head, chained, block, last_hash), outcome in zip(sends, outcomes, strict=True):
            run_id = head.run
            if isinstance(outcome, int):
                commit(head, block, last_hash, outcome)
                self._counts["appended"] += len(block)
                self._counts["duplicates"] += len(chained.duplicates)
                if self._on_appended is not None:
                    for fact in block:
                        self._on_appended(fact)
                if len(block) < len(chained.facts):  # more than one message's worth
                    left[run_id] = chained.facts[len(block) :]
                continue
            self._cache.pop(run_id, None)  # stored or not: re-read next time
            code = getattr(outcome, "err_code", None)
            if isinstance(outcome, store.DuplicateAppend) or code in WRONG_LAST_SEQUENCE:
                # Another writer moved the chain on, or our message is stored already.
                self._counts["races"] += 1
                log.debug("ledger %s: head moved (%s); re-reading", run_id, outcome)
                races[run_id] = races.get(run_id, 0) + 1
                if races[run_id] < MAX_RACES:
                    left[run_id] = todo[run_id]
                else:
                    errors[run_id] = RetryLater(
                        f"ledger {run_id}: lost {MAX_RACES} races for the chain head", 0.5
                    )
            else:
                errors[run_id] = outcome
        return left

    async def _heads(
        self, run_ids: list[str], errors: dict[str, Exception]
    ) -> dict[str, ChainHead]:
        """The chain heads of these runs: from the cache, or read (`parallel` at once)."""
        heads: dict[str, ChainHead] = {}
        missing: list[str] = []
        for run_id in run_ids:
            head = self._cache.get(run_id)
            if head is None:
                missing.append(run_id)
            else:
                self._cache.move_to_end(run_id)
                heads[run_id] = head

        async def reader() -> None:
            while missing:
                run_id = missing.pop()
                try:
                    heads[run_id] = await self._read_head(run_id)
                except Exception as exc:  # noqa: BLE001  # the consume loop settles its facts by it
                    errors[run_id] = exc

        if missing:
            async with anyio.create_task_group() as tg:
                for _ in range(min(self._parallel, len(missing))):
                    tg.start_soon(reader)
        return heads

    async def _learn_new_runs(self, run_ids: list[str]) -> None:
        """Runs not in the cache with no entry yet (most of them: new runs) get an
        empty head at once, from one request for all, rather than one read each. One
        appended to meanwhile by another writer costs a lost race, as always."""
        missing = [r for r in run_ids if r not in self._cache]
        if len(missing) < 2:
            return
        try:
            have = await store.runs_with_entries(self._bus, missing)
        except (ServerError, nats.errors.Error) as exc:
            log.warning("ledger: could not look up %d runs at once (%s)", len(missing), exc)
            return  # each is read on its own
        for run_id in missing:
            if run_id not in have:
                self._cache[run_id] = ChainHead(run_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _read_head(self, run_id: str) -> ChainHead:
        stored = await store.read_run(self._bus, run_id)
        head = ChainHead.of(run_id, ((m.seq, m.body) for m in stored))
        self._cache[run_id] = head
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return head

    def _too_big(self, fact: Fact) -> PermanentError:
        return PermanentError(
            f"fact {fact.id}: its ledger entry would be over the {self._max_bytes} bytes "
            "a ledger message may hold"
        )
