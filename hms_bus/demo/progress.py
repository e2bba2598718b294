"""Following runs as they change: a line per visible change, and a summary table.

`describe_change(old, new)` is pure: two revisions of one run in, one line out (or
None when nothing a person would notice changed). `wait_run()` waits on one run's
key in the runs bucket with a KV watch: the server pushes each revision, nothing
polls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import anyio
import msgspec
from nats.js.kv import KeyValue

from hms_bus.workflow.state import RunState

__all__ = ["decode_run", "describe_change", "table", "wait_run"]

_decoder = msgspec.json.Decoder(RunState)


def decode_run(value: bytes) -> RunState:
    return _decoder.decode(value)


async def wait_run(
    kv: KeyValue,
    run_id: str,
    predicate: Callable[[RunState], bool],
    timeout: float,
) -> RunState | None:
    """The first revision of run `run_id` (the current one included) that satisfies
    `predicate`, or None after `timeout` seconds."""
    watcher = await kv.watch(f"run.{run_id}")
    try:
        with anyio.move_on_after(timeout):
            async for entry in watcher:
                if entry is None or entry.operation is not None or not entry.value:
                    continue  # the end of the initial values, a delete
                run = decode_run(entry.value)
                if predicate(run):
                    return run
    finally:
        with anyio.CancelScope(shield=True):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return None


def _human(run: RunState, step: str) -> bool:
    return any(t.step == step and t.actor.startswith("HUMAN:") for t in run.tasks.values())


def _step_parts(old: RunState | None, new: RunState) -> list[str]:
    parts: list[str] = []
    for sid, st in new.steps.items():
        before = old.steps.get(sid) if old is not None else None
        decided = len(before.decisions) if before is not None else 0
        parts.extend(f"{sid} {d.decision} by {d.by}" for d in st.decisions[decided:])
        if before is not None and before.status == st.status:
            continue
        if before is None and st.status == "WAITING":
            continue  # not reached yet: every step starts so
        part = f"{sid} {st.status}"
        if st.chosen is not None:
            part += f" -> {st.chosen}"
        elif st.status == "DONE" and st.by and _human(new, sid) and not st.decisions:
            part += f" by {', '.join(st.by)}"
        elif st.status in ("FAILED", "TIMED_OUT") and st.reason:
            part += f" ({st.reason})"
        parts.append(part)
    for tid, task in new.tasks.items():
        was = old.tasks.get(tid) if old is not None else None
        if task.claimant is not None and (was is None or was.claimant != task.claimant):
            # A claim is the step's first response: "claimed by" says more than IN_PROGRESS.
            if f"{task.step} IN_PROGRESS" in parts:
                parts.remove(f"{task.step} IN_PROGRESS")
            parts.append(f"{task.step} claimed by {task.claimant}")
    return parts


def describe_change(
    old: RunState | None, new: RunState, *, now: datetime | None = None
) -> str | None:
    """One line for what changed between two revisions of a run (`old` None: the run
    was just seen for the first time); None when nothing visible changed."""
    parts = _step_parts(old, new)
    if old is None:
        parts.insert(0, f"{new.workflow} v{new.version} started")
    if old is not None and old.status == new.status and not parts:
        return None
    status = (
        new.status if old is None or old.status == new.status else f"{old.status} -> {new.status}"
    )
    if new.finished and (old is None or not old.finished):
        took = (new.finished_at or new.updated_at) - new.started_at
        status += f" in {took.total_seconds():.1f}s"
        if new.reason:
            status += f": {new.reason}"
    stamp = f"{now:%H:%M:%S} " if now is not None else ""
    return f"{stamp}{new.run:<19} {', '.join(parts) or '-'}  [{status}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: columns as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
