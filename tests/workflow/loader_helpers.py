"""What the loader tests share: a workflow's head, steps under it, and the problems
the checker finds, with where it points."""

from __future__ import annotations

from textwrap import dedent, indent

from hms_bus.workflow.loader import Problem, check_text

HEAD = "id: w\nprefix: W\nsteps:\n"  # lines 1-3; steps start on line 4


def steps(block: str) -> str:
    """HEAD plus a dedented block of steps, indented two spaces under `steps:`."""
    return HEAD + indent(dedent(block), "  ")


def problems(text: str) -> list[Problem]:
    return check_text(dedent(text), "wf.yaml")[1]


def only(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def at(problem: Problem) -> tuple[int, int]:
    return problem.line, problem.col
