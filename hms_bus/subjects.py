"""Every subject, stream, durable and bucket name of hms-bus, in one place.

Nothing else in the code base formats a subject string: it asks a `Namespace`.
`root` is a parameter so that each test (or each tenant) gets its own streams and
buckets on one server. `subjects.md` documents what this module declares, and a
test keeps the two equal.

Tokens (roots, event names, lane names, run ids) are validated: a `.` would add a
subject level, `*` and `>` are wildcards, and whitespace ends a subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hms_bus.errors import InvalidNameError

__all__ = ["ACTOR_KINDS", "ACTOR_NAMES", "Lane", "Namespace", "check_token"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

#: The kinds of worker a step can name: `AI:<name>`, `HUMAN:<role>`, `SVC:<name>`.
ACTOR_KINDS = ("AI", "HUMAN", "SVC")

#: The long-lived actor daemons, by the name `hms actor run <name>` takes.
ACTOR_NAMES = ("dispatcher", "router", "sla-timer", "ledger")


def check_token(value: str, what: str) -> str:
    """Return `value` if it is a valid single subject token, else raise."""
    if not _TOKEN.match(value):
        raise InvalidNameError(
            f"{what} {value!r} is not a valid name: use letters, digits, '-' and '_' only"
        )
    return value


@dataclass(frozen=True, slots=True)
class Lane:
    """A pool of workers for one actor kind and name, e.g. `AI:fraud-labeler`."""

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Lane:
        kind, sep, name = text.partition(":")
        if not sep or kind not in ACTOR_KINDS:
            raise InvalidNameError(
                f"lane {text!r} must look like KIND:name with KIND one of {', '.join(ACTOR_KINDS)}"
            )
        check_token(name, "lane name")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """Builds every name under one root (default `hms`)."""

    root: str = "hms"

    def __post_init__(self) -> None:
        check_token(self.root, "namespace root")

    # -- streams ---------------------------------------------------------------
    # Stream names carry the root so that several namespaces share one server.
    def stream(self, kind: str) -> str:
        return f"{self.root}_{kind.upper()}"

    @property
    def events_stream(self) -> str:
        return self.stream("events")

    @property
    def commands_stream(self) -> str:
        return self.stream("commands")

    @property
    def results_stream(self) -> str:
        return self.stream("results")

    @property
    def route_stream(self) -> str:
        return self.stream("route")

    @property
    def tasks_stream(self) -> str:
        return self.stream("tasks")

    @property
    def timers_stream(self) -> str:
        return self.stream("timers")

    @property
    def audit_stream(self) -> str:
        return self.stream("audit")

    @property
    def ledger_stream(self) -> str:
        return self.stream("ledger")

    @property
    def notify_stream(self) -> str:
        return self.stream("notify")

    @property
    def dlq_stream(self) -> str:
        return self.stream("dlq")

    @property
    def advisories_stream(self) -> str:
        return self.stream("advisories")

    # -- subjects --------------------------------------------------------------
    def event(self, name: str) -> str:
        return f"{self.root}.events.{check_token(name, 'event name')}"

    @property
    def events_all(self) -> str:
        return f"{self.root}.events.>"

    def command(self, verb: str) -> str:
        return f"{self.root}.cmd.{check_token(verb, 'command verb')}"

    @property
    def commands_all(self) -> str:
        return f"{self.root}.cmd.>"

    def result(self, lane: Lane) -> str:
        return f"{self.root}.result.{lane.kind}.{lane.name}"

    def results_of_kind(self, kind: str) -> str:
        """Results of every lane of one kind (`HUMAN`: what clerks may publish)."""
        if kind not in ACTOR_KINDS:
            raise InvalidNameError(f"actor kind {kind!r} is not one of {', '.join(ACTOR_KINDS)}")
        return f"{self.root}.result.{kind}.>"

    @property
    def router_result(self) -> str:
        """Where the router reports what the dispatcher must know (unroutable, routed late)."""
        return f"{self.root}.result.router"

    @property
    def results_all(self) -> str:
        return f"{self.root}.result.>"

    def route(self, verb: str = "request") -> str:
        return f"{self.root}.route.{check_token(verb, 'route verb')}"

    @property
    def route_all(self) -> str:
        return f"{self.root}.route.>"

    def task(self, lane: Lane) -> str:
        return f"{self.root}.task.{lane.kind}.{lane.name}"

    @property
    def tasks_all(self) -> str:
        return f"{self.root}.task.>"

    def cancel(self, lane: Lane) -> str:
        """Core NATS (not stored): tells a lane's workers to stop work on a task."""
        return f"{self.root}.cancel.{lane.kind}.{lane.name}"

    @property
    def cancels_all(self) -> str:
        return f"{self.root}.cancel.>"

    def timer(self, verb: str) -> str:
        """`arm`, `disarm` or `fired`."""
        return f"{self.root}.timer.{check_token(verb, 'timer verb')}"

    @property
    def timers_all(self) -> str:
        return f"{self.root}.timer.>"

    def audit(self, source: str) -> str:
        """Facts published by one actor (`dispatcher`, `router`, ...)."""
        return f"{self.root}.audit.{check_token(source, 'audit source')}"

    @property
    def audit_all(self) -> str:
        return f"{self.root}.audit.>"

    def ledger(self, run_id: str) -> str:
        return f"{self.root}.ledger.{check_token(run_id, 'run id')}"

    @property
    def ledger_all(self) -> str:
        return f"{self.root}.ledger.>"

    def notify(self, channel_kind: str) -> str:
        """One subject per channel kind: `slack`, `sms`, `email`, ..."""
        return f"{self.root}.notify.{check_token(channel_kind, 'channel kind')}"

    @property
    def notify_all(self) -> str:
        return f"{self.root}.notify.>"

    def dlq(self, source_stream: str) -> str:
        """Dead letters taken off one stream, with the reason in headers."""
        return f"{self.root}.dlq.{check_token(source_stream, 'stream name')}"

    @property
    def dlq_all(self) -> str:
        return f"{self.root}.dlq.>"

    def max_deliveries_advisory(self, stream: str, durable: str = "*") -> str:
        """The server's advisory when a message exhausts a consumer's max_deliver."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"

    # -- durable consumers -----------------------------------------------------
    def durable(self, actor: str, stream_kind: str) -> str:
        """The durable an actor's replicas share on one stream, e.g. `dispatcher-events`."""
        return f"{check_token(actor, 'actor')}-{check_token(stream_kind, 'stream kind')}"

    def lane_durable(self, lane: Lane) -> str:
        """All workers of a lane share one durable (a WorkQueue allows one per filter)."""
        return f"lane-{lane.kind}-{lane.name}"

    def notifier_durable(self, channel_kind: str) -> str:
        """All notifiers of a channel kind share one durable on the notify stream."""
        return f"notifier-{check_token(channel_kind, 'channel kind')}"

    # -- key-value buckets -----------------------------------------------------
    def bucket(self, kind: str) -> str:
        return f"{self.root}_{check_token(kind, 'bucket kind')}"

    @property
    def runs_bucket(self) -> str:
        return self.bucket("runs")

    @property
    def workflows_bucket(self) -> str:
        return self.bucket("workflows")

    @property
    def routes_bucket(self) -> str:
        return self.bucket("routes")

    @property
    def workers_bucket(self) -> str:
        return self.bucket("workers")

    @property
    def health_bucket(self) -> str:
        return self.bucket("health")

    @property
    def stats_bucket(self) -> str:
        return self.bucket("stats")

    @property
    def inbox_bucket(self) -> str:
        return self.bucket("inbox")

    @property
    def timer_leases_bucket(self) -> str:
        return self.bucket("timer_leases")

    @property
    def timer_snapshots_bucket(self) -> str:
        """An object store: one snapshot of armed timers per partition."""
        return self.bucket("timer_snapshots")

    # -- keys ------------------------------------------------------------------
    # KV keys may contain `.`, which the server treats as a subject level: we use
    # it to group keys so that a watch can filter on a prefix.
    def workflow_key(self, workflow_id: str, version: int | None = None) -> str:
        check_token(workflow_id, "workflow id")
        return f"{workflow_id}.latest" if version is None else f"{workflow_id}.v{version}"

    def workflow_keys(self, workflow_id: str) -> str:
        """Pattern of every key of one workflow (its versions and `latest`)."""
        return f"{check_token(workflow_id, 'workflow id')}.*"

    def heartbeat_key(self, actor: str, instance: str) -> str:
        return f"{check_token(actor, 'actor')}.{check_token(instance, 'instance')}"
