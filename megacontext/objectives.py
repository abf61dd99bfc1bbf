"""The MC step's losses, over all rows at once (docs/design.md §4): masked reductions over padded [rows, variants]
tensors, no loop over rows and no read back to the host, so one micro-batch is a fixed number of kernels
whatever its rows.

* marginal_horizon_loss: the GPT's horizon loss, -log mean_v p(horizon | WC_v) over a row's working contexts;
* lens_loss: LensNet's ranking (Bradley–Terry), sign and listwise losses against the measured utilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UTILITY_SCALE = 0.05  # nats: a utility of this size maps to a regression target of tanh(1) = 0.76
TOP_MARGIN = 0.05  # nats: the listwise term only where the best candidate beats the median one by this much
LOGIT_L2 = 0.01  # keeps LensNet's logits in tanh's responsive range


def marginal_horizon_loss(summed: torch.Tensor, count: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-log mean_v p(horizon | WC_v) per row, per horizon token, averaged over rows.

    summed [B, W]: each working context's summed horizon NLL; count [B]: the row's horizon tokens with a
    label (every WC of a row shares the horizon); valid [B, W]: the WCs that ran (padding False).

    The mean of per-WC losses teaches every working context to predict the horizon, also those whose evidence
    is gisted: on a long-context row most of them, so the GPT learns to answer from its prior, which fought
    the copying that the rows with raw evidence teach. The marginal gives each WC the gradient share of its
    posterior (softmax of minus its summed horizon loss): where one WC holds the evidence it gets the gradient,
    where none stands out (plain text) all share it alike.
    """
    lse = torch.logsumexp((-summed).masked_fill(~valid, -torch.inf), dim=1)
    n = valid.sum(dim=1).to(summed.dtype)
    return ((n.log() - lse) / count.clamp(min=1)).mean()


def lens_loss(
    logits: torch.Tensor,
    cand: torch.Tensor,
    cand_valid: torch.Tensor,
    utility: torch.Tensor,
    editable: torch.Tensor,
    listwise: float,
):
    """LensNet's loss for B rows: logits [B, N] (pre-tanh scores of the bases' entries), cand [B, V] (the
    entries the variants edited), cand_valid [B, V], utility [B, V] (measured: loss saved by the detail at
    each candidate), editable [B, N] (every entry a variant could have edited). Per row with candidates:

    * Bradley–Terry over ordered pairs: P(a ranked above b) = sigmoid(logit_a - logit_b), weighted by how
      much their utilities differ (pairs within 1e-4 nats carry no preference);
    * sign: tanh(logit) regresses on tanh((u - mean u) / scale) — centred on the row's mean utility, so detail
      that helps more than average scores positive (expand / keep) and the rest negative (collapse): the
      allocator can only spend budget on the evidence if something else refunds it;
    * a small L2 on the logits keeps them from drifting into tanh's flat tails, where ranking would stop;
    * listwise (weight `listwise`): where some candidates clearly pay (best utility >= median + TOP_MARGIN),
      those within TOP_MARGIN of the best should outscore ALL editable entries (-log of their softmax mass
      over them): the pairwise loss only orders the few measured candidates, the allocator picks among all.

    Returns (loss: mean over rows with candidates, per-row rank agreement over ordered pairs, sign agreement,
    top-1 hit: LensNet's first choice is one of the paying candidates), the per-row figures nan where a row
    measured nothing.
    """
    B, V = cand.shape
    nan = torch.full((B,), torch.nan, device=logits.device)
    if V == 0:  # no variants: nothing measured
        return logits.new_zeros(()), nan, nan, nan
    valid, invalid = cand_valid, ~cand_valid
    count = valid.sum(dim=1)
    has = count > 0
    n = count.clamp(min=1).to(logits.dtype)
    lc = logits.gather(1, cand)
    u = utility.masked_fill(invalid, 0.0)
    target = torch.tanh((u - u.sum(dim=1, keepdim=True) / n[:, None]) / UTILITY_SCALE)
    loss = (((torch.tanh(lc) - target).square() + LOGIT_L2 * lc.square()) * valid).sum(dim=1) / n
    diff_u = u[:, :, None] - u[:, None, :]
    pref = (diff_u > 1e-4) & (valid[:, :, None] & valid[:, None, :])
    diff_s = lc[:, :, None] - lc[:, None, :]
    weight = diff_u.abs().clamp(max=1.0) * pref
    loss = loss + (weight * F.softplus(-diff_s)).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1e-12)
    # rows without candidates have no preferences and nothing signed: their agreements come out nan
    n_pref = pref.sum(dim=(1, 2))
    right = ((diff_s > 0) & pref).sum(dim=(1, 2))
    rank_agree = torch.where(n_pref > 0, right / n_pref.clamp(min=1), nan)
    signed = valid & (u.abs() > 1e-3)
    n_signed = signed.sum(dim=1)
    agree = (((lc > 0) == (u > 0)) & signed).sum(dim=1)
    sign_agree = torch.where(n_signed > 0, agree / n_signed.clamp(min=1), nan)

    # listwise: the lower median, as torch.median takes it
    best = u.masked_fill(invalid, -torch.inf).max(dim=1).values
    ordered = u.masked_fill(invalid, torch.inf).sort(dim=1).values
    median = ordered.gather(1, ((count - 1).clamp(min=0) // 2)[:, None])[:, 0]
    stands = has & (best - median >= TOP_MARGIN)
    good_cand = valid & (u >= best[:, None] - TOP_MARGIN)
    good = torch.zeros_like(editable, dtype=torch.long).scatter_add(1, cand, good_cand.long()) > 0
    # keep every row's softmax finite: a row without candidates gets entry 0 (its loss is dropped below)
    none = F.pad((~has)[:, None], (0, editable.shape[1] - 1))
    editable, good = editable | none, good | none
    masked = logits.masked_fill(~editable, -torch.inf)
    top_loss = -torch.logsumexp(masked.log_softmax(dim=1).masked_fill(~good, -torch.inf), dim=1)
    hit = good.gather(1, masked.argmax(dim=1, keepdim=True))[:, 0]
    if listwise > 0:
        loss = loss + listwise * torch.where(stands, top_loss, torch.zeros_like(top_loss))
    top1 = torch.where(stands, hit.to(logits.dtype), nan)
    lens = (loss * has).sum() / has.sum().clamp(min=1)
    return lens, rank_agree, sign_agree, top1
