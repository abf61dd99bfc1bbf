"""GistNet: compress one aligned block of K embeddings into a single gist.

Input [B, K, d]: token embeddings for an LOD1 gist, child gists for LOD2 and above; one module serves every
level through a learned level embedding added to its inputs. A few transformer blocks in the GPT's flavour
(QK-norm, ReLU^2 MLP, parameter-free RMSNorm, no biases, local RoPE over positions 0..K-1) with
BIDIRECTIONAL attention: the block is complete before it is gisted (never padded), so every output may
see every input. Then pooling and a linear or MLP head back to d.

Pooling:
  mean  - mean of the K outputs.
  query - one learned query per head attends once over the K outputs (keys = the RMS-normed outputs,
          values = the outputs themselves; a key or value projection would be redundant with a single
          query and the head that follows).
  cls   - a learned CLS token is prepended (at the block centre (K-1)/2 for RoPE) and its output is read
          out. Under causal attention a leading CLS would see only itself; here it sees the whole block.
kind="mean" is the cheap control: no transformer at all, the mean of the inputs then the head (pooling
does not apply to it).

Scale and init: the GPT RMS-normalises its input embeddings, so a gist should look like a token embedding
as the GPT sees it. GistNet normalises its inputs (so it is scale-free across levels, like the GPT) and
its output (unit RMS, the scale of a normed token embedding). At init every block is the identity
(zero output projections, as in the GPT), the level embedding and the query are zero (uniform attention)
and the head is a residual with a zero output projection, so for mean/query pooling and kind="mean" the
initial gist is exactly norm(mean(norm(x))): the mean of the inputs at token scale. A cls gist starts as
the CLS vector itself and learns to gather the block from the first step (a reason query is the default).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import norm, rotary_cos_sin

KINDS, POOLINGS, HEADS = ("transformer", "mean"), ("mean", "query", "cls"), ("linear", "mlp")


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width (cos, sin) [..., D/2] from rotary_cos_sin -> the full-width tables `rotate` takes:
    ([cos, cos], [sin, -sin]) [..., D]. Built once per network call, shared by its blocks."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """nanochat.gpt.apply_rotary_emb with rope_tables: x·cos + roll(x)·sin, where roll swaps the halves, is
    (x1 cos + x2 sin, x2 cos - x1 sin) bit for bit in 4 ops instead of 9 (and 13 backward instead of 22)."""
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * sin.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block whose attention is never causal (optional key-padding mask).

    Shared with LensNet. q and k are RMS-normed BEFORE the rotary so Gaussian-RoPE damping survives
    (see megacontext/positional.py); for ordinary RoPE the order does not matter (rotations keep norms).
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"d_model={d_model} must split into {n_head} heads of even size (for RoPE)")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.c_q = nn.Linear(d_model, d_model, bias=False)
        self.c_k = nn.Linear(d_model, d_model, bias=False)
        self.c_v = nn.Linear(d_model, d_model, bias=False)
        self.attn_proj = nn.Linear(d_model, d_model, bias=False)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.mlp_proj = nn.Linear(4 * d_model, d_model, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the GPT: inputs ~ U(-a, a), a = sqrt(3/d) (unit-variance outputs); output projections 0."""
        a = math.sqrt(3.0 / self.c_q.in_features)
        for lin in (self.c_q, self.c_k, self.c_v, self.c_fc):
            nn.init.uniform_(lin.weight, -a, a)
        nn.init.zeros_(self.attn_proj.weight)
        nn.init.zeros_(self.mlp_proj.weight)

    def forward(self, x, cos, sin, attn_mask: torch.Tensor | None = None):
        """x [B, T, d]; cos/sin [B or 1, T, 1, head_dim] (rope_tables); attn_mask bool [B, 1, 1 or T, T],
        True = attend.

        q, k and v come from one matmul over the three weights stacked, and q and k are normed and rotated
        together: the same numbers as three projections and two rotations, in about two thirds of the ops."""
        B, T, _ = x.shape
        H, hd = self.n_head, self.head_dim
        h = norm(x)
        w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        qk, v = F.linear(h, w).view(B, T, 3 * H, hd).split([2 * H, H], dim=2)
        q, k = rotate(norm(qk), cos, sin).transpose(1, 2).split(H, dim=1)
        y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask, is_causal=False)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp_proj(F.relu(self.c_fc(norm(x))).square())


