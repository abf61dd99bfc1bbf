"""Working context: named invariant errors, initial assembly, atomic edits, ingestion, materialisation, render."""

import math

import pytest
import torch

from megacontext.entries import (
    AlignmentError,
    BudgetError,
    ContiguityError,
    Edit,
    Entry,
    InvariantError,
    LevelError,
    RecencyError,
)
from megacontext.working_context import WorkingContext


class FakeTree:
    """The read API of megacontext.tree with deterministic ids and gists; `gisted` caps the gisted tokens
    so pending (not yet gisted) blocks can be simulated."""

    def __init__(self, K: int, d: int = 6):
        self.K, self.d, self.ids, self.gisted = K, d, [], 0

    def append(self, n: int, gist: bool = True) -> None:
        self.ids += [(len(self.ids) + j) * 7 % 101 for j in range(n)]
        if gist:
            self.gisted = len(self.ids)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def num_nodes(self, level: int) -> int:
        return len(self.ids) if level == 0 else self.gisted // self.K**level

    @property
    def max_level(self) -> int:
        level = 0
        while self.num_nodes(level + 1) > 0:
            level += 1
        return level

    def tokens(self, start: int, end: int) -> torch.Tensor:
        return torch.tensor(self.ids[start:end], dtype=torch.long)

    def gists(self, level: int, indices) -> torch.Tensor:
        assert all(0 <= i < self.num_nodes(level) for i in indices), "read of a gist that does not exist"
        return torch.stack([torch.full((self.d,), level * 1000.0 + i) for i in indices])

    def node_span(self, level: int, index: int) -> tuple[int, int]:
        return index * self.K**level, (index + 1) * self.K**level


def E(level: int, start: int, end: int) -> Entry:
    return Entry(level, start, end)


def tree_with(K: int, n: int) -> FakeTree:
    t = FakeTree(K)
    t.append(n)
    return t


# ---------------------------------------------------------------- one test per named error


def test_budget_error_lists_entries():
    with pytest.raises(BudgetError, match=r"cost 8 exceeds budget 7.*\[L0 0:4\]"):
        WorkingContext([E(0, 0, 4), E(0, 4, 8)], K=4, budget=7, recent=0)


def test_contiguity_errors():
    with pytest.raises(ContiguityError, match=r"\[L1 0:4\]\[L1 8:12\]"):  # gap
        WorkingContext([E(1, 0, 4), E(1, 8, 12)], K=4, budget=9, recent=0)
    with pytest.raises(ContiguityError, match="overlap"):
        WorkingContext([E(2, 0, 16), E(1, 12, 16)], K=4, budget=9, recent=0)
    with pytest.raises(ContiguityError, match="start at token 0"):
        WorkingContext([E(1, 4, 8)], K=4, budget=9, recent=0)
    wc = WorkingContext([E(1, 0, 4)], K=4, budget=9, recent=0)
    with pytest.raises(ContiguityError, match="extend"):  # tree moved on, WC not extended
        wc.check(tree_with(4, 6))


def test_alignment_errors():
    with pytest.raises(AlignmentError, match=r"\[L2 2:6\]"):  # LOD2 must start at a multiple of K**2
        WorkingContext([E(0, 0, 2), E(2, 2, 6)], K=2, budget=9, recent=0)
    with pytest.raises(AlignmentError, match=r"only the newest may be incomplete.*\[L0 0:4\]"):
        WorkingContext([E(0, 0, 4), E(0, 4, 8)], K=8, budget=9, recent=0)
    with pytest.raises(AlignmentError, match=r"\[L0 0:6\]"):  # a raw block longer than K
        WorkingContext([E(0, 0, 6)], K=4, budget=9, recent=0)


def test_level_errors():
    with pytest.raises(LevelError, match=r"K\*\*n.*\[L2 0:8\]"):  # LOD2 with K=4 covers 16 tokens
        WorkingContext([E(2, 0, 8)], K=4, budget=9, recent=0)
    tree = FakeTree(4)
    tree.append(16, gist=False)
    tree.gisted = 8  # blocks 2 and 3 not gisted yet
    wc = WorkingContext([E(1, 0, 4), E(1, 4, 8), E(1, 8, 12), E(0, 12, 16)], K=4, budget=9, recent=0)
    with pytest.raises(LevelError, match=r"not stored in the tree.*\[L1 8:12\]"):
        wc.check(tree)


