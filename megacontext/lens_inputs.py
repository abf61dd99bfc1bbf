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


def batch_lens_inputs(
    bank: torch.Tensor,
    ids: torch.Tensor,
    entry_row: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    query_ids: torch.Tensor,
    lexical: bool,
    matching: bool,
    partial: bool = False,
):
    """What LensNet sees of B working contexts' entries, from the rows' banks [B, R, d] (token embeddings
    first, T of them) and token ids [B, T]: (embeds [B, N, d], lex [B, N, d] or None, match [B, N, Q] or None).

    entry_row [B, N]: the bank row that stands for each entry (a gist; a complete raw block's LOD1 gist, what
    the lens would collapse it into), or -1 for the mean of its token embeddings (the newest, incomplete
    block, only with partial=True: training rows have none); start / end [B, N]: its span. `lex` is the mean token embedding of every entry's span, `match` 1
    where query token q [B, Q] occurs in the span: one prefix sum over the row, read at the spans' ends.
    Padding entries may hold any in-range values (LensNet masks them)."""
    B, T = ids.shape
    d = bank.shape[-1]
    embeds = bank.gather(1, entry_row.clamp(min=0)[..., None].expand(-1, -1, d))
    lex = None
    if lexical or partial:
        csum = torch.cat([bank.new_zeros(B, 1, d), bank[:, :T].cumsum(dim=1)], dim=1)
        at = lambda p: csum.gather(1, p[..., None].expand(-1, -1, d))  # noqa: E731
        lex = (at(end) - at(start)) / (end - start).clamp(min=1)[..., None].to(bank.dtype)
        if partial:
            embeds = torch.where(entry_row[..., None] < 0, lex, embeds)
    match = None
    if matching:
        Q = query_ids.shape[1]
        hits = (ids[:, :, None] == query_ids[:, None, :]).long()
        csum = torch.cat([hits.new_zeros(B, 1, Q), hits.cumsum(dim=1)], dim=1)
        at = lambda p: csum.gather(1, p[..., None].expand(-1, -1, Q))  # noqa: E731
        match = ((at(end) - at(start)) > 0).float()
    return embeds, (lex if lexical else None), match


