"""`hms dlq list|show|replay|drop` on the real app, against a real server with the
dispatcher running: a run started before its workflow was applied is dead-lettered,
read, and put back once the workflow is there."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hms_bus import dead_letters
from hms_bus.subjects import Namespace
from tests.helpers import eventually
from tests.hms_bus.cli_system import System, cli_system

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
START = '{"type":"StartRun","id":"s-1","workflow":"ftc-complaint","key":"k-1","payload":{"n":1}}'


@pytest.fixture
def system(nats_url: str, ns: Namespace) -> Iterator[System]:
    with cli_system(nats_url, ns) as running:
        yield running


def _wait_for_letters(system: System, count: int) -> None:
    """Until the DLQ holds `count` letters (read through the library, on the portal)."""

    async def held() -> bool:
        return len(await dead_letters.letters(system.client.bus)) == count

    system.portal.call(lambda: eventually(held, what=f"{count} dead letters"))


def _letters(system: System) -> list[dict[str, object]]:
    result = system.hms("dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    letters: list[dict[str, object]] = json.loads(result.stdout)
    return letters


def test_a_start_before_its_workflow_is_read_and_replayed(system: System) -> None:
    ns = system.ns
    system.portal.call(system.client.bus.js.publish, ns.command("start"), START.encode())
    _wait_for_letters(system, 1)
    listed = _letters(system)
    seq = str(listed[0]["seq"])
    table = system.hms("dlq", "list")
    shown = system.hms("dlq", "show", seq)
    applied = system.hms("workflow", "apply", str(EXAMPLES / "ftc-complaint.yaml"))
    replayed = system.hms("dlq", "replay", seq)
    run = system.portal.call(
        lambda: eventually(lambda: system.client.run_for_key("k-1"), what="the run started")
    )
    empty = system.hms("dlq", "list")
    again = system.hms("dlq", "replay", seq)

    assert len(listed) == 1
    letter = listed[0]
    assert letter["stream"] == ns.commands_stream
    assert letter["subject"] == ns.command("start")
    assert "unknown workflow 'ftc-complaint'" in str(letter["reason"])
    assert json.loads(str(letter["body"]))["key"] == "k-1"
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].split() == [
        "SEQ", "AGE", "FROM", "SUBJECT", "DELIVERED", "REASON",
    ]  # fmt: skip
    assert re.match(rf"{seq}\s+\d+s\s+{ns.commands_stream}#\d+\s+{re.escape(ns.command('start'))}",
                    table.stdout.splitlines()[1])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert f"subject: {ns.command('start')}" in shown.stdout
    assert '"workflow": "ftc-complaint"' in shown.stdout  # the body, as indented JSON
    assert applied.exit_code == 0, applied.output
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout.startswith(f"{seq}: replayed on {ns.command('start')} ")
    assert run is not None
    assert run.startswith("FTC-")
    assert empty.stdout == "no dead letters\n"
    assert (again.exit_code, again.stderr) == (
        1,
        f"hms: error: no dead letter {seq} in {ns.dlq_stream}\n",
    )


def test_drop_and_replay_all(system: System) -> None:
    ns = system.ns
    for n in range(3):
        system.portal.call(
            system.client.bus.js.publish, ns.command("pause"), f"garbage {n}".encode()
        )
    _wait_for_letters(system, 3)
    letters = _letters(system)
    first = str(letters[0]["seq"])
    limited = system.hms("dlq", "list", "--limit", "2")
    shown = system.hms("dlq", "show", first)
    dropped = system.hms("dlq", "drop", first, "999")
    replayed = system.hms("dlq", "replay", "--all", "--stream", ns.commands_stream)
    # garbage stays garbage: the dispatcher dead-letters the replays again
    _wait_for_letters(system, 2)
    left = _letters(system)

    assert [str(x["reason"]).split(":")[0] for x in letters] == ["undecodable"] * 3
    assert limited.stdout.splitlines()[-1] == "(more not shown: --limit 2)"
    assert len(limited.stdout.splitlines()) == 4  # header, two letters, the note
    assert "body:\ngarbage 0\n" in shown.stdout
    assert dropped.exit_code == 1
    assert dropped.stdout == f"{first}: dropped\n"
    assert dropped.stderr == f"hms: error: no dead letter 999 in {ns.dlq_stream}\n"
    assert replayed.exit_code == 0, replayed.output
    assert len(replayed.stdout.splitlines()) == 2
    assert sorted(str(x["body"]) for x in left) == [
        "garbage 1",
        "garbage 2",
    ]
    assert all(int(str(x["seq"])) > int(str(letters[-1]["seq"])) for x in left)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("replay",), "give letter sequences, or --all (not both)"),
        (("replay", "1", "--all"), "give letter sequences, or --all (not both)"),
        (("replay", "1", "--stream", "S"), "--stream goes with --all"),
        (("list", "--stream", "bad.name"), "stream name"),
    ],
)
def test_bad_arguments_exit_2_saying_what(
    system: System, args: tuple[str, ...], message: str
) -> None:
    result = system.hms("dlq", *args)

    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "name"),
    [(("show", "0"), "'seq'"), (("drop", "0"), "'seqs'"), (("list", "--limit", "0"), "'--limit'")],
)
def test_out_of_range_numbers_are_refused_by_the_parser(
    system: System, args: tuple[str, ...], name: str
) -> None:
    result = system.hms("dlq", *args)

    assert result.exit_code == 2
    assert f"Invalid value for {name}: Input should be greater than or equal to 1" in (
        result.stderr
    )
