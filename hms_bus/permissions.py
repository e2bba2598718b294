"""Least-privilege NATS users: one per role, each allowed only the subjects it uses.

`roles(ns, lanes)` derives every role's publish and subscribe allow-lists from the
namespace and the topology, so the server configuration in `deploy/nats/` can never
drift from the code: `python -m hms_bus.permissions` renders it (`hms_bus.auth_config`;
the committed file is checked against this module by a test), and the tests render
it under their own root and prove each role can do its job and nothing else.

What a JetStream client does, in subjects (why the lists look as they do):
- publishing to a stream is a plain publish whose PubAck comes back on `_INBOX.>`;
- pulling from a durable is a request on `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`
  and acking a publish on `$JS.ACK.<stream>.<durable>.>`;
- a KV bucket `b` is the stream `KV_b`: a put is a publish on `$KV.b.<key>`, a get a
  request on `$JS.API.DIRECT.GET.KV_b.$KV.b.<key>`, a watch an ephemeral consumer
  (`$JS.API.CONSUMER.CREATE.KV_b...`) pushing to an inbox; binding to a bucket asks
  `$JS.API.STREAM.INFO.KV_b`;
- every reply (API answers, PubAcks, deliveries) arrives under `_INBOX.>`.

Roles: each actor (`dispatcher`, `router`, `sla-timer`, `ledger`), one worker user
per lane (`worker-<KIND>-<name>`: pull its own lane, publish its results, heartbeat
in the worker registry), one notifier user per channel kind (`notifier-<kind>`: pull
its notifications), `publisher` (publish events and start runs, read run
state and history: it cannot steer a run or approve a checkpoint), `clerk` (human
lanes: the inbox, claim/release, results of human lanes, approve/reject; run state
and history), `supervisor` (a clerk who may also pause, resume, cancel and retry
runs, reassign and reroute tasks, and read the business metrics),
`operator` (the CLI: everything under the root, and the JetStream API to create the
topology) and `exporter` (Prometheus: read-only stream and consumer info).

Actors and notifiers read what `hms check` needs (stream and consumer info, the health bucket), so
a container's probe runs with the actor's own credentials. They do not create the
topology: in production the operator runs `hms topology ensure` once and actors run
with `--no-ensure`. Limits worth knowing: the publisher reads the state of every run
(KV has no per-key owner); a worker's lane may be created by the worker itself
(its own durable only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hms_bus.subjects import ACTOR_KINDS, Lane, Namespace
from hms_bus.topology import declare

__all__ = ["Role", "default_lanes", "main", "roles"]

INBOX = "_INBOX.>"
API = "$JS.API"


@dataclass(frozen=True)
class Role:
    """One NATS user: the subjects it may publish to and subscribe to."""

    user: str
    description: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass
class _Grants:
    pub: list[str] = field(default_factory=list)
    sub: list[str] = field(default_factory=lambda: [INBOX])

    def role(self, user: str, description: str) -> Role:
        return Role(
            user, description, tuple(dict.fromkeys(self.pub)), tuple(dict.fromkeys(self.sub))
        )

    # -- streams ---------------------------------------------------------------
    def publish(self, *subjects: str) -> _Grants:
        self.pub += subjects
        return self

    def stream_info(self, *streams: str) -> _Grants:
        self.pub += [f"{API}.STREAM.INFO.{s}" for s in streams]
        return self

    def durable(self, stream: str, durable: str, *, create: bool = False) -> _Grants:
        """Pull from and ack one durable (and create it, for a lane's own workers)."""
        self.pub += [
            f"{API}.CONSUMER.INFO.{stream}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
        if create:
            self.pub += [
                f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"{API}.CONSUMER.CREATE.{stream}.{durable}.>",
            ]
        return self

    def ephemeral(self, stream: str) -> _Grants:
        """Read a stream through ephemeral consumers of one's own (create, pull, delete)."""
        self.pub += [
            f"{API}.STREAM.INFO.{stream}",
            f"{API}.CONSUMER.CREATE.{stream}",
            f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.INFO.{stream}.*",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{API}.CONSUMER.DELETE.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
        return self

    # -- buckets ---------------------------------------------------------------
    def kv_read(self, bucket: str, keys: str = ">") -> _Grants:
        stream = f"KV_{bucket}"
        self.ephemeral(stream)  # watches and key listings
        self.pub += [f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.$KV.{bucket}.{keys}"]
        return self

    def kv_get(self, bucket: str) -> _Grants:
        """Read single keys of one bucket (direct gets): no watches, no listings."""
        stream = f"KV_{bucket}"
        self.stream_info(stream)
        self.pub += [f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.$KV.{bucket}.>"]
        return self

    def kv_write(self, bucket: str, keys: str = ">") -> _Grants:
        self.kv_read(bucket, keys)
        self.pub.append(f"$KV.{bucket}.{keys}")
        return self

    def ledger_read(self, ns: Namespace) -> _Grants:
        """Read runs' chains: batched direct gets on the ledger stream (timelines, and
        the lanes a run's status names)."""
        stream = ns.ledger_stream
        return self.publish(f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>")

    def object_store(self, bucket: str) -> _Grants:
        """Full use of one object store, including creating it."""
        stream = f"OBJ_{bucket}"
        self.ephemeral(stream)
        self.pub += [
            f"{API}.STREAM.CREATE.{stream}",
            f"{API}.STREAM.UPDATE.{stream}",
            f"{API}.STREAM.PURGE.{stream}",
            f"{API}.STREAM.MSG.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}.>",
            f"$O.{bucket}.>",
        ]
        return self

    def health_check(self, ns: Namespace) -> _Grants:
        """What `hms check` reads: stream, consumer and bucket info, heartbeats."""
        topology = declare(ns)
        self.pub.append(f"{API}.INFO")
        self.stream_info(*(s.name for s in topology.streams))
        self.stream_info(*(f"KV_{b.name}" for b in topology.buckets))
        self.pub += [f"{API}.CONSUMER.INFO.{c.stream}.{c.durable}" for c in topology.consumers]
        self.kv_read(ns.health_bucket)
        return self


def _actor(ns: Namespace, name: str) -> _Grants:
    """Common to the actor daemons: health checks, own heartbeats, dead letters."""
    return (
        _Grants()
        .health_check(ns)
        .kv_write(ns.health_bucket, f"{name}.>")
        .publish(ns.dlq_all, ns.audit(name))
    )


def _worker(ns: Namespace, lane: Lane) -> Role:
    name = f"worker-{lane.kind}-{lane.name}"
    grants = (
        _Grants()
        .publish(f"{API}.INFO", ns.result(lane))
        .stream_info(ns.tasks_stream)
        .durable(ns.tasks_stream, ns.lane_durable(lane), create=True)
        .kv_write(ns.workers_bucket, f"{lane.kind}.{lane.name}.>")
        .kv_write(ns.health_bucket, f"{name}.>")
    )
    grants.sub.append(ns.cancel(lane))
    return grants.role(name, f"a worker of lane {lane}: pull it, publish its results")


def _notifier(ns: Namespace, kind: str) -> Role:
    name = ns.notifier_durable(kind)  # also the daemon's name, so its heartbeat key
    grants = (
        _actor(ns, name)
        .durable(ns.notify_stream, ns.notifier_durable(kind), create=True)
        .stream_info(ns.notify_stream)
    )
    return grants.role(name, f"a notifier of {kind} channels: pull its notifications")


#: Channel kinds with a notifier user by default: those the example workflows use.
CHANNEL_KINDS = ("email", "slack", "sms")


def roles(
    ns: Namespace, lanes: Iterable[Lane] = (), channel_kinds: Iterable[str] = CHANNEL_KINDS
) -> tuple[Role, ...]:
    """Every role under `ns`, with one worker user per lane in `lanes` and one
    notifier user per channel kind."""
    t = ns.tasks_stream
    dispatcher = _actor(ns, "dispatcher").publish(
        ns.route_all, ns.timer("arm"), ns.timer("disarm"), ns.notify_all
    )
    for stream, kind in (
        (ns.events_stream, "events"),
        (ns.commands_stream, "commands"),
        (ns.results_stream, "results"),
        (ns.timers_stream, "timers"),
    ):
        dispatcher.durable(stream, ns.durable("dispatcher", kind))
    dispatcher.kv_write(ns.runs_bucket).kv_read(ns.workflows_bucket)

    router = (
        _actor(ns, "router")
        .publish(ns.tasks_all, ns.cancels_all, ns.router_result)
        .durable(ns.route_stream, ns.durable("router", "route"))
        .durable(ns.advisories_stream, ns.durable("router", "advisories"))
        .kv_write(ns.routes_bucket)
        .kv_write(ns.inbox_bucket)
        .kv_read(ns.workers_bucket)
        .kv_read(ns.workflows_bucket)
        .kv_get(ns.runs_bucket)  # is a human task still open, once placed
        # Lanes are created on first use; exhausted tasks are read and removed.
        .publish(
            f"{API}.CONSUMER.INFO.{t}.*",
            f"{API}.CONSUMER.DURABLE.CREATE.{t}.*",
            f"{API}.DIRECT.GET.{t}",
            f"{API}.STREAM.MSG.GET.{t}",
            f"{API}.STREAM.MSG.DELETE.{t}",
        )
    )

    timer = (
        _actor(ns, "sla-timer")
        .publish(ns.timer("fired"))
        .ephemeral(ns.timers_stream)
        .object_store(ns.timer_snapshots_bucket)
        .kv_write(ns.timer_leases_bucket)
        .publish(f"{API}.STREAM.CREATE.KV_{ns.timer_leases_bucket}")
    )

    ledger = (
        _actor(ns, "ledger")
        .publish(ns.ledger_all)
        .durable(ns.audit_stream, ns.durable("ledger", "audit"))
        .ephemeral(ns.ledger_stream)
        .ledger_read(ns)  # chain heads
        .kv_write(ns.stats_bucket)
        .kv_read(ns.runs_bucket)
    )

    publisher = (
        _Grants()
        .publish(ns.events_all, ns.command("start"))
        .kv_read(ns.runs_bucket)
        .kv_read(ns.workflows_bucket)
        .stream_info(ns.ledger_stream)
        .ledger_read(ns)
    )

    def desk() -> _Grants:
        """What people at the inbox need: human results, claims, decisions, reads."""
        return (
            _Grants()
            .publish(
                ns.results_of_kind("HUMAN"),
                ns.command("claim"),
                ns.command("release"),
                ns.command("approve"),
                ns.command("reject"),
            )
            .kv_write(ns.inbox_bucket)
            .kv_read(ns.runs_bucket)
            .kv_read(ns.workflows_bucket)
            .ledger_read(ns)
        )

    clerk = desk()
    # A supervisor also steers runs and moves work (hms run pause|resume|cancel|retry,
    # hms task reassign|reroute) and reads the business metrics; the topology, the
    # routing table, workflows and dead letters stay the operator's.
    supervisor = (
        desk()
        .publish(*(ns.command(verb) for verb in ("pause", "resume", "cancel", "retry", "reroute")))
        .kv_read(ns.stats_bucket)
    )

    operator = _Grants().publish(
        f"{ns.root}.>",
        f"{API}.>",
        "$JS.ACK.>",
        "$JS.FC.>",
        "$KV.>",
        "$O.>",
    )
    operator.sub += [f"{ns.root}.>"]

    exporter = _Grants().publish(
        f"{API}.INFO",
        f"{API}.STREAM.NAMES",
        f"{API}.STREAM.LIST",
        f"{API}.STREAM.INFO.*",
        f"{API}.CONSUMER.NAMES.*",
        f"{API}.CONSUMER.LIST.*",
        f"{API}.CONSUMER.INFO.*.*",
    )

    return (
        dispatcher.role("dispatcher", "the dispatcher: run state, events, commands, results"),
        router.role("router", "the router: lanes, the routing table, the inbox"),
        timer.role("sla-timer", "the SLA timer: its log, snapshots and leases"),
        ledger.role("ledger", "the ledger: audit facts in, the chained ledger out"),
        *(_worker(ns, lane) for lane in sorted(set(lanes), key=str)),
        *(_notifier(ns, kind) for kind in sorted(set(channel_kinds))),
        publisher.role("publisher", "portals: publish events, start runs, read run state"),
        clerk.role("clerk", "people at the inbox: human tasks, approvals"),
        supervisor.role("supervisor", "a clerk who also steers runs and moves tasks"),
        operator.role("operator", "the hms CLI: everything, including the topology"),
        exporter.role("exporter", "Prometheus exporter: read-only JetStream info"),
    )


def default_lanes() -> list[Lane]:
    """The AI and SVC lanes of the demo workers (`hms_bus.demo.workers`)."""
    from hms_bus.demo.workers import ANSWERS

    return [Lane.parse(name) for name in ANSWERS if name.split(":")[0] in ACTOR_KINDS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hms_bus.permissions",
        description="Print the NATS server authorization config for hms-bus roles.",
    )
    parser.add_argument("--root", default="hms", help="namespace root (default hms)")
    parser.add_argument(
        "--lane",
        action="append",
        default=None,
        help="a worker lane KIND:name (repeatable; default: the demo lanes)",
    )
    parser.add_argument(
        "--helm-values",
        action="store_true",
        help="print values for the NATS Helm chart instead of a server config",
    )
    from hms_bus.auth_config import helm_values, render_conf  # it imports `Role` from here

    args = parser.parse_args(argv)
    lanes = [Lane.parse(text) for text in args.lane] if args.lane else default_lanes()
    found = roles(Namespace(args.root), lanes)
    render = helm_values if args.helm_values else render_conf
    sys.stdout.write(render(found, args.root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
