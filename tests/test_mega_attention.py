"""MegaAttention: exact pyramidal coverage, strict causality, node rows, the three executions agree, and the model path (nodes from GistNet through an unmodified GPT)."""

import json
import random
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F

from megacontext.gistnet import GistNet
from megacontext.mega_attention import (
    blocksparse_mega_attention,
    build_mega_layout,
    build_nodes,
    cost_bound,
    coverage,
    flex_mega_attention,
    mega_block_mask,
    mega_forward,
    mega_mask,
    plan_blocksparse,
    sliding_window_layout,
)
from nanochat.gpt import GPT, GPTConfig


def random_cases(n: int, seed: int = 0, max_n: int = 150):
    rng = random.Random(seed)
    cases = [(64, 4, 8, None), (1, 2, 0, None), (100, 32, 80, None), (37, 3, 0, 3), (50, 2, 0, None)]
    while len(cases) < n:
        cases.append(
            (rng.randint(1, max_n), rng.randint(2, 5), rng.randint(0, 40), rng.choice([None, None, 1, 2]))
        )
    return cases


def span_matrix(lay) -> torch.Tensor:
    """[T, N] 0/1: packed element p contains raw position t."""
    spans = torch.zeros(lay.T, lay.N, dtype=torch.int64)
    for p in range(lay.T):
        _, s, e = lay.span(p)
        spans[p, s:e] = 1
    return spans


