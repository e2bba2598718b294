"""Generic test helpers: a bus on the test server, waiting for state that is only
eventually true, free ports.

`eventually()` is the one place in the suite that sleeps between looks. Everything
else waits on the effect itself under a deadline (`anyio.fail_after`, a `fetch` with a
timeout, a subscription's `next_msg`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import anyio

from hms_bus.connection import Bus, open_bus
from hms_bus.server import free_ports
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology

__all__ = ["bus_for", "eventually", "free_port"]

T = TypeVar("T")


@asynccontextmanager
async def bus_for(url: str, ns: Namespace, name: str = "test") -> AsyncIterator[Bus]:
    """A bus on the server at `url`, in namespace `ns`, its streams and buckets made."""
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), name) as bus:
        await ensure_topology(bus.js, bus.settings)
        yield bus


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | None = ...,
    retry_on: tuple[type[Exception], ...] = ...,
) -> T: ...
@overload
async def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | None = ...,
    retry_on: tuple[type[Exception], ...] = ...,
) -> T: ...
async def eventually(
    predicate: Callable[[], Any],
    *,
    timeout: float = 5.0,  # its own fail_after, so that it can say what never became true
    interval: float = 0.02,
    what: str | None = None,
    retry_on: tuple[type[Exception], ...] = (),
) -> Any:
    """Call `predicate` (sync or async) until it returns something truthy, and return that.

    An exception of a type in `retry_on` counts as "not yet" (a server mid-election, a
    key not written yet); any other exception fails at once. On timeout, raises
    `AssertionError` naming `what` (default: the predicate's name), how many tries were
    made, the last value seen and, chained, the last retried exception.
    """
    tries = 0
    last_value: object = None
    last_error: Exception | None = None
    try:
        with anyio.fail_after(timeout) as deadline:
            while True:
                tries += 1
                try:
                    value = predicate()
                    if inspect.isawaitable(value):
                        value = await value
                except retry_on as error:
                    last_error = error
                else:
                    if value:
                        return value
                    last_value, last_error = value, None
                await anyio.sleep(interval)
    except TimeoutError:
        if not deadline.cancelled_caught:  # the predicate's own TimeoutError: not ours
            raise
        name = what or getattr(predicate, "__qualname__", repr(predicate))
        message = (
            f"{name} still not true after {timeout:g} s ({tries} tries); last value {last_value!r}"
        )
        if last_error is not None:
            message += f", last error {last_error!r}"
        raise AssertionError(message) from last_error


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]
