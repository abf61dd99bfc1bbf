"""The MegaContext training step at accelerator speed (megacontext/training.py, megacontext/batch_plan.py):
the same objective as the frozen per-row step (tests/_mc_reference.py), no host synchronisation inside the
step, and a number of dispatched ops that does not grow with the rows of a micro-batch."""

import random

import _mc_reference as reference
import pytest
import torch

from megacontext import batch_plan, plans, training
from megacontext.config import MCConfig, build_nets
from nanochat.gpt import GPT, GPTConfig
from nanochat.op_count import HostSyncError, OpCount

V, D = 97, 64


def nets(T: int, seed: int = 0, perturb: bool = True, dtype: torch.dtype = torch.float32, **kw):
    """A tiny GPT and MC nets with the recipe at length T. perturb: every weight moved off its init, so the
    zero-initialised projections (LensNet's output, the blocks' c_proj) pass gradients and LensNet's scores
    are not all tied (its lens hints then depend on them). dtype float64 for comparisons with the reference:
    a utility is a difference of two near-equal losses, scaled 20-fold by the lens target, so in float32 the
    two steps' different batch shapes (different matmul rounding) alone move a lens gradient by ~1e-5."""
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
    return model.to(dtype), gistnet.to(dtype), lensnet.to(dtype), cfg


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
    model, gistnet, lensnet, cfg = nets(T, perturb=perturb, dtype=torch.float64, **kw)
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
    model, gistnet, lensnet, cfg = nets(256, dtype=torch.float64)
    x = rows(2, 256)
    seed = random.Random(3)
    (ref_loss, _, ref_g), (loss, _, g) = run_both(
        model, gistnet, lensnet, x, cfg, 0.5, seed, chat_targets(x, 2)
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_micro_batch_without_labels_gives_a_finite_loss():
    """Chat rows whose micro-batch holds no assistant token (targets all -1): the loss is 0-valued terms, not
    0/0 = nan (which would poison the whole step's gradient)."""
    model, gistnet, lensnet, cfg = nets(256)
    x = rows(2, 256)
    loss, metrics = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, 0, torch.full((2, 256), -1))
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["mc/full_loss"]) == 0.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def sync_free_step(model, gistnet, lensnet, x, cfg, targets=None, **count):
    """Plan ahead (as the loader thread does), then one step forward + backward under OpCount."""
    plan = training.plan_batch(x, cfg, 1.0, 3)
    with OpCount(**count) as c:
        loss, metrics = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, 3, targets, plan=plan)
        loss.backward()
    return c, metrics


@pytest.mark.parametrize("chat", [False, True])
def test_the_step_never_reads_the_device_from_the_host(chat):
    """No .item(), float(t), .tolist(), .cpu(), boolean-mask index... between the forward and the backward's
    end: OpCount(forbid_syncs=True) raises at the first one. The metrics stay tensors until mean_metrics."""
    model, gistnet, lensnet, cfg = nets(256)
    x = rows(3, 256)
    c, metrics = sync_free_step(
        model, gistnet, lensnet, x, cfg, chat_targets(x, 0) if chat else None, forbid_syncs=True
    )
    assert c.syncs == []
    sums, counts = {}, {}
    with OpCount(forbid_syncs=True):
        training.accumulate_metrics(sums, counts, metrics)
    means = training.mean_metrics(sums, counts)
    assert set(means) == set(metrics) and all(isinstance(v, float) for v in means.values())
    assert means["mc/token_loss"] > 0


def test_the_step_inline_plan_is_where_the_host_reads():
    """Without a plan made ahead the step plans inline, which reads the rows back: the guard sees it (the
    sync-free test above is not vacuous)."""
    model, gistnet, lensnet, cfg = nets(256)
    with pytest.raises(HostSyncError), OpCount(forbid_syncs=True):
        training.mc_train_step(model, gistnet, lensnet, rows(2, 256), cfg, 1.0, 3)


def test_dispatched_ops_do_not_grow_with_rows():
    """One batched pass per network and vectorised losses: 8 rows dispatch the ops 1 row does (within 10 %)."""
    model, gistnet, lensnet, cfg = nets(256)
    ops = {B: sync_free_step(model, gistnet, lensnet, rows(B, 256), cfg)[0].ops for B in (1, 8)}
    assert abs(ops[8] - ops[1]) <= 0.1 * ops[1], ops


