"""Gaussian RoPE: rotary phases for an entry whose position is a distribution, not a point.

A gist stands for a span of tokens, so its position is uncertain: model it as p ~ N(mu, sigma^2). Rotary
position embedding rotates each (x1, x2) pair of a head by the 2x2 rotation R(w p) at frequency w. Its
expectation under the Gaussian is

    E[cos(w p)] = cos(w mu) exp(-w^2 sigma^2 / 2),   E[sin(w p)] = sin(w mu) exp(-w^2 sigma^2 / 2)

i.e. E[R(w p)] = exp(-w^2 sigma^2 / 2) R(w mu): a rotation shrunk towards zero, not a unit rotation. That
shrunk matrix is the right thing to apply to q and k: for a query at p_q and a key at p_k with independent
positions, E[<R(w p_q) q, R(w p_k) k>] = <E[R(w p_q)] q, E[R(w p_k)] k> (independence lets the expectation
factor), which is the ordinary rotary score at the centres times exp(-w^2 (sigma_q^2 + sigma_k^2) / 2). So
the attention logit is its expectation over where the gist's tokens really are: high frequencies
(w sigma >> 1) average out and a coarse gist keeps only coarse position; sigma = 0 is ordinary RoPE exactly.

Footgun: RMS-normalising q or k *after* the damped rotation rescales the vector and partly undoes the
damping. A rotation preserves norms, so for sigma = 0 normalising before or after rotating is the same
maths; MegaContext's own nets (GistNet, LensNet) normalise first so the damping survives.
"""

from __future__ import annotations

import math

import torch

from nanochat.gpt import ROPE_BASE, apply_rotary_emb, rotary_cos_sin, rotary_inv_freq


def gaussian_rotary(mu: torch.Tensor, sigma: torch.Tensor | float, head_dim: int, base: float = ROPE_BASE):
    """(cos, sin) for positions p ~ N(mu, sigma^2); mu [..., T] -> two tensors [..., T, 1, head_dim/2].

    Built on nanochat.gpt.rotary_cos_sin and only multiplied by exp(-w^2 sigma^2 / 2), which is exactly 1.0
    for sigma = 0, so raw tokens get the GPT's RoPE bit for bit. sigma broadcasts against mu.
    Positions are float32 (as in the GPT): integers are exact up to 2^24, half-integer gist centres up to
    2^23; RoPE is relative, so callers with longer histories shift positions towards 0 first.
    """
    cos, sin = rotary_cos_sin(mu, head_dim, base)
    inv_freq = rotary_inv_freq(head_dim, base, device=cos.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=cos.device)
    damp = torch.exp(-0.5 * (sigma[..., None] * inv_freq) ** 2)[..., None, :]  # [..., T, 1, D/2]
    return cos * damp, sin * damp


def span_mu_sigma(start, end):
    """Centre and width of a gist covering tokens [start, end): a uniform span of length L has sigma L/sqrt(12).

    For gists only: a raw token keeps its own integer position with sigma 0 (ordinary RoPE).
    Works on ints/floats or tensors (elementwise).
    """
    length = end - start
    return start + length / 2, length / math.sqrt(12.0)


class RotaryCache:
    """The (cos, sin) of one working context, rebuilt only when its version changes.

    The working context bumps its version on every edit, so an unchanged WC reuses its phases across the
    decode steps between refocuses. One cache per working context: the version is the whole key.
    """

    def __init__(self, head_dim: int, base: float = ROPE_BASE):
        self.head_dim, self.base = head_dim, base
        self.version: int | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, mu: torch.Tensor, sigma: torch.Tensor, version: int):
        if self.value is None or version != self.version:
            self.value = gaussian_rotary(mu, sigma, self.head_dim, self.base)
            self.version = version
        elif self.value[0].shape[:-2] != mu.shape:
            # Same version but different positions: the caller forgot to bump the version after an edit.
            raise ValueError(
                f"RotaryCache: version {version} unchanged but positions changed shape "
                f"{tuple(self.value[0].shape[:-2])} -> {tuple(mu.shape)}; bump the version on every edit"
            )
        return self.value


def rotate(x: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D], already rotated (and damped), rotated on by `by` [n] positions: rotations add up, and a
    pure rotation keeps a gist's damping."""
    cos, sin = rotary_cos_sin(by.to(device=x.device, dtype=torch.float32), x.size(-1))
    return apply_rotary_emb(x, cos[:, 0], sin[:, 0])


def at_reach(
    q: torch.Tensor, k: torch.Tensor, mu_q: torch.Tensor, mu_k: torch.Tensor, reach: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, R, D] rotated at centres mu_q [R] turned to position `reach`, k [B, H, C, D] rotated at mu_k [C]
    turned to 0: q'·k' is the logit of the pair as if its centres lay `reach` apart (ReRoPE's clamp, Su 2023),
    what the zoom's pyramid reads a pair at that lies farther apart than training ever showed."""
    return rotate(q, reach - mu_q), rotate(k, -mu_k)


def reach_logits(
    s: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mu_q: torch.Tensor, mu_k: torch.Tensor, reach: float
) -> torch.Tensor:
    """Logits s [B, H, R, C] of q [B, H, R, D] against k [B, H, C, D] with every pair whose centres lie more than
    `reach` apart replaced by its logit at the reach (`at_reach`)."""
    qf, kf = at_reach(q, k, mu_q, mu_k, reach)
    far = mu_q[:, None] - mu_k[None, :] > reach
    return torch.where(far, qf @ kf.transpose(-1, -2) / math.sqrt(q.size(-1)), s)
