"""LensNet: old entries are judged against the recent query, padding is inert, scores lie in [-1, 1]."""

import math

import pytest
import torch

from megacontext.lensnet import LensNet

D, H = 32, 4


def _lens(head="mlp", seed=0, trained=True, std=0.1) -> LensNet:
    """A LensNet; trained=True replaces the zero inits by random weights, as after some training."""
    torch.manual_seed(seed)
    lens = LensNet(D, H, n_layer=2, head=head)
    if trained:
        with torch.no_grad():
            for p in lens.parameters():
                p.normal_(0.0, std)
    return lens


def _wc(B=2, N=6, Q=4, seed=1):
    """A batch of working contexts: N entries (LOD2 gist, LOD1 gists, raw blocks) and Q query tokens."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, N, D, generator=g)
    lod = torch.tensor([2, 1, 1, 1, 0, 0][:N] + [0] * max(0, N - 6)).expand(B, N)
    starts = torch.tensor([0, 1024, 1056, 1088, 1120, 1152][:N] + [1152 + 32 * i for i in range(1, N - 5)])
    lengths = torch.tensor([1024, 32, 32, 32, 32, 32][:N] + [32] * max(0, N - 6))
    mu = (starts + lengths / 2).float().expand(B, N)
    sigma = (lengths / math.sqrt(12)).expand(B, N)
    query = torch.randn(B, Q, D, generator=g)
    query_pos = (starts[-1] + lengths[-1] + torch.arange(Q)).float().expand(B, Q)
    return embeds, lod, mu, sigma, query, query_pos


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_initial_scores_are_zero(head):
    scores = _lens(head, trained=False)(*_wc())
    assert scores.shape == (2, 6) and torch.equal(scores, torch.zeros(2, 6))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_changing_only_the_query_changes_old_entries(head):
    lens = _lens(head)
    embeds, lod, mu, sigma, query, query_pos = _wc()
    before = lens(embeds, lod, mu, sigma, query, query_pos)
    after = lens(embeds, lod, mu, sigma, torch.randn_like(query), query_pos)
    # Every entry, including the oldest LOD2 gist, reacts to the newest text (bidirectional attention).
    assert ((before - after).abs() > 1e-4).all()


def test_position_and_width_matter():
    lens = _lens()
    embeds, lod, mu, sigma, query, query_pos = _wc()
    base = lens(embeds, lod, mu, sigma, query, query_pos)
    assert not torch.allclose(base, lens(embeds, lod, mu, sigma * 0.1, query, query_pos), atol=1e-4)
    assert not torch.allclose(base, lens(embeds, lod, mu - 500, sigma, query, query_pos), atol=1e-4)
    assert not torch.allclose(
        base, lens(embeds, torch.zeros_like(lod), mu, sigma, query, query_pos), atol=1e-4
    )
    # RoPE is relative: shifting every position by the same amount changes nothing.
    torch.testing.assert_close(
        base, lens(embeds, lod, mu + 1e6, sigma, query, query_pos + 1e6), atol=1e-4, rtol=0
    )


def test_padding_entries_are_inert():
    lens = _lens()
    embeds, lod, mu, sigma, query, query_pos = _wc(B=1, N=6)
    alone = lens(embeds[:, :4], lod[:, :4], mu[:, :4], sigma[:, :4], query, query_pos)
    mask = torch.tensor([[True, True, True, True, False, False]])
    padded = lens(embeds, lod, mu, sigma, query, query_pos, entry_mask=mask)
    torch.testing.assert_close(padded[:, :4], alone, atol=1e-6, rtol=0)
    assert torch.equal(padded[:, 4:], torch.zeros(1, 2))
    # Whatever the padding holds (NaN, a bogus LOD) changes nothing.
    junk = embeds.clone()
    junk[:, 4:] = float("nan")
    bad_lod, bad_mu = lod.clone(), mu.clone()
    bad_lod[:, 4:], bad_mu[:, 4:] = 99, float("nan")
    again = lens(junk, bad_lod, bad_mu, sigma, query, query_pos, entry_mask=mask)
    torch.testing.assert_close(again, padded)
    # Without the mask the same entries do change the others: the check has teeth.
    unmasked = lens(embeds, lod, mu, sigma, query, query_pos)
    assert not torch.allclose(unmasked[:, :4], alone, atol=1e-4)


def test_scores_are_bounded():
    lens = _lens(std=3.0)  # large weights saturate the tanh
    scores = lens(*_wc(B=4, N=8, Q=5, seed=3))
    assert scores.abs().max() <= 1.0 and scores.abs().max() > 0.99
    assert (scores > 0).any() and (scores < 0).any()  # signed: expand and collapse


def test_score_convenience_single_and_list():
    lens = _lens()
    embeds, lod, mu, sigma, query, query_pos = _wc(B=2, N=6)
    full = lens(embeds, lod, mu, sigma, query, query_pos)
    one = {"embeds": embeds[0], "lod": lod[0], "mu": mu[0], "sigma": sigma[0]}
    torch.testing.assert_close(lens.score(one, query[0], query_pos[0]), full[0], atol=1e-6, rtol=0)

    class WC:  # attribute access works too
        def __init__(self, n):
            self.embeds, self.lod, self.mu, self.sigma = embeds[1, :n], lod[1, :n], mu[1, :n], sigma[1, :n]

    short = lens(embeds[1:, :3], lod[1:, :3], mu[1:, :3], sigma[1:, :3], query[1:], query_pos[1:])
    out = lens.score([one, WC(3)], query, query_pos)
    assert [s.shape[0] for s in out] == [6, 3]
    torch.testing.assert_close(out[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], short[0], atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="sigma"):
        lens.score({"embeds": embeds[0], "lod": lod[0], "mu": mu[0]}, query[0], query_pos[0])


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_every_parameter_gets_a_gradient(head):
    """From the real init: once the zero-init projections have opened up (a few optimizer steps, one per
    layer of zeros between a parameter and the score) every parameter has a non-zero gradient."""
    lens = _lens(head, trained=False)
    embeds, lod, mu, sigma, query, query_pos = _wc(B=2, N=6)
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    target = torch.randn(2, 6, generator=torch.Generator().manual_seed(5)).tanh()
    opt = torch.optim.Adam(lens.parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        ((lens(embeds, lod, mu, sigma, query, query_pos, entry_mask=mask) - target) ** 2).sum().backward()
        if step < 3:
            opt.step()
    for name, p in lens.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _with_a_new_channel(old: dict, new: dict) -> tuple[LensNet, LensNet]:
    """A trained-looking lens and one with an extra input channel that shares all its other weights (the new
    channel's weights keep their zero init)."""
    torch.manual_seed(0)
    before, after = LensNet(D, H, n_layer=2, **old), LensNet(D, H, n_layer=2, **new)
    with torch.no_grad():
        for p in before.parameters():
            p.normal_(0.0, 0.1)
    after.load_state_dict(before.state_dict(), strict=False)
    return before, after


def test_lexical_input_starts_silent_then_matters():
    """A lexical lens (entry_lex: the mean token embedding of each entry) scores exactly like the same lens
    without it until its zero-initialised projection moves; then the entries' words change the scores."""
    plain, lexical = _with_a_new_channel({}, {"lexical": True})
    embeds, lod, mu, sigma, query, query_pos = _wc()
    lex = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9))
    base = plain(embeds, lod, mu, sigma, query, query_pos)
    torch.testing.assert_close(lexical(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex), base)
    with torch.no_grad():
        lexical.lex.weight.normal_(0.0, 0.1)
    moved = lexical(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex)
    assert ((moved - base).abs() > 1e-4).any()
    one = {"embeds": embeds[0], "lod": lod[0], "mu": mu[0], "sigma": sigma[0], "lex": lex[0]}
    torch.testing.assert_close(lexical.score(one, query[0], query_pos[0]), moved[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="entry_lex"):
        lexical(embeds, lod, mu, sigma, query, query_pos)
    with pytest.raises(ValueError, match="entry_lex"):
        plain(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex)


def test_match_channel_starts_silent_then_lifts_the_entries_holding_the_query_words():
    """A matching lens (entry_match: which query tokens occur in each entry's span) scores like the same lens
    without the channel until its zero-initialised weights move, yet its weights get a gradient from the first
    step; once they are positive, an entry holding a query word scores higher than the same entry without."""
    plain, matching = _with_a_new_channel({"lexical": True}, {"lexical": True, "match": True})
    embeds, lod, mu, sigma, query, query_pos = _wc()
    lex = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9))
    match = torch.zeros(2, 6, 4)
    match[:, 1, 2] = 1.0  # entry 1 (a LOD1 gist) holds query token 2
    base = plain(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex)
    out = matching(
        embeds, lod, mu, sigma, query, query_pos, entry_lex=lex, entry_match=match, return_logits=True
    )
    torch.testing.assert_close(out.tanh(), base)
    out[:, 1].sum().backward()
    assert matching.match.weight.grad.abs().sum() > 0  # w learns from the first step
    assert matching.match_scale.grad.abs().sum() == 0  # (its per-LOD scale once w is not zero)
    with torch.no_grad():
        matching.match.weight.copy_(matching.match.weight.grad.sign() * 0.5)  # w(q, LOD1) > 0 for token 2
        lifted = matching(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex, entry_match=match)
        unmatched = matching(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex, entry_match=match * 0)
    assert (lifted[:, 1] > unmatched[:, 1]).all()
    torch.testing.assert_close(lifted[:, [0, 2, 3, 4, 5]], unmatched[:, [0, 2, 3, 4, 5]])
    one = {
        "embeds": embeds[0],
        "lod": lod[0],
        "mu": mu[0],
        "sigma": sigma[0],
        "lex": lex[0],
        "match": match[0],
    }
    torch.testing.assert_close(matching.score(one, query[0], query_pos[0]), lifted[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="entry_match"):
        matching(embeds, lod, mu, sigma, query, query_pos, entry_lex=lex)


def test_neighbour_channel_lifts_the_entries_next_to_a_query_word():
    """neighbours=True: silent at init; once w_nb is positive for a query word, the entries just before and after
    one holding it score higher (a key's block next to the block naming its lock), and no other entry moves."""
    kw = {"lexical": True, "match": True}
    matching, nb = _with_a_new_channel(kw, {**kw, "neighbours": True})
    embeds, lod, mu, sigma, query, query_pos = _wc()
    lex = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9))
    match = torch.zeros(2, 6, 4)
    match[:, 2, 1] = 1.0  # entry 2 holds query token 1
    args = (*_wc(), None, True, lex, match)  # ..., entry_mask, return_logits, entry_lex, entry_match
    base = matching(*args)
    torch.testing.assert_close(nb(*args), base)
    nb(*args)[:, [1, 3]].sum().backward()
    with torch.no_grad():  # a step along the gradient makes w_nb(query token 1) positive
        nb.match_nb.weight.copy_(nb.match_nb.weight.grad.sign() * 0.5)
        delta = nb(*args) - base
    assert (delta[:, [0, 2, 4, 5]].abs() < 1e-6).all()  # only the neighbours of entry 2 move...
    assert (delta[:, [1, 3]] > 1e-3).all()  # ...up
    with pytest.raises(ValueError, match="needs match"):
        LensNet(D, H, neighbours=True)


def test_cached_rotary_equals_the_gaussian_rotary_reference():
    """LensNet's cached full-width tables are positional.gaussian_rotary's, widened by gistnet.rope_tables;
    sigma None (points) is the undamped case."""
    from megacontext.gistnet import rope_tables
    from megacontext.positional import gaussian_rotary

    net = LensNet(64, 4)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 7, generator=g) * 100
    sigma = torch.rand(2, 7, generator=g) * 5
    for s in (sigma, None):
        cos, sin = net._rope(mu, s)
        ref_cos, ref_sin = rope_tables(*gaussian_rotary(mu, 0.0 if s is None else s, 16))
        torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=1e-5, atol=1e-6)
