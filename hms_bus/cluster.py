"""A JetStream cluster of real `nats-server` processes on loopback.

`hms up --cluster 3` (later) and the tests' `cluster3` fixture use it: N servers
routed to each other, ready once the JetStream meta leader sees every peer as
current; any one can be SIGKILLed and brought back on the same ports and store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from hms_bus.errors import ServerError
from hms_bus.server import HOST, ClusterSettings, NatsServer, PortInUseError, free_ports

__all__ = ["NatsCluster"]

log = logging.getLogger(__name__)


class NatsCluster:
    """`size` JetStream servers on loopback, routed to each other, named `<name>-<i>`.

    Route ports are chosen up front (each server must name its peers'), so another
    process may take one first: `start()` then retries with fresh ports. Readiness comes
    from the monitoring endpoints, not a client, so any auth or TLS in `config` is fine.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        size: int = 3,
        name: str = "hms",
        config: Path | str | Mapping[str, Any] | None = None,
        binary: Path | str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        if size < 1:
            raise ServerError(f"a cluster needs at least one server, not {size}")
        self.base_dir = Path(base_dir)
        self.name = name
        self.size = size
        self.ready_timeout = ready_timeout
        self._config = config
        self._binary = binary
        self.servers: list[NatsServer] = []
        self._layout(free_ports(size))

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def index_of(self, server_name: str) -> int:
        """The index of the server called `server_name` (as JetStream reports leaders)."""
        for index, server in enumerate(self.servers):
            if server.server_name == server_name:
                return index
        raise ServerError(f"no server named {server_name!r} in cluster {self.name}")

    def start(self, attempts: int = 3) -> Self:
        """Start every server and wait until the cluster has formed."""
        for attempt in range(1, attempts + 1):
            try:
                for server in self.servers:
                    server.start()
                self.wait_formed()
                return self
            except PortInUseError as error:
                self.stop()
                if attempt == attempts:
                    raise
                log.info("route port %d was taken; retrying with fresh ports", error.port)
                self._layout(free_ports(self.size))
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        # Signal all first: a clean JetStream shutdown takes a moment, let them overlap.
        for server in self.servers:
            server._signal(hard=False)
        for server in self.servers:
            server._reap(server.stop_timeout)

    def kill_server(self, index: int) -> None:
        self.servers[index].kill()

    def start_server(self, index: int) -> None:
        """Restart one server on its old ports and store, and wait until it has rejoined."""
        self.servers[index].start()
        self.wait_formed()

    def wait_formed(self, timeout: float | None = None) -> None:
        """Wait until every running server is healthy and the meta leader sees them current."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                problem = self._formation_problem()
            except ServerError as error:  # a monitoring endpoint not up yet: not formed yet
                problem = str(error)
            if problem is None:
                break
            if time.monotonic() >= deadline:
                raise ServerError(f"cluster {self.name} did not form within {limit:g} s: {problem}")
            time.sleep(0.05)
        log.info("cluster %s formed: %s", self.name, ", ".join(self.urls))

    def __enter__(self) -> Self:
        return self if all(server.running for server in self.servers) else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _layout(self, route_ports: Sequence[int]) -> None:
        routes = [f"nats://{HOST}:{port}" for port in route_ports]
        self.servers = [
            NatsServer(
                self.base_dir / f"{self.name}-{index}",
                server_name=f"{self.name}-{index}",
                cluster=ClusterSettings(
                    self.name, port, tuple(r for r in routes if r != routes[index])
                ),
                config=self._config,
                monitor_port=0,
                binary=self._binary,
            )
            for index, port in enumerate(route_ports)
        ]

    def _formation_problem(self) -> str | None:
        running = [server for server in self.servers if server.running]
        if not running:
            return "no server is running"
        for server in running:
            status, body = server.monitoring("healthz")
            if status != 200:
                return f"{server.server_name} unhealthy: {body.get('error', body)}"
        meta = running[0].monitoring("jsz")[1].get("meta_cluster") or {}
        leader_name = meta.get("leader")
        if not leader_name:
            return "no JetStream meta leader yet"
        leader = self.servers[self.index_of(leader_name)]
        if not leader.running:
            return f"meta leader {leader_name} is down; waiting for an election"
        meta = leader.monitoring("jsz")[1].get("meta_cluster") or {}
        current = {peer["name"] for peer in meta.get("replicas", []) if peer.get("current")}
        missing = [
            str(s.server_name) for s in running if s is not leader and s.server_name not in current
        ]
        if meta.get("cluster_size") != self.size or missing:
            return f"meta leader {leader_name} does not see {missing or 'all peers'} as current"
        return None
