"""The actor daemons of hms-bus, by the name `hms actor run <name>` takes.

Each module opens with "Consumes ... / Emits ... / Owns ...". `REGISTRY` maps an
actor's name to the factory that builds it on a live bus; `hms up` runs them all,
`hms check` expects a heartbeat from each. Actors arrive one capability at a time:
an actor is listed here only once it exists.
"""

from __future__ import annotations

from actors.dispatcher import Dispatcher
from actors.ledger import Ledger
from actors.router import Router
from actors.sla_timer import SlaTimer
from hms_bus.daemon import ActorFactory

__all__ = ["REGISTRY"]

REGISTRY: dict[str, ActorFactory] = {
    "dispatcher": Dispatcher,
    "router": Router,
    "sla-timer": SlaTimer,
    "ledger": Ledger,
}