def test_recency_error():
    with pytest.raises(RecencyError, match=r"\[6, 8\).*\[L1 4:8\]"):
        WorkingContext([E(1, 0, 4), E(1, 4, 8)], K=4, budget=9, recent=2)


def test_errors_share_the_base_class():
    for cls in (BudgetError, ContiguityError, AlignmentError, LevelError, RecencyError):
        assert issubclass(cls, InvariantError)


# ---------------------------------------------------------------- initial assembly


def test_from_tree_fills_budget_with_raw_tail_and_coarsest_gists():
    tree = tree_with(4, 70)  # LOD1 x17, LOD2 x4, LOD3 x1
    wc = WorkingContext.from_tree(tree, budget=20, recent=6)
    assert wc.render() == (
        "[L2 0:16][L2 16:32][L2 32:48][L1 48:52][L1 52:56][L0 56:60][L0 60:64][L0 64:68][L0 68:70]"
    )
    assert wc.cost == 19  # one more raw block would need 22
    assert WorkingContext.coarsest(tree, 7, 6).render() == "[L3 0:64][L0 64:68][L0 68:70]"
    assert WorkingContext.from_tree(tree, budget=7, recent=6).render() == "[L3 0:64][L0 64:68][L0 68:70]"
    with pytest.raises(BudgetError, match="coarsest tiling needs 1 gists \\+ 6 raw tokens"):
        WorkingContext.from_tree(tree, budget=6, recent=6)
    assert WorkingContext.from_tree(tree, budget=100, recent=0).render() == "".join(
        f"[L0 {s}:{min(s + 4, 70)}]" for s in range(0, 70, 4)
    )


@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_from_tree_is_maximal_and_legal(K):
    for n in [0, 1, K - 1, K, K * K + 1, 5 * K**2 + 3, K**3 + K]:
        tree = tree_with(K, n)
        for budget in range(K + 2 * K, 6 * K, 3):
            try:
                wc = WorkingContext.from_tree(tree, budget, recent=K)
            except BudgetError:
                continue
            wc.check(tree)
            raw_start = next((e.start for e in wc.entries if e.level == 0), n)
            assert raw_start <= max(0, n - K)  # at least the recent tokens are raw
            if raw_start >= K:  # the next raw block would not have fitted
                finer = WorkingContext.coarsest(tree, 10**9, n - raw_start + K)
                assert finer.cost > budget


def test_pending_blocks_stay_raw():
    tree = FakeTree(4)
    tree.append(40, gist=False)
    tree.gisted = 16
    wc = WorkingContext.coarsest(tree, budget=40, recent=0)
    assert wc.render() == "[L2 0:16]" + "".join(f"[L0 {s}:{s + 4}]" for s in range(16, 40, 4))


# ---------------------------------------------------------------- edits


def test_apply_round_trip_versions_and_illegal_edits():
    tree = tree_with(4, 70)
    wc = WorkingContext.from_tree(tree, budget=20, recent=6)
    small = wc.apply([Edit("collapse", 1, 14)], tree)  # the raw block [56, 60) -> its LOD1 gist
    assert small.entries[5] == E(1, 56, 60) and (small.cost, small.version, small.dirty_from) == (16, 1, 56)
    grown = small.apply([Edit("expand", 2, 0)], tree)
    assert grown.entries[:4] == (E(1, 0, 4), E(1, 4, 8), E(1, 8, 12), E(1, 12, 16))
    assert (grown.cost, grown.version, grown.dirty_from, wc.version) == (19, 2, 0, 0)
    back = grown.apply([Edit("collapse", 2, 0), Edit("expand", 1, 14)], tree)
    assert back.entries == wc.entries and back == wc and back.version == 3
    assert wc.apply([], tree) is wc
    with pytest.raises(BudgetError):  # 19 + 3 + 3 > 20
        wc.apply([Edit("expand", 2, 0), Edit("expand", 2, 1)], tree)
    with pytest.raises(LevelError, match="not an entry"):
        wc.apply([Edit("expand", 1, 0)], tree)
    with pytest.raises(LevelError, match="not all entries"):
        wc.apply([Edit("collapse", 3, 0)], tree)  # LOD2 x3 + LOD1 x4: not the 4 children of L3#0
    with pytest.raises(RecencyError):
        wc.apply([Edit("collapse", 1, 16)], tree)  # [64, 68) overlaps the recent 6 tokens
    with pytest.raises(LevelError):
        Edit("expand", 0, 3)  # a raw block has no finer level
    with pytest.raises(ValueError):
        Edit("shrink", 1, 0)


