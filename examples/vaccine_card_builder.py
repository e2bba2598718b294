"""The vaccine-card workflow of `vaccine-card.yaml`, built in Python.

Source chapter 2 sketches it as `Task(name, sla=..., needs=[...], optional=True)`; the
builder takes the same shape, and `workflow()` runs the YAML loader's validation, so
the two definitions are the same `Workflow` (a test checks it).

    python examples/vaccine_card_builder.py     # prints the workflow as JSON
"""

from __future__ import annotations

import msgspec

from hms_bus.workflow.builder import Action, Task, workflow
from hms_bus.workflow.model import Workflow


def build() -> Workflow:
    return workflow(
        "vaccine-card",
        title="Replace a COVID-19 vaccine card",
        prefix="VAX",
        start="VaccineCardRequested",
        sla="48h",
        case="payload.citizenId",
        steps=[
            Task(
                "verify_identity",
                ai="dmv-verifier",
                input={
                    "citizen": "payload.citizenId",
                    "name": "payload.name",
                    "birth_date": "payload.birthDate",
                },
                sla="2h",
            ),
            Task(
                "fetch_vaccine_log",
                ai="immunization-registry",
                input={
                    "citizen": "payload.citizenId",
                    "dmv_record": "results.verify_identity.recordId",
                },
                sla="4h",
                on_timeout=Action(
                    reassign="AI:immunization-registry-backup",
                    notify=["sms:+1-202-555-0123", "slack:#ops-alerts"],
                ),
            ),
            Task(
                "generate_pdf",
                svc="pdf-generator",
                needs=["fetch_vaccine_log"],
                input={
                    "citizen": "payload.citizenId",
                    "doses": "results.fetch_vaccine_log.doses",
                },
                sla="1h",
            ),
            Task(
                "ship_physical",
                human="county-clerk",
                when='payload.delivery == "physical"',
                optional=True,
                input={"address": "payload.mailingAddress", "card": "results.generate_pdf.url"},
                skills=["ship_physical"],
                sla="24h",
                on_timeout=Action(reassign="SVC:courier"),
            ),
        ],
    )


if __name__ == "__main__":
    print(msgspec.json.format(msgspec.json.encode(build()).decode()))
