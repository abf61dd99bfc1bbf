"""MCSession: a 50k-token prompt, invariants after every refocus, exact incremental KV invalidation, and
save -> reopen in a new process -> the identical next greedy reply.

The tiny model/tokenizer helpers here are shared with the chat web/CLI/browser tests.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.allocator import _expanded, lookahead_scores
from megacontext.config import MCConfig
from megacontext.entries import Edit
from megacontext.positional import gaussian_rotary
from megacontext.session import MCSession, build_mc_nets, model_fingerprint
from megacontext.tree import MegaContextTree, TreeModelMismatchError
from megacontext.working_context import WorkingContext
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the memory of a long chat is a tree of gists and the lens decides what to zoom into again".split()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) + f" {i}." for i in range(50)]
    return Tokenizer.train_from_iterator(docs, 320)


def tiny_model(vocab: int, seed: int = 0, smear: int = 0) -> GPT:
    """A 2-layer GPT whose every layer matters (the init zeroes output projections and the smear); `smear`:
    the token shift's width (0: none)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    config.smear, config.smear_width = smear > 0, max(1, smear)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        if smear:
            torch.nn.init.normal_(model.smear, std=0.5)
        if smear > 1:
            torch.nn.init.normal_(model.smear_back, std=0.5)
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def tiny_cfg(**kw) -> MCConfig:
    base = dict(
        block_size=4,
        wc_budget=64,
        recent=8,
        n_head=2,
        gistnet_layers=1,
        lensnet_layers=1,
        tau_expand=0.1,
        tau_collapse=0.1,
        cooldown=1,
    )
    return MCConfig(**{**base, **kw})


def tiny_nets(cfg: MCConfig, n_embd: int = 32, seed: int = 0):
    """GistNet + a LensNet whose output head is random, so scores are non-zero and edits happen."""
    torch.manual_seed(seed + 1)
    gistnet, lensnet = build_mc_nets(cfg, n_embd)
    with torch.no_grad():
        torch.nn.init.normal_(lensnet.out.weight, std=2.0)
    return gistnet, lensnet


def tiny_session(tree=None, smear: int = 0, **kw) -> MCSession:
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size(), smear=smear)
    cfg = tiny_cfg(**kw)
    gistnet, lensnet = tiny_nets(cfg)
    return MCSession(model, tok, gistnet, lensnet, cfg, tree=tree)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's thread pool only adds contention on a shared CPU (measured 30x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scratch_logits(s: MCSession) -> torch.Tensor:
    """Next-token logits from a from-scratch forward over the session's WC (no cache, materialize path)."""
    t = s.wc.materialize(s.tree, s.model.wte)
    cos, sin = gaussian_rotary(
        torch.arange(len(t.mu), dtype=torch.float32)[None], 0.0, s.model.config.head_dim
    )
    with torch.no_grad():
        return s.model(embeds=t.embeds[None], rotary=(cos, sin))[0, -1]


def random_text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def test_50k_token_prompt_is_accepted_and_refocus_edits_follow():
    s = tiny_session()
    K, budget = s.K, s.cfg.wc_budget
    ids = np.random.default_rng(0).integers(20, s.model.config.vocab_size, 50_000)
    s.ingest(ids)
    wc = s.wc
    assert s.tree.num_tokens == 50_000 and wc.num_tokens == 50_000
    assert wc.cost <= budget
    wc.check(s.tree)
    old = [e for e in wc.entries if e.end <= 50_000 - s.cfg.recent]
    assert sum(e.size for e in old if e.level >= 1) > 49_000  # the old part is gists...
    assert max(e.level for e in wc.entries) >= 5  # ...up to coarse levels (4^5 = 1024 tokens each)
    assert all(e.level == 0 for e in wc.entries if e.end > 50_000 - s.cfg.recent)  # recent stays raw
    edits_before = s.telemetry.edits
    s.add_user_message("what was in the document")
    reply = list(s.reply(max_tokens=40, temperature=1.0, seed=1))
    assert len(reply) > 0
    assert s.telemetry.edits - edits_before > 0  # refocus edits happen as the conversation goes on
    assert s.wc.cost <= budget and s.wc.num_tokens == s.tree.num_tokens
    assert s.tree.num_tokens // K - 50_000 // K >= 10  # a refocus every block


