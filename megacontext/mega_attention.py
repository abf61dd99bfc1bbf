"""MegaAttention: attention over a long sequence plus summary nodes, with a pyramidal mask (docs/design.md §6).

Every complete aligned K-block of raw positions gets a wLOD1 node (GistNet of its K input embeddings),
every complete run of K wLOD1 nodes a wLOD2 node, and so on. A raw query i sees:

    raw [b1, i]              b_l = floor(a / K**l) * K**l with a = max(i - W, 0), so b1 <= i - W
    wLOD1 nodes tiling [b2, b1)   (at most K - 1 of them)
    ...
    wLODL nodes tiling [0, bL)    (at most N / K**L of them; L = top level)

so the past [0, i] is tiled exactly once, finer near i, and every visible node ends at or before
b1 <= i (strictly causal, no overshoot). The raw window reaches back from i - W to the K-aligned boundary
b1 (at most K - 1 extra positions): the wLOD1 node holding i - W also holds positions inside the window,
so it cannot stand in for the older part of its span without covering some positions twice.
A node sees exactly what its last raw child sees, plus itself (every query sees its own key, as a raw
token does; its span ends where its last child is, so this adds nothing from the future).
Per raw query: (W + 1) + L·(K - 1) + N / K**L keys instead of i + 1.

Packed order: the N raw positions first (packed index = raw position, so logits[:, :N] are the raw
logits), then the nodes level by level in time order. The mask is explicit, so interleaving would buy
nothing, and appending keeps raw indexing trivial.

Three executions with one meaning, all driven by `_visible` (index arithmetic):
  dense bool mask + SDPA (`mega_mask`, the reference, used by `mega_forward` through the GPT),
  flex_attention BlockMask (`mega_block_mask` + `flex_mega_attention`; compiled on CUDA; on CPU torch
  runs it eagerly and refuses backward), and a block-sparse gather + SDPA for long sequences on CPU
  (`plan_blocksparse` + `blocksparse_mega_attention`), O(N·(W + K·L + N/K**L)) time and memory.
What an edit dirties (`edit_dirties`) and the rows x columns of the mask a KV cache's refresh needs
(`key_bounds`, `mega_mask_at`) follow from the same rule (megacontext/kv_cache.py).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.positional import at_reach, gaussian_rotary, span_mu_sigma


@dataclass(frozen=True)
class MegaNode:
    level: int
    index: int  # position among the nodes of its level, in time order
    start: int  # raw span [start, end)
    end: int


@dataclass(frozen=True)
class MegaLayout:
    """The packed sequence: N raw positions, then `counts[l]` wLOD-l nodes at `offsets[l]` for l = 1..levels."""

    N: int
    K: int
    W: int
    levels: int  # top level L; 0 = no nodes, so the raw window reaches back to 0: causal attention
    counts: tuple[int, ...]  # counts[l] nodes of level l; counts[0] = N
    offsets: tuple[int, ...]  # packed index of the first node of level l; offsets[0] = 0
    window_only: bool = False  # the baseline: sliding window [i - W, i] and nothing older (no nodes)

    @property
    def T(self) -> int:
        """Packed length."""
        return sum(self.counts)

    @property
    def nodes(self) -> list[MegaNode]:
        span = lambda lv: self.K**lv
        return [
            MegaNode(lv, j, j * span(lv), (j + 1) * span(lv))
            for lv in range(1, self.levels + 1)
            for j in range(self.counts[lv])
        ]

    def span(self, p: int) -> tuple[int, int, int]:
        """(level, start, end) of packed index p."""
        for lv in range(self.levels, 0, -1):
            if p >= self.offsets[lv]:
                j = p - self.offsets[lv]
                return lv, j * self.K**lv, (j + 1) * self.K**lv
        return 0, p, p + 1

    def mu_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per packed position: the span centre μ = start + L/2 and width σ = L/√12 (docs/design.md §2); raw: (i, 0)."""
        mu = torch.arange(self.N, dtype=torch.float32)
        sigma = torch.zeros(self.N)
        mus, sigmas = [mu], [sigma]
        for lv in range(1, self.levels + 1):
            start = torch.arange(self.counts[lv], dtype=torch.float32) * self.K**lv
            mu_l, sigma_l = span_mu_sigma(start, start + self.K**lv)
            mus.append(mu_l)
            sigmas.append(sigma_l)
        return torch.cat(mus), torch.cat(sigmas)


