"""Evaluation views (megacontext/views.py): the mc-oracle working context, score normalisation for the
allocator, the evidence token span mc_eval hands the oracle, and the mc-lens view being the chat session."""

import random

import pytest
import torch

from megacontext import training
from megacontext.allocator import normalize_scores, random_variant
from megacontext.config import MCConfig, build_nets
from megacontext.entries import Entry
from megacontext.lens_inputs import lens_inputs, row_entry_match, tree_entry_inputs, tree_entry_match
from megacontext.session import MCSession
from megacontext.views import build_tree, horizon_logits, oracle_wc
from megacontext.working_context import WorkingContext, coarse_tiling
from nanochat.gpt import GPT, GPTConfig
from scripts.mc_eval import answer_tokens, decoy_tokens, evidence_tokens, raw_in

K, V = 4, 64


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(256, V, 1, 2, 2, 32))
    model.init_weights()
    cfg = MCConfig(block_size=K, wc_budget=24, recent=8, n_head=2, gistnet_layers=1, lensnet_layers=1, **kw)
    gistnet, lensnet = build_nets(cfg, 32)
    return model, cfg, gistnet.eval(), lensnet.eval()


@pytest.mark.parametrize("seed", range(6))
def test_oracle_keeps_the_evidence_blocks_raw_within_budget(seed):
    model, cfg, gistnet, _ = tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(40, 120, (1,), generator=gen))
    tree = build_tree(torch.randint(0, V, (n,), generator=gen).tolist(), model, gistnet, cfg, "cpu")
    a = int(torch.randint(0, n - 20, (1,), generator=gen))
    b = a + int(torch.randint(1, 6, (1,), generator=gen))
    wc = oracle_wc(tree, cfg.wc_budget, cfg.recent, (a, b))
    base = WorkingContext.from_tree(tree, cfg.wc_budget, cfg.recent)
    if wc is None:  # only when the evidence blocks cannot fit next to the coarsest tiling of the rest
        rs = next(
            e.start for e in WorkingContext.coarsest(tree, cfg.wc_budget, cfg.recent).entries if e.level == 0
        )
        a0, b0 = a // K * K, -(-b // K) * K
        cost = len(coarse_tiling(tree, 0, a0)) + (b0 - a0) + len(coarse_tiling(tree, b0, rs)) + n - rs
        assert cost > cfg.wc_budget
        return
    wc.check(tree)
    assert wc.cost <= cfg.wc_budget and wc.num_tokens == n
    covering = [e for e in wc.entries if e.start < b and e.end > a]
    assert covering and all(e.level == 0 for e in covering), wc.render()
    # the rest is as coarse as mc-nolens leaves it: the oracle never holds more raw recent tokens
    assert min(e.start for e in wc.entries if e.level == 0 and e.start >= b) >= min(
        e.start for e in base.entries if e.level == 0
    )


