"""The zoom (megacontext/zoom.py): a raw query selects only chunks wholly before its window, by a bound no key of
the chunk exceeds; the chunk reads' weights and the key projections get gradient from the loss, the three
executions (the dense reference, block-sparse, flex_attention) agree with gradients, top-k 0 is the pyramid, a
chunk is read in its own frame, with no distance, and in the model the zoom is causal and reads raw tokens beyond
the window that the pyramid alone cannot see."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import megacontext.zoom as zoom
from megacontext.attention_modes import AttentionConfig, AttentionModel
from megacontext.mega_attention import build_mega_layout, mega_mask, mega_rotary
from megacontext.positional import gaussian_rotary
from megacontext.zoom import (
    ZoomAttention,
    beyond_reach,
    bound_scores,
    candidates,
    chunk_frame,
    read_chunks,
    select_chunks,
    training_reach,
    zoom_dense,
)
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, rotary_cos_sin

CASES = [  # N, K, W, levels, top-k
    (64, 4, 8, None, 2),
    (150, 3, 10, None, 3),
    (97, 2, 5, 4, 1),
    (200, 5, 0, 1, 8),
    (130, 4, 12, None, 100),  # more than any query's candidates: every chunk before the window
    (40, 4, 30, None, 2),  # few candidates: most queries select nothing
]


def qkv(T, B=2, H=2, H_kv=2, D=8, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


@pytest.mark.parametrize("N,K,W,levels,topk", CASES)
def test_a_query_selects_only_chunks_wholly_before_its_window(N, K, W, levels, topk):
    lay = build_mega_layout(N, K, W, levels)
    q, k, _ = qkv(lay.T, requires_grad=False)
    n1 = N // K
    anchors = torch.arange(N)
    bounds, index = select_chunks(q[:, :, :N], anchors, k[:, :, :N], K, W, topk)
    valid = torch.isfinite(bounds)
    b1 = (anchors - W).clamp(min=0) // K * K  # the raw window's first position
    assert bool(((index + 1) * K <= b1[:, None])[valid].all())  # ends at or before b1 <= i - W
    n_cand = candidates(anchors, K, W)
    assert torch.equal(valid.sum(-1), n_cand.clamp(max=min(topk, n1)).expand_as(valid[..., 0]))
    # the selected are the candidates with the highest bounds, per query and head
    scores = bound_scores(q[:, :, :N], k[:, :, :N], K)
    for i in random.Random(N).sample(range(N), min(N, 10)):
        c = int(n_cand[i])
        best = scores[:, :, i, :c].topk(min(topk, c), dim=-1).values if c else scores[:, :, i, :0]
        torch.testing.assert_close(bounds[:, :, i][valid[:, :, i]].view_as(best), best)


def test_the_bound_is_at_least_every_logit_in_its_chunk_and_reached_by_a_lone_matching_key():
    """Σ_d max(q_d·kmin_d, q_d·kmax_d) bounds q·k for every key of the chunk (grouped-query heads too), and a
    chunk whose one key is the query itself outranks chunks of unrelated keys: one matching token decides."""
    q, _, _ = qkv(40, H=4, requires_grad=False)
    _, k, _ = qkv(42, H_kv=2, seed=1, requires_grad=False)  # 10 complete chunks of 4, two keys left over
    bounds = bound_scores(q, k, 4)  # [2, 4, 40, 10]
    logits = (q @ k.repeat_interleave(2, dim=1)[:, :, :40].transpose(-1, -2) / 8**0.5).view(2, 4, 40, 10, 4)
    assert bounds.shape == (2, 4, 40, 10) and bool((bounds >= logits.amax(-1) - 1e-6).all())
    k = 0.1 * k
    k[:, :, 4 * 7 + 2] = (
        3 * q[:, ::2, 39]
    )  # chunk 7 holds one key pointing where query 39 of each head pair does
    assert bool((bound_scores(q, k, 4)[:, ::2, 39].argmax(-1) == 7).all())


@pytest.mark.parametrize("N,K,W,levels,topk", CASES)
def test_block_sparse_path_equals_dense_reference_with_gradients(N, K, W, levels, topk):
    lay = build_mega_layout(N, K, W, levels)
    q, k, v = qkv(lay.T, H=4, H_kv=2)  # grouped-query attention too
    ref = zoom_dense(q, k, v, lay, topk)
    out = ZoomAttention(lay, topk, "cpu", "blocksparse")(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,K,W,levels,topk", CASES[:3])
def test_flex_path_equals_dense_reference(N, K, W, levels, topk):
    """On CPU torch runs flex_attention eagerly and forward only; the gradients are checked where CUDA exists."""
    lay = build_mega_layout(N, K, W, levels)
    q, k, v = qkv(lay.T, requires_grad=False)
    out = ZoomAttention(lay, topk, "cpu", "flex")(q, k, v)
    torch.testing.assert_close(out, zoom_dense(q, k, v, lay, topk), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward runs on CUDA only")
def test_flex_path_gradients_equal_dense_reference_on_cuda():
    lay = build_mega_layout(300, 4, 16)
    q, k, v = [x.cuda().detach().requires_grad_() for x in qkv(lay.T, D=16)]  # flex needs head dim >= 16
    out = ZoomAttention(lay, 3, "cuda")(q, k, v)
    ref = zoom_dense(q, k, v, lay, 3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [..., n, D] rotated as the GPT rotates at positions pos [n]."""
    cos, sin = rotary_cos_sin(pos.float(), x.size(-1))
    return apply_rotary_emb(x, cos[:, 0], sin[:, 0])


