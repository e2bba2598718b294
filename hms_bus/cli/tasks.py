"""`hms task ...`: the human inbox (list, claim, release, complete, fail) and moving
any task to another lane (reassign, reroute), over `hms_bus.desk.Desk`, which says
how each works (claims are a compare-and-set on the inbox, so two clerks never both
hold a task, and it works while no actor runs; every message has an id derived from
the task, so a retried command is stored once).

Exit codes: 0 done; 1 an unknown task, a task held by someone else, an unreachable
server; 2 a bad argument (JSON, lane). Every read command has `--json`. The small
helpers here (`run_with_bus`, `print_json`, `table`, `age`) serve `hms route` too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import typer

from hms_bus import inbox
from hms_bus.cli.common import fail_usage, handle_errors, run_async, settings_of
from hms_bus.connection import Bus, open_bus
from hms_bus.desk import Desk
from hms_bus.subjects import Lane

__all__ = ["JSON_OPT", "age", "app", "print_json", "run_with_bus", "table"]

app = typer.Typer(no_args_is_help=True)

JSON_OPT = typer.Option(False, "--json", help="print JSON instead of a table")
BY_OPT = typer.Option(..., "--by", help="who does it (recorded in the run's ledger)")


def run_with_bus(ctx: typer.Context, fn: Callable[[Bus], Awaitable[Any]]) -> Any:
    """Connect with the global options, run `fn(bus)`, drain, return its result."""
    s = settings_of(ctx)

    async def go() -> Any:
        async with open_bus(s.nats, s.bus, "hms-cli") as bus:
            return await fn(bus)

    return run_async(go)


def print_json(value: Any) -> None:
    typer.echo(msgspec.json.encode(value).decode())


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    for line in [headers, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def due(deadline: datetime | None, now: datetime) -> str:
    """When the step's SLA runs out: `in 3h12m`, `late 20m00s`, or `-` with no SLA."""
    if deadline is None:
        return "-"
    return f"in {age(now, deadline)}" if deadline >= now else f"late {age(deadline, now)}"


def age(since: datetime, now: datetime) -> str:
    s = max(0, int((now - since).total_seconds()))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s % 60:02d}s" if m else f"{s}s"


