"""The MegaContext training step (DESIGN §4): the GPT, GistNet and LensNet trained end to end.

Per training row x[0..T] (inputs x[:T], labels x[1:T+1]):

1. Gists. GistNet summarises every complete K-block of token embeddings (LOD1) and every run of K LOD1
   gists (LOD2, ...), with gradients, into a per-row *bank* [token embeds; LOD1 gists; LOD2 gists; ...].
2. Working contexts at budget C2 (curriculum: 0.8·T down to the target). The *baseline* is the coarsest
   history plus as many raw recent tokens as fit. The *base* is a random legal mix of LOD0/1/2
   (megacontext.allocator.random_variant) built with K-1 budget to spare, and each *one-edit variant*
   expands one of the base's gists (megacontext.plans chooses which: hinted blocks first, e.g. the ones
   the horizon copies from, then random). The newest `recent` tokens are raw in all of them, so every working
   context ends with the same raw horizon of H tokens, where the variants are compared.
3. All working contexts are gathered from the bank into one padded batch and run through the GPT; the loss
   is next-token cross-entropy on raw horizon positions only, with the true next tokens as labels, as the
   marginal -log mean_v p(horizon | WC_v) over a row's working contexts (marginal_horizon_loss).
4. The variants are a designed experiment: base and variant differ in exactly one entry, so
   utility(entry) = loss(base) - loss(variant) is the loss saved by expanding that entry, measured, not
   guessed. LensNet scores the base's entries against the query (the K raw tokens just before the horizon:
   the horizon itself is what gets predicted, so showing it to the lens would leak the answer) and learns to
   rank entries by utility (pairwise Bradley–Terry) and to put their sign right (regression on
   tanh(utility / scale)), so the allocator's absolute thresholds mean something.

Positions: a working context's slots are numbered 0..L-1 with ordinary RoPE (gists too). It never holds more
than W_max slots, so evaluation at 64x the budget shows the GPT exactly the position range it was trained on
(global token positions with Gaussian RoPE were measured worse and removed: docs/log.md).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from megacontext.config import MCConfig
from megacontext.lens_inputs import lens_inputs, lens_positions, row_entry_match, run_lens
from megacontext.plans import RowPlan, SequenceShape, copy_hints, plan_row, row_rng
from megacontext.positional import gaussian_rotary
from megacontext.working_context import WorkingContext

UTILITY_SCALE = 0.05  # nats: a utility of this size maps to a regression target of tanh(1) = 0.76
TOP_MARGIN = 0.05  # nats: lens_top_loss only where the best candidate beats the median one by this much
LOGIT_L2 = 0.01  # keeps LensNet's logits in tanh's responsive range


def trained_levels(cfg: MCConfig, seq_len: int) -> int:
    """Highest gist level a row of seq_len tokens has at least one node of (capped by cfg.wc_levels)."""
    lvl = 0
    while lvl < cfg.wc_levels and seq_len // cfg.block_size ** (lvl + 1) >= 1:
        lvl += 1
    return lvl


def build_bank(embeds: torch.Tensor, gistnet, K: int, levels: int) -> tuple[torch.Tensor, list[int]]:
    """[B, T, d] token embeddings -> bank [B, T + T/K + T/K² + ..., d] and the offset of each level in it."""
    B, T, d = embeds.shape
    parts, offsets, x, offset = [embeds], [0], embeds, T
    for lvl in range(1, levels + 1):
        n = x.shape[1] // K
        g = gistnet(x[:, : n * K].reshape(B * n, K, d), lvl).view(B, n, d)
        parts.append(g)
        offsets.append(offset)
        offset += n
        x = g
    return torch.cat(parts, dim=1), offsets


def entry_rows(entries, offsets: list[int], K: int) -> list[int]:
    """Bank rows of a working context in timeline order: one per raw token, one per gist."""
    rows: list[int] = []
    for e in entries:
        if e.level == 0:
            rows.extend(range(e.start, e.end))
        else:
            rows.append(offsets[e.level] + e.start // K**e.level)
    return rows


def curriculum_budget(cfg: MCConfig, seq_len: int, progress: float) -> int:
    """C2 anneals linearly from curriculum_start·T (0.8 by default) to the target over the first half of
    training: early on the GPT sees mostly raw text while GistNet's gists are still noise."""
    start = max(cfg.wc_budget, int(cfg.curriculum_start * seq_len))
    frac = min(1.0, max(0.0, progress) / 0.5)
    return int(round(start + (cfg.wc_budget - start) * frac))


