"""Optimizer set-up: grouping, Muon's orthogonal update, extra modules, gradient sync across ranks."""

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import (
    Muon,
    optimizer_params,
    setup_optimizers,
    sync_gradients,
    zeropower_via_newtonschulz5,
)


def make_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    return model


class Extra(nn.Module):
    """Stands in for GistNet/LensNet: a matrix, an embedding table, a vector, a [1, d] query, and a
    reference to the GPT's wte (shared, must stay in the GPT's group only)."""

    def __init__(self, wte: nn.Embedding, d=32):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=True)
        self.level = nn.Embedding(3, d)
        self.query = nn.Parameter(torch.randn(1, d))
        self.gain = nn.Parameter(torch.ones(d))
        self.wte = wte

    def forward(self, idx):
        x = self.wte(idx) + self.level(torch.zeros_like(idx)) + self.query
        return (self.proj(x) * self.gain).square().mean()


def groups_by_name(optimizers):
    return {g["name"]: (type(opt).__name__, g) for opt in optimizers for g in opt.param_groups}


def test_every_param_in_exactly_one_group():
    model = make_model()
    extra = Extra(model.wte)
    optimizers = setup_optimizers(model, extra_modules=[extra])
    ids = [id(p) for p in optimizer_params(optimizers)]
    assert len(ids) == len(set(ids))
    expected = {id(p) for p in model.parameters()} | {id(p) for p in extra.parameters()}
    assert set(ids) == expected
    groups = groups_by_name(optimizers)
    assert groups["wte"][0] == "AdamW" and groups["lm_head"][0] == "AdamW" and groups["blocks"][0] == "Muon"
    # extra: only the true matrix goes to Muon; the table, the vector, the [1, d] query and the bias to AdamW
    assert [tuple(p.shape) for p in groups["extra_matrices"][1]["params"]] == [(32, 32)]
    assert groups["extra"][0] == "AdamW" and len(groups["extra"][1]["params"]) == 4
    for _, group in groups.values():
        assert group["initial_lr"] == group["lr"]


def test_adamw_lr_scaled_by_width():
    model = make_model()
    groups = groups_by_name(setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02))
    scale = (32 / 768) ** -0.5
    assert math.isclose(groups["lm_head"][1]["lr"], 0.004 * scale)
    assert math.isclose(groups["wte"][1]["lr"], 0.2 * scale)
    assert groups["blocks"][1]["lr"] == 0.02  # Muon's update size does not depend on width
    opt = groups["wte"][0]
    adamw = setup_optimizers(model)[0]
    assert opt == "AdamW" and adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10


def test_newton_schulz_is_nearly_orthogonal():
    torch.manual_seed(0)
    for rows, cols in [(64, 16), (16, 64), (32, 32)]:
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k))
        V, _ = torch.linalg.qr(torch.randn(cols, k))
        G = U @ torch.diag(torch.logspace(-1, 1, k)) @ V.T  # singular values spread over 100x
        out = zeropower_via_newtonschulz5(G)
        sv = torch.linalg.svdvals(out)
        assert sv.min() > 0.5 and sv.max() < 1.3, sv  # every direction comes out at ~unit size
        torch.testing.assert_close(out, U @ V.T, rtol=0, atol=0.35)  # and it is G's orthogonal factor


def test_muon_step_is_scaled_orthogonal_update():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 16))
    before = p.detach().clone()
    p.grad = torch.randn(64, 16) * torch.logspace(-1, 1, 16)
    Muon([p], lr=0.1).step()
    update = (before - p.detach()) / (0.1 * math.sqrt(64 / 16))  # tall matrix: scale max(1, rows/cols)^0.5
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    # The update points the same way as the gradient's orthogonal factor
    U, _, Vh = torch.linalg.svd(p.grad, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(update.flatten(), (U @ Vh).flatten(), dim=0) > 0.9


def test_muon_rejects_non_matrices():
    try:
        Muon([nn.Parameter(torch.zeros(3))])
    except ValueError as e:
        assert "2-D" in str(e)
    else:
        raise AssertionError("Muon accepted a vector")


def test_extra_module_params_are_updated():
    model = make_model()
    extra = Extra(model.wte)
    optimizers = setup_optimizers(model, extra_modules=[extra])
    before = {n: p.detach().clone() for n, p in extra.named_parameters()}
    idx = torch.randint(0, 50, (2, 8))
    (model(idx, targets=idx) + extra(idx)).backward()
    for opt in optimizers:
        opt.step()
    for n, p in extra.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"extra param {n} was not updated"


# ---- gradient sync across ranks (gloo on CPU)


def _train(rank: int, world_size: int, init_file: str, out_file: str):
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = make_model()
    optimizers = setup_optimizers(model)
    params = optimizer_params(optimizers)
    data = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    rows = data if world_size == 1 else data[rank * 2 : rank * 2 + 2]  # each rank its own half
    for _ in range(3):
        loss = model(rows[:, :-1], targets=rows[:, 1:])
        loss.backward()
        sync_gradients(params, world_size)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    state = {"model": model.state_dict(), "optim": [opt.state_dict() for opt in optimizers]}
    torch.save(state, f"{out_file}.{rank}")
    if world_size > 1:
        dist.destroy_process_group()


def test_sync_gradients_two_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_train, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    _train(0, 1, "", out + ".single")
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    single = torch.load(out + ".single.0")
    for key, value in single["model"].items():
        torch.testing.assert_close(r0["model"][key], r1["model"][key], rtol=0, atol=0)  # ranks identical
        torch.testing.assert_close(r0["model"][key], value, rtol=1e-4, atol=1e-5)  # = full-batch training
    for s0, s1 in zip(r0["optim"], r1["optim"]):
        for pid, st in s0["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(v, s1["state"][pid][k], rtol=0, atol=0)
