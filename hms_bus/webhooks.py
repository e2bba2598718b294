"""Notifications delivered by HTTP: a notifier that POSTs each one to a URL.

Chat tools and paging services take an incoming webhook (Slack, Teams, Mattermost,
an on-call service, an agency's own gateway), so `notify: ["slack:#ops"]` needs no
code, only `hms notifier run slack --webhook https://hooks.example/...`:

- `json` (the default) posts the `Notify` as `subjects.md` documents it;
- `text` posts `{"text": "<channel>: <text>"}`, what Slack-style incoming webhooks
  take.

Each request carries `Idempotency-Key: <notification id>` (stable across
redeliveries) for receivers that deduplicate. A 2xx answer acks the notification.
A 408, 429 or 5xx answer, or no answer within `timeout`, is retried with backoff
(`hms_bus.notify`: up to `MAX_DELIVER` deliveries, then a dead letter); any other
answer is permanent (a wrong URL or a refused body will not mend itself) and goes to
the dead letters at once, with the status and the start of the answer as the
reason. The URL is checked when the notifier is made: http or https, with a host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Literal
from urllib.parse import urlsplit

import anyio.to_thread

from hms_bus.errors import InvalidNameError, PermanentError
from hms_bus.messages import Notify, encode
from hms_bus.notify import Notifier, notifier

__all__ = ["FORMATS", "Format", "WebhookError", "webhook_notifier"]

FORMATS = ("json", "text")
Format = Literal["json", "text"]
#: Answers worth trying again: the receiver is busy or down, not refusing.
_RETRYABLE = {408, 425, 429}
_MAX_ANSWER = 200


class WebhookError(Exception):
    """A delivery that may succeed later (the consume loop retries it)."""


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidNameError(f"webhook URL {url!r}: give an http:// or https:// URL with a host")
    return url


def _body(note: Notify, form: Format) -> bytes:
    if form == "text":
        return json.dumps({"text": f"{note.channel}: {note.text}"}).encode()
    return encode(note)


def _post(url: str, body: bytes, key: str, timeout: float) -> None:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        text = exc.read()[:_MAX_ANSWER].decode(errors="replace").strip()
        why = f"webhook answered {exc.code} {exc.reason}" + (f": {text}" if text else "")
        if exc.code in _RETRYABLE or exc.code >= 500:
            raise WebhookError(why) from None
        raise PermanentError(why) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WebhookError(f"webhook not reached: {reason}") from None


def webhook_notifier(
    kind: str, url: str, *, form: Format = "json", timeout: float = 10.0
) -> Notifier:
    """The notifier of channel `kind` that POSTs each notification to `url`."""
    target = _check_url(url)
    if form not in FORMATS:
        raise InvalidNameError(f"webhook format {form!r}: one of {', '.join(FORMATS)}")

    async def post(note: Notify) -> None:
        body = _body(note, form)
        # urllib blocks: a worker thread, so the loop keeps serving the others
        await anyio.to_thread.run_sync(_post, target, body, note.id, timeout)

    return notifier(kind)(post)
