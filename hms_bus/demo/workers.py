"""Simulated AI and service workers for every `AI:` and `SVC:` lane of the examples.

Each lane has a pure *answer* (task input in, output out: no I/O, no randomness, so
the same payload always takes the same path) and a *work time*, the seconds the
simulated service takes (scaled by `pace`: the tests run at a fraction of it). The
answers read the payload the way the real service would: the fraud labeler looks for
the signals of an impostor scam, the fraud database knows some robocallers, the form
validator reports missing documents. `DEMO_EVENTS` are written against them.

`demo_workers(pace)` builds one `Worker` per lane for `hms demo`. For a worker process
of its own, every lane also has a module-level `Worker` (at full pace), e.g.

    hms worker run hms_bus.demo.workers:fraud_labeler
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import anyio

from hms_bus.messages import Task
from hms_bus.subjects import Lane
from hms_bus.worker import PermanentTaskError, TaskContext, Worker
from hms_bus.workflow.model import FanoutStep, TaskStep, Workflow

__all__ = [
    "ANSWERS",
    "KNOWN_ROBOCALLERS",
    "Answer",
    "Simulation",
    "demo_workers",
    "lanes_of",
    "missing_lanes",
    "simulate",
]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Answer = Callable[[Mapping[str, Any]], JSON]

#: Caller ids the simulated fraud database knows, with their carrier.
KNOWN_ROBOCALLERS = {"202-555-0199": "VoIP-X", "888-555-0123": "SpoofCo"}

#: What makes the simulated AI call a complaint High severity (an impostor scam).
HIGH_SIGNALS = ("gift card", "irs", "wire transfer", "social security", "bitcoin", "arrest")


def _digits(text: str, n: int) -> str:
    """`n` stable digits derived from `text` (the same in every process)."""
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return str(value % 10**n).zfill(n)


def _signals(text: str) -> list[str]:
    low = text.lower()
    return [s for s in HIGH_SIGNALS if s in low]


# -- FCC robocall --------------------------------------------------------------------------
def _form_validator(i: Mapping[str, Any]) -> JSON:
    phones = [str(p).strip() for p in i.get("phones") or [] if str(p).strip()]
    if not phones:
        raise PermanentTaskError("the form names no caller id")
    unique = list(dict.fromkeys(phones))
    return {"phones": unique, "valid": True, "duplicates": len(phones) - len(unique)}


def _fraud_db(i: Mapping[str, Any]) -> JSON:
    phone = str(i.get("phone", ""))
    carrier = KNOWN_ROBOCALLERS.get(phone)
    if carrier is None:
        return {"phone": phone, "match": False}
    return {"phone": phone, "match": True, "carrier": carrier}


def _robocall_agent(i: Mapping[str, Any]) -> JSON:
    matches = [m for m in i.get("matches") or [] if isinstance(m, dict) and m.get("match")]
    signals = _signals(str(i.get("notes", "")))
    score = min(0.99, 0.35 + 0.3 * len(matches) + 0.15 * len(signals))
    reasons = [f"{len(matches)} known robocaller(s)"] if matches else []
    reasons += [f"threat: {s}" for s in signals]
    return {
        "needs_human": bool(matches or signals),
        "score": round(score, 2),
        "reasons": reasons or ["no known caller, no threat"],
    }


def _notifier(i: Mapping[str, Any]) -> JSON:
    to = i.get("to")
    if not to:
        raise PermanentTaskError("no address to notify")
    return {"sent": True, "to": to, "message_id": f"msg-{_digits(repr(sorted(i.items())), 8)}"}


# -- FTC complaint -------------------------------------------------------------------------
def _fraud_labeler(i: Mapping[str, Any]) -> JSON:
    signals = _signals(str(i.get("text", "")))
    return {
        "severity": "High" if signals else "Low",
        "signals": signals,
        "confidence": 0.93 if signals else 0.71,
    }


# -- vaccine card --------------------------------------------------------------------------
def _dmv_verifier(i: Mapping[str, Any]) -> JSON:
    if not i.get("name") or not i.get("birth_date"):
        raise PermanentTaskError("name and birth date are needed to match a DMV record")
    return {"recordId": f"DMV-{_digits(str(i.get('citizen')), 4)}", "verified": True}


def _immunization_registry(i: Mapping[str, Any]) -> JSON:
    return {
        "doses": ["2021-03-01", "2021-03-29"],
        "record": i.get("dmv_record"),
        "source": "state IIS",
    }


def _pdf_generator(i: Mapping[str, Any]) -> JSON:
    citizen = str(i.get("citizen", "card"))
    return {"url": f"https://cards.example.gov/{citizen}.pdf", "doses": len(i.get("doses") or [])}


def _courier(i: Mapping[str, Any]) -> JSON:
    return {"tracking": f"1Z{_digits(str(i.get('address')), 8)}", "carrier": "courier"}


# -- loan forgiveness ------------------------------------------------------------------------
def _fsa(i: Mapping[str, Any]) -> JSON:
    form = i.get("form") or {}
    if not isinstance(form, dict) or "income" not in form:
        raise PermanentTaskError("the form has no income")
    return {"missing_documents": not form.get("documents"), "valid": True}


def _irs(i: Mapping[str, Any]) -> JSON:
    income = float(i.get("income") or 0)
    eligible = income <= 125_000
    return {
        "eligible": eligible,
        "amount": 9000 if eligible else 0,
        "documents": i.get("documents"),
    }


def _treasury(i: Mapping[str, Any]) -> JSON:
    amount = float(i.get("eligible_amount") or 0)
    return {"credited": amount, "balance": max(0.0, 9000 - amount)}


# -- passport renewal ------------------------------------------------------------------------
def _ocr_extractor(i: Mapping[str, Any]) -> JSON:
    scan = str(i.get("scan", ""))
    stem = PurePosixPath(scan).stem or "applicant"
    return {"passport_no": _digits(scan, 9), "name": stem.replace("-", " ").title()}


def _print_plant(i: Mapping[str, Any]) -> JSON:
    return {"tracking": f"USPS-{_digits(str(i.get('passport_no')), 5)}", "eta_days": 5}


@dataclass(frozen=True, slots=True)
class Simulation:
    """One simulated lane: its answer and how long the service takes (seconds)."""

    lane: str
    answer: Answer
    work: float


ANSWERS: dict[str, Simulation] = {
    s.lane: s
    for s in (
        Simulation("SVC:form-validator", _form_validator, 0.2),
        Simulation("SVC:fraud-db", _fraud_db, 0.4),
        Simulation("AI:robocall-agent", _robocall_agent, 0.8),
        Simulation("SVC:complainant-notifier", _notifier, 0.2),
        Simulation("AI:fraud-labeler", _fraud_labeler, 0.6),
        Simulation("SVC:email-svc", _notifier, 0.2),
        Simulation("AI:dmv-verifier", _dmv_verifier, 0.5),
        Simulation("AI:immunization-registry", _immunization_registry, 0.6),
        Simulation("AI:immunization-registry-backup", _immunization_registry, 0.9),
        Simulation("SVC:pdf-generator", _pdf_generator, 0.4),
        Simulation("SVC:courier", _courier, 0.3),
        Simulation("SVC:fsa", _fsa, 0.2),
        Simulation("SVC:irs", _irs, 0.7),
        Simulation("SVC:treasury", _treasury, 0.4),
        Simulation("SVC:email", _notifier, 0.2),
        Simulation("AI:ocr-extractor", _ocr_extractor, 0.8),
        Simulation("SVC:print-plant", _print_plant, 1.0),
        Simulation("SVC:citizen-notifier", _notifier, 0.2),
    )
}


def simulate(sim: Simulation, *, pace: float = 1.0, concurrency: int = 10) -> Worker:
    """A `Worker` for one simulated lane: report progress, take the work time (times
    `pace`), answer. The answer's errors are the function's (permanent ones fail the
    attempt for good, as a real service's refusal would)."""

    async def work(task: Task, ctx: TaskContext) -> JSON:
        await ctx.progress(f"simulated {sim.lane}")
        if sim.work * pace > 0:
            await anyio.sleep(sim.work * pace)
        output = sim.answer(task.input)
        log.debug("demo %s answered %s for %s", sim.lane, output, task.task)
        return output

    name = sim.lane.split(":", 1)[1].replace("-", "_")
    work.__name__ = work.__qualname__ = name
    return Worker(work, Lane.parse(sim.lane), concurrency, version="demo")


def demo_workers(pace: float = 1.0, lanes: Iterable[str] | None = None) -> list[Worker]:
    """One simulated worker per lane (every lane of `ANSWERS`, or those named)."""
    wanted = list(ANSWERS) if lanes is None else list(lanes)
    return [simulate(ANSWERS[lane], pace=pace) for lane in wanted if lane in ANSWERS]


def lanes_of(workflows: Iterable[Workflow]) -> set[str]:
    """Every AI/SVC actor the workflows name, reassignment targets included."""
    found: set[str] = set()
    for workflow in workflows:
        for step in workflow.steps:
            if isinstance(step, TaskStep | FanoutStep):
                found.add(step.actor)
            escalation = getattr(step, "on_timeout", None)
            for rung in escalation.rungs if escalation is not None else ():
                if rung.action.reassign:
                    found.add(rung.action.reassign)
    return {a for a in found if not a.startswith("HUMAN:")}


def channels_of(workflows: Iterable[Workflow]) -> set[str]:
    """Every notification channel the workflows' escalations name."""
    found: set[str] = set()
    for workflow in workflows:
        for step in workflow.steps:
            escalation = getattr(step, "on_timeout", None)
            for rung in escalation.rungs if escalation is not None else ():
                found.update(rung.action.notify)
    return found


def missing_lanes(workflows: Iterable[Workflow]) -> list[str]:
    """AI/SVC lanes the workflows need that no simulated worker serves."""
    return sorted(lanes_of(workflows) - set(ANSWERS))


# Module-level task functions, one per lane, for `hms worker run hms_bus.demo.workers:NAME`.
form_validator = simulate(ANSWERS["SVC:form-validator"])
fraud_db = simulate(ANSWERS["SVC:fraud-db"])
robocall_agent = simulate(ANSWERS["AI:robocall-agent"])
complainant_notifier = simulate(ANSWERS["SVC:complainant-notifier"])
fraud_labeler = simulate(ANSWERS["AI:fraud-labeler"])
email_svc = simulate(ANSWERS["SVC:email-svc"])
dmv_verifier = simulate(ANSWERS["AI:dmv-verifier"])
immunization_registry = simulate(ANSWERS["AI:immunization-registry"])
immunization_registry_backup = simulate(ANSWERS["AI:immunization-registry-backup"])
pdf_generator = simulate(ANSWERS["SVC:pdf-generator"])
courier = simulate(ANSWERS["SVC:courier"])
fsa = simulate(ANSWERS["SVC:fsa"])
irs = simulate(ANSWERS["SVC:irs"])
treasury = simulate(ANSWERS["SVC:treasury"])
email = simulate(ANSWERS["SVC:email"])
ocr_extractor = simulate(ANSWERS["AI:ocr-extractor"])
print_plant = simulate(ANSWERS["SVC:print-plant"])
citizen_notifier = simulate(ANSWERS["SVC:citizen-notifier"])
