"""`hms workflow validate|simulate`: the language's commands that need no server."""

from __future__ import annotations

from pathlib import Path

import typer

from hms_bus.cli.common import fail_usage, handle_errors

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)


@app.command("validate")
@handle_errors
def validate(
    files: list[Path] = typer.Argument(..., help="workflow YAML files"),
) -> None:
    """Check workflow files without a server: exit 0 when all are valid, else exit 2
    with one `FILE:LINE:COL: message` line per problem."""
    from hms_bus.workflow.loader import validate_paths

    problems = validate_paths(files)
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{len(files)} workflow file(s) valid")


@app.command("simulate")
@handle_errors
def simulate(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="workflow YAML file"),
    script: Path | None = typer.Option(None, "--script", "-s", help="simulation script (YAML)"),
    replay: str | None = typer.Option(
        None, "--replay", help="a recorded run (from the ledger) to replay against FILE"
    ),
) -> None:
    """Run one workflow in virtual time, with no server, as the script says; print
    the timeline. Exit 1 when the script's `expect:` block is not met.

    With `--replay RUN` instead of a script: re-run a recorded run's inputs (read
    from the ledger) against FILE, another version of its workflow, and show where
    the outcome differs; exit 1 when it does."""
    from hms_bus.workflow.loader import WorkflowError, load_workflow
    from hms_bus.workflow.simulate import ScriptError, load_script
    from hms_bus.workflow.simulate import simulate as run_simulation

    try:
        definition = load_workflow(file)
    except WorkflowError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(2) from None
    if (script is None) == (replay is None):
        raise fail_usage("give either --script FILE or --replay RUN")
    if replay is not None:
        from hms_bus.cli.ledger import replay_run

        replay_run(ctx, definition, replay)
        return
    assert script is not None
    try:
        loaded = load_script(script)
    except ScriptError as exc:
        raise fail_usage(str(exc)) from None
    result = run_simulation(definition, loaded)
    typer.echo(result.render())
    if not result.ok:
        raise typer.Exit(1)
