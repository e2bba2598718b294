"""`hms metrics [WORKFLOW] [--json]`: the business numbers the ledger derives.

Read from the stats bucket (`hms_bus.stats`) through the SDK (`Client.metrics`,
`Client.metrics_report`); "today" is the current UTC day. With a workflow: that
workflow's numbers, the seeds' `avgFirstResponseMins` and `slaBreaches` (today)
among them; an unknown workflow is a one-line error (exit 1). Without: every
workflow, then the lanes (queue wait, work time) and the clerks (work in progress).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import typer

from hms_bus.cli.common import handle_errors, run_async, settings_of
from hms_bus.client import open_client
from hms_bus.stats_report import LaneMetrics, MetricsReport, WorkflowMetrics

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)


@handle_errors
def metrics(
    ctx: typer.Context,
    workflow: str | None = typer.Argument(None, help="one workflow id (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (camelCase keys)"),
) -> None:
    """Business metrics: runs, first response, run duration, SLA breaches today and in
    total; with no workflow also lanes' queue wait and work time and clerks' work in
    progress."""
    settings = settings_of(ctx)

    async def main() -> WorkflowMetrics | MetricsReport:
        async with open_client(settings, name="hms-cli") as client:
            if workflow is not None:
                return await client.metrics(workflow)
            return await client.metrics_report()

    result = run_async(main)
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(result), indent=2, ensure_ascii=False))
    elif isinstance(result, WorkflowMetrics):
        typer.echo(_render_workflow(result))
    else:
        typer.echo(_render_report(result))


def _mins(value: float | None) -> str:
    return "-" if value is None else f"{value:g} min"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _render_workflow(m: WorkflowMetrics) -> str:
    finished = _counts(m.runs_finished)
    today = f" ({_counts(m.sla_breaches_by_step_today)})" if m.sla_breaches else ""
    return "\n".join(
        [
            f"{m.workflow}  (today: {m.day} UTC)",
            f"  runs:            {m.runs_started} started, {m.runs_open} open; finished: {finished}",
            f"  first response:  avg {_mins(m.avg_first_response_mins)}, "
            f"p90 {_mins(m.p90_first_response_mins)} ({m.first_responses} steps)",
            f"  run duration:    avg {_mins(m.avg_duration_mins)}",
            f"  SLA breaches:    {m.sla_breaches} today{today}, {m.sla_breaches_total} in total",
        ]
    )


def _render_lane(lane: LaneMetrics) -> str:
    return (
        f"  {lane.lane:<28} {lane.completed:>7} {lane.failed:>6}  "
        f"{_mins(lane.avg_queue_wait_mins):>12} {_mins(lane.p90_queue_wait_mins):>12} "
        f"{_mins(lane.avg_work_mins):>12}"
    )


def _render_report(report: MetricsReport) -> str:
    if not (report.workflows or report.lanes or report.clerks):
        return "no statistics yet: the ledger records them as runs happen (`hms up`)"
    parts = [_render_workflow(m) for m in report.workflows]
    if report.lanes:
        header = (
            f"  {'lane':<28} {'done':>7} {'failed':>6}  {'avg wait':>12} {'p90 wait':>12} "
            f"{'avg work':>12}"
        )
        parts.append("\n".join(["lanes:", header, *map(_render_lane, report.lanes)]))
    if report.clerks:
        rows = [
            f"  {c.clerk:<28} {c.in_progress:>11} {c.claimed:>7} {c.completed:>9}"
            for c in report.clerks
        ]
        header = f"  {'clerk':<28} {'in progress':>11} {'claimed':>7} {'completed':>9}"
        parts.append("\n".join(["clerks:", header, *rows]))
    return "\n\n".join(parts)
