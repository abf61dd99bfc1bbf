"""LensNet: a signed focus score per working-context entry (positive = expand, negative = collapse).

A small transformer over the concatenation [entries; query tokens], where the query is the newest raw text
(the WC's raw tail). Attention is BIDIRECTIONAL over all of it: an old entry must be judged against the
recent text that may need it, which a causal model cannot do (the recent text comes after it). Entries
carry an LOD embedding and Gaussian RoPE at their span (mu, sigma); query tokens carry a type embedding
and ordinary RoPE (sigma = 0). Output: tanh(head(entry state)) in [-1, 1]. It runs once per refocus
(every K new tokens), never per token, so it is kept small.

An entry is whatever the working context hands in with one vector each: a gist (its embedding, its level)
or a raw block (LOD 0; e.g. its LOD1 gist or the mean of its token embeddings, with the span's mu/sigma).

With `lexical=True` each entry also brings the mean of its span's token embeddings (`entry_lex`), added
through a zero-initialised projection. The query tokens are token embeddings too, so the lens can match the
words of the question against the words of an entry directly; a gist is shaped by what the GPT needs to
continue the text, not by what makes the entry easy to find.

With `match=True` the lens also gets `entry_match` [N, Q] (1 where query token q occurs in the entry's span,
megacontext/lens_inputs.py) and adds scale[LOD of n] * sum_q match[n, q] * w(q) to each entry's logit: the weight
w of a query token is read from its final state (the transformer decides which words of the question name what
is sought, a lock's label or a key, and which are filler), the same at every level, while a hit is worth less in
a wide gist that holds many words (scale per LOD, starting at 1). w starts at zero, so the channel starts
silent. (Weighting hits by the query word's inverse frequency over the WC's entries was tried and measured
worse: passkey 4x 70 -> 50 %, docs/training.md.)

With `neighbours=True` it adds the same kind of term for the hits of the entries just before and after it
(max of the two, own weights w_nb and scale, zero-init): a fact is often split across block boundaries, the
key in one block and the name of what it opens in the next, so an entry's own words cannot tell the right key
from a distractor's, while its neighbourhood can (measured: docs/log.md, 2026-11-25, "What the passkey
misses are").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.gistnet import HEADS, Block
from nanochat.gpt import norm, rotary_inv_freq


class LensNet(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_layer: int = 2,
        head: str = "mlp",
        max_level: int = 8,
        lexical: bool = False,
        match: bool = False,
        neighbours: bool = False,
    ):
        super().__init__()
        if neighbours and not match:
            raise ValueError("LensNet neighbours=True needs match=True (it reads the neighbours' matches)")
        if head not in HEADS:
            raise ValueError(f"LensNet head={head!r}; choose one of {', '.join(HEADS)}")
        self.d_model, self.n_head, self.max_level = d_model, n_head, max_level
        self.lod_emb = nn.Embedding(max_level + 1, d_model)  # LOD 0 (raw block) .. max_level
        self.query_type = nn.Parameter(torch.empty(d_model))  # marks the raw query tokens
        self.lex = nn.Linear(d_model, d_model, bias=False) if lexical else None
        self.match = nn.Linear(d_model, 1, bias=False) if match else None  # w(q)
        self.match_scale = nn.Parameter(torch.ones(max_level + 1)) if match else None
        self.match_nb = nn.Linear(d_model, 1, bias=False) if neighbours else None  # w_nb(q)
        self.match_nb_scale = nn.Parameter(torch.ones(max_level + 1)) if neighbours else None
        self.blocks = nn.ModuleList([Block(d_model, n_head) for _ in range(n_layer)])
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False) if head == "mlp" else None
        self.out = nn.Linear(4 * d_model if head == "mlp" else d_model, 1, bias=False)
        freq, sign = self._rope_freq()
        self.register_buffer("rope_freq", freq, persistent=False)  # a pure function of the config
        self.register_buffer("rope_sign", sign, persistent=False)
        self.init_weights()

    def _rope_freq(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-width frequencies [ω, ω] and signs [1, -1] of gistnet.rope_tables, [head_dim] each."""
        inv = rotary_inv_freq(self.d_model // self.n_head, device=device)
        return torch.cat([inv, inv]), torch.cat([torch.ones_like(inv), -torch.ones_like(inv)])

    def _rope(self, mu: torch.Tensor, sigma: torch.Tensor | None):
        """gistnet.rope_tables(*positional.gaussian_rotary(mu, sigma)) [B, T, 1, head_dim] from the cached
        frequencies, the same values op for op; sigma None: points (sigma 0, ordinary RoPE: the damping
        would be exactly 1)."""
        freqs = mu[..., None] * self.rope_freq
        cos, sin = freqs.cos(), freqs.sin() * self.rope_sign
        if sigma is not None:
            damp = torch.exp(-0.5 * (sigma[..., None] * self.rope_freq) ** 2)
            cos, sin = cos * damp, sin * damp
        return cos[..., None, :], sin[..., None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """lod_emb, query_type ~ N(0, 0.1): small next to the unit-RMS normed inputs, but levels and types
        are distinguishable from step 0. Blocks as the GPT (identity at init). fc ~ U(-a, a), a = sqrt(3/d).
        out = 0: every initial score is exactly 0, inside any hysteresis band, so an untrained lens makes
        no edits."""
        nn.init.normal_(self.lod_emb.weight, mean=0.0, std=0.1)
        nn.init.normal_(self.query_type, mean=0.0, std=0.1)
        for block in self.blocks:
            block.init_weights()
        if self.fc is not None:
            a = math.sqrt(3.0 / self.d_model)
            nn.init.uniform_(self.fc.weight, -a, a)
        nn.init.zeros_(self.out.weight)
        if self.lex is not None:  # the lexical channel starts silent: the lens begins as without it
            nn.init.zeros_(self.lex.weight)
        if self.match is not None:  # and so does the match channel
            nn.init.zeros_(self.match.weight)
            nn.init.ones_(self.match_scale)
        if self.match_nb is not None:
            nn.init.zeros_(self.match_nb.weight)
            nn.init.ones_(self.match_nb_scale)
        self.rope_freq, self.rope_sign = self._rope_freq(self.lod_emb.weight.device)

    def forward(
        self,
        entry_embeds: torch.Tensor,
        entry_lod: torch.Tensor,
        entry_mu: torch.Tensor,
        entry_sigma: torch.Tensor | None,
        query_embeds: torch.Tensor,
        query_pos: torch.Tensor,
        entry_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        entry_lex: torch.Tensor | None = None,
        entry_match: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """entries [B, N, d] / [B, N] (lod long, mu and sigma in global token positions; sigma None: every
        entry a point, as in training, which skips the damping), query tokens
        [B, Q, d] at positions [B, Q] (Q >= 1), entry_mask bool [B, N] (True = real entry, False = padding;
        padding may hold anything), entry_lex [B, N, d] (mean token embedding of each entry's span; needed
        exactly when the lens is lexical), entry_match [B, N, Q] (0/1: query token q occurs in entry n's
        span; needed exactly when the lens matches). Returns scores [B, N] in [-1, 1]; padded entries score 0."""
        B, N, d = entry_embeds.shape
        Q = query_embeds.shape[1]
        if Q < 1:
            raise ValueError(
                "LensNet needs at least one query token (the raw tail it judges entries against)"
            )
        if (entry_lex is None) != (self.lex is None):
            raise ValueError("a lexical LensNet needs entry_lex, and only a lexical one takes it")
        if (entry_match is None) != (self.match is None):
            raise ValueError("a matching LensNet needs entry_match, and only a matching one takes it")
        if entry_mask is not None:
            # Sanitise padding so nothing it holds (NaN, out-of-range LOD) can leak through 0 * NaN.
            keep = entry_mask.bool()
            pad, pad3 = ~keep, ~keep[..., None]
            entry_embeds = entry_embeds.masked_fill(pad3, 0.0)
            entry_lod = entry_lod.masked_fill(pad, 0)
            entry_mu = entry_mu.masked_fill(pad, 0.0)
            entry_sigma = None if entry_sigma is None else entry_sigma.masked_fill(pad, 0.0)
            if entry_lex is not None:
                entry_lex = entry_lex.masked_fill(pad3, 0.0)
            if entry_match is not None:
                entry_match = entry_match.masked_fill(pad3, 0.0)
        entries = norm(entry_embeds) + self.lod_emb(entry_lod)
        if entry_lex is not None:
            entries = entries + self.lex(norm(entry_lex))
        queries = norm(query_embeds) + self.query_type
        x = torch.cat([entries, queries], dim=1)
        # RoPE is relative: measure positions from the newest query token (in float64, then fp32), so the
        # phases near the query stay exact even a million tokens into the history.
        pos = torch.cat([entry_mu, query_pos], dim=1).double()
        mu = (pos - pos[:, -1:]).float()
        sigma = None
        if entry_sigma is not None:
            sigma = torch.cat([entry_sigma.float(), torch.zeros(B, Q, device=x.device)], dim=1)
        cos, sin = self._rope(mu, sigma)
        attn_mask = None
        if entry_mask is not None:
            real = torch.cat([keep, torch.ones(B, Q, dtype=torch.bool, device=x.device)], dim=1)
            attn_mask = real[:, None, None, :]  # keys only: padding is never attended to
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        h = norm(x[:, :N])
        if self.fc is not None:
            h = F.relu(self.fc(h)).square()
        logits = self.out(h).squeeze(-1)
        if self.match is not None:
            q_state = norm(x[:, N:])
            m = entry_match.to(logits.dtype)
            w = self.match(q_state).squeeze(-1)  # [B, Q]: what a hit on each query token is worth
            logits = logits + self.match_scale[entry_lod] * (m * w[:, None]).sum(dim=-1)
            if self.match_nb is not None:  # the hits of entries n-1 and n+1 (the max of the two)
                nb = torch.maximum(F.pad(m[:, :-1], (0, 0, 1, 0)), F.pad(m[:, 1:], (0, 0, 0, 1)))
                w_nb = self.match_nb(q_state).squeeze(-1)
                logits = logits + self.match_nb_scale[entry_lod] * (nb * w_nb[:, None]).sum(dim=-1)
        # training ranks on the logits (tanh saturates and would stop the ranking gradient)
        scores = logits if return_logits else torch.tanh(logits)
        return scores if entry_mask is None else scores.masked_fill(pad, 0.0)

    def score(self, wc, query_embeds: torch.Tensor, query_pos: torch.Tensor):
        """Convenience for one working context or a list of them.

        wc: a dict or object with per-entry `embeds` [N, d], `lod` [N], `mu` [N], `sigma` [N] (and `lex`
        [N, d] for a lexical lens, `match` [N, Q] for a matching one); query_embeds [Q, d] and query_pos [Q].
        A list of such WCs is padded into one batch (query_embeds [B, Q, d], query_pos [B, Q]) and gives a list
        of score tensors [N_i].
        """
        wcs = wc if isinstance(wc, (list, tuple)) else [wc]
        fields = [_entry_fields(w, self.lex is not None, self.match is not None) for w in wcs]
        n_max = max(f[0].shape[0] for f in fields)
        device = fields[0][0].device
        lengths = torch.tensor([f[0].shape[0] for f in fields], device=device)
        mask = torch.arange(n_max, device=device)[None, :] < lengths[:, None]
        padded = [torch.stack([_pad_to(f[i], n_max) for f in fields]) for i in range(len(fields[0]))]
        if not isinstance(wc, (list, tuple)):
            query_embeds, query_pos = query_embeds[None], query_pos[None]
        extra = iter(padded[4:])
        lex = next(extra) if self.lex is not None else None
        match = next(extra) if self.match is not None else None
        scores = self(*padded[:4], query_embeds, query_pos, entry_mask=mask, entry_lex=lex, entry_match=match)
        if not isinstance(wc, (list, tuple)):
            return scores[0]
        return [scores[b, : f[0].shape[0]] for b, f in enumerate(fields)]


def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the first (entry) dimension to n."""
    return torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])


def _entry_fields(wc, lexical: bool, match: bool) -> tuple[torch.Tensor, ...]:
    get = wc.__getitem__ if isinstance(wc, dict) else lambda name: getattr(wc, name)
    try:
        out = (get("embeds"), get("lod").long(), get("mu").float(), get("sigma").float())
        return out + ((get("lex"),) if lexical else ()) + ((get("match").float(),) if match else ())
    except (KeyError, AttributeError) as e:
        raise TypeError(
            "LensNet.score needs per-entry embeds, lod, mu and sigma (and lex if lexical, match if matching); "
            f"missing {e}"
        ) from None
