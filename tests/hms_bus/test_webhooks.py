"""The webhook notifier against a real NATS server and a real HTTP receiver on
loopback: what it posts, what it retries, what it gives up on."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import msgspec
import pytest
from typer.testing import CliRunner

import hms_bus.cli as cli
from hms_bus import dead_letters
from hms_bus.connection import Bus
from hms_bus.errors import InvalidNameError
from hms_bus.messages import Notify
from hms_bus.notify import NotifierRunner
from hms_bus.subjects import Namespace
from hms_bus.webhooks import webhook_notifier
from tests.helpers import bus_for, eventually


@dataclass
class Receiver:
    """An HTTP endpoint that records each POST and answers the next status queued."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@contextmanager
def receiver() -> Iterator[Receiver]:
    box = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            box.got.append((dict(self.headers), body))
            status = box.answers.pop(0) if box.answers else 200
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"no such hook" if status == 404 else b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/desk"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@asynccontextmanager
async def serving(bus: Bus, url: str, form: str = "json") -> AsyncIterator[None]:
    runner = NotifierRunner(bus, webhook_notifier("slack", url, form=form, timeout=5))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        try:
            yield
        finally:
            runner.stop()


def note(n: int) -> Notify:
    return Notify(id=f"n-{n}", channel="slack:#desk", run="FTC-1", text=f"review late {n}")


async def test_each_notification_is_posted_as_json_with_its_id(
    nats_url: str, ns: Namespace
) -> None:
    with receiver() as hook:
        async with bus_for(nats_url, ns) as bus, serving(bus, hook.url):
            await bus.publish(ns.notify("slack"), note(1))
            await eventually(lambda: len(hook.got) == 1, what="the POST")

    headers, body = hook.got[0]
    assert msgspec.json.decode(body, type=Notify) == note(1)
    assert headers["Idempotency-Key"] == "n-1"
    assert headers["Content-Type"] == "application/json"


async def test_text_format_and_a_busy_receiver_is_tried_again(nats_url: str, ns: Namespace) -> None:
    with receiver() as hook:
        hook.answers[:] = [503]
        async with bus_for(nats_url, ns) as bus, serving(bus, hook.url, "text"):
            await bus.publish(ns.notify("slack"), note(2))
            await eventually(lambda: len(hook.got) == 2, timeout=20, what="the retry")
            letters = await dead_letters.letters(bus)

    assert [json.loads(body) for _, body in hook.got] == [
        {"text": "slack:#desk: review late 2"}
    ] * 2
    assert letters == []


async def test_a_refusing_receiver_sends_the_notification_to_the_dead_letters(
    nats_url: str, ns: Namespace
) -> None:
    with receiver() as hook:
        hook.answers[:] = [404]
        async with bus_for(nats_url, ns) as bus, serving(bus, hook.url):
            await bus.publish(ns.notify("slack"), note(3))
            [letter] = await eventually(lambda: dead_letters.letters(bus), what="a dead letter")

    assert len(hook.got) == 1  # not retried: a wrong hook does not mend itself
    assert letter.reason == "webhook answered 404 Not Found: no such hook"
    assert letter.subject == ns.notify("slack")


def test_bad_urls_and_formats_are_refused() -> None:
    with pytest.raises(InvalidNameError, match="give an http:// or https:// URL"):
        webhook_notifier("slack", "hooks.example/x")
    with pytest.raises(InvalidNameError, match="one of json, text"):
        webhook_notifier("slack", "https://hooks.example/x", form="xml")  # type: ignore[arg-type]
    result = CliRunner().invoke(cli.app, ["notifier", "run", "slack", "--webhook", "ftp://x"])
    assert result.exit_code == 2
    assert "webhook URL 'ftp://x'" in result.stderr
