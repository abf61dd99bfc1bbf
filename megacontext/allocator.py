"""Focus allocator: LensNet's signed scores -> legal, budget-respecting expand/collapse edits (docs/design.md §3).

Every swap moves the cost by exactly K-1 (a gist of cost 1 <-> K children: K gists, or one raw block of
K tokens), so the allocator keeps the budget by construction: collapses refund K-1, and an expand is
emitted only when the running cost has room for it. Nothing is trimmed afterwards. Hysteresis: a node may
not flip direction (expand <-> collapse) within `cooldown` refocuses of its last edit, so the WC does not
thrash when scores hover around the thresholds. Pure data-structure code; torch only to read scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megacontext.entries import Edit, Entry, children
from megacontext.working_context import WorkingContext, node_exists

__all__ = [
    "Candidate",
    "Edit",
    "FocusAllocator",
    "flank_scores",
    "lookahead_scores",
    "normalize_scores",
    "random_variant",
]


@dataclass(frozen=True)
class Candidate:
    """A legal edit with its score (expand: the entry's score; collapse: mean over the K siblings)."""

    edit: Edit
    score: float
    members: tuple[int, ...]  # indices of the WC entries it replaces (no two emitted edits share one)


def _read_scores(scores, n: int) -> list[float]:
    if isinstance(scores, torch.Tensor):
        values = scores.detach().reshape(-1).float().cpu().tolist()
    else:
        values = [float(s) for s in scores]
    if len(values) != n:
        raise ValueError(f"got {len(values)} scores for a working context of {n} entries")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("focus scores must be finite (LensNet emits tanh values in [-1, 1])")
    return values


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """tanh of the z-score over the entries: relative focus (above or below this WC's average by a margin),
    so the thresholds mean the same for any scorer. A WC whose scores are all equal gets zeros (nothing stands
    out). LensNet's raw scores stayed within +-0.05, under any useful threshold (docs/log.md)."""
    centred = scores - scores.mean()
    return torch.tanh(centred / (scores.std(unbiased=False) + 1e-6))


def flank_scores(wc: WorkingContext, s: list[float]) -> list[float]:
    """Per-entry scores where a LOD1 gist or raw block just before or after an opened raw block (older than the
    protected recent tail) scores at least as high as that block. A block starts and ends mid-sentence: the
    label that names a key often ends in the block before the key's (the lens ranked that one 4th to 11th), and
    the sentence that repeats the key with its label follows in the next one (docs/log.md). Only the opened
    block's own score is passed on, so a flank does not pull in the block beyond it in turn."""
    es, out = wc.entries, list(s)
    opened = [e.level == 0 and not wc.is_protected(e) for e in es]
    for i, e in enumerate(es):
        if e.level > 1 or wc.is_protected(e):
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(es) and opened[j]:
                out[i] = max(out[i], s[j])
    return out


def collapse_groups(wc: WorkingContext, tree) -> list[tuple[Edit, tuple[int, ...]]]:
    """Every legal collapse of `wc`: a complete unprotected raw block whose LOD1 gist exists, or K
    consecutive level-n gists forming one parent that exists in the tree (so never above the top level)."""
    K, es, out = wc.K, wc.entries, []
    for i, e in enumerate(es):
        if wc.is_protected(e):
            break  # entries are in time order: everything from here on is recent
        if e.level == 0:
            if e.size == K and node_exists(tree, 1, e.start // K):
                out.append((Edit("collapse", 1, e.start // K), (i,)))
            continue
        span = K ** (e.level + 1)
        if e.start % span or i + K > len(es) or not node_exists(tree, e.level + 1, e.start // span):
            continue
        group = es[i : i + K]
        if all(g.level == e.level for g in group) and not any(wc.is_protected(g) for g in group):
            out.append((Edit("collapse", e.level + 1, e.start // span), tuple(range(i, i + K))))
    return out


def expandable(entry: Entry, tree, K: int) -> bool:
    """A gist can be expanded when all its children are in the tree (LOD1 children are the raw tokens)."""
    if entry.level < 1:
        return False
    if entry.level == 1:
        return entry.end <= tree.num_tokens
    return node_exists(tree, entry.level - 1, (entry.index(K) + 1) * K - 1)


def lookahead_scores(
    wc: WorkingContext,
    tree,
    score_fn: Callable[[WorkingContext], torch.Tensor] | None = None,
    max_level: int | None = None,
    score_many: Callable[[list[WorkingContext]], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Per-entry scores from the scorer, where a gist of level >= 2 (and <= max_level, if given) scores as the
    best of itself and its descendants down to LOD1, each scored in a WC with its ancestors expanded (a what-if
    context).

    Why: one expansion of a LOD2 gist yields K LOD1 gists, still no raw token, so a scorer trained on measured
    one-edit utilities rates it low even when it hides the evidence; with look-ahead the allocator zooms in
    over successive refocuses, the way a search descends a tree. A level-L gist costs 1 + K + ... + K^(L-2)
    scored contexts, which is why the chat session caps it (max_level). The contexts of one depth go to the
    scorer together: `score_many(wcs) -> scores per wc` (the session scores them in one padded LensNet call);
    given only `score_fn` (one WC at a time), they are scored one by one.
    """
    if score_many is None:
        score_many = lambda wcs: [score_fn(w) for w in wcs]  # noqa: E731
    K = wc.K

    def deeper(ctx: WorkingContext, at: range, root: int) -> list[tuple[WorkingContext, int, int]]:
        """(what-if context, index of the first child there, root entry) for each expandable gist at `at`."""
        return [
            (_expanded(ctx, i), i, root)
            for i in at
            if ctx.entries[i].level >= 2 and expandable(ctx.entries[i], tree, K)
        ]

    capped = [i for i, e in enumerate(wc.entries) if max_level is None or e.level <= max_level]
    frontier = [f for i in capped for f in deeper(wc, range(i, i + 1), i)]
    first = score_many([wc] + [ctx for ctx, _, _ in frontier])
    scores, outs = first[0].detach().float().clone(), first[1:]
    while frontier:
        nxt = []
        for (ctx, i, root), s in zip(frontier, outs):
            scores[root] = torch.maximum(scores[root], s.detach().float()[i : i + K].max())
            nxt += deeper(ctx, range(i, i + K), root)
        frontier = nxt
        outs = score_many([ctx for ctx, _, _ in frontier]) if frontier else []
    return scores


def _expanded(wc: WorkingContext, i: int) -> WorkingContext:
    """wc with entry i replaced by its K children: for scoring only, never applied (it may exceed the budget)."""
    entries = [*wc.entries[:i], *children(wc.entries[i], wc.K), *wc.entries[i + 1 :]]
    cost = sum(e.cost for e in entries)
    return WorkingContext(entries, wc.K, max(wc.budget, cost), wc.recent)


class FocusAllocator:
    """Turns per-entry focus scores into at most `n_diff` edits per refocus."""

    def __init__(
        self,
        K: int,
        budget: int,
        recent: int,
        tau_expand: float = 0.1,
        tau_collapse: float = 0.1,
        n_diff: int = 4,
        cooldown: int = 2,
        mode: Literal["greedy", "stochastic"] = "greedy",
        temperature: float = 1.0,
        seed: int | None = None,
        flank: bool = False,
    ):
        if mode not in ("greedy", "stochastic"):
            raise ValueError(f"mode must be 'greedy' or 'stochastic', got {mode!r}")
        if K < 2 or budget < 0 or recent < 0 or n_diff < 0 or cooldown < 0 or temperature <= 0:
            raise ValueError("need K >= 2 and non-negative budget, recent, n_diff, cooldown; temperature > 0")
        self.K, self.budget, self.recent = K, budget, recent
        self.tau_expand, self.tau_collapse = tau_expand, tau_collapse
        self.n_diff, self.cooldown, self.mode, self.temperature = n_diff, cooldown, mode, temperature
        self.flank = flank  # the blocks beside an opened raw block score as it (flank_scores)
        self.rng = random.Random(seed)
        self.refocus_count = 0  # number of refocuses committed so far
        self.last_edit: dict[tuple[int, int], tuple[int, str]] = {}  # node -> (refocus number, kind)

    def _scores(self, wc: WorkingContext, scores) -> list[float]:
        s = _read_scores(scores, wc.num_entries)
        return flank_scores(wc, s) if self.flank else s

    def room(self, wc: WorkingContext, score_fn: Callable[[], torch.Tensor], tree, need: int) -> list[Edit]:
        """Collapses that free at least `need` slots (fewer where not enough can be collapsed), what the scores
        value least first; score_fn() runs only when something is collapsible. For new tokens that overflow a
        full WC between refocuses: they must enter raw, and the room should not come from the oldest raw
        block, often the evidence the focus just opened (docs/log.md). No cooldown: the text must fit."""
        groups = collapse_groups(wc, tree) if need > 0 else []
        if not groups:
            return []
        s = self._scores(wc, score_fn())
        edits, used = [], set()
        for edit, members in sorted(groups, key=lambda g: sum(s[i] for i in g[1]) / len(g[1])):
            if need <= 0:
                break
            if used.isdisjoint(members):
                edits.append(edit)
                used.update(members)
                need -= self.K - 1
        return edits

    def allowed(self, edit: Edit) -> bool:
        """Hysteresis: a node's direction may flip only after `cooldown` refocuses since its last edit."""
        last = self.last_edit.get(edit.node)
        return last is None or last[1] == edit.kind or self.refocus_count - last[0] > self.cooldown

    def candidates(self, wc: WorkingContext, scores, tree) -> tuple[list[Candidate], list[Candidate]]:
        """(collapses most negative first, expands most positive first), legal and past the thresholds."""
        if (wc.K, wc.budget, wc.recent) != (self.K, self.budget, self.recent):
            raise ValueError(
                f"allocator (K={self.K}, budget={self.budget}, recent={self.recent}) does not match the working "
                f"context (K={wc.K}, budget={wc.budget}, recent={wc.recent})"
            )
        s = self._scores(wc, scores)
        collapses = []
        for edit, members in collapse_groups(wc, tree):
            mean = sum(s[i] for i in members) / len(members)
            if mean < -self.tau_collapse and self.allowed(edit):
                collapses.append(Candidate(edit, mean, members))
        expands = []
        for i, e in enumerate(wc.entries):
            if s[i] > self.tau_expand and expandable(e, tree, self.K):
                edit = Edit("expand", e.level, e.index(self.K))
                if self.allowed(edit):
                    expands.append(Candidate(edit, s[i], (i,)))
        collapses.sort(key=lambda c: c.score)
        expands.sort(key=lambda c: -c.score)
        return collapses, expands

    def propose(self, wc: WorkingContext, scores, tree) -> list[Edit]:
        """The edits for this refocus, in an order whose every prefix stays within budget."""
        collapses, expands = self.candidates(wc, scores, tree)
        swing = self.K - 1  # every swap changes the cost by exactly this much
        edits: list[Edit] = []
        touched: set[int] = set()
        cost = wc.cost

        def take(c: Candidate) -> None:
            nonlocal cost
            edits.append(c.edit)
            touched.update(c.members)
            cost += swing if c.edit.kind == "expand" else -swing

        if self.mode == "stochastic":
            pool = collapses + expands
            while len(edits) < self.n_diff:
                eligible = [
                    c
                    for c in pool
                    if touched.isdisjoint(c.members)
                    and (c.edit.kind == "collapse" or cost + swing <= self.budget)
                ]
                if not eligible:
                    break
                logits = [abs(c.score) / self.temperature for c in eligible]
                top = max(logits)
                choice = self.rng.choices(eligible, weights=[math.exp(x - top) for x in logits])[0]
                take(choice)
                pool.remove(choice)
            return edits

        # greedy: alternate refund and spend, most extreme first
        ci = ei = 0
        while len(edits) < self.n_diff:
            progressed = False
            while ci < len(collapses):
                c, ci = collapses[ci], ci + 1
                if touched.isdisjoint(c.members):
                    take(c)
                    progressed = True
                    break
            if len(edits) >= self.n_diff:
                break
            while ei < len(expands):
                c = expands[ei]
                if not touched.isdisjoint(c.members):
                    ei += 1
                    continue
                if cost + swing > self.budget:
                    break  # no room: wait for a later collapse to refund, never overdraw
                take(c)
                ei += 1
                progressed = True
                break
            if not progressed:
                break
        # Budget swaps: an expansion still waiting for room may take it from the lowest-scoring collapsible
        # group even when that group is not below -tau_collapse, as long as the trade is clearly worth it
        # (scores differ by more than the whole hysteresis band). Otherwise a full WC keeps detail it no
        # longer needs while the evidence the lens ranks first stays gisted: the thresholds are absolute,
        # the budget is zero-sum.
        band = self.tau_expand + self.tau_collapse
        pending = [c for c in expands[ei:] if touched.isdisjoint(c.members)]
        if pending and len(edits) + 2 <= self.n_diff:
            s = self._scores(wc, scores)
            groups = []
            for edit, members in collapse_groups(wc, tree):
                if self.allowed(edit):
                    groups.append(Candidate(edit, sum(s[i] for i in members) / len(members), members))
            groups.sort(key=lambda c: c.score)
            for e in pending:
                if len(edits) + 2 > self.n_diff or not touched.isdisjoint(e.members):
                    continue
                if cost + swing <= self.budget:
                    take(e)
                    continue
                g = next(
                    (g for g in groups if touched.isdisjoint(g.members) and e.members[0] not in g.members),
                    None,
                )
                if g is None or e.score - g.score <= band:
                    break
                take(g)
                take(e)
        return edits

    def commit(self, edits: list[Edit]) -> None:
        """Record the edits of this refocus for the cooldown and advance the refocus counter."""
        for edit in edits:
            self.last_edit[edit.node] = (self.refocus_count, edit.kind)
        self.refocus_count += 1
        horizon = self.refocus_count - self.cooldown  # older records can no longer block a flip
        self.last_edit = {node: rec for node, rec in self.last_edit.items() if rec[0] >= horizon}

    def refocus(self, wc: WorkingContext, scores, tree) -> tuple[WorkingContext, list[Edit]]:
        """propose + apply + commit: the new working context and the edits that made it."""
        edits = self.propose(wc, scores, tree)
        new_wc = wc.apply(edits, tree)
        self.commit(edits)
        return new_wc, edits

    def state_dict(self) -> dict:
        return {
            "refocus_count": self.refocus_count,
            "last_edit": [[lvl, idx, step, kind] for (lvl, idx), (step, kind) in self.last_edit.items()],
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.refocus_count = int(state["refocus_count"])
        self.last_edit = {(lvl, idx): (step, kind) for lvl, idx, step, kind in state["last_edit"]}
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))


def random_variant(
    tree, budget: int, recent: int, rng: random.Random, focus: Sequence[int] = ()
) -> WorkingContext:
    """A legal working context covering the whole sequence, for training variants (docs/design.md §4).

    Starts from the coarsest tiling; first zooms the gists covering the token positions in `focus` down to
    LOD1 (in order, while the budget has room), then expands random gists until the budget has no room for
    another swap. Each random draw first picks a level uniformly among those with expandable gists, then a
    gist of that level, so variants mix LOD0/1/2 in different proportions instead of always zooming the
    finest level.
    """
    wc = WorkingContext.coarsest(tree, budget, recent)
    K, entries, cost = tree.K, list(wc.entries), wc.cost
    for pos in focus:
        while cost + K - 1 <= budget:
            i = next((j for j, e in enumerate(entries) if e.start <= pos < e.end), None)
            if i is None or entries[i].level <= 1 or not expandable(entries[i], tree, K):
                break
            entries[i : i + 1] = children(entries[i], K)
            cost += K - 1
    while cost + K - 1 <= budget:
        by_level: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            if expandable(e, tree, K):
                by_level.setdefault(e.level, []).append(i)
        if not by_level:
            break
        i = rng.choice(by_level[rng.choice(sorted(by_level))])
        entries[i : i + 1] = children(entries[i], K)
        cost += K - 1
    out = WorkingContext(entries, K, budget, recent)
    out.check(tree)
    return out
