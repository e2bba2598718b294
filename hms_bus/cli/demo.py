"""`hms demo`: the five example workflows, end to end, on one command.

Where it runs:
- No NATS URL configured (no `HMS_NATS_URL`, no `--url`), or `--embedded`: a private
  nats-server on a random loopback port with its store in a temporary directory, and
  every actor of `actors.REGISTRY` in this process. Nothing else needs to run, and
  nothing is left behind: `hms demo --once` works on a fresh checkout.
- A configured server (`--url`, `HMS_NATS_URL`): the actors are expected to run there
  already (`hms up`, `hms actor run ...`); `--actors` runs them in this process too.

Then it applies the examples, starts the simulated workers (and the auto-clerk),
publishes one event per example and prints each run's progress. `--once` waits for
every demo run to finish (at most `--timeout` seconds), prints a summary table and
exits 0 when each run ended as its example expects, 1 otherwise. Without `--once` it
keeps serving until Ctrl-C: human tasks wait in the inbox for `hms task ...` unless
the auto-clerk answers them. The auto-clerk is on by default with `--once` (no
person is there to answer), off otherwise.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import typer

from actors import REGISTRY
from hms_bus.cli.common import fail_usage, handle_errors, run_async, settings_of
from hms_bus.connection import open_bus
from hms_bus.daemon import Daemon
from hms_bus.demo.runner import (
    DemoError,
    DemoReport,
    demo_alongside,
    find_examples,
    load_examples,
    run_demo,
)
from hms_bus.health import check
from hms_bus.server import NatsServer
from hms_bus.settings import Settings
from hms_bus.workflow.loader import WorkflowError

__all__ = ["demo", "register"]


def register(app: typer.Typer) -> None:
    """Mount `hms demo` on the root app."""
    app.command("demo")(demo)


@handle_errors
def demo(
    ctx: typer.Context,
    once: bool = typer.Option(
        False, "--once", help="wait until every demo run finished, print a summary, exit 0/1"
    ),
    auto_clerk: bool | None = typer.Option(
        None,
        "--auto-clerk/--no-auto-clerk",
        help="a simulated clerk answers human tasks [default: on with --once, else off]",
    ),
    examples: str | None = typer.Option(
        None, "--examples", help="directory of the example workflows [default: ./examples]"
    ),
    timeout: float = typer.Option(
        120.0, "--timeout", min=1.0, help="with --once: seconds to wait for the runs"
    ),
    embedded: bool | None = typer.Option(
        None,
        "--embedded/--no-embedded",
        help="private nats-server + all actors in this process [default: when no URL is set]",
    ),
    actors: bool = typer.Option(
        False, "--actors", help="with a configured server: run the actors in this process too"
    ),
    pace: float = typer.Option(
        1.0, "--pace", min=0.0, help="scale of the simulated work times (0.1: ten times faster)"
    ),
    clerk_delay: float = typer.Option(
        1.0, "--clerk-delay", min=0.0, help="seconds the auto-clerk takes to read a task"
    ),
) -> None:
    """Run the five example workflows end to end with simulated workers."""
    settings = settings_of(ctx)
    # A missing directory or an invalid workflow is bad input: exit 2 before anything starts.
    try:
        directory = find_examples(Path(examples) if examples else None)
        load_examples(directory)
    except (DemoError, WorkflowError) as exc:
        raise fail_usage(str(exc)) from None
    clerk = once if auto_clerk is None else auto_clerk
    options = _Options(once, clerk, directory, timeout, pace, clerk_delay)
    private = (not settings.nats.explicit) if embedded is None else embedded
    if private:
        with tempfile.TemporaryDirectory(prefix="hms-demo-") as tmp, NatsServer(Path(tmp)) as srv:
            typer.echo(
                f"embedded nats-server on {srv.url} (temporary store), actors in this process; "
                f"other terminals: export HMS_NATS_URL={srv.url} HMS_ROOT={settings.bus.root}"
            )
            report = run_async(_with_actors, _local(settings, srv.url), options)
    elif actors:
        report = run_async(_with_actors, _quiet(settings), options)
    else:
        report = run_async(_connected, settings, options)
    if report is None:
        raise typer.Exit(130 if once else 0)  # interrupted
    if once:
        raise typer.Exit(report.exit_code)


@dataclass(frozen=True, slots=True)
class _Options:
    once: bool
    auto_clerk: bool
    examples: Path
    timeout: float
    pace: float
    clerk_delay: float


def _quiet(settings: Settings) -> Settings:
    """No metrics endpoint: the demo is not scraped, and a port could clash."""
    return msgspec.structs.replace(
        settings, daemon=msgspec.structs.replace(settings.daemon, metrics_port=-1)
    )


def _local(settings: Settings, url: str) -> Settings:
    nats = msgspec.structs.replace(settings.nats, urls=(url,), explicit=True)
    return _quiet(msgspec.structs.replace(settings, nats=nats))


async def _with_actors(settings: Settings, o: _Options) -> DemoReport | None:
    daemon = Daemon(settings, list(REGISTRY.values()), name="hms-demo")
    return await demo_alongside(
        daemon,
        once=o.once,
        auto_clerk=o.auto_clerk,
        examples=o.examples,
        out=sys.stdout,
        timeout=o.timeout,
        pace=o.pace,
        clerk_delay=o.clerk_delay,
    )


async def _connected(settings: Settings, o: _Options) -> DemoReport | None:
    report = await check(settings, sorted(REGISTRY))
    for problem in report.problems:
        typer.echo(f"hms demo: warning: {problem} (start the actors with `hms up`)", err=True)
    result: DemoReport | None = None
    async with anyio.create_task_group() as tg:

        async def interrupted() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        async def go() -> None:
            nonlocal result
            async with open_bus(settings.nats, settings.bus, "hms-demo") as bus:
                result = await run_demo(
                    bus,
                    once=o.once,
                    auto_clerk=o.auto_clerk,
                    examples=o.examples,
                    out=sys.stdout,
                    timeout=o.timeout,
                    pace=o.pace,
                    clerk_delay=o.clerk_delay,
                )
            tg.cancel_scope.cancel()

        tg.start_soon(interrupted)
        tg.start_soon(go)
    return result
