"""The GPT: a nanochat-style decoder-only transformer.

Rotary embeddings (no learned positions), QK-norm, ReLU² MLP, parameter-free RMSNorm, no biases,
untied token embedding and LM head, logit soft-capping, optional grouped-query attention.

MegaContext drives this model from outside: `forward` also accepts input embeddings (tokens and gists
mixed) with their own rotary phases, an explicit attention mask, and packed batches of sequences of
different lengths. The model itself knows nothing about gists, trees or working contexts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    smear: bool = False  # token shift: mix a learned share of the previous input into each position
    smear_width: int = 1  # how many previous inputs the token shift mixes in (x[t-1] .. x[t-width])

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128) -> GPTConfig:
    """nanochat's one dial: width = 64 * depth, heads of `head_dim` (fewer at tiny widths)."""
    n_embd = 64 * depth
    n_head = max(1, n_embd // head_dim) if n_embd >= head_dim else max(1, n_embd // 64)
    while n_embd % n_head:
        n_head -= 1
    return GPTConfig(sequence_len, vocab_size, depth, n_head, n_head, n_embd)


# -----------------------------------------------------------------------------
# Rotary embeddings. Positions are floats so MegaContext can place a gist at the centre of its span;
# megacontext.positional builds Gaussian-damped phases on top of these same functions.


def rotary_inv_freq(head_dim: int, base: float = ROPE_BASE, device=None) -> torch.Tensor:
    """ω_j = base^(-2j/head_dim), j = 0 .. head_dim/2 - 1."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (base**exponent)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = ROPE_BASE):
    """cos/sin of position·ω for float positions [..., T] -> two tensors [..., T, 1, head_dim/2].

    The singleton dimension broadcasts over heads in apply_rotary_emb ([B, T, H, D] layout).
    """
    inv_freq = rotary_inv_freq(head_dim, base, device=positions.device)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos()[..., None, :], freqs.sin()[..., None, :]


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = the two halves of the head dimension. x: [B, T, H, D]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


Packing = tuple[tuple[int, int], ...]  # (sequences, positions each) per group, in the order they are packed


def packed_positions(packing: Packing, device=None) -> torch.Tensor:
    """The position of every slot of a packed sequence: 0..t-1 for each of the n sequences of each group."""
    return torch.cat([torch.arange(t, device=device).repeat(n) for n, t in packing])


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Causal attention of packed sequences q, k, v [1, M, heads, D] -> [1, M, heads·D], each sequence within
    itself only: one SDPA per group of equal-length sequences (the packing is static: no mask is built)."""
    sizes = [n * t for n, t in packing]
    gqa = q.size(2) != k.size(2)
    out = []
    for (n, t), *qkv in zip(packing, *(z.split(sizes, dim=1) for z in (q, k, v))):
        qs, ks, vs = (z.view(n, t, z.size(2), z.size(3)).transpose(1, 2) for z in qkv)
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)  # [n, H, t, D]
        out.append(y.transpose(1, 2).reshape(1, n * t, -1))
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------


def shifted_views(ctx: torch.Tensor, width: int) -> list[torch.Tensor]:
    """ctx [B, width + T, d]: the width inputs before T positions, then theirs. Views of the inputs j = 1..width
    positions before each of the T."""
    T = ctx.size(1) - width
    return [ctx[:, width - j : width - j + T] for j in range(1, width + 1)]


