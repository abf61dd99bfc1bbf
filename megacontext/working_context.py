"""The working context (WC): what the GPT attends over, a budgeted tiling of the whole history (docs/design.md §2, §3).

Entries (raw K-blocks and gists from the MegaContext tree) tile [0, num_tokens) in order; the sum of their
costs (raw block = its tokens, gist = 1) never exceeds the budget W_max. A WorkingContext is immutable:
`apply` and `extend` return a new one whose `version` is higher, so caches keyed on the version (rotary
cos/sin, KV caches) are invalidated exactly when the entries change, and `dirty_from` says from which global
token position onward they changed. Every constructor path checks the invariants and raises a named error.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from megacontext.entries import (
    AlignmentError,
    BudgetError,
    ContiguityError,
    Edit,
    Entry,
    LevelError,
    RecencyError,
    children,
    describe,
    gist_entry,
)


def node_exists(tree, level: int, index: int) -> bool:
    """True when gist node (level >= 1, index) is stored in the tree (num_nodes is 0 above the top level)."""
    return level >= 1 and 0 <= index < tree.num_nodes(level)


def coarse_tiling(tree, start: int, end: int) -> list[Entry]:
    """Tile [start, end) (multiples of K, all LOD1 gists present) with the fewest existing gists.

    Greedy left to right with the highest aligned level that fits and exists: LOD-max gists first, then finer
    ones toward `end` (the raw boundary), which is the unique minimal tiling of an aligned range.
    """
    K, out, p = tree.K, [], start
    while p < end:
        level = tree.max_level
        while level > 1 and not (
            p % K**level == 0 and p + K**level <= end and node_exists(tree, level, p // K**level)
        ):
            level -= 1
        if not node_exists(tree, level, p // K**level):
            raise LevelError(f"no LOD{level} gist for tokens [{p}, {p + K**level}) in the tree")
        out.append(Entry(level, p, p + K**level))
        p += K**level
    return out


def raw_blocks(start: int, end: int, K: int) -> list[Entry]:
    """Raw K-aligned blocks for [start, end); start is a multiple of K, the last block may be short."""
    return [Entry(0, p, min(p + K, end)) for p in range(start, end, K)]


def widest_raw_tail(tiling, raw_start: int, floor: int, K: int, budget: int) -> list[Entry]:
    """tiling(rs) for the earliest raw-tail start rs (stepping back from raw_start by K, not below floor) whose
    cost fits the budget. Moving the start one block back always costs more (K raw tokens come in, at most one
    gist leaves), so the first start that does not fit ends the search."""
    best = tiling(raw_start)
    while raw_start - K >= floor:
        raw_start -= K
        entries = tiling(raw_start)
        if sum(e.cost for e in entries) > budget:
            break
        best = entries
    return best


@dataclass
class WCTensors:
    """A materialised working context: one row per position (a raw token or a gist)."""

    embeds: torch.Tensor  # [L, d] token embeddings (raw) and tree gists, in timeline order
    mu: torch.Tensor  # [L] float: raw = global position, gist = span centre
    sigma: torch.Tensor  # [L] float: raw = 0, gist = span / sqrt(12) (std of a uniform span)
    lod: torch.Tensor  # [L] long: level of the entry the row belongs to
    entry_index: torch.Tensor  # [L] long: index of that entry in wc.entries
    token_ids: torch.Tensor  # [L] long: token id for raw rows, -1 for gists
    version: int  # wc.version it was made from


class WorkingContext:
    """An immutable, invariant-checked list of entries tiling the history within a budget."""

    def __init__(
        self,
        entries: Iterable[Entry],
        K: int,
        budget: int,
        recent: int,
        version: int = 0,
        dirty_from: int | None = None,
    ):
        if K < 2 or budget < 0 or recent < 0:
            raise ValueError(
                f"need K >= 2, budget >= 0, recent >= 0; got K={K} budget={budget} recent={recent}"
            )
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.K, self.budget, self.recent = K, budget, recent
        self.version = version  # bumped by every apply/extend that changes the entries
        self.dirty_from = dirty_from  # first global token position changed since the previous version
        self._meta_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        self.check()

    # ---------------------------------------------------------------- invariants

    @property
    def num_tokens(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def cost(self) -> int:
        return sum(e.cost for e in self.entries)

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def is_protected(self, entry: Entry) -> bool:
        """Entries overlapping the most recent `recent` tokens stay raw and are never edited."""
        return self.recent > 0 and entry.end > self.num_tokens - self.recent

    def check(self, tree=None, whole: bool = True) -> None:
        """Raise the named error for the first broken invariant; with a tree, also check it against the tree
        (whole=False: a WC about to be extended may cover fewer tokens than the tree holds)."""
        K, es = self.K, self.entries
        gaps = [(a, b) for a, b in zip(es, es[1:]) if b.start != a.end]
        if es and es[0].start != 0:
            raise ContiguityError(f"entries must start at token 0, first is {es[0]}")
        if gaps:
            pairs = ", ".join(f"{a}{b}" for a, b in gaps[:8])
            raise ContiguityError(f"{len(gaps)} gap(s)/overlap(s) between consecutive entries: {pairs}")
        if tree is not None and (
            self.num_tokens > tree.num_tokens or whole and self.num_tokens < tree.num_tokens
        ):
            raise ContiguityError(
                f"entries cover [0, {self.num_tokens}) but the tree holds {tree.num_tokens} tokens "
                f"(last entry {describe(es[-1:]) or 'none'}); call wc.extend(tree) after appending"
            )
        bad = [e for e in es if e.level < 0 or (e.level >= 1 and e.size != K**e.level)]
        if bad:
            raise LevelError(f"an LODn gist must cover exactly K**n = {K}**n tokens: {describe(bad)}")
        if tree is not None:
            bad = [e for e in es if e.level >= 1 and not node_exists(tree, e.level, e.index(K))]
            if bad:
                raise LevelError(
                    f"gists not stored in the tree (max level {tree.max_level}): {describe(bad)}"
                )
        bad = [e for e in es if e.level == 0 and not 0 < e.size <= K]
        bad += [e for e in es[:-1] if e.level == 0 and e.size < K]
        if bad:
            raise AlignmentError(
                f"raw blocks hold 1..{K} tokens and only the newest may be incomplete: {describe(bad)}"
            )
        bad = [e for e in es if e.start % K ** max(e.level, 1) != 0]
        if bad:
            raise AlignmentError(f"entries must start at a multiple of K**level (K={K}): {describe(bad)}")
        bad = [e for e in es if e.level != 0 and self.is_protected(e)]
        if bad:
            raise RecencyError(
                f"the most recent {self.recent} tokens [{self.num_tokens - self.recent}, {self.num_tokens}) "
                f"must stay LOD0, but these entries are gists: {describe(bad)}"
            )
        if self.cost > self.budget:
            worst = sorted(es, key=lambda e: -e.cost)[:8]
            raise BudgetError(
                f"cost {self.cost} exceeds budget {self.budget} over {len(es)} entries; "
                f"largest entries: {describe(worst)}"
            )

    # ---------------------------------------------------------------- building

    @classmethod
    def coarsest(cls, tree, budget: int, recent: int) -> WorkingContext:
        """The cheapest legal WC: recent tokens (whole blocks) and un-gisted blocks raw, the rest coarsest gists."""
        K, N = tree.K, tree.num_tokens
        gisted = K * tree.num_nodes(1)  # tokens already summarised by LOD1; newer blocks must stay raw
        raw_start = min(max(0, N - recent) // K * K, gisted)
        coarse = coarse_tiling(tree, 0, raw_start)
        need = len(coarse) + N - raw_start
        if need > budget:
            raise BudgetError(
                f"budget {budget} cannot hold {N} tokens: the coarsest tiling needs {len(coarse)} gists + "
                f"{N - raw_start} raw tokens (recent={recent}, K={K}) = {need}; raise the budget or lower recent"
            )
        wc = cls(coarse + raw_blocks(raw_start, N, K), K, budget, recent)
        wc.check(tree)
        return wc

    @classmethod
    def from_tree(cls, tree, budget: int, recent: int) -> WorkingContext:
        """Initial assembly: the newest tokens raw (at least `recent`, as many whole blocks as the budget
        allows once the older part is covered by its coarsest gists), everything older as coarsest gists."""
        K, N = tree.K, tree.num_tokens
        base = cls.coarsest(tree, budget, recent)
        raw_start = next((e.start for e in base.entries if e.level == 0), N)
        tiling = lambda rs: coarse_tiling(tree, 0, rs) + raw_blocks(rs, N, K)  # noqa: E731
        wc = cls(widest_raw_tail(tiling, raw_start, 0, K, budget), K, budget, recent)
        wc.check(tree)
        return wc

    def apply(self, edits: Sequence[Edit], tree, whole: bool = True) -> WorkingContext:
        """Return a new WC with the edits applied in order (self is unchanged); invariants are checked on the
        result, so an edit naming a missing node, touching recent tokens or overflowing the budget raises
        (whole=False: self may lag the tree, as before an extend)."""
        if not edits:
            return self
        K, entries, dirty = self.K, list(self.entries), None
        starts = [e.start for e in entries]
        for edit in edits:
            target = gist_entry(edit.level, edit.index, K)
            i = _find(starts, target.start)
            if edit.kind == "expand":
                if i is None or entries[i] != target:
                    raise LevelError(f"{edit}: gist {target} is not an entry of the working context")
                new = children(target, K)
                entries[i : i + 1] = new
            else:
                n = len(children(target, K))  # K child gists, or one raw block for LOD1
                group = entries[i : i + n] if i is not None else []
                if group != children(target, K):
                    raise LevelError(
                        f"{edit}: children of {target} are not all entries (found {describe(group)})"
                    )
                protected = [e for e in group if self.is_protected(e)]
                if protected:
                    raise RecencyError(f"{edit}: would gist protected recent entries {describe(protected)}")
                entries[i : i + n] = [target]
            starts = [e.start for e in entries]
            dirty = target.start if dirty is None else min(dirty, target.start)
        wc = WorkingContext(entries, K, self.budget, self.recent, self.version + 1, dirty)
        wc.check(tree, whole)
        return wc

    def extend(self, tree) -> WorkingContext:
        """Ingest the tokens appended to the tree since this WC was built.

        The newest raw block grows and new raw blocks are added. If that overflows the budget, the oldest
        collapsible entries are collapsed (a complete raw block into its LOD1 gist, K sibling gists into their
        parent, cascading) until it fits. This is ingestion: new text must enter raw, and the room is made in
        the oldest history, never in the protected recent tokens. It is not how the allocator keeps the
        budget: the allocator never proposes an edit that overflows it. Raises BudgetError when nothing
        collapsible is left (e.g. the new blocks are not gisted yet: call tree.gist_pending first).
        """
        K, N = self.K, tree.num_tokens
        if N < self.num_tokens:
            raise ContiguityError(f"tree holds {N} tokens, fewer than the {self.num_tokens} this WC covers")
        if N == self.num_tokens:
            return self
        entries = list(self.entries)
        if entries and entries[-1].level == 0 and entries[-1].size < K:
            entries.pop()  # the incomplete newest block grows
        grow_from = entries[-1].end if entries else 0
        entries += raw_blocks(grow_from, N, K)
        excess = sum(e.cost for e in entries) - self.budget
        dirty = grow_from
        protect_from = N - self.recent if self.recent > 0 else N
        stack: list[Entry] = []
        for e in entries:
            stack.append(e)
            while excess > 0 and stack[-1].end <= protect_from:
                top = stack[-1]
                if top.level == 0:
                    if top.size != K or not node_exists(tree, 1, top.start // K):
                        break
                    stack[-1] = Entry(1, top.start, top.end)
                else:
                    span = K ** (top.level + 1)
                    first = top.end - span
                    group = stack[-K:]
                    if (
                        top.end % span
                        or len(group) < K
                        or group[0].start != first
                        or any(g.level != top.level for g in group)
                        or not node_exists(tree, top.level + 1, first // span)
                    ):
                        break
                    del stack[-K:]
                    stack.append(Entry(top.level + 1, first, top.end))
                excess -= K - 1
                dirty = min(dirty, stack[-1].start)
        if excess > 0:
            raise BudgetError(
                f"cannot ingest up to token {N} within budget {self.budget}: still {excess} over after "
                f"collapsing everything collapsible (recent={self.recent}; are the new blocks gisted?)"
            )
        wc = WorkingContext(stack, K, self.budget, self.recent, self.version + 1, dirty)
        wc.check(tree)
        return wc

    # ---------------------------------------------------------------- tensors and reporting

    def _meta(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(mu, sigma, lod, entry_index) per row, cached per device: they depend on the entries only."""
        key = str(device)
        if key not in self._meta_cache:
            mu, sigma, lod, idx = [], [], [], []
            for i, e in enumerate(self.entries):
                if e.level == 0:
                    mu.extend(range(e.start, e.end))
                    sigma.extend([0.0] * e.size)
                else:
                    mu.append(e.start + e.size / 2)
                    sigma.append(e.size / math.sqrt(12))
                lod.extend([e.level] * e.cost)
                idx.extend([i] * e.cost)
            self._meta_cache[key] = (
                torch.tensor(mu, dtype=torch.float32, device=device),
                torch.tensor(sigma, dtype=torch.float32, device=device),
                torch.tensor(lod, dtype=torch.long, device=device),
                torch.tensor(idx, dtype=torch.long, device=device),
            )
        return self._meta_cache[key]

    def materialize(self, tree, embed: Callable[[torch.Tensor], torch.Tensor], device="cpu") -> WCTensors:
        """Rows for the GPT: raw entries expand to one row per token (embed(ids), differentiable), each gist to
        one row from tree.gists. Positions are cached per version; embeddings are recomputed every call
        because the embedding weights change during training."""
        device = torch.device(device)
        mu, sigma, lod, idx = self._meta(device)
        is_raw = lod == 0
        token_ids = torch.full((len(lod),), -1, dtype=torch.long, device=device)
        raw_runs: list[tuple[int, int]] = []  # contiguous raw spans, fetched with one tree call each
        for e in self.entries:
            if e.level == 0 and raw_runs and raw_runs[-1][1] == e.start:
                raw_runs[-1] = (raw_runs[-1][0], e.end)
            elif e.level == 0:
                raw_runs.append((e.start, e.end))
        if raw_runs:
            ids = torch.cat([tree.tokens(s, t).reshape(-1) for s, t in raw_runs]).to(
                device=device, dtype=torch.long
            )
            token_ids[is_raw] = ids
        pieces, order = [], []
        if raw_runs:
            pieces.append(embed(token_ids[is_raw]))
            order.append(torch.nonzero(is_raw).reshape(-1))
        for level in sorted({e.level for e in self.entries} - {0}):
            rows = torch.nonzero(lod == level).reshape(-1)
            indices = [self.entries[i].index(self.K) for i in idx[rows].tolist()]
            pieces.append(tree.gists(level, indices))
            order.append(rows)
        if not pieces:
            embeds = torch.zeros(0, tree.d, device=device)
        else:
            dtype = pieces[0].dtype
            stacked = torch.cat([p.to(device=device, dtype=dtype) for p in pieces])
            embeds = stacked[torch.argsort(torch.cat(order))]  # back to timeline order, keeps autograd
        return WCTensors(embeds, mu, sigma, lod, idx, token_ids, self.version)

    def render(self) -> str:
        """The focus map as text, e.g. `[L2 0:1024][L1 1024:1056][L0 1056:1088]`."""
        return "".join(str(e) for e in self.entries)

    def lod_histogram(self) -> dict[int, int]:
        """Number of entries per level."""
        return dict(sorted(Counter(e.level for e in self.entries).items()))

    @property
    def residency(self) -> float:
        """Share of the budget spent on raw (LOD0) tokens."""
        raw = sum(e.size for e in self.entries if e.level == 0)
        return raw / self.budget if self.budget else 0.0

    def __eq__(self, other) -> bool:
        return isinstance(other, WorkingContext) and (self.entries, self.K) == (other.entries, other.K)

    def __hash__(self) -> int:
        return hash((self.entries, self.K))

    def __repr__(self) -> str:
        return f"WorkingContext(v{self.version}, cost {self.cost}/{self.budget}, {self.render()[:200]})"


def _find(starts: list[int], start: int) -> int | None:
    """Index of the entry beginning at `start` (entries are sorted by start), or None."""
    i = bisect.bisect_left(starts, start)
    return i if i < len(starts) and starts[i] == start else None
