"""One demo event per example workflow: what a portal would publish, and how the
run it starts is expected to end.

Each `DemoEvent` follows the example's main simulation script (`script`, in
`examples/scripts/`):
the payload drives the simulated workers (`hms_bus.demo.workers`) and the
auto-clerk (`hms_bus.demo.clerk`) down the same path, so `expect` and `steps` are
what `hms workflow simulate` shows for that script. `replies` are the citizen's
follow-up events, sent to the run once it waits for them (a `wait` step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hms_bus.subjects import check_token

__all__ = ["DEMO_EVENTS", "DemoEvent", "Reply", "demo_event", "event_id", "run_key"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A follow-up event for a run that waits on it (`Event.run` names the run).
    `after`: seconds between the run starting to wait and the citizen replying."""

    event: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    after: float = 1.0


@dataclass(frozen=True, slots=True)
class DemoEvent:
    """The event that starts one example's demo run, and what the run must end as.

    `example` is the workflow id (and `<example>.yaml` its file); `expect` the run's
    final status; `steps` some step statuses the path must end with (the ones that
    show which branch was taken).
    """

    example: str
    event: str
    payload: Mapping[str, Any]
    expect: str
    story: str
    script: str
    steps: Mapping[str, str] = field(default_factory=dict)
    replies: tuple[Reply, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.example}.yaml"


DEMO_EVENTS: tuple[DemoEvent, ...] = (
    DemoEvent(
        example="fcc-robocall",
        event="RobocallComplaintFiled",
        payload={
            "complaintId": "C-2024-0421",
            "phones": ["202-555-0136", "202-555-0199", "301-555-0100"],
            "time": "2024-04-21T09:15Z",
            "notes": "Threatened to cut off my Social Security.",
            "email": "complainant@example.com",
        },
        expect="DONE",
        story="3 caller ids checked in parallel, one is a known robocaller; two lawyers "
        "approve enforcement; an investigator opens a case; the complainant is told",
        script="fcc-robocall.enforcement.script.yaml",
        steps={
            "check_caller_ids": "DONE",
            "legal_review": "DONE",
            "hand_off": "DONE",
            "report_back": "DONE",
        },
    ),
    DemoEvent(
        example="ftc-complaint",
        event="ComplaintLogged",
        payload={
            "complaintId": "C-42",
            "text": "Caller claimed to be the IRS and asked for gift cards",
            "email": "citizen@example.com",
        },
        expect="DONE",
        story="the AI labels it High; an investigator reviews it; the citizen is told",
        script="ftc-complaint.happy.script.yaml",
        steps={"human_review": "DONE", "escalate": "SKIPPED", "notify_citizen": "DONE"},
    ),
    DemoEvent(
        example="vaccine-card",
        event="VaccineCardRequested",
        payload={
            "citizenId": "sandbox-jordan-77",
            "name": "Jordan Doe",
            "birthDate": "1990-04-01",
            "delivery": "physical",
            "mailingAddress": "1 Main St, Springfield",
        },
        expect="DONE",
        story="identity verified, doses fetched, PDF generated; a county clerk ships "
        "the physical copy",
        script="vaccine-card.physical.script.yaml",
        steps={"generate_pdf": "DONE", "ship_physical": "DONE"},
    ),
    DemoEvent(
        example="loan-forgiveness",
        event="LoanForgivenessSubmitted",
        payload={
            "applicationId": "APP-9003",
            "ssn": "111-22-3333",
            "email": "borrower@example.com",
            "form": {"income": 30000},
        },
        expect="DONE",
        story="documents are missing: the run waits (clock stopped) for the borrower's "
        "upload, then the IRS check, an officer's approval, Treasury, the email",
        script="loan-forgiveness.documents.script.yaml",
        steps={"await_documents": "DONE", "human_review": "DONE", "update_balance": "DONE"},
        replies=(Reply("LoanDocumentsUploaded", {"documents": ["w2-2025.pdf"]}, after=1.0),),
    ),
    DemoEvent(
        example="passport-renewal",
        event="PassportRenewalSubmitted",
        payload={
            "applicationId": "PPT-A-100",
            "scanUrl": "s3://scans/jazmin-quinn.pdf",
            "email": "jazmin@example.com",
            "ssn": "555-66-7777",
            "birthDate": "1988-02-14",
        },
        expect="DONE",
        story="the AI extracts the form, a clerk approves the photo, the plant prints, "
        "Jazmin is told",
        script="passport-renewal.happy.script.yaml",
        steps={
            "human_verify": "DONE",
            "request_new_photo": "SKIPPED",
            "external_print": "DONE",
            "notify_citizen": "DONE",
        },
    ),
)


def demo_event(example: str) -> DemoEvent:
    """The demo event of one example; `KeyError` naming the known ones."""
    for demo in DEMO_EVENTS:
        if demo.example == example:
            return demo
    raise KeyError(
        f"no demo event for {example!r}; known: {', '.join(e.example for e in DEMO_EVENTS)}"
    )


def event_id(session: str, demo: DemoEvent) -> str:
    """The demo event's id in one demo session: publishing it again (a restarted demo
    in the same session) starts no second run."""
    return f"demo-{check_token(session, 'demo session')}-{demo.example}"


def run_key(event: str, workflow: str) -> str:
    """The idempotency key of the run that event `event` starts for `workflow`.

    This is the dispatcher's scheme (`actors/dispatcher.py`, `_on_event`); it is
    repeated here, in one place, so the demo can find its runs by key in the runs
    bucket without waiting for each start separately."""
    return f"event/{event}/{workflow}"
