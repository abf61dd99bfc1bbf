"""A planted long-range dependency: after a short seeded MC training run, the working context that keeps the
evidence block raw predicts the horizon better than the one that gists it, and LensNet ranks the evidence
block first. ~2 min on 2 CPU cores: marked slow (`bash test.sh -m slow`)."""

import pytest
import torch

from megacontext import batch_plan, plans, training
from megacontext.config import MCConfig, build_nets
from megacontext.entries import Edit
from megacontext.lens_inputs import lens_inputs, lens_positions, run_lens
from megacontext.working_context import WorkingContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers

T, K, V = 64, 8, 32
MARK, QMARK = 1, 2


def planted_rows(n: int, gen: torch.Generator):
    """Random filler; one of the first four blocks starts with MARK and 7 key tokens; the row ends with
    QMARK and the same 7 key tokens (the horizon), so predicting the horizon needs that block's detail."""
    x = torch.randint(4, V, (n, T + 1), generator=gen)
    evidence = torch.randint(0, 4, (n,), generator=gen)
    for i in range(n):
        s = int(evidence[i]) * K
        x[i, s] = MARK
        x[i, T - 7] = QMARK
        x[i, T - 6 : T + 1] = x[i, s + 1 : s + 8]
    return x, evidence


@pytest.mark.slow
def test_planted_evidence_block_is_kept_raw_and_ranked_first():
    torch.manual_seed(0)
    model = GPT(GPTConfig(T, V, 2, 2, 2, 64))
    model.init_weights()
    cfg = MCConfig(
        block_size=K, wc_budget=32, recent=16, horizon=8, variants=4, n_head=2,
        curriculum_start=0.0, lens_weight=1.0, wc_levels=1,
    )  # fmt: skip
    gistnet, lensnet = build_nets(cfg, 64)
    opts = setup_optimizers(model, 0.02, 0.3, 0.04, extra_modules=[gistnet, lensnet], extra_lr=0.002)
    gen = torch.Generator().manual_seed(0)
    agreement = []
    for step in range(700):
        x, _ = planted_rows(16, gen)
        loss, metrics = training.mc_train_step(model, gistnet, lensnet, x, cfg, 1.0, seed=step)
        loss.backward()
        for opt in opts:
            opt.step()
        for m in (model, gistnet, lensnet):
            m.zero_grad(set_to_none=True)
        agreement.append(float(metrics["mc/lens_rank_agreement"]))
    early, late = sum(agreement[10:110]) / 100, sum(agreement[-100:]) / 100
    assert late > early + 0.05, (early, late)  # mc/lens_rank_agreement rises during training

    x, evidence = planted_rows(40, gen)
    shape = plans.SequenceShape(K, T, 1)
    top1 = raw_better = 0
    with torch.no_grad():
        for i in range(len(x)):
            row = x[i : i + 1]
            bank, offsets = training.build_bank(model.wte(row[:, :T]), gistnet, K, 1)
            wc = WorkingContext.coarsest(shape, cfg.wc_budget, cfg.recent)
            emb, lod, _ = lens_inputs(wc.entries, bank[0], offsets, K, False)
            mu, sigma, q_pos = lens_positions(len(wc.entries), K)
            query = model.wte(row[0, T - cfg.horizon - K : T - cfg.horizon])
            scores = run_lens(lensnet, emb, lod, mu, sigma, query, q_pos)
            gists = [j for j, e in enumerate(wc.entries) if e.level >= 1]
            best = max(gists, key=lambda j: float(scores[j]))
            top1 += int(wc.entries[best].start // K == int(evidence[i]))
            # the evidence block raw vs gisted: horizon loss of the two working contexts
            raw = wc.apply([Edit("expand", 1, int(evidence[i]))], shape)
            losses = []
            for w in (raw, wc):
                rows = torch.tensor(batch_plan.entry_rows(w.entries, offsets, K))
                logits = model(embeds=bank[0, rows][None])[0, -cfg.horizon :]
                losses.append(torch.nn.functional.cross_entropy(logits, row[0, T - cfg.horizon + 1 :]))
            raw_better += int(losses[0] < losses[1])
    assert top1 / len(x) >= 0.9, top1
    assert raw_better / len(x) >= 0.9, raw_better
