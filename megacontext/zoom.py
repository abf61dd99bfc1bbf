"""The zoom: each raw query reads the raw tokens of its best chunks beyond its window (docs/design.md §6).

The pyramid (mega_attention.py) shows a raw query i the past beyond its window only as summary nodes, so a
query can learn *that* a node matters but never read the tokens behind it. The zoom lets it: every raw query
ranks the aligned K-token chunks that lie wholly before its raw window, takes its top-k, and attends to their
raw keys and values in the same softmax as the pyramid:

    y_i = ( Σ_pyramid e^{s_ij} v_j + Σ_{c in top-k} Σ_{t in c} e^{r_it} v_t )
          / ( Σ_pyramid e^{s_ij} + Σ_{c in top-k} Σ_{t in c} e^{r_it} )

so a selected chunk weighs what its tokens' own logits say (its entry's logit is lse_ic, the log-sum-exp of q_i over
its keys), and the LM loss reaches the query, the chunk's keys and values, and everything that made them.

The chunk frame: r_it is the logit of the query and key rotated as if the query stood W + K after the chunk's
start (the nearest a candidate chunk ever is), wherever the chunk really lies (`chunk_frame`). A chunk read thus
carries no distance: one 4k tokens back reads as one just beyond the window, so the reads work at any length,
not only at the distances training showed (the pyramid's nodes keep the real positions, and with them the order).

The reach: the pyramid's nodes keep their real positions, but a query never lies farther from a node's centre
than `training_reach` in the training rows, and beyond it RoPE's phases are ones training never showed (at 8k
tokens back variable tracking fell from 76 to 34 %). A pyramid pair whose centres lie farther apart is read as if
exactly the reach apart (`positional.at_reach`, ReRoPE's clamp): the far nodes keep their content and lose only
their order among themselves. It never binds at the training length, so training is unchanged (`beyond_reach`).

Ranking: by an upper bound of the query's largest logit in the chunk, Σ_d max(q_d·kmin_cd, q_d·kmax_cd) / √D, with
kmin_c, kmax_c the per-channel least and greatest of the chunk's K raw keys (Quest's criterion, Tang et al. 2024):
a chunk holding one key that matches the query ranks high, where one summary key per chunk had to stand for all
K tokens (docs/log.md, "Chunks ranked by their keys' bounds"). The top-k itself has no gradient; the bounds are
made of the layer's own keys, which learn through the reads. Two vectors per chunk, no parameter.

Causality: a chunk is a candidate for raw query i only when it ends at or before b1(i) = ⌊max(i - W, 0)/K⌋·K,
the start of the query's raw window (so its tokens are not seen raw twice and are all in the past). Node rows
attend with the pyramid only. Cost per raw query: the pyramid's W + L·(K - 1) + N/K^L keys, N/K chunk bounds,
k·K raw keys: O(W + k·K + N/K).

Three executions of one rule, the selection shared (`select_chunks`):
  `zoom_dense`      - the reference: explicit logits over the packed sequence, the selected chunks' raw keys at
                      their chunk-frame logits, one softmax. O(T²); on CPU the fastest at training lengths;
  `zoom_sparse`     - the pyramid block-sparse (CPU) or with flex_attention (CUDA; beyond the reach as two parts,
                      within and beyond, merged by `merge_lse`), returning its log-sum-exp, plus a gather of the
                      selected chunks' keys/values with theirs, merged by `merge`. O(T·(W + k·K + N/K)).
`ZoomAttention` picks one for a layout and device and is what the GPT calls (GPT.forward(attn_fn=...)).
"""

from __future__ import annotations

import functools
import math

import torch

from megacontext.mega_attention import (
    MegaLayout,
    _cached_mask,
    blocksparse_mega_attention,
    flex_mega_attention,
    mega_block_mask,
    plan_blocksparse,
)
from megacontext.positional import at_reach, reach_logits, rotate

# Packed lengths up to this run the dense reference on CPU, longer ones the block-sparse path: dense holds a
# [B, H, T, T] score tensor (T = 2k: 16 MB per row and head in fp32).
DENSE_MAX_LEN = 2048
READ_ROWS = 512  # raw queries per gather in `read_chunks`: bounds the [rows, k·K, D] copies


