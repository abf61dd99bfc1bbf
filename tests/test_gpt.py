"""The GPT's entry points: ids vs embeddings, explicit rotary and masks, causality, GQA, loss, FLOPs."""

import torch

from nanochat.gpt import GPT, GPTConfig, config_for_depth, rotary_cos_sin
from nanochat.optim import setup_optimizers


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    # init_weights zeroes every c_proj (blocks start as the identity); randomise them so attention and
    # the MLP actually shape the logits the tests compare.
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    return model


def tokens(B=2, T=16, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_embeds_path_equals_ids_path():
    model = make_model()
    idx = tokens()
    torch.testing.assert_close(model(idx), model(embeds=model.wte(idx)), rtol=0, atol=0)


def test_explicit_default_rotary_gives_identical_logits():
    model = make_model()
    idx = tokens()
    T = idx.size(1)
    positions = torch.arange(T, dtype=torch.float32).expand(idx.size(0), T)  # per-row [B, T]
    rotary = rotary_cos_sin(positions, model.config.head_dim)
    torch.testing.assert_close(model(idx), model(idx, rotary=rotary), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(idx), model(idx, rotary=model.default_rotary(T)), rtol=0, atol=0)


def test_shifted_rotary_changes_logits():
    # Rotary must actually reach attention, or the two tests above would pass vacuously.
    model = make_model()
    idx = tokens()
    shifted = rotary_cos_sin(torch.arange(16, dtype=torch.float32)[None] * 3.0, model.config.head_dim)
    assert not torch.allclose(model(idx), model(idx, rotary=shifted), atol=1e-4)


def test_causal_future_token_does_not_change_past_logits():
    model = make_model()
    idx = tokens()
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


def test_explicit_causal_mask_equals_default():
    model = make_model()
    idx = tokens()
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(model(idx), model(idx, attn_mask=causal), rtol=1e-5, atol=1e-5)
    full = torch.ones(1, 1, T, T, dtype=torch.bool)  # bidirectional: must differ, so the mask is used
    assert not torch.allclose(model(idx), model(idx, attn_mask=full), atol=1e-4)


def test_gqa_forward_and_backward():
    model = make_model(n_head=4, n_kv_head=2)
    assert model.blocks[0].attn.c_k.weight.shape == (2 * 8, 32)
    idx = tokens()
    loss = model(idx, targets=tokens(seed=2))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    # causality holds with GQA too
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 64
    torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12], rtol=0, atol=1e-6)


def test_loss_ignores_minus_one_targets():
    model = make_model()
    idx, targets = tokens(), tokens(seed=2)
    masked = targets.clone()
    masked[:, ::2] = -1
    logits = model(idx)
    keep = masked != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(idx, targets=masked), expected, rtol=1e-5, atol=1e-6)
    per_token = model(idx, targets=masked, loss_reduction="none")
    assert (per_token.view_as(masked)[~keep] == 0).all()


def test_estimate_flops_matches_formula():
    model = make_model()
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n != "wte.weight")
    expected = 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    assert model.estimate_flops() == expected > 0


def test_config_for_depth_scales_width():
    cfg = config_for_depth(4, vocab_size=100, sequence_len=64)
    assert cfg.n_embd == 256 and cfg.n_embd % cfg.n_head == 0 and cfg.n_layer == 4


def test_training_steps_drive_loss_down():
    model = make_model()
    model.init_weights()  # the real init this time
    optimizers = setup_optimizers(model)
    idx = tokens(B=4, T=32, seed=3)
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, targets=y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(64.0)).item()) < 0.1  # near-uniform start
    assert losses[-1] < 0.5 * losses[0], losses


