"""How facts travel to the ledger: an input's facts batched into as few messages as
fit (`Facts`), and read back out of whatever an audit subject carries.

Each message costs every actor on its way (a publish, a PubAck, a store, a delivery,
an ack) far more than its bytes, and most inputs yield two facts or more; the ledger
chains each fact of a batch as if it had come alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from hms_bus.messages import Fact, Facts, encode

__all__ = ["batch_facts", "facts_of"]

#: Bytes of a `Facts` message besides its facts (its type, id and brackets), at most.
_ENVELOPE = 1024


def batch_facts(facts: Sequence[Fact], limit: int) -> list[Fact | Facts]:
    """`facts` as few messages as fit in `limit` bytes each, in order: a lone fact
    goes as itself, several as a `Facts`. A fact too large for any message goes alone
    (and is refused when published, as it would be unbatched)."""
    out: list[Fact | Facts] = []
    group: list[Fact] = []
    budget = limit - _ENVELOPE
    used = 0
    for fact in facts:
        size = len(encode(fact)) + 1  # and a comma
        if group and used + size > budget:
            out.append(_facts_message(group))
            group, used = [], 0
        group.append(fact)
        used += size
    if group:
        out.append(_facts_message(group))
    return out


def facts_of(message: Fact | Facts) -> tuple[Fact, ...]:
    """The facts an audit message carries, in order."""
    return message.facts if isinstance(message, Facts) else (message,)


def _facts_message(group: list[Fact]) -> Fact | Facts:
    if len(group) == 1:
        return group[0]
    return Facts(id=f"{group[0].id}/facts", facts=tuple(group))
