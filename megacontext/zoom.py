"""The zoom: learned re-expansion of summary nodes inside MegaAttention (docs/design.md §6).

The pyramid (mega_attention.py) shows a raw query i the past beyond its window only as summary nodes, so a
query can learn *that* a node matters but never read the tokens behind it. The zoom lets it: every raw query
scores the wLOD1 nodes (one per aligned K-token chunk) that lie wholly before its raw window, takes its top-k
chunks, and reads each chunk's K raw keys and values with a softmax of its own, at the tokens' own positions
(the keys arrive rotated). The k chunk outputs join the pyramid's softmax as k more entries whose logits are the
chunk scores:

    y_i = ( Σ_pyramid e^{s_ij} v_j + Σ_{c in top-k} e^{s_ic} · y_ic ) / ( Σ_pyramid e^{s_ij} + Σ_c e^{s_ic} )

with s_ic = q_i · k_node(c) / √D, the same logit the pyramid gives node c, and y_ic the read of c's raw tokens.
That is Hierarchical Sparse Attention's mixing (the chunk outputs are weighted by the softmax of their scores),
so the scorer gets gradient from the LM loss; a chunk that is not selected gets none through the zoom, but its
node key is also a pyramid key and learns there, so selection improves as the node-reading circuit forms.
With top-k 0 this is the pyramid exactly.

Causality: a chunk is a candidate for raw query i only when it ends at or before b1(i) = ⌊max(i - W, 0)/K⌋·K,
the start of the query's raw window (so its tokens are not seen raw twice and are all in the past). Node rows
attend with the pyramid only. Cost per raw query: the pyramid's W + L·(K - 1) + N/K^L keys, N/K chunk scores,
k·K raw keys: O(W + k·K + N/K).

Three executions of one rule, the selection shared (`select_chunks`):
  `zoom_dense`      - the reference: one SDPA over the packed sequence whose float mask adds s_ic - lse_ic to the
                      raw keys of the selected chunks (lse_ic: the log-sum-exp of q_i over the chunk's keys), so
                      each chunk's total mass is e^{s_ic}. O(T²); on CPU the fastest at training lengths;
  `zoom_sparse`     - the pyramid block-sparse (CPU) or with flex_attention (CUDA), returning its log-sum-exp, plus
                      a gather of the selected chunks' keys/values, merged by `merge`. O(T·(W + k·K + N/K)).
`ZoomAttention` picks one for a layout and device and is what the GPT calls (GPT.forward(attn_fn=...)).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from megacontext.mega_attention import (
    MegaLayout,
    _cached_mask,
    blocksparse_mega_attention,
    flex_mega_attention,
    mega_block_mask,
    plan_blocksparse,
)

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


def select_chunks(
    q: torch.Tensor, anchors: torch.Tensor, node_k: torch.Tensor, K: int, W: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each raw query's top-k chunks by its score against the chunks' wLOD1 node keys.

    q [B, H, R, D] raw queries at raw positions `anchors` [R]; node_k [B, H_kv, n1, D] the wLOD1 node keys.
    Returns (logits [B, H, R, k], index [B, H, R, k]) with k = min(topk, n1); a query with fewer than k candidates
    gets -inf logits in the spare slots (weight 0). The logits carry gradient to q and the node keys."""
    B, H, R, D = q.shape
    n1 = node_k.size(2)
    k = min(topk, n1)
    if k == 0:
        return q.new_zeros(B, H, R, 0), torch.zeros(B, H, R, 0, dtype=torch.long, device=q.device)
    scores = q @ _repeat_kv(node_k, H).transpose(-1, -2) / math.sqrt(D)  # [B, H, R, n1]
    allowed = torch.arange(n1, device=q.device) < candidates(anchors.to(q.device), K, W)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.topk(k, dim=-1)


def _gather(q, raw_k, raw_v, index, K):
    """(keys, values [B, H, r, k, K, D], the flat chunk rows read) of the selected chunks; raw_k, raw_v as
    [B·H·n1, K·D] (one row per chunk: index_select moves whole chunks)."""
    B, H, r, D = q.shape
    n1 = raw_k.size(0) // (B * H)
    rows = (torch.arange(B * H, device=q.device).view(B, H, 1, 1) * n1 + index).reshape(-1)
    shape = (B, H, r, index.size(-1), K, D)
    return raw_k.index_select(0, rows).view(shape), raw_v.index_select(0, rows).view(shape), rows


def _read_probs(q, kg):
    """The per-chunk softmax [B, H, r, k, K] of q [B, H, r, D] over gathered keys [B, H, r, k, K, D]."""
    return (torch.einsum("bhrd,bhrcjd->bhrcj", q, kg) / math.sqrt(q.size(-1))).softmax(-1)


