"""Lane tasks that exhausted their deliveries, turned into failed attempts.

A worker that dies on a task (or never answers within the ack wait) gets it
redelivered; after the lane's `max_deliver` the server stops trying and emits a
MAX_DELIVERIES advisory, but the message stays in the work-queue stream
(NATS-NOTES). The router consumes those advisories (captured in
`ns.advisories_stream`, so none is missed while it is down) and calls
`fail_exhausted`, which:

1. reads the task by its stream sequence (direct get);
2. publishes `TaskFailed(id="<task>/exhausted", exhausted=True)` on the lane's
   result subject, so the step's retry policy decides;
3. copies the message to the dead-letter subject with the reason;
4. deletes it from the stream.

Each step is idempotent (deterministic message ids; a missing message means the
work was done before, or a worker acked at the last moment), so a redelivered
advisory, or two router replicas, change nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime

import msgspec
import nats.js.errors

from hms_bus.connection import Bus
from hms_bus.dead_letters import letter_headers
from hms_bus.errors import InvalidNameError, PermanentError
from hms_bus.messages import TASK_TYPES, Task, TaskFailed, decoder_for
from hms_bus.subjects import Lane

__all__ = ["MaxDeliveries", "fail_exhausted"]

log = logging.getLogger(__name__)


class MaxDeliveries(msgspec.Struct, frozen=True):
    """The server's `io.nats.jetstream.advisory.v1.max_deliver` (the fields we use)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


async def fail_exhausted(bus: Bus, adv: MaxDeliveries, now: datetime) -> bool:
    """Fail, dead-letter and delete the task the advisory names; False if it is gone."""
    js, ns = bus.js, bus.ns
    if adv.stream != ns.tasks_stream:
        raise PermanentError(f"advisory for stream {adv.stream}, not the lanes' {ns.tasks_stream}")
    try:
        raw = await js.get_msg(adv.stream, adv.stream_seq, direct=True)
    except nats.js.errors.NotFoundError:
        return False
    reason = f"delivery exhausted after {adv.deliveries} attempts (worker crashed or timed out)"
    try:
        task: Task = decoder_for(TASK_TYPES).decode(raw.data or b"")
        lane = Lane.parse(task.lane)
    except (msgspec.DecodeError, InvalidNameError) as exc:
        # Nobody can be told; the dead letter below still keeps it for a person.
        log.warning(
            "exhausted message %d on %s is not a task: %s", adv.stream_seq, raw.subject, exc
        )
    else:
        failed = TaskFailed(
            id=f"{task.task}/exhausted",
            task=task.task,
            run=task.run,
            step=task.step,
            attempt=task.attempt,
            error=reason,
            by="router",
            retryable=True,
            exhausted=True,
            at=now,
        )
        await bus.publish(ns.result(lane), failed)
    headers = letter_headers(
        reason=reason,
        subject=raw.subject or "",
        stream=adv.stream,
        sequence=adv.stream_seq,
        consumer=adv.consumer,
        delivered=adv.deliveries,
    )
    await js.publish(ns.dlq(adv.stream), raw.data or b"", headers=headers)
    try:
        await js.delete_msg(adv.stream, adv.stream_seq)
    except nats.js.errors.NotFoundError:
        pass  # another replica deleted it between our read and now
    log.warning(
        "lane task seq %d on %s exhausted %d deliveries: failed and dead-lettered",
        adv.stream_seq,
        raw.subject,
        adv.deliveries,
    )
    return True