def reference_tiling(N, K, W, L, i) -> set[tuple[int, int]]:
    """The spec walked backwards from i: raw back to the K boundary at or below i - W, then each level's
    nodes back to the next level's boundary, the top level down to 0. (level, index) pairs."""
    a = max(i - W, 0)
    start = a - a % K if L > 0 else 0
    out = {(0, t) for t in range(start, i + 1)}
    for lv in range(1, L + 1):
        stop = 0 if lv == L else start - start % K ** (lv + 1)
        while start > stop:
            start -= K**lv
            out.add((lv, start // K**lv))
    return out


@pytest.mark.parametrize("N,K,W,levels", random_cases(40))
def test_pyramid_covers_every_past_position_exactly_once(N, K, W, levels):
    lay = build_mega_layout(N, K, W, levels)
    mask = mega_mask(lay)
    counts = mask[: lay.N].long() @ span_matrix(lay)  # [N queries, N raw]: how often i sees t
    expected = torch.ones(N, N, dtype=torch.int64).tril()
    tilings = [reference_tiling(N, K, W, lay.levels, i) for i in range(N)]
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    assert int(mask[: lay.N].sum(1).max()) <= cost_bound(lay)
    for i in range(N):
        seen = {
            (lay.span(p)[0], lay.span(p)[1] // K ** lay.span(p)[0])
            for p in mask[i].nonzero().flatten().tolist()
        }
        assert seen == tilings[i], (N, K, W, levels, i)
    for i in random.Random(N).sample(range(N), min(N, 5)):  # the helper reads the same row
        cover = coverage(lay, i)
        assert all(len(c) == 1 for c in cover[: i + 1]) and not any(cover[i + 1 :])
        lods = [lay.span(c[0])[0] for c in cover[: i + 1]]
        assert lods == sorted(lods, reverse=True)  # finer towards i
        assert all(lod == 0 for lod in lods[max(0, i - W) :])  # the raw window [i - W, i]


@pytest.mark.parametrize("N,K,W,levels", random_cases(40, seed=1))
def test_strictly_causal_and_nodes_attend_like_their_last_child(N, K, W, levels):
    lay = build_mega_layout(N, K, W, levels)
    mask = mega_mask(lay)
    spans = torch.tensor([lay.span(p) for p in range(lay.T)])
    level, end = spans[:, 0], spans[:, 2]
    anchor = end - 1  # a raw query itself; a node's last child
    q, k = mask.nonzero().unbind(1)
    other = q != k
    assert bool((end[k] <= end[q]).all())  # nothing from beyond the query's span end
    # no visible node (other than a node itself) reaches the query's own position
    assert bool((end[k][other & (level[k] > 0)] <= anchor[q][other & (level[k] > 0)]).all())
    for p in range(lay.N, lay.T):
        expected = mask[int(anchor[p])].clone()
        expected[p] = True
        assert torch.equal(mask[p], expected), p


def test_layout_positions_and_levels():
    lay = build_mega_layout(64, 4, 8)
    assert lay.levels == 2 and lay.counts == (64, 16, 4) and lay.offsets == (0, 64, 80) and lay.T == 84
    mu, sigma = lay.mu_sigma()
    assert mu[:64].tolist() == list(range(64)) and sigma[:64].abs().max() == 0
    assert mu[64].item() == 2.0 and mu[81].item() == 24.0  # span centres start + L/2
    assert sigma[64].item() == pytest.approx(4 / 12**0.5) and sigma[80].item() == pytest.approx(16 / 12**0.5)
    assert lay.nodes[17].level == 2 and (lay.nodes[17].start, lay.nodes[17].end) == (16, 32)
    assert build_mega_layout(1024, 32, 256).levels == 1  # 767 positions beyond the window: no K**2 span
    assert build_mega_layout(2048, 32, 256).levels == 2
    assert build_mega_layout(65536, 32, 256).levels == 3  # 65279 >= 32**3
    assert build_mega_layout(100, 32, 80).levels == 0  # no node could ever be visible: plain causal
    with pytest.raises(ValueError):
        build_mega_layout(10, 1, 4)


def qkv(T, B=2, H=2, D=8, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize(
    "N,K,W,levels,block",
    [
        (64, 4, 8, None, 16),
        (150, 3, 10, None, 32),
        (97, 2, 5, 4, 20),
        (200, 5, 0, 1, 64),
        (90, 4, 30, 0, 16),
        (130, 4, 12, None, 128),
    ],
)
def test_blocksparse_equals_dense_reference_with_gradients(N, K, W, levels, block):
    lay = build_mega_layout(N, K, W, levels)
    q, k, v = qkv(lay.T)
    grad = torch.randn(2, 2, lay.T, 8, generator=torch.Generator().manual_seed(9))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mega_mask(lay))
    out = blocksparse_mega_attention(q, k, v, plan_blocksparse(lay, block))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sliding_window_layout_is_the_plain_band():
    lay = sliding_window_layout(50, 7)
    i = torch.arange(50)
    band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 7)
    assert torch.equal(mega_mask(lay), band)
    q, k, v = qkv(50)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    torch.testing.assert_close(
        blocksparse_mega_attention(q, k, v, plan_blocksparse(lay, 16)), ref, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("N,K,W,block", [(300, 4, 16, 128), (130, 3, 5, 32)])
def test_flex_attention_agrees_with_dense_reference(N, K, W, block):
    for lay in (build_mega_layout(N, K, W), sliding_window_layout(N, W)):
        q, k, v = qkv(lay.T, requires_grad=False)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mega_mask(lay))
        out = flex_mega_attention(q, k, v, mega_block_mask(lay, "cpu", block))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_attention_gradients_agree_where_supported():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lay = build_mega_layout(300, 4, 16)
    # flex_attention's CUDA kernel needs a head dim of at least 16
    q, k, v = [x.to(device).requires_grad_() for x in qkv(lay.T, D=16, requires_grad=False)]
    try:
        out = flex_mega_attention(q, k, v, mega_block_mask(lay, device, 128))
    except NotImplementedError as e:  # torch 2.13 has no flex_attention backward on CPU
        pytest.skip(str(e))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mega_mask(lay, device))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# Model path


def make_model(seed=0, T=64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes every c_proj; randomise them so attention shapes the logits
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    return model


def make_gistnet(K, seed=0) -> GistNet:
    torch.manual_seed(seed)
    gistnet = GistNet(d_model=32, n_head=2, n_layer=1, block_size=K)
    with torch.no_grad():  # move off the identity init so nodes are not just block means
        for p in gistnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return gistnet


def tokens(B=2, N=64, seed=1):
    return torch.randint(0, 50, (B, N), generator=torch.Generator().manual_seed(seed))


class RecordingGist(torch.nn.Module):
    """mean of the block + level: nodes become checkable sums (a test double for GistNet's signature)."""

    def forward(self, x, level):
        return x.mean(dim=1) + level


def test_nodes_are_built_level_by_level_from_their_children():
    lay = build_mega_layout(40, 3, 2, levels=3)  # counts 13, 4, 1
    embeds = torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(0))
    nodes = build_nodes(embeds, lay, RecordingGist())
    assert nodes.shape == (2, 13 + 4 + 1, 5)
    lod1 = embeds[:, :39].reshape(2, 13, 3, 5).mean(2) + 1
    lod2 = lod1[:, :12].reshape(2, 4, 3, 5).mean(2) + 2
    lod3 = lod2[:, :3].mean(1, keepdim=True) + 3
    torch.testing.assert_close(nodes, torch.cat([lod1, lod2, lod3], dim=1))


def test_window_covering_everything_is_the_vanilla_forward_bit_for_bit():
    model, idx = make_model(), tokens()
    gistnet = make_gistnet(4)
    for W in (63, 64, 1000, 60):  # 60: reach 3 < K = 4, no node could ever be visible
        assert torch.equal(mega_forward(model, idx, gistnet, W=W, K=4), model(idx))
    targets = tokens(seed=2)
    got = mega_forward(model, idx, gistnet, targets, W=64, K=4)
    assert torch.equal(got, model(idx, targets))


def test_model_path_is_causal_and_uses_the_nodes():
    model, gistnet, idx = make_model(), make_gistnet(4), tokens()
    logits = mega_forward(model, idx, gistnet, W=8, K=4)
    assert logits.shape == (2, 64, 50)
    p = 40
    changed = idx.clone()
    changed[:, p] = (changed[:, p] + 1) % 50
    after = mega_forward(model, changed, gistnet, W=8, K=4)
    torch.testing.assert_close(after[:, :p], logits[:, :p], rtol=0, atol=1e-6)
    assert (after[:, p:] - logits[:, p:]).abs().amax() > 1e-3
    # a token far outside every later window still reaches position 63 (through its wLOD2 node)
    far = idx.clone()
    far[:, 5] = (far[:, 5] + 1) % 50
    assert (mega_forward(model, far, gistnet, W=8, K=4)[:, 63] - logits[:, 63]).abs().amax() > 1e-4


def test_loss_is_on_raw_positions_and_gradients_reach_gistnet():
    model, gistnet, idx = make_model(), make_gistnet(4), tokens()
    targets = tokens(seed=3)
    targets[0, :5] = -1
    loss = mega_forward(model, idx, gistnet, targets, W=8, K=4)
    logits = mega_forward(model, idx, gistnet, W=8, K=4)
    expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    per_position = mega_forward(model, idx, gistnet, targets, W=8, K=4, loss_reduction="none")
    assert per_position.shape == (2 * 64,) and bool((per_position.view(2, 64)[0, :5] == 0).all())
    torch.testing.assert_close(per_position.sum() / (targets >= 0).sum(), expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in gistnet.parameters())
    assert sum(p.grad.abs().sum() for p in gistnet.parameters()) > 0
    assert model.wte.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# Scripts


def test_bench_worker_reports_measured_fields():
    from scripts.bench_attention import measure

    row = {
        m: measure(m, 512, d_model=32, n_head=2, K=8, W=32, block=64, repeats=1)
        for m in ("dense", "window", "mega")
    }
    for m, r in row.items():
        assert r["ms"] > 0 and r["peak_mb"] >= 0, m
    assert row["mega"]["keys_per_query"] < 512 / 2 and row["window"]["keys_per_query"] <= 33
    json.dumps(row)


def test_render_writes_a_valid_png(tmp_path):
    from scripts.render_mega_mask import render

    path = tmp_path / "mask.png"
    render(64, 4, 8, path, scale=2)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, pos = {}, 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        assert (
            zlib.crc32(data[pos + 4 : pos + 8 + n])
            == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]
        )
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width) and width > height > 0


