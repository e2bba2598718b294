"""Fixtures for the whole suite: real nats-servers on loopback and a fresh namespace per test.

- `nats_server` / `nats_url`: one server for the session (random port, temp store).
  It is a sync fixture so that it does not depend on pytest-asyncio's loop scopes.
- `ns`: a `Namespace` with a unique root, so each test has its own streams and buckets
  on the shared server; isolation comes from names, never from flushing shared state.
- `nc`: a nats-py connection to the session server, drained after the test.
- `own_server`: a server of the test's own, for tests that kill and restart it.
- `cluster3`: a 3-server JetStream cluster on loopback, per test, because the tests
  that use it kill servers (it forms in well under a second).

Every process is started through a context manager, so it is stopped at teardown
whether the test passed or not.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from hms_bus.cluster import NatsCluster
from hms_bus.server import NatsServer
from hms_bus.subjects import Namespace


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def ns() -> Namespace:
    return Namespace(f"t{secrets.token_hex(4)}")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url, connect_timeout=2, allow_reconnect=False)
    try:
        yield client
    finally:
        if not client.is_closed:
            await client.drain()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "own-nats") as server:
        yield server


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster", size=3) as cluster:
        yield cluster
