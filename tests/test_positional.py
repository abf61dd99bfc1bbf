"""Gaussian RoPE: sigma = 0 is the GPT's RoPE bit for bit; sigma > 0 is the expectation over positions."""

import math

import pytest
import torch

from megacontext.positional import RotaryCache, gaussian_rotary, span_mu_sigma
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, rotary_cos_sin, rotary_inv_freq

HEAD_DIM = 32


def test_sigma_zero_is_the_gpts_rope_bit_for_bit():
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    T = model.cos.shape[1]
    positions = torch.arange(T, dtype=torch.float32)[None]
    cos, sin = gaussian_rotary(positions, torch.zeros(1, T), model.config.head_dim)
    assert torch.equal(cos, model.cos) and torch.equal(sin, model.sin)
    model.init_weights()  # the buffers are rebuilt there: still equal
    assert torch.equal(cos, model.cos) and torch.equal(sin, model.sin)
    # A float sigma, a scalar tensor sigma and non-integer centres: still exactly rotary_cos_sin.
    mu = torch.tensor([[0.0, 15.5, 1024.0, 40000.5]])
    ref = rotary_cos_sin(mu, HEAD_DIM)
    for sigma in (0.0, torch.tensor(0.0), torch.zeros(1, 4)):
        got = gaussian_rotary(mu, sigma, HEAD_DIM)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_sigma_zero_gpt_forward_is_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    for block in model.blocks:  # non-zero projections so attention (and so RoPE) matters
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    idx = torch.randint(0, 50, (2, 16))
    rotary = gaussian_rotary(torch.arange(16.0)[None], torch.zeros(1, 16), model.config.head_dim)
    assert torch.equal(model(idx), model(idx, rotary=rotary))


def test_damping_is_the_closed_form_and_monotone():
    w = rotary_inv_freq(HEAD_DIM)
    sigmas = torch.linspace(0, 50, 201)
    cos, _ = gaussian_rotary(torch.zeros(201), sigmas, HEAD_DIM)  # mu = 0: cos is the damping itself
    factor = cos[:, 0, :]  # [sigma, freq]
    expected = torch.exp(-0.5 * (sigmas[:, None] * w) ** 2)
    torch.testing.assert_close(factor, expected)
    assert (factor.diff(dim=0) <= 0).all()  # non-increasing in sigma at every frequency
    assert (factor.diff(dim=1) >= 0).all()  # and lower frequencies are damped less
    # An LOD1 gist (32 tokens): the fastest frequency (w = 1) is gone, the slowest is nearly intact.
    _, sigma = span_mu_sigma(0, 32)
    f = torch.exp(-0.5 * (sigma * w) ** 2)
    assert f[0] < 1e-15 and f[-1] > 0.999


def test_gaussian_rotary_is_the_expected_rotation_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu, sigma = torch.tensor([100.5, 3000.0]), torch.tensor([0.7, 9.2])
    n = 200_000
    p = mu[:, None].double() + sigma[:, None].double() * torch.randn(2, n, generator=gen, dtype=torch.float64)
    phase = p[..., None] * rotary_inv_freq(HEAD_DIM).double()  # [2, n, D/2]
    cos, sin = gaussian_rotary(mu, sigma, HEAD_DIM)
    tol = 5 / math.sqrt(n)  # 5 standard errors of a mean of values in [-1, 1]
    torch.testing.assert_close(cos[:, 0].double(), phase.cos().mean(1), atol=tol, rtol=0)
    torch.testing.assert_close(sin[:, 0].double(), phase.sin().mean(1), atol=tol, rtol=0)


def _score(q, k, q_pos, k_mu, k_sigma):
    """Attention logit (unscaled dot product) of a raw query at q_pos and a gist key at (k_mu, k_sigma)."""
    cq, sq = gaussian_rotary(torch.tensor([q_pos]), 0.0, HEAD_DIM)
    ck, sk = gaussian_rotary(torch.tensor([k_mu]), torch.tensor([k_sigma]), HEAD_DIM)
    qr = apply_rotary_emb(q.view(1, 1, 1, -1), cq[None], sq[None])
    kr = apply_rotary_emb(k.view(1, 1, 1, -1), ck[None], sk[None])
    return (qr * kr).sum().item()


