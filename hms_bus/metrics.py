"""Prometheus metrics of a daemon, on an injected `CollectorRegistry`.

One `Metrics` object per process holds every family, so a test builds its own
registry and reads exact values, and two daemons in one process (`hms up`) never
collide. Label values come from bounded sets: consumer durables, outcomes, actor
names; never run ids.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["OUTCOMES", "PREFERRED_PORT", "Metrics", "serve_metrics"]

log = logging.getLogger(__name__)

#: What the consume loop did with a message.
OUTCOMES = ("ack", "nak", "dead_letter")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    messages: Counter
    handler_seconds: Histogram
    redeliveries: Counter
    dead_letters: Counter
    in_flight: Gauge
    connected: Gauge
    heartbeats: Counter
    cas_conflicts: Counter

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
        )


#: The port a daemon prefers when none is configured (Prometheus' exporter range).
PREFERRED_PORT = 9464


def serve_metrics(metrics: Metrics, port: int | None, addr: str = "0.0.0.0") -> WSGIServer | None:
    """Serve `/metrics` (all interfaces by default: Prometheus scrapes from another
    host). `port` None: 9464 if free, else any free port; 0: any free port; -1: off.
    A configured port that is taken raises `OSError`. The caller shuts it down."""
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
