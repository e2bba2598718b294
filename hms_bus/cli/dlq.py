"""`hms dlq list|show|replay|drop`: the dead letters, for the operator who mends
their cause (see `hms_bus.dead_letters` for what a replay does).

`list` prints the oldest first, at most `--limit`, and says how many it left out;
`show` prints one letter's headers and its original body (as text when it is UTF-8);
`replay` puts letters back where they came from and deletes them; `drop` deletes
them. Several sequences may be given: each is done on its own, a failure is one line
on stderr, and the exit is 1 if any failed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import typer

from hms_bus import dead_letters
from hms_bus.cli.common import fail_usage, handle_errors
from hms_bus.cli.tasks import JSON_OPT, age, print_json, run_with_bus, table
from hms_bus.connection import Bus
from hms_bus.dead_letters import DeadLetter
from hms_bus.errors import HmsError

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)

STREAM_OPT = typer.Option(
    None, "--stream", help="only letters that came from this stream (e.g. hms_EVENTS)"
)
SEQS_ARG = typer.Argument(None, help="letter sequences, as `hms dlq list` shows them", min=1)
REASON_WIDTH = 70


def _body(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _view(letter: DeadLetter) -> dict[str, Any]:
    body = _body(letter.data)
    return {
        "seq": letter.seq,
        "stream": letter.stream,
        "sequence": letter.sequence,
        "subject": letter.subject,
        "consumer": letter.consumer,
        "delivered": letter.delivered,
        "reason": letter.reason,
        "at": letter.at,
        "size": len(letter.data),
        "body": body,
        # bytes that are not text, as msgspec writes bytes: base64
        "body_base64": letter.data if body is None else None,
    }


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@app.command("list")
@handle_errors
def list_cmd(
    ctx: typer.Context,
    stream: str | None = STREAM_OPT,
    limit: int = typer.Option(50, "--limit", min=1, help="print at most this many"),
    as_json: bool = JSON_OPT,
) -> None:
    """Dead letters, oldest first: where each came from and why it was given up on."""

    async def go(bus: Bus) -> list[DeadLetter]:
        return await dead_letters.letters(bus, stream, limit + 1)

    found = run_with_bus(ctx, go)
    shown, more = found[:limit], len(found) > limit
    if as_json:
        print_json([_view(letter) for letter in shown])
        return
    if not shown:
        typer.echo("no dead letters" + (f" from {stream}" if stream else ""))
        return
    now = datetime.now(UTC)
    table(
        ["SEQ", "AGE", "FROM", "SUBJECT", "DELIVERED", "REASON"],
        [
            [
                str(letter.seq),
                age(letter.at, now) if letter.at is not None else "-",
                f"{letter.stream}#{letter.sequence}" if letter.stream else "-",
                letter.subject or "-",
                str(letter.delivered),
                _short(letter.reason, REASON_WIDTH) or "-",
            ]
            for letter in shown
        ],
    )
    if more:
        typer.echo(f"(more not shown: --limit {limit})")


@app.command("show")
@handle_errors
def show_cmd(
    ctx: typer.Context,
    seq: int = typer.Argument(..., min=1, help="the letter's sequence"),
    as_json: bool = JSON_OPT,
) -> None:
    """One dead letter: its headers and its original body."""

    async def go(bus: Bus) -> DeadLetter:
        return await dead_letters.letter(bus, seq)

    letter = run_with_bus(ctx, go)
    view = _view(letter)
    if as_json:
        print_json(view)
        return
    for key in ("seq", "stream", "sequence", "subject", "consumer", "delivered", "at", "size"):
        typer.echo(f"{key}: {view[key] if view[key] is not None else '-'}")
    typer.echo(f"reason: {letter.reason or '-'}")
    body = view["body"]
    if body is None:
        typer.echo(f"body: {len(letter.data)} bytes, not UTF-8 text (--json gives base64)")
        return
    try:
        body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        pass  # not JSON: as it is
    typer.echo("body:")
    typer.echo(body)


def _each(ctx: typer.Context, seqs: list[int], one: Any) -> None:
    """Run `one(bus, seq)` for each sequence; a failure is a line, and exit 1 at the end."""

    async def go(bus: Bus) -> int:
        failed = 0
        for seq in seqs:
            try:
                typer.echo(await one(bus, seq))
            except HmsError as exc:
                typer.echo(f"hms: error: {exc}", err=True)
                failed += 1
        return failed

    if run_with_bus(ctx, go):
        raise typer.Exit(1)


async def _all(bus: Bus, stream: str | None) -> list[int]:
    return [letter.seq for letter in await dead_letters.letters(bus, stream)]


@app.command("replay")
@handle_errors
def replay_cmd(
    ctx: typer.Context,
    seqs: list[int] | None = SEQS_ARG,
    every: bool = typer.Option(False, "--all", help="every letter (of --stream, if given)"),
    stream: str | None = STREAM_OPT,
) -> None:
    """Publish letters again on the subject they came from, then delete them."""
    if bool(seqs) == every:
        raise fail_usage("give letter sequences, or --all (not both)")
    if stream is not None and not every:
        raise fail_usage("--stream goes with --all")
    if every:

        async def collect(bus: Bus) -> list[int]:
            return await _all(bus, stream)

        seqs = run_with_bus(ctx, collect)
        if not seqs:
            typer.echo("no dead letters" + (f" from {stream}" if stream else ""))
            return

    async def one(bus: Bus, seq: int) -> str:
        done = await dead_letters.replay(bus, seq)
        again = " (stored before: a replay already put it back)" if done.duplicate else ""
        return f"{seq}: replayed on {done.subject} ({done.stream} #{done.seq}){again}"

    _each(ctx, list(seqs or ()), one)


@app.command("drop")
@handle_errors
def drop_cmd(
    ctx: typer.Context,
    seqs: list[int] = typer.Argument(..., help="letter sequences to delete", min=1),
) -> None:
    """Delete dead letters that are not worth replaying."""

    async def one(bus: Bus, seq: int) -> str:
        await dead_letters.drop(bus, seq)
        return f"{seq}: dropped"

    _each(ctx, seqs, one)