class _ChunkRead(torch.autograd.Function):
    """read_chunks in slices of READ_ROWS queries; the backward gathers again instead of keeping the
    [R, k·K, D] copies of every slice (they would hold k·K keys per query, ~0.5 GB per 4k tokens and head)."""

    @staticmethod
    def forward(ctx, q, raw_k, raw_v, index, K):
        ctx.save_for_backward(q, raw_k, raw_v, index)
        ctx.K = K
        out = []
        for s in range(0, q.size(2), READ_ROWS):
            qs = q[:, :, s : s + READ_ROWS]
            kg, vg, _ = _gather(qs, raw_k, raw_v, index[:, :, s : s + READ_ROWS], K)
            out.append(torch.einsum("bhrcj,bhrcjd->bhrcd", _read_probs(qs, kg), vg))
        return torch.cat(out, dim=2)

    @staticmethod
    def backward(ctx, grad):
        q, raw_k, raw_v, index = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(raw_k), torch.zeros_like(raw_v)
        for s in range(0, q.size(2), READ_ROWS):
            qs, g = q[:, :, s : s + READ_ROWS], grad[:, :, s : s + READ_ROWS]  # g [B, H, r, k, D]
            kg, vg, rows = _gather(qs, raw_k, raw_v, index[:, :, s : s + READ_ROWS], ctx.K)
            p = _read_probs(qs, kg)
            dp = torch.einsum("bhrcd,bhrcjd->bhrcj", g, vg)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True)) / math.sqrt(q.size(-1))
            dq[:, :, s : s + READ_ROWS] = torch.einsum("bhrcj,bhrcjd->bhrd", ds, kg)
            dk.index_add_(0, rows, torch.einsum("bhrcj,bhrd->bhrcjd", ds, qs).reshape(rows.numel(), -1))
            dv.index_add_(0, rows, torch.einsum("bhrcj,bhrcd->bhrcjd", p, g).reshape(rows.numel(), -1))
        return dq, dk, dv, None, None


def read_chunks(
    q: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor, index: torch.Tensor, K: int
) -> torch.Tensor:
    """Attention of each raw query over the K raw keys of each selected chunk, a softmax per chunk.

    q [B, H, R, D]; raw_k, raw_v [B, H_kv, N, D] (rotated at their own positions); index [B, H, R, k] chunk ids.
    Returns [B, H, R, k, D]. Runs in slices of READ_ROWS queries, forward and backward (`_ChunkRead`)."""
    B, H, R, D = q.shape
    if index.size(-1) == 0:
        return q.new_zeros(B, H, R, 0, D)
    n1 = raw_k.size(2) // K
    chunks = lambda x: _repeat_kv(x, H)[:, :, : n1 * K].reshape(B * H * n1, K * D)  # one row per chunk
    return _ChunkRead.apply(q, chunks(raw_k), chunks(raw_v), index, K)


def merge(y: torch.Tensor, lse: torch.Tensor, logits: torch.Tensor, y_chunks: torch.Tensor) -> torch.Tensor:
    """One softmax over the pyramid (its log-sum-exp as one entry) and the selected chunks (their scores).

    y [B, H, R, D], lse [B, H, R]: the pyramid's output and log-sum-exp; logits [B, H, R, k], y_chunks
    [B, H, R, k, D]. Returns [B, H, R, D]."""
    w = torch.cat([lse[..., None].float(), logits.float()], dim=-1).softmax(-1)
    out = w[..., :1] * y.float() + (w[..., 1:, None] * y_chunks.float()).sum(-2)
    return out.to(y.dtype)


def _chunk_inputs(q, k, lay: MegaLayout):
    """The raw queries with their positions and the wLOD1 node keys of a packed layout."""
    N, off, n1 = lay.N, lay.offsets[1], lay.counts[1]
    return q[:, :, :N], torch.arange(N, device=q.device), k[:, :, off : off + n1]


