"""Settling the focus: the one loop that chat and evaluation share.

After a prompt or a pasted document arrives, one refocus (at most n_diff edits) rarely reaches old evidence:
it sits inside a LOD2 gist that must first be expanded to LOD1 gists, then the right one to raw tokens, and
the budget for it must be refunded elsewhere. So after an ingest the session refocuses until the working
context settles (`settle`), bounded; the evaluation views run the same session, so a recall figure mc_eval
prints is what a chat user gets (measured before: one refocus answered 0 / 10 passkeys where the settled
focus answered 6 / 10).

Gist levels GistNet was never trained to make are not used (`LevelCap`): a working context uses the trained
levels and goes coarser only when the history does not fit the budget otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_REFOCUS_ROUNDS = 12  # a settle is bounded: 12 rounds x n_diff edits is ample for LOD2 -> LOD1 -> raw


class LevelCap:
    """A read-only view of a tree that hides levels above `cap` (levels GistNet was never trained on)."""

    def __init__(self, tree, cap: int):
        self.tree, self.cap = tree, cap
        self.node_cache: dict = {}  # span means / token sets of complete nodes, for LensNet (lens_inputs.py)

    def __getattr__(self, name):
        return getattr(self.tree, name)

    def num_nodes(self, level: int) -> int:
        return self.tree.num_nodes(level) if level <= self.cap else 0

    @property
    def max_level(self) -> int:
        return min(self.tree.max_level, self.cap)


def settle(refocus: Callable[[], list], cooldown: int, max_rounds: int = MAX_REFOCUS_ROUNDS) -> int:
    """Call refocus() (one round: returns its edits) until no edit for cooldown + 1 rounds in a row, at most
    max_rounds. An edit-less round still counts for the cooldown, as a refocus every K tokens does in a chat,
    so a node just expanded may be collapsed again once its cooldown is over (e.g. to refund the raw evidence
    found inside a sibling). Returns the number of edits made."""
    n_edits = idle = 0
    for _ in range(max_rounds):
        edits = refocus()
        n_edits += len(edits)
        idle = 0 if edits else idle + 1
        if idle > cooldown:
            break
    return n_edits