def auto_device_batch(device_batch: int, seq_len: int, cfg: MCConfig) -> int:
    """Rows per micro-batch so an MC step holds about as many GPT positions as a vanilla one did.

    An MC row runs (variants + 2) working contexts of at most 0.8·T slots at the start of the curriculum.
    """
    per_row = (cfg.variants + 2) * max(cfg.wc_budget, int(cfg.curriculum_start * seq_len))
    return max(1, (device_batch * seq_len) // per_row)


def lens_loss_fn(logits: torch.Tensor, utility: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Ranking + sign loss for one row's candidate logits [n] (pre-tanh scores) and measured utilities [n].

    * Bradley–Terry over ordered pairs: P(a ranked above b) = sigmoid(logit_a - logit_b), weighted by how
      much their utilities differ (pairs within 1e-4 nats carry no preference and are skipped);
    * sign: tanh(logit) regresses on tanh((u - mean u) / scale) — centred on the row's mean utility, so detail
      that helps more than average scores positive (expand / keep) and the rest negative (collapse): the
      allocator can only spend budget on the evidence if something else refunds it;
    * a small L2 on the logits keeps them from drifting into tanh's flat tails, where ranking would stop.

    Returns (loss, rank agreement over ordered pairs, sign agreement).
    """
    diff_u = utility[:, None] - utility[None, :]
    pref = diff_u > 1e-4
    target = torch.tanh((utility - utility.mean()) / UTILITY_SCALE)
    loss = F.mse_loss(torch.tanh(logits), target) + LOGIT_L2 * logits.square().mean()
    rank_agree, sign_agree = float("nan"), float("nan")
    if pref.any():
        diff_s = logits[:, None] - logits[None, :]
        weight = diff_u.abs().clamp(max=1.0)[pref]
        bt = F.softplus(-diff_s[pref])
        loss = loss + (weight * bt).sum() / weight.sum()
        rank_agree = float((diff_s[pref] > 0).float().mean())
    signed = utility.abs() > 1e-3
    if signed.any():
        sign_agree = float(((logits[signed] > 0) == (utility[signed] > 0)).float().mean())
    return loss, rank_agree, sign_agree


def lens_top_loss(logits: torch.Tensor, plan: RowPlan, utility: torch.Tensor):
    """Listwise term (MCConfig.lens_listwise): where some candidates clearly pay (best utility >= median +
    TOP_MARGIN), those within TOP_MARGIN of the best should outscore ALL editable entries (-log of their softmax
    mass over them): the pairwise loss only orders the few measured candidates, the allocator picks among all.
    Returns (loss, hit: LensNet's first choice is one of them, mc/lens_top1), or None where none stands out."""
    if float(utility.max() - utility.median()) < TOP_MARGIN:
        return None
    idx = torch.tensor(plan.editable, device=logits.device)
    good = {
        plan.candidates[j] for j in range(len(plan.candidates)) if utility[j] >= utility.max() - TOP_MARGIN
    }
    is_good = torch.tensor([i in good for i in plan.editable], device=logits.device)
    logp = logits[idx].log_softmax(dim=0)
    loss = -torch.logsumexp(logp[is_good], dim=0)
    return loss, float(is_good[int(logits[idx].argmax())])


def mc_train_step(
    model,
    gistnet,
    lensnet,
    x: torch.Tensor,
    cfg: MCConfig,
    progress: float,
    seed: int,
    targets: torch.Tensor | None = None,
):
    """One MC micro-batch. x: [B, T+1] token ids; targets [B, T] (default x[:, 1:]; -1 = no loss, e.g. the
    non-assistant tokens of a chat row). Returns (loss, metrics dict of floats).

    The loss = marginal horizon loss over the working contexts + lens_weight · lens loss
    (+ lm_weight · next-token loss on the raw positions before the horizon)
    (+ full_weight · the vanilla loss of the whole raw row). Backward it as usual: GPT, GistNet and LensNet all
    get gradients.
    """
    t0 = time.perf_counter()
    B, T = x.shape[0], x.shape[1] - 1
    K, H = cfg.block_size, cfg.horizon
    recent = max(cfg.recent, H + K)
    assert T % K == 0, f"MC needs the sequence length ({T}) to be a multiple of the block size ({K})"
    inputs = x[:, :T]
    targets = x[:, 1:] if targets is None else targets
    levels = trained_levels(cfg, T)
    shape = SequenceShape(K, T, levels)
    budget = curriculum_budget(cfg, T, progress)
    hints = [
        copy_hints(row.tolist(), T - H, T - recent, K, cfg.copy_hints) if cfg.copy_hints else [] for row in x
    ]
    t_ctrl = time.perf_counter() - t0
    embeds = model.wte(inputs)
    bank, offsets = build_bank(embeds, gistnet, K, levels)
    t0 = time.perf_counter()
    horizon_start = T - H

    def lens_scores(b: int, base: WorkingContext) -> torch.Tensor:
        """LensNet's logits for row b's base entries (queried by the K raw tokens before the horizon)."""
        e_emb, lod, lex = lens_inputs(base.entries, bank[b].detach(), offsets, K, lensnet.lex is not None)
        e_mu, e_sig, q_pos = lens_positions(len(base.entries), K)
        q_emb = embeds[b, horizon_start - K : horizon_start].detach()
        match = None
        if lensnet.match is not None:
            match = row_entry_match(base.entries, inputs[b], inputs[b, horizon_start - K : horizon_start])
        return run_lens(lensnet, e_emb, lod, e_mu, e_sig, q_emb, q_pos, True, lex, match)

    # with cfg.lens_hints LensNet scores each base while it is planned; the loss below reuses those scores
    base_scores: dict[int, torch.Tensor] = {}
    plans = []
    for b, (row, h) in enumerate(zip(x, hints)):
        score = None
        if cfg.lens_hints:
            score = lambda base, b=b: base_scores.setdefault(b, lens_scores(b, base))  # noqa: E731
        plans.append(plan_row(shape, cfg, budget, recent, row_rng(seed, row), h, score))
    d = bank.shape[-1]
    bank = torch.cat([bank, bank.new_zeros(B, 1, d)], dim=1)  # last row: padding
    pad_row = bank.shape[1] - 1

    seqs = [(b, wc) for b, plan in enumerate(plans) for wc in plan.wcs]
    L = max(wc.cost for _, wc in seqs)
    rows = torch.full((len(seqs), L), pad_row, dtype=torch.long)
    tgt = torch.full((len(seqs), L), -1, dtype=torch.long)
    mu = torch.zeros(len(seqs), L)
    sigma = torch.zeros(len(seqs), L)
    in_h = torch.zeros(len(seqs), L, dtype=torch.bool)
    for v, (b, wc) in enumerate(seqs):
        r = entry_rows(wc.entries, offsets, K)
        rows[v, : len(r)] = torch.tensor(r)
        m, s = [float(i) for i in range(len(r))], [0.0] * len(r)
        mu[v, : len(m)] = torch.tensor(m)
        sigma[v, : len(s)] = torch.tensor(s)
        # labels: the true next token of every raw position (bank row p is token p; gist rows are >= T)
        raw = torch.tensor(r)
        is_raw = raw < T
        tgt[v, : len(r)][is_raw] = targets[b, raw[is_raw]].cpu()
        in_h[v, : len(r)] = (raw >= horizon_start) & is_raw
    device = x.device
    rows, tgt, in_h = rows.to(device), tgt.to(device), in_h.to(device)
    batch_ids = torch.tensor([b for b, _ in seqs], device=device)
    packed = bank[batch_ids[:, None], rows]  # [V, L, d]
    head_dim = model.config.head_dim
    cos, sin = gaussian_rotary(mu.to(device), sigma.to(device), head_dim)
    t_ctrl += time.perf_counter() - t0

    logits = model(embeds=packed, rotary=(cos, sin))
    tok_loss = F.cross_entropy(
        logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=-1, reduction="none"
    )
    tok_loss = tok_loss.view(len(seqs), L)
    h_mask = in_h & (tgt >= 0)
    per_wc = (tok_loss * h_mask).sum(dim=1) / h_mask.sum(dim=1).clamp(min=1)  # horizon loss of each WC
    token_loss = per_wc.mean()
    train_loss = marginal_horizon_loss(tok_loss, h_mask, plans)
    # Optional LM term on the raw positions before the horizon (see MCConfig.lm_weight)
    lm_mask = ~in_h & (tgt >= 0)
    lm_loss = (tok_loss * lm_mask).sum() / lm_mask.sum().clamp(min=1)

    # LensNet on each row's base: utilities measured from its one-edit variants
    t1 = time.perf_counter()
    lens_losses, rank_agree, sign_agree, utilities, top1 = [], [], [], [], []
    v = 0
    for b, plan in enumerate(plans):
        n_wc = len(plan.wcs)
        losses = per_wc[v : v + n_wc].detach()
        v += n_wc
        if not plan.candidates:
            continue
        # value of detail at each candidate: loss saved by expanding a gist / lost by collapsing a block
        sign = torch.tensor([1.0 if ex else -1.0 for ex in plan.expands], device=device)
        utility = sign * (losses[1] - losses[2:])
        scores = base_scores[b] if b in base_scores else lens_scores(b, plan.wcs[1])
        cand = torch.tensor(plan.candidates, device=device)
        loss_b, ra, sa = lens_loss_fn(scores[cand], utility)
        top = lens_top_loss(scores, plan, utility)
        if top is not None:
            top1.append(top[1])
            if cfg.lens_listwise > 0:
                loss_b = loss_b + cfg.lens_listwise * top[0]
        lens_losses.append(loss_b)
        rank_agree.append(ra)
        sign_agree.append(sa)
        utilities.append(utility)
    lens_loss = torch.stack(lens_losses).mean() if lens_losses else token_loss.new_zeros(())
    t_ctrl += time.perf_counter() - t1

    loss = train_loss + cfg.lens_weight * lens_loss
    if cfg.lm_weight > 0:
        loss = loss + cfg.lm_weight * lm_loss
    full_loss, full_positions = token_loss.new_zeros(()), 0
    if cfg.full_weight > 0:  # the vanilla objective on the same rows (MCConfig.full_weight)
        full_loss = model(inputs, targets)
        loss = loss + cfg.full_weight * full_loss
        full_positions = B * T
    nb = len(plans)
    baseline_losses = per_wc.detach()[[sum(len(p.wcs) for p in plans[:b]) for b in range(nb)]]
    all_u = torch.cat(utilities) if utilities else torch.zeros(1)
    bases = [p.wcs[1] for p in plans]
    metrics = {
        "mc/token_loss": float(token_loss.detach()),
        "mc/lm_loss": float(lm_loss.detach()),
        "mc/baseline_loss": float(baseline_losses.mean()),
        "mc/adv_delta_mean": float(all_u.mean()),
        "mc/lens_loss": float(lens_loss.detach()),
        "mc/full_loss": float(full_loss.detach()),
        "mc/lens_rank_agreement": _nanmean(rank_agree),
        "mc/preference_agreement": _nanmean(sign_agree),
        "mc/lens_top1": _nanmean(top1),
        "mc/swap_rate": sum(len(p.candidates) for p in plans) / max(1, sum(w.num_entries for w in bases)),
        "mc/residency": sum(w.residency for w in bases) / nb,
        "mc/wc_budget": float(budget),
        "mc/time_controller_ms": 1000.0 * t_ctrl,
        "mc/gpt_positions": float(len(seqs) * L + full_positions),
    }
    return loss, metrics


def marginal_horizon_loss(tok_loss: torch.Tensor, h_mask: torch.Tensor, plans) -> torch.Tensor:
    """-log mean_v p(horizon | WC_v) per row, per horizon token, averaged over rows .

    The mean of per-WC losses teaches every working context to predict the horizon, also those whose evidence
    is gisted: on a long-context row most of them, so the GPT learns to answer from its prior, which fought
    the copying that the rows with raw evidence teach. The marginal gives each WC the gradient share of its
    posterior (softmax of minus its summed horizon loss): where one WC holds the evidence it gets the gradient,
    where none stands out (plain text) all share it alike.
    """
    summed = (tok_loss * h_mask).sum(dim=1)  # [V] summed horizon NLL per WC
    out, v = [], 0
    for plan in plans:
        n = len(plan.wcs)
        s = summed[v : v + n]
        count = h_mask[v].sum().clamp(min=1)  # every WC of a row shares the same horizon
        out.append((math.log(n) - torch.logsumexp(-s, dim=0)) / count)
        v += n
    return torch.stack(out).mean()


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")
