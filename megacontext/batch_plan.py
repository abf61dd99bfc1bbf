"""A micro-batch of MC training rows planned ahead of the step, as padded index tensors (docs/design.md §4).

What a row's working contexts are (which bank row fills each GPT slot, for the baseline, the base and every
one-edit variant the row could run) and what LensNet sees of its base (which bank row, LOD and span per
entry) is integer work on the row's token ids (megacontext.plans). `build_plan` does it for a whole
micro-batch on the host, so the data loader's thread can do it for the next batch while the current step
runs (nanochat/prefetch.py); the step only gathers. The one choice that needs a network, which of the base's
gists LensNet's favourites make candidates (lens hints), is `choose_candidates`, on the device, for all rows
at once, from one batched LensNet call.

Sizes are fixed by the config and the curriculum's budget, never by a row's content, so the GPT, GistNet and
LensNet see static shapes (torch.compile, CUDA graphs):
* slots L: the budget rounded up to a quarter of the target budget (a handful of lengths over the curriculum,
  one from its end on);
* entries N = T / K: a working context of complete blocks never has more;
* variants per row: cfg.variants (a row with fewer editable entries runs empty, masked-out ones).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.plans import SequenceShape, copy_hints, plan_row, row_rng

SLOT_STEPS = 4  # slot counts are multiples of wc_budget / SLOT_STEPS


def slot_count(cfg: MCConfig, budget: int) -> int:
    """GPT slots per working context at this budget: the budget rounded up to a multiple of wc_budget/4, so
    the annealing curriculum compiles a few lengths instead of one per step."""
    q = max(1, cfg.wc_budget // SLOT_STEPS)
    return -(-budget // q) * q


def bank_offsets(T: int, K: int, levels: int) -> tuple[list[int], int]:
    """(offset of each level in a row's bank [tokens; LOD1 gists; LOD2 gists; ...], number of bank rows)."""
    offsets, offset, n = [0], T, T
    for _ in range(levels):
        n //= K
        offsets.append(offset)
        offset += n
    return offsets, offset


def entry_rows(entries, offsets: list[int], K: int) -> list[int]:
    """Bank rows of a working context in timeline order: one per raw token, one per gist."""
    rows: list[int] = []
    for e in entries:
        if e.level == 0:
            rows.extend(range(e.start, e.end))
        else:
            rows.append(offsets[e.level] + e.start // K**e.level)
    return rows


def _edited_rows(e, offsets: list[int], K: int) -> list[int]:
    """The bank rows that replace entry e's slots in its one-edit variant: a gist's children (raw tokens for
    LOD1), or a complete raw block's LOD1 gist."""
    if e.level == 0:
        return [offsets[1] + e.start // K]
    if e.level == 1:
        return list(range(e.start, e.end))
    child = K ** (e.level - 1)
    return [offsets[e.level - 1] + e.start // child + j for j in range(K)]


@dataclass
class BatchPlan:
    """Index tensors for one micro-batch of B rows (N = T/K entries, E = N editable slots, L GPT slots)."""

    budget: int  # the curriculum's working-context budget for this step
    levels: int  # gist levels of the bank (build_bank)
    slots: int  # L
    wc_rows: (
        torch.Tensor
    )  # [B, 2 + E, L] long: bank row per slot of baseline, base, variant of order[j]; pad row
    entry_row: (
        torch.Tensor
    )  # [B, N] long: the bank row LensNet reads for each base entry (a raw block: its gist)
    entry_lod: torch.Tensor  # [B, N] long
    entry_start: torch.Tensor  # [B, N] long: the entry's span [start, end) in the row
    entry_end: torch.Tensor  # [B, N] long
    entry_valid: torch.Tensor  # [B, N] bool
    n_entries: torch.Tensor  # [B] long
    editable: torch.Tensor  # [B, N] bool: entries a one-edit variant could edit
    order: torch.Tensor  # [B, E] long: editable entries in candidate order (RowPlan.order); padding 0
    order_valid: torch.Tensor  # [B, E] bool
    order_sign: torch.Tensor  # [B, E] float: +1 where that variant expands a gist, -1 collapses a raw block
    n_hinted: torch.Tensor  # [B] long: the first n_hinted of `order` are copy hints
    # what the step would otherwise rebuild from the above every time (choose_candidates, mc_train_step)
    priority: torch.Tensor  # [B, E] long: candidate priority before LensNet's favourites are known
    ineligible: torch.Tensor  # [B, E] bool: not a lens hint (padding, a copy hint or a raw block)
    entry_mu: torch.Tensor  # [B, N] float: LensNet's entry positions (lens_inputs.lens_positions)
    query_pos: torch.Tensor  # [B, K] float: its query positions, right after the row's last entry
    bank_base: torch.Tensor  # [B, 1, 1] long: where row b's bank starts in the flattened bank
    horizon_rows: torch.Tensor  # [R] bool: the bank rows that are horizon tokens
    # host figures for the metrics (they never need the device)
    candidates: int  # variants that run, all rows
    base_entries: int  # entries of the bases, all rows
    residency: float  # mean share of the budget the bases spend on raw tokens
    plan_ms: float  # host time spent planning

    def to(self, device, non_blocking: bool = False) -> BatchPlan:
        """The plan on `device`; non_blocking from pinned memory (pin_memory) does not stall the host."""
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self._tensors()})

    def pin_memory(self) -> BatchPlan:
        return replace(self, **{k: v.pin_memory() for k, v in self._tensors()})

    def _tensors(self):
        return [
            (f.name, getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        ]


def build_plan(x: torch.Tensor, cfg: MCConfig, budget: int, levels: int, seed) -> BatchPlan:
    """Plan rows x [B, T+1] (host tensor) at this budget. A row's random stream is keyed by its tokens and the
    seed (plans.row_rng), so a row is planned alike on any rank or micro-batch."""
    t0 = time.perf_counter()
    if x.device.type != "cpu":
        raise ValueError(
            "build_plan reads token ids on the host; pass the rows before moving them to the device"
        )
    B, T = x.shape[0], x.shape[1] - 1
    K, H = cfg.block_size, cfg.horizon
    if T % K or levels < 1:
        raise ValueError(
            f"MC needs the sequence length ({T}) to be a positive multiple of the block size ({K})"
        )
    recent = max(cfg.recent, H + K)
    shape = SequenceShape(K, T, levels)
    offsets, pad = bank_offsets(T, K, levels)
    L, N = slot_count(cfg, budget), T // K
    wc_rows = np.full((B, 2 + N, L), pad, dtype=np.int64)
    ent = np.zeros((4, B, N), dtype=np.int64)  # bank row, lod, start, end
    entry_valid, editable = np.zeros((B, N), dtype=bool), np.zeros((B, N), dtype=bool)
    order, order_valid, order_gist = (
        np.zeros((B, N), np.int64),
        np.zeros((B, N), bool),
        np.zeros((B, N), bool),
    )
    n_hinted, n_entries = np.zeros(B, np.int64), np.zeros(B, np.int64)
    candidates = base_entries = 0
    residency = 0.0
    ids = x.numpy()
    for b in range(B):
        hints = copy_hints(ids[b].tolist(), T - H, T - recent, K, cfg.copy_hints) if cfg.copy_hints else []
        row = plan_row(shape, cfg, budget, recent, row_rng(seed, x[b]), hints)
        base = row.base.entries
        base_rows = entry_rows(base, offsets, K)
        for w, rows in enumerate((entry_rows(row.baseline.entries, offsets, K), base_rows)):
            wc_rows[b, w, : len(rows)] = rows
        slot = np.cumsum([0] + [e.cost for e in base])
        for j, i in enumerate(row.order):
            rows = base_rows[: slot[i]] + _edited_rows(base[i], offsets, K) + base_rows[slot[i + 1] :]
            wc_rows[b, 2 + j, : len(rows)] = rows
        n = len(base)
        ent[0, b, :n] = [offsets[max(e.level, 1)] + e.start // K ** max(e.level, 1) for e in base]
        ent[1, b, :n] = [e.level for e in base]
        ent[2, b, :n] = [e.start for e in base]
        ent[3, b, :n] = [e.end for e in base]
        entry_valid[b, :n] = True
        editable[b, row.order] = True
        order[b, : len(row.order)] = row.order
        order_valid[b, : len(row.order)] = True
        order_gist[b, : len(row.order)] = [base[i].level >= 1 for i in row.order]
        n_hinted[b], n_entries[b] = row.n_hinted, n
        candidates += min(cfg.variants, len(row.order))
        base_entries += n
        residency += row.base.residency / B
    # choose_candidates' priority and lens-hint eligibility: everything but LensNet's ranking
    pos = np.arange(N)[None, :]
    hinted = pos < n_hinted[:, None]
    priority = pos.repeat(B, 0)
    if cfg.lens_hints:
        priority = np.where(hinted, pos, n_hinted[:, None] + cfg.lens_hints + pos)
    priority[~order_valid] = 2 * N + cfg.lens_hints
    ineligible = ~(order_valid & ~hinted & order_gist)
    horizon_rows = np.zeros(pad + 1, bool)
    horizon_rows[T - H : T] = True
    query_pos = (n_entries[:, None] + np.arange(K)).astype(np.float32)
    sign = np.where(order_gist, 1.0, -1.0).astype(np.float32)
    entry_mu = np.broadcast_to(np.arange(N, dtype=np.float32), (B, N)).copy()
    bank_base = (np.arange(B) * (pad + 1)).reshape(B, 1, 1)
    t = torch.from_numpy
    return BatchPlan(
        budget, levels, L, t(wc_rows), t(ent[0]), t(ent[1]), t(ent[2]), t(ent[3]), t(entry_valid),
        t(n_entries), t(editable), t(order), t(order_valid), t(sign), t(n_hinted), t(priority), t(ineligible),
        t(entry_mu), t(query_pos), t(bank_base), t(horizon_rows),
        candidates, base_entries, residency, 1000.0 * (time.perf_counter() - t0),
    )  # fmt: skip


def choose_candidates(
    scores: torch.Tensor, plan: BatchPlan, cfg: MCConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each row's editable entries its variants edit, on the device for all rows: RowPlan.candidates
    without a loop or a host read. scores [B, N]: LensNet's logits for the bases' entries.

    Returns (positions into plan.order [B, V], valid [B, V]); V = min(cfg.variants, E). Priority: the copy
    hints in order, then the cfg.lens_hints gists scored highest among the rest (a stable sort: ties go to
    the earlier entry), then the rest in order; a row runs its V best, or all its editable entries if fewer."""
    B, E = plan.order.shape
    V = min(cfg.variants, E)
    priority = plan.priority
    if cfg.lens_hints:
        key = scores.detach().gather(1, plan.order).float().masked_fill(plan.ineligible, -torch.inf)
        ranked = torch.sort(key, dim=1, descending=True, stable=True).indices
        rank = ranked.argsort(dim=1)  # the inverse permutation: each entry's place in the ranking
        top = ~plan.ineligible & (rank < cfg.lens_hints)
        priority = torch.where(top, plan.n_hinted[:, None] + rank, priority)
    chosen = torch.sort(priority, dim=1, stable=True).indices[:, :V]
    return chosen, plan.order_valid.gather(1, chosen)