def test_smear_at_zero_is_the_vanilla_gpt_and_shifts_the_previous_input():
    vanilla, smeared = make_model(), make_model(smear=True)
    smeared.load_state_dict(vanilla.state_dict() | {"smear": torch.zeros(32)})
    idx = tokens()
    torch.testing.assert_close(smeared(idx), vanilla(idx), rtol=0, atol=0)  # init: exactly the vanilla GPT
    with torch.no_grad():
        smeared.smear.fill_(0.5)
    a = smeared(idx)
    assert not torch.allclose(a, vanilla(idx), atol=1e-4)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    b = smeared(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)  # still causal
    # position 11 sees token 10 twice: through attention and through the shift, so even a GPT with no
    # attention or MLP output (blocks = identity) must see the change there
    with torch.no_grad():
        for block in smeared.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    a, b = smeared(idx), smeared(changed)
    assert not torch.allclose(a[:, 11], b[:, 11], atol=1e-4)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], rtol=0, atol=0)  # one position back only


def test_a_wider_smear_shifts_exactly_its_width_back():
    """smear_width 3: at init still the vanilla GPT; then a token reaches the inputs 1, 2 and 3 positions after
    it through the shift alone (blocks = identity), and not the 4th."""
    vanilla, smeared = make_model(), make_model(smear=True, smear_width=3)
    smeared.load_state_dict(
        vanilla.state_dict() | {"smear": torch.zeros(32), "smear_back": torch.zeros(2, 32)}
    )
    idx = tokens()
    torch.testing.assert_close(smeared(idx), vanilla(idx), rtol=0, atol=0)
    with torch.no_grad():
        smeared.smear.fill_(0.5)
        smeared.smear_back.fill_(0.5)
        for block in smeared.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    a, b = smeared(idx), smeared(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    for t in (11, 12, 13):
        assert not torch.allclose(a[:, t], b[:, t], atol=1e-4), t
    torch.testing.assert_close(a[:, 14:], b[:, 14:], rtol=0, atol=0)


def test_smear_is_trained_and_saved_in_the_config():
    model = make_model(smear=True, smear_width=2)
    opts = setup_optimizers(model)
    smear_groups = [g for o in opts for g in o.param_groups if g["name"] == "smear"]
    assert len(smear_groups) == 1 and smear_groups[0]["params"] == [model.smear, model.smear_back]
    model(tokens(), tokens(seed=2)).backward()
    for p in (model.smear, model.smear_back):
        assert p.grad is not None and p.grad.abs().sum() > 0
    restored = GPTConfig(**model.config.to_dict())  # checkpoints store the config: loading needs no flag
    assert restored.smear and restored.smear_width == 2


def test_packed_batches_equal_one_call_per_batch_in_logits_and_gradients():
    """Two batches of different lengths in one packed pass (the MC step's working contexts and raw rows):
    each sequence keeps its own positions, attention and token shift, so logits and every gradient equal
    those of one call per batch; with GQA and a token shift 3 positions wide."""
    import pytest

    model = make_model(n_kv_head=2, smear=True, smear_width=3)
    with torch.no_grad():
        model.smear.fill_(0.5)
        model.smear_back.fill_(0.5)
    a, b = model.wte(tokens(B=3, T=8, seed=2)), model.wte(tokens(B=2, T=16, seed=3))
    ya, yb = tokens(B=3, T=8, seed=4), tokens(B=2, T=16, seed=5)

    def grads():
        g = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return g

    la, lb = model(embeds=a.detach()), model(embeds=b.detach())
    (
        model(embeds=a.detach(), targets=ya, loss_reduction="sum")
        + model(embeds=b.detach(), targets=yb, loss_reduction="sum")
    ).backward()
    separate = grads()
    flat = torch.cat([a.detach().reshape(1, 24, -1), b.detach().reshape(1, 32, -1)], dim=1)
    logits = model(embeds=flat, packing=((3, 8), (2, 16)))
    torch.testing.assert_close(
        logits[0], torch.cat([la.reshape(24, -1), lb.reshape(32, -1)]), rtol=1e-5, atol=1e-5
    )
    model(
        embeds=flat,
        targets=torch.cat([ya.reshape(-1), yb.reshape(-1)])[None],
        packing=((3, 8), (2, 16)),
        loss_reduction="sum",
    ).backward()
    for got, want in zip(grads(), separate):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="packing"):
        model(embeds=flat, packing=((3, 8), (2, 15)))