def test_oracle_view_needs_an_evidence_span():
    model, cfg, gistnet, lensnet = tiny()
    ids = torch.randint(0, V, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, _ = horizon_logits("mc-oracle", ids, 2, model, gistnet, lensnet, cfg, "cpu")
    assert logits is None
    logits, info = horizon_logits("mc-oracle", ids, 2, model, gistnet, lensnet, cfg, "cpu", evidence=(5, 7))
    assert logits.shape == (2, V) and "[L0 4:8]" in info["render"]


def test_window_view_runs_at_a_budget_below_the_mc_query_length():
    """An attention-mode checkpoint has no MC nets, so mc_eval scores it with MCConfig()'s recent / block size;
    a budget of 32 (its W) must still give the window view (it was silently skipped), as the last 32 inputs."""
    model = tiny()[0]
    ids = torch.randint(0, V, (100,)).tolist()
    cfg = MCConfig(wc_budget=32, recent=32)
    logits, info = horizon_logits("window", ids, 4, model, None, None, cfg, "cpu")
    assert info["wc_size"] == 32
    torch.testing.assert_close(logits, model(torch.tensor([ids[-33:-1]]))[0, -4:])
    assert horizon_logits("window", ids, 32, model, None, None, cfg, "cpu")[0] is None  # h fills the budget


def test_normalize_scores():
    s = torch.tensor([0.01, -0.02, 0.03, 0.0])
    z = normalize_scores(s)
    assert torch.equal(z.argsort(), s.argsort()) and abs(float(torch.atanh(z).mean())) < 1e-5
    assert float(z.max()) > 0.2 and float(z.min()) < -0.2  # past the default thresholds both ways
    assert torch.equal(normalize_scores(torch.full((3,), 0.4)), torch.zeros(3))


def timid(lensnet):
    """A timid lens: random, every score within a few hundredths of 0 (LensNet's raw scores after training)."""
    with torch.no_grad():
        for p in lensnet.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return lensnet


def test_a_timid_lens_edits_because_scores_are_normalised():
    """Under absolute thresholds a lens whose scores stay within ±0.05 never changed the working context;
    normalised, its ranking acts (the session's settle after an ingest makes edits)."""
    model, cfg, gistnet, lensnet = tiny()
    ids = torch.randint(0, V, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    s = MCSession(model, None, gistnet, timid(lensnet), cfg)
    assert s.ingest(ids) > 0
    s.wc.check(s.view)


@pytest.mark.parametrize("n", [90, 121, 200])
def test_the_mc_lens_view_is_the_chat_session(n):
    """mc_eval's mc-lens view runs the chat session's own code: after ingesting the same prompt a session holds
    exactly the working context the view predicts from, and the view's logits are the session's next-token
    logits (then each later token pushed as a generated one)."""
    model, cfg, gistnet, lensnet = tiny(seed=n)
    timid(lensnet)
    ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    h = 3
    logits, info = horizon_logits("mc-lens", ids, h, model, gistnet, lensnet, cfg, "cpu")
    s = MCSession(model, None, gistnet, lensnet, cfg)
    prompt = ids[: len(ids) - h]
    edits = s.ingest(prompt)
    assert s.wc.render() == info["render"] and edits == info["edits"]
    torch.testing.assert_close(logits[0], s.logits())
    for j, token in enumerate(ids[len(prompt) : -1], start=1):
        s.push(token)
        torch.testing.assert_close(logits[j], s.logits())


def test_ingest_settles_the_focus_where_one_refocus_does_not(monkeypatch):
    """A long prompt whose evidence sits in an old LOD2 gist: one refocus (n_diff = 1 edit) cannot bring it raw
    (LOD2 -> LOD1 -> raw, with refunds); ingest settles the focus, so the evidence is raw after it and further
    refocus rounds change nothing."""
    model, cfg, gistnet, lensnet = tiny(n_diff=1)
    p = 5

    def scripted(self, wcs):
        return [torch.tensor([1.0 if e.start <= p < e.end else 0.0 for e in wc.entries]) for wc in wcs]

    monkeypatch.setattr(MCSession, "lens_scores_many", scripted)
    ids = torch.randint(0, V, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    s = MCSession(model, None, gistnet, lensnet, cfg)
    edits = s.ingest(ids)
    assert edits > 1 and next(e for e in s.wc.entries if e.start <= p < e.end).level == 0
    for _ in range(cfg.cooldown + 1):
        assert s.refocus() == []  # settled
    one = MCSession(model, None, gistnet, lensnet, cfg)  # what a single refocus after the ingest gave
    monkeypatch.setattr(MCSession, "settle", lambda self: len(self.refocus()))
    one.ingest(ids)
    assert next(e for e in one.wc.entries if e.start <= p < e.end).level > 0


def test_the_session_uses_only_trained_gist_levels_until_the_history_needs_more():
    """GistNet was trained on LOD1..wc_levels; the session's WC stays within them while the history fits the
    budget that way, and goes one level coarser only when it does not."""
    model, cfg, gistnet, lensnet = tiny(wc_levels=1)
    s = MCSession(model, None, gistnet, timid(lensnet), cfg)
    s.ingest(list(range(1, 40)))  # 9 LOD1 gists + 8 raw recent tokens + the rest fit a budget of 24
    assert s.tree.max_level >= 2 and s.view.cap == 1
    assert max(e.level for e in s.wc.entries) == 1
    s.ingest(torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(0)).tolist())
    assert s.view.cap >= 2 and s.wc.cost <= cfg.wc_budget  # 60 LOD1 gists cannot fit 24: coarser
    s.wc.check(s.view)


class CharTokenizer:
    def encode(self, text: str, prepend: int | None = None) -> list[int]:
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


def test_evidence_tokens_cover_the_evidence_with_bos_shift():
    prompt = "filler filler. The key is 42. more filler. What is the key?"
    a = prompt.index("The key")
    b = a + len("The key is 42.")
    s, e = evidence_tokens(CharTokenizer(), prompt, (a, b))
    ids = CharTokenizer().encode(prompt, prepend=0)
    assert "".join(chr(i) for i in ids[s + 1 : e - 1]) == "The key is 42."


def test_answer_raw_asks_for_the_answer_and_the_label_before_it():
    """mc_eval's answer_raw: an occurrence of the answer in the evidence and the LEAD tokens before it must all
    be raw. The evidence states it twice (a passkey's restatement): either one raw is enough, one token of
    each inside a gist is not, and an occurrence outside the evidence does not count."""
    prompt = "x" * 20 + "The key for the red box is 42. Remember 42." + "y" * 30 + " 42"
    a = prompt.index("The key")
    spans = answer_tokens(CharTokenizer(), prompt, " 42", (a, a + 43))
    ids = CharTokenizer().encode(prompt, prepend=0)
    text = ["".join(chr(i) for i in ids[s:e]) for s, e in spans]
    assert text == ["is 42", "er 42"]  # LEAD = 3 tokens before each; the " 42" after the evidence is not one
    K = 4
    blocks = [Entry(0, j, j + K) for j in range(0, 100, K)]  # everything raw

    def gist_at(*tokens):
        """The WC with the blocks holding `tokens` gisted."""
        gisted = lambda b: any(b.start <= t < b.end for t in tokens)  # noqa: E731
        return WorkingContext([Entry(1, b.start, b.end) if gisted(b) else b for b in blocks], K, 200, 0)

    assert any(raw_in(gist_at(), span) for span in spans)
    assert any(raw_in(gist_at(spans[0][0]), span) for span in spans)  # the first gisted, the restatement raw
    assert any(raw_in(gist_at(spans[1][0]), span) for span in spans)
    assert not any(raw_in(gist_at(spans[0][0], spans[1][0]), span) for span in spans)


def test_decoy_raw_looks_before_the_question_only():
    """mc_eval's look-alike check: every occurrence of another lock's key before the question, with its LEAD
    tokens; one repeated inside the question (raw in any WC) is not the scorer's doing."""
    prompt = "The key for the red box is 42. " + "x" * 20 + "The key for the blue box is 77. Q: 77?"
    spans = decoy_tokens(CharTokenizer(), prompt, ["77", "55"], prompt.index("Q:"))
    ids = CharTokenizer().encode(prompt, prepend=0)
    assert ["".join(chr(i) for i in ids[s:e]) for s, e in spans] == ["is 77"]


def test_a_full_working_context_makes_room_for_the_entry_the_scorer_wants(monkeypatch):
    """The scorer points at one old token; a high collapse threshold keeps every other entry out of the
    collapse candidates. The WC starts full, so only budget swaps — the least useful detail refunding the
    wanted expansion — can zoom the gist holding that token down to raw, over the settle's refocuses."""
    model, cfg, gistnet, lensnet = tiny(tau_collapse=0.9)
    ids = torch.randint(0, V, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    p = 5  # inside the oldest, coarsest gist

    def scripted(self, wcs):
        return [torch.tensor([1.0 if e.start <= p < e.end else 0.0 for e in wc.entries]) for wc in wcs]

    monkeypatch.setattr(MCSession, "lens_scores_many", scripted)
    tree = build_tree(ids, model, gistnet, cfg, "cpu")
    start = WorkingContext.from_tree(tree, cfg.wc_budget, cfg.recent)
    assert start.cost > cfg.wc_budget - (K - 1)  # no room for an expansion without a refund
    assert next(e for e in start.entries if e.start <= p < e.end).level >= 2
    s = MCSession(model, None, gistnet, lensnet, cfg)
    n_edits = s.ingest(ids)
    s.wc.check(s.view)
    assert next(e for e in s.wc.entries if e.start <= p < e.end).level == 0 and n_edits > 0


def test_lens_inputs_from_a_tree_equal_those_of_training():
    """Evaluation and the chat session build LensNet's inputs from a tree (lens_inputs.tree_entry_inputs /
    tree_entry_match), training from the row (lens_inputs / row_entry_match): the same entries must give the
    same gists, mean token embeddings and query-token matches, or the lens is evaluated on inputs it was not
    trained on."""
    model, cfg, gistnet, _ = tiny(lensnet_input="gist+mean+match")
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    tree = build_tree(ids, model, gistnet, cfg, "cpu")
    with torch.no_grad():
        levels = training.trained_levels(cfg, len(ids))
        bank, offsets = training.build_bank(model.wte(torch.tensor(ids))[None], gistnet, K, levels)
    query = torch.tensor(ids[-K:])
    hits = 0
    for seed in range(5):
        wc = random_variant(tree, cfg.wc_budget, cfg.recent, random.Random(seed))
        want_rows, want_lod, want_lex = lens_inputs(wc.entries, bank[0], offsets, K, True)
        want_match = row_entry_match(wc.entries, torch.tensor(ids), query)
        cache: dict = {}
        rows, lod, lex = tree_entry_inputs(wc.entries, tree, model.wte, "cpu", True, cache)
        match = tree_entry_match(wc.entries, tree, query, "cpu", cache)
        assert lod == want_lod
        torch.testing.assert_close(rows, want_rows, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lex, want_lex, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(match, want_match, atol=0, rtol=0)
        hits += int(match[:-2].sum())  # the older entries (the last ones hold the query itself)
        again = tree_entry_inputs(wc.entries, tree, model.wte, "cpu", True, cache)[2]  # from the cache
        torch.testing.assert_close(again, lex, atol=0, rtol=0)
        torch.testing.assert_close(
            tree_entry_match(wc.entries, tree, query, "cpu", cache), match, atol=0, rtol=0
        )
    assert hits > 0  # the test sees real matches, not only zeros


def test_the_lens_span_cache_keeps_coarse_nodes_not_the_lod1_blocks_below_them():
    """A coarse entry's mean and token set are built from its LOD1 blocks; keeping those would make the cache
    grow with the history (1.2 GB of RSS at 1M tokens), so only the nodes the WC shows and the coarse ones stay."""
    model, cfg, gistnet, _ = tiny(lensnet_input="gist+mean+match")
    ids = torch.randint(0, V, (600,), generator=torch.Generator().manual_seed(5)).tolist()
    tree = build_tree(ids, model, gistnet, cfg, "cpu")
    wc = WorkingContext.from_tree(tree, cfg.wc_budget, cfg.recent)
    assert max(e.level for e in wc.entries) >= 2
    cache: dict = {}
    lex = tree_entry_inputs(wc.entries, tree, model.wte, "cpu", True, cache)[2]
    match = tree_entry_match(wc.entries, tree, torch.tensor(ids[-K:]), "cpu", cache)
    shown = {(1, e.start // K) for e in wc.entries if e.level == 1 or (e.level == 0 and e.size == K)}
    lod1 = {(level, i) for _, level, i in cache if level == 1}
    assert lod1 <= shown and any(level >= 2 for _, level, _ in cache)
    fresh = {}  # the same summaries, from a cache that starts empty
    torch.testing.assert_close(tree_entry_inputs(wc.entries, tree, model.wte, "cpu", True, fresh)[2], lex)
    assert torch.equal(tree_entry_match(wc.entries, tree, torch.tensor(ids[-K:]), "cpu", {}), match)


def test_a_long_answer_makes_the_diagnostic_views_go_coarser_to_fit():
    """The horizon (a UUID answer, say) is kept raw with the query: more than cfg.recent. The mc views must still
    fit the budget (a level coarser) rather than fail."""
    model, cfg, gistnet, lensnet = tiny(wc_levels=1)
    ids = torch.randint(0, V, (61,), generator=torch.Generator().manual_seed(5)).tolist()
    tree = build_tree(ids[:-1], model, gistnet, cfg, "cpu")
    assert tree.cap == 1  # 13 LOD1 gists + 8 recent tokens fit 24; with 16 raw for the answer they do not
    for view in ("mc-nolens", "mc-attn"):
        logits, info = horizon_logits(view, ids, 12, model, gistnet, lensnet, cfg, "cpu", tree=tree)
        assert logits.shape == (12, V) and info["wc_size"] <= cfg.wc_budget
    assert tree.cap == 2
    # an answer the budget cannot hold raw next to the coarsest history: the view does not score (no error)
    long = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(6)).tolist()
    assert horizon_logits("mc-nolens", long, 14, model, gistnet, lensnet, cfg, "cpu")[0] is None
