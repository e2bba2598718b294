"""The error types of hms-bus.

An error raised by a message handler carries the delivery decision, and the consume
loop (`hms_bus.consume`) is the one place that maps it onto JetStream:

- `PermanentError` (and any message that does not decode): terminate the message and
  copy it to the dead-letter subject with the reason. Retrying would fail the same way.
- `RetryLater`: negative-acknowledge with a delay; the input is fine but something it
  needs is not there yet (a compare-and-set lost its race, a definition not yet stored).
- anything else: an unexpected bug or outage; treated as transient, logged once, nak'd
  with a delay, and dead-lettered by the server's max-deliver limit if it persists.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HmsError",
    "InvalidNameError",
    "NotFoundError",
    "PermanentError",
    "RetryLater",
    "ServerError",
    "TopologyError",
]


class HmsError(Exception):
    """Base of every error hms-bus raises on purpose."""


class ConfigError(HmsError):
    """A setting is missing or malformed; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidNameError(HmsError, ValueError):
    """A name that cannot be a subject token, lane, stream or bucket name."""


class NotFoundError(HmsError):
    """An unknown run, task, workflow or key."""


class TopologyError(HmsError):
    """A stream, consumer or bucket exists with settings JetStream cannot change in place."""


class ServerError(HmsError):
    """The embedded nats-server could not start (busy port, bad data dir, no binary)."""


class PermanentError(HmsError):
    """The input can never be handled: terminate it and dead-letter it with this reason."""


class RetryLater(HmsError):
    """The input is fine but cannot be handled yet: redeliver it after `delay` seconds."""

    def __init__(self, reason: str, delay: float = 1.0) -> None:
        super().__init__(reason)
        self.delay = delay
