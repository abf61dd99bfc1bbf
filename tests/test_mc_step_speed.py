"""The MegaContext training step at accelerator speed (megacontext/training.py, megacontext/batch_plan.py):
the same objective as the frozen per-row step (tests/_mc_reference.py), no host synchronisation inside the
step, and a number of dispatched ops that does not grow with the rows of a micro-batch."""

import random

import _mc_reference as reference
import pytest
import torch

from megacontext import training
from megacontext.config import MCConfig, build_nets
from nanochat.gpt import GPT, GPTConfig

V, D = 97, 64


def nets(T: int, seed: int = 0, perturb: bool = True, **kw):
    """A tiny GPT and MC nets with the recipe at length T. perturb: every weight moved off its init, so the
    zero-initialised projections (LensNet's output, the blocks' c_proj) pass gradients and LensNet's scores
    are not all tied (its lens hints then depend on them)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(T, V, 2, 2, 2, D, smear=True))
    model.init_weights()
    cfg = MCConfig.for_seq_len(T, n_head=2, **kw)
    gistnet, lensnet = build_nets(cfg, D)
    if perturb:
        with torch.no_grad():
            for m in (model, gistnet, lensnet):
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    return model, gistnet, lensnet, cfg


def rows(B: int, T: int, seed: int = 0, repeat: bool = True) -> torch.Tensor:
    """Random rows; with `repeat`, the horizon repeats an earlier span, so copy hints find something."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    if repeat:
        for b in range(B):
            src = int(torch.randint(0, T // 2, (1,), generator=g))
            x[b, T - 7 : T + 1] = x[b, src : src + 8]
    return x


def chat_targets(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Targets with -1 over random spans (a chat row's non-assistant tokens), horizon included sometimes."""
    g = torch.Generator().manual_seed(seed)
    t = x[:, 1:].clone()
    for b in range(t.shape[0]):
        a = int(torch.randint(0, t.shape[1] - 4, (1,), generator=g))
        t[b, a : a + int(torch.randint(1, t.shape[1] - a, (1,), generator=g))] = -1
    return t


def grads(*mods):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(mods) for n, p in m.named_parameters()}


def run_both(model, gistnet, lensnet, x, cfg, progress, seed, targets=None):
    out = []
    for step in (reference.mc_train_step, training.mc_train_step):
        for m in (model, gistnet, lensnet):
            m.zero_grad(set_to_none=True)
        loss, metrics = step(model, gistnet, lensnet, x, cfg, progress, seed, targets=targets)
        loss.backward()
        out.append((loss.detach(), metrics, grads(model, gistnet, lensnet)))
    return out


SKIP = {"mc/time_controller_ms", "mc/gpt_positions"}  # host timing; positions include the static padding


@pytest.mark.parametrize(
    ("T", "B", "perturb", "progress", "kw", "chat"),
    [
        (256, 3, True, 1.0, {}, False),  # the recipe, trained weights: lens hints follow LensNet's scores
        (256, 2, False, 1.0, {}, False),  # at init: every score ties, hints fall back to the plan's order
        (256, 3, True, 0.2, {}, True),  # mid-curriculum budget, chat targets with -1 masks
        (256, 2, True, 1.0, {"lensnet_input": "gist", "lens_hints": 0, "copy_hints": 0}, False),
        (512, 2, True, 1.0, {"variants": 6}, True),
    ],
)
def test_step_equals_the_per_row_reference(T, B, perturb, progress, kw, chat):
    model, gistnet, lensnet, cfg = nets(T, perturb=perturb, **kw)
    x = rows(B, T, seed=T + B)
    targets = chat_targets(x, 1) if chat else None
    (ref_loss, ref_m, ref_g), (loss, m, g) = run_both(model, gistnet, lensnet, x, cfg, progress, 5, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert g.keys() == ref_g.keys()
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-5, msg=name)
    assert set(m) == set(ref_m)
    for k in set(ref_m) - SKIP:
        want, got = torch.tensor(float(ref_m[k])), torch.tensor(float(m[k]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=k)


def test_step_equals_the_reference_with_a_random_generator_seed():
    """mid_train passes a random.Random as the seed: the same object plans the same rows in both."""
    model, gistnet, lensnet, cfg = nets(256)
    x = rows(2, 256)
    seed = random.Random(3)
    (ref_loss, _, ref_g), (loss, _, g) = run_both(
        model, gistnet, lensnet, x, cfg, 0.5, seed, chat_targets(x, 2)
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-5, msg=name)