@pytest.mark.parametrize("N,K,W,levels", [case for case in random_cases(25, seed=5)])
def test_key_ranges_are_exactly_the_visible_keys(N, K, W, levels):
    from megacontext.mega_attention import key_ranges

    for lay in (build_mega_layout(N, K, W, levels), sliding_window_layout(N, W)):
        lo, hi = key_ranges(lay)
        k = torch.arange(lay.T)
        in_ranges = ((k[None, :, None] >= lo[:, None]) & (k[None, :, None] < hi[:, None])).any(-1)
        assert torch.equal(in_ranges, mega_mask(lay))


@pytest.mark.parametrize("N,K,W,block", [(300, 4, 16, 128), (130, 3, 5, 32), (700, 2, 40, 16)])
def test_block_mask_holds_every_visible_pair(N, K, W, block):
    lay = build_mega_layout(N, K, W)
    bm = mega_block_mask(lay, "cpu", block)
    blocks = bm.to_dense()[0, 0].bool()  # [q blocks, kv blocks]
    mask = mega_mask(lay)
    nb = blocks.size(0)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[: lay.T, : lay.T] = mask
    needed = padded.view(nb, block, nb, block).any(3).any(1)
    assert not (needed & ~blocks).any()  # no visible pair falls outside the listed blocks
    assert blocks.sum() <= 2 * needed.sum()  # and the hulls add little
