"""The MegaContext training step as it was before it was vectorised (megacontext/training.py, plans.py and
lens_inputs.py at that time), frozen here as the reference the rewritten step must equal: the same loss and
the same gradient for every parameter (tests/test_mc_step_speed.py). It plans each row in Python, runs LensNet
once per row and loops over rows for the losses; do not "fix" it, it is the specification.
"""
# ruff: noqa: E501

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megacontext.allocator import random_variant
from megacontext.config import MCConfig
from megacontext.entries import Edit, Entry
from megacontext.positional import gaussian_rotary
from megacontext.working_context import WorkingContext

COPY_NGRAM = 3
UTILITY_SCALE = 0.05
TOP_MARGIN = 0.05
LOGIT_L2 = 0.01


class SequenceShape:
    """The structure of a training row's tree (which nodes exist), without any vectors.

    Working contexts and the allocator only ask a tree how many nodes each level has; in training all of a
    row's gists are computed at once into the bank, so this stands in for a MegaContextTree.
    """

    def __init__(self, K: int, num_tokens: int, max_level: int):
        self.K, self.num_tokens = K, num_tokens
        self.levels = [num_tokens] + [num_tokens // K**lvl for lvl in range(1, max_level + 1)]
        self.max_level = max(lvl for lvl, n in enumerate(self.levels) if lvl == 0 or n > 0)

    def num_nodes(self, level: int) -> int:
        return self.levels[level] if level < len(self.levels) else 0


@dataclass
class RowPlan:
    """The working contexts of one row: index 0 = baseline, 1 = base, 2 + j = the one-edit variant of
    candidate j (an expand of a gist, or a collapse of a complete raw block into its LOD1 gist)."""

    wcs: list[WorkingContext]
    candidates: list[int]  # index into base.entries of the entry edited by variant 2 + j
    expands: list[bool]  # True: variant 2 + j expands that gist; False: it collapses that raw block
    editable: list[int]  # every entry of the base a one-edit variant could have edited (sorted)


def copy_hints(row: list[int], horizon_start: int, before: int, K: int, limit: int, n: int = COPY_NGRAM):
    """LOD1 block indices (at most `limit`, most matches first) of the tokens before position `before` that
    hold an earlier occurrence of an n-gram of the horizon (its inputs and true next tokens).

    Where a horizon repeats something older (a pass key, a value, a listed code, an identifier in code), the
    block holding the first mention is the likeliest one whose detail pays. The hints only choose which
    experiments a row runs (which gists the base zooms to LOD1 and which variants expand them): utilities are
    still measured, and neither the GPT nor LensNet ever sees the horizon's tokens before predicting them.
    """
    tail = row[max(0, horizon_start - n + 1) :]
    grams = {tuple(tail[i : i + n]) for i in range(len(tail) - n + 1)}
    counts: dict[int, int] = {}
    for p in range(max(0, before - n + 1)):
        if tuple(row[p : p + n]) in grams:
            counts[p // K] = counts.get(p // K, 0) + 1
    return sorted(counts, key=lambda b: (-counts[b], -b))[:limit]


def plan_row(
    shape: SequenceShape,
    cfg: MCConfig,
    budget: int,
    recent: int,
    rng: random.Random,
    hints: list[int] = (),
    score: Callable[[WorkingContext], torch.Tensor] | None = None,
) -> RowPlan:
    """Baseline, a random base with room for one more swap, and up to N distinct one-edit variants.

    Candidates mix both directions so LensNet sees the value of detail everywhere: expanding a gist (what
    the allocator would spend budget on) and collapsing a raw block (what it would refund budget from).
    With `hints` (copy_hints: LOD1 block indices), the base first zooms those blocks' gists to LOD1 and their
    expansions are candidates first. With `score` (LensNet on the base) and cfg.lens_hints, the gists it
    scores highest come next: the allocator would open them, so their cost is measured too (hard
    negatives). The other candidates stay random.
    """
    K = cfg.block_size
    baseline = WorkingContext.from_tree(shape, budget, recent)
    base = random_variant(shape, budget - (K - 1), recent, rng, focus=[b * K for b in hints])
    base = WorkingContext(base.entries, K, budget, recent)
    editable = [
        i
        for i, e in enumerate(base.entries)
        if not base.is_protected(e)
        and (e.level >= 1 or e.size == K)
        and (e.level >= 1 or shape.max_level >= 1)
    ]
    rng.shuffle(editable)
    order = {b * K: j for j, b in enumerate(hints)}  # hinted LOD1 gists first, in the hints' order
    rank = [order.get(e.start, len(order)) if e.level == 1 else len(order) for e in base.entries]
    editable.sort(key=lambda i: rank[i])
    if score is not None and cfg.lens_hints:
        s = score(base).detach()
        n_hinted = sum(1 for i in editable if rank[i] < len(order))
        rest = editable[n_hinted:]
        top = sorted((i for i in rest if base.entries[i].level >= 1), key=lambda i: -float(s[i]))
        top = top[: cfg.lens_hints]
        editable = editable[:n_hinted] + top + [i for i in rest if i not in top]
    candidates = sorted(editable[: cfg.variants])
    variants, expands = [], []
    for i in candidates:
        e = base.entries[i]
        if e.level >= 1:
            variants.append(base.apply([Edit("expand", e.level, e.index(K))], shape))
        else:
            variants.append(base.apply([Edit("collapse", 1, e.start // K)], shape))
        expands.append(e.level >= 1)
    return RowPlan([baseline, base, *variants], candidates, expands, sorted(editable))


def row_rng(seed: int, row: torch.Tensor) -> random.Random:
    """A row's own random stream, keyed by the seed and the row's tokens, not by its place in the batch: the
    same row gets the same variants whichever rank or micro-batch it lands in (DDP = single process)."""
    return random.Random(f"{seed}:{zlib.crc32(row.detach().cpu().numpy().tobytes())}")


def lens_positions(n: int, K: int):
    """(entry mu, entry sigma, query positions) for LensNet, numbered like the GPT's working-context slots:
    entry i at position i with sigma 0, the K query tokens right after the last entry."""
    return [float(i) for i in range(n)], [0.0] * n, [float(n + j) for j in range(K)]


def lens_inputs(entries: tuple[Entry, ...], bank: torch.Tensor, offsets: list[int], K: int, lexical: bool):
    """Per-entry (embeds [N, d], lod, lex [N, d] or None) for LensNet from a training row's bank. A raw block
    is represented by its LOD1 gist when the block is complete (what the lens would collapse it into), else by
    the mean of its token embeddings; `lex` is the mean token embedding of every entry's span."""
    rows = []
    for e in entries:
        if e.level >= 1:
            rows.append(bank[offsets[e.level] + e.start // K**e.level])
        elif e.size == K and len(offsets) > 1:
            rows.append(bank[offsets[1] + e.start // K])
        else:
            rows.append(bank[e.start : e.end].mean(dim=0))
    lex = None
    if lexical:
        T = offsets[1] if len(offsets) > 1 else bank.shape[0]
        csum = torch.cat([bank.new_zeros(1, bank.shape[1]), bank[:T].cumsum(dim=0)])
        starts = torch.tensor([e.start for e in entries], device=bank.device)
        ends = torch.tensor([e.end for e in entries], device=bank.device)
        lex = (csum[ends] - csum[starts]) / (ends - starts)[:, None]
    return torch.stack(rows), [e.level for e in entries], lex


def row_entry_match(entries, ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """match [N, Q] (float 0/1) from a training row's token ids [T]: does query token q occur in entry n's
    span? One prefix count of the hits per query token, read at every span's ends."""
    hits = (ids[:, None] == query_ids[None, :]).long()
    csum = torch.cat([hits.new_zeros(1, hits.shape[1]), hits.cumsum(dim=0)])
    starts = torch.tensor([e.start for e in entries], device=ids.device)
    ends = torch.tensor([e.end for e in entries], device=ids.device)
    return ((csum[ends] - csum[starts]) > 0).float()


def run_lens(
    lensnet,
    embeds,
    lod,
    mu,
    sigma,
    query_embeds,
    query_pos,
    return_logits: bool = False,
    lex=None,
    match=None,
):
    """LensNet on one working context given as lists/tensors; returns scores [N] (or pre-tanh logits).
    `lex` [N, d] for a lexical LensNet, `match` [N, Q] for a matching one."""
    dev = embeds.device
    return lensnet(
        embeds[None],
        torch.tensor(lod, device=dev)[None],
        torch.tensor(mu, device=dev)[None],
        torch.tensor(sigma, device=dev)[None],
        query_embeds[None],
        torch.tensor(query_pos, device=dev)[None],
        return_logits=return_logits,
        entry_lex=None if lex is None else lex[None],
        entry_match=None if match is None else match[None],
    )[0]


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