def test_expand_within_budget_round_trip():
    tree = tree_with(4, 70)
    wc = WorkingContext.from_tree(tree, budget=30, recent=6)
    for e in [e for e in wc.entries if e.level >= 1]:
        node = (e.level, e.index(4))
        out = wc.apply([Edit("expand", *node)], tree)
        assert out.cost == wc.cost + 3
        assert out.apply([Edit("collapse", *node)], tree).entries == wc.entries


def test_collapse_into_missing_parent_is_refused():
    tree = FakeTree(4)
    tree.append(24, gist=False)
    tree.gisted = 16
    wc = WorkingContext.from_tree(tree, budget=40, recent=0)
    with pytest.raises(LevelError, match=r"\[L1 16:20\]"):
        wc.apply([Edit("collapse", 1, 4)], tree)


# ---------------------------------------------------------------- ingestion


# budgets hold the coarsest tiling of ~600 tokens: (K-1) gists per level + recent + one block
@pytest.mark.parametrize("K,budget,recent", [(2, 16, 2), (4, 24, 5), (4, 30, 0), (8, 40, 8)])
def test_extend_ingests_and_makes_room_in_the_oldest_history(K, budget, recent):
    tree = tree_with(K, 3)
    wc = WorkingContext.from_tree(tree, budget, recent)
    for step in range(300):
        tree.append(1 + step % 3)
        old = wc
        wc = wc.extend(tree)
        wc.check(tree)
        assert wc.num_tokens == tree.num_tokens and wc.cost <= budget and wc.version == old.version + 1
        assert all(e.level == 0 for e in wc.entries if e.end > tree.num_tokens - recent)
        assert wc.dirty_from is not None and wc.dirty_from <= old.num_tokens
        changed = [e for e in old.entries if e not in wc.entries]
        assert all(e.start >= wc.dirty_from for e in changed)
    assert wc.extend(tree) is wc


def test_extend_collapses_oldest_first_and_cascades():
    tree = tree_with(2, 8)
    wc = WorkingContext([E(1, 0, 2), E(0, 2, 4), E(0, 4, 6), E(0, 6, 8)], K=2, budget=7, recent=2)
    tree.append(2)  # +2 raw tokens: 2 over budget, [2, 4) collapses, then L1 pair [0, 4) -> L2
    wc = wc.extend(tree)
    assert wc.render() == "[L2 0:4][L0 4:6][L0 6:8][L0 8:10]"
    assert (wc.cost, wc.dirty_from) == (7, 0)


def test_extend_without_gists_raises_budget_error():
    tree = tree_with(4, 8)
    wc = WorkingContext.from_tree(tree, budget=6, recent=4)
    assert wc.render() == "[L1 0:4][L0 4:8]"
    tree.append(8, gist=False)  # [4, 8) can still be gisted, [8, 12) cannot
    with pytest.raises(BudgetError, match="gisted"):
        wc.extend(tree)


# ---------------------------------------------------------------- tensors and reporting


