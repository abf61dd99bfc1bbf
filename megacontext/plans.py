"""Which experiments a training row runs (docs/design.md §4): its tree's shape, and the baseline, base and one-edit
variants whose measured losses give LensNet its per-entry utilities (megacontext.training runs them).

The candidates are random by default; hints steer some of them to the blocks most likely to matter (the
block a horizon copies from, LensNet's own favourites), so the few variants a row
can afford measure the evidence and its distractors instead of ~1 block in 30. Pure data-structure code:
torch only for the row's random stream and for reading scores.

A row is planned in two parts. Everything that follows from the row's tokens and its random stream (baseline,
base, the order in which the base's entries become candidates) is `plan_row`, integer work that the data
loader's thread does ahead of the step (megacontext.batch_plan). Which of them LensNet's favourites displace
needs LensNet's scores of the base, so that last choice is made on the device, for all rows at once
(batch_plan.choose_candidates); `RowPlan.candidates` is the same rule for one row, on the host.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

from megacontext.allocator import random_variant
from megacontext.config import MCConfig
from megacontext.entries import Edit
from megacontext.working_context import WorkingContext

COPY_NGRAM = 3  # copy_hints: tokens per n-gram matched between the horizon and older history


class SequenceShape:
    """The structure of a training row's tree (which nodes exist), without any vectors.

    Working contexts and the allocator only ask a tree how many nodes each level has; in training all of a
    row's gists are computed at once into the bank, so this stands in for a MegaContextTree.
    """

    def __init__(self, K: int, num_tokens: int, max_level: int):
        self.K, self.num_tokens = K, num_tokens
        self.levels = [num_tokens] + [num_tokens // K**lvl for lvl in range(1, max_level + 1)]
        self.max_level = max(lvl for lvl, n in enumerate(self.levels) if lvl == 0 or n > 0)

    def num_nodes(self, level: int) -> int:
        return self.levels[level] if level < len(self.levels) else 0


@dataclass
class RowPlan:
    """A row's experiments before LensNet has looked: the baseline, the base, and every entry of the base a
    one-edit variant could edit, in the order they become candidates (copy-hinted gists first, then a random
    order). A variant expands a gist, or collapses a complete raw block into its LOD1 gist."""

    baseline: WorkingContext
    base: WorkingContext
    order: list[int]  # editable entries of the base (indices into base.entries), in candidate order
    n_hinted: int  # the first n_hinted of `order` are the copy hints' gists

    @property
    def editable(self) -> list[int]:
        return sorted(self.order)

    def candidates(self, cfg: MCConfig, scores: torch.Tensor | None = None) -> list[int]:
        """The base entries the row's variants edit (sorted): the copy hints, then the cfg.lens_hints gists
        LensNet scores highest among the rest (hard negatives: what the allocator would open gets its cost
        measured), then the rest in random order; cfg.variants in all. Without scores the lens picks are
        skipped. Ties go to the earlier entry in `order`, as in batch_plan.choose_candidates."""
        order = self.order
        if scores is not None and cfg.lens_hints:
            s = scores.detach()
            rest = order[self.n_hinted :]
            top = sorted((i for i in rest if self.base.entries[i].level >= 1), key=lambda i: -float(s[i]))
            top = top[: cfg.lens_hints]
            order = order[: self.n_hinted] + top + [i for i in rest if i not in top]
        return sorted(order[: cfg.variants])

    def variant(self, i: int, shape) -> WorkingContext:
        """The base with entry i expanded (a gist) or collapsed into its LOD1 gist (a raw block)."""
        e = self.base.entries[i]
        if e.level >= 1:
            return self.base.apply([Edit("expand", e.level, e.index(self.base.K))], shape)
        return self.base.apply([Edit("collapse", 1, e.start // self.base.K)], shape)


def copy_hints(row: list[int], horizon_start: int, before: int, K: int, limit: int, n: int = COPY_NGRAM):
    """LOD1 block indices (at most `limit`, most matches first) of the tokens before position `before` that
    hold an earlier occurrence of an n-gram of the horizon (its inputs and true next tokens).

    Where a horizon repeats something older (a pass key, a value, a listed code, an identifier in code), the
    block holding the first mention is the likeliest one whose detail pays. The hints only choose which
    experiments a row runs (which gists the base zooms to LOD1 and which variants expand them): utilities are
    still measured, and neither the GPT nor LensNet ever sees the horizon's tokens before predicting them.
    """
    tail = row[max(0, horizon_start - n + 1) :]
    grams = {tuple(tail[i : i + n]) for i in range(len(tail) - n + 1)}
    counts: dict[int, int] = {}
    for p in range(max(0, before - n + 1)):
        if tuple(row[p : p + n]) in grams:
            counts[p // K] = counts.get(p // K, 0) + 1
    return sorted(counts, key=lambda b: (-counts[b], -b))[:limit]


def plan_row(
    shape: SequenceShape,
    cfg: MCConfig,
    budget: int,
    recent: int,
    rng: random.Random,
    hints: list[int] = (),
) -> RowPlan:
    """Baseline, a random base with room for one more swap, and the order of its candidate entries.

    Candidates mix both directions so LensNet sees the value of detail everywhere: expanding a gist (what
    the allocator would spend budget on) and collapsing a raw block (what it would refund budget from).
    With `hints` (copy_hints: LOD1 block indices), the base first zooms those blocks' gists to LOD1 and their
    expansions come first in the order.
    """
    K = cfg.block_size
    baseline = WorkingContext.from_tree(shape, budget, recent)
    base = random_variant(shape, budget - (K - 1), recent, rng, focus=[b * K for b in hints])
    base = WorkingContext(base.entries, K, budget, recent)
    editable = [
        i
        for i, e in enumerate(base.entries)
        if not base.is_protected(e)
        and (e.level >= 1 or e.size == K)
        and (e.level >= 1 or shape.max_level >= 1)
    ]
    rng.shuffle(editable)
    order = {b * K: j for j, b in enumerate(hints)}  # hinted LOD1 gists first, in the hints' order
    rank = [order.get(e.start, len(order)) if e.level == 1 else len(order) for e in base.entries]
    editable.sort(key=lambda i: rank[i])
    n_hinted = sum(1 for i in editable if rank[i] < len(order))
    return RowPlan(baseline, base, editable, n_hinted)


def row_rng(seed: int, row: torch.Tensor) -> random.Random:
    """A row's own random stream, keyed by the seed and the row's tokens, not by its place in the batch: the
    same row gets the same variants whichever rank or micro-batch it lands in (DDP = single process)."""
    return random.Random(f"{seed}:{zlib.crc32(row.detach().cpu().numpy().tobytes())}")