def zoom_dense(q, k, v, lay: MegaLayout, topk: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: SDPA over the packed sequence [B, H, T, D] with a float mask that is 0 on the pyramid's keys
    and s_ic - lse_ic on the raw keys of query i's selected chunks, -inf elsewhere (`mask`: the pyramid's
    [T, T] bool mask, built from the layout when None)."""
    if lay.levels == 0 or lay.window_only:
        raise ValueError("the zoom needs a MegaAttention layout with node levels")
    B, H, T, D = q.shape
    N, K, n1 = lay.N, lay.K, lay.counts[1]
    mask = _cached_mask(lay, str(q.device)) if mask is None else mask
    bias = torch.zeros(B, H, T, T, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    logits, index = select_chunks(*_chunk_inputs(q, k, lay), K, lay.W, topk)
    if index.size(-1):
        raw_k = _repeat_kv(k, H)[:, :, : n1 * K]
        s = q[:, :, :N] @ raw_k.transpose(-1, -2) / math.sqrt(D)  # [B, H, N, n1·K]
        lse = s.view(B, H, N, n1, K).logsumexp(-1).gather(-1, index)  # [B, H, N, k]
        per_chunk = torch.full((B, H, N, n1), float("-inf"), dtype=q.dtype, device=q.device)
        per_chunk = per_chunk.scatter(-1, index, logits - lse)
        # a selected chunk lies before the query's raw window: none of its keys is a pyramid key
        bias[:, :, :N, : n1 * K] = torch.where(
            mask[:N, : n1 * K], bias[:, :, :N, : n1 * K], per_chunk.repeat_interleave(K, dim=-1)
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.size(1) != k.size(1))


def zoom_sparse(q, k, v, lay: MegaLayout, topk: int, pyramid) -> torch.Tensor:
    """The pyramid by `pyramid(q, k, v) -> (y, lse)` (block-sparse or flex), then the selected chunks' raw keys
    gathered and merged (`merge`) into the raw queries' outputs; node rows keep the pyramid's."""
    y, lse = pyramid(q, k, v)
    q_raw, anchors, node_k = _chunk_inputs(q, k, lay)
    logits, index = select_chunks(q_raw, anchors, node_k, lay.K, lay.W, topk)
    if index.size(-1) == 0:
        return y
    y_chunks = read_chunks(q_raw, k[:, :, : lay.N], v[:, :, : lay.N], index, lay.K)
    return torch.cat([merge(y[:, :, : lay.N], lse[:, :, : lay.N], logits, y_chunks), y[:, :, lay.N :]], dim=2)


@functools.lru_cache(maxsize=4)
def _cached_plan(lay: MegaLayout, device: str):
    return plan_blocksparse(lay, 128, device)


@functools.lru_cache(maxsize=4)
def _cached_block_mask(lay: MegaLayout, device: str):
    return mega_block_mask(lay, device)


class ZoomAttention:
    """The GPT's attention function (GPT.forward(attn_fn=...)) for MegaAttention with the zoom at top-k `topk`.

    path "dense" | "blocksparse" | "flex"; None picks by device: flex_attention on CUDA, on CPU the dense
    reference up to DENSE_MAX_LEN packed positions and the block-sparse path beyond."""

    def __init__(self, lay: MegaLayout, topk: int, device, path: str | None = None):
        device = torch.device(device)
        if path is None:
            path = "flex" if device.type == "cuda" else "dense" if lay.T <= DENSE_MAX_LEN else "blocksparse"
        if path not in ("dense", "blocksparse", "flex"):
            raise ValueError(f"unknown zoom path {path!r}")
        self.lay, self.topk, self.path, self.device = lay, topk, path, str(device)

    def pyramid(self, q, k, v):
        """(y, lse) of the pyramid alone."""
        if self.path == "flex":
            return flex_mega_attention(q, k, v, _cached_block_mask(self.lay, self.device), return_lse=True)
        return blocksparse_mega_attention(q, k, v, _cached_plan(self.lay, self.device), return_lse=True)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.path == "dense":
            return zoom_dense(q, k, v, self.lay, self.topk)
        return zoom_sparse(q, k, v, self.lay, self.topk, self.pyramid)


def cached_zoom(q, k, v, mask, rows, node_k, raw_k, raw_v, K: int, W: int, topk: int) -> torch.Tensor:
    """The zoom for a KV cache's refresh (megacontext/kv_cache.py): q [1, H, R, D] the recomputed rows (the raw
    ones first, at raw positions `rows`), k, v [1, H_kv, C, D] the key columns the pyramid `mask` [R, C] is over;
    node_k the wLOD1 node keys and raw_k, raw_v the raw keys/values [1, H_kv, *, D] of this layer, as cached."""
    H, D = q.size(1), q.size(-1)
    s = q @ _repeat_kv(k, H).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)
    y = (s - lse[..., None]).exp() @ _repeat_kv(v, H)
    R0 = rows.numel()
    if R0 == 0 or node_k.size(2) == 0:
        return y
    q_raw = q[:, :, :R0]
    logits, index = select_chunks(q_raw, rows, node_k, K, W, topk)
    y_raw = merge(y[:, :, :R0], lse[:, :, :R0], logits, read_chunks(q_raw, raw_k, raw_v, index, K))
    return torch.cat([y_raw, y[:, :, R0:]], dim=2)
