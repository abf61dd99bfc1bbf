"""Focus allocator (property tests over random appends and scores), random variants, and telemetry."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext.allocator import (
    FocusAllocator,
    collapse_groups,
    expandable,
    flank_scores,
    lookahead_scores,
    normalize_scores,
    random_variant,
)
from megacontext.entries import BudgetError, Edit, Entry
from megacontext.telemetry import Telemetry, format_line
from megacontext.working_context import WorkingContext


class FakeTree:
    """The read API of megacontext.tree: every complete block and run of K gists is gisted on append."""

    def __init__(self, K: int, d: int = 4):
        self.K, self.d, self.num_tokens = K, d, 0

    def append(self, n: int) -> None:
        self.num_tokens += n

    def num_nodes(self, level: int) -> int:
        return self.num_tokens if level == 0 else self.num_tokens // self.K**level

    @property
    def max_level(self) -> int:
        level = 0
        while self.num_nodes(level + 1) > 0:
            level += 1
        return level

    def tokens(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end) % 97

    def gists(self, level: int, indices) -> torch.Tensor:
        return torch.tensor([[level * 1000.0 + i] * self.d for i in indices])

    def node_span(self, level: int, index: int) -> tuple[int, int]:
        return index * self.K**level, (index + 1) * self.K**level


def tree_with(K: int, n: int) -> FakeTree:
    t = FakeTree(K)
    t.append(n)
    return t


def min_budget(K: int, max_tokens: int, recent: int) -> int:
    """Enough for the coarsest tiling of up to max_tokens: < K gists per level, plus the raw tail."""
    levels = 1
    while K**levels <= max_tokens:
        levels += 1
    return (K - 1) * levels + recent + 2 * K


PROPERTY_SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(
    K=st.sampled_from([2, 4, 8]),
    recent=st.integers(0, 10),
    extra=st.integers(0, 40),
    mode=st.sampled_from(["greedy", "greedy", "stochastic"]),
    cooldown=st.integers(0, 3),
    n_diff=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_random_refocus_sequences_keep_every_invariant(K, recent, extra, mode, cooldown, n_diff, seed):
    rng = random.Random(seed)
    steps = 60
    budget = min_budget(K, steps * 2 * K, recent) + extra
    tree = tree_with(K, rng.randint(0, 3 * K))
    wc = WorkingContext.from_tree(tree, budget, recent)
    alloc = FocusAllocator(K, budget, recent, n_diff=n_diff, cooldown=cooldown, mode=mode, seed=seed)
    last: dict[tuple[int, int], tuple[int, str]] = {}
    for step in range(steps):
        tree.append(rng.choice([0, 1, K - 1, K, 2 * K]))
        wc = wc.extend(tree)
        bias = rng.uniform(-0.5, 0.5)  # phases of mostly-expand / mostly-collapse pressure
        scores = torch.tensor([max(-1.0, min(1.0, rng.uniform(-1, 1) + bias)) for _ in wc.entries])
        protected = [e for e in wc.entries if wc.is_protected(e)]
        old = wc
        wc, edits = alloc.refocus(wc, scores, tree)
        wc.check(tree)
        assert len(edits) <= n_diff and wc.cost <= budget
        cost = old.cost
        for edit in edits:  # every prefix of the edit list stays within budget (no trimming afterwards)
            cost += (K - 1) if edit.kind == "expand" else -(K - 1)
            assert cost <= budget
        assert cost == wc.cost
        assert all(e in wc.entries for e in protected)  # recent tokens untouched
        assert all(e.level == 0 for e in wc.entries if e.end > wc.num_tokens - recent)
        for edit in edits:
            if edit.node in last and last[edit.node][1] != edit.kind:
                assert step - last[edit.node][0] > cooldown, f"{edit} flipped inside its cooldown"
            last[edit.node] = (step, edit.kind)
        assert alloc.refocus_count == step + 1


@PROPERTY_SETTINGS
@given(
    K=st.sampled_from([2, 3, 4, 8]), n=st.integers(0, 300), recent=st.integers(0, 9), seed=st.integers(0, 999)
)
def test_collapse_then_expand_restores_identical_entries(K, n, recent, seed):
    tree = tree_with(K, n)
    budget = min_budget(K, n, recent) + 3 * K
    wc = random_variant(tree, budget, recent, random.Random(seed))
    for edit, members in collapse_groups(wc, tree):
        down = wc.apply([edit], tree)
        assert down.cost == wc.cost - (K - 1)
        assert down.apply([Edit("expand", edit.level, edit.index)], tree).entries == wc.entries
        assert not any(wc.is_protected(wc.entries[i]) for i in members)
    for e in wc.entries:
        if expandable(e, tree, K) and wc.cost + K - 1 <= budget:
            up = wc.apply([Edit("expand", e.level, e.index(K))], tree)
            assert up.apply([Edit("collapse", e.level, e.index(K))], tree).entries == wc.entries


@PROPERTY_SETTINGS
@given(
    K=st.sampled_from([2, 4, 8]), n=st.integers(1, 600), recent=st.integers(0, 12), seed=st.integers(0, 999)
)
def test_random_variants_are_legal_full_and_diverse(K, n, recent, seed):
    tree = tree_with(K, n)
    budget = min_budget(K, n, recent) + 4 * K
    rng = random.Random(seed)
    variants = [random_variant(tree, budget, recent, rng) for _ in range(6)]
    for wc in variants:
        wc.check(tree)  # covers [0, n), within budget, recent raw, gists exist
        room = wc.cost + K - 1 <= budget
        assert not (room and any(expandable(e, tree, K) for e in wc.entries))  # expanded until full
    if n >= 4 * K**2:  # enough history for different mixes
        assert len(set(variants)) >= 2


def test_random_variant_impossible_budget():
    with pytest.raises(BudgetError, match="coarsest tiling"):
        random_variant(tree_with(4, 100), budget=5, recent=8, rng=random.Random(0))


# ---------------------------------------------------------------- hand-made cases


def wc_k4(budget=20, recent=6, n=70):
    tree = tree_with(4, n)
    return tree, WorkingContext.from_tree(tree, budget, recent)


def test_greedy_alternates_most_extreme_first_within_budget():
    # [L2 0:16][L2 16:32][L2 32:48][L1 48:52][L1 52:56][L0 56:60][L0 60:64][L0 64:68][L0 68:70], cost 19/20
    tree, wc = wc_k4()
    alloc = FocusAllocator(4, 20, 6, n_diff=4)
    scores = [0.9, 0.5, 0.95, 0, 0, -0.6, -0.9, 0.0, 0.0]
    edits = alloc.propose(wc, scores, tree)
    # collapse [60, 64) (most negative), expand L2#2 (most positive), collapse [56, 60), expand L2#0
    assert edits == [
        Edit("collapse", 1, 15),
        Edit("expand", 2, 2),
        Edit("collapse", 1, 14),
        Edit("expand", 2, 0),
    ]
    assert FocusAllocator(4, 20, 6, n_diff=2).propose(wc, scores, tree) == edits[:2]
    # no block below -tau_collapse and an expand needs 3 free slots (there is 1): within the hysteresis band
    # (0.25 vs 0.1: a gain of 0.15 <= tau_expand + tau_collapse) nothing is emitted ...
    assert alloc.propose(wc, [0.25, 0.25, 0.25, 0.25, 0.25, 0.1, 0.1, 0, 0], tree) == []
    # ... but a clearly better use of the room is taken: the lowest-scoring collapsible blocks (not below
    # -tau_collapse themselves) refund the gists the scorer ranks far above them (budget swaps)
    assert alloc.propose(wc, [0.9, 0.9, 0.9, 0.9, 0.9, 0, 0, 0, 0], tree) == [
        Edit("collapse", 1, 14),
        Edit("expand", 2, 0),
        Edit("collapse", 1, 15),
        Edit("expand", 2, 1),
    ]


def test_illegal_moves_are_never_emitted():
    tree, wc = wc_k4(budget=60)
    alloc = FocusAllocator(4, 60, 6, n_diff=10, tau_expand=0.1)
    positive_raw = [1.0 if e.level == 0 else 0.0 for e in wc.entries]
    assert alloc.propose(wc, positive_raw, tree) == []  # LOD0 cannot be expanded
    protected = [-1.0 if wc.is_protected(e) else 0.0 for e in wc.entries]
    assert alloc.propose(wc, protected, tree) == []  # the recent tokens are never gisted
    tree3 = tree_with(4, 64)
    top = WorkingContext.from_tree(tree3, 1, 0)
    assert top.render() == "[L3 0:64]" and FocusAllocator(4, 1, 0).propose(top, [-1.0], tree3) == []
    below_thresholds = [0.05 if e.level else -0.05 for e in wc.entries]
    assert alloc.propose(wc, below_thresholds, tree) == []
    with pytest.raises(ValueError, match="scores"):
        alloc.propose(wc, [0.0], tree)
    with pytest.raises(ValueError, match="does not match"):
        FocusAllocator(4, 61, 6).propose(wc, [0.0] * wc.num_entries, tree)


def test_cooldown_blocks_flips_for_cooldown_refocuses():
    tree = tree_with(4, 70)
    wc = WorkingContext.coarsest(tree, 23, 6)
    assert wc.render() == "[L3 0:64][L0 64:68][L0 68:70]"
    alloc = FocusAllocator(4, 23, 6, cooldown=2)
    wc, edits = alloc.refocus(wc, [1.0, 0.0, 0.0], tree)
    assert edits == [Edit("expand", 3, 0)] and wc.num_entries == 6
    collapse_all = [-1.0] * 4 + [0.0, 0.0]  # the 4 new LOD2 children want to go back at once
    for _ in range(2):  # refocuses 1 and 2: inside the cooldown
        wc, edits = alloc.refocus(wc, collapse_all, tree)
        assert edits == []
    wc, edits = alloc.refocus(wc, collapse_all, tree)  # refocus 3: allowed again
    assert edits == [Edit("collapse", 3, 0)]
    clone = FocusAllocator(4, 23, 6, cooldown=2)
    clone.load_state_dict(alloc.state_dict())
    assert clone.refocus_count == 4 and clone.last_edit == alloc.last_edit
    assert clone.rng.random() == alloc.rng.random()


def test_stochastic_is_seeded_and_respects_budget():
    tree, wc = wc_k4(budget=40)
    runs = []
    for seed in [0, 0, 1, 2, 3]:
        alloc = FocusAllocator(4, 40, 6, mode="stochastic", seed=seed, n_diff=3, temperature=0.5)
        scores_rng, w = random.Random(7), wc
        for _ in range(6):
            w, edits = alloc.refocus(w, [scores_rng.uniform(-1, 1) for _ in w.entries], tree)
            assert w.cost <= 40 and len(edits) <= 3
        runs.append(w.render())
    assert runs[0] == runs[1]  # same seed, same result
    assert len(set(runs[1:])) >= 2


# ---------------------------------------------------------------- telemetry


def test_telemetry_summary_keys_and_values():
    tree, wc = wc_k4()
    tel = Telemetry(max_snapshots=2, snapshot_every=1)
    alloc = FocusAllocator(4, 20, 6)
    for i in range(3):
        with tel.timer("controller"):
            wc, edits = alloc.refocus(wc, [-1.0 if i == 0 else 0.0] * wc.num_entries, tree)
        tel.record_refocus(wc, edits)
    tel.record_delta_nll(2.5, 2.0)
    tel.record_delta_nll(3.5, 3.0)
    tel.gauge("preference_agreement", 0.75)
    s = tel.summary()
    assert s["mc/refocuses"] == 3 and s["mc/edits_per_refocus"] == pytest.approx(2 / 3)  # 2 raw blocks gisted
    assert 0 < s["mc/swap_rate"] < 1 and s["mc/time_controller_ms"] >= 0
    assert s["mc/delta_nll"] == pytest.approx(0.5) and s["mc/preference_agreement"] == 0.75
    assert s["mc/residency"] == pytest.approx(wc.residency)
    assert {k: v for k, v in s.items() if k.startswith("mc/lod_hist/")} == {
        f"mc/lod_hist/L{lv}": c for lv, c in wc.lod_histogram().items()
    }
    assert len(tel.focus_maps()) == 2 and tel.focus_maps()[-1] == f"#2 {wc.render()}"
    assert "swap_rate" in format_line(s) and "mc/" not in format_line(s)
    tel.summary(reset=True)
    assert "mc/swap_rate" not in tel.summary() and tel.total_refocuses == 3


def test_entry_text():
    assert (
        str(Entry(2, 0, 1024)) == "[L2 0:1024]" and Entry(0, 64, 96).cost == 32 and Entry(1, 0, 32).cost == 1
    )


def test_lookahead_lets_the_allocator_zoom_from_lod3_to_the_raw_evidence():
    """A scorer that only recognises the evidence at LOD1 or raw (as one trained on one-edit utilities does):
    without look-ahead the LOD2 gist hiding it never expands; with it, refocusing reaches the raw block."""
    K, n, recent, target = 4, 200, 8, 21  # target token inside the LOD3 gist [0, 64)
    tree = tree_with(K, n)

    def scorer(wc):  # the evidence's own LOD1/raw 1, other raw blocks -1, other gists 0.5, its ancestors 0
        def score(e):
            if e.start <= target < e.end:
                return 1.0 if e.level <= 1 else 0.0
            return -1.0 if e.level == 0 else 0.5

        return torch.tensor([score(e) for e in wc.entries])

    wc0 = WorkingContext.from_tree(tree, 40, recent)
    lod2 = next(i for i, e in enumerate(wc0.entries) if e.start <= target < e.end)
    assert wc0.entries[lod2].level == 3  # two levels of gists between it and the raw evidence
    assert float(scorer(wc0)[lod2]) == 0.0 and float(lookahead_scores(wc0, tree, scorer)[lod2]) == 1.0
    for lookahead, reached in ((False, False), (True, True)):
        alloc, wc = FocusAllocator(K, 40, recent, 0.2, 0.2), wc0
        for _ in range(8):
            scores = lookahead_scores(wc, tree, scorer) if lookahead else scorer(wc)
            wc, _ = alloc.refocus(wc, normalize_scores(scores), tree)
            wc.check(tree)
        raw = any(e.level == 0 and e.start <= target < e.end for e in wc.entries)
        assert raw == reached, wc.render()


def test_flank_opens_the_blocks_beside_the_evidence_and_only_those():
    """The key's block is what the scorer recognises; the label naming it ends in the block before and the
    sentence repeating it follows in the next, which it rates like any other text. With flank the allocator opens
    both (and keeps them open), and not the blocks beyond them; without it they stay gisted."""
    K, n, recent, target = 4, 200, 8, 21  # the evidence block [20, 24), its flanks [16, 20) and [24, 28)
    tree = tree_with(K, n)

    def scorer(wc):  # the evidence's own LOD1/raw 1, other raw blocks -1, other gists 0
        def score(e):
            if e.start <= target < e.end:
                return 1.0 if e.level <= 1 else 0.0
            return -1.0 if e.level == 0 else 0.0

        return torch.tensor([score(e) for e in wc.entries])

    def raw(wc, start):
        return any(e.level == 0 and e.start == start for e in wc.entries)

    wc0 = WorkingContext.from_tree(tree, 40, recent)
    for flank in (False, True):
        alloc, wc = FocusAllocator(K, 40, recent, 0.2, 0.2, flank=flank), wc0
        for _ in range(10):
            wc, _ = alloc.refocus(wc, normalize_scores(lookahead_scores(wc, tree, scorer)), tree)
            wc.check(tree)
        assert raw(wc, 20) and raw(wc, 16) == raw(wc, 24) == flank, wc.render()
        assert not raw(wc, 12) and not raw(wc, 28), wc.render()
    # the scores themselves: a gist beside an opened raw block takes its score; a protected block passes none on
    wc = WorkingContext(
        [Entry(1, 0, 4), Entry(1, 4, 8), Entry(0, 8, 12), Entry(1, 12, 16), Entry(0, 16, 20)], K, 40, 4
    )
    assert flank_scores(wc, [0.1, -0.5, 0.2, -0.2, 0.7]) == [0.1, 0.2, 0.2, 0.2, 0.7]
