"""The demo: simulated workers and a clerk for the five example workflows.

`hms demo` (and `hms up --demo`) applies the examples, starts a simulated worker for
every `AI:` and `SVC:` lane they name, optionally an auto-clerk for the `HUMAN:`
lanes, publishes one event per example and prints each run's progress. The pieces:

- `events`: one demo event per example, with its payload and expected outcome;
- `workers`: the simulated AI and service workers (deterministic answers);
- `clerk`: the auto-clerk that claims, completes and approves human tasks;
- `runner`: `run_demo()`, which puts it all together on a live bus.
"""

from __future__ import annotations

from hms_bus.demo.events import DEMO_EVENTS, DemoEvent, Reply
from hms_bus.demo.runner import DemoReport, DemoResult, demo_alongside, demo_session, run_demo

__all__ = [
    "DEMO_EVENTS",
    "DemoEvent",
    "DemoReport",
    "DemoResult",
    "Reply",
    "demo_alongside",
    "demo_session",
    "run_demo",
]