def _repeat_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """Grouped-query attention: share each key/value head across its query heads."""
    return x if x.size(1) == H else x.repeat_interleave(H // x.size(1), dim=1)


def candidates(anchors: torch.Tensor, K: int, W: int) -> torch.Tensor:
    """How many wLOD1 chunks raw query i may select: those wholly before b1(i) (chunks j < b1 / K)."""
    return (anchors - W).clamp(min=0) // K


def training_reach(seq_len: int, K: int) -> float:
    """The farthest a query ever lies from the centre of a node it sees in rows of seq_len: the last query
    and the first wLOD1 node (centre K / 2). The pyramid reads a pair farther apart at this distance."""
    return seq_len - 1 - K / 2


def beyond_reach(lay: MegaLayout, reach: float | None) -> bool:
    """Does any pair of the layout lie farther apart than `reach`? (Never at the training length.)"""
    return reach is not None and lay.levels > 0 and not lay.window_only and lay.N - 1 - lay.K / 2 > reach


def chunk_frame(
    q: torch.Tensor, k: torch.Tensor, anchors: torch.Tensor, K: int, W: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reads' queries and keys: q [B, H, R, D] rotated at raw positions `anchors` [R] turned to W + K, keys
    k [B, H_kv, n, D] rotated at 0..n-1 turned to their offsets in their chunk, so a read's logit is the one
    a query W + K after the chunk's start would have."""
    pos = torch.arange(k.size(2), device=k.device)
    return rotate(q, (W + K) - anchors), rotate(k, -(pos // K * K))


def chunk_bounds(raw_k: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk and channel, the least and greatest of its K raw keys: (kmin, kmax) [B, H_kv, n1, D]."""
    n1 = raw_k.size(2) // K
    c = raw_k[:, :, : n1 * K].unflatten(2, (n1, K))
    return c.amin(3), c.amax(3)


def bound_scores(q: torch.Tensor, raw_k: torch.Tensor, K: int) -> torch.Tensor:
    """[B, H, R, n1]: for each raw query and complete chunk, an upper bound of the query's largest logit over the
    chunk's keys, Σ_d max(q_d·kmin_d, q_d·kmax_d) / √D. Only ranks, so it carries no gradient."""
    H, D = q.size(1), q.size(-1)
    kmin, kmax = (_repeat_kv(x, H).detach().transpose(-1, -2) for x in chunk_bounds(raw_k, K))
    q = q.detach()
    return (q.clamp(min=0) @ kmax + q.clamp(max=0) @ kmin) / math.sqrt(D)


def select_chunks(
    q: torch.Tensor, anchors: torch.Tensor, raw_k: torch.Tensor, K: int, W: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each raw query's top-k candidate chunks by `bound_scores`.

    q [B, H, R, D] raw queries at raw positions `anchors` [R]; raw_k [B, H_kv, N, D] the raw keys, both in the
    chunk frame (`chunk_frame`).
    Returns (bounds [B, H, R, k], index [B, H, R, k]) with k = min(topk, complete chunks); a query with fewer
    than k candidates gets -inf bounds in the spare slots (not read)."""
    B, H, R, D = q.shape
    n1 = raw_k.size(2) // K
    k = min(topk, n1)
    if k == 0:
        return q.new_zeros(B, H, R, 0), torch.zeros(B, H, R, 0, dtype=torch.long, device=q.device)
    allowed = torch.arange(n1, device=q.device) < candidates(anchors.to(q.device), K, W)[:, None]
    return bound_scores(q, raw_k, K).masked_fill(~allowed, float("-inf")).topk(k, dim=-1)


def _gather(q, raw_k, raw_v, index, K):
    """(keys, values [B, H, r, k, K, D], the flat chunk rows read) of the selected chunks; raw_k, raw_v as
    [B·H·n1, K·D] (one row per chunk: index_select moves whole chunks)."""
    B, H, r, D = q.shape
    n1 = raw_k.size(0) // (B * H)
    rows = (torch.arange(B * H, device=q.device).view(B, H, 1, 1) * n1 + index).reshape(-1)
    shape = (B, H, r, index.size(-1), K, D)
    return raw_k.index_select(0, rows).view(shape), raw_v.index_select(0, rows).view(shape), rows


def _read_logits(q, kg):
    """The logits [B, H, r, k, K] of q [B, H, r, D] against gathered keys [B, H, r, k, K, D]."""
    return torch.einsum("bhrd,bhrcjd->bhrcj", q, kg) / math.sqrt(q.size(-1))


class _ChunkRead(torch.autograd.Function):
    """read_chunks in slices of READ_ROWS queries; the backward gathers again instead of keeping the
    [R, k·K, D] copies of every slice (they would hold k·K keys per query, ~0.5 GB per 4k tokens and head)."""

    @staticmethod
    def forward(ctx, q, raw_k, raw_v, index, K):
        ctx.save_for_backward(q, raw_k, raw_v, index)
        ctx.K = K
        out, lses = [], []
        for s in range(0, q.size(2), READ_ROWS):
            qs = q[:, :, s : s + READ_ROWS]
            kg, vg, _ = _gather(qs, raw_k, raw_v, index[:, :, s : s + READ_ROWS], K)
            logit = _read_logits(qs, kg)
            out.append(torch.einsum("bhrcj,bhrcjd->bhrcd", logit.softmax(-1), vg))
            lses.append(logit.logsumexp(-1))
        return torch.cat(out, dim=2), torch.cat(lses, dim=2)

    @staticmethod
    def backward(ctx, grad, grad_lse):
        q, raw_k, raw_v, index = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(raw_k), torch.zeros_like(raw_v)
        for s in range(0, q.size(2), READ_ROWS):
            qs, g = q[:, :, s : s + READ_ROWS], grad[:, :, s : s + READ_ROWS]  # g [B, H, r, k, D]
            gl = grad_lse[:, :, s : s + READ_ROWS, :, None]  # d loss / d lse: p more on each logit
            kg, vg, rows = _gather(qs, raw_k, raw_v, index[:, :, s : s + READ_ROWS], ctx.K)
            p = _read_logits(qs, kg).softmax(-1)
            dp = torch.einsum("bhrcd,bhrcjd->bhrcj", g, vg)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True) + gl) / math.sqrt(q.size(-1))
            dq[:, :, s : s + READ_ROWS] = torch.einsum("bhrcj,bhrcjd->bhrd", ds, kg)
            dk.index_add_(0, rows, torch.einsum("bhrcj,bhrd->bhrcjd", ds, qs).reshape(rows.numel(), -1))
            dv.index_add_(0, rows, torch.einsum("bhrcj,bhrcd->bhrcjd", p, g).reshape(rows.numel(), -1))
        return dq, dk, dv, None, None


def read_chunks(
    q: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor, index: torch.Tensor, K: int
) -> torch.Tensor:
    """Attention of each raw query over the K raw keys of each selected chunk, a softmax per chunk.

    q [B, H, R, D]; raw_k, raw_v [B, H_kv, N, D] (q and raw_k in the chunk frame); index [B, H, R, k] chunk ids.
    Returns ([B, H, R, k, D], the log-sum-exp of each read [B, H, R, k]). Runs in slices of READ_ROWS queries,
    forward and backward (`_ChunkRead`)."""
    B, H, R, D = q.shape
    if index.size(-1) == 0:
        return q.new_zeros(B, H, R, 0, D), q.new_zeros(B, H, R, 0)
    n1 = raw_k.size(2) // K
    chunks = lambda x: _repeat_kv(x, H)[:, :, : n1 * K].reshape(B * H * n1, K * D)  # one row per chunk
    return _ChunkRead.apply(q, chunks(raw_k), chunks(raw_v), index, K)


def merge(
    y: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor, y_chunks: torch.Tensor, chunk_lse: torch.Tensor
) -> torch.Tensor:
    """One softmax over the pyramid and the selected chunks' keys, from the parts' outputs and log-sum-exps.

    y [B, H, R, D], lse [B, H, R]: the pyramid's; y_chunks [B, H, R, k, D], chunk_lse [B, H, R, k]: the reads'
    (spare slots, -inf `bounds`, weigh nothing). Returns [B, H, R, D]."""
    chunk_lse = chunk_lse.masked_fill(~torch.isfinite(bounds), float("-inf"))
    w = torch.cat([lse[..., None].float(), chunk_lse.float()], dim=-1).softmax(-1)
    out = w[..., :1] * y.float() + (w[..., 1:, None] * y_chunks.float()).sum(-2)
    return out.to(y.dtype)


def zoom_dense(
    q, k, v, lay: MegaLayout, topk: int, mask: torch.Tensor | None = None, reach: float | None = None
) -> torch.Tensor:
    """The reference: one softmax per query over the packed sequence [B, H, T, D], the pyramid's keys at their
    logits (a pair farther apart than `reach` at that distance) and the raw keys of query i's selected chunks
    at their chunk-frame logits, -inf elsewhere (`mask`: the pyramid's [T, T] bool mask, built from the layout
    when None)."""
    if lay.levels == 0 or lay.window_only:
        raise ValueError("the zoom needs a MegaAttention layout with node levels")
    B, H, T, D = q.shape
    N, K, n1 = lay.N, lay.K, lay.counts[1]
    mask = _cached_mask(lay, str(q.device)) if mask is None else mask
    k, v = _repeat_kv(k, H), _repeat_kv(v, H)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if beyond_reach(lay, reach):
        mu = _cached_mu(lay, str(q.device))
        s = reach_logits(s, q, k, mu, mu, reach)
    s = s.masked_fill(~mask, float("-inf"))
    anchors = torch.arange(N, device=q.device)
    q_read, k_read = chunk_frame(q[:, :, :N], k[:, :, : n1 * K], anchors, K, lay.W)
    bounds, index = select_chunks(q_read, anchors, k_read, K, lay.W, topk)
    if index.size(-1):
        opened = torch.zeros(B, H, N, n1, dtype=torch.bool, device=q.device)
        opened = opened.scatter(-1, index, torch.isfinite(bounds)).repeat_interleave(K, dim=-1)
        reads = q_read @ k_read.transpose(-1, -2) / math.sqrt(D)
        # a selected chunk lies before the query's raw window: none of its keys is a pyramid key
        s[:, :, :N, : n1 * K] = torch.where(opened, reads, s[:, :, :N, : n1 * K])
    return s.softmax(-1) @ v


def zoom_sparse(q, k, v, lay: MegaLayout, topk: int, pyramid) -> torch.Tensor:
    """The pyramid by `pyramid(q, k, v) -> (y, lse)` (block-sparse or flex), then the selected chunks' raw keys
    gathered and merged (`merge`) into the raw queries' outputs; node rows keep the pyramid's."""
    y, lse = pyramid(q, k, v)
    N = lay.N
    anchors = torch.arange(N, device=q.device)
    q_read, k_read = chunk_frame(q[:, :, :N], k[:, :, :N], anchors, lay.K, lay.W)
    bounds, index = select_chunks(q_read, anchors, k_read, lay.K, lay.W, topk)
    if index.size(-1) == 0:
        return y
    y_chunks, chunk_lse = read_chunks(q_read, k_read, v[:, :, :N], index, lay.K)
    mixed = merge(y[:, :, :N], lse[:, :, :N], bounds, y_chunks, chunk_lse)
    return torch.cat([mixed, y[:, :, N:]], dim=2)


@functools.lru_cache(maxsize=4)
def _cached_plan(lay: MegaLayout, device: str):
    return plan_blocksparse(lay, 128, device)


@functools.lru_cache(maxsize=4)
def _cached_block_mask(lay: MegaLayout, device: str, reach: float | None = None, far: bool = False):
    """The pyramid's BlockMask; with a reach, that of its pairs within it (far False) or beyond it (True)."""
    if reach is None:
        return mega_block_mask(lay, device)
    mu = _cached_mu(lay, device)
    keep = lambda q_idx, kv_idx: (mu[q_idx] - mu[kv_idx] > reach) == far
    return mega_block_mask(lay, device, keep=keep)


@functools.lru_cache(maxsize=4)
def _cached_mu(lay: MegaLayout, device: str) -> torch.Tensor:
    """Each packed position's rotary centre (mega_attention.mega_rotary's μ)."""
    return lay.mu_sigma()[0].to(device)


def merge_lse(y1, lse1, y2, lse2):
    """One softmax from two disjoint parts' outputs [B, H, T, D] and log-sum-exps [B, H, T] (a part with no
    key: lse -inf, weight 0)."""
    lse = torch.logaddexp(lse1.float(), lse2.float())
    w1, w2 = (lse1.float() - lse).exp()[..., None], (lse2.float() - lse).exp()[..., None]
    return (w1 * y1.float() + w2 * y2.float()).to(y1.dtype), lse


class ZoomAttention:
    """The GPT's attention function (GPT.forward(attn_fn=...)) for MegaAttention with the zoom at top-k `topk`.

    path "dense" | "blocksparse" | "flex"; None picks by device: flex_attention on CUDA, on CPU the dense
    reference up to DENSE_MAX_LEN packed positions and the block-sparse path beyond."""

    def __init__(
        self, lay: MegaLayout, topk: int, device, path: str | None = None, reach: float | None = None
    ):
        device = torch.device(device)
        if path is None:
            path = "flex" if device.type == "cuda" else "dense" if lay.T <= DENSE_MAX_LEN else "blocksparse"
        if path not in ("dense", "blocksparse", "flex"):
            raise ValueError(f"unknown zoom path {path!r}")
        self.lay, self.topk, self.path, self.device = lay, topk, path, str(device)
        self.reach = reach if beyond_reach(lay, reach) else None  # None: every pair at its real distance

    def pyramid(self, q, k, v):
        """(y, lse) of the pyramid alone; a pair beyond the reach read at the reach (`at_reach`)."""
        lay, dev, reach = self.lay, self.device, self.reach
        if self.path == "blocksparse":
            at = None if reach is None else (_cached_mu(lay, dev), reach)
            return blocksparse_mega_attention(q, k, v, _cached_plan(lay, dev), return_lse=True, reach=at)
        if reach is None:
            return flex_mega_attention(q, k, v, _cached_block_mask(lay, dev), return_lse=True)
        # flex scores one q·k per pair: the pairs within the reach and those beyond run as two parts
        near = flex_mega_attention(q, k, v, _cached_block_mask(lay, dev, reach), return_lse=True)
        mu = _cached_mu(lay, dev)
        qf, kf = at_reach(q, k, mu, mu, reach)
        far = flex_mega_attention(qf, kf, v, _cached_block_mask(lay, dev, reach, True), return_lse=True)
        return merge_lse(*near, *far)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.path == "dense":
            return zoom_dense(q, k, v, self.lay, self.topk, reach=self.reach)
        return zoom_sparse(q, k, v, self.lay, self.topk, self.pyramid)


def cached_zoom(q, k, v, mask, rows, raw_k, raw_v, K: int, W: int, topk: int, reach=None) -> torch.Tensor:
    """The zoom for a KV cache's refresh (megacontext/kv_cache.py): q [1, H, R, D] the recomputed rows (the raw
    ones first, at raw positions `rows`), k, v [1, H_kv, C, D] the key columns the pyramid `mask` [R, C] is over;
    raw_k, raw_v the raw keys/values [1, H_kv, *, D] of this layer, as cached (rotated at their positions);
    reach (mu of the rows [R], of the columns [C], r): a pyramid pair farther apart than r read at r."""
    H, D = q.size(1), q.size(-1)
    k_all = _repeat_kv(k, H)
    s = q @ k_all.transpose(-1, -2) / math.sqrt(D)
    if reach is not None:
        mu_q, mu_k, r = reach
        s = reach_logits(s, q, k_all, mu_q.to(q.device), mu_k.to(q.device), r)
    s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)
    y = (s - lse[..., None]).exp() @ _repeat_kv(v, H)
    R0 = rows.numel()
    if R0 == 0 or raw_k.size(2) < K:
        return y
    q_read, k_read = chunk_frame(q[:, :, :R0], raw_k, rows, K, W)
    bounds, index = select_chunks(q_read, rows, k_read, K, W, topk)
    y_chunks, chunk_lse = read_chunks(q_read, k_read, raw_v, index, K)
    y_raw = merge(y[:, :, :R0], lse[:, :, :R0], bounds, y_chunks, chunk_lse)
    return torch.cat([y_raw, y[:, :, R0:]], dim=2)
