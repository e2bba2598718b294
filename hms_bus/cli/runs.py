"""`hms event`, `hms run`, `hms approve|reject` and `hms workflow apply|list|show`:
the commands that talk to a running system, all through the SDK (`hms_bus.client`).

Read commands print a compact table for people and, with `--json`, the SDK's views
as JSON with stable keys for scripts. Mistakes in arguments (bad `--data` JSON, a
blank `--reason`) exit 2; an unknown run and every other failure exit 1, with one
`hms: error: ...` line on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import typer
import yaml

from hms_bus.cli.common import fail_usage, handle_errors, run_async, settings_of
from hms_bus.client import ArgumentError, Client, RunStatusView, open_client
from hms_bus.workflow.state import RUN_STATUSES

__all__ = ["add_workflow_commands", "event_app", "register", "run_app"]

R = TypeVar("R")

event_app = typer.Typer(help="Publish business events.", no_args_is_help=True)
run_app = typer.Typer(help="Start, inspect and steer runs.", no_args_is_help=True)

_JSON = typer.Option(False, "--json", help="machine-readable JSON with stable keys")
_BY = typer.Option(..., "--by", help="who does this (recorded in the ledger)")
_REASON = typer.Option(..., "--reason", help="why (recorded in the ledger)")
_ID = typer.Option(None, "--id", help="command id (a retry with the same id is dropped)")
# Mutable (list) defaults must be module-level singletons (ruff B008).
_STATUSES = typer.Option(None, "--status", "-s", help="only these statuses (repeatable)")
_FILES = typer.Argument(..., help="workflow YAML files")


def register(app: typer.Typer) -> None:
    """Add the top-level `approve` and `reject` commands to the root app."""
    app.command("approve")(approve)
    app.command("reject")(reject)


def add_workflow_commands(app: typer.Typer) -> None:
    """Add `apply`, `list` and `show` to the `workflow` sub-app."""
    app.command("apply")(workflow_apply)
    app.command("list")(workflow_list)
    app.command("show")(workflow_show)


# -- plumbing ---------------------------------------------------------------------------


def _call(ctx: typer.Context, fn: Callable[[Client], Awaitable[R]]) -> R:
    """Run `fn` with a client on the configured server; argument errors exit 2."""
    settings = settings_of(ctx)

    async def main() -> R:
        async with open_client(settings, name="hms-cli") as client:
            return await fn(client)

    try:
        return run_async(main)
    except ArgumentError as exc:
        raise fail_usage(str(exc)) from None


def _data(raw: str | None, flag: str = "--data") -> dict[str, Any]:
    """A JSON object from a flag: inline, `@FILE`, or `@-` for stdin."""
    if raw is None:
        return {}
    if raw.startswith("@"):
        try:
            raw = (
                typer.get_text_stream("stdin").read() if raw == "@-" else Path(raw[1:]).read_text()
            )
        except OSError as exc:
            raise fail_usage(f"{flag}: cannot read {raw[1:]!r}: {exc.strerror or exc}") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise fail_usage(f"{flag}: invalid JSON at {where}: {exc.msg}") from None
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        got = kinds.get(type(value), "a number")
        raise fail_usage(f"{flag}: expected a JSON object like '{{\"k\": 1}}', got {got}")
    return value


def _json(value: Any) -> None:
    typer.echo(json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False))


def _time(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Plain aligned columns; `-` for nothing."""
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None or c == "" else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _render_status(view: RunStatusView) -> None:
    typer.echo(f"{view.run}  {view.workflow} v{view.version}  {view.status}")
    typer.echo(
        f"case {view.case or '-'}  started {_time(view.started_at)}  "
        f"updated {_time(view.updated_at)}  due {_time(view.due)}"
        + ("  SLA BREACHED" if view.sla_breached else "")
    )
    if view.finished_at is not None:
        typer.echo(f"finished {_time(view.finished_at)}")
    if view.reason:
        typer.echo(f"reason: {view.reason}")
    if view.waiting_for:
        waits = ", ".join(
            f"{w.step} ({w.kind} {w.on})".replace(" )", ")") for w in view.waiting_for
        )
        typer.echo(f"waiting for: {waits}")
    typer.echo("")
    _table(
        ["STEP", "TYPE", "STATUS", "ATTEMPT", "ACTOR", "LANE", "CLAIMED BY", "DUE"],
        [
            (
                s.step,
                s.type,
                f"WAITING ({s.reason})" if s.status == "WAITING" and s.reason else s.status,
                s.attempt or "",
                s.actor,
                s.lane,
                s.claimed_by,
                _time(s.due) if s.due else "",
            )
            for s in view.steps
        ],
    )


# -- hms event ------------------------------------------------------------------------