def test_top_k_zero_is_the_pyramid_and_the_zoom_adds_its_chunks_to_the_softmax_in_the_chunk_frame():
    lay = build_mega_layout(64, 4, 8)
    # unrotated vectors; the raw positions get RoPE at 0..63 as in the GPT
    qu, ku, v = qkv(lay.T, requires_grad=False)
    pos = torch.cat([torch.arange(64), torch.zeros(lay.T - 64)])
    q, k = rope(qu, pos), rope(ku, pos)
    pyramid = F.scaled_dot_product_attention(q, k, v, attn_mask=mega_mask(lay))
    torch.testing.assert_close(zoom_dense(q, k, v, lay, 0), pyramid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ZoomAttention(lay, 0, "cpu", "blocksparse")(q, k, v), pyramid)
    # the formula by hand for one query: one softmax over the pyramid's keys at their logits and the raw keys of
    # its two best chunks at the logits of the query W + K = 12 after the chunk's start, each key at its offset
    out = zoom_dense(q, k, v, lay, 2)
    i, b, h = 50, 1, 0
    logits = (q[b, h, i] @ k[b, h].T * 8**-0.5).masked_fill(~mega_mask(lay)[i], float("-inf"))
    q_read = rope(qu[b, h, i : i + 1], torch.tensor([12]))[0]
    k_read = rope(ku[b, h, :64], torch.arange(64) % 4)
    reads = k_read @ q_read * 8**-0.5
    chunks = k_read.view(16, 4, 8)
    bound = (q_read.clamp(min=0) * chunks.amax(1) + q_read.clamp(max=0) * chunks.amin(1)).sum(-1) * 8**-0.5
    chosen = bound[: (i - 8) // 4].topk(2).indices  # candidates: chunks ending at or before b1 = 40
    for c in chosen.tolist():
        assert not bool(mega_mask(lay)[i, 4 * c : 4 * c + 4].any())  # no pyramid key is read twice
        logits[4 * c : 4 * c + 4] = reads[4 * c : 4 * c + 4]
    torch.testing.assert_close(out[b, h, i], torch.softmax(logits, 0) @ v[b, h], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, :64], pyramid[:, :, :64])
    torch.testing.assert_close(out[:, :, 64:], pyramid[:, :, 64:])  # node rows: the pyramid alone


def test_a_chunk_read_carries_no_distance():
    """The same query and chunk, the chunk just beyond the window or 4000 tokens back: the same vectors in the
    chunk frame, so the same bound and the same read (a trained zoom reads as far back as a history reaches)."""
    qu, ku, _ = qkv(4, requires_grad=False)  # row 0 the query, rows 0..3 the chunk's keys
    frames = []
    for start, anchor in ((16, 40), (4000, 9000)):
        keys = torch.zeros(2, 2, start + 4, 8)
        keys[:, :, start:] = rope(ku, torch.arange(start, start + 4))
        at = torch.tensor([anchor])
        q_read, k_read = chunk_frame(rope(qu[:, :, :1], at), keys, at, 4, 8)
        frames.append((q_read, k_read[:, :, start:]))
    for near, far in zip(*frames):
        torch.testing.assert_close(near, far, rtol=0, atol=2e-3)  # float32 phases at position 9000


