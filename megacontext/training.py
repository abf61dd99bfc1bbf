"""The MegaContext training step (docs/design.md §4): the GPT, GistNet and LensNet trained end to end.

Per training row x[0..T] (inputs x[:T], labels x[1:T+1]):

1. Gists. GistNet summarises every complete K-block of token embeddings (LOD1) and every run of K LOD1
   gists (LOD2, ...), with gradients, into a per-row *bank* [token embeds; LOD1 gists; LOD2 gists; ...].
2. Working contexts at budget C2 (curriculum: 0.8·T down to the target). The *baseline* is the coarsest
   history plus as many raw recent tokens as fit. The *base* is a random legal mix of LOD0/1/2
   (megacontext.allocator.random_variant) built with K-1 budget to spare, and each *one-edit variant*
   expands one of the base's gists (megacontext.plans chooses which: hinted blocks first, e.g. the ones
   the horizon copies from, then LensNet's favourites, then random). The newest `recent` tokens are raw in all
   of them, so every working context ends with the same raw horizon of H tokens, where the variants are compared.
3. All working contexts are gathered from the bank into one padded batch and run through the GPT; the loss
   is next-token cross-entropy on raw horizon positions only, with the true next tokens as labels, as the
   marginal -log mean_v p(horizon | WC_v) over a row's working contexts (objectives.marginal_horizon_loss).
4. The variants are a designed experiment: base and variant differ in exactly one entry, so
   utility(entry) = loss(base) - loss(variant) is the loss saved by expanding that entry, measured, not
   guessed. LensNet scores the base's entries against the query (the K raw tokens just before the horizon:
   the horizon itself is what gets predicted, so showing it to the lens would leak the answer) and learns to
   rank entries by utility (objectives.lens_loss), so the allocator's absolute thresholds mean something.

Speed: the rows' working contexts are planned on the host ahead of the step (megacontext.batch_plan, in the
data loader's thread); the step is one batched pass per network (GistNet over all blocks, LensNet over all
bases, the GPT once over all working contexts and the raw rows packed after them) and losses reduced over padded
[rows, variants] tensors, at shapes fixed by the config, with no read back to the host: its metrics stay
0-dim tensors until the log line (accumulate_metrics / mean_metrics).

Positions: a working context's slots are numbered 0..L-1 with ordinary RoPE (gists too). It never holds more
than W_max slots, so evaluation at 64x the budget shows the GPT exactly the position range it was trained on
(global token positions with Gaussian RoPE were measured worse and removed: docs/log.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megacontext.batch_plan import BatchPlan, build_plan, choose_candidates
from megacontext.config import MCConfig
from megacontext.lens_inputs import batch_lens_inputs
from megacontext.objectives import lens_loss, marginal_horizon_loss


def trained_levels(cfg: MCConfig, seq_len: int) -> int:
    """Highest gist level a row of seq_len tokens has at least one node of (capped by cfg.wc_levels)."""
    lvl = 0
    while lvl < cfg.wc_levels and seq_len // cfg.block_size ** (lvl + 1) >= 1:
        lvl += 1
    return lvl


def build_bank(
    embeds: torch.Tensor, gistnet, K: int, levels: int, pad_row: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """[B, T, d] token embeddings -> bank [B, T + T/K + T/K² + ..., d] and the offset of each level in it;
    pad_row: one zero row after them (the plan's padding row), in the same concatenation."""
    B, T, d = embeds.shape
    parts, offsets, x, offset = [embeds], [0], embeds, T
    for lvl in range(1, levels + 1):
        n = x.shape[1] // K
        g = gistnet(x[:, : n * K].reshape(B * n, K, d), lvl).view(B, n, d)
        parts.append(g)
        offsets.append(offset)
        offset += n
        x = g
    if pad_row:
        parts.append(embeds.new_zeros(B, 1, d))
    return torch.cat(parts, dim=1), offsets


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


def plan_batch(x: torch.Tensor, cfg: MCConfig, progress: float, seed, pin: bool = False) -> BatchPlan:
    """The plan of rows x [B, T+1] (host tensor) for the step at `progress` with this seed: what
    mc_train_step(..., plan=...) runs. Call it in the data loader's thread for the next batch (pin=True
    where the plan goes to a GPU: plan.to(device, non_blocking=True) then does not stall the host)."""
    T = x.shape[1] - 1
    plan = build_plan(x, cfg, curriculum_budget(cfg, T, progress), trained_levels(cfg, T), seed)
    return plan.pin_memory() if pin else plan


def mc_train_step(
    model,
    gistnet,
    lensnet,
    x: torch.Tensor,
    cfg: MCConfig,
    progress: float,
    seed,
    targets: torch.Tensor | None = None,
    plan: BatchPlan | None = None,
):
    """One MC micro-batch. x: [B, T+1] token ids; targets [B, T] (default x[:, 1:]; -1 = no loss, e.g. the
    non-assistant tokens of a chat row); plan: plan_batch(x, cfg, progress, seed) made ahead (without it the
    step plans inline, which reads x back to the host). Returns (loss, metrics: name -> 0-dim tensor or
    float; convert them at the log line, mean_metrics, not inside the step).

    The loss = marginal horizon loss over the working contexts + lens_weight · lens loss
    (+ lm_weight · next-token loss on the raw positions before the horizon)
    (+ full_weight · the vanilla loss of the whole raw row). Backward it as usual: GPT, GistNet and LensNet all
    get gradients. `model` may be the compiled GPT: the step's shapes are static (batch_plan).
    """
    B, T = x.shape[0], x.shape[1] - 1
    K, H = cfg.block_size, cfg.horizon
    if plan is None:
        plan = plan_batch(x.detach().cpu(), cfg, progress, seed).to(x.device)
    if plan.wc_rows.shape[0] != B:
        raise ValueError(f"the plan holds {plan.wc_rows.shape[0]} rows, the batch {B}")
    inputs = x[:, :T]
    targets = x[:, 1:] if targets is None else targets
    horizon_start = T - H
    embeds = model.wte(inputs)
    bank, _ = build_bank(embeds, gistnet, K, plan.levels, pad_row=True)  # last row: the plan's pad row
    R, d = bank.shape[1:]

    # LensNet on every row's base in one padded call; its favourites become candidates (lens hints)
    query = slice(horizon_start - K, horizon_start)
    e_emb, lex, match = batch_lens_inputs(
        bank.detach(), inputs, plan.entry_row, plan.entry_start, plan.entry_end, inputs[:, query],
        lensnet.lex is not None, lensnet.match is not None,
    )  # fmt: skip
    scores = lensnet(
        e_emb, plan.entry_lod, plan.entry_mu, None, embeds[:, query].detach(), plan.query_pos,
        entry_mask=plan.entry_valid, return_logits=True, entry_lex=lex, entry_match=match,
    )  # fmt: skip
    chosen, cand_valid = choose_candidates(scores, plan, cfg)
    V = chosen.shape[1]
    cand = plan.order.gather(1, chosen)
    sign = plan.order_sign.gather(1, chosen)  # +1: the variant expands a gist, -1: collapses a raw block

    # the GPT on every working context: [B, 2 + V, L] bank rows (baseline, base, variants). A variant that
    # does not run (cand_valid False) is one the plan left all padding rows.
    L = plan.slots
    variant_rows = plan.wc_rows[:, 2:].gather(1, chosen[:, :, None].expand(B, V, L))
    rows = torch.cat([plan.wc_rows[:, :2], variant_rows], dim=1)
    W = rows.shape[1]
    flat = (rows + plan.bank_base).view(-1)  # rows of the flattened bank, B·W·L of them
    full_positions = B * T if cfg.full_weight > 0 else 0
    if full_positions:  # the vanilla objective (full_weight): the raw rows packed after them, one pass
        raw = plan.bank_base.view(B, 1) + torch.arange(T, device=flat.device)
        flat = torch.cat([flat, raw.view(-1)])
    # the label of bank row p < T (token p) is the true next token; gists and padding have none
    labels = torch.cat([targets, targets.new_full((B, R - T), -1)], dim=1)
    tgt = labels.view(-1)[flat]
    in_h = plan.horizon_rows[rows]
    gathered = bank.view(B * R, d)[flat]
    if full_positions:
        logits = model(embeds=gathered[None], packing=((B * W, L), (B, T)))
    else:
        logits = model(embeds=gathered.view(B * W, L, d))  # slots 0..L-1: the GPT's own rotary positions
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt, ignore_index=-1, reduction="none")
    tok_loss = nll[: B * W * L].view(B, W, L)
    labelled = tgt[: B * W * L].view(B, W, L) >= 0
    h_mask = in_h & labelled
    summed = (tok_loss * h_mask).sum(dim=2)  # [B, W] summed horizon NLL of each WC
    per_wc = summed / h_mask.sum(dim=2).clamp(min=1)
    wc_valid = F.pad(cand_valid, (2, 0), value=True)  # baseline and base always run
    train_loss = marginal_horizon_loss(summed, h_mask[:, 0].sum(dim=1), wc_valid)
    lm_mask = labelled ^ h_mask  # next-token loss on the raw positions before the horizon (lm_weight)
    lm_loss = (tok_loss * lm_mask).sum() / lm_mask.sum().clamp(min=1)

    # LensNet learns the utilities its bases' variants measured
    losses = per_wc.detach()
    utility = sign * (losses[:, 1:2] - losses[:, 2:])
    lens, rank_agree, sign_agree, top1 = lens_loss(
        scores, cand, cand_valid, utility, plan.editable, cfg.lens_listwise
    )

    loss = train_loss + cfg.lens_weight * lens
    if cfg.lm_weight > 0:
        loss = loss + cfg.lm_weight * lm_loss
    full_loss = loss.new_zeros(())
    if full_positions:  # the vanilla objective on the same rows (MCConfig.full_weight)
        # a mean over the labelled tokens; 0, not 0/0, for a micro-batch of chat rows with none
        full_loss = nll[B * W * L :].sum() / (targets >= 0).sum().clamp(min=1)
        loss = loss + cfg.full_weight * full_loss
    measured = cand_valid.sum()
    agreement = torch.stack([rank_agree, sign_agree, top1]).nanmean(dim=1)  # per-row figures, nan = none
    metrics = {
        "mc/token_loss": (per_wc.detach() * wc_valid).sum() / wc_valid.sum(),
        "mc/lm_loss": lm_loss.detach(),
        "mc/baseline_loss": losses[:, 0].mean(),
        "mc/adv_delta_mean": (utility * cand_valid).sum() / measured.clamp(min=1),
        "mc/lens_loss": lens.detach(),
        "mc/full_loss": full_loss.detach(),
        "mc/lens_rank_agreement": agreement[0],
        "mc/preference_agreement": agreement[1],
        "mc/lens_top1": agreement[2],
        "mc/swap_rate": plan.candidates / max(1, plan.base_entries),
        "mc/residency": plan.residency,
        "mc/wc_budget": float(plan.budget),
        "mc/time_controller_ms": plan.plan_ms,
        "mc/gpt_positions": float(B * W * L + full_positions),
    }
    return loss, metrics


def accumulate_metrics(sums: dict, counts: dict, metrics: dict) -> None:
    """Add one micro-batch's metrics into running sums, without reading a device value: a nan (nothing
    measured) counts as absent. Floats and 0-dim tensors alike."""
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().float()
            ok = ~v.isnan()
            sums[k] = sums.get(k, 0.0) + torch.where(ok, v, 0.0)
            counts[k] = counts.get(k, 0) + ok.to(torch.int64)
        else:
            ok = not math.isnan(v)
            sums[k] = sums.get(k, 0.0) + (v if ok else 0.0)
            counts[k] = counts.get(k, 0) + int(ok)


def mean_metrics(sums: dict, counts: dict) -> dict[str, float]:
    """The per-metric means as floats (nan where no micro-batch measured it), read from the device in one go:
    call at the log line, once per optimizer step."""
    keys = list(sums)
    if not keys:
        return {}
    dev = next((v.device for v in sums.values() if isinstance(v, torch.Tensor)), "cpu")
    s = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=dev) for k in keys])
    n = torch.stack([torch.as_tensor(counts[k], dtype=torch.float32, device=dev) for k in keys])
    means = torch.where(n > 0, s / n.clamp(min=1), torch.nan).tolist()
    return dict(zip(keys, means))
