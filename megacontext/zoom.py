"""The zoom: learned re-expansion of summary nodes inside MegaAttention (DESIGN §6).

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
READ_ROWS = 1024  # raw queries per gather in `read_chunks` without grad: bounds the [rows, k·K, D] copies


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


def read_chunks(
    q: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor, index: torch.Tensor, K: int
) -> torch.Tensor:
    """Attention of each raw query over the K raw keys of each selected chunk, a softmax per chunk.

    q [B, H, R, D]; raw_k, raw_v [B, H_kv, N, D] (rotated at their own positions); index [B, H, R, k] chunk ids.
    Returns [B, H, R, k, D]. Without grad the rows go in slices (READ_ROWS) to bound the gathered copies."""
    B, H, R, D = q.shape
    k = index.size(-1)
    if k == 0:
        return q.new_zeros(B, H, R, 0, D)
    if not torch.is_grad_enabled() and R > READ_ROWS:
        parts = [
            read_chunks(q[:, :, s : s + READ_ROWS], raw_k, raw_v, index[:, :, s : s + READ_ROWS], K)
            for s in range(0, R, READ_ROWS)
        ]
        return torch.cat(parts, dim=2)
    raw_k, raw_v = _repeat_kv(raw_k, H), _repeat_kv(raw_v, H)
    N = raw_k.size(2)
    heads = torch.arange(B * H, device=q.device).view(B, H, 1, 1, 1) * N
    rows = (heads + index[..., None] * K + torch.arange(K, device=q.device)).reshape(-1)  # [B·H·R·k·K]
    # index_select on a flat [B·H·N, D] view moves whole rows; its backward is a row-wise index_add
    kg = raw_k.reshape(B * H * N, D).index_select(0, rows).view(B, H, R, k * K, D)
    vg = raw_v.reshape(B * H * N, D).index_select(0, rows).view(B, H, R, k, K, D)
    s = torch.einsum("bhrd,bhrjd->bhrj", q, kg).view(B, H, R, k, K) / math.sqrt(D)
    return torch.einsum("bhrcj,bhrcjd->bhrcd", s.softmax(-1), vg)


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
