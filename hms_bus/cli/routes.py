"""`hms route ...`: the routing table (lanes, canary weights, skills, backup pools)
and the requests parked because no lane could take them.

The table is a KV bucket the router watches, so a change takes effect on the next
request without restarting anything. `set` validates the whole entry first (lanes,
weights, skills) and refuses a bad one with exit 2, naming what is wrong.

`--lane` takes `LANE[=WEIGHT][@skill,skill]`: `AI:fraud-v1=90 AI:fraud-v2=10` is a
canary; equal weights balance by least pending work; `HUMAN:clerk-es@spanish` serves
only requests that need Spanish (or nothing).
"""

from __future__ import annotations

from datetime import UTC, datetime

import nats.js.errors
import typer

from hms_bus import parking
from hms_bus.cli.common import fail_usage, handle_errors
from hms_bus.cli.tasks import JSON_OPT, age, print_json, run_with_bus, table
from hms_bus.connection import Bus
from hms_bus.errors import InvalidNameError, NotFoundError
from hms_bus.keys import list_keys
from hms_bus.routing import (
    PARKED,
    LaneChoice,
    Parked,
    RouteEntry,
    check_entry,
    decode_entry,
    encode,
    route_key,
)
from hms_bus.subjects import Lane

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)

LANES_OPT = typer.Option([], "--lane", help="LANE[=WEIGHT][@skill,skill]; repeat for several")


def _choice(text: str) -> LaneChoice:
    """`LANE[=WEIGHT][@skill,skill]`."""
    rest, _, skills = text.partition("@")
    lane, sep, weight = rest.partition("=")
    Lane.parse(lane)
    try:
        w = int(weight) if sep else 1
    except ValueError:
        raise InvalidNameError(
            f"--lane {text!r}: weight {weight!r} is not a whole number"
        ) from None
    return LaneChoice(lane=lane, weight=w, skills=tuple(s for s in skills.split(",") if s))


def _describe(entry: RouteEntry) -> str:
    def one(c: LaneChoice) -> str:
        return (
            c.lane
            + (f"={c.weight}" if c.weight != 1 else "")
            + (f"@{','.join(c.skills)}" if c.skills else "")
        )

    return " ".join(one(c) for c in entry.lanes) or f"{entry.actor} (own lane)"


async def _entries(bus: Bus) -> list[RouteEntry]:
    kv = await bus.js.key_value(bus.ns.routes_bucket)
    out = []
    for key in await list_keys(kv):
        if not key.startswith(f"{PARKED}."):
            got = await kv.get(key)
            out.append(decode_entry(got.value or b""))
    return sorted(out, key=lambda e: e.actor)


def _print_entries(entries: list[RouteEntry], as_json: bool) -> None:
    if as_json:
        print_json(entries)
        return
    table(["ACTOR", "LANES", "BACKUP"], [[e.actor, _describe(e), e.backup or "-"] for e in entries])


@app.command("set")
@handle_errors
def route_set(
    ctx: typer.Context,
    actor: str = typer.Argument(..., help="e.g. AI:fraud-labeler"),
    lane: list[str] = LANES_OPT,
    backup: str | None = typer.Option(None, "--backup", help="lane taking over when none is live"),
    by: str | None = typer.Option(None, "--by", help="who changes it"),
) -> None:
    """Set how an actor's tasks are spread: canary weights (AI:x-v1=90 AI:x-v2=10),
    equal weights for least-pending balance, skills, a backup pool."""
    if not lane and backup is None:
        raise fail_usage("give at least one --lane or a --backup")
    entry = check_entry(
        RouteEntry(
            actor=actor,
            lanes=tuple(_choice(t) for t in lane),
            backup=backup,
            updated_by=by,
            updated_at=datetime.now(UTC),
        )
    )

    async def go(bus: Bus) -> None:
        kv = await bus.js.key_value(bus.ns.routes_bucket)
        await kv.put(route_key(actor), encode(entry))

    run_with_bus(ctx, go)
    typer.echo(f"{actor}: {_describe(entry)}" + (f", backup {backup}" if backup else ""))


@app.command("show")
@handle_errors
def route_show(
    ctx: typer.Context, actor: str = typer.Argument(...), as_json: bool = JSON_OPT
) -> None:
    """One actor's routing entry."""
    key = route_key(actor)

    async def go(bus: Bus) -> RouteEntry:
        kv = await bus.js.key_value(bus.ns.routes_bucket)
        try:
            got = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            raise NotFoundError(
                f"no routing entry for {actor}: its tasks go to lane {actor} while a worker serves it"
            ) from None
        return decode_entry(got.value or b"")

    entry: RouteEntry = run_with_bus(ctx, go)
    if as_json:
        print_json(entry)
        return
    _print_entries([entry], as_json)


@app.command("list")
@handle_errors
def route_list(ctx: typer.Context, as_json: bool = JSON_OPT) -> None:
    """Every routing entry."""
    entries: list[RouteEntry] = run_with_bus(ctx, _entries)
    if not entries and not as_json:
        typer.echo("no routing entries: every actor goes to the lane of its own name")
        return
    _print_entries(entries, as_json)


@app.command("delete")
@handle_errors
def route_delete(ctx: typer.Context, actor: str = typer.Argument(...)) -> None:
    """Remove an actor's entry: its tasks go back to the lane of its own name."""
    key = route_key(actor)

    async def go(bus: Bus) -> None:
        kv = await bus.js.key_value(bus.ns.routes_bucket)
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            raise NotFoundError(f"no routing entry for {actor}") from None
        await kv.delete(key)

    run_with_bus(ctx, go)
    typer.echo(f"{actor}: entry deleted")


@app.command("parked")
@handle_errors
def route_parked(ctx: typer.Context, as_json: bool = JSON_OPT) -> None:
    """Tasks no lane could take yet, and why; they route as soon as a lane appears."""

    async def go(bus: Bus) -> list[Parked]:
        kv = await bus.js.key_value(bus.ns.routes_bucket)
        return [e.parked for e in await parking.list_parked(kv)]

    parked: list[Parked] = run_with_bus(ctx, go)
    if as_json:
        print_json(parked)
        return
    if not parked:
        typer.echo("no parked requests: every task found a lane")
        return
    now = datetime.now(UTC)
    table(
        ["TASK", "ACTOR", "AGE", "REASON"],
        [[p.request.task, p.request.actor, age(p.parked_at, now), p.reason] for p in parked],
    )
