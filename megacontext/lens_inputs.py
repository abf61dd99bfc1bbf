"""What LensNet sees of a working context: built from a training row's bank (training) or read from a tree
(evaluation views, chat session). The two builders must agree exactly (tests/test_views.py), or the lens is
evaluated on inputs it was never trained on.

Per entry: a vector (a gist, or a raw block's LOD1 gist), its LOD, its span's position; with a lexical lens
also the mean token embedding of its span (`lex`); with a matching lens also `match` [N, Q]: 1 where query
token q occurs anywhere in the entry's span. The match is exact token identity: the question names the lock,
the key or the variable, and the evidence holds the same tokens, which a mean embedding dilutes 16-fold (one
LOD1 block) or 256-fold (LOD2). A refocus reads at most budget entries, each a cached token set, so its cost
does not grow with the history.
"""

from __future__ import annotations

import torch

from megacontext.entries import Entry


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


@torch.no_grad()
def tree_lens_scores(lensnet, entries, tree, embed, query_ids, device, cache):
    """LensNet's score per entry read from a tree, against the query tokens (the K newest tokens of the
    history, as in training). `cache` keeps per-node span means and token sets across refocuses (nodes never change
    once complete)."""
    K = tree.K
    rows, lod, lex = tree_entry_inputs(entries, tree, embed, device, lensnet.lex is not None, cache)
    match = None
    if lensnet.match is not None:
        match = tree_entry_match(entries, tree, query_ids.to(device), device, cache)
    mu, sigma, q_pos = lens_positions(len(entries), K)
    q_emb = embed(query_ids.to(device))
    dtype = q_emb.dtype
    lex = None if lex is None else lex.to(dtype)
    match = None if match is None else match.to(dtype)
    return run_lens(lensnet, rows.to(dtype), lod, mu, sigma, q_emb, q_pos, lex=lex, match=match)


@torch.no_grad()
def tree_entry_inputs(entries, tree, embed, device, lexical: bool, cache: dict | None = None):
    """What LensNet sees of working-context entries read from a tree, as lens_inputs builds it from a
    training row: (rows [N, d], lod, lex [N, d] or None).

    A gist is its stored embedding; a complete raw block its LOD1 gist; the incomplete newest block the mean
    of its token embeddings. `lex` (lexical lens) is the mean token embedding of each entry's span; a complete
    node's mean is the mean of its children's, kept in `cache`, so each node is read once and a refocus costs
    O(entries), not O(history)."""
    K = tree.K
    rows = torch.empty(len(entries), tree.d, device=device)
    by_level: dict[int, list[tuple[int, int]]] = {}
    for i, e in enumerate(entries):
        if e.level >= 1 or (e.size == K and tree.num_nodes(1) > e.start // K):
            by_level.setdefault(max(e.level, 1), []).append((i, e.start // K ** max(e.level, 1)))
        else:  # the newest, incomplete block
            rows[i] = embed(tree.tokens(e.start, e.end, device=device)).float().mean(dim=0)
    for level, pairs in by_level.items():
        at = torch.tensor([i for i, _ in pairs], device=device)
        rows[at] = tree.gists(level, [j for _, j in pairs], device=device).float()
    lex = None
    if lexical:
        cache = {} if cache is None else cache
        lex = torch.stack([_span_mean(e, tree, embed, device, cache) for e in entries])
    return rows, [e.level for e in entries], lex


@torch.no_grad()
def tree_entry_match(
    entries, tree, query_ids: torch.Tensor, device, cache: dict | None = None
) -> torch.Tensor:
    """match [N, Q] read from a tree, as row_entry_match builds it from a training row."""
    cache = {} if cache is None else cache
    return torch.stack([torch.isin(query_ids, _span_ids(e, tree, device, cache)) for e in entries]).float()


def _complete_node(e, tree) -> tuple[int, int] | None:
    """(level, index) of the complete node an entry covers, or None for the newest, still-growing block."""
    K = tree.K
    if e.level == 0 and e.size < K:
        return None
    level = max(e.level, 1)
    return level, e.start // K**level


def _span_mean(e, tree, embed, device, cache: dict) -> torch.Tensor:
    mean = lambda ids: embed(ids).float().mean(dim=0)  # noqa: E731
    return _span_summary(e, tree, device, cache, "mean", mean, lambda kids: torch.stack(kids).mean(dim=0))


def _span_ids(e, tree, device, cache: dict) -> torch.Tensor:
    """The distinct token ids of an entry's span (at most min(K^level, vocab) of them)."""
    unique = lambda ids: ids.unique()  # noqa: E731
    return _span_summary(e, tree, device, cache, "ids", unique, lambda kids: torch.cat(kids).unique())


def _span_summary(e, tree, device, cache: dict, kind: str, of_tokens, of_children):
    """A summary of an entry's span: of_tokens(ids) for a LOD1 block, of_children(children's summaries) above,
    cached per complete node under (kind, level, index); the newest, still-growing block is never cached."""
    node = _complete_node(e, tree)
    if node is None:
        return of_tokens(tree.tokens(e.start, e.end, device=device))

    def summary(level: int, index: int):
        key = (kind, level, index)
        if key not in cache:
            K = tree.K
            if level == 1:
                cache[key] = of_tokens(tree.tokens(index * K, (index + 1) * K, device=device))
            else:
                cache[key] = of_children([summary(level - 1, index * K + j) for j in range(K)])
        return cache[key]

    return summary(*node)
