"""Load workflow files: YAML in, a validated `Workflow` out, or every problem at once.

`hms workflow validate FILE...` is `validate_paths` plus printing: one line per
problem as `FILE:LINE:COL: message`, exit 2 if there is any. The checks themselves
live in `validate` (shared with the Python builder); this module only reads files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hms_bus.workflow.model import Workflow
from hms_bus.workflow.source import Problem, WorkflowError, from_yaml
from hms_bus.workflow.validate import build

__all__ = [
    "Problem",
    "WorkflowError",
    "check_text",
    "load_workflow",
    "load_workflow_text",
    "validate_paths",
]


def check_text(text: str, filename: str = "<string>") -> tuple[Workflow | None, list[Problem]]:
    """The workflow in `text` and the problems found (the workflow is None if any)."""
    root, problems = from_yaml(text, filename)
    if root is None:
        return None, problems
    workflow, more = build(root, filename)
    problems = sorted({*problems, *more})
    return (workflow if not problems else None), problems


def load_workflow_text(text: str, filename: str = "<string>") -> Workflow:
    """Parse and validate YAML text; raises WorkflowError listing every problem."""
    workflow, problems = check_text(text, filename)
    if workflow is None:
        raise WorkflowError(problems)
    return workflow


def _read(path: Path) -> tuple[str | None, Problem | None]:
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return None, Problem(str(path), 1, 1, "no such file")
    except IsADirectoryError:
        return None, Problem(str(path), 1, 1, "is a directory, not a workflow file")
    except UnicodeDecodeError as exc:
        return None, Problem(str(path), 1, 1, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
    except OSError as exc:
        return None, Problem(str(path), 1, 1, f"cannot read: {exc.strerror or exc}")


def load_workflow(path: str | Path) -> Workflow:
    """Load one workflow file; raises WorkflowError listing every problem."""
    text, problem = _read(Path(path))
    if text is None:
        raise WorkflowError([problem] if problem else [])
    return load_workflow_text(text, str(path))


def validate_paths(paths: Sequence[str | Path]) -> list[Problem]:
    """Every problem of every file, in file order (empty: all valid)."""
    problems: list[Problem] = []
    for path in paths:
        text, problem = _read(Path(path))
        if text is None:
            problems.extend([problem] if problem else [])
            continue
        problems.extend(check_text(text, str(path))[1])
    return problems
