"""The JetStream topology: every stream, durable consumer and KV bucket, declared
as data (`declare()`, in `hms_bus.topology_spec`), and `ensure_topology()`, which
creates or updates them.

Declaring before creating lets `subjects.md` be checked against the code and lets
`hms check` say exactly what is missing. `ensure_topology()` is idempotent: run
twice it changes nothing; run with a changed limit it updates the stream in place;
asked for a change JetStream cannot apply in place (storage, retention) it raises
`TopologyError` naming the setting, rather than deleting anybody's data.

Choices (see subjects.md for the table):
- File storage everywhere; replicas from settings (1 embedded, 3 in a cluster).
- Inputs from outside (events, commands, results) refuse messages over
  `max_payload` (a client refuses them first, with a clearer error); the rest
  is bounded by the server's max_payload, as run states outgrow any one input.
- Inputs (events, commands, results, audit, notifications) keep a week under
  limits retention: redeliveries, replays and several readers all work.
- Hand-offs with exactly one reader (route requests, lanes) are work queues:
  a message is gone once acked.
- The ledger keeps everything forever and refuses deletes and purges.
- Every stream has a duplicate window, for `Nats-Msg-Id` deduplication.
- Consumers raise `max_ack_pending` above the default 1000, a hidden cap on work
  in flight (NATS-NOTES).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from hms_bus.errors import TopologyError
from hms_bus.settings import BusSettings
from hms_bus.topology_spec import (
    DUPLICATE_WINDOW,
    BucketSpec,
    ConsumerSpec,
    StreamSpec,
    Topology,
    declare,
)

__all__ = [
    "DUPLICATE_WINDOW",
    "BucketSpec",
    "ConsumerSpec",
    "StreamSpec",
    "Topology",
    "TopologyReport",
    "declare",
    "ensure_topology",
    "stream_config",
]

log = logging.getLogger(__name__)


@dataclass
class TopologyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


_RETENTION = {"limits": RetentionPolicy.LIMITS, "workqueue": RetentionPolicy.WORK_QUEUE}


def stream_config(spec: StreamSpec, settings: BusSettings) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=_RETENTION[spec.retention],
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        max_age=spec.max_age,
        max_msg_size=settings.max_payload if spec.external else -1,
        duplicate_window=DUPLICATE_WINDOW,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        allow_direct=True,
    )


def _consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    one = len(spec.filter_subjects) == 1
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=spec.filter_subjects[0] if one else None,
        filter_subjects=None if one else list(spec.filter_subjects),
    )


_STREAM_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "max_age",
    "max_msg_size",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "description",
    "allow_direct",
)
# A bucket's stream has settings of its own (deny_delete, rollups): compare only ours.
_BUCKET_FIELDS = (
    "storage",
    "num_replicas",
    "max_age",
    "max_msg_size",
    "max_msgs_per_subject",
    "description",
)


def _diff(
    want: StreamConfig, have: StreamConfig, fields: tuple[str, ...] = _STREAM_FIELDS
) -> dict[str, tuple[object, object]]:
    out: dict[str, tuple[object, object]] = {}
    for name in fields:
        w, h = getattr(want, name), getattr(have, name)
        if w is None:
            continue
        if name == "subjects":
            w, h = sorted(w or []), sorted(h or [])
        if isinstance(w, float) or isinstance(h, float):
            if abs(float(w or 0) - float(h or 0)) > 1e-6:
                out[name] = (h, w)
        elif w != h:
            out[name] = (h, w)
    return out


# Settings the server cannot change on an existing stream.
_IMMUTABLE = {
    "storage": "the storage type of an existing stream is fixed",
    "retention": "a stream cannot switch to or from work-queue retention",
}


async def _ensure_stream(js: JetStreamContext, want: StreamConfig, report: TopologyReport) -> None:
    assert want.name is not None
    try:
        info: StreamInfo = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(want)
        report.created.append(f"stream {want.name}")
        return
    diff = _diff(want, info.config)
    if not diff:
        report.unchanged.append(f"stream {want.name}")
        return
    for setting, why in _IMMUTABLE.items():
        if setting in diff:
            old, new = diff[setting]
            raise TopologyError(
                f"stream {want.name}: cannot change {setting} from {_show(old)} to "
                f"{_show(new)} in place ({why}); remove the stream (losing its messages) "
                f"or keep the old setting"
            )
    try:
        await js.update_stream(want)
    except nats.js.errors.APIError as exc:
        names = ", ".join(sorted(diff))
        raise TopologyError(
            f"stream {want.name}: the server refused to change {names}: {exc.description}"
        ) from None
    report.updated.append(f"stream {want.name} ({', '.join(sorted(diff))})")


def _show(value: object) -> str:
    return str(getattr(value, "value", value))


async def _ensure_consumer(
    js: JetStreamContext, spec: ConsumerSpec, report: TopologyReport
) -> None:
    want = _consumer_config(spec)
    label = f"consumer {spec.stream}/{spec.durable}"
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(spec.stream, want)
        report.created.append(label)
        return
    have = info.config
    have_filters = sorted(
        have.filter_subjects or ([have.filter_subject] if have.filter_subject else [])
    )
    same = (
        have_filters == sorted(spec.filter_subjects)
        and abs((have.ack_wait or 0) - spec.ack_wait) < 1e-6
        and have.max_deliver == spec.max_deliver
        and have.max_ack_pending == spec.max_ack_pending
        and (have.description or "") == spec.description
    )
    if same:
        report.unchanged.append(label)
        return
    try:
        await js.add_consumer(spec.stream, want)  # a create with a changed config updates it
    except nats.js.errors.APIError as exc:
        raise TopologyError(f"{label}: the server refused the change: {exc.description}") from None
    report.updated.append(label)


async def _ensure_bucket(
    js: JetStreamContext, spec: BucketSpec, settings: BusSettings, report: TopologyReport
) -> None:
    config = KeyValueConfig(
        bucket=spec.name,
        description=spec.description,
        history=spec.history,
        ttl=spec.ttl or None,
        storage=StorageType.FILE,
        replicas=settings.replicas,
        max_value_size=-1,  # a run's state outgrows any one input: the server's limit only
        direct=True,
    )
    stream = f"KV_{spec.name}"
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.create_key_value(config)
        report.created.append(f"bucket {spec.name}")
        return
    want = StreamConfig(
        name=stream,
        num_replicas=settings.replicas,
        max_age=spec.ttl,
        max_msg_size=-1,
        max_msgs_per_subject=spec.history,
        storage=StorageType.FILE,
        description=spec.description,
    )
    diff = _diff(want, info.config, _BUCKET_FIELDS)
    if not diff:
        report.unchanged.append(f"bucket {spec.name}")
        return
    if "storage" in diff:
        old, new = diff["storage"]
        raise TopologyError(
            f"bucket {spec.name}: cannot change storage from {_show(old)} to {_show(new)} in place"
        )
    updated = info.config
    for name, (_, new) in diff.items():
        setattr(updated, name, new)
    try:
        await js.update_stream(updated)
    except nats.js.errors.APIError as exc:
        raise TopologyError(
            f"bucket {spec.name}: the server refused to change {', '.join(sorted(diff))}: "
            f"{exc.description}"
        ) from None
    report.updated.append(f"bucket {spec.name} ({', '.join(sorted(diff))})")


async def ensure_topology(js: JetStreamContext, settings: BusSettings) -> TopologyReport:
    """Create or update every stream, consumer and bucket; idempotent."""
    topology = declare(settings.ns)
    report = TopologyReport()
    for stream in topology.streams:
        await _ensure_stream(js, stream_config(stream, settings), report)
    for consumer in topology.consumers:
        await _ensure_consumer(js, consumer, report)
    for bucket in topology.buckets:
        await _ensure_bucket(js, bucket, settings, report)
    if report.changed:
        log.info(
            "topology %s: created %d, updated %d",
            settings.root,
            len(report.created),
            len(report.updated),
        )
    return report