class Head(nn.Module):
    """Residual projection to d: out = x + W x ("linear") or x + W2 relu(W1 norm(x))^2 ("mlp"); W / W2 start at 0."""

    def __init__(self, d_model: int, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False) if kind == "mlp" else None
        self.proj = nn.Linear(4 * d_model if kind == "mlp" else d_model, d_model, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.fc is not None:
            a = math.sqrt(3.0 / self.fc.in_features)
            nn.init.uniform_(self.fc.weight, -a, a)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        if self.fc is None:
            return x + self.proj(x)
        return x + self.proj(F.relu(self.fc(norm(x))).square())


class GistNet(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_layer: int = 2,
        block_size: int = 32,
        kind: str = "transformer",
        pooling: str = "query",
        head: str = "mlp",
        max_level: int = 8,
    ):
        super().__init__()
        for name, value, allowed in (
            ("kind", kind, KINDS),
            ("pooling", pooling, POOLINGS),
            ("head", head, HEADS),
        ):
            if value not in allowed:
                raise ValueError(f"GistNet {name}={value!r}; choose one of {', '.join(allowed)}")
        self.d_model, self.n_head, self.block_size, self.max_level = d_model, n_head, block_size, max_level
        self.kind = kind
        self.pooling = pooling if kind == "transformer" else "mean"
        self.level_emb = nn.Embedding(max_level, d_model)  # row l-1 for a gist of level l (1..max_level)
        self.blocks = nn.ModuleList(
            [Block(d_model, n_head) for _ in range(n_layer)] if kind == "transformer" else []
        )
        self.query = nn.Parameter(torch.empty(n_head, d_model // n_head)) if self.pooling == "query" else None
        self.cls = (
            nn.Parameter(torch.empty(d_model)) if self.pooling == "cls" and kind == "transformer" else None
        )
        self.head = Head(d_model, head)
        if kind == "transformer":
            cos, sin = self._local_rotary()
            self.register_buffer("cos", cos, persistent=False)  # a pure function of the config
            self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    def _local_rotary(self, device=None):
        positions = torch.arange(self.block_size, dtype=torch.float32, device=device)
        if self.cls is not None:
            centre = torch.full((1,), (self.block_size - 1) / 2, device=device)
            positions = torch.cat([centre, positions])
        cos, sin = rotary_cos_sin(positions, self.d_model // self.n_head)
        return rope_tables(cos[None], sin[None])  # [1, T, 1, head_dim]

    @torch.no_grad()
    def init_weights(self) -> None:
        """level_emb = 0 and query = 0 (uniform attention): the initial gist is the block mean (module doc).
        cls ~ N(0, 1): a token-scale vector (a zero CLS would hit RMSNorm's singular point at 0)."""
        nn.init.zeros_(self.level_emb.weight)
        for block in self.blocks:
            block.init_weights()
        if self.query is not None:
            nn.init.zeros_(self.query)
        if self.cls is not None:
            nn.init.normal_(self.cls, mean=0.0, std=1.0)
        self.head.init_weights()
        if self.kind == "transformer":
            self.cos, self.sin = self._local_rotary(self.level_emb.weight.device)

    def forward(self, x: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        """x [B, K, d] one complete block per row; level (of the gist made: 1 = from tokens) int or [B] -> [B, d]."""
        B, K, d = x.shape
        if K != self.block_size:
            raise ValueError(
                f"GistNet gists complete blocks of {self.block_size}, got {K} (never a padded block)"
            )
        if isinstance(level, int):  # one level for the batch: checked on the host, no device read (training)
            if not 1 <= level <= self.max_level:
                raise ValueError(f"GistNet level must be in 1..{self.max_level}, got {level}")
            lvl = self.level_emb.weight[level - 1].expand(B, 1, d)
        else:
            level = torch.as_tensor(level, dtype=torch.long, device=x.device).expand(B)
            if bool(((level < 1) | (level > self.max_level)).any()):
                raise ValueError(f"GistNet level must be in 1..{self.max_level}, got {level.tolist()}")
            lvl = self.level_emb(level - 1)[:, None, :]  # [B, 1, d]
        h = norm(x) + lvl
        if self.kind == "mean":
            return norm(self.head(h.mean(dim=1)))
        if self.cls is not None:
            h = torch.cat([self.cls.expand(B, 1, d) + lvl, h], dim=1)
        for block in self.blocks:
            h = block(h, self.cos, self.sin)
        if self.pooling == "mean":
            pooled = h.mean(dim=1)
        elif self.pooling == "cls":
            pooled = h[:, 0]
        else:  # one learned query per head, keys = normed outputs, values = outputs
            hd = d // self.n_head
            heads = h.view(B, K, self.n_head, hd)
            # products and sums rather than einsum: the same contraction in a third of the ops
            weights = (norm(heads) * (self.query / math.sqrt(hd))).sum(dim=-1).softmax(dim=1)  # [B, K, H]
            pooled = (weights[..., None] * heads).sum(dim=1).reshape(B, d)
        return norm(self.head(pooled))

    def gist(self, x: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        """Alias of forward (reads better at call sites: gistnet.gist(block, level=1))."""
        return self(x, level)