def _entry_tensors(entries, offsets: list[int], K: int, T: int, device):
    """(bank row, start, end) [1, N] per entry for batch_lens_inputs from a training row's bank layout, and
    whether any entry is an incomplete block (bank row -1: the mean of its tokens)."""
    rows = []
    for e in entries:
        if e.level >= 1:
            rows.append(offsets[e.level] + e.start // K**e.level)
        elif e.size == K and len(offsets) > 1 and e.end <= T:
            rows.append(offsets[1] + e.start // K)
        else:
            rows.append(-1)
    t = lambda v: torch.tensor([v], dtype=torch.long, device=device)  # noqa: E731
    return t(rows), t([e.start for e in entries]), t([e.end for e in entries]), min(rows, default=0) < 0


def lens_inputs(entries: tuple[Entry, ...], bank: torch.Tensor, offsets: list[int], K: int, lexical: bool):
    """Per-entry (embeds [N, d], lod, lex [N, d] or None) for LensNet from ONE training row's bank [R, d]:
    batch_lens_inputs for a single working context (what the training step runs, for tests and tools)."""
    T = offsets[1] if len(offsets) > 1 else bank.shape[0]
    row, start, end, partial = _entry_tensors(entries, offsets, K, T, bank.device)
    ids = torch.zeros(1, T, dtype=torch.long, device=bank.device)
    emb, lex, _ = batch_lens_inputs(bank[None], ids, row, start, end, ids[:, :1], lexical, False, partial)
    return emb[0], [e.level for e in entries], None if lex is None else lex[0]


def row_entry_match(entries, ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """match [N, Q] (float 0/1) from ONE training row's token ids [T]: does query token q occur in entry n's
    span? batch_lens_inputs for a single working context."""
    T = ids.shape[0]
    start = torch.tensor([[e.start for e in entries]], dtype=torch.long, device=ids.device)
    end = torch.tensor([[e.end for e in entries]], dtype=torch.long, device=ids.device)
    bank = torch.zeros(1, T, 1, device=ids.device)
    return batch_lens_inputs(
        bank, ids[None], torch.zeros_like(start), start, end, query_ids[None], False, True
    )[2][0]


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
def tree_lens_scores(lensnet, contexts, tree, embed, query_ids, device, cache) -> list[torch.Tensor]:
    """LensNet's score per entry of each working context in `contexts` (lists of entries) read from a tree,
    against the query tokens (the K newest tokens of the history, as in training): one padded LensNet call for
    all of them (a refocus scores its WC and the look-ahead's what-if WCs together). `cache` keeps per-node
    span means and token sets across refocuses (nodes never change once complete)."""
    K, B = tree.K, len(contexts)
    n = [len(entries) for entries in contexts]
    N = max(n)
    query_ids = query_ids.to(device)
    q_emb = embed(query_ids)
    dtype = q_emb.dtype
    lexical, matching = lensnet.lex is not None, lensnet.match is not None
    rows = torch.zeros(B, N, tree.d, device=device)
    lod = torch.zeros(B, N, dtype=torch.long, device=device)
    lex = torch.zeros(B, N, tree.d, device=device) if lexical else None
    match = torch.zeros(B, N, K, device=device) if matching else None
    hits: dict = {}  # node -> its match row: the contexts of one refocus share most entries
    for b, entries in enumerate(contexts):
        r, levels, x = tree_entry_inputs(entries, tree, embed, device, lexical, cache)
        rows[b, : n[b]] = r
        lod[b, : n[b]] = torch.tensor(levels, device=device)
        if lexical:
            lex[b, : n[b]] = x
        if matching:
            match[b, : n[b]] = tree_entry_match(entries, tree, query_ids, device, cache, hits)
    # lens_positions for every context at once: entry i at i (sigma 0), the query right after its last entry
    mu = torch.arange(N, device=device, dtype=torch.float32).expand(B, N)
    q_pos = torch.tensor(n, device=device, dtype=torch.float32)[:, None] + torch.arange(K, device=device)
    mask = None
    if min(n) < N:
        mask = torch.arange(N, device=device)[None, :] < torch.tensor(n, device=device)[:, None]
    scores = lensnet(
        rows.to(dtype), lod, mu, torch.zeros_like(mu), q_emb.expand(B, -1, -1), q_pos, entry_mask=mask,
        entry_lex=None if lex is None else lex.to(dtype), entry_match=None if match is None else match.to(dtype),
    )  # fmt: skip
    return [scores[b, : n[b]] for b in range(B)]


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
    entries, tree, query_ids: torch.Tensor, device, cache: dict | None = None, hits: dict | None = None
) -> torch.Tensor:
    """match [N, Q] read from a tree, as row_entry_match builds it from a training row. `hits` (optional)
    keeps each complete node's row for this query (scoring several contexts against one query)."""
    cache = {} if cache is None else cache
    hits = {} if hits is None else hits

    def row(e) -> torch.Tensor:
        node = _complete_node(e, tree)  # None: the newest, still-growing block, never kept
        if node in hits:
            return hits[node]
        out = torch.isin(query_ids, _span_ids(e, tree, device, cache))
        if node is not None:
            hits[node] = out
        return out

    return torch.stack([row(e) for e in entries]).float()


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
    cached per complete node under (kind, level, index); the newest, still-growing block is never cached, nor
    are the LOD1 blocks read only to summarise a coarser entry (a 1M-token history has 62,500 of them)."""
    node = _complete_node(e, tree)
    if node is None:
        return of_tokens(tree.tokens(e.start, e.end, device=device))

    def summary(level: int, index: int, keep: bool):
        key = (kind, level, index)
        if key in cache:
            return cache[key]
        K = tree.K
        if level == 1:
            out = of_tokens(tree.tokens(index * K, (index + 1) * K, device=device))
        else:
            out = of_children([summary(level - 1, index * K + j, False) for j in range(K)])
        if keep or level >= 2:  # a coarse entry's LOD1 blocks are read once, not kept: ~1 / K of the nodes
            cache[key] = out
        return out

    return summary(*node, True)