def auto_levels(N: int, K: int, W: int) -> int:
    """Levels N needs: level l exists when some query's past beyond its window reaches a full K**l span."""
    reach, levels = N - 1 - W, 0
    while reach >= K ** (levels + 1):
        levels += 1
    return levels


def build_mega_layout(N: int, K: int, W: int, levels: int | None = None) -> MegaLayout:
    """Layout of the packed sequence for N raw positions, block size K, raw window W (levels None = auto)."""
    if N < 1 or K < 2 or W < 0:
        raise ValueError(f"need N >= 1, K >= 2, W >= 0; got N={N}, K={K}, W={W}")
    if levels is None:
        levels = auto_levels(N, K, W)
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    counts = (N, *[N // K**lv for lv in range(1, levels + 1)])
    offsets = tuple(int(x) for x in np.cumsum((0, *counts[:-1])))
    return MegaLayout(N, K, W, levels, counts, offsets)


def sliding_window_layout(N: int, W: int) -> MegaLayout:
    """The comparison baseline through the same machinery: raw [i - W, i] only (K is unused)."""
    if N < 1 or W < 0:
        raise ValueError(f"need N >= 1, W >= 0; got N={N}, W={W}")
    return MegaLayout(N, 1, W, 0, (N,), (0,), window_only=True)


# -----------------------------------------------------------------------------
# The rule, as index arithmetic on tensors. Broadcasting tensors (dense mask, block-sparse plan) and the
# 0-d tensors flex_attention's vmap hands a mask_mod all go through these two functions.


def _spans(p: torch.Tensor, lay: MegaLayout):
    """(level, start, end) of packed indices p (int64 tensor of any shape)."""
    level, start, end = torch.zeros_like(p), p, p + 1
    for lv in range(1, lay.levels + 1):
        is_l = (p >= lay.offsets[lv]) & (p < lay.offsets[lv] + lay.counts[lv])
        j = p - lay.offsets[lv]
        level = torch.where(is_l, lv, level)
        start = torch.where(is_l, j * lay.K**lv, start)
        end = torch.where(is_l, (j + 1) * lay.K**lv, end)
    return level, start, end


def _visible(q: torch.Tensor, k: torch.Tensor, lay: MegaLayout) -> torch.Tensor:
    """May packed query q attend to packed key k? (broadcasts)"""
    _, _, q_end = _spans(q, lay)
    r = q_end - 1  # the anchor: a raw query itself, a node's last raw child
    k_level, k_start, k_end = _spans(k, lay)
    a = torch.clamp(r - lay.W, min=0)
    if lay.window_only:
        return (k_start >= a) & (k_start <= r)
    if lay.levels == 0:  # no level to hand the old past to: the raw window is the whole causal past
        return k_start <= r
    # Key of level l is visible when its span lies in [lo_l, hi_l): raw [b1, r + 1), level l [b_{l+1}, b_l).
    b = [None] + [(a // lay.K**lv) * lay.K**lv for lv in range(1, lay.levels + 1)] + [torch.zeros_like(a)]
    lo, hi = b[1], r + 1
    for lv in range(1, lay.levels + 1):
        lo = torch.where(k_level == lv, b[lv + 1], lo)
        hi = torch.where(k_level == lv, b[lv], hi)
    return ((k_start >= lo) & (k_end <= hi)) | (q == k)


def mega_mask(lay: MegaLayout, device=None, chunk: int = 2048) -> torch.Tensor:
    """Dense boolean mask [T, T] (True = may attend); a pure function of (N, K, W, levels)."""
    keys = torch.arange(lay.T, device=device)[None, :]
    rows = [
        _visible(torch.arange(s, min(s + chunk, lay.T), device=device)[:, None], keys, lay)
        for s in range(0, lay.T, chunk)  # chunks of rows bound the int64 temporaries
    ]
    return torch.cat(rows)


@functools.lru_cache(maxsize=4)
def _cached_mask(lay: MegaLayout, device: str) -> torch.Tensor:
    """mega_forward's mask: every training step has the same shape, and building [T, T] costs ~0.3 s at
    T = 2k on CPU. Shared between calls: never modify it in place."""
    return mega_mask(lay, device)


def mega_mask_at(lay: MegaLayout, q: torch.Tensor, cols: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The mask [len(q), len(cols)] restricted to packed query rows q and key columns cols (MegaKVCache's
    incremental refresh); chunks of rows bound the int64 temporaries."""
    return torch.cat([_visible(q[s : s + chunk, None], cols[None, :], lay) for s in range(0, len(q), chunk)])


def key_bounds(rows: list[torch.Tensor], K: int, W: int, levels: int) -> list[int]:
    """Per level, the lowest element index any of the query elements `rows` (per level, ascending element
    indices) can see. Bounds rise with the anchor, so the earliest dirty anchor sets them; the columns from
    there to each level's end are a superset of what the rows see."""
    r = min(int(q[0] + 1) * K**lv - 1 for lv, q in enumerate(rows) if q.numel())
    a = max(r - W, 0)
    return [0 if lv == levels else a // K ** (lv + 1) * K ** (lv + 1) // K**lv for lv in range(levels + 1)]


def edit_dirties(level: int, index, counts, K: int, W: int) -> list[torch.Tensor]:
    """Per level l, a bool mask [counts[l]] of the elements whose K/V change when node(s) (level, index) change.

    index: an int or a 1-D tensor of indices at that level (the union is returned). The dirty set is exactly:
    the edited elements; their ancestors (GistNet made them from the edited content); and every element late
    enough to see an edited element or an ancestor. An element's time is its *anchor*, the last raw position it
    covers (a node attends with the mask of its last child). A raw position p is seen from anchor p + 1 on (the
    raw window); a node ending at e only once its whole span has left the window, from anchor e + W on; and
    from there every query sees the edited node or an ancestor of it, because its visible elements tile the
    whole past. Per level the later-in-time part is a suffix. Not dirtied: the raw window right after an edited
    node (it sees raw tokens there, not the node) and the node's own descendants.
    """
    idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    span = lambda lv: K**lv
    first_end = (int(idx.min()) + 1) * span(level)  # the earliest edited element ends here
    first_viewer = first_end if level == 0 else first_end + W  # smallest anchor that sees it
    out = []
    for lv, n in enumerate(counts):
        dirty = torch.zeros(n, dtype=torch.bool)
        dirty[min(first_viewer // span(lv), n) :] = True  # anchor (j + 1)·K^lv - 1 >= first_viewer
        if lv >= level:  # the edited elements themselves (lv == level) and their ancestors
            j = idx * span(level) // span(lv)
            dirty[j[j < n]] = True
        out.append(dirty)
    return out


def coverage(lay: MegaLayout, i: int) -> list[list[int]]:
    """For raw query i: per raw position t in [0, N), the packed elements i sees whose span contains t."""
    row = _visible(torch.tensor([[i]]), torch.arange(lay.T)[None, :], lay)[0]
    cover: list[list[int]] = [[] for _ in range(lay.N)]
    for p in row.nonzero().flatten().tolist():
        _, start, end = lay.span(p)
        for t in range(start, end):
            cover[t].append(p)
    return cover


def cost_bound(lay: MegaLayout) -> int:
    """Most keys any raw query sees: (W + 1) + levels·(K - 1) + N // K**levels (raw window: W + 1)."""
    if lay.levels == 0 and not lay.window_only:
        return lay.N
    nodes = 0 if lay.window_only else lay.levels * (lay.K - 1) + lay.N // lay.K**lay.levels
    return lay.W + 1 + nodes


# -----------------------------------------------------------------------------
# The model path: GistNet nodes, packed with the raw embeddings, through an unmodified GPT.


def build_nodes(embeds: torch.Tensor, lay: MegaLayout, gistnet) -> torch.Tensor:
    """Node embeddings [B, T - N, d]: level 1 from K raw input embeddings, level l from K level-(l-1) nodes."""
    B, _, d = embeds.shape
    out, children = [], embeds
    for lv in range(1, lay.levels + 1):
        n = lay.counts[lv]
        if n == 0:
            break
        blocks = children[:, : n * lay.K].reshape(B * n, lay.K, d)
        children = gistnet(blocks, lv).view(B, n, d)
        out.append(children)
    return torch.cat(out, dim=1) if out else embeds.new_zeros(B, 0, d)


def mega_rotary(lay: MegaLayout, head_dim: int, device=None):
    """Gaussian RoPE (cos, sin) [1, T, 1, head_dim/2] at each packed position's (μ, σ)."""
    mu, sigma = lay.mu_sigma()
    return gaussian_rotary(mu[None].to(device), sigma[None].to(device), head_dim)


def mega_forward(
    model,
    idx: torch.Tensor,
    gistnet,
    targets: torch.Tensor | None = None,
    W: int = 256,
    K: int = 32,
    levels: int | None = None,
    loss_reduction: str = "mean",
):
    """Run the GPT with MegaAttention over idx [B, N]: the loss on raw positions, or raw logits [B, N, V].

    With no levels (auto when N - 1 - W < K, i.e. no node could ever be visible) the mask is plain causal,
    so none is passed and the GPT takes its is_causal path: bit for bit the vanilla forward.
    """
    B, N = idx.shape
    lay = build_mega_layout(N, K, W, levels)
    embeds = model.wte(idx)
    packed = torch.cat([embeds, build_nodes(embeds, lay, gistnet)], dim=1)
    rotary = mega_rotary(lay, model.config.head_dim, idx.device)
    attn_mask = None if lay.levels == 0 else _cached_mask(lay, str(idx.device))[None, None]
    if targets is None:
        return model(embeds=packed, rotary=rotary, attn_mask=attn_mask)[:, :N]
    node_targets = targets.new_full((B, lay.T - N), -1)  # nodes carry no next-token loss
    full = torch.cat([targets, node_targets], dim=1)
    loss = model(
        embeds=packed, targets=full, rotary=rotary, attn_mask=attn_mask, loss_reduction=loss_reduction
    )
    if loss_reduction == "none":  # per position, flat [B * N] like the vanilla forward: drop the node slots
        return loss.view(B, lay.T)[:, :N].reshape(-1)
    return loss


# -----------------------------------------------------------------------------
# flex_attention: the same rule as a mask_mod; block sparsity comes from create_block_mask.

_compiled_flex = None


def key_ranges(lay: MegaLayout, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every packed query's visible keys as a few packed-index ranges: (lo, hi) [T, R], keys lo <= k < hi
    (empty when lo >= hi; ranges may overlap). R = levels + 2: the raw window, one contiguous run of nodes
    per level, itself. Derived from the same spans as _visible; O(T·levels),
    where evaluating the rule per pair is O(T²)."""
    q = torch.arange(lay.T, device=device)
    _, _, q_end = _spans(q, lay)
    r = q_end - 1
    a = torch.clamp(r - lay.W, min=0)
    if lay.window_only:
        lo, hi = [a], [r + 1]
    elif lay.levels == 0:
        lo, hi = [torch.zeros_like(r)], [r + 1]
    else:
        zero = torch.zeros_like(a)
        b = [None] + [(a // lay.K**lv) * lay.K**lv for lv in range(1, lay.levels + 1)] + [zero]
        lo, hi = [b[1], q], [r + 1, q + 1]
        for lv in range(1, lay.levels + 1):
            lo.append(lay.offsets[lv] + b[lv + 1] // lay.K**lv)
            hi.append(lay.offsets[lv] + b[lv] // lay.K**lv)
    return torch.stack(lo, 1), torch.stack(hi, 1)


def mega_block_mask(lay: MegaLayout, device="cpu", block_size: int = 128, keep=None):
    """flex_attention BlockMask for the packed sequence, built from key_ranges: per block of queries, the key
    blocks any of them may see (the hull of each range; the mask_mod decides inside them). Linear in T, so it
    scales to 1M tokens, where create_block_mask's every-pair evaluation ran out of memory on an H200.
    `keep(q_idx, kv_idx)`: a further condition on the visible pairs (the zoom's near and far pyramid)."""
    from torch.nn.attention.flex_attention import BlockMask

    T, B = lay.T, block_size
    nb = (T + B - 1) // B
    lo, hi = key_ranges(lay, device)
    pad = nb * B - T  # the last query block: pad with an empty range
    lo = torch.cat([lo, lo.new_full((pad, lo.size(1)), T)]).view(nb, B, -1)
    hi = torch.cat([hi, hi.new_zeros((pad, hi.size(1)))]).view(nb, B, -1)
    empty = lo >= hi
    lo_b = torch.where(empty, T, lo).amin(1) // B  # [nb, R] first key block of each range's hull
    hi_b = (torch.where(empty, 0, hi).amax(1) - 1) // B  # last key block (negative: none)
    used = hi_b >= lo_b
    marks = torch.zeros(nb, nb + 1, dtype=torch.int32, device=lo.device)
    rows = torch.arange(nb, device=lo.device)[:, None].expand_as(lo_b)
    one = used.to(torch.int32)
    marks.index_put_((rows, lo_b.clamp(max=nb)), one, accumulate=True)
    marks.index_put_((rows, (hi_b + 1).clamp(min=0, max=nb)), -one, accumulate=True)
    visible = marks.cumsum(1)[:, :nb] > 0  # [nb, nb] key blocks per query block
    kv_num = visible.sum(1, dtype=torch.int32)
    kv_idx = torch.argsort((~visible).to(torch.int8), dim=1, stable=True).to(torch.int32)  # visible first
    if keep is None:
        mask_mod = lambda b, h, q_idx, kv_idx: _visible(q_idx, kv_idx, lay)
    else:
        mask_mod = lambda b, h, q_idx, kv_idx: _visible(q_idx, kv_idx, lay) & keep(q_idx, kv_idx)
    return BlockMask.from_kv_blocks(
        kv_num[None, None], kv_idx[None, None], BLOCK_SIZE=B, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def flex_mega_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, return_lse: bool = False
):
    """q, k, v [B, H, T, D] -> [B, H, T, D], or (out, log-sum-exp [B, H, T]) with return_lse (the zoom merges
    on it; gradients flow through both). Compiled on CUDA. On CPU torch runs flex_attention eagerly
    (materialising the scores) and raises NotImplementedError for inputs that require grad."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    kwargs = {"block_mask": block_mask, "enable_gqa": q.size(1) != k.size(1)}
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        out = _compiled_flex(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():  # the "called without torch.compile" notice: eager is the point here
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(q, k, v, **kwargs)
    return (out[0], out[1].lse) if return_lse else out


# -----------------------------------------------------------------------------
# Block-sparse gather path: each block of `block` raw queries (plus the nodes anchored in it) gathers
# the union of the keys its queries may see and runs SDPA on that small dense problem.


@dataclass(frozen=True)
class BlockPlan:
    q_idx: torch.Tensor  # [nb, Qm] packed query indices per block (padding: 0, output dropped)
    kv_idx: torch.Tensor  # [nb, Km] packed key indices per block (padding: 0, masked out)
    mask: torch.Tensor  # [nb, 1, Qm, Km] bool
    inv: torch.Tensor  # [T] flat slot (block * Qm + row) of each packed query
    q_valid: torch.Tensor  # [nb, Qm] False on padding rows


def plan_blocksparse(lay: MegaLayout, block: int = 128, device=None) -> BlockPlan:
    """Index tables for `blocksparse_mega_attention`; build once per layout (like a BlockMask)."""
    K, W, L = lay.K, lay.W, lay.levels
    floor_to = lambda x, lv: (x // K**lv) * K**lv
    qs, kvs = [], []
    for t0 in range(0, lay.N, block):
        t1 = min(t0 + block, lay.N) - 1
        a0, a1 = max(t0 - W, 0), max(t1 - W, 0)
        first = a0 if lay.window_only else (0 if L == 0 else floor_to(a0, 1))
        keys = [np.arange(first, t1 + 1)]
        selves = []
        for lv in range(1, L + 1):
            lo = floor_to(a0, lv + 1) // K**lv if lv < L else 0
            keys.append(lay.offsets[lv] + np.arange(lo, floor_to(a1, lv) // K**lv))
            # nodes whose last child (j+1)·K**l - 1 falls in [t0, t1] run as queries of this block
            selves.append(lay.offsets[lv] + np.arange(-(-(t0 + 1) // K**lv) - 1, (t1 + 1) // K**lv))
        selves = np.concatenate(selves) if selves else np.zeros(0, dtype=np.int64)
        qs.append(np.concatenate([np.arange(t0, t1 + 1), selves]))
        kvs.append(np.union1d(np.concatenate(keys), selves))
    pad_to = lambda arrays: torch.tensor(
        np.stack([np.pad(x, (0, max(map(len, arrays)) - len(x)), constant_values=-1) for x in arrays]),
        dtype=torch.long,
        device=device,
    )
    q_idx, kv_idx = pad_to(qs), pad_to(kvs)
    valid_q, valid_k = q_idx >= 0, kv_idx >= 0
    q_idx, kv_idx = q_idx.clamp(min=0), kv_idx.clamp(min=0)  # padding reads row 0 (a real row, finite)
    mask = _visible(q_idx[:, :, None], kv_idx[:, None, :], lay) & valid_k[:, None, :]
    mask[:, :, 0] |= ~valid_q  # padding rows see one key so softmax stays finite; their output is dropped
    flat, valid = q_idx.flatten(), valid_q.flatten()
    inv = torch.full((lay.T,), -1, dtype=torch.long, device=device)
    inv[flat[valid]] = torch.arange(flat.numel(), device=device)[valid]
    assert bool((inv >= 0).all()) and int(valid.sum()) == lay.T, (
        "every packed query runs in exactly one block"
    )
    return BlockPlan(q_idx, kv_idx, mask[:, None], inv, valid_q)


def blocksparse_mega_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    return_lse: bool = False,
    reach: tuple[torch.Tensor, float] | None = None,
):
    """q, k, v [B, H, T, D] -> [B, H, T, D], equal to SDPA with `mega_mask` (up to fp summation order); with
    return_lse also the log-sum-exp of each query's scores [B, H, T] (then the softmax runs unfused).
    reach (mu [T], r): a pair whose centres lie more than r apart is read at distance r (positional.at_reach)."""
    B, H, T, D = q.shape
    if k.size(1) != H:  # grouped-query attention: share each key/value head across its query heads
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // k.size(1), dim=1)
    nb, Qm = plan.q_idx.shape
    Km = plan.kv_idx.size(1)

    def gather(x, index, n):  # [B, H, T, D] -> [B * nb, H, n, D]
        # index_select on the time axis of a [B, T, H, D] view moves whole H·D rows, and its backward is a
        # row-wise index_add: several times faster on CPU than advanced indexing of [B, H, T, D].
        x = x.transpose(1, 2).index_select(1, index.flatten())
        return x.view(B * nb, n, H, D).transpose(1, 2)

    qg, kg, vg = gather(q, plan.q_idx, Qm), gather(k, plan.kv_idx, Km), gather(v, plan.kv_idx, Km)
    mask = plan.mask.expand(B, nb, 1, Qm, Km).reshape(B * nb, 1, Qm, Km)
    if not return_lse and reach is None:
        y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
    else:
        s = qg @ kg.transpose(-1, -2) / D**0.5
        if reach is not None:
            mu, r = reach
            qf, kf = at_reach(q, k, mu, mu, r)
            far = mu[plan.q_idx][:, :, None] - mu[plan.kv_idx][:, None, :] > r  # [nb, Qm, Km]
            far = far[:, None].repeat(B, 1, 1, 1)
            s = torch.where(
                far, gather(qf, plan.q_idx, Qm) @ gather(kf, plan.kv_idx, Km).transpose(-1, -2) / D**0.5, s
            )
        s = s.masked_fill(~mask, float("-inf"))
        lse = s.logsumexp(-1)  # [B * nb, H, Qm]
        y = (s - lse[..., None]).exp() @ vg
    y = y.transpose(1, 2).reshape(B, nb * Qm, H, D).index_select(1, plan.inv).transpose(1, 2)
    if not return_lse:
        return y
    lse = lse.view(B, nb, H, Qm).transpose(1, 2).reshape(B, H, nb * Qm).index_select(2, plan.inv)
    return y, lse