@event_app.command("publish")
@handle_errors
def event_publish(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="event name, e.g. ComplaintLogged"),
    data: str | None = typer.Option(
        None, "--data", "-d", help="payload: a JSON object, @FILE or @-"
    ),
    id: str | None = typer.Option(None, "--id", help="event id (default: a fresh uuid)"),
    case: str | None = typer.Option(None, "--case", help="case key correlating related runs"),
    run: str | None = typer.Option(None, "--run", help="deliver to this waiting run"),
) -> None:
    """Publish a business event; print its id. Without --run, it starts every
    workflow whose `start:` names it."""
    payload = _data(data)
    typer.echo(_call(ctx, lambda c: c.publish_event(name, payload, id=id, case=case, run=run)))


# -- hms run --------------------------------------------------------------------------


@run_app.command("start")
@handle_errors
def run_start(
    ctx: typer.Context,
    workflow: str = typer.Argument(..., help="workflow id, e.g. ftc-complaint"),
    data: str | None = typer.Option(
        None, "--data", "-d", help="payload: a JSON object, @FILE or @-"
    ),
    key: str | None = typer.Option(None, "--key", help="idempotency key: one run per key, ever"),
    case: str | None = typer.Option(
        None, "--case", help="case key (default: the workflow's `case:`)"
    ),
    version: int | None = typer.Option(None, "--version", help="pin a version (default: latest)"),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="do not wait for the run id; print the key"
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for a dispatcher"),
) -> None:
    """Start a run and print its id (e.g. FTC-20261121-00001)."""
    payload = _data(data)

    async def start(c: Client) -> str:
        if no_wait:
            return await c.submit(workflow, payload, key=key, case=case, version=version)
        return await c.enqueue(
            workflow, payload, key=key, case=case, version=version, timeout=timeout
        )

    typer.echo(_call(ctx, start))


@run_app.command("status")
@handle_errors
def run_status(
    ctx: typer.Context, run: str = typer.Argument(..., help="run id"), as_json: bool = _JSON
) -> None:
    """Where a run is: its status, what it waits on, and each step."""
    view = _call(ctx, lambda c: c.status(run))
    _json(view) if as_json else _render_status(view)


@run_app.command("list")
@handle_errors
def run_list(
    ctx: typer.Context,
    status: list[str] | None = _STATUSES,
    workflow: str | None = typer.Option(
        None, "--workflow", "-w", help="only runs of this workflow"
    ),
    as_json: bool = _JSON,
) -> None:
    """Runs, oldest first."""
    wanted = [s.upper() for s in status or ()]
    if unknown := [s for s in wanted if s not in RUN_STATUSES]:
        raise fail_usage(f"--status: unknown {unknown[0]!r}; one of {', '.join(RUN_STATUSES)}")
    runs = _call(ctx, lambda c: c.runs(status=wanted or None, workflow=workflow))
    if as_json:
        _json(runs)
        return
    _table(
        ["RUN", "WORKFLOW", "VERSION", "STATUS", "CASE", "STARTED", "UPDATED"],
        [
            (
                r.run,
                r.workflow,
                r.version,
                r.status,
                r.case,
                _time(r.started_at),
                _time(r.updated_at),
            )
            for r in runs
        ],
    )


@run_app.command("tasks")
@handle_errors
def run_tasks(
    ctx: typer.Context, run: str = typer.Argument(..., help="run id"), as_json: bool = _JSON
) -> None:
    """Every attempt of every step of a run, in the order handed out."""
    tasks = _call(ctx, lambda c: c.tasks(run))
    if as_json:
        _json(tasks)
        return
    _table(
        ["TASK", "STEP", "ATTEMPT", "ACTOR", "LANE", "STATUS", "DISPATCHED", "CLAIMED BY", "ERROR"],
        [
            (
                t.task,
                t.step,
                t.attempt,
                t.actor,
                t.lane,
                t.status,
                _time(t.dispatched_at),
                t.claimant,
                t.error,
            )
            for t in tasks
        ],
    )


def _operator(verb: str, doc: str) -> Callable[..., None]:
    @handle_errors
    def command(
        ctx: typer.Context,
        run: str = typer.Argument(..., help="run id"),
        by: str = _BY,
        reason: str = _REASON,
        id: str | None = _ID,
    ) -> None:
        def send(c: Client) -> Awaitable[str]:
            method: Callable[..., Awaitable[str]] = getattr(c, verb)
            return method(run, by=by, reason=reason, id=id)

        command_id = _call(ctx, send)
        typer.echo(f"{verb} of {run} sent (command {command_id})")

    command.__doc__ = doc
    command.__name__ = f"run_{verb}"
    return command


run_app.command("pause")(_operator("pause", "Pause a run at its current steps."))
run_app.command("resume")(_operator("resume", "Resume a paused run."))
run_app.command("cancel")(_operator("cancel", "Cancel a run; its open tasks are withdrawn."))


