"""What every `hms` command shares: global options, settings, errors, the runner.

Only the CLI reads the environment and configures logging. Errors that a person
can act on print one line on stderr: a bad setting or argument exits 2, anything
else that went wrong (unreachable server, unknown run) exits 1. No tracebacks.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import anyio
import typer

from hms_bus.daemon import ActorFactory, Daemon
from hms_bus.errors import ConfigError, HmsError, InvalidNameError
from hms_bus.settings import Settings, load_settings

__all__ = [
    "State",
    "daemon_logging",
    "die",
    "fail_usage",
    "handle_errors",
    "run_async",
    "serve_daemon",
    "settings_of",
]

P = ParamSpec("P")
R = TypeVar("R")


class State:
    """The global options, kept on typer's context until a command needs settings."""

    def __init__(self, overrides: dict[str, str | None], log_level: str | None) -> None:
        self.overrides = overrides
        self.log_level = log_level
        self._settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(os.environ, self.overrides)
        return self._settings


def settings_of(ctx: typer.Context) -> Settings:
    state = ctx.find_root().obj
    if not isinstance(state, State):  # invoked without the root callback (tests)
        state = State({}, "WARNING")
    return state.settings()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def daemon_logging(ctx: typer.Context) -> None:
    """Long-lived commands log their lifecycle at INFO unless told otherwise."""
    state = ctx.find_root().obj
    level = state.log_level if isinstance(state, State) else None
    configure_logging(level or "INFO")


def die(message: str, code: int = 1) -> typer.Exit:
    """Print one line on stderr and return the exit to raise."""
    typer.echo(f"hms: error: {message}", err=True)
    return typer.Exit(code)


def fail_usage(message: str) -> typer.Exit:
    return die(message, 2)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map our errors onto one line and an exit code: 2 for bad input, 1 otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, InvalidNameError) as exc:
            raise fail_usage(str(exc)) from None
        except HmsError as exc:
            raise die(str(exc)) from None

    return wrapper


def run_async(fn: Callable[..., Awaitable[R]], *args: Any) -> R:
    """Run a coroutine function on the asyncio backend (nats-py needs asyncio)."""
    return anyio.run(fn, *args)


def serve_daemon(
    settings: Settings, factories: Sequence[ActorFactory], name: str, *, ensure: bool = True
) -> None:
    """Run a `Daemon` of these actors until SIGTERM/SIGINT, for `hms worker run` and
    `hms notifier run`: a metrics port in use, or our own errors out of its task
    groups, end it with one line each (exit 1), not a traceback."""

    async def serve() -> None:
        await Daemon(settings, factories, name=name, ensure=ensure).run()

    try:
        run_async(serve)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            port = settings.daemon.metrics_port
            raise die(f"metrics port {port} is in use: pick another with --metrics-port") from None
        raise
    except BaseExceptionGroup as group:
        matched, rest = group.split(HmsError)
        if rest is not None or matched is None:
            raise
        first, *others = _leaves(matched)
        for error in others:
            typer.echo(f"hms: error: {error}", err=True)
        raise die(str(first)) from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
