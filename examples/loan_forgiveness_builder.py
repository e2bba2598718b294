"""The loan-forgiveness workflow of `loan-forgiveness.yaml`, built in Python.

Source chapter 4 writes it as `Step("eligibility_check", svc="IRS", sla="2m")` and
`Checkpoint("human_review", role=...)`; the builder keeps that shape. `workflow()`
runs the YAML loader's validation, so both definitions are the same `Workflow`.

    python examples/loan_forgiveness_builder.py     # prints the workflow as JSON
"""

from __future__ import annotations

from datetime import date

import msgspec

from hms_bus.workflow.builder import (
    Action,
    Calendar,
    Checkpoint,
    Ladder,
    Retry,
    Rung,
    Step,
    Wait,
    workflow,
)
from hms_bus.workflow.model import Workflow

FEDERAL_HOLIDAYS_2026 = [
    date(2026, 1, 1), date(2026, 1, 19), date(2026, 2, 16), date(2026, 5, 25),
    date(2026, 6, 19), date(2026, 7, 3), date(2026, 9, 7), date(2026, 10, 12),
    date(2026, 11, 11), date(2026, 11, 26), date(2026, 12, 25),
]  # fmt: skip


def build() -> Workflow:
    return workflow(
        "loan-forgiveness",
        title="Student loan forgiveness application",
        prefix="LNF",
        start=["LoanForgivenessSubmitted"],
        sla="10 business days",
        calendar="fsa",
        case="payload.applicationId",
        sensitive=["payload.ssn"],
        calendars={
            "fsa": Calendar(
                timezone="America/New_York",
                hours="08:00-18:00",
                weekdays=["mon", "tue", "wed", "thu", "fri"],
                holidays=FEDERAL_HOLIDAYS_2026,
            )
        },
        steps=[
            Step(
                "validate_form",
                svc="fsa",
                input={"application": "payload.applicationId", "form": "payload.form"},
                sla="5m",
            ),
            Wait(
                "await_documents",
                "LoanDocumentsUploaded",
                when="results.validate_form.missing_documents",
                limit="30d",
                on_timeout="fail",
            ),
            Step(
                "eligibility_check",
                svc="irs",
                input={
                    "ssn": "payload.ssn",
                    "income": "payload.form.income",
                    "documents": "results.await_documents.documents",
                },
                sla="2m",
                retry=Retry(3, "30s"),
                on_timeout=Action(notify=["slack:#fsa-ops"]),
            ),
            Checkpoint(
                "human_review",
                role="fsa-officer",
                sla="2 business days",
                on_timeout=Ladder(
                    Rung("50%", notify=["slack:#fsa-review"]),
                    Rung("100%", reassign="HUMAN:fsa-supervisor"),
                ),
                on_reject="notify_applicant",
            ),
            Step(
                "update_balance",
                svc="treasury",
                input={
                    "application": "payload.applicationId",
                    "eligible_amount": "results.eligibility_check.amount",
                },
                retry=Retry(5, "1m", max_backoff="1h", multiplier=2),
            ),
            Step(
                "notify_applicant",
                svc="email",
                input={
                    "to": "payload.email",
                    "decision": "results.human_review.decision",
                    "reasons": "results.human_review.reasons",
                    "new_balance": "results.update_balance.balance",
                },
                retry=Retry(3, "1m"),
            ),
        ],
    )


if __name__ == "__main__":
    print(msgspec.json.format(msgspec.json.encode(build()).decode()))
