"""The human inbox: one claimant at a time, at-most-once placement, and the clerk's
commands (`hms task ...`, `hms route ...`) through typer's runner."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import typer
from nats.js.kv import KeyValue
from typer.testing import CliRunner

from hms_bus import inbox
from hms_bus.connection import Bus, open_bus
from hms_bus.errors import NotFoundError
from hms_bus.messages import (
    COMMAND_TYPES,
    RESULT_TYPES,
    ClaimTask,
    Task,
    TaskCompleted,
    TaskFailed,
    decoder_for,
)
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology

INVESTIGATOR = Lane.parse("HUMAN:investigator")


@asynccontextmanager
async def inbox_kv(url: str, ns: Namespace) -> AsyncIterator[tuple[Bus, KeyValue]]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), "test") as bus:
        await ensure_topology(bus.js, bus.settings)
        yield bus, await bus.js.key_value(ns.inbox_bucket)


def task(
    task_id: str = "COM-1/review/1",
    lane: Lane = INVESTIGATOR,
    kind: str = "task",
    deadline: datetime | None = None,
) -> Task:
    return Task(
        id=f"{task_id}/task",
        task=task_id,
        run=task_id.split("/")[0],
        workflow="ftc",
        version=1,
        step="review",
        attempt=1,
        actor=str(lane),
        lane=str(lane),
        kind=kind,
        input={"complaint": "robocall"},
        deadline=deadline,
    )


async def test_one_claimant_at_a_time_and_the_second_is_told_who_holds_it(
    nats_url: str, ns: Namespace
) -> None:
    async with inbox_kv(nats_url, ns) as (_, kv):
        assert await inbox.place(kv, task())

        held = await inbox.claim(kv, "COM-1/review/1", "alice")
        assert held.item.claimed_by == "alice"
        assert (await inbox.claim(kv, "COM-1/review/1", "alice")).revision == held.revision
        with pytest.raises(inbox.ClaimedError, match=r"'COM-1/review/1' is claimed by alice since"):
            await inbox.claim(kv, "COM-1/review/1", "bob")
        with pytest.raises(inbox.ClaimedError, match="only they can release it"):
            await inbox.release(kv, "COM-1/review/1", "bob")

        await inbox.release(kv, "COM-1/review/1", "alice")
        assert (await inbox.claim(kv, "COM-1/review/1", "bob")).item.claimed_by == "bob"


async def test_racing_claimants_get_exactly_one_winner(nats_url: str, ns: Namespace) -> None:
    async with inbox_kv(nats_url, ns) as (_, kv):
        await inbox.place(kv, task())
        winners: list[str] = []

        async def try_claim(who: str) -> None:
            try:
                await inbox.claim(kv, "COM-1/review/1", who)
            except inbox.ClaimedError:
                return
            winners.append(who)

        async with anyio.create_task_group() as tg:
            for who in ("alice", "bob", "carol", "dave"):
                tg.start_soon(try_claim, who)
        assert len(winners) == 1


async def test_a_task_is_placed_at_most_once_even_after_it_left(
    nats_url: str, ns: Namespace
) -> None:
    async with inbox_kv(nats_url, ns) as (_, kv):
        assert await inbox.place(kv, task())
        assert not await inbox.place(kv, task())
        assert await inbox.remove(kv, "COM-1/review/1")
        assert not await inbox.place(kv, task())  # a late redelivery does not resurrect it
        assert await inbox.find(kv, "COM-1/review/1") is None
        assert not await inbox.remove(kv, "COM-1/review/1")


async def test_listing_filters_by_lane_oldest_first(nats_url: str, ns: Namespace) -> None:
    supervisor = Lane.parse("HUMAN:supervisor")
    async with inbox_kv(nats_url, ns) as (_, kv):
        await inbox.place(kv, task("COM-1/review/1"))
        await inbox.place(kv, task("COM-2/review/1", supervisor))
        await inbox.place(kv, task("COM-3/review/1"))

        mine = await inbox.list_items(kv, INVESTIGATOR)
        assert [e.item.task.task for e in mine] == ["COM-1/review/1", "COM-3/review/1"]
        assert len(await inbox.list_items(kv)) == 3
        with pytest.raises(NotFoundError):
            await inbox.claim(kv, "COM-9/review/1", "alice")


# -- the CLI ------------------------------------------------------------------------------
def hms_app() -> typer.Typer:
    """`hms` with `task` and `route` mounted (a local copy until the lead mounts them)."""
    from hms_bus import cli
    from hms_bus.cli import routes, tasks

    if {"task", "route"} <= {g.name for g in cli.app.registered_groups}:
        return cli.app
    app = typer.Typer()
    app.callback()(cli._root)
    app.add_typer(tasks.app, name="task")
    app.add_typer(routes.app, name="route")
    return app


def hms(url: str, ns: Namespace, *args: str) -> Any:
    return CliRunner().invoke(hms_app(), ["--url", url, "--root", ns.root, *args])


def setup(url: str, ns: Namespace, *tasks_: Task) -> None:
    async def go() -> None:
        async with inbox_kv(url, ns) as (_, kv):
            for t in tasks_:
                await inbox.place(kv, t)

    anyio.run(go)


def read(url: str, ns: Namespace, stream: str, subject: str, types: Any, n: int = 1) -> list[Any]:
    async def go() -> list[Any]:
        async with inbox_kv(url, ns) as (bus, _):
            sub = await bus.js.pull_subscribe(subject, stream=stream)
            msgs = await sub.fetch(n, timeout=5)
            return [decoder_for(types).decode(m.data) for m in msgs]

    return anyio.run(go)


def test_claim_then_complete_through_the_cli(nats_url: str, ns: Namespace) -> None:
    late = datetime.now(UTC) - timedelta(minutes=20, seconds=30)
    setup(nats_url, ns, task(), task("COM-2/review/1", deadline=late))

    listed = hms(nats_url, ns, "task", "list", "--lane", "HUMAN:investigator", "--json")
    assert listed.exit_code == 0, listed.output
    row, overdue = json.loads(listed.stdout)
    assert overdue["task"] == "COM-2/review/1"
    assert (row["task"], row["claimed_by"], row["input"]) == (
        "COM-1/review/1",
        None,
        {"complaint": "robocall"},
    )

    assert hms(nats_url, ns, "task", "claim", "COM-1/review/1", "--by", "alice").exit_code == 0
    table = hms(nats_url, ns, "task", "list").stdout.splitlines()
    assert table[0].split() == [
        "TASK", "RUN", "STEP", "KIND", "LANE", "AGE", "DUE", "CLAIMED", "BY",
    ]  # fmt: skip
    assert table[1].split()[3] == "task"
    assert table[1].split()[-2:] == ["-", "alice"]  # no SLA; claimed
    late_by = table[2].split()[-3:]
    assert (late_by[0], late_by[1][:3], late_by[2]) == ("late", "20m", "-")

    refused = hms(nats_url, ns, "task", "complete", "COM-1/review/1", "--by", "bob")
    assert refused.exit_code == 1
    assert "claimed by alice" in refused.stderr

    done = hms(
        nats_url,
        ns,
        "task",
        "complete",
        "COM-1/review/1",
        "--by",
        "alice",
        "--data",
        '{"verdict": "fraud"}',
    )
    assert done.exit_code == 0, done.output
    [result] = read(nats_url, ns, ns.results_stream, ns.result(INVESTIGATOR), RESULT_TYPES)
    assert isinstance(result, TaskCompleted)
    assert (result.id, result.by, result.output, result.run) == (
        "COM-1/review/1/done",
        "alice",
        {"verdict": "fraud"},
        "COM-1",
    )
    [claim] = read(nats_url, ns, ns.commands_stream, ns.command("claim"), COMMAND_TYPES)
    assert isinstance(claim, ClaimTask)
    assert (claim.task, claim.by) == ("COM-1/review/1", "alice")
    assert [r["task"] for r in json.loads(hms(nats_url, ns, "task", "list", "--json").stdout)] == [
        "COM-2/review/1"
    ]


def test_fail_publishes_a_permanent_failure(nats_url: str, ns: Namespace) -> None:
    setup(nats_url, ns, task())
    out = hms(
        nats_url,
        ns,
        "task",
        "fail",
        "COM-1/review/1",
        "--by",
        "alice",
        "--reason",
        "duplicate",
        "--permanent",
    )
    assert out.exit_code == 0, out.output
    [failed] = read(nats_url, ns, ns.results_stream, ns.result(INVESTIGATOR), RESULT_TYPES)
    assert isinstance(failed, TaskFailed)
    assert (failed.error, failed.retryable, failed.by) == ("duplicate", False, "alice")


def test_an_unknown_task_is_one_line_and_exit_1(nats_url: str, ns: Namespace) -> None:
    setup(nats_url, ns)
    out = hms(nats_url, ns, "task", "claim", "COM-404/review/1", "--by", "alice")
    assert out.exit_code == 1
    assert out.stderr.splitlines() == [
        "hms: error: no task 'COM-404/review/1' in the inbox (finished, cancelled or never routed to a person)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["task", "complete", "COM-1/review/1", "--by", "a", "--data", "{oops"],
            "--data is not valid JSON",
        ),
        (
            ["task", "complete", "COM-1/review/1", "--by", "a", "--data", "[1]"],
            "--data must be a JSON object",
        ),
        (["task", "list", "--lane", "investigator"], "must look like KIND:name"),
        (
            ["task", "reassign", "COM-1/review/1", "--to", "AI:x", "--by", "a"],
            "reassign moves a task to people",
        ),
        (["route", "set", "AI:x", "--lane", "AI:x-v1=ninety"], "is not a whole number"),
        (["route", "set", "AI:x"], "give at least one --lane or a --backup"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    nats_url: str, ns: Namespace, args: list[str], message: str
) -> None:
    setup(nats_url, ns, task())
    out = hms(nats_url, ns, *args)
    assert out.exit_code == 2, out.output
    [line] = out.stderr.splitlines()
    assert message in line


def test_a_checkpoint_is_not_completed_as_a_task(nats_url: str, ns: Namespace) -> None:
    setup(nats_url, ns, task(kind="checkpoint"))
    out = hms(nats_url, ns, "task", "complete", "COM-1/review/1", "--by", "alice")
    assert out.exit_code == 2
    assert "hms approve" in out.stderr


def test_routes_set_show_list_delete(nats_url: str, ns: Namespace) -> None:
    setup(nats_url, ns)
    out = hms(
        nats_url,
        ns,
        "route",
        "set",
        "AI:fraud",
        "--lane",
        "AI:fraud-v1=90",
        "--lane",
        "AI:fraud-v2=10@spanish",
        "--backup",
        "HUMAN:fraud-desk",
        "--by",
        "ops",
    )
    assert out.exit_code == 0, out.output
    shown = json.loads(hms(nats_url, ns, "route", "show", "AI:fraud", "--json").stdout)
    assert shown["lanes"] == [
        {"lane": "AI:fraud-v1", "weight": 90, "skills": []},
        {"lane": "AI:fraud-v2", "weight": 10, "skills": ["spanish"]},
    ]
    assert shown["backup"] == "HUMAN:fraud-desk"
    listed = hms(nats_url, ns, "route", "list").stdout
    assert "AI:fraud-v1=90 AI:fraud-v2=10@spanish" in listed
    assert hms(nats_url, ns, "route", "delete", "AI:fraud").exit_code == 0
    gone = hms(nats_url, ns, "route", "show", "AI:fraud")
    assert gone.exit_code == 1
    assert "no routing entry for AI:fraud" in gone.stderr


def test_reroute_names_the_run_from_the_task(nats_url: str, ns: Namespace) -> None:
    setup(nats_url, ns)
    out = hms(
        nats_url,
        ns,
        "task",
        "reroute",
        "COM-5/triage/2",
        "--to",
        "AI:backup",
        "--by",
        "ops",
        "--reason",
        "stuck",
    )
    assert out.exit_code == 0, out.output
    [cmd] = read(nats_url, ns, ns.commands_stream, ns.command("reroute"), COMMAND_TYPES)
    assert (cmd.run, cmd.task, cmd.to, cmd.by, cmd.reason) == (
        "COM-5",
        "COM-5/triage/2",
        "AI:backup",
        "ops",
        "stuck",
    )
