"""What the JetStream topology is, as data: every stream, durable consumer and KV
bucket under one namespace root (`declare()`), with the limits chosen for each.

`hms_bus.topology` creates or updates them from this declaration; `subjects.md` is
checked against it and `hms check` says from it exactly what is missing. The choices
behind the limits are listed in `hms_bus.topology`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from hms_bus.subjects import Namespace

__all__ = [
    "DAY",
    "DUPLICATE_WINDOW",
    "BucketSpec",
    "ConsumerSpec",
    "StreamSpec",
    "Topology",
    "declare",
]

DAY = 86_400.0
DUPLICATE_WINDOW = 120.0


@dataclass(frozen=True)
class StreamSpec:
    kind: str
    name: str
    subjects: tuple[str, ...]
    retention: str  # "limits" | "workqueue"
    max_age: float  # seconds, 0 = forever
    description: str
    deny_delete: bool = False
    deny_purge: bool = False
    #: Published from outside (portals, clients, workers): messages over
    #: `max_payload` are refused. The other streams are bounded by the server's own
    #: max_payload only, since what they carry grows from those inputs.
    external: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    ack_wait: float
    max_deliver: int
    description: str
    max_ack_pending: int = 10_000


@dataclass(frozen=True)
class BucketSpec:
    kind: str
    name: str
    history: int
    ttl: float  # seconds, 0 = forever
    description: str


@dataclass(frozen=True)
class Topology:
    streams: tuple[StreamSpec, ...]
    consumers: tuple[ConsumerSpec, ...]
    buckets: tuple[BucketSpec, ...]


def declare(ns: Namespace) -> Topology:
    """Everything the system needs under one namespace root."""
    week = 7 * DAY
    streams = (
        StreamSpec(
            "events",
            ns.events_stream,
            (ns.events_all,),
            "limits",
            week,
            "business events from portals; they start runs",
            external=True,
        ),
        StreamSpec(
            "commands",
            ns.commands_stream,
            (ns.commands_all,),
            "limits",
            week,
            "operator and client commands to the dispatcher",
            external=True,
        ),
        StreamSpec(
            "results",
            ns.results_stream,
            (ns.results_all,),
            "limits",
            week,
            "task results, failures and progress from workers",
            external=True,
        ),
        StreamSpec(
            "route",
            ns.route_stream,
            (ns.route_all,),
            "workqueue",
            0,
            "route requests and task cancellations, dispatcher to router",
        ),
        StreamSpec(
            "tasks",
            ns.tasks_stream,
            (ns.tasks_all,),
            "workqueue",
            0,
            "lanes: one subject per lane, one durable per lane",
        ),
        StreamSpec(
            "timers",
            ns.timers_stream,
            (ns.timers_all,),
            "limits",
            week,
            "timer arm/disarm requests and firings: the SLA timer's log, read from its latest snapshot",
        ),
        StreamSpec(
            "audit",
            ns.audit_stream,
            (ns.audit_all,),
            "limits",
            week,
            "facts from every actor, before the ledger chains them",
        ),
        StreamSpec(
            "ledger",
            ns.ledger_stream,
            (ns.ledger_all,),
            "limits",
            0,
            "the hash-chained ledger, one subject per run",
            deny_delete=True,
            deny_purge=True,
        ),
        StreamSpec(
            "notify",
            ns.notify_stream,
            (ns.notify_all,),
            "limits",
            week,
            "notifications, one subject per channel kind",
        ),
        StreamSpec(
            "dlq",
            ns.dlq_stream,
            (ns.dlq_all,),
            "limits",
            30 * DAY,
            "dead letters, with the reason in headers",
        ),
        # Advisories are core NATS: captured here so that a lane task that exhausted
        # its deliveries while the router was down is still turned into a failure.
        StreamSpec(
            "advisories",
            ns.advisories_stream,
            (ns.max_deliveries_advisory(ns.tasks_stream),),
            "limits",
            week,
            "max-deliveries advisories of lane consumers",
        ),
    )
    consumers = (
        ConsumerSpec(
            ns.events_stream,
            ns.durable("dispatcher", "events"),
            (ns.events_all,),
            30.0,
            5,
            "dispatcher: events start runs",
        ),
        ConsumerSpec(
            ns.commands_stream,
            ns.durable("dispatcher", "commands"),
            (ns.commands_all,),
            30.0,
            5,
            "dispatcher: commands",
        ),
        ConsumerSpec(
            ns.results_stream,
            ns.durable("dispatcher", "results"),
            (ns.results_all,),
            30.0,
            5,
            "dispatcher: task results",
        ),
        ConsumerSpec(
            ns.timers_stream,
            ns.durable("dispatcher", "timers"),
            (ns.timer("fired"),),
            30.0,
            5,
            "dispatcher: timer firings",
        ),
        ConsumerSpec(
            ns.route_stream,
            ns.durable("router", "route"),
            (ns.route_all,),
            30.0,
            5,
            "router: route requests",
        ),
        ConsumerSpec(
            ns.advisories_stream,
            ns.durable("router", "advisories"),
            (ns.max_deliveries_advisory(ns.tasks_stream),),
            30.0,
            5,
            "router: lane tasks that exhausted their deliveries",
        ),
        ConsumerSpec(
            ns.audit_stream,
            ns.durable("ledger", "audit"),
            (ns.audit_all,),
            30.0,
            5,
            "ledger: facts to chain",
        ),
    )
    buckets = (
        BucketSpec("runs", ns.runs_bucket, 1, 0, "run state, written only by the dispatcher"),
        BucketSpec("workflows", ns.workflows_bucket, 1, 0, "workflow definitions by version"),
        BucketSpec("routes", ns.routes_bucket, 5, 0, "the routing table, owned by the router"),
        BucketSpec("workers", ns.workers_bucket, 1, 15.0, "live workers: lane, version, capacity"),
        BucketSpec("health", ns.health_bucket, 1, 15.0, "actor heartbeats"),
        BucketSpec("stats", ns.stats_bucket, 1, 0, "statistics derived by the ledger"),
        BucketSpec("inbox", ns.inbox_bucket, 1, 0, "human tasks waiting for a clerk, with claims"),
        BucketSpec(
            "timer_leases",
            ns.timer_leases_bucket,
            1,
            5.0,
            "SLA timer: partition leases and live members",
        ),
    )
    return Topology(streams, consumers, buckets)
