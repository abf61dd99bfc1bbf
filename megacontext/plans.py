"""Which experiments a training row runs (DESIGN §4): its tree's shape, and the baseline, base and one-edit
variants whose measured losses give LensNet its per-entry utilities (megacontext.training runs them).

The candidates are random by default; hints steer some of them to the blocks most likely to matter (the
block a horizon copies from, LensNet's own favourites), so the few variants a row
can afford measure the evidence and its distractors instead of ~1 block in 30. Pure data-structure code:
torch only for the row's random stream and for reading scores.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
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
    """The working contexts of one row: index 0 = baseline, 1 = base, 2 + j = the one-edit variant of
    candidate j (an expand of a gist, or a collapse of a complete raw block into its LOD1 gist)."""

    wcs: list[WorkingContext]
    candidates: list[int]  # index into base.entries of the entry edited by variant 2 + j
    expands: list[bool]  # True: variant 2 + j expands that gist; False: it collapses that raw block
    editable: list[int]  # every entry of the base a one-edit variant could have edited (sorted)


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
    score: Callable[[WorkingContext], torch.Tensor] | None = None,
) -> RowPlan:
    """Baseline, a random base with room for one more swap, and up to N distinct one-edit variants.

    Candidates mix both directions so LensNet sees the value of detail everywhere: expanding a gist (what
    the allocator would spend budget on) and collapsing a raw block (what it would refund budget from).
    With `hints` (copy_hints: LOD1 block indices), the base first zooms those blocks' gists to LOD1 and their
    expansions are candidates first. With `score` (LensNet on the base) and cfg.lens_hints, the gists it
    scores highest come next: the allocator would open them, so their cost is measured too (hard
    negatives). The other candidates stay random.
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
    if score is not None and cfg.lens_hints:
        s = score(base).detach()
        n_hinted = sum(1 for i in editable if rank[i] < len(order))
        rest = editable[n_hinted:]
        top = sorted((i for i in rest if base.entries[i].level >= 1), key=lambda i: -float(s[i]))
        top = top[: cfg.lens_hints]
        editable = editable[:n_hinted] + top + [i for i in rest if i not in top]
    candidates = sorted(editable[: cfg.variants])
    variants, expands = [], []
    for i in candidates:
        e = base.entries[i]
        if e.level >= 1:
            variants.append(base.apply([Edit("expand", e.level, e.index(K))], shape))
        else:
            variants.append(base.apply([Edit("collapse", 1, e.start // K)], shape))
        expands.append(e.level >= 1)
    return RowPlan([baseline, base, *variants], candidates, expands, sorted(editable))


def row_rng(seed: int, row: torch.Tensor) -> random.Random:
    """A row's own random stream, keyed by the seed and the row's tokens, not by its place in the batch: the
    same row gets the same variants whichever rank or micro-batch it lands in (DDP = single process)."""
    return random.Random(f"{seed}:{zlib.crc32(row.detach().cpu().numpy().tobytes())}")
