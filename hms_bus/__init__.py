"""hms-bus: a workflow orchestrator for public-service desks over NATS JetStream.

The public names, for publishers, clerks, supervisors and worker authors:

    from hms_bus import open_client, lane, TaskContext

    async with open_client("nats://127.0.0.1:4222") as client:
        ticket = await client.enqueue("ftc-complaint", {"complaintId": "C-42"})

    @lane("AI:fraud-labeler")
    async def label(task, ctx: TaskContext) -> dict:
        return {"severity": "High"}

Names are resolved on first use (PEP 562), so `import hms_bus.workflow` (the pure
engine and the language) loads no NATS client at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hms_bus.client import Client, open_client
    from hms_bus.connection import Bus, open_bus
    from hms_bus.consume import ConsumeLoop
    from hms_bus.daemon import Daemon
    from hms_bus.errors import (
        ConfigError,
        HmsError,
        NotFoundError,
        PermanentError,
        RetryLater,
    )
    from hms_bus.server import NatsServer
    from hms_bus.settings import Settings, load_settings
    from hms_bus.subjects import Lane, Namespace
    from hms_bus.topology import ensure_topology
    from hms_bus.worker import (
        PermanentTaskError,
        TaskContext,
        Worker,
        lane,
        open_worker,
        run_worker,
    )

__all__ = [
    "Bus",
    "Client",
    "ConfigError",
    "ConsumeLoop",
    "Daemon",
    "HmsError",
    "Lane",
    "Namespace",
    "NatsServer",
    "NotFoundError",
    "PermanentError",
    "PermanentTaskError",
    "RetryLater",
    "Settings",
    "TaskContext",
    "Worker",
    "ensure_topology",
    "lane",
    "load_settings",
    "open_bus",
    "open_client",
    "open_worker",
    "run_worker",
]

_HOME = {
    "Bus": "connection",
    "Client": "client",
    "ConfigError": "errors",
    "ConsumeLoop": "consume",
    "Daemon": "daemon",
    "HmsError": "errors",
    "Lane": "subjects",
    "Namespace": "subjects",
    "NatsServer": "server",
    "NotFoundError": "errors",
    "PermanentError": "errors",
    "PermanentTaskError": "worker",
    "RetryLater": "errors",
    "Settings": "settings",
    "TaskContext": "worker",
    "Worker": "worker",
    "ensure_topology": "topology",
    "lane": "worker",
    "load_settings": "settings",
    "open_bus": "connection",
    "open_client": "client",
    "open_worker": "worker",
    "run_worker": "worker",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'hms_bus' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hms_bus.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
