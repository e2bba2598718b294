"""The workflow registry: validated definitions in the workflows KV bucket, versioned.

Keys: `<workflow-id>.v<N>` holds version N as JSON (the `Workflow` model, exactly
what the loader produced), and `<workflow-id>.latest` the number of the newest
version. A version, once applied, never changes: applying the same definition
again is a no-op, and applying different content under an existing version number
is refused (bump `version:`). Runs are pinned to the version they started with, so
in-flight runs keep theirs when a new one is applied.

`Registry` caches definitions (a version is immutable, so the cache is never
stale) and answers "which workflows does event X start?" from the latest
versions, refreshed when a `.latest` key changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.connection import Bus
from hms_bus.errors import HmsError, NotFoundError
from hms_bus.keys import list_keys
from hms_bus.subjects import Namespace
from hms_bus.workflow.model import Workflow

__all__ = ["Applied", "Registry", "VersionConflictError"]

log = logging.getLogger(__name__)

#: Seconds an event -> workflows answer is reused before the registry is re-read.
TRIGGER_TTL = 2.0

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Workflow)


class VersionConflictError(HmsError):
    """Different content under a version number that is already applied."""


@dataclass(frozen=True, slots=True)
class Applied:
    workflow: str
    version: int
    changed: bool


class Registry:
    def __init__(self, kv: KeyValue, ns: Namespace) -> None:
        self._kv = kv
        self._ns = ns
        self._versions: dict[tuple[str, int], Workflow] = {}
        self._triggers: dict[str, list[Workflow]] = {}
        self._triggers_at = float("-inf")
        self._refreshing = anyio.Lock()

    @classmethod
    async def open(cls, bus: Bus) -> Registry:
        return cls(await bus.js.key_value(bus.ns.workflows_bucket), bus.ns)

    async def apply(self, workflow: Workflow) -> Applied:
        """Store `workflow` under its version; refuse to change an applied version."""
        key = self._ns.workflow_key(workflow.id, workflow.version)
        data = _encoder.encode(workflow)
        try:
            await self._kv.create(key, data)
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self._kv.get(key)
            if existing.value != data:
                raise VersionConflictError(
                    f"workflow {workflow.id!r} version {workflow.version} is already applied "
                    f"with different content; give the new definition `version: "
                    f"{await self._next_version(workflow.id)}`"
                ) from None
            changed = False
        else:
            changed = True
        await self._raise_latest(workflow.id, workflow.version)
        self._versions[(workflow.id, workflow.version)] = workflow
        return Applied(workflow.id, workflow.version, changed)

    async def _next_version(self, workflow_id: str) -> int:
        return (await self.latest_version(workflow_id) or 0) + 1

    async def _raise_latest(self, workflow_id: str, version: int) -> None:
        key = self._ns.workflow_key(workflow_id)
        while True:
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                try:
                    await self._kv.create(key, str(version).encode())
                    return
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            if int(entry.value or b"0") >= version:
                return
            try:
                await self._kv.update(key, str(version).encode(), last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    async def latest_version(self, workflow_id: str) -> int | None:
        try:
            entry = await self._kv.get(self._ns.workflow_key(workflow_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return int(entry.value or b"0") or None

    async def get(self, workflow_id: str, version: int | None = None) -> Workflow:
        """A version (cached forever: versions are immutable), or the latest."""
        if version is None:
            version = await self.latest_version(workflow_id)
            if version is None:
                raise NotFoundError(f"unknown workflow {workflow_id!r}: apply it first")
        cached = self._versions.get((workflow_id, version))
        if cached is not None:
            return cached
        try:
            entry = await self._kv.get(self._ns.workflow_key(workflow_id, version))
        except nats.js.errors.KeyNotFoundError:
            raise NotFoundError(f"workflow {workflow_id!r} has no version {version}") from None
        workflow = _decoder.decode(entry.value or b"")
        self._versions[(workflow_id, version)] = workflow
        return workflow

    async def workflow_ids(self) -> list[str]:
        return [k.removesuffix(".latest") for k in await list_keys(self._kv, "*.latest")]

    async def versions(self, workflow_id: str) -> list[int]:
        keys = await list_keys(self._kv, self._ns.workflow_keys(workflow_id))
        prefix = f"{workflow_id}.v"
        return sorted(int(k[len(prefix) :]) for k in keys if k[len(prefix) :].isdigit())

    async def triggered_by(self, event: str) -> list[Workflow]:
        """The latest version of every workflow whose `start` names `event`.

        Listing keys is a scan, so the answer is cached for `TRIGGER_TTL` seconds; a
        miss re-reads at once, so an event published right after `hms workflow apply`
        still finds its workflow. A new version is picked up within the TTL.
        """
        now = time.monotonic()
        if now - self._triggers_at > TRIGGER_TTL:
            await self._refresh_triggers(now - TRIGGER_TTL)
        found = self._triggers.get(event)
        if not found and now - self._triggers_at > 0.05:
            await self._refresh_triggers(now - 0.05)
            found = self._triggers.get(event)
        return list(found or ())

    async def _refresh_triggers(self, unless_since: float) -> None:
        """Re-read the triggers, unless that happened after `unless_since` (while this
        caller waited): the dispatcher's concurrent handlers all find the answer
        expired at once, and one scan serves them all."""
        async with self._refreshing:
            if self._triggers_at > unless_since:
                return
            triggers: dict[str, list[Workflow]] = {}
            for workflow_id in await self.workflow_ids():
                workflow = await self.get(workflow_id)
                for name in workflow.start:
                    triggers.setdefault(name, []).append(workflow)
            self._triggers = triggers
            self._triggers_at = time.monotonic()
