"""A running system for CLI tests: a real server, the topology, a dispatcher, and the
real `hms` app invoked through typer's runner.

The CLI runs each command on its own event loop (`anyio.run`), so CLI tests are
synchronous and the dispatcher runs on an event loop of its own, in a portal thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from typer.testing import CliRunner, Result

import hms_bus.cli as cli
from actors.dispatcher import Dispatcher
from hms_bus.client import Client, open_client
from hms_bus.metrics import Metrics
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology

__all__ = ["System", "cli_system"]


@dataclass
class System:
    url: str
    ns: Namespace
    portal: BlockingPortal
    client: Client  # lives on the portal's event loop: use it through `portal.call`

    def hms(self, *args: str) -> Result:
        return CliRunner().invoke(cli.app, ["--url", self.url, "--root", self.ns.root, *args])


@asynccontextmanager
async def _running(url: str, ns: Namespace) -> AsyncIterator[Client]:
    async with open_client(url, root=ns.root) as client:
        await ensure_topology(client.bus.js, client.bus.settings)
        async with anyio.create_task_group() as tg:
            await tg.start(Dispatcher(client.bus, Metrics.create()).run)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()  # stop() would wait out a 2 s long-poll


@contextmanager
def cli_system(url: str, ns: Namespace) -> Iterator[System]:
    """The system on the server at `url`, in namespace `ns`, until the block ends."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(_running(url, ns)) as client,
    ):
        yield System(url, ns, portal, client)
