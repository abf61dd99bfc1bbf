"""The MegaContext training step (megacontext/training.py): the ways such systems silently fail."""

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megacontext import batch_plan, objectives, plans, training
from megacontext.config import MCConfig, build_nets
from megacontext.entries import Entry
from megacontext.positional import gaussian_rotary
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers

T, K, V, D = 128, 8, 97, 64


def tiny(seed=0, **kw):
    """A tiny model and the recipe's MCConfig, except the lm / full losses (0 unless asked for: the unit tests
    look at the working-context losses one term at a time)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(T, V, 2, 2, 2, D))
    model.init_weights()
    kw = {"lm_weight": 0.0, "full_weight": 0.0, **kw}
    cfg = MCConfig(
        block_size=K, wc_budget=48, recent=24, horizon=16, variants=4, n_head=2, curriculum_start=0.0, **kw
    )
    gistnet, lensnet = build_nets(cfg, D)
    return model, gistnet, lensnet, cfg


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T + 1), generator=g)


@pytest.mark.parametrize("budget", [48, 64, 100])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hints", [[], [3], [9, 0]])
def test_variants_satisfy_invariants(budget, seed, hints):
    cfg = MCConfig(block_size=K, wc_budget=48, recent=24, horizon=16, variants=6)
    shape = plans.SequenceShape(K, T, 2)
    plan = plans.plan_row(shape, cfg, budget, 24, random.Random(seed), hints)
    base, candidates = plan.base, plan.candidates(cfg)
    variants = [plan.variant(i, shape) for i in plan.order]  # every variant the row could run
    assert 0 < len(candidates) == min(cfg.variants, len(plan.order))
    for wc in [plan.baseline, base, *variants]:
        wc.check(shape)  # every docs/design.md §2 invariant, against the row's tree structure
        assert wc.cost <= budget
        assert [e for e in wc.entries if e.end > T - 24] == [Entry(0, s, s + K) for s in range(T - 24, T, K)]
    assert len({v.entries for v in variants}) == len(variants)  # deduplicated
    for i, v in zip(plan.order, variants):  # each variant differs from the base in that one entry
        changed = set(base.entries) ^ set(v.entries)
        assert base.entries[i] in changed
        assert v != base


def test_copy_hints_find_the_earlier_mention_of_the_horizon():
    row = list(range(100, 100 + T + 1))  # all distinct: no n-gram repeats
    row[21:25] = [7, 8, 9, 10]  # block 21 // K holds the first mention...
    row[T - 3 : T + 1] = [7, 8, 9, 10]  # ...of what the horizon (and its true next tokens) repeats
    assert plans.copy_hints(row, T - 16, T - 24, K, limit=2) == [21 // K]
    assert plans.copy_hints(list(range(T + 1)), T - 16, T - 24, K, limit=2) == []


@pytest.mark.parametrize("seed", range(5))
def test_hinted_blocks_are_zoomed_and_expanded_first(seed):
    """The base zooms each hint to LOD1 and the first variants expand those gists: the hinted block is raw in
    a variant (the designed experiment measures it) while the others stay random."""
    cfg = MCConfig(block_size=K, wc_budget=48, recent=24, horizon=16, variants=3)
    shape = plans.SequenceShape(K, T, 2)
    plan = plans.plan_row(shape, cfg, 48, 24, random.Random(seed), [2])
    base, variants = plan.base, [plan.variant(i, shape) for i in plan.candidates(cfg)]
    assert Entry(1, 2 * K, 3 * K) in base.entries
    assert any(Entry(0, 2 * K, 3 * K) in v.entries for v in variants)


@pytest.mark.parametrize("seed", range(5))
def test_lens_hints_measure_the_gists_lensnet_scores_highest(seed):
    """cfg.lens_hints: after the copy hints, the base's gists LensNet scores highest are expanded by variants
    (hard negatives: what the allocator would open gets measured); without them the rest stays random."""
    cfg = MCConfig(block_size=K, wc_budget=48, recent=24, horizon=16, variants=2, lens_hints=1)
    shape = plans.SequenceShape(K, T, 2)
    picked = {}

    def score(base):  # a scorer that favours the gist farthest from the copy hint
        gists = [i for i, e in enumerate(base.entries) if e.level >= 1 and e.start != 2 * K]
        picked["i"] = max(gists, key=lambda i: abs(base.entries[i].start - 2 * K))
        return torch.tensor([1.0 if i == picked["i"] else -1.0 for i in range(base.num_entries)])

    plan = plans.plan_row(shape, cfg, 48, 24, random.Random(seed), [2])
    scores = score(plan.base)
    hinted = plan.base.entries.index(Entry(1, 2 * K, 3 * K))
    assert plan.candidates(cfg, scores) == sorted([hinted, picked["i"]])  # the copy hint and the favourite
    # without a scorer the second candidate is drawn at random: over seeds it is not always that gist
    others = {
        tuple(plans.plan_row(shape, cfg, 48, 24, random.Random(s), [2]).candidates(cfg)) for s in range(10)
    }
    assert len(others) > 1


def test_marginal_horizon_loss_credits_the_informed_working_context():
    """Equal losses: the marginal is the mean. Unequal: the WC that predicts the horizon best gets the largest
    share of the gradient, a WC that predicts it badly almost none (it is not taught to answer blind). Rows of
    3 and 2 working contexts (the second padded), 4 horizon tokens each."""
    valid = torch.tensor([[True, True, True], [True, True, False]])
    count = torch.tensor([4, 4])
    flat = torch.full((2, 3), 2.0 * 4)
    assert float(objectives.marginal_horizon_loss(flat, count, valid)) == pytest.approx(2.0)
    summed = torch.tensor([[0.4, 12.0, 12.0], [4.0, 4.0, 99.0]], requires_grad=True)
    objectives.marginal_horizon_loss(summed, count, valid).backward()
    g = summed.grad
    assert g[0, 0] > 0.99 * g[0].sum() and g[0, 1] < 1e-3 * g[0, 0]
    assert g[1, 0] == pytest.approx(float(g[1, 1])) and g[1, 2] == 0


def test_marginal_token_loss_trains_every_net():
    model, gistnet, lensnet, cfg = tiny()
    loss, metrics = training.mc_train_step(model, gistnet, lensnet, batch(), cfg, 1.0, seed=0)
    loss.backward()
    assert all(p.grad is not None for p in gistnet.parameters()) and model.wte.weight.grad is not None
    assert metrics["mc/token_loss"] > 0


def test_all_raw_working_context_equals_vanilla_forward():
    model, gistnet, _, cfg = tiny()
    x = batch(1)[:, :T]
    bank, offsets = training.build_bank(model.wte(x), gistnet, K, 2)
    entries = [Entry(0, s, s + K) for s in range(0, T, K)]
    rows = torch.tensor(batch_plan.entry_rows(entries, offsets, K))
    cos, sin = gaussian_rotary(torch.arange(len(rows), dtype=torch.float32)[None], 0.0, model.config.head_dim)
    with torch.no_grad():
        mc = model(embeds=bank[0, rows][None], rotary=(cos, sin))
        vanilla = model(idx=x)
    assert torch.equal(mc, vanilla)


def test_baseline_loss_is_the_vanilla_horizon_loss_with_true_next_tokens():
    """With a budget that holds the whole row, the baseline WC is all raw: its loss must be the vanilla
    next-token loss on the horizon, labels = the true next tokens."""
    model, gistnet, lensnet, cfg = tiny()
    cfg.wc_budget = T
    x = batch(2)
    with torch.no_grad():
        _, metrics = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0)
        logits = model(idx=x[:, :T])
    h = cfg.horizon
    expect = F.cross_entropy(logits[:, -h:].reshape(-1, V), x[:, T - h + 1 :].reshape(-1))
    assert float(metrics["mc/baseline_loss"]) == pytest.approx(float(expect), abs=1e-5)


def test_loss_is_taken_on_horizon_raw_positions_only():
    model, gistnet, lensnet, cfg = tiny()
    x = batch(2)
    targets = x[:, 1:].clone()
    with torch.no_grad():
        ref, _ = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0, targets=targets)
        outside = targets.clone()
        outside[:, : T - cfg.horizon] = (outside[:, : T - cfg.horizon] + 1) % V
        same, _ = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0, targets=outside)
        inside = targets.clone()
        inside[:, -1] = (inside[:, -1] + 1) % V
        diff, _ = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0, targets=inside)
    assert torch.equal(ref, same)
    assert not torch.equal(ref, diff)


def test_lm_weight_adds_the_vanilla_loss_on_raw_positions_before_the_horizon():
    """lm_weight > 0: the extra term is the true-label next-token loss on the raw positions before the
    horizon; with an all-raw working context it is the vanilla loss on those positions."""
    model, gistnet, lensnet, cfg = tiny(lm_weight=0.5, lens_weight=0.0)
    cfg.wc_budget, cfg.variants = T, 0
    x = batch(2)
    with torch.no_grad():
        loss, m = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0)
        logits = model(idx=x[:, :T])
    h = cfg.horizon
    lm = F.cross_entropy(logits[:, : T - h].reshape(-1, V), x[:, 1 : T - h + 1].reshape(-1))
    assert float(m["mc/lm_loss"]) == pytest.approx(float(lm), rel=2e-5)
    assert float(loss) == pytest.approx(float(m["mc/token_loss"] + 0.5 * m["mc/lm_loss"]), rel=1e-5)
    # ... and a label changed before the horizon now moves the loss (it did not with lm_weight = 0)
    targets = x[:, 1:].clone()
    targets[:, 0] = (targets[:, 0] + 1) % V
    with torch.no_grad():
        moved, _ = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=0, targets=targets)
    assert not torch.equal(loss, moved)


def test_full_weight_adds_the_vanilla_loss_of_the_whole_row():
    model, gistnet, lensnet, cfg = tiny()
    x = batch(2)
    with torch.no_grad():
        base, m0 = training.mc_train_step(model, gistnet, lensnet, x, cfg, 0.5, seed=0)
        loss, m = training.mc_train_step(
            model, gistnet, lensnet, x.clone(), replace(cfg, full_weight=0.5), 0.5, 0
        )
        vanilla = model(x[:, :T], x[:, 1:])
    assert float(m["mc/full_loss"]) == pytest.approx(float(vanilla), rel=1e-5)
    assert float(loss) == pytest.approx(float(base) + 0.5 * float(vanilla), rel=1e-5)
    assert m["mc/gpt_positions"] == m0["mc/gpt_positions"] + 2 * T  # MFU counts the extra forward


def lens(logits, cand, utility, editable, listwise=0.0):
    """objectives.lens_loss for one row."""
    cand = torch.tensor([cand])
    n = logits.shape[-1]
    edit = torch.tensor([[i in editable for i in range(n)]])
    ones = torch.ones_like(cand, dtype=torch.bool)
    return objectives.lens_loss(logits[None], cand, ones, utility[None], edit, listwise)


def test_lens_loss_pushes_positive_utility_scores_up():
    scores = torch.zeros(4, requires_grad=True)
    utility = torch.tensor([0.5, 0.0, -0.1, 0.0])
    lens(scores, [0, 1, 2, 3], utility, range(4))[0].backward()
    assert scores.grad[0] < 0  # gradient descent raises the score of the entry whose detail helps
    assert scores.grad[2] > 0  # and lowers the one whose detail hurts


def test_lens_listwise_term_lifts_the_paying_candidate_above_every_editable_entry():
    """The measured candidate that clearly pays (entry 3) must outscore all seven editable entries, not only
    the three other candidates: gradient descent raises it and lowers every other entry, measured or not."""
    logits = torch.zeros(9, requires_grad=True)  # entries 7, 8: protected recent text, never editable
    utility = torch.tensor([0.01, 0.5, 0.0, 0.02])
    with_top, _, _, top1 = lens(logits, [1, 3, 4, 5], utility, range(7), listwise=1.0)
    (with_top - lens(logits, [1, 3, 4, 5], utility, range(7))[0]).backward()  # the listwise term alone
    assert logits.grad[3] < 0 and (logits.grad[[0, 1, 2, 4, 5, 6]] > 0).all()
    assert (logits.grad[7:] == 0).all()
    assert float(top1[0]) == 0.0  # all scores tie: the lens's first choice (entry 0) is not the paying one
    hit = lens(torch.tensor([0, 0, 0, 5.0, 0, 0, 0, 9, 9]), [1, 3, 4, 5], utility, range(7), 1.0)[3]
    assert float(hit[0]) == 1.0  # its first editable choice is the paying entry (7 and 8 are not editable)
    # nothing stands out (plain text, or every variant equally better): no listwise term, no top-1 figure
    flat = torch.tensor([0.5, 0.5, 0.49, 0.5])
    loss, _, _, top1 = lens(logits, [1, 3, 4, 5], flat, range(7), listwise=1.0)
    assert torch.equal(loss, lens(logits, [1, 3, 4, 5], flat, range(7))[0]) and top1.isnan().all()


@pytest.mark.parametrize(
    "kw",
    [
        {"lensnet_input": "gist", "lens_listwise": 0.0, "copy_hints": 0, "lens_hints": 0},
        {},  # the recipe: lexical LensNet with matches and neighbours, listwise term, copy and lens hints
    ],
)
def test_every_parameter_of_gpt_gistnet_and_lensnet_gets_a_gradient(kw):
    model, gistnet, lensnet, cfg = tiny(**kw)
    opts = setup_optimizers(model, extra_modules=[gistnet, lensnet])
    in_opt = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    for mod in (gistnet, lensnet):
        assert all(id(p) in in_opt for p in mod.parameters())  # the nets are in an optimizer
    # zero-initialised output projections give no gradient upstream at step 0 (by design, as in the
    # GPT); after a few steps every parameter must receive one
    for step in range(4):
        for m in (model, gistnet, lensnet):
            m.zero_grad(set_to_none=True)
        loss, _ = training.mc_train_step(model, gistnet, lensnet, batch(3, step), cfg, 0.5, seed=step)
        loss.backward()
        if step < 3:
            for o in opts:
                o.step()
    for name, mod in (("gpt", model), ("gistnet", gistnet), ("lensnet", lensnet)):
        dead = [n for n, p in mod.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"{name} parameters without gradient: {dead}"


def test_same_row_gets_same_variants_wherever_it_lands():
    x = batch(4)
    a = [plans.row_rng(7, row).random() for row in x]
    b = [plans.row_rng(7, row).random() for row in x.flip(0)][::-1]
    assert a == b


def test_curriculum_anneals_to_the_target():
    cfg = MCConfig(wc_budget=128, curriculum_start=0.8)
    assert training.curriculum_budget(cfg, 1024, 0.0) == 819
    assert training.curriculum_budget(cfg, 1024, 0.25) == round(819 + (128 - 819) * 0.5)
    assert training.curriculum_budget(cfg, 1024, 0.5) == 128
    assert training.curriculum_budget(cfg, 1024, 1.0) == 128
