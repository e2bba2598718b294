"""The `hms` command line (typer).

`hms --help` lists the commands; global options (`--url`, `--root`, credentials,
TLS) override the `HMS_*` environment variables documented in
`hms_bus.settings`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hms_bus.cli import (
    demo,
    dlq,
    ledger,
    metrics,
    notifiers,
    routes,
    runs,
    system,
    tasks,
    workers,
    workflow,
)
from hms_bus.cli.common import State, configure_logging

__all__ = ["app", "main"]

app = typer.Typer(
    name="hms",
    help="hms-bus: workflows for public-service desks over NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    url: str | None = typer.Option(
        None, "--url", help="NATS URL(s), comma-separated [HMS_NATS_URL]"
    ),
    root: str | None = typer.Option(None, "--root", help="namespace root [HMS_ROOT]"),
    replicas: int | None = typer.Option(
        None, "--replicas", help="stream replicas: 1, 3 or 5 [HMS_REPLICAS]"
    ),
    creds: Path | None = typer.Option(
        None, "--creds", help="NATS credentials file [HMS_NATS_CREDS]"
    ),
    nkey: Path | None = typer.Option(None, "--nkey", help="NATS nkey seed file [HMS_NATS_NKEY]"),
    user: str | None = typer.Option(None, "--user", help="NATS user [HMS_NATS_USER]"),
    password: str | None = typer.Option(
        None, "--password", help="NATS password [HMS_NATS_PASSWORD]"
    ),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", help="CA bundle [HMS_NATS_TLS_CA]"),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="client certificate [HMS_NATS_TLS_CERT]"
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="client key [HMS_NATS_TLS_KEY]"),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Prometheus port; 0 any, -1 off [HMS_METRICS_PORT]"
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="embedded server data [HMS_DATA_DIR]"
    ),
    log_level: str | None = typer.Option(
        None, "--log-level", help="DEBUG, INFO, WARNING, ERROR [daemons: INFO, tools: WARNING]"
    ),
) -> None:
    def s(value: object) -> str | None:
        return None if value is None else str(value)

    ctx.obj = State(
        {
            "HMS_NATS_URL": url,
            "HMS_ROOT": root,
            "HMS_REPLICAS": s(replicas),
            "HMS_NATS_CREDS": s(creds),
            "HMS_NATS_NKEY": s(nkey),
            "HMS_NATS_USER": user,
            "HMS_NATS_PASSWORD": password,
            "HMS_NATS_TLS_CA": s(tls_ca),
            "HMS_NATS_TLS_CERT": s(tls_cert),
            "HMS_NATS_TLS_KEY": s(tls_key),
            "HMS_METRICS_PORT": s(metrics_port),
            "HMS_DATA_DIR": s(data_dir),
        },
        log_level,
    )
    configure_logging(log_level or "WARNING")


system.register(app)
demo.register(app)
runs.register(app)  # hms approve / hms reject
metrics.register(app)  # hms metrics
runs.add_workflow_commands(workflow.app)  # hms workflow apply|list|show
app.add_typer(workflow.app, name="workflow", help="Validate, simulate, apply and list workflows.")
app.add_typer(runs.event_app, name="event", help="Publish business events.")
app.add_typer(runs.run_app, name="run", help="Start, inspect and steer runs.")
app.add_typer(
    tasks.app,
    name="task",
    help="Human tasks: list, claim, complete, fail; reassign or reroute any task.",
)
app.add_typer(
    routes.app, name="route", help="The routing table: lanes, canary weights, skills, backup pools."
)
app.add_typer(workers.app, name="worker", help="Run and list lane workers.")
app.add_typer(dlq.app, name="dlq", help="Dead letters: list and show them, replay or drop them.")
app.add_typer(
    notifiers.app, name="notifier", help="Deliver a channel kind's notifications (webhook or log)."
)
ledger.register(app, runs.run_app)  # hms run timeline, hms case, hms ledger


def main() -> None:
    app()