def _step_command(verb: str, doc: str) -> Callable[..., None]:
    @handle_errors
    def command(
        ctx: typer.Context,
        run: str = typer.Argument(..., help="run id"),
        step: str = typer.Argument(..., help="step id"),
        by: str = _BY,
        reason: str = _REASON,
        id: str | None = _ID,
    ) -> None:
        def send(c: Client) -> Awaitable[str]:
            method: Callable[..., Awaitable[str]] = getattr(c, verb)
            return method(run, step, by=by, reason=reason, id=id)

        command_id = _call(ctx, send)
        typer.echo(f"{verb} of {run} {step} sent (command {command_id})")

    command.__doc__ = doc
    command.__name__ = verb
    return command


run_app.command("retry")(
    _step_command("retry", "Retry a step now, or reopen a FAILED run at the step that failed it.")
)
approve = _step_command("approve", "Approve a checkpoint of a run (who and why are recorded).")
reject = _step_command("reject", "Reject a checkpoint of a run (who and why are recorded).")


@run_app.command("wait")
@handle_errors
def run_wait(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="run id"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait"),
    as_json: bool = _JSON,
) -> None:
    """Wait until a run finishes; exit 0 if it is DONE, 1 otherwise."""
    view = _call(ctx, lambda c: c.wait_for(run, timeout=timeout))
    if as_json:
        _json(view)
    else:
        typer.echo(f"{view.run} {view.status}" + (f": {view.reason}" if view.reason else ""))
    if view.status != "DONE":
        raise typer.Exit(1)


@run_app.command("signal")
@handle_errors
def run_signal(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="run id"),
    name: str = typer.Argument(..., help="the event a wait step waits for"),
    data: str | None = typer.Option(
        None, "--data", "-d", help="payload: a JSON object, @FILE or @-"
    ),
    id: str | None = _ID,
) -> None:
    """Deliver an external event (a citizen's reply) to a waiting run."""
    payload = _data(data)
    command_id = _call(ctx, lambda c: c.signal(run, name, payload, id=id))
    typer.echo(f"signal {name} to {run} sent (command {command_id})")


# -- hms workflow apply|list|show -------------------------------------------------------


@handle_errors
def workflow_apply(ctx: typer.Context, files: list[Path] = _FILES) -> None:
    """Validate, then store workflow definitions. Nothing is applied if any file has
    problems (exit 2, `FILE:LINE:COL: message` lines); a changed definition under an
    applied version is refused (exit 1): bump `version:`."""
    from hms_bus.workflow.loader import WorkflowError, load_workflow

    loaded, problems = [], []
    for file in files:
        try:
            loaded.append(load_workflow(file))
        except WorkflowError as exc:
            problems.extend(exc.problems)
    if problems:
        for problem in problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(2)

    async def apply(c: Client) -> None:
        for workflow in loaded:
            applied = await c.apply_workflow(workflow)
            word = "applied" if applied.changed else "unchanged"
            typer.echo(f"{word} {applied.workflow} v{applied.version}")

    _call(ctx, apply)


@handle_errors
def workflow_list(ctx: typer.Context, as_json: bool = _JSON) -> None:
    """Applied workflows and their versions."""
    found = _call(ctx, lambda c: c.workflows())
    if as_json:
        _json(found)
        return
    _table(
        ["WORKFLOW", "LATEST", "VERSIONS", "PREFIX", "STARTS ON", "TITLE"],
        [
            (w.id, w.version, ",".join(map(str, w.versions)), w.prefix, ",".join(w.start), w.title)
            for w in found
        ],
    )


@handle_errors
def workflow_show(
    ctx: typer.Context,
    workflow: str = typer.Argument(..., help="workflow id"),
    version: int | None = typer.Option(None, "--version", help="a version (default: latest)"),
    as_json: bool = _JSON,
) -> None:
    """Print a stored definition (YAML, or JSON with --json)."""
    definition = _call(ctx, lambda c: c.workflow(workflow, version))
    if as_json:
        _json(definition)
    else:
        typer.echo(
            yaml.safe_dump(_compact(msgspec.to_builtins(definition)), sort_keys=False).rstrip()
        )


def _compact(value: Any) -> Any:
    """The stored definition made readable: `id` first, durations as their text
    (`4h`), unset and empty keys left out. A view, not a file to apply: `--json`
    prints the definition exactly as stored."""
    if isinstance(value, list | tuple):  # to_builtins keeps tuples
        return [_compact(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("text") and "seconds" in value:
        return value["text"]
    out = {
        k: _compact(v)
        for k, v in value.items()
        if not (v is None or v is False or v in ("", (), [], {}))
    }
    return {"id": out.pop("id"), **out} if "id" in out else out