# -- hms task ---------------------------------------------------------------------------
@app.command("list")
@handle_errors
def list_cmd(
    ctx: typer.Context,
    lane: str | None = typer.Option(None, "--lane", help="only this lane, e.g. HUMAN:investigator"),
    as_json: bool = JSON_OPT,
) -> None:
    """Human tasks waiting in the inbox, oldest first, with who holds them."""
    only = Lane.parse(lane) if lane else None

    async def go(bus: Bus) -> list[inbox.InboxEntry]:
        return await Desk(bus).tasks(only)

    entries: list[inbox.InboxEntry] = run_with_bus(ctx, go)
    now = datetime.now(UTC)
    if as_json:
        print_json(
            [
                {
                    "task": e.item.task.task,
                    "run": e.item.task.run,
                    "step": e.item.task.step,
                    "attempt": e.item.task.attempt,
                    "lane": e.item.task.lane,
                    "kind": e.item.task.kind,
                    "placed_at": e.item.placed_at,
                    "age_seconds": int((now - e.item.placed_at).total_seconds()),
                    "claimed_by": e.item.claimed_by,
                    "claimed_at": e.item.claimed_at,
                    "deadline": e.item.task.deadline,
                    "input": e.item.task.input,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        typer.echo("no human tasks waiting" + (f" in {only}" if only else ""))
        return
    table(
        ["TASK", "RUN", "STEP", "KIND", "LANE", "AGE", "DUE", "CLAIMED BY"],
        [
            [
                e.item.task.task,
                e.item.task.run,
                e.item.task.step,
                e.item.task.kind,
                e.item.task.lane,
                age(e.item.placed_at, now),
                due(e.item.task.deadline, now),
                e.item.claimed_by or "-",
            ]
            for e in entries
        ],
    )


@app.command("claim")
@handle_errors
def claim_cmd(ctx: typer.Context, task: str = typer.Argument(...), by: str = BY_OPT) -> None:
    """Take a human task: nobody else can complete it until you release it."""

    async def go(bus: Bus) -> None:
        await Desk(bus).claim(task, by)

    run_with_bus(ctx, go)
    typer.echo(f"{task} claimed by {by}")


@app.command("release")
@handle_errors
def release_cmd(ctx: typer.Context, task: str = typer.Argument(...), by: str = BY_OPT) -> None:
    """Give a claimed task back to its lane."""

    async def go(bus: Bus) -> None:
        await Desk(bus).release(task, by)

    run_with_bus(ctx, go)
    typer.echo(f"{task} released by {by}")


@app.command("complete")
@handle_errors
def complete_cmd(
    ctx: typer.Context,
    task: str = typer.Argument(...),
    by: str = BY_OPT,
    data: str = typer.Option("{}", "--data", help="the output, a JSON object"),
) -> None:
    """Finish a human task with its output (it must be unclaimed or yours)."""
    try:
        output = json.loads(data)
    except json.JSONDecodeError as exc:
        raise fail_usage(f"--data is not valid JSON: {exc}") from None
    if not isinstance(output, dict):
        raise fail_usage(f'--data must be a JSON object like \'{{"verdict": "ok"}}\', got {data!r}')

    async def go(bus: Bus) -> None:
        await Desk(bus).complete(task, by, output)

    run_with_bus(ctx, go)
    typer.echo(f"{task} completed by {by}")


@app.command("fail")
@handle_errors
def fail_cmd(
    ctx: typer.Context,
    task: str = typer.Argument(...),
    by: str = BY_OPT,
    reason: str = typer.Option(..., "--reason", help="why, for the ledger"),
    permanent: bool = typer.Option(False, "--permanent", help="skip the step's remaining retries"),
) -> None:
    """Report that a human task cannot be done (the step's retry policy decides)."""

    async def go(bus: Bus) -> None:
        await Desk(bus).fail(task, by, reason, permanent=permanent)

    run_with_bus(ctx, go)
    typer.echo(f"{task} failed by {by}" + (" (permanent)" if permanent else ""))


def _move(ctx: typer.Context, task: str, to: str, by: str, reason: str, run: str | None) -> None:
    async def go(bus: Bus) -> None:
        await Desk(bus).reroute(task, to, by, reason, run=run)

    run_with_bus(ctx, go)


@app.command("reassign")
@handle_errors
def reassign_cmd(
    ctx: typer.Context,
    task: str = typer.Argument(...),
    to: str = typer.Option(..., "--to", help="a human lane, e.g. HUMAN:supervisor"),
    by: str = BY_OPT,
    reason: str = typer.Option("", "--reason"),
    run: str | None = typer.Option(None, "--run", help="the task's run (default: from the task)"),
) -> None:
    """Hand a task to another human lane; its open attempt is cancelled."""
    if Lane.parse(to).kind != "HUMAN":
        raise fail_usage(
            f"reassign moves a task to people (HUMAN:<role>), not {to}; use `hms task reroute`"
        )
    _move(ctx, task, to, by, reason, run)
    typer.echo(f"{task} reassigned to {to} by {by}")


@app.command("reroute")
@handle_errors
def reroute_cmd(
    ctx: typer.Context,
    task: str = typer.Argument(...),
    to: str = typer.Option(..., "--to", help="any lane: AI:x, SVC:x, HUMAN:x"),
    by: str = BY_OPT,
    reason: str = typer.Option("", "--reason"),
    run: str | None = typer.Option(None, "--run", help="the task's run (default: from the task)"),
) -> None:
    """Send a task to another lane; its open attempt is cancelled."""
    Lane.parse(to)
    _move(ctx, task, to, by, reason, run)
    typer.echo(f"{task} rerouted to {to} by {by}")
