"""KV caches. SlotKVCache: the GPT's KV-cache protocol over WC slots; prefix matching, truncation at the first
edit, growth. MegaKVCache: per-level K/V for MegaAttention; the dirty set of an edit, and incremental refocus
equal to a forward of the whole packed sequence."""

from __future__ import annotations

import pytest
import torch

import megacontext.kv_cache as kv_cache
from megacontext.gistnet import GistNet
from megacontext.kv_cache import MegaKVCache, SlotKVCache, key_index, key_level, slot_key
from megacontext.mega_attention import build_mega_layout, edit_dirties, mega_forward, mega_mask, mega_rotary
from megacontext.positional import gaussian_rotary
from megacontext.zoom import ZoomAttention
from nanochat.gpt import GPT, GPTConfig, norm

D = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=D))
    m.init_weights()
    with torch.no_grad():
        for block in m.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)
        torch.nn.init.normal_(m.lm_head.weight, std=0.5)
    return m.eval()


def new_cache(model, capacity=8):
    c = model.config
    return SlotKVCache(c.n_layer, c.n_kv_head, c.head_dim, capacity=capacity)


def rotary(model, mu, sigma=None):
    sigma = torch.zeros_like(mu) if sigma is None else sigma
    return gaussian_rotary(mu[None], sigma[None], model.config.head_dim)


@torch.no_grad()
def full(model, x, mu, sigma):
    return model(embeds=x[None], rotary=rotary(model, mu, sigma))[0]


@torch.no_grad()
def step(model, cache, x, keys, mu, sigma):
    """Run slots [cache.pos, len(x)) through the cache (what the session does after match/truncate)."""
    a = cache.pos
    cache.stage(keys[a:], mu[a:], sigma[a:])
    return model(embeds=x[None, a:], rotary=rotary(model, mu[a:], sigma[a:]), kv_cache=cache)[0]


def test_slot_keys_round_trip():
    keys = slot_key(torch.tensor([0, 1, 3]), torch.tensor([123_456_789, 7, 2]))
    assert key_level(keys).tolist() == [0, 1, 3] and key_index(keys).tolist() == [123_456_789, 7, 2]
    assert len(set(keys.tolist())) == 3


def test_incremental_chunks_equal_one_full_forward_and_grow_past_capacity(model):
    torch.manual_seed(1)
    T = 29
    x, mu = torch.randn(T, D), torch.arange(T, dtype=torch.float32) * 3
    sigma = torch.rand(T) * 4  # gist-like widths: Gaussian RoPE goes through the cache too
    keys = torch.arange(T)
    ref = full(model, x, mu, sigma)
    cache = new_cache(model, capacity=4)
    outs, bounds = [], [0, 1, 9, 10, 23, T]
    for a, b in zip(bounds, bounds[1:]):
        assert cache.pos == a
        outs.append(step(model, cache, x[:b], keys[:b], mu[:b], sigma[:b]))
    torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-5, atol=1e-5)
    assert cache.pos == T and cache.kv.size(4) >= T
    torch.testing.assert_close(cache.positions()[0], mu)
    torch.testing.assert_close(cache.positions()[1], sigma)


def test_an_edit_truncates_at_the_first_changed_slot_and_the_suffix_recompute_is_exact(model):
    torch.manual_seed(2)
    T = 24
    x, mu, sigma = torch.randn(T, D), torch.arange(T, dtype=torch.float32), torch.zeros(T)
    keys = torch.arange(T)
    cache = new_cache(model)
    step(model, cache, x, keys, mu, sigma)
    # an edit replaces slots 10..13 by one gist: everything after shifts by 3 slots
    x2 = torch.cat([x[:10], torch.randn(1, D), x[14:], torch.randn(3, D)])
    keys2 = torch.cat([keys[:10], torch.tensor([slot_key(1, 2)]), keys[14:], torch.arange(100, 103)])
    assert cache.match(keys2) == 10
    assert cache.match(keys[:5]) == 5 and cache.match(torch.cat([keys, torch.arange(50, 60)])) == T
    cache.truncate(cache.match(keys2))
    out = step(model, cache, x2, keys2, mu, sigma)
    torch.testing.assert_close(out, full(model, x2, mu, sigma)[10:], rtol=1e-5, atol=1e-5)
    assert cache.pos == T and cache.keys[:T].tolist() == keys2.tolist()