def test_materialize_positions_embeds_and_cache():
    tree = tree_with(4, 70)
    wc = WorkingContext.from_tree(tree, budget=20, recent=6)
    embed = torch.nn.Embedding(101, tree.d)
    out = wc.materialize(tree, embed, "cpu")
    L = wc.cost
    assert out.embeds.shape == (L, tree.d) and out.mu.shape == out.sigma.shape == out.lod.shape == (L,)
    assert out.mu.dtype == torch.float32 and out.lod.dtype == torch.long and out.version == wc.version
    raw = out.lod == 0
    assert torch.equal(out.mu[raw], torch.arange(56, 70, dtype=torch.float32))  # raw: global position
    assert torch.all(out.sigma[raw] == 0)
    assert torch.equal(out.token_ids[raw], tree.tokens(56, 70))
    assert torch.all(out.token_ids[~raw] == -1)
    assert torch.allclose(out.embeds[raw], embed(tree.tokens(56, 70)))
    for row in torch.nonzero(~raw).reshape(-1).tolist():
        e = wc.entries[out.entry_index[row]]
        assert out.lod[row] == e.level and e.level >= 1
        assert out.mu[row].item() == pytest.approx(e.start + e.size / 2)
        assert out.sigma[row].item() == pytest.approx(e.size / math.sqrt(12))
        assert torch.equal(out.embeds[row], tree.gists(e.level, [e.index(4)])[0])
    assert out.mu[0].item() == 8.0 and out.sigma[0].item() == pytest.approx(16 / math.sqrt(12))
    out.embeds.sum().backward()  # the raw rows stay differentiable w.r.t. the embedding
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
    again = wc.materialize(tree, embed, "cpu")
    assert again.mu is out.mu  # positions cached for an unchanged WC


def test_materialize_all_gists_and_empty():
    tree = tree_with(2, 8)
    wc = WorkingContext.coarsest(tree, budget=4, recent=0)
    out = wc.materialize(tree, lambda ids: torch.zeros(len(ids), tree.d), "cpu")
    assert wc.render() == "[L3 0:8]" and out.embeds.shape == (1, tree.d) and out.mu.tolist() == [4.0]
    empty = WorkingContext([], K=2, budget=4, recent=2)
    assert empty.materialize(tree_with(2, 0), None, "cpu").embeds.shape == (0, tree.d)


def test_render_histogram_residency():
    wc = WorkingContext([E(2, 0, 16), E(1, 16, 20), E(0, 20, 24), E(0, 24, 26)], K=4, budget=10, recent=3)
    assert wc.render() == "[L2 0:16][L1 16:20][L0 20:24][L0 24:26]"
    assert wc.lod_histogram() == {0: 2, 1: 1, 2: 1}
    assert (wc.cost, wc.num_entries, wc.num_tokens) == (8, 4, 26)
    assert wc.residency == pytest.approx(6 / 10)
    assert "[L2 0:16]" in repr(wc)


# ---------------------------------------------------------------- against the real tree


def test_with_real_tree():
    from megacontext.tree import MegaContextTree

    K, d = 4, 6
    tree = MegaContextTree.in_memory(K, d)

    def embed(ids):
        return ((ids.unsqueeze(-1) * torch.arange(1, d + 1)) % 13).float()

    def gist(x, level):
        return x.mean(1) + level

    tree.append(torch.arange(70) % 50)
    tree.gist_pending(embed, gist)
    wc = WorkingContext.from_tree(tree, budget=20, recent=6)
    assert wc.render().startswith("[L2 0:16][L2 16:32][L2 32:48][L1 48:52]")
    wc = wc.apply([Edit("collapse", 1, 14), Edit("expand", 2, 1)], tree)
    out = wc.materialize(tree, embed, "cpu")
    rows = torch.nonzero(out.lod == 2).reshape(-1).tolist()
    assert torch.allclose(out.embeds[rows[0]], tree.gists(2, [0])[0])
    assert torch.allclose(out.embeds[out.lod == 0], embed(tree.tokens(60, 70)))
    for _ in range(30):
        tree.append([7, 8, 9])
        tree.gist_pending(embed, gist)
        wc = wc.extend(tree)
        wc.check(tree)
    assert wc.cost <= 20 and wc.num_tokens == 160
