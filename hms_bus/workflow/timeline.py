"""One readable line per fact: how a run's history is shown to people.

The simulator prints these lines; `hms run timeline` can print the ledger's facts
with the same words, so an author sees in production what the simulation showed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from hms_bus.messages import Fact
from hms_bus.workflow.durations import format_duration

__all__ = ["describe", "offset", "render_line"]

_MAX_OUTPUT = 80


def offset(at: datetime, start: datetime) -> str:
    """`+04:00:00`: time since the run started (hours may exceed 24)."""
    seconds = max(0, round((at - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"+{hours:02d}:{minutes:02d}:{secs:02d}"


def _short(value: Any) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= _MAX_OUTPUT else text[: _MAX_OUTPUT - 3] + "..."


def _actions(data: dict[str, Any]) -> str:
    actions = data.get("actions") or []
    return " -> " + "; ".join(actions) if actions else ""


def describe(fact: Fact) -> str:
    """The fact in words, without its time."""
    d = fact.data
    s = fact.step or ""
    by = f" by {fact.by}" if fact.by else ""
    why = f": {fact.reason}" if fact.reason else ""
    kind = fact.kind
    if kind == "run.started":
        return f"run {fact.run} started ({fact.workflow} v{d.get('version', '?')}){by}"
    if kind == "run.finished":
        return f"run {d.get('outcome', '?')}{why}"
    if kind in ("run.paused", "run.resumed", "run.cancelled", "run.reopened"):
        return f"run {kind.split('.')[1]}{by}{why}"
    if kind == "step.ready":
        n = d.get("items")
        items = "" if n is None else " (1 item)" if n == 1 else f" ({n} items)"
        return f"{s} ready{items}"
    if kind == "step.done":
        if "next" in d:
            return f"{s} = {d.get('value')} -> {d['next']}"
        if "of" in d:
            return f"{s} done ({d.get('done')}/{d['of']} items)"
        return f"{s} done"
    if kind == "step.skipped":
        return f"{s} skipped{why}"
    if kind == "step.failed":
        return f"{s} failed{why}"
    if kind == "step.timed_out":
        return f"{s} timed out -> {d.get('next')}"
    if kind == "task.dispatched":
        extra = [f"attempt {fact.attempt}"]
        if "item" in d:
            extra.append(f"item {d['item']}")
        if "retry" in d:
            extra.append(f"try {d['retry']}")
        return f"{s} dispatched to {d.get('actor')} ({', '.join(extra)})"
    if kind == "task.unroutable":  # the router's
        return f"{s} waits for a lane{why}"
    if kind == "task.routed":  # the router's
        return f"{s} routed to {d.get('lane')}{why}"
    if kind == "task.progress":
        return f"{s} in progress{by}"
    if kind == "task.claimed":
        return f"{s} claimed{by}"
    if kind == "task.released":
        return f"{s} released{by}{why}"
    item = f" item {d['item']}" if "item" in d else ""
    if kind == "task.completed":
        return f"{s}{item} completed{by}: {_short(d.get('output', {}))}"
    if kind == "task.failed":
        exhausted = ", delivery exhausted" if d.get("exhausted") else ""
        return f"{s}{item} failed (try {d.get('try', '?')}{exhausted}){why}"
    if kind == "task.cancelled":
        return f"{s} task {fact.task} cancelled{why}"
    if kind in ("task.rerouted", "task.reassigned"):
        verb = kind.split(".")[1]
        return f"{s} {verb} {d.get('from')} -> {d.get('to')}{by}{why}"
    if kind == "task.superseded":
        return f"{s} late {d.get('outcome')} of attempt {fact.attempt} recorded, changes nothing"
    if kind == "retry.scheduled":
        delay = format_duration(float(d.get("delay", 0)))
        attempt = f" {d['attempt']}/{d['of']}" if "attempt" in d else ""
        return f"{s} retry{attempt} in {delay}{by}"
    if kind == "sla.breached":
        if not s:
            return f"run SLA {d.get('sla')} breached{_actions(d)}"
        return f"{s} SLA breached ({d.get('sla')}){_actions(d)}"
    if kind == "sla.rung":
        return f"{s or 'run'} SLA at {d.get('at')} of {d.get('sla')}{_actions(d)}"
    if kind == "escalated":
        return f"{s or 'run'} escalated to {d.get('to')}"
    if kind == "checkpoint.approved":
        return f"{s} approved{by} ({d.get('approvals')}){why}"
    if kind == "checkpoint.rejected":
        return f"{s} rejected{by}{why}"
    if kind == "wait.started":
        limit = f", limit {d['limit']}" if "limit" in d else ""
        return f"{s} waiting for {d.get('event')}{limit}"
    if kind == "wait.signalled":
        return f"{s} got {d.get('event')}{by}"
    if kind == "signal.buffered":
        return f"event {d.get('event')} kept until a step waits for it"
    if kind in ("input.refused", "input.ignored"):
        where = f"{s} " if s else ""
        return f"{where}{kind.split('.')[1]}{by}{why}"
    return f"{kind} {s}{by}{why}".strip()


def render_line(fact: Fact, start: datetime) -> str:
    return f"[{offset(fact.at, start)}] {describe(fact)}"