def test_protocol_misuse_is_refused(model):
    cache = new_cache(model)
    x, mu = torch.randn(3, D), torch.arange(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="stage"):
        with torch.no_grad():
            model(embeds=x[None], rotary=rotary(model, mu), kv_cache=cache)  # no keys staged
    assert cache.pos == 0
    cache.stage(torch.arange(3))
    with torch.no_grad():
        model(embeds=x[None], rotary=rotary(model, mu), kv_cache=cache)
    assert cache.pos == 3
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="does not fit"):
        cache.insert_kv(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    cache.reset()
    assert cache.pos == 0 and cache.match(torch.arange(3)) == 0


# -----------------------------------------------------------------------------
# MegaKVCache

K, W, L = 4, 6, 2  # with N ~ 70: 17 wLOD1 and 4 wLOD2 nodes, raw window shorter than two blocks


@pytest.fixture(scope="module")
def gistnet():
    torch.manual_seed(3)
    g = GistNet(d_model=D, n_head=2, n_layer=1, block_size=K)
    with torch.no_grad():  # off the identity init, so a node is not just its block's mean
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


class Recorder:
    """The GPT's KV protocol for one forward of the whole sequence: keeps every layer's K/V."""

    def __init__(self):
        self.kv = {}

    def get_pos(self):
        return 0

    def insert_kv(self, layer_idx, k, v):
        self.kv[layer_idx] = (k, v)
        return k, v

    def advance(self, T):
        pass


@torch.no_grad()
def reference(model, gistnet, ids, overrides, levels=L, zoom_k=0, reach=None):
    """Full recompute: the whole packed sequence in one forward under mega_mask (with zoom_k: the zoom's dense
    reference). Nodes are GistNet of their children, bottom-up, except the re-summarised ones in `overrides`
    {(level, index): embed}.
    Returns (per-layer K/V, logits [T, V] of every packed element)."""
    lay = build_mega_layout(len(ids), K, W, levels)
    per_level = [model.wte(ids)]
    for lv in range(1, levels + 1):
        n = lay.counts[lv]
        nodes = gistnet(per_level[-1][: n * K].view(n, K, D), lv) if n else torch.zeros(0, D)
        for (ol, j), embed in overrides.items():
            if ol == lv:
                nodes[j] = embed
        per_level.append(nodes)
    rec = Recorder()
    rotary = mega_rotary(lay, model.config.head_dim)
    zoom = ZoomAttention(lay, zoom_k, "cpu", "dense", reach=reach) if zoom_k else None
    mask = None if zoom else mega_mask(lay)[None, None]
    logits = model(
        embeds=torch.cat(per_level)[None], rotary=rotary, kv_cache=rec, attn_mask=mask, attn_fn=zoom
    )
    return rec.kv, logits[0]


def drop_ancestor_overrides(overrides, level, index):
    """An edit re-summarises the ancestors of what it changed: their earlier overrides are gone."""
    for ol, j in list(overrides):
        if ol > level and j == index * K**level // K**ol:
            del overrides[(ol, j)]


def assert_matches_reference(cache, model, gistnet, ids, overrides, logits):
    kv_ref, logits_ref = reference(model, gistnet, ids, overrides, zoom_k=cache.zoom_k, reach=cache.reach)
    for layer in range(model.config.n_layer):
        k, v = cache.packed_kv(layer)
        torch.testing.assert_close(k, kv_ref[layer][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, kv_ref[layer][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_ref[len(ids) - 1], rtol=1e-5, atol=1e-5)
    assert not any(bool(d.any()) for d in cache.dirty())


@pytest.mark.parametrize(
    "seed,zoom_k,reach", [(0, 0, None), (1, 0, None), (2, 0, None), (3, 2, None), (4, 3, None), (5, 3, 20.0)]
)
def test_incremental_refocus_equals_full_recompute_over_random_edits(model, gistnet, seed, zoom_k, reach):
    """With the zoom too: its raw rows read any complete chunk, yet the dirty sets stay those of the pyramid (a
    chunk's tokens are seen from the same anchor on as its node, and each such anchor is dirtied by a raw edit
    anyway), and every read comes from the cache's K/V of that layer; with a reach (pyramid pairs farther apart
    read at it) as well."""
    g = torch.Generator().manual_seed(seed)
    rint = lambda hi: int(torch.randint(hi, (1,), generator=g))
    ids = torch.randint(0, 50, (70,), generator=g)
    overrides = {}
    cache = MegaKVCache(model, gistnet, K, W, L, capacity=16, zoom_k=zoom_k, reach=reach)  # small: growth too
    cache.append(ids)
    assert_matches_reference(cache, model, gistnet, ids, overrides, cache.refresh())
    kinds = ["token", "token", "node", "append", "early"] * 3
    for step, kind in enumerate(kinds):
        if kind in ("token", "early"):  # raw tokens replaced at a random depth (early: near the start)
            n = 1 + rint(3)
            start = rint(3) if kind == "early" else len(ids) - n - rint(len(ids) - n + 1)
            new = torch.randint(0, 50, (n,), generator=g)
            ids = ids.clone()
            ids[start : start + n] = new
            cache.replace_tokens(start, new)
            for p in range(start, start + n):
                drop_ancestor_overrides(overrides, 0, p)
        elif kind == "node":  # a node re-summarised to a new vector, at a random level and time
            level = 1 + rint(L)
            index = rint(cache.counts[level])
            embed = norm(torch.randn(D, generator=g))
            cache.set_node(level, index, embed)
            drop_ancestor_overrides(overrides, level, index)
            overrides[(level, index)] = embed
        else:  # decoding
            new = torch.randint(0, 50, (1 + rint(5),), generator=g)
            ids = torch.cat([ids, new])
            cache.append(new)
        full = False if step % 4 == 3 else None  # now and then an early edit is forced through the dirty rows
        assert_matches_reference(cache, model, gistnet, ids, overrides, cache.refresh(full=full))
    assert cache.recomputes["full"] >= 2 and cache.recomputes["incremental"] >= 8, cache.recomputes


def closure(lay, edited):
    """Ground truth from the mask alone: the edited elements and their ancestors, then every element that sees a
    changed one, repeated to a fixed point (layers stack, so influence travels along chains)."""
    sees = mega_mask(lay).float()  # [query, key]
    changed = torch.zeros(lay.T, dtype=torch.bool)
    for p in edited:
        level, start, _ = lay.span(p)
        changed[p] = True
        for lv in range(level + 1, lay.levels + 1):
            if start // lay.K**lv < lay.counts[lv]:
                changed[lay.offsets[lv] + start // lay.K**lv] = True
    while True:
        grown = changed | (sees @ changed.float() > 0)
        if torch.equal(grown, changed):
            return changed
        changed = grown


@pytest.mark.parametrize(
    "N,k,w,levels",
    [(40, 3, 2, 2), (37, 2, 0, 3), (50, 4, 9, 2), (30, 3, 5, 0), (64, 4, 4, 1), (29, 3, 40, 2)],
)
def test_edit_dirties_is_exactly_edited_ancestors_and_later_viewers(N, k, w, levels):
    lay = build_mega_layout(N, k, w, levels)
    for p in range(lay.T):
        level, start, _ = lay.span(p)
        got = torch.cat(edit_dirties(level, p - lay.offsets[level], lay.counts, k, w))
        assert torch.equal(got, closure(lay, [p])), (level, p)
    # a set of raw edits dirties the union
    got = torch.cat(edit_dirties(0, torch.tensor([N - 3, 7]), lay.counts, k, w))
    assert torch.equal(got, closure(lay, [7, N - 3]))


def test_an_edit_changes_exactly_the_elements_it_dirties(model, gistnet):
    """On the model: what an edit changes (any packed element's logits) is the dirty set, no more, no less."""
    ids = torch.randint(0, 50, (48,), generator=torch.Generator().manual_seed(4))
    counts = build_mega_layout(len(ids), K, W, L).counts
    base = reference(model, gistnet, ids, {})[1]
    g = torch.Generator().manual_seed(5)
    for level, index in [(0, 3), (0, 21), (0, 47), (1, 1), (1, 6), (2, 1)]:
        edited, overrides = ids.clone(), {}
        if level == 0:
            edited[index] = (ids[index] + 1) % 50
        else:
            overrides[(level, index)] = norm(torch.randn(D, generator=g))
        change = (reference(model, gistnet, edited, overrides)[1] - base).abs().amax(-1)
        dirty = torch.cat(edit_dirties(level, index, counts, K, W))
        assert float(change[~dirty].max()) <= 1e-6, (level, index)
        assert float(change[dirty].min()) > 1e-4, (level, index)


def test_marking_too_little_is_caught(model, gistnet, monkeypatch):
    """The equality check has teeth: a cache that dirties only the edited node and its ancestors (no
    later-in-time suffix) keeps stale K/V, and the comparison with the full recompute sees it."""
    real = edit_dirties

    def edited_and_ancestors_only(level, index, counts, k, w):
        idx = torch.as_tensor(index).reshape(-1)
        return [
            d & (torch.arange(len(d))[:, None] == idx * k**level // k**lv).any(1)
            if lv >= level
            else d & False
            for lv, d in enumerate(real(level, index, counts, k, w))
        ]

    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(6))
    cache = MegaKVCache(model, gistnet, K, W, L)
    cache.append(ids)
    cache.refresh()
    monkeypatch.setattr(kv_cache, "edit_dirties", edited_and_ancestors_only)  # where MegaKVCache looks it up
    ids = ids.clone()
    ids[40] = (ids[40] + 1) % 50
    cache.replace_tokens(40, ids[40:41])
    logits = cache.refresh(full=False)
    kv_ref, logits_ref = reference(model, gistnet, ids, {})
    stale = max(
        float((cache.packed_kv(i)[0] - kv_ref[i][0]).abs().max()) for i in range(model.config.n_layer)
    )
    assert stale > 1e-3 and float((logits - logits_ref[-1]).abs().max()) > 1e-4


def test_zoomed_decoding_token_by_token_matches_the_full_forward(model, gistnet):
    ids = torch.randint(0, 50, (90,), generator=torch.Generator().manual_seed(9))
    cache = MegaKVCache(model, gistnet, K, W, L, capacity=8, zoom_k=2)
    cache.append(ids[:70])
    cache.refresh()
    for t in range(70, 90):
        cache.append(ids[t : t + 1])
        logits = cache.refresh()
        torch.testing.assert_close(logits, reference(model, gistnet, ids[: t + 1], {}, zoom_k=2)[1][t])
    plain = reference(model, gistnet, ids, {})[1][89]
    assert not torch.allclose(logits, plain, atol=1e-4)  # the zoom changed what the newest token predicts


def test_decoding_token_by_token_matches_mega_forward_and_sees_few_columns(model, gistnet):
    ids = torch.randint(0, 50, (100,), generator=torch.Generator().manual_seed(7))
    cache = MegaKVCache(model, gistnet, K, W, L, capacity=8)
    cache.append(ids[:80])
    cache.refresh()
    for t in range(80, 100):
        cache.append(ids[t : t + 1])
        logits = cache.refresh()
        with torch.no_grad():
            ref = mega_forward(model, ids[None, : t + 1], gistnet, W=W, K=K, levels=L)[0, -1]
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert cache.recomputes == {"incremental": 20, "full": 1}
    # a decode step runs its new row(s) against the keys the mask can show it, not against all T elements
    rows, cols = cache.last_shape
    T = sum(cache.counts)
    assert (
        rows == 1 + (100 % K == 0) + (100 % K**2 == 0)
        and cols <= W + K + (W + 1) // K + K + 100 // K**L < T / 2
    )


def test_full_recompute_is_chosen_for_early_edits_only(model, gistnet):
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(8))
    cache = MegaKVCache(model, gistnet, K, W, L)
    cache.append(ids)
    cache.refresh()
    cache.replace_tokens(60, ids[60:61])
    cache.refresh()
    cache.replace_tokens(1, ids[1:2])  # dirties every element but raw 0
    cache.refresh()
    assert cache.recomputes == {"incremental": 1, "full": 2}


def test_mega_cache_misuse_is_refused(model, gistnet):
    with pytest.raises(ValueError, match="GistNet"):
        MegaKVCache(model, None, K, W, L)
    cache = MegaKVCache(model, gistnet, K, W, L)
    with pytest.raises(ValueError, match="empty"):
        cache.refresh()
    cache.append(torch.arange(20))
    with pytest.raises(ValueError, match="replace"):
        cache.replace_tokens(18, torch.arange(3))
    with pytest.raises(ValueError, match="no node"):
        cache.set_node(0, 3, torch.zeros(D))
    with pytest.raises(ValueError, match="refresh"), torch.no_grad():
        model(embeds=torch.zeros(1, 2, D), rotary=rotary(model, torch.arange(2.0)), kv_cache=cache)
