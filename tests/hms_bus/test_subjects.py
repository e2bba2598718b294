"""`subjects.md` is the contract for clients in other languages: keep it equal to the code.

Checked: every stream (subjects, retention, max age, duplicate window), every
durable consumer (filters, ack wait, max deliver) and every KV bucket (history, TTL)
that `declare()` creates has a row in subjects.md with the same values; every wire
type has a section with a field table naming each of its fields and a JSON example
that decodes, strictly, into that type. And no module but `hms_bus/subjects.py`
formats a subject string.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import msgspec
import pytest

from hms_bus import messages
from hms_bus.errors import InvalidNameError
from hms_bus.facts import facts_id
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import DUPLICATE_WINDOW, declare

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "subjects.md").read_text()
DOC_NS = Namespace("hms")


def _table_rows(heading: str) -> dict[str, list[str]]:
    """Rows of the first table under `## heading`, keyed by their first cell."""
    section = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            if rows:
                break  # the end of the first table
            continue
        if not set(line) <= set("|-: "):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _age(seconds: float) -> str:
    return "forever" if not seconds else f"{seconds / 86400:g}d"


def test_every_stream_is_documented_with_its_settings() -> None:
    rows = _table_rows("Streams")
    for spec in declare(DOC_NS).streams:
        row = rows.get(spec.name)
        assert row is not None, f"stream {spec.name} missing from subjects.md"
        assert row[1] == ", ".join(spec.subjects), spec.name
        assert row[2] == spec.retention, spec.name
        assert row[3] == _age(spec.max_age), spec.name
        assert row[4] == f"{DUPLICATE_WINDOW:g}s", spec.name
    assert len(rows) - 1 == len(declare(DOC_NS).streams)  # minus the header row


def test_every_consumer_is_documented_with_its_settings() -> None:
    rows = _table_rows("Durable consumers")
    for spec in declare(DOC_NS).consumers:
        row = rows.get(spec.durable)
        assert row is not None, f"consumer {spec.durable} missing from subjects.md"
        assert row[1] == spec.stream
        assert row[2] == ", ".join(spec.filter_subjects), spec.durable
        assert row[3] == f"{spec.ack_wait:g}s", spec.durable
        assert row[4] == str(spec.max_deliver), spec.durable
    assert len(rows) - 1 == len(declare(DOC_NS).consumers)


def test_every_bucket_is_documented_with_its_settings() -> None:
    rows = _table_rows("Key-value buckets")
    for spec in declare(DOC_NS).buckets:
        row = rows.get(spec.name)
        assert row is not None, f"bucket {spec.name} missing from subjects.md"
        assert row[1] == str(spec.history), spec.name
        assert row[2] == (f"{spec.ttl:g}s" if spec.ttl else "none"), spec.name
    assert len(rows) - 1 == len(declare(DOC_NS).buckets)


def _wire_types() -> list[type[messages.Message]]:
    return [
        obj
        for name in messages.__all__
        if inspect.isclass(obj := getattr(messages, name))
        and issubclass(obj, messages.Message)
        and obj is not messages.Message
    ]


@pytest.mark.parametrize("cls", _wire_types(), ids=lambda c: c.__name__)
def test_every_message_has_a_field_table_and_a_decoding_example(
    cls: type[messages.Message],
) -> None:
    match = re.search(rf"^### `{cls.__name__}`\n(.*?)(?=^### |^## |\Z)", DOC, re.M | re.S)
    assert match, f"subjects.md has no '### `{cls.__name__}`' section"
    section = match.group(1)
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == set(cls.__struct_fields__), f"{cls.__name__}: field table differs"
    example = re.search(r"```json\n(.*?)```", section, re.S)
    assert example, f"{cls.__name__}: no JSON example"
    decoded = msgspec.json.decode(example.group(1).encode(), type=cls, strict=True)
    assert isinstance(decoded, cls)
    assert f'"type": "{cls.__name__}"' in example.group(1)
    if isinstance(decoded, messages.Facts):  # its id is computed: the example's must be right
        assert decoded.id == facts_id(decoded.facts)


def test_namespace_rejects_tokens_that_would_change_a_subject() -> None:
    for bad in ("a.b", "a*", "a>", "a b", "", "ä"):
        with pytest.raises(InvalidNameError):
            Namespace(bad)
        with pytest.raises(InvalidNameError):
            DOC_NS.event(bad)
    with pytest.raises(InvalidNameError, match="AI, HUMAN, SVC"):
        Lane.parse("BOT:x")
    assert DOC_NS.task(Lane.parse("AI:fraud-labeler")) == "hms.task.AI.fraud-labeler"


# A literal naming a subject level of ours, e.g. "hms.events." or f"{root}.cmd.".
_SUBJECT_LITERAL = re.compile(
    r"\.(events|cmd|result|route|task|cancel|timer|audit|ledger|notify|dlq)\.|\$JS\.EVENT"
)


def _literals(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values
            )
            found.append((node.lineno, text))
    return found


def test_no_subject_is_formatted_outside_the_subjects_module() -> None:
    offenders = []
    for path in sorted(
        [*REPO.joinpath("hms_bus").rglob("*.py"), *REPO.joinpath("actors").rglob("*.py")]
    ):
        if path.name == "subjects.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant | ast.JoinedStr) and id(node) not in docstrings:
                for lineno, text in _literals(node):
                    if _SUBJECT_LITERAL.search(text):
                        offenders.append(f"{path.relative_to(REPO)}:{lineno}: {text!r}")
    assert offenders == []