@pytest.mark.parametrize("smear", [0, 1, 3], ids=["plain", "smear", "smear3"])
def test_long_conversation_keeps_invariants_and_cached_logits_exact(smear):
    s = tiny_session(smear=smear)
    checks = {"refocuses": 0, "edits": 0, "compared": 0, "kept": 0}
    refocus = s.refocus

    def checked_refocus():
        edits = refocus()
        s.wc.check(s.tree)  # docs/design.md §2: budget, contiguity, alignment, levels in the tree, recency
        assert s.wc.cost <= s.cfg.wc_budget
        assert s.wc.num_tokens == s.tree.num_tokens
        checks["refocuses"] += 1
        checks["edits"] += len(edits)
        if edits:  # the next forward recomputes only the suffix from the first changed slot
            checks["kept"] += s.cache.match(s._slot_table()[0]) > 0
            torch.testing.assert_close(s.logits(), scratch_logits(s), rtol=1e-5, atol=1e-5)
            checks["compared"] += 1
        return edits

    s.refocus = checked_refocus
    rng = np.random.default_rng(3)
    for turn in range(12):
        s.add_user_message(random_text(rng, int(rng.integers(5, 60))))
        for _ in s.reply(max_tokens=30, temperature=1.0, top_k=50, seed=turn):
            pass
        torch.testing.assert_close(s.logits(), scratch_logits(s), rtol=1e-5, atol=1e-5)
    assert s.tree.num_tokens > 6 * s.cfg.wc_budget  # far beyond the budget
    assert checks["refocuses"] > 50 and checks["edits"] > 0 and checks["compared"] > 0
    assert checks["kept"] > 0  # edits invalidate a suffix, not the whole cache
    assert len(s.messages) == 24 and s.messages[1]["role"] == "assistant"
    summary = s.telemetry.summary()
    assert summary["mc/refocuses"] == checks["refocuses"] and summary["mc/cost"] <= s.cfg.wc_budget


def test_cache_recomputes_only_the_dirty_suffix():
    s = tiny_session()
    s.ingest(np.random.default_rng(1).integers(20, 300, 400))
    s.logits()
    L = s.cache.pos
    forwards = []
    hook = s.model.blocks[0].register_forward_pre_hook(lambda mod, args: forwards.append(args[0].shape[1]))
    try:
        s.logits()  # nothing changed: no forward at all
        assert forwards == []
        list(s.generate(1, temperature=0.0))
        s.logits()
        assert forwards[-1] < L  # a decode step runs the new slot(s), not the whole WC
    finally:
        hook.remove()


def test_generation_is_seeded_and_stops_on_stop_tokens():
    a, b = tiny_session(), tiny_session()
    for s in (a, b):
        s.add_user_message("hello memory")
    ra = list(a.generate(25, temperature=1.0, seed=7))
    rb = list(b.generate(25, temperature=1.0, seed=7))
    assert ra == rb
    stops = a.stop_tokens
    assert all(t not in stops for t in ra[:-1])
    assert a.tree.num_tokens == len(a.tokenizer.encode("hello memory")) + 4 + len(ra)


def _save_models(tmp_path: Path, s: MCSession) -> None:
    s.tokenizer.save(tmp_path / "tok")
    torch.save(
        {
            "model": s.model.state_dict(),
            "gistnet": s.gistnet.state_dict(),
            "lensnet": s.lensnet.state_dict(),
            "cfg": s.cfg.to_dict(),
        },
        tmp_path / "weights.pt",
    )