@pytest.mark.parametrize("N,K,W,levels,topk", CASES[:4])
def test_the_three_paths_agree_beyond_the_reach(N, K, W, levels, topk):
    """A reach short enough that many pyramid pairs lie beyond it: block-sparse (with gradients) and flex
    (forward, CPU) equal the dense reference, which differs from the same zoom without the reach."""
    lay = build_mega_layout(N, K, W, levels)
    reach = 2.5 * W + K
    assert beyond_reach(lay, reach)
    q, k, v = qkv(lay.T, H=4, H_kv=2)
    ref = zoom_dense(q, k, v, lay, topk, reach=reach)
    assert not torch.allclose(ref, zoom_dense(q, k, v, lay, topk), atol=1e-3)
    out = ZoomAttention(lay, topk, "cpu", "blocksparse", reach=reach)(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    q, k, v = (x.detach() for x in (q, k, v))
    flex = ZoomAttention(lay, topk, "cpu", "flex", reach=reach)(q, k, v)
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_a_pyramid_pair_beyond_the_reach_reads_at_the_reach():
    """By hand, the pyramid alone (top-k 0) with RoPE'd q/k (nodes Gaussian at their spans): a key whose centre
    lies within the reach of the query at its real distance, one farther at the logit of the query at position
    `reach` and the key at 0 (same damping); a reach beyond every pair changes nothing."""
    lay = build_mega_layout(120, 4, 8, 1)  # one node level, as the recipe trains at its length
    qu, ku, v = qkv(lay.T, requires_grad=False)
    cos, sin = mega_rotary(lay, 8)
    q, k = apply_rotary_emb(qu, cos[:, :, 0], sin[:, :, 0]), apply_rotary_emb(ku, cos[:, :, 0], sin[:, :, 0])
    mu, sigma = lay.mu_sigma()
    reach = 30.0
    out = zoom_dense(q, k, v, lay, 0, reach=reach)
    i, b, h = 110, 0, 1
    logits = q[b, h, i] @ k[b, h].T * 8**-0.5
    c0, s0 = gaussian_rotary(torch.zeros(lay.T), sigma, 8)  # each key at 0 with its own damping
    k0 = apply_rotary_emb(ku[b, h][None, :, None], c0[None], s0[None])[0, :, 0]
    q_at = rope(qu[b, h, i : i + 1], torch.tensor([reach]))[0]
    far = mu[i] - mu > reach
    assert 5 < int((far & mega_mask(lay)[i]).sum())  # nodes beyond the reach are visible to query i
    logits = torch.where(far, k0 @ q_at * 8**-0.5, logits).masked_fill(~mega_mask(lay)[i], float("-inf"))
    torch.testing.assert_close(out[b, h, i], torch.softmax(logits, 0) @ v[b, h], rtol=1e-5, atol=1e-6)
    assert not beyond_reach(lay, 119 - 2) and beyond_reach(lay, 119 - 2.5)
    torch.testing.assert_close(
        zoom_dense(q, k, v, lay, 2, reach=117.0), zoom_dense(q, k, v, lay, 2), rtol=0, atol=0
    )


def test_the_reach_never_binds_at_the_training_length():
    """The model's reach is the farthest pair its training rows held: at the training length every pair reads
    at its real distance (training is what it was); beyond it the far nodes read at the reach."""
    for seq_len, K, W in ((256, 16, 32), (2048, 32, 256), (64, 4, 8)):
        reach = training_reach(seq_len, K)
        assert not beyond_reach(build_mega_layout(seq_len, K, W), reach)
        assert beyond_reach(build_mega_layout(seq_len + K, K, W), reach)
    _, model = tiny(zoom_k=2, N=48)
    x = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        near = model(x[:, :48])
        far = model(x)
    torch.testing.assert_close(far[:, :48], near, rtol=1e-5, atol=1e-5)  # causal, reach or not
    lay = model.layout(160)
    assert beyond_reach(lay, training_reach(48, 4)) and model.zoom(lay, "cpu").reach == training_reach(48, 4)


def test_read_chunks_in_slices_equals_plain_autograd_with_gradients(monkeypatch):
    """read_chunks regathers in its backward instead of saving the copies, in slices of READ_ROWS queries: its
    outputs (the reads and their log-sum-exps) and gradients equal plain autograd over one gather (grouped-query
    heads too)."""
    q, _, _ = qkv(40, H=4)
    _, k, v = qkv(42, H_kv=2, seed=1)  # 42 raw positions: 10 complete chunks of 4, two left over
    index = torch.randint(0, 10, (2, 4, 40, 3), generator=torch.Generator().manual_seed(1))
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    pos = index[..., None] * 4 + torch.arange(4)  # [B, H, R, k, K] raw positions read
    take = lambda x: torch.stack([x[b, h][pos[b, h]] for b in range(2) for h in range(4)]).view(*pos.shape, 8)
    s = torch.einsum("bhrd,bhrcjd->bhrcj", q, take(kr)) / 8**0.5
    ref, ref_lse = torch.einsum("bhrcj,bhrcjd->bhrcd", s.softmax(-1), take(vr)), s.logsumexp(-1)
    g = torch.Generator().manual_seed(2)
    grad, grad_lse = torch.randn(ref.shape, generator=g), torch.randn(ref_lse.shape, generator=g)
    g_ref = torch.autograd.grad((ref, ref_lse), (q, k, v), (grad, grad_lse))
    monkeypatch.setattr(zoom, "READ_ROWS", 7)
    out, lse = read_chunks(q, k, v, index, 4)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    for a, b in zip(torch.autograd.grad((out, lse), (q, k, v), (grad, grad_lse)), g_ref):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- in the model


def tiny(zoom_k: int, N: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(sequence_len=N, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():  # the init zeroes output projections: make every layer matter
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.3)
    cfg = AttentionConfig(mode="mega", window=8, block_size=4, levels=2, zoom_k=zoom_k)
    return gpt, AttentionModel(gpt, cfg)


def test_chunk_weights_and_the_key_projections_get_gradient_from_the_loss(monkeypatch):
    """Each read chunk enters the softmax at its log-sum-exp: those weights receive gradient from the LM loss in
    every layer, and the GPT's query/key projections learn through them (their gradients change when the weights
    are detached). Run on the block-sparse path, whose gradients equal the dense reference's (tested above)."""
    gpt, model = tiny(zoom_k=2)
    monkeypatch.setattr(zoom, "DENSE_MAX_LEN", 0)
    x = torch.randint(0, 97, (2, 65), generator=torch.Generator().manual_seed(3))
    seen = []
    real = zoom.read_chunks

    def recording(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        lse.retain_grad()
        seen.append(lse)
        return out, lse

    monkeypatch.setattr(zoom, "read_chunks", recording)
    model(x[:, :-1], x[:, 1:]).backward()
    assert len(seen) == gpt.config.n_layer  # every layer zooms
    for lse in seen:
        assert float(lse.grad.abs().sum()) > 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "c_q" in n or "c_k" in n}
    model.zero_grad(set_to_none=True)

    def detached(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out, lse.detach()

    monkeypatch.setattr(zoom, "read_chunks", detached)
    model(x[:, :-1], x[:, 1:]).backward()
    changed = {n for n, g in grads.items() if not torch.allclose(model.get_parameter(n).grad, g)}
    assert {n for n in grads if n.startswith("gpt.")} <= changed  # every GPT layer, queries and keys


def test_zoom_in_the_model_is_causal():
    _, model = tiny(zoom_k=3)
    x = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
        for j in (3, 20, 41, 63):
            y = x.clone()
            y[0, j] = (y[0, j] + 1) % 97
            out = model(y)
            torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, j:], ref[:, j:])


def test_the_zoom_reads_raw_tokens_the_pyramid_cannot_see():
    """With GistNet's nodes held constant, token 1 reaches positions >= 40 only when a query zooms into its chunk:
    W = 8 over two layers reaches 16 back, and through the nodes the token reaches only the rows of the nodes that
    see it raw (wLOD1 node 0, whose output no query >= 40 reads: it sees wLOD2 node 0 made from constant inputs).
    With top-k 0 it moves nothing there, with the zoom it does."""
    moved = {}
    for k in (0, 3):
        _, model = tiny(zoom_k=k)
        model.gistnet.forward = lambda blocks, level: torch.zeros_like(blocks[:, 0])
        x = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(5))
        y = x.clone()
        y[0, 1] = (y[0, 1] + 1) % 97
        with torch.no_grad():
            moved[k] = float((model(y)[0, 40:] - model(x)[0, 40:]).abs().amax())
    assert moved[0] == 0 and moved[3] > 1e-3, moved


def test_long_sequences_take_the_block_sparse_path_and_agree(monkeypatch):
    _, model = tiny(zoom_k=2, N=160)
    x = torch.randint(0, 97, (2, 160), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(x)
        monkeypatch.setattr(zoom, "DENSE_MAX_LEN", 100)
        assert ZoomAttention(build_mega_layout(160, 4, 8, 2), 2, "cpu").path == "blocksparse"
        torch.testing.assert_close(model(x), dense, rtol=1e-4, atol=1e-4)


def test_mega_runs_past_the_rotary_table():
    """Gaussian RoPE is computed per position, so a mega model (and chat or mc_eval's full view through it) runs
    beyond the GPT's rotary table, where the plain GPT refuses."""
    gpt, attn = tiny(zoom_k=2, N=16)
    N = gpt.rotary_len + 40
    assert attn.rotary_len > N
    x = torch.randint(0, 97, (1, N))
    with torch.no_grad():
        logits = attn(x)
        assert logits.shape == (1, N, 97) and torch.isfinite(logits).all()
        with pytest.raises(ValueError, match="rotary table"):
            gpt(x)
