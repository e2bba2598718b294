"""`OneAtATime`: within one process, one holder per key at a time.

Handlers run concurrently (a consume loop's `concurrency`), but some work must not
overlap for the same key: two inputs of one run would race on its compare-and-set
(the loser reads the run again and applies again), and a task's cancel must not
overtake its route request. Holders of other keys are not held up, and a key that
no one waits on costs two dict operations: the event a waiter waits on is made only
when someone waits.
"""

from __future__ import annotations

from types import TracebackType

import anyio

__all__ = ["OneAtATime"]


class OneAtATime:
    """`async with one_at_a_time.hold(key): ...` runs the body once no other holder of
    `key` in this process is inside it; waiters go in turn (not strictly in order)."""

    def __init__(self) -> None:
        self._held: dict[str, anyio.Event | None] = {}

    def hold(self, key: str) -> _Hold:
        return _Hold(self._held, key)

    def __contains__(self, key: str) -> bool:
        return key in self._held


class _Hold:
    __slots__ = ("_held", "_key")

    def __init__(self, held: dict[str, anyio.Event | None], key: str) -> None:
        self._held = held
        self._key = key

    async def __aenter__(self) -> None:
        held, key = self._held, self._key
        while key in held:
            ahead = held[key]
            if ahead is None:  # made only when someone waits: that is rare
                ahead = held[key] = anyio.Event()
            await ahead.wait()
        held[key] = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if (waiting := self._held.pop(self._key)) is not None:
            waiting.set()
