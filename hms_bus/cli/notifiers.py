"""`hms notifier run KIND`: deliver the notifications of one channel kind.

An escalation's `notify: ["slack:#ops"]` is published on `hms.notify.slack`; this
command serves that kind as a daemon (metrics, heartbeat, graceful SIGTERM): with
`--webhook URL` it POSTs each notification there (`hms_bus.webhooks`), without it
logs them. Replicas of one kind share its durable. A notifier of your own, in a few
lines of Python, is `hms_bus.notify.serve`.
"""

from __future__ import annotations

from typing import cast

import typer

from hms_bus.cli.common import (
    daemon_logging,
    fail_usage,
    handle_errors,
    serve_daemon,
    settings_of,
)
from hms_bus.connection import Bus
from hms_bus.metrics import Metrics
from hms_bus.notify import NotifierRunner, log_notifier
from hms_bus.subjects import check_token
from hms_bus.webhooks import FORMATS, Format, webhook_notifier

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)


@app.command("run")
@handle_errors
def run(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="the channel kind: slack, sms, email, ..."),
    webhook: str | None = typer.Option(
        None, "--webhook", help="POST each notification to this URL (default: log them)"
    ),
    form: str = typer.Option(
        "json", "--format", help=f'webhook body: {" or ".join(FORMATS)} ({{"text": ...}})'
    ),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="seconds per webhook call"),
) -> None:
    """Deliver one channel kind's notifications until SIGTERM/SIGINT."""
    check_token(kind, "channel kind")
    if webhook is None:
        chosen = log_notifier(kind)
    else:
        if form not in FORMATS:
            raise fail_usage(f"--format {form!r}: one of {', '.join(FORMATS)}")
        chosen = webhook_notifier(kind, webhook, form=cast(Format, form), timeout=timeout)
    daemon_logging(ctx)

    def factory(bus: Bus, metrics: Metrics) -> NotifierRunner:
        return NotifierRunner(bus, chosen, metrics=metrics)

    serve_daemon(settings_of(ctx), [factory], chosen.name)
