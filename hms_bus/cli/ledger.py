"""`hms run timeline`, `hms case timeline` and `hms ledger verify`: reading the ledger.

Timelines print one line per fact (`[10:02:16] eligibility_check failed (try 1/3)`),
or with `--json` the SDK's `TimelineEntry` list; `--follow` keeps printing entries as
they are appended until the run finishes (or Ctrl-C), with `--json` one object per
line. An unknown run or case exits 1
with one `hms: error: ...` line, as every `hms run` command does. `hms ledger verify`
recomputes one chain or all of them: exit 0, or 1 naming the first broken entry of
each broken chain.
"""

from __future__ import annotations

import json

import msgspec
import typer

from hms_bus.cli.common import die, handle_errors, run_async, settings_of
from hms_bus.client import open_client
from hms_bus.errors import NotFoundError
from hms_bus.ledger import reader
from hms_bus.ledger.replay import replay
from hms_bus.ledger.timeline import TimelineEntry, fact_of, render_line, render_lines
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.script import ScriptError

__all__ = ["case_app", "ledger_app", "register", "replay_run"]

case_app = typer.Typer(help="Cases: the runs that share a case key.", no_args_is_help=True)
ledger_app = typer.Typer(help="The hash-chained ledger.", no_args_is_help=True)

_JSON = typer.Option(False, "--json", help="machine-readable JSON with stable keys")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    """Mount `run timeline`, `case timeline` and `ledger verify`."""
    run_app.command("timeline")(run_timeline)
    app.add_typer(case_app, name="case", help="Cases: the runs that share a case key.")
    app.add_typer(ledger_app, name="ledger", help="The hash-chained ledger: verify it.")


def _print(timeline: list[TimelineEntry], as_json: bool, *, with_run: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(timeline), indent=2, ensure_ascii=False))
    else:
        for line in render_lines(timeline, with_run=with_run):
            typer.echo(line)


@handle_errors
def run_timeline(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="run id, e.g. FTC-20261121-00001"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new entries"),
    as_json: bool = _JSON,
) -> None:
    """A run's history from the ledger, in order: who did what, when and why."""
    settings = settings_of(ctx)

    async def main() -> list[TimelineEntry]:
        async with open_client(settings, name="hms-cli") as client:
            if not follow:
                return await client.timeline(run)
            await client.timeline(run)  # an unknown run fails at once
            async for item in reader.follow_run(client.bus, run):
                if as_json:
                    line = json.dumps(msgspec.to_builtins(item), ensure_ascii=False)
                    typer.echo(line)
                else:
                    typer.echo(render_line(item))
            return []

    timeline = run_async(main)
    if not follow:
        _print(timeline, as_json)


@case_app.command("timeline")
@handle_errors
def case_timeline(
    ctx: typer.Context,
    key: str = typer.Argument(..., help="case key shared by the runs"),
    as_json: bool = _JSON,
) -> None:
    """Every run that shares a case key, merged in time order (an appeal follows its
    original complaint)."""
    settings = settings_of(ctx)

    async def main() -> list[TimelineEntry]:
        async with open_client(settings, name="hms-cli") as client:
            return await client.case_timeline(key)

    _print(run_async(main), as_json, with_run=True)


@ledger_app.command("verify")
@handle_errors
def ledger_verify(
    ctx: typer.Context,
    run: str | None = typer.Argument(None, help="one run (default: every run)"),
) -> None:
    """Recompute the hash chains: exit 0 when intact, else 1 naming the first broken
    entry of each broken chain."""
    settings = settings_of(ctx)

    async def main() -> reader.VerifyReport:
        async with open_client(settings, name="hms-cli") as client:
            if run is None:
                return await reader.verify_all(client.bus)
            return await reader.verify_run(client.bus, run)

    report = run_async(main)
    for broken in report.broken:
        typer.echo(f"BROKEN {broken}", err=True)
    if report.broken:
        raise die(f"{len(report.broken)} of {report.runs} chain(s) broken")
    typer.echo(f"ok: {report.runs} chain(s), {report.entries} entries verified")


def replay_run(ctx: typer.Context, workflow: Workflow, run: str) -> None:
    """`hms workflow simulate FILE --replay RUN`: print the replay; exit 1 when the
    outcome differs from the record."""
    settings = settings_of(ctx)

    async def main() -> tuple[list[TimelineEntry], Workflow]:
        async with open_client(settings, name="hms-cli") as client:
            timeline = await client.timeline(run)
            started = next((t for t in timeline if t.kind == "run.started"), None)
            if started is None:
                raise NotFoundError(f"run {run}: the ledger has no run.started entry")
            version = started.data.get("version")
            original = await client.workflow(
                started.workflow, version if isinstance(version, int) else None
            )
            return timeline, original

    timeline, original = run_async(main)
    if original.id != workflow.id:
        raise die(f"run {run} is of workflow {original.id!r}, not {workflow.id!r}")
    try:
        report = replay([fact_of(item) for item in timeline], workflow, original)
    except (ValueError, ScriptError) as exc:
        raise die(f"cannot replay {run}: {exc}") from None
    typer.echo(report.render())
    if not report.same:
        raise typer.Exit(1)
