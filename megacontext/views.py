"""Five views of the same history, for evaluation (docs/design.md §4, validation).

* full      — every token raw (when it fits the model's rotary table);
* window    — only the most recent W_max tokens, raw;
* mc-nolens — the tree + a working context built by the allocator without a lens: old history as the
              coarsest gists, never re-expanded (what a gist alone carries);
* mc-attn   — the allocator refocusing on the GPT's own attention mass from the query tokens to each entry
              (no learned scorer; the way NSA / Landmark attention choose blocks);
* mc-lens   — the chat session itself (MCSession): ingest the history, let the focus settle, then predict
              (teacher-forced through the session, which for exact match is what greedy decoding answers), so
              the figure is what a chat user gets;
* mc-oracle — (diagnostic, tasks with a known evidence span only) mc-nolens with the blocks holding the
              evidence raw: what a perfect scorer could give with this GistNet, GPT and positions. If
              mc-oracle answers and mc-lens does not, the scorer/allocator limits; if full answers and mc-oracle
              does not, the GPT cannot read raw evidence inside a working context.

Every view scores the same *horizon*: the last `h` input positions, whose targets are the tokens to predict
(the answer of a long-context task, or the tail of a validation document). The working context keeps the
horizon and the K query tokens before it raw, exactly as in training (megacontext.training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megacontext.allocator import FocusAllocator, lookahead_scores, normalize_scores
from megacontext.config import MCConfig
from megacontext.entries import InvariantError
from megacontext.focus import LevelCap, settle
from megacontext.positional import gaussian_rotary
from megacontext.session import MCSession
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, coarse_tiling, raw_blocks, widest_raw_tail
from nanochat.gpt import apply_rotary_emb, norm

VIEWS = ("full", "window", "mc-nolens", "mc-attn", "mc-lens")
ORACLE = "mc-oracle"


def eval_recent(cfg: MCConfig, h: int) -> int:
    """Raw protection for evaluation: the horizon plus the K query tokens, rounded up to whole blocks."""
    K = cfg.block_size
    need = max(cfg.recent, h + K)
    return -(-need // K) * K


@torch.no_grad()
def build_tree(ids: list[int], model, gistnet, cfg: MCConfig, device) -> LevelCap:
    """An in-RAM tree of `ids` with every complete gist made by GistNet, capped at the trained levels."""
    tree = MegaContextTree.in_memory(cfg.block_size, model.config.n_embd)
    tree.append(ids)
    tree.gist_pending(embed=model.wte, gist=gistnet, device=device)
    # Use the trained levels; go coarser only when the history is too long for them to fit the budget.
    cap = cfg.wc_levels
    while cap < tree.max_level and not fits(LevelCap(tree, cap), cfg.wc_budget, cfg.recent):
        cap += 1
    return LevelCap(tree, cap)


def fits(tree, budget: int, recent: int) -> bool:
    try:
        WorkingContext.coarsest(tree, budget, recent)
        return True
    except InvariantError:
        return False


def gpt_inputs(wc: WorkingContext, tree, model, cfg: MCConfig, device):
    """Embeddings and rotary phases of a working context, its slots numbered 0..L-1 as in training."""
    t = wc.materialize(tree, model.wte, device)
    L = t.embeds.shape[0]
    cos, sin = gaussian_rotary(
        torch.arange(L, dtype=torch.float32, device=device)[None], 0.0, model.config.head_dim
    )
    return t.embeds[None].to(model.wte.weight.dtype), (cos, sin)


@torch.no_grad()
def attention_scores(wc: WorkingContext, tree, model, cfg: MCConfig, q_slots: int, device):
    """Scores from the GPT's own attention: mass from the query slots to each entry, averaged over layers and
    heads (the allocator sees them normalised like LensNet's)."""
    embeds, (cos, sin) = gpt_inputs(wc, tree, model, cfg, device)
    L = embeds.shape[1]
    mass = torch.zeros(L, device=device)
    hooks = []

    def capture(module, args):
        x, c, s = args[0], args[1], args[2]
        B, T, _ = x.shape
        q = module.c_q(x).view(B, T, module.n_head, module.head_dim)
        k = module.c_k(x).view(B, T, module.n_kv_head, module.head_dim)
        q, k = apply_rotary_emb(norm(q), c, s), apply_rotary_emb(norm(k), c, s)
        k = k.repeat_interleave(module.n_head // module.n_kv_head, dim=2)
        qs = q[0, T - q_slots - 1 : T - 1].transpose(0, 1)  # [H, Q, D]: the query tokens before the horizon
        att = qs @ k[0].permute(1, 2, 0) / module.head_dim**0.5  # [H, Q, T]
        rows = torch.arange(T - q_slots - 1, T - 1, device=x.device)
        att = att.masked_fill(torch.arange(T, device=x.device)[None, :] > rows[:, None], float("-inf"))
        mass.add_(att.softmax(dim=-1).mean(dim=(0, 1)))

    for block in model.blocks:
        hooks.append(block.attn.register_forward_pre_hook(capture))
    try:
        model(embeds=embeds, rotary=(cos, sin))
    finally:
        for hk in hooks:
            hk.remove()
    t = wc.materialize(tree, lambda ids: torch.zeros(ids.shape[0], tree.d, device=device), device)
    return torch.zeros(wc.num_entries, device=device).index_add_(0, t.entry_index, mass)


def oracle_wc(tree, budget: int, recent: int, evidence: tuple[int, int]) -> WorkingContext | None:
    """The coarsest WC with the K-blocks holding tokens [evidence) raw, then as many raw recent blocks as the
    budget allows (as WorkingContext.from_tree); None when the evidence blocks alone do not fit."""
    K, N = tree.K, tree.num_tokens
    base = WorkingContext.coarsest(tree, budget, recent)
    raw_start = next((e.start for e in base.entries if e.level == 0), N)
    a, b = evidence[0] // K * K, min(raw_start, -(-evidence[1] // K) * K)
    if a >= b:  # the evidence is raw already
        return WorkingContext.from_tree(tree, budget, recent)

    def tiling(rs: int) -> list:
        return (
            coarse_tiling(tree, 0, a)
            + raw_blocks(a, b, K)
            + coarse_tiling(tree, b, rs)
            + raw_blocks(rs, N, K)
        )

    if sum(e.cost for e in tiling(raw_start)) > budget:
        return None
    wc = WorkingContext(widest_raw_tail(tiling, raw_start, b, K, budget), K, budget, recent)
    wc.check(tree)
    return wc


def attention_focus(tree, model, cfg: MCConfig, budget: int, recent: int, device):
    """mc-attn: the working context the allocator settles on when the GPT's own attention mass scores the
    entries (the loop the session runs with LensNet: focus.settle), and the number of edits made."""
    state = {"wc": WorkingContext.from_tree(tree, budget, recent)}
    alloc = FocusAllocator(
        cfg.block_size,
        budget,
        recent,
        cfg.tau_expand,
        cfg.tau_collapse,
        cfg.n_diff,
        cfg.cooldown,
        flank=cfg.flank,
    )
    score_fn = lambda w: attention_scores(w, tree, model, cfg, cfg.block_size, device)  # noqa: E731

    def refocus() -> list:
        wc = state["wc"]
        scores = lookahead_scores(wc, tree, score_fn) if cfg.lookahead else score_fn(wc)
        state["wc"], edits = alloc.refocus(wc, normalize_scores(scores).tolist(), tree)
        return edits

    n_edits = settle(refocus, cfg.cooldown)
    return state["wc"], n_edits


@torch.no_grad()
def session_logits(ids: list[int], h: int, model, gistnet, lensnet, cfg: MCConfig, device):
    """mc-lens: logits [h, V] at the last h input positions of `ids` through the chat session. The session
    ingests the history up to the first predicted position (its focus settles there, as after a user's
    prompt), then each later input token arrives as a generated one would (refocusing at block boundaries)."""
    inputs = ids[:-1]
    n = len(inputs)
    session = MCSession(
        model, None, gistnet, lensnet, cfg, device=device, model_id="view"
    )  # no fingerprint: an in-RAM tree
    edits = session.ingest(inputs[: n - h + 1])
    info = {"wc_size": session.wc.cost, "edits": edits, "render": session.wc.render(), "wc": session.wc}
    out = [session.logits()]
    for token in inputs[n - h + 1 :]:
        session.push(token)
        out.append(session.logits())
    return torch.stack(out), info


@torch.no_grad()
def horizon_logits(
    view: str,
    ids: list[int],
    h: int,
    model,
    gistnet,
    lensnet,
    cfg: MCConfig,
    device,
    tree=None,
    evidence: tuple[int, int] | None = None,
):
    """Logits [h, V] at the last h input positions of `ids` (inputs = ids[:-1]) under a view, plus info.

    Returns None for `full` when the history does not fit the rotary table, and for mc-oracle without an
    `evidence` token span or when its blocks do not fit the budget. `tree` may be passed in to share one
    GistNet pass among the mc views.
    """
    inputs = ids[:-1]
    info = {"wc_size": None, "edits": 0}
    # the horizon (and, for the mc views, its query) must fit the budget, or the view cannot score it; the
    # window view needs only the horizon: a model without MC nets scores it at any budget above h
    room = h < cfg.wc_budget if view == "window" else eval_recent(cfg, h) <= cfg.wc_budget
    if view != "full" and not room:
        return None, info
    if view == "mc-lens":
        return session_logits(ids, h, model, gistnet, lensnet, cfg, device)
    if view in ("full", "window"):
        span = inputs if view == "full" else inputs[-cfg.wc_budget :]
        if len(span) > model.rotary_len:
            return None, info
        x = torch.tensor(span, dtype=torch.long, device=device)[None]
        info["wc_size"] = len(span)
        return model(idx=x)[0, -h:], info
    recent = eval_recent(cfg, h)
    tree = tree if tree is not None else build_tree(inputs, model, gistnet, cfg, device)
    while tree.cap < tree.tree.max_level and not fits(tree, cfg.wc_budget, recent):
        tree.cap += 1  # a long answer keeps more raw than cfg.recent: the history must go coarser to fit
    if not fits(tree, cfg.wc_budget, recent):
        return None, info  # not even the coarsest gists leave room for the raw answer: the view cannot score
    if view == ORACLE:
        wc = oracle_wc(tree, cfg.wc_budget, recent, evidence) if evidence is not None else None
        if wc is None:
            return None, info
    else:
        wc, info["edits"] = (
            (WorkingContext.from_tree(tree, cfg.wc_budget, recent), 0)
            if view == "mc-nolens"
            else attention_focus(tree, model, cfg, cfg.wc_budget, recent, device)
        )
    embeds, rotary = gpt_inputs(wc, tree, model, cfg, device)
    info["wc_size"] = embeds.shape[1]
    info["render"], info["wc"] = wc.render(), wc
    return model(embeds=embeds, rotary=rotary)[0, -h:], info


def val_rows(tokenizer, length: int, n: int, device) -> list[list[int]]:
    """Up to n validation rows of `length` + 1 token ids for view_bpb. Use the training length: the full
    view is then the in-distribution reference (beyond it a wc_index model meets positions it never saw,
    and full scored worse than the window), while the history is still sequence_len / W_max times the
    working context."""
    from nanochat.common import UserError
    from nanochat.dataloader import DataLoader

    loader = DataLoader(tokenizer, 1, length, "val", device)
    rows = []
    for _ in range(n):
        try:
            x, y = next(loader)
        except (StopIteration, UserError):
            break
        rows.append(torch.cat([x[0], y[0, -1:]]).tolist())
    return rows


def horizon_nll(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Per-token NLL [h] of the true next tokens."""
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=logits.device), reduction="none")


@torch.no_grad()
def view_bpb(rows, h: int, model, gistnet, lensnet, cfg: MCConfig, token_bytes, device, views=VIEWS) -> dict:
    """Bits per byte of the last h tokens of each row (a list of token-id lists) under each view, plus
    ΔNLL@H (nats per token) of each view vs full. A view that cannot run (full beyond the rotary table, or
    the mc views without GistNet) is left out."""
    nll = {v: 0.0 for v in views}
    nbytes = {v: 0 for v in views}
    ntok = {v: 0 for v in views}
    for ids in rows:
        targets = ids[-h:]
        tb = token_bytes[torch.tensor(targets, device=token_bytes.device)].to(device)
        tree = build_tree(ids[:-1], model, gistnet, cfg, device) if gistnet is not None else None
        for v in views:
            if v.startswith("mc") and gistnet is None:
                continue
            logits, _ = horizon_logits(v, ids, h, model, gistnet, lensnet, cfg, device, tree=tree)
            if logits is None:
                continue
            per_tok = horizon_nll(logits, targets)
            keep = tb > 0
            nll[v] += float(per_tok[keep].sum())
            nbytes[v] += int(tb[keep].sum())
            ntok[v] += int(keep.sum())
    out = {}
    for v in views:
        if nbytes[v]:
            out[f"bpb/{v}"] = nll[v] / nbytes[v] / math.log(2)
            out[f"nll/{v}"] = nll[v] / ntok[v]
    if "nll/full" in out:
        for v in views:
            if f"nll/{v}" in out and v != "full":
                out[f"dnll/{v}"] = out[f"nll/{v}"] - out["nll/full"]
    return out