REOPEN = textwrap.dedent(
    """
    import json, sys, torch
    from megacontext.config import MCConfig
    from megacontext.session import MCSession, build_mc_nets
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    root = sys.argv[1]
    w = torch.load(root + "/weights.pt")
    tok = Tokenizer.from_directory(root + "/tok")
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=32))
    model.load_state_dict(w["model"]); model.eval()
    gistnet, lensnet = build_mc_nets(MCConfig.from_dict(w["cfg"]), 32, {"gistnet": w["gistnet"], "lensnet": w["lensnet"]})
    s = MCSession.open(root + "/session", model, tok, gistnet, lensnet)
    s.add_user_message(sys.argv[2])
    print(json.dumps(list(s.reply(max_tokens=40, temperature=0.0))))
    """
)


def _reopen_in_subprocess(tmp_path: Path, message: str) -> list[int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", REOPEN, str(tmp_path), message],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_save_then_reopen_in_a_new_process_gives_the_identical_greedy_reply(tmp_path):
    s = tiny_session()
    _save_models(tmp_path, s)
    rng = np.random.default_rng(5)
    s.ingest(rng.integers(20, 300, 3000))  # a pasted document, far beyond the budget
    for turn in range(3):
        s.add_user_message(random_text(rng, 20))
        list(s.reply(max_tokens=20, temperature=1.0, seed=turn))
    assert s.telemetry.edits > 0
    s.save(tmp_path / "session")
    saved = json.loads((tmp_path / "session" / "session.json").read_text())
    assert saved["num_tokens"] == s.tree.num_tokens and len(saved["messages"]) == 6
    s.add_user_message("and what next")
    expected = list(s.reply(max_tokens=40, temperature=0.0))
    s.close()
    assert len(expected) > 0
    assert _reopen_in_subprocess(tmp_path, "and what next") == expected


def test_session_living_on_disk_saves_in_place_and_keeps_unsaved_tokens(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    cfg = tiny_cfg()
    gistnet, lensnet = tiny_nets(cfg)
    s = MCSession.create(tmp_path / "sess", model, tok, gistnet, lensnet, cfg)
    s.add_user_message("first message to remember")
    list(s.reply(max_tokens=12, temperature=0.0))
    s.save(tmp_path / "sess")
    tree_dirs = [p.name for p in (tmp_path / "sess").glob("tree-*")]
    assert (
        len(tree_dirs) == 1
        and json.loads((tmp_path / "sess" / "session.json").read_text())["tree"] == tree_dirs[0]
    )
    saved_tokens = s.tree.num_tokens
    s.add_user_message("an unsaved turn")  # committed by close(), not recorded in session.json
    s.close()
    r = MCSession.open(tmp_path / "sess", model, tok, gistnet, lensnet)
    assert r.tree.num_tokens > saved_tokens and r.wc.num_tokens == r.tree.num_tokens
    assert [m["role"] for m in r.messages] == ["user", "assistant"]
    r.close()
    other_gistnet, _ = tiny_nets(cfg, seed=9)
    with pytest.raises(TreeModelMismatchError):
        MCSession.open(tmp_path / "sess", model, tok, other_gistnet, lensnet)
    with pytest.raises(UserError, match="no saved session"):
        MCSession.open(tmp_path / "nothing", model, tok, gistnet, lensnet)


def test_tree_of_another_model_is_refused():
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    cfg = tiny_cfg()
    gistnet, lensnet = tiny_nets(cfg)
    tree = MegaContextTree.in_memory(cfg.block_size, 32, model_id="someone-else")
    with pytest.raises(UserError, match="does not belong to this model"):
        MCSession(model, tok, gistnet, lensnet, cfg, tree=tree)
    assert model_fingerprint(model, gistnet) != model_fingerprint(
        tiny_model(tok.get_vocab_size(), 1), gistnet
    )


@pytest.mark.parametrize("lookahead", [True, False])
def test_refocus_looks_ahead_into_lod2_gists(lookahead):
    """As in the evaluation views: a scorer that only recognises the evidence at LOD1 or raw (as one trained on
    one-edit utilities does) zooms the chat's WC from the LOD2 gist hiding it down to the raw block over
    successive refocuses, only with look-ahead."""
    s = tiny_session(lookahead=lookahead)
    s.ingest(np.random.default_rng(3).integers(20, s.model.config.vocab_size, 200))
    lod2 = next(e for e in s.wc.entries if e.level == 2)
    target = lod2.start + 5

    def scripted(wc=None):  # the evidence's own LOD1/raw 1, other raw blocks -1, other gists 0.5, ancestors 0
        def score(e):
            if e.start <= target < e.end:
                return 1.0 if e.level <= 1 else 0.0
            return -1.0 if e.level == 0 else 0.5

        return torch.tensor([score(e) for e in (wc or s.wc).entries])

    s.lens_scores_many = lambda wcs: [scripted(w) for w in wcs]
    s._scores = None  # the settle's last LensNet scores, kept for an idle round: not the scripted scorer's
    for _ in range(8):
        s.refocus()
        s.wc.check(s.tree)
    reached = any(e.level == 0 and e.start <= target < e.end for e in s.wc.entries)
    assert reached == lookahead, s.wc.render()


def test_refocus_scores_its_lookahead_in_one_lens_call_and_skips_idle_rounds():
    """A refocus scores its WC and every look-ahead what-if WC in one padded LensNet call, with the scores each
    gets alone; a settle's idle round (same WC, same history) reuses them instead of running LensNet again."""
    s = tiny_session()
    s.ingest(np.random.default_rng(5).integers(20, s.model.config.vocab_size, 600))
    calls = []
    s.lensnet.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    wc = s.wc
    what_ifs = [wc] + [_expanded(wc, i) for i, e in enumerate(wc.entries) if e.level == 2]
    assert len(what_ifs) > 2 and len({len(w.entries) for w in what_ifs}) > 1  # padded to one batch
    together = s.lens_scores_many(what_ifs)
    alone = [s.lens_scores_many([w])[0] for w in what_ifs]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    one_by_one = lookahead_scores(wc, s.view, lambda w: s.lens_scores_many([w])[0], max_level=2)
    calls.clear()
    s._scores = None  # the settle may have ended on idle rounds, which keep this WC's scores
    s.refocus()
    assert calls == [len(what_ifs)]  # one LensNet call, all contexts
    torch.testing.assert_close(s._scores[1], one_by_one, rtol=1e-5, atol=1e-5)
    s.wc = wc  # as if that refocus had made no edit: the same WC against the same history
    calls.clear()
    s.refocus()
    assert calls == []
    s.ingest(np.array([21, 22, 23, 24]))  # a new block: a new query, scored afresh
    assert calls


def test_reply_tokens_make_room_by_collapsing_what_the_lens_values_least():
    """A settled WC fills its budget, so each new token overflows it until the next refocus. The room comes from
    the entries LensNet scores lowest, not from the oldest raw block: after a question that block is often the
    evidence the focus opened, and an answer that lost it mid-way misread the key."""
    s = tiny_session(tau_expand=10.0, tau_collapse=10.0)  # the refocuses themselves edit nothing
    s.ingest(np.random.default_rng(7).integers(20, s.model.config.vocab_size, 200))
    K, wc = s.K, WorkingContext.coarsest(s.view, s.cfg.wc_budget, s.cfg.recent)
    while wc.cost + K - 1 <= wc.budget:  # open the oldest gists down to raw blocks: the budget fills up
        i = next(i for i, e in enumerate(wc.entries) if e.level >= 1)
        e = wc.entries[i]
        wc = wc.apply([Edit("expand", e.level, e.index(K))], s.view)
    s.wc = wc
    target = wc.entries[0]
    assert target.level == 0 and wc.cost > wc.budget - K + 1

    def scripted(w):  # the oldest raw block is what the lens wants; other raw blocks it values least
        return torch.tensor([1.0 if e == target else -0.5 if e.level == 0 else 0.0 for e in w.entries])

    s.lens_scores_many = lambda wcs: [scripted(w) for w in wcs]
    for token in np.random.default_rng(8).integers(20, s.model.config.vocab_size, 3 * K):
        s.push(int(token))
        s.wc.check(s.tree)
        assert target in s.wc.entries, s.wc.render()
    assert s.wc.num_tokens == s.tree.num_tokens and s.wc.cost <= s.wc.budget
