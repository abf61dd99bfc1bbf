"""SlotKVCache: the GPT's KV-cache protocol over WC slots; prefix matching, truncation at the first edit, growth."""

from __future__ import annotations

import pytest
import torch

from megacontext.kv_cache import SlotKVCache, key_index, key_level, slot_key
from megacontext.positional import gaussian_rotary
from nanochat.gpt import GPT, GPTConfig

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