def test_score_is_the_expectation_over_the_key_position():
    """<R(w p_q) q, E[R(w p_k)] k> == E[<R(w p_q) q, R(w p_k) k>] with p_k ~ N(mu, sigma^2)."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(HEAD_DIM, generator=gen), torch.randn(HEAD_DIM, generator=gen)
    q_pos, k_mu, k_sigma = 5000.0, 4000.0, 3.0
    n = 100_000
    ks = k_mu + k_sigma * torch.randn(n, generator=gen, dtype=torch.float64)
    cq, sq = rotary_cos_sin(torch.tensor([q_pos], dtype=torch.float64), HEAD_DIM)
    ck, sk = rotary_cos_sin(ks, HEAD_DIM)
    qr = apply_rotary_emb(q.double().view(1, 1, 1, -1), cq[None].double(), sq[None].double())
    kr = apply_rotary_emb(
        k.double().view(1, 1, 1, -1).expand(1, n, 1, -1), ck[None].double(), sk[None].double()
    )
    mc = (qr * kr).sum(-1).mean().item()
    bound = 5 * q.norm().item() * k.norm().item() / math.sqrt(n)
    assert abs(_score(q, k, q_pos, k_mu, k_sigma) - mc) < bound


def test_score_moves_continuously_and_high_frequencies_vanish():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(HEAD_DIM, generator=gen), torch.randn(HEAD_DIM, generator=gen)
    q_pos, k_mu = 10_000.0, 9_000.0  # a far gist
    w = rotary_inv_freq(HEAD_DIM)
    half = HEAD_DIM // 2
    pair_mag = (q[:half] ** 2 + q[half:] ** 2).sqrt() * (k[:half] ** 2 + k[half:] ** 2).sqrt()
    # d/dsigma exp(-w^2 sigma^2 / 2) is at most w / sqrt(e), so the score is Lipschitz with this constant.
    lipschitz = (pair_mag * w).sum().item() / math.sqrt(math.e)
    h = 1e-2
    sigmas = torch.arange(0, 40, h)
    scores = torch.tensor([_score(q, k, q_pos, k_mu, s.item()) for s in sigmas[::50]])
    steps = torch.tensor(
        [abs(_score(q, k, q_pos, k_mu, s + h) - _score(q, k, q_pos, k_mu, s)) for s in (0.0, 0.5, 2.0, 9.0)]
    )
    assert (steps <= lipschitz * h * 1.01 + 1e-5).all()
    assert scores.std() > 0.1  # it really moves as sigma grows
    # For a wide (LOD2) gist the fast frequencies (w >= 0.1) contribute nothing any more.
    fast = torch.cat([w >= 0.1, w >= 0.1])  # pair j is (x[j], x[j + half])
    slow_only = q.masked_fill(fast, 0.0)
    fast_part = lambda s: _score(q, k, q_pos, k_mu, s) - _score(slow_only, k, q_pos, k_mu, s)
    assert abs(fast_part(0.0)) > 0.1  # at sigma = 0 they matter
    _, sigma_lod2 = span_mu_sigma(0, 32 * 32)
    assert abs(fast_part(sigma_lod2)) < 1e-6


def test_aligned_score_decays_monotonically():
    """For aligned q = k at the same centre every pair contributes |a_j|^2 exp(-w_j^2 sigma^2 / 2) >= 0."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(HEAD_DIM, generator=gen)
    scores = torch.tensor([_score(a, a, 500.0, 500.0, s) for s in torch.linspace(0, 1000, 101).tolist()])
    assert (scores.diff() <= 1e-5).all()
    assert scores[0] == pytest.approx((a * a).sum().item(), rel=1e-5)
    assert scores[-1] < 0.5 * scores[0]


def test_span_mu_sigma():
    assert span_mu_sigma(0, 32) == (16.0, 32 / math.sqrt(12))
    mu, sigma = span_mu_sigma(torch.tensor([0.0, 1024.0]), torch.tensor([1024.0, 1056.0]))
    torch.testing.assert_close(mu, torch.tensor([512.0, 1040.0]))
    torch.testing.assert_close(sigma, torch.tensor([1024.0, 32.0]) / math.sqrt(12))
    # The variance of a uniform span of length L is L^2 / 12.
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 32
    assert u.std().item() == pytest.approx(32 / math.sqrt(12), rel=0.01)


def test_rotary_cache_rebuilds_on_version_bump_only():
    cache = RotaryCache(HEAD_DIM)
    mu, sigma = torch.tensor([16.0, 40.0]), torch.tensor([9.2, 0.0])
    first = cache.get(mu, sigma, version=0)
    assert cache.get(mu, sigma, version=0) is first
    mu2 = torch.tensor([16.0, 41.0])
    second = cache.get(mu2, sigma, version=1)
    assert second is not first and torch.equal(second[0], gaussian_rotary(mu2, sigma, HEAD_DIM)[0])
    with pytest.raises(ValueError, match="bump the version"):
        cache.get(torch.zeros(3), torch.zeros(3), version=1)
