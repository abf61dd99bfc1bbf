"""GistNet: bidirectional within a block, every pooling sees every token, levels differ, init = block mean."""

import pytest
import torch
import torch.nn.functional as F

from megacontext.gistnet import GistNet
from nanochat.gpt import norm

D, H, K = 32, 4, 8
POOLINGS = ["mean", "query", "cls"]
VARIANTS = [("transformer", p, h) for p in POOLINGS for h in ("linear", "mlp")] + [("mean", "mean", "linear")]


def _net(kind="transformer", pooling="query", head="mlp", seed=0, trained=True) -> GistNet:
    """A GistNet; trained=True replaces the zero inits by random weights, as after some training."""
    torch.manual_seed(seed)
    net = GistNet(D, H, n_layer=2, block_size=K, kind=kind, pooling=pooling, head=head)
    if trained:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.3)
    return net


def _block(seed=1, batch=1) -> torch.Tensor:
    return torch.randn(batch, K, D, generator=torch.Generator().manual_seed(seed))


def _changed_positions(net: GistNet) -> list[bool]:
    """For each position p: does replacing the input vector at p change the gist?"""
    x = _block()
    base = net(x, 1)
    changed = []
    for p in range(K):
        y = x.clone()
        y[0, p] = torch.randn(D, generator=torch.Generator().manual_seed(100 + p))
        changed.append(not torch.allclose(net(y, 1), base, atol=1e-5, rtol=0))
    return changed


@pytest.mark.parametrize("kind,pooling,head", VARIANTS)
def test_every_token_changes_its_gist(kind, pooling, head):
    assert _changed_positions(_net(kind, pooling, head)) == [True] * K


def test_causal_cls_would_not_see_the_block(monkeypatch):
    """Teeth for the test above: with causal attention a leading CLS sees only itself."""
    sdpa = F.scaled_dot_product_attention

    def causal_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        assert attn_mask is None and not is_causal  # GistNet itself never asks for causal attention
        return sdpa(q, k, v, is_causal=True, **kw)

    net = _net("transformer", "cls")
    monkeypatch.setattr(F, "scaled_dot_product_attention", causal_sdpa)
    assert _changed_positions(net) == [False] * K


@pytest.mark.parametrize("pooling", POOLINGS)
def test_token_order_matters_through_local_rope(pooling):
    """Swapping two tokens keeps the block mean; a transformer gist still changes, the mean control does not."""
    x = _block()
    swapped = x[:, [1, 0, *range(2, K)]]
    net = _net("transformer", pooling)
    assert not torch.allclose(net(x, 1), net(swapped, 1), atol=1e-5)
    control = _net("mean", "mean")
    torch.testing.assert_close(control(x, 1), control(swapped, 1))


@pytest.mark.parametrize("kind,pooling,head", VARIANTS)
def test_level_embedding_makes_levels_differ(kind, pooling, head):
    net = _net(kind, pooling, head)
    x = _block(batch=3)
    g1, g2 = net(x, 1), net(x, 2)
    assert not torch.allclose(g1, g2, atol=1e-4)
    # A per-row level tensor equals the per-level calls row by row.
    mixed = net(x, torch.tensor([1, 2, 1]))
    torch.testing.assert_close(mixed, torch.stack([g1[0], g2[1], g1[2]]))
    assert torch.allclose(net.gist(x, 1), g1)


@pytest.mark.parametrize("kind,pooling,head", VARIANTS)
def test_output_shape_scale_and_init(kind, pooling, head):
    x = _block(batch=5) * 3.0  # scale-free: GistNet normalises its inputs, like the GPT
    net = _net(kind, pooling, head, trained=False)
    out = net(x, 1)
    assert out.shape == (5, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.ones(5))  # unit RMS, a normed token's scale
    if pooling != "cls":  # module doc: mean/query pooling and the mean kind start at the block mean
        torch.testing.assert_close(out, norm(norm(x).mean(dim=1)), atol=1e-5, rtol=0)


def test_rejects_padded_blocks_and_bad_levels():
    net = _net(trained=False)
    with pytest.raises(ValueError, match="complete blocks"):
        net(torch.randn(1, K - 1, D), 1)
    for level in (0, 9, torch.tensor([1, 0])):
        with pytest.raises(ValueError, match="level"):
            net(torch.randn(2, K, D), level)
    with pytest.raises(ValueError, match="pooling"):
        GistNet(D, H, pooling="max")


@pytest.mark.parametrize("kind,pooling,head", VARIANTS)
def test_every_parameter_gets_a_gradient(kind, pooling, head):
    """From the real init: after one optimizer step (zero-init projections open up) every parameter
    has a non-zero gradient from a simple cosine loss against a target."""
    net = _net(kind, pooling, head, trained=False)
    x, target = _block(batch=4), torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        loss = 1 - F.cosine_similarity(net(x, torch.tensor([1, 2, 1, 2])), target).mean()
        loss.backward()
        if step == 0:
            opt.step()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_defaults_build_the_nets_and_round_trip():
    from megacontext.config import MCConfig
    from megacontext.lensnet import LensNet
    from nanochat.common import UserError

    cfg = MCConfig()
    assert MCConfig.from_dict(cfg.to_dict()) == cfg
    net = GistNet(
        64,
        cfg.n_head,
        cfg.gistnet_layers,
        cfg.block_size,
        cfg.gistnet_type,
        cfg.gistnet_pooling,
        cfg.gistnet_head,
        cfg.max_level,
    )
    assert net(torch.randn(2, cfg.block_size, 64), cfg.max_level).shape == (2, 64)
    lens = LensNet(64, cfg.n_head, cfg.lensnet_layers, cfg.lensnet_head, cfg.max_level)
    assert lens(torch.randn(1, 3, 64), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), torch.zeros(1, 3),
                torch.randn(1, 2, 64), torch.tensor([[100.0, 101.0]])).shape == (1, 3)  # fmt: skip
    with pytest.raises(UserError, match="unknown MegaContext config keys \\['block_sise'\\]"):
        MCConfig.from_dict({**cfg.to_dict(), "block_sise": 16})
    with pytest.raises(UserError, match="gistnet_pooling"):
        MCConfig(gistnet_pooling="max")
    assert MCConfig.from_dict({"wc_budget": 256}).wc_budget == 256  # missing keys take today's defaults
