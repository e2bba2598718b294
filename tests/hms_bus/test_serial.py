"""`OneAtATime`: one holder per key at a time, other keys not held up."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from hms_bus.serial import OneAtATime


async def test_holders_of_one_key_take_turns_and_other_keys_go_through() -> None:
    gate = OneAtATime()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    release = anyio.Event()
    entered_b = anyio.Event()

    async def holder(key: str) -> None:
        async with gate.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            if key == "b":
                entered_b.set()
            await release.wait()  # every holder stays inside until released
            inside[key] -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(holder, "a")
        tg.start_soon(holder, "b")
        with anyio.fail_after(5):
            await entered_b.wait()  # "b" got in while an "a" holds its key
        assert "a" in gate
        assert "b" in gate
        release.set()

    assert most == {"a": 1, "b": 1}
    assert "a" not in gate
    assert "b" not in gate


async def test_a_holder_that_fails_lets_the_next_one_in() -> None:
    gate = OneAtATime()
    order: list[str] = []

    async def failing() -> None:
        try:
            async with gate.hold("k"):
                order.append("first")
                await anyio.lowlevel.checkpoint()  # the second is waiting by now
                raise RuntimeError("handler failed")
        except RuntimeError:
            pass

    async def second() -> None:
        async with gate.hold("k"):
            order.append("second")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)
            tg.start_soon(second)

    assert order == ["first", "second"]
    assert "k" not in gate
