"""Lanes: the one durable pull consumer per lane, and how busy a lane is.

Every lane (`AI:<name>`, `SVC:<name>`) is a subject `<root>.task.<KIND>.<name>` in the
one work-queue stream `ns.tasks_stream`. A work queue allows one consumer per filter,
so all the workers of a lane share one durable, `ns.lane_durable(lane)`: the server
hands each task to exactly one of them, and redelivers it after `ack_wait` if that
worker dies. After `max_deliver` deliveries the server gives up and emits a
MAX_DELIVERIES advisory, which the router turns into a failed attempt.

- `ensure_lane()` creates or updates that durable (idempotent; called by the router
  when it routes to a lane and by workers when they start).
- `lane_config()` reads the durable's current settings, or None.
- `lane_pending()` is the router's measure for least-pending routing: tasks waiting
  plus tasks handed out and not yet acknowledged.

`max_ack_pending` is raised from the server's default of 1000 (a hidden cap on work
in flight across all the lane's workers, see NATS-NOTES) to 10 000.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hms_bus.subjects import Lane, Namespace

__all__ = [
    "DEFAULT_ACK_WAIT",
    "DEFAULT_MAX_DELIVER",
    "LANE_MAX_ACK_PENDING",
    "LaneConfig",
    "ensure_lane",
    "lane_config",
    "lane_pending",
]

log = logging.getLogger(__name__)

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 3
LANE_MAX_ACK_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class LaneConfig:
    """The settings of a lane's durable that workers and operators care about."""

    ack_wait: float
    max_deliver: int
    max_ack_pending: int


def _want(ns: Namespace, lane: Lane, ack_wait: float, max_deliver: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=ns.lane_durable(lane),
        description=f"lane {lane}: shared by all its workers",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=LANE_MAX_ACK_PENDING,
        filter_subject=ns.task(lane),
    )


async def lane_config(js: JetStreamContext, ns: Namespace, lane: Lane) -> LaneConfig | None:
    """The lane durable's settings, or None when the lane has no durable yet."""
    try:
        info = await js.consumer_info(ns.tasks_stream, ns.lane_durable(lane))
    except nats.js.errors.NotFoundError:
        return None
    c = info.config
    return LaneConfig(
        ack_wait=float(c.ack_wait or DEFAULT_ACK_WAIT),
        max_deliver=int(c.max_deliver or -1),
        max_ack_pending=int(c.max_ack_pending or 0),
    )


async def ensure_lane(
    js: JetStreamContext,
    ns: Namespace,
    lane: Lane,
    *,
    ack_wait: float = DEFAULT_ACK_WAIT,
    max_deliver: int = DEFAULT_MAX_DELIVER,
    update: bool = True,
) -> None:
    """Create the lane's durable, or update it to these settings; a no-op when it
    already has them. The tasks stream must exist (`ensure_topology`).

    `update=False` only creates: an existing durable keeps its settings. The router
    uses that, so that the lane's workers, which know how long their tasks take, own
    its `ack_wait` (their keep-alive ticks at a quarter of the ack wait they bound to)."""
    if ack_wait <= 0:
        raise ValueError(f"ack_wait must be positive, got {ack_wait}")
    if max_deliver == 0 or max_deliver < -1:
        raise ValueError(f"max_deliver must be -1 (unlimited) or at least 1, got {max_deliver}")
    have = await lane_config(js, ns, lane)
    if have is not None and not update:
        return
    if (
        have is not None
        and abs(have.ack_wait - ack_wait) < 1e-6
        and have.max_deliver == max_deliver
        and have.max_ack_pending == LANE_MAX_ACK_PENDING
    ):
        return
    # Creating a durable that exists with another config updates it in place; two
    # workers racing to create the same config both succeed.
    await js.add_consumer(ns.tasks_stream, _want(ns, lane, ack_wait, max_deliver))
    log.info(
        "lane %s %s: ack_wait %.1fs, max_deliver %d",
        lane,
        "created" if have is None else "updated",
        ack_wait,
        max_deliver,
    )


async def lane_pending(js: JetStreamContext, ns: Namespace, lane: Lane) -> int:
    """Tasks waiting in the lane plus tasks delivered and not yet acknowledged;
    0 when the lane has no durable."""
    try:
        info = await js.consumer_info(ns.tasks_stream, ns.lane_durable(lane))
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
