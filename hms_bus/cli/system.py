"""Running the system: `hms server`, `hms up`, `hms actor run`, `hms check`,
`hms topology ensure`.

`hms up --cluster 3` is the cluster on a laptop: three servers of the bundled binary
routed to each other on loopback, every stream and bucket with three replicas, and
every actor in this process; SIGTERM or Ctrl-C stops the actors, then the servers."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import anyio
import msgspec
import typer

from actors import REGISTRY
from hms_bus.cli.common import (
    daemon_logging,
    fail_usage,
    handle_errors,
    run_async,
    settings_of,
)
from hms_bus.cluster import NatsCluster
from hms_bus.connection import open_bus
from hms_bus.daemon import ActorFactory, Daemon
from hms_bus.health import check
from hms_bus.server import NatsServer
from hms_bus.settings import DEFAULT_URL, Settings
from hms_bus.topology import ensure_topology

__all__ = ["register"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 4222


def register(app: typer.Typer) -> None:
    app.command("server")(server)
    app.command("up")(up)
    app.command("check")(check_cmd)
    topology = typer.Typer(help="Create or inspect the JetStream topology.", no_args_is_help=True)
    topology.command("ensure")(topology_ensure)
    app.add_typer(topology, name="topology")
    actor = typer.Typer(help="Run one actor daemon.", no_args_is_help=True)
    actor.command("run")(actor_run)
    actor.command("list")(actor_list)
    app.add_typer(actor, name="actor")


def _embedded(settings: Settings, port: int, data_dir: Path | None) -> NatsServer:
    base = (data_dir or settings.data_dir).resolve()
    return NatsServer(base, port=port, server_name="hms-embedded")


async def _wait_for_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


@handle_errors
def server(
    ctx: typer.Context,
    port: int = typer.Option(
        DEFAULT_PORT, "--port", "-p", min=0, max=65535, help="client port; 0 picks a free one"
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", "-d", help="store and log directory (default .hms)"
    ),
) -> None:
    """Run the bundled nats-server with JetStream on 127.0.0.1 until Ctrl-C."""
    daemon_logging(ctx)
    settings = settings_of(ctx)
    with _embedded(settings, port or 0, data_dir).start() as srv:
        typer.echo(f"nats-server listening on {srv.url} (store {srv.store_dir}); Ctrl-C stops it")
        run_async(_wait_for_signal)


@handle_errors
def up(
    ctx: typer.Context,
    port: int = typer.Option(
        DEFAULT_PORT, "--port", "-p", min=0, max=65535, help="embedded server port"
    ),
    demo: bool = typer.Option(
        False, "--demo", help="also run demo workers and one request per example workflow"
    ),
    auto_clerk: bool = typer.Option(
        False, "--auto-clerk", help="with --demo: a demo clerk answers human tasks"
    ),
    cluster: int | None = typer.Option(
        None,
        "--cluster",
        help="start a local JetStream cluster of 3 or 5 servers (random loopback ports) "
        "and replicate every stream and bucket on it",
    ),
) -> None:
    """Run the whole system until Ctrl-C: the embedded NATS server (unless
    HMS_NATS_URL is set), the topology, every actor, and with --demo the demo."""
    daemon_logging(ctx)
    settings = settings_of(ctx)
    factories = list(REGISTRY.values())
    if cluster is not None:
        _up_cluster(settings, cluster, factories, demo, auto_clerk)
        return
    if settings.nats.explicit:
        typer.echo(f"using NATS at {', '.join(settings.nats.urls)}")
        run_async(_run_daemon, settings, factories, "hms-up", demo, auto_clerk)
        return
    with _embedded(settings, port, None).start() as srv:
        typer.echo(f"nats-server listening on {srv.url} (store {srv.store_dir})")
        if srv.url != DEFAULT_URL:
            typer.echo(f"  other terminals: export HMS_NATS_URL={srv.url}")
        embedded = settings.__class__(
            nats=settings.nats.__class__(urls=(srv.url,), explicit=True),
            bus=settings.bus,
            daemon=settings.daemon,
            data_dir=settings.data_dir,
        )
        run_async(_run_daemon, embedded, factories, "hms-up", demo, auto_clerk)


def _up_cluster(
    settings: Settings, size: int, factories: list[ActorFactory], demo: bool, auto_clerk: bool
) -> None:
    """`hms up --cluster N`: N servers from the bundled binary on loopback, replicas N
    (HMS_REPLICAS=3 on 5 servers is kept), every actor in this process; all stopped
    on exit."""
    if size not in (3, 5):
        raise fail_usage(f"--cluster {size}: use 3 or 5 servers (a quorum needs an odd count)")
    if settings.nats.explicit:
        raise fail_usage(
            "--cluster starts its own servers: unset HMS_NATS_URL (or drop --url) to use it"
        )
    replicas = settings.bus.replicas if 1 < settings.bus.replicas <= size else size
    base = (settings.data_dir / "cluster").resolve()
    with NatsCluster(base, size=size, name="hms") as nodes:
        urls = ",".join(nodes.urls)
        typer.echo(f"nats cluster of {size} listening on {urls} (stores under {base})")
        typer.echo(f"  other terminals: export HMS_NATS_URL={urls} HMS_REPLICAS={replicas}")
        local = msgspec.structs.replace(
            settings,
            nats=msgspec.structs.replace(settings.nats, urls=tuple(nodes.urls), explicit=True),
            bus=msgspec.structs.replace(settings.bus, replicas=replicas),
        )
        run_async(_run_daemon, local, factories, "hms-up", demo, auto_clerk)


async def _run_daemon(
    settings: Settings, factories: list[ActorFactory], name: str, demo: bool, auto_clerk: bool
) -> None:
    daemon = Daemon(settings, factories, name=name)

    def ready() -> None:
        names = ", ".join(REGISTRY)
        port = daemon.metrics_port
        where = f"metrics on :{port}/metrics" if port else "metrics off"
        typer.echo(f"topology ready under root {settings.bus.root!r}; actors: {names}; {where}")
        typer.echo("hms is up; Ctrl-C stops it")

    if demo:
        from hms_bus.demo import demo_alongside

        await demo_alongside(daemon, auto_clerk=auto_clerk, out=sys.stdout, ready=ready)
        return
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        ready()


@handle_errors
def actor_run(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="the actor to run"),
    no_ensure: bool = typer.Option(
        False, "--no-ensure", help="do not create or update the topology"
    ),
) -> None:
    """Run one actor as its own daemon (several replicas may run at once)."""
    if name not in REGISTRY:
        available = ", ".join(sorted(REGISTRY)) or "none yet"
        raise fail_usage(f"unknown actor {name!r}; available: {available}")
    daemon_logging(ctx)
    settings = settings_of(ctx)
    run_async(_run_actor, settings, name, not no_ensure)


async def _run_actor(settings: Settings, name: str, ensure: bool) -> None:
    await Daemon(settings, [REGISTRY[name]], name=name, ensure=ensure).run()


def actor_list() -> None:
    """List the actors this version provides."""
    for name in sorted(REGISTRY):
        typer.echo(name)


@handle_errors
def check_cmd(
    ctx: typer.Context,
    actor: list[str] = typer.Option(
        [], "--actor", "-a", help="expect a heartbeat from this actor (default: every actor)"
    ),
    url: str | None = typer.Option(None, "--url", help="NATS URL(s), as the global --url"),
) -> None:
    """Exit 0 when NATS is reachable, the topology is in place and every expected
    actor has a live heartbeat; 1 otherwise, saying what is missing."""
    if url is not None:
        ctx.find_root().obj.overrides["HMS_NATS_URL"] = url
    settings = settings_of(ctx)
    expected = actor or sorted(REGISTRY)
    report = run_async(check, settings, expected)
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"hms check: {problem}", err=True)
        raise typer.Exit(1)
    alive = ", ".join(sorted({f"{b.actor}" for b in report.alive})) or "none expected"
    typer.echo(
        f"ok: NATS at {report.url}, topology under {settings.bus.root!r}, actors alive: {alive}"
    )


@handle_errors
def topology_ensure(ctx: typer.Context) -> None:
    """Create or update every stream, consumer and bucket (idempotent)."""
    settings = settings_of(ctx)

    async def go() -> None:
        async with open_bus(settings.nats, settings.bus, "hms-topology") as bus:
            report = await ensure_topology(bus.js, settings.bus)
        for line in report.created:
            typer.echo(f"created {line}")
        for line in report.updated:
            typer.echo(f"updated {line}")
        typer.echo(f"{len(report.unchanged)} unchanged")

    run_async(go)
