"""Prometheus metrics of a daemon, on an injected `CollectorRegistry`.

One `Metrics` object per process holds every family, so a test builds its own
registry and reads exact values, and two daemons in one process (`hms up`) never
collide. Label values come from bounded sets: consumer durables, outcomes, actor
names, lanes; never run ids.

What each daemon exports about itself:
- the consume loop (`hms_bus.consume`): messages by consumer and outcome, handler
  latency, redeliveries, dead letters by reason, in-flight messages;
- the daemon (`hms_bus.daemon`): connection state (`hms_nats_connected`, reconnects),
  heartbeats written, and every few seconds the consumers' backlog as the server
  sees it (`hms_consumer_pending`, `hms_consumer_ack_pending`) for the durables its
  consume loops bound (`watch_consumer`);
- actors: compare-and-set conflicts here; an actor with metrics of its own registers
  them once per registry with `family()` (the SLA timer: timers armed, firings,
  lateness; the worker runner: tasks by lane and outcome).

The business statistics (runs, first response, SLA breaches, lanes, clerks) are not
a daemon's own: the ledger derives them into the stats bucket (`hms_bus.stats`) and
`hms_bus.stats_export` exports that bucket, with the heartbeats it sees.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "DEFAULT_ADDR",
    "OUTCOMES",
    "PREFERRED_PORT",
    "Metrics",
    "serve_metrics",
]

log = logging.getLogger(__name__)

#: What the consume loop did with a message.
OUTCOMES = ("ack", "nak", "dead_letter")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

F = TypeVar("F")


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    messages: Counter
    handler_seconds: Histogram
    redeliveries: Counter
    dead_letters: Counter
    in_flight: Gauge
    connected: Gauge
    reconnects: Counter
    heartbeats: Counter
    cas_conflicts: Counter
    consumer_pending: Gauge
    consumer_ack_pending: Gauge
    #: (stream, durable) of every consumer a consume loop of this process bound.
    consumers: set[tuple[str, str]] = field(default_factory=set)
    _extra: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        reg = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=reg,
            messages=Counter(
                "hms_messages_total",
                "Messages handled, by consumer and outcome",
                ["consumer", "outcome"],
                registry=reg,
            ),
            handler_seconds=Histogram(
                "hms_handler_seconds",
                "Time spent handling one message",
                ["consumer"],
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            redeliveries=Counter(
                "hms_redeliveries_total",
                "Messages delivered more than once",
                ["consumer"],
                registry=reg,
            ),
            dead_letters=Counter(
                "hms_dead_letters_total",
                "Messages terminated and copied to the dead-letter subject",
                ["consumer", "reason"],
                registry=reg,
            ),
            in_flight=Gauge(
                "hms_in_flight",
                "Messages being handled now",
                ["consumer"],
                registry=reg,
            ),
            connected=Gauge(
                "hms_nats_connected",
                "1 while the NATS connection is up",
                ["actor"],
                registry=reg,
            ),
            reconnects=Counter(
                "hms_nats_reconnects_total",
                "Times the NATS connection was re-established",
                ["actor"],
                registry=reg,
            ),
            heartbeats=Counter(
                "hms_heartbeats_total",
                "Health heartbeats written",
                ["actor"],
                registry=reg,
            ),
            cas_conflicts=Counter(
                "hms_cas_conflicts_total",
                "Compare-and-set writes that lost a race and retried",
                ["actor"],
                registry=reg,
            ),
            consumer_pending=Gauge(
                "hms_consumer_pending",
                "Messages in the stream not yet delivered to this durable (the server's view)",
                ["consumer"],
                registry=reg,
            ),
            consumer_ack_pending=Gauge(
                "hms_consumer_ack_pending",
                "Messages delivered to this durable and not yet acknowledged",
                ["consumer"],
                registry=reg,
            ),
        )

    def watch_consumer(self, stream: str, durable: str) -> None:
        """Have the daemon refresh this durable's pending counts (bounded: a process
        binds a fixed set of durables)."""
        self.consumers.add((stream, durable))

    def set_pending(self, durable: str, pending: int, ack_pending: int) -> None:
        self.consumer_pending.labels(durable).set(pending)
        self.consumer_ack_pending.labels(durable).set(ack_pending)

    def family(self, key: str, build: Callable[[CollectorRegistry], F]) -> F:
        """The metric family (or dict of families) registered under `key`, built on this
        registry on first use: an actor's own metrics, shared by its replicas in one
        process (registering a name twice on one registry is an error)."""
        with self._lock:
            found = self._extra.get(key)
            if found is None:
                found = self._extra[key] = build(self.registry)
            return found


#: The port a daemon prefers when none is configured (Prometheus' exporter range).
PREFERRED_PORT = 9464

#: Loopback by default; containers set `HMS_METRICS_ADDR=0.0.0.0` so Prometheus can
#: reach them from another host.
DEFAULT_ADDR = "127.0.0.1"


def serve_metrics(
    metrics: Metrics, port: int | None, addr: str = DEFAULT_ADDR
) -> WSGIServer | None:
    """Serve `/metrics` on `addr`. `port` None: 9464 if free, else any free port; 0:
    any free port; -1: off. A configured port that is taken raises `OSError`. The
    caller shuts it down."""
    if port is not None and port < 0:
        return None
    try:
        server, _thread = start_http_server(
            PREFERRED_PORT if port is None else port, addr=addr, registry=metrics.registry
        )
    except OSError as exc:
        if port is not None or exc.errno != errno.EADDRINUSE:
            raise
        server, _thread = start_http_server(0, addr=addr, registry=metrics.registry)
        log.info("metrics port %d is taken; using %d", PREFERRED_PORT, server.server_port)
    log.info("metrics on %s:%d/metrics", addr, server.server_port)
    return server
