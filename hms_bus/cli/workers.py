"""`hms worker run|list`: run a lane's worker as a daemon; list the live workers.

`hms worker run MODULE:FUNCTION` imports the function (the current directory is on
the import path, as with uvicorn and gunicorn), takes its lane and options from its
`@lane(...)` marking or from the flags (flags win), and runs it in a `Daemon`:
Prometheus metrics, health heartbeats, and on SIGTERM/SIGINT no more intake, the
tasks in hand finished within `--grace` seconds, exit 0. A target that cannot be
loaded exits 2 with one line saying what is wrong.

`hms worker list` reads the worker registry (one key per live worker, expiring 15 s
after its last heartbeat).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from datetime import UTC, datetime

import msgspec
import nats.js.errors
import typer

from hms_bus.cli.common import (
    daemon_logging,
    fail_usage,
    handle_errors,
    run_async,
    serve_daemon,
    settings_of,
)
from hms_bus.connection import Bus, open_bus
from hms_bus.errors import NotFoundError
from hms_bus.metrics import Metrics
from hms_bus.settings import Settings
from hms_bus.subjects import Lane
from hms_bus.worker import WorkerDefinitionError, WorkerInfo, as_worker, live_workers
from hms_bus.worker_runner import WorkerRunner

__all__ = ["app", "load_target"]

app = typer.Typer(no_args_is_help=True, help="Run and list lane workers.")


def load_target(target: str) -> object:
    """The object named by `MODULE:ATTR[.ATTR...]`; WorkerDefinitionError, one line, if not."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise WorkerDefinitionError(
            f"{target!r} is not MODULE:FUNCTION (for example examples.workers.echo:fn)"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise WorkerDefinitionError(
                f"cannot import {module_name!r}: no module named {missing!r} "
                f"(looked in {cwd} and the installed packages)"
            ) from None
        raise WorkerDefinitionError(_import_failed(module_name, exc)) from None
    except Exception as exc:  # the target's own code failed while importing: say where
        raise WorkerDefinitionError(_import_failed(module_name, exc)) from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise WorkerDefinitionError(
                f"module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


def _import_failed(module_name: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"importing {module_name!r} failed{where}: {type(exc).__name__}: {exc}"


@app.command("run")
@handle_errors
def run(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="the task function, MODULE:FUNCTION"),
    lane: str | None = typer.Option(
        None, "--lane", "-l", help="KIND:name (AI or SVC); default: the function's @lane"
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", min=1, help="tasks run at once [default: @lane's, or 10]"
    ),
    version: str | None = typer.Option(None, "--version", help="version label for the registry"),
    grace: float | None = typer.Option(
        None, "--grace", min=0.0, help="seconds to finish in-flight tasks on SIGTERM [HMS_GRACE]"
    ),
    ack_wait: float | None = typer.Option(
        None, "--ack-wait", min=0.001, help="set the lane's ack wait (seconds)"
    ),
    max_deliver: int | None = typer.Option(
        None, "--max-deliver", min=1, help="set the lane's maximum deliveries"
    ),
    no_ensure: bool = typer.Option(
        False, "--no-ensure", help="do not create or update the topology"
    ),
) -> None:
    """Serve a lane with a task function until SIGTERM/SIGINT."""
    try:
        worker = as_worker(
            load_target(target),
            lane=lane,
            concurrency=concurrency,
            version=version,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        )
    except WorkerDefinitionError as exc:
        raise fail_usage(str(exc)) from None
    daemon_logging(ctx)
    settings = settings_of(ctx)
    if grace is not None:
        settings = msgspec.structs.replace(
            settings, daemon=msgspec.structs.replace(settings.daemon, grace_seconds=grace)
        )

    def factory(bus: Bus, metrics: Metrics) -> WorkerRunner:
        return WorkerRunner(
            bus, worker, metrics=metrics, heartbeat_seconds=settings.daemon.heartbeat_seconds
        )

    name = f"worker-{worker.lane.kind}-{worker.lane.name}"
    serve_daemon(settings, [factory], name, ensure=not no_ensure)


@app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    lane: str | None = typer.Option(None, "--lane", "-l", help="only this lane (KIND:name)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON array, for scripts"),
) -> None:
    """List the live workers: lane, version, state, load, where they run."""
    the_lane = Lane.parse(lane) if lane else None
    settings = settings_of(ctx)
    workers = run_async(_list, settings, the_lane)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(workers), indent=2))
        return
    if not workers:
        where = f" for lane {the_lane}" if the_lane else ""
        typer.echo(f"no live workers{where} under root {settings.bus.root!r}")
        return
    for line in _table(workers, datetime.now(UTC)):
        typer.echo(line)


async def _list(settings: Settings, lane: Lane | None) -> list[WorkerInfo]:
    async with open_bus(settings.nats, settings.bus, "hms-worker-list") as bus:
        try:
            kv = await bus.js.key_value(bus.ns.workers_bucket)
        except nats.js.errors.NotFoundError:
            raise NotFoundError(
                f"no workers bucket under root {settings.bus.root!r}: run `hms topology ensure`"
            ) from None
        return await live_workers(kv, lane)


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h" if s < 172_800 else f"{s // 86_400}d"


def _table(workers: list[WorkerInfo], now: datetime) -> list[str]:
    head = ("LANE", "VERSION", "STATE", "LOAD", "UP", "SEEN", "INSTANCE", "FUNCTION")
    rows = [head] + [
        (
            w.lane,
            w.version or "-",
            w.state,
            f"{w.in_flight}/{w.capacity}",
            _ago((now - w.started_at).total_seconds()),
            f"{_ago((now - w.at).total_seconds())} ago",
            w.instance,
            w.function or "-",
        )
        for w in workers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip() for r in rows]
