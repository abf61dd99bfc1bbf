"""Working-context vocabulary shared by the working context and the focus allocator (docs/design.md §2).

An `Entry` is one slot of the working context: a raw block of tokens (level 0) or one gist
(level n >= 1). An `Edit` is one atomic swap the allocator asks for. Invariant violations raise
one of the named `InvariantError`s below, whose message lists the offending entries, so a broken
working context is diagnosed from the error line alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class InvariantError(ValueError):
    """A working context breaks one of the docs/design.md §2 invariants."""


class BudgetError(InvariantError):
    """Sum of entry costs exceeds the budget W_max."""


class ContiguityError(InvariantError):
    """Entries do not tile [0, num_tokens) in order (gap, overlap, wrong coverage)."""


class AlignmentError(InvariantError):
    """An entry boundary is not a multiple of its level's block size, or a raw block is malformed."""


class LevelError(InvariantError):
    """A gist has the wrong span for its level, is not in the tree, or an edit names a missing node."""


class RecencyError(InvariantError):
    """An entry overlapping the protected recent tokens is not raw, or an edit touches one."""


def describe(entries, limit: int = 8) -> str:
    """The offending entries as text for an error message (bounded, so a huge WC stays readable)."""
    entries = list(entries)
    text = "".join(str(e) for e in entries[:limit])
    if len(entries) > limit:
        text += f" ... (+{len(entries) - limit} more)"
    return text


@dataclass(frozen=True, order=True)
class Entry:
    """One working-context slot covering global token positions [start, end).

    level 0: a raw block (start aligned to K, at most K tokens, cost = its token count).
    level n >= 1: a gist covering exactly K**n tokens aligned to K**n (cost 1).
    """

    level: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def cost(self) -> int:
        return self.size if self.level == 0 else 1

    def index(self, K: int) -> int:
        """Index of this node at its level (for level 0: the index of its K-block)."""
        return self.start // K ** max(self.level, 1)

    def __str__(self) -> str:
        return f"[L{self.level} {self.start}:{self.end}]"


def gist_entry(level: int, index: int, K: int) -> Entry:
    """The entry of gist node (level, index); level 0 means the full raw block number `index`."""
    span = K ** max(level, 1)
    return Entry(level, index * span, (index + 1) * span)


def children(entry: Entry, K: int) -> list[Entry]:
    """What expanding a gist yields: its K child gists, or for LOD1 the one raw block it summarises."""
    if entry.level < 1:
        raise LevelError(f"cannot expand raw block {entry}: LOD0 is already the finest level")
    if entry.level == 1:
        return [Entry(0, entry.start, entry.end)]
    step = K ** (entry.level - 1)
    return [Entry(entry.level - 1, entry.start + j * step, entry.start + (j + 1) * step) for j in range(K)]


@dataclass(frozen=True)
class Edit:
    """One atomic swap. expand: the gist node (level, index) becomes its children.
    collapse: the children of node (level, index) (K gists, or for level 1 one raw block) become it.

    The pair (level, index) names the same tree node for both kinds, so "collapse then expand the same
    node" is an exact round trip and the allocator's cooldown is tracked per node.
    """

    kind: Literal["expand", "collapse"]
    level: int
    index: int

    def __post_init__(self):
        if self.kind not in ("expand", "collapse"):
            raise ValueError(f"Edit kind must be 'expand' or 'collapse', got {self.kind!r}")
        if self.level < 1 or self.index < 0:
            raise LevelError(
                f"Edit {self.kind} names node (level {self.level}, index {self.index}); "
                "only gist nodes (level >= 1, index >= 0) can be expanded or collapsed into"
            )

    @property
    def node(self) -> tuple[int, int]:
        return (self.level, self.index)

    def __str__(self) -> str:
        return f"{self.kind}(L{self.level}#{self.index})"
