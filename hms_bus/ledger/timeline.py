"""Timelines for people and scripts, from ledger entries: pure, no I/O.

A run's timeline is its entries sorted by `fact_order` (time, then fact id): a pure
function of the facts, so it reads the same whatever order they arrived in (the
chain order differs only for facts later than the ledger's reorder window). A case
timeline merges the timelines of every run sharing the case key, in the same order.

Lines read `[10:02:16] eligibility_check failed (try 1/3): timeout` (UTC clock
time, the words of `hms_bus.workflow.timeline.describe`, so production reads like
the simulator); a line `-- 2026-11-21 --` opens each new day, and a case timeline
prefixes each line with its run id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from hms_bus.ledger.chain import LedgerEntry, fact_order
from hms_bus.messages import Fact
from hms_bus.workflow.timeline import describe

__all__ = ["TimelineEntry", "fact_of", "render_line", "render_lines", "timeline_entries"]


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a timeline, with the fact behind it (the SDK's and `--json`'s shape)."""

    run: str
    index: int  # position in the run's chain
    seq: int  # stream sequence in the ledger
    id: str  # the fact's id
    at: datetime
    kind: str
    text: str
    workflow: str = ""
    step: str | None = None
    attempt: int | None = None
    task: str | None = None
    by: str | None = None
    reason: str | None = None
    case: str | None = None
    source: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


def timeline_entries(entries: Iterable[tuple[int, LedgerEntry]]) -> list[TimelineEntry]:
    """`(stream seq, entry)` pairs, of one run or many, as a sorted timeline."""
    ordered = sorted(entries, key=lambda pair: fact_order(pair[1].fact))
    out: list[TimelineEntry] = []
    for seq, entry in ordered:
        f = entry.fact
        out.append(
            TimelineEntry(
                run=entry.run,
                index=entry.index,
                seq=seq,
                id=f.id,
                at=f.at,
                kind=f.kind,
                text=_text(f),
                workflow=f.workflow,
                step=f.step,
                attempt=f.attempt,
                task=f.task,
                by=f.by,
                reason=f.reason,
                case=f.case,
                source=f.source,
                data=f.data,
            )
        )
    return out


def _text(fact: Fact) -> str:
    text = describe(fact)
    if fact.kind == "run.started" and fact.data.get("event"):
        text += f" on event {fact.data['event']}"  # what started it, for the auditor
    return text


def render_lines(timeline: Sequence[TimelineEntry], *, with_run: bool = False) -> list[str]:
    lines: list[str] = []
    day = None
    for item in timeline:
        at = item.at.astimezone(UTC)
        if at.date() != day:
            day = at.date()
            lines.append(f"-- {day.isoformat()} --")
        run = f"{item.run}  " if with_run else ""
        lines.append(f"[{at:%H:%M:%S}] {run}{item.text}")
    return lines


def render_line(item: TimelineEntry, *, with_run: bool = False) -> str:
    run = f"{item.run}  " if with_run else ""
    return f"[{item.at.astimezone(UTC):%H:%M:%S}] {run}{item.text}"


def fact_of(item: TimelineEntry) -> Fact:
    """The fact behind a timeline entry (for a replay)."""
    return Fact(
        id=item.id,
        run=item.run,
        kind=item.kind,
        at=item.at,
        workflow=item.workflow,
        step=item.step,
        attempt=item.attempt,
        task=item.task,
        by=item.by,
        reason=item.reason,
        case=item.case,
        source=item.source,
        data=item.data,
    )