class InputHistory:
    """The normed GPT inputs by position, kept by a KV cache for GPTConfig.smear: the first new positions'
    shifts need the inputs before them. Truncating a cache needs nothing here: positions < pos stay valid."""

    def __init__(self):
        self.buf: torch.Tensor | None = None  # [B, capacity, d]

    def shifted(self, x: torch.Tensor, pos: int, width: int = 1) -> list[torch.Tensor]:
        """Store x [B, T, d] at positions pos.. and return, for j = 1..width, the inputs j positions earlier
        (zeros before position 0)."""
        B, T, d = x.shape
        end = pos + T
        if self.buf is None or end > self.buf.size(1) or self.buf.size(0) != B:
            grown = x.new_zeros(B, max(end, 2 * (self.buf.size(1) if self.buf is not None else 0)), d)
            if self.buf is not None and pos > 0:
                grown[:, :pos] = self.buf[:, :pos].expand(B, -1, -1)
            self.buf = grown
        self.buf[:, pos:end] = x
        lo = max(0, pos - width)
        pad = x.new_zeros(B, width - (pos - lo), d)
        return shifted_views(torch.cat([pad, self.buf[:, lo:pos], x], dim=1), width)

    def repeat_interleave(self, n: int) -> InputHistory:
        out = InputHistory()
        out.buf = None if self.buf is None else self.buf.repeat_interleave(n, dim=0)
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None, attn_fn=None, packing=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm (bounded logits without a learned scale), then rotate. Norm first so a Gaussian-damped
        # rotary (megacontext.positional: a gist's uncertain position) keeps its damping; for ordinary
        # RoPE a rotation preserves norms, so the order does not matter there.
        q, k = norm(q), norm(k)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if packing is not None:
            return self.c_proj(packed_attention(q, k, v, packing))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if attn_fn is not None:  # an attention function from outside replaces SDPA (MegaAttention's zoom)
            y = attn_fn(q, k, v)
        elif attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # A chunk of Tq new queries after Tk - Tq cached keys: full view of the prefix, causal inside.
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None, attn_fn=None, packing=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, attn_mask, attn_fn, packing)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.smear:  # per-channel share of x[t-1] added to x[t] (0 at init: the vanilla GPT)
            self.smear = nn.Parameter(torch.zeros(config.n_embd))
            if config.smear_width > 1:  # and of x[t-2] .. x[t-width], one row each
                self.smear_back = nn.Parameter(torch.zeros(config.smear_width - 1, config.n_embd))
        # Rotary table for ordinary integer positions, over-allocated so generation can run past
        # sequence_len. Not persistent: it is a pure function of the config.
        self.rotary_len = config.sequence_len * 10
        cos, sin = rotary_cos_sin(torch.arange(self.rotary_len, dtype=torch.float32), config.head_dim)
        self.register_buffer("cos", cos[None], persistent=False)  # [1, L, 1, D/2]
        self.register_buffer("sin", sin[None], persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every tensor's init in one place.

        wte ~ N(0, 1): its output is RMS-normed right away, so the scale only sets the step size.
        lm_head ~ N(0, 0.001): near-uniform predictions at start (loss ≈ ln V).
        attention q/k/v and MLP c_fc ~ U(-a, a) with a = √3/√n_embd (unit-variance outputs).
        both c_proj = 0: every block starts as the identity, the residual stream is the embedding.
        """
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        a = math.sqrt(3.0) / math.sqrt(self.config.n_embd)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -a, a)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.config.smear:
            nn.init.zeros_(self.smear)
            if self.config.smear_width > 1:
                nn.init.zeros_(self.smear_back)
        cos, sin = rotary_cos_sin(
            torch.arange(self.rotary_len, dtype=torch.float32, device=self.wte.weight.device),
            self.config.head_dim,
        )
        self.cos, self.sin = cos[None], sin[None]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6·(non-embedding params) + attention.

        The attention term is 12·layers·heads·head_dim·T for a full causal sequence of length T.
        """
        n_matmul = self.num_params() - self.wte.weight.numel()
        c = self.config
        return 6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def default_rotary(self, T: int, start: int = 0):
        if start + T > self.rotary_len:
            raise ValueError(
                f"sequence of {start + T} positions exceeds the rotary table ({self.rotary_len})"
            )
        return self.cos[:, start : start + T], self.sin[:, start : start + T]

    def smear_in(
        self,
        x: torch.Tensor,
        kv_cache=None,
        shift_len: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token shift: x[t] += smear * x[t-1] + smear_back[j-2] * x[t-j] for j = 2..width (zeros before the
        first position). Features of the last few tokens in every position let one attention layer match on
        "what came before" (an induction head keyed by a multi-token label: "scarlet cabinet is") without
        previous-token heads first. Under a KV cache the inputs before the new chunk come from the cache
        (`shifted_inputs`, kept by InputHistory). `shift_len`: only the first shift_len positions are tokens
        (MegaAttention packs its summary nodes after them); the rest get no shift, since the packed slots
        before a node are no tokens of its past. `positions` [T]: each position's index in its packed
        sequence (no shift into a sequence from the one before)."""
        width = self.config.smear_width
        if kv_cache is None:
            prevs = shifted_views(F.pad(x, (0, 0, width, 0)), width)  # zeros before the first position
            if positions is not None:
                prevs = [p.masked_fill((positions < j)[None, :, None], 0.0) for j, p in enumerate(prevs, 1)]
        else:
            prevs = kv_cache.shifted_inputs(x, width)
        shift = self.smear * prevs[0]
        for j in range(2, width + 1):
            shift = shift + self.smear_back[j - 2] * prevs[j - 1]
        if shift_len is not None:
            shift[:, shift_len:] = 0
        return x + shift

    def forward(
        self,
        idx: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        shift_len: int | None = None,
        attn_fn=None,
        packing: Packing | None = None,
    ):
        """Token ids `idx` [B, T] or input embeddings `embeds` [B, T, d] (exactly one).

        rotary: (cos, sin) [B or 1, T, 1, head_dim/2]; default positions 0..T-1 (continuing from the
        KV cache position when one is given). attn_mask: boolean [B or 1, 1, T, T_keys], True = attend.
        attn_fn: an attention function (q, k, v [B, H, T, D], rotated; k, v from the cache when one is
        given) -> [B, H, T, D] that replaces SDPA in every layer (MegaAttention's zoom drives it).
        packing: x [1, M, d] holds, for each (n, t), n sequences of t positions one after another, each with
        positions 0..t-1 and attending within itself only: one pass over batches of different lengths (the
        MC step runs its working contexts and its raw rows together), the same as one call per batch.
        With targets (ignore index -1) returns the loss, else the soft-capped logits [B, T, V].
        """
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx or embeds")
        x = self.wte(idx) if embeds is None else embeds
        T = x.size(1)
        positions = None
        if packing is not None:
            flat = x.size(0) == 1 and T == sum(n * t for n, t in packing)
            if not flat or any(a is not None for a in (kv_cache, attn_fn, attn_mask, rotary)):
                raise ValueError(
                    f"a packing of {packing} takes one flat sequence of its length, and no cache, attention "
                    "function, mask or rotary of its own (it sets positions and attention itself)"
                )
            pos = packed_positions(packing, x.device)
            rotary, positions = (self.cos[:, pos], self.sin[:, pos]), pos
        if rotary is None:
            start = kv_cache.get_pos() if kv_cache is not None else 0
            rotary = self.default_rotary(T, start)
        cos, sin = rotary
        x = norm(x)
        if self.config.smear:
            x = self.smear_in(x, kv_cache, shift_len, positions)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, attn_mask, attn_fn, packing)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(x).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
