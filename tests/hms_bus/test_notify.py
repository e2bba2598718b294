"""Notifiers (`hms_bus.notify`) against a real server: each notifier gets the
notifications of its own channel kind, once each; one that raises gets the
notification again; a notification before the first notifier started is not
replayed to it; and the channel-kind rule matches the dispatcher's subjects."""

from __future__ import annotations

import anyio
import pytest

from hms_bus.connection import Bus
from hms_bus.messages import Notify
from hms_bus.notify import NotifierRunner, channel_kind, kinds_of, log_notifier, notifier
from hms_bus.subjects import Namespace
from tests.helpers import bus_for, eventually


def note(n: int, channel: str) -> Notify:
    return Notify(id=f"R-{n}/note", channel=channel, run=f"R-{n}", text=f"note {n}")


async def send(bus: Bus, *notes: Notify) -> None:
    await bus.publish_all((bus.ns.notify(channel_kind(n.channel)), n) for n in notes)


def test_the_channel_kind_is_the_scheme_or_other() -> None:
    assert channel_kind("slack:#ops-alerts") == "slack"
    assert channel_kind("sms:+15551234") == "sms"
    assert channel_kind("pager.duty:x") == "other"  # not a subject token
    assert kinds_of(["email:a@b", "slack:#x", "email:c@d"]) == ["email", "slack"]


def test_a_channel_kind_must_be_a_subject_token() -> None:
    with pytest.raises(ValueError, match="channel kind"):
        notifier("slack.ops")


async def test_each_notifier_gets_its_kinds_notifications_once(
    nats_url: str, ns: Namespace
) -> None:
    slack: list[Notify] = []
    sms: list[Notify] = []

    @notifier("slack")
    async def post(n: Notify) -> None:
        slack.append(n)

    @notifier("sms")
    async def text(n: Notify) -> None:
        sms.append(n)

    async with bus_for(nats_url, ns) as bus, anyio.create_task_group() as tg:
        runners = [NotifierRunner(bus, post), NotifierRunner(bus, text)]
        for runner in runners:
            await tg.start(runner.run)
        await send(bus, note(1, "slack:#ops"), note(2, "sms:+1555"), note(3, "slack:#desk"))
        await send(bus, note(1, "slack:#ops"))  # the same id again: stored once
        await eventually(lambda: len(slack) == 2 and len(sms) == 1, timeout=10)
        # A later one, after which nothing more may have come for either.
        await send(bus, note(4, "sms:+1555"))
        await eventually(lambda: len(sms) == 2, timeout=10)
        for runner in runners:
            runner.stop()
    assert [n.text for n in slack] == ["note 1", "note 3"]
    assert [n.text for n in sms] == ["note 2", "note 4"]


async def test_a_notifier_that_raises_gets_the_notification_again(
    nats_url: str, ns: Namespace
) -> None:
    tries: list[str] = []

    @notifier("email")
    async def mail(n: Notify) -> None:
        tries.append(n.id)
        if len(tries) == 1:
            raise ConnectionError("smtp is down")

    async with bus_for(nats_url, ns) as bus, anyio.create_task_group() as tg:
        await send(bus, note(0, "email:old@example.gov"))  # before any notifier: not replayed
        runner = NotifierRunner(bus, mail)
        await tg.start(runner.run)
        await send(bus, note(1, "email:desk@example.gov"))
        await eventually(lambda: len(tries) == 2, timeout=20, what="the redelivery")
        runner.stop()
    assert tries == ["R-1/note", "R-1/note"]


async def test_the_log_notifier_logs_each_notification(
    nats_url: str, ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hms_bus.notify")
    async with bus_for(nats_url, ns) as bus, anyio.create_task_group() as tg:
        runner = NotifierRunner(bus, log_notifier("slack"))
        await tg.start(runner.run)
        await send(bus, note(7, "slack:#ftc-investigations"))
        await eventually(lambda: "note 7" in caplog.text, timeout=10, what="the log line")
        runner.stop()
    assert "notify slack:#ftc-investigations: note 7 (R-7)" in caplog.text