def test_the_step_dispatches_at_most_three_times_the_vanilla_steps_ops():
    """The recipe at runcpu's scale (4 layers, rows of 512): one GPT pass over the working contexts and the raw
    rows together (GPT.forward(packing=...)), so the MC step's ops stay within 3x the vanilla step's (widths
    do not change a count)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(512, V, 4, 2, 2, D, smear=True, smear_width=4))
    model.init_weights()
    cfg = MCConfig.for_seq_len(512, n_head=2)
    gistnet, lensnet = build_nets(cfg, D)
    x = rows(2, 512)
    mc = sync_free_step(model, gistnet, lensnet, x, cfg)[0].ops
    with OpCount() as vanilla:
        model(x[:, :-1], x[:, 1:]).backward()
    assert mc <= 3 * vanilla.ops, (mc, vanilla.ops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_passes_cuda_sync_debug_mode():
    model, gistnet, lensnet, cfg = nets(256)
    model, gistnet, lensnet = model.cuda(), gistnet.cuda(), lensnet.cuda()
    x = rows(4, 256)
    plan = training.plan_batch(x, cfg, 1.0, 3, pin=True).to("cuda", non_blocking=True)
    x = x.pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, 3, plan=plan)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("seed", range(4))
def test_device_candidate_choice_equals_the_host_rule(seed):
    """batch_plan.choose_candidates (all rows, on the device) picks what RowPlan.candidates picks row by row,
    for random scores, tied scores and scores that favour gists."""
    T = 256
    cfg = MCConfig.for_seq_len(T, lens_hints=2, variants=5)
    x = rows(4, T, seed)
    plan = training.plan_batch(x, cfg, 0.7, seed)
    g = torch.Generator().manual_seed(seed)
    for scores in (torch.randn(4, T // cfg.block_size, generator=g), torch.zeros(4, T // cfg.block_size)):
        chosen, valid = batch_plan.choose_candidates(scores, plan, cfg)
        picked = plan.order.gather(1, chosen)
        for b, row in enumerate(host_rows(x, cfg, 0.7, seed)):
            want = row.candidates(cfg, scores[b, : len(row.base.entries)])
            assert sorted(picked[b][valid[b]].tolist()) == want


def host_rows(x, cfg, progress, seed):
    """The RowPlans build_plan made, rebuilt the same way on the host."""
    T = x.shape[1] - 1
    K, H = cfg.block_size, cfg.horizon
    recent = max(cfg.recent, H + K)
    shape = plans.SequenceShape(K, T, training.trained_levels(cfg, T))
    budget = training.curriculum_budget(cfg, T, progress)
    for row in x:
        hints = plans.copy_hints(row.tolist(), T - H, T - recent, K, cfg.copy_hints)
        yield plans.plan_row(shape, cfg, budget, recent, plans.row_rng(seed, row), hints)


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_planned_slots_are_the_working_contexts_bank_rows(progress):
    """Every padded row of the plan is the working context it stands for: baseline, base and the one-edit
    variant of every editable entry (the edit applied by WorkingContext.apply), then the padding row."""
    T = 256
    cfg = MCConfig.for_seq_len(T)
    x = rows(3, T, 1)
    plan = training.plan_batch(x, cfg, progress, 9)
    levels = training.trained_levels(cfg, T)
    offsets, pad = batch_plan.bank_offsets(T, cfg.block_size, levels)
    shape = plans.SequenceShape(cfg.block_size, T, levels)
    assert plan.slots >= plan.budget and plan.slots % (cfg.wc_budget // 4) == 0
    for b, row in enumerate(host_rows(x, cfg, progress, 9)):
        wcs = [row.baseline, row.base] + [row.variant(i, shape) for i in row.order]
        for w, wc in enumerate(wcs):
            want = batch_plan.entry_rows(wc.entries, offsets, cfg.block_size)
            assert plan.wc_rows[b, w].tolist() == want + [pad] * (plan.slots - len(want))
        assert (plan.wc_rows[b, len(wcs) :] == pad).all()
        assert plan.editable[b].nonzero().flatten().tolist() == row.editable


@pytest.mark.slow
def test_the_networks_compile_without_graph_breaks_and_match_eager():
    """Static shapes: the GPT (working contexts and raw rows), GistNet (both levels) and LensNet compile with
    fullgraph=True, give the eager step's loss and gradients, and a second batch reuses the graphs (no
    recompile). ~5-10 min of CPU compilation."""
    import torch._dynamo

    model, gistnet, lensnet, cfg = nets(256)
    compiled = [torch.compile(m, fullgraph=True, dynamic=False) for m in (model, gistnet, lensnet)]

    def run(nets_, seed):
        x = rows(3, 256, seed)
        plan = training.plan_batch(x, cfg, 1.0, seed)
        for m in (model, gistnet, lensnet):
            m.zero_grad(set_to_none=True)
        loss, _ = training.mc_train_step(*nets_, x, cfg, 1.0, seed, plan=plan)
        loss.backward()
        return loss.detach(), grads(model, gistnet, lensnet)

    graphs = []
    for seed in (0, 1):
        want_loss, want = run((model, gistnet, lensnet), seed)
        loss, got = run(compiled, seed)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    assert graphs[1] == graphs[0]
