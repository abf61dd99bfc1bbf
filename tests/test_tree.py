"""MegaContext tree: node math, gisting exactly the complete blocks, RAM/disk agreement, reopen, and a SIGKILL test."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tree_writer import D as WD
from _tree_writer import K as WK
from _tree_writer import fake_embed, fake_gist, token_stream

from megacontext.storage import HEADER_SIZE
from megacontext.tree import MegaContextTree, TreeConfigError, TreeCorruptError, TreeModelMismatchError

K, D = 4, 6
WRITER = Path(__file__).with_name("_tree_writer.py")


def embed(ids):
    """[B, K] -> [B, K, D] with channel-dependent integer values."""
    return ((ids.unsqueeze(-1) * torch.arange(1, D + 1)) % 13).float()


def reference_gists(ids: np.ndarray, level_fn=lambda x, lv: x.mean(1) + lv) -> list[np.ndarray]:
    """Gists computed directly from the definition: level n node i = gist of K level n-1 nodes."""
    levels = [None, level_fn(embed(torch.from_numpy(ids[: len(ids) // K * K]).view(-1, K)), 1).numpy()]
    while len(levels[-1]) >= K:
        prev = levels[-1][: len(levels[-1]) // K * K]
        levels.append(level_fn(torch.from_numpy(prev).view(-1, K, D), len(levels)).numpy())
    return levels


def test_node_math():
    t = MegaContextTree.in_memory(32, 8)
    assert t.node_span(0, 5) == (5, 6)
    assert t.node_span(1, 3) == (96, 128)
    assert t.node_span(2, 2) == (2048, 3072)
    assert t.node_span(3, 1) == (32768, 65536)
    assert t.parent(0, 95) == (1, 2) and t.parent(1, 33) == (2, 1) and t.parent(2, 31) == (3, 0)
    assert t.children(1, 3) == [(0, j) for j in range(96, 128)]  # level 1's children are its tokens
    assert t.children(2, 1) == [(1, j) for j in range(32, 64)]
    for level, index in [(1, 0), (1, 7), (2, 5), (3, 2)]:
        for child in t.children(level, index):
            assert t.parent(*child) == (level, index)
        start, end = t.node_span(level, index)
        spans = [t.node_span(*c) for c in t.children(level, index)]
        assert spans[0][0] == start and spans[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # children tile the parent
    with pytest.raises(ValueError):
        t.children(0, 3)
    with pytest.raises(ValueError):
        t.node_span(-1, 0)


def test_counts_pending_and_max_level():
    t = MegaContextTree.in_memory(K, D)
    assert (t.num_tokens, t.max_level, t.pending()) == (0, 0, False)
    t.append([1, 2, 3])
    assert (t.num_complete(1), t.pending()) == (0, False)  # an incomplete block is never gisted
    t.append(torch.arange(14))  # 17 tokens: 4 complete LOD1 blocks, 1 LOD2
    assert (t.num_complete(1), t.num_complete(2), t.num_complete(3)) == (4, 1, 0)
    assert t.pending() and t.max_level == 0
    assert t.gist_pending(embed, fake_gist) == {1: 4, 2: 1}
    assert (t.num_nodes(1), t.num_nodes(2), t.max_level, t.pending()) == (4, 1, 2, False)
    assert t.gist_pending(embed, fake_gist) == {}


def test_gist_pending_computes_exactly_the_complete_nodes():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=1000)
    t = MegaContextTree.in_memory(K, D)
    seen_blocks, seen_levels = [], []

    def recording_embed(x):
        seen_blocks.extend(x.tolist())
        return embed(x)

    def recording_gist(x, level):
        assert x.shape[1:] == (K, D) and not torch.is_grad_enabled()
        seen_levels.extend([level] * len(x))
        return fake_gist(x, level)

    pos = 0
    while pos < len(ids):  # ragged appends, gisting after each, so blocks complete across appends
        n = int(rng.integers(1, 40))
        t.append(ids[pos : pos + n])
        pos += n
        t.gist_pending(recording_embed, recording_gist, batch_size=int(rng.integers(1, 9)))
        for level in range(1, 6):
            assert t.num_nodes(level) == t.num_complete(level) == pos // K**level
    # every embedded block is a complete aligned block of the stream, each exactly once, in order
    assert seen_blocks == ids[: len(ids) // K * K].reshape(-1, K).tolist()
    assert sorted(seen_levels) == [lv for lv in range(1, 5) for _ in range(len(ids) // K**lv)]
    ref = reference_gists(ids)
    assert t.max_level == len(ref) - 1 == 4
    for level in range(1, len(ref)):
        np.testing.assert_allclose(t.gists(level, range(t.num_nodes(level))).numpy(), ref[level], rtol=1e-6)


def test_reads_and_inputs():
    t = MegaContextTree.in_memory(K, D)
    t.append(np.arange(20))
    t.append([20, 21])
    t.append(torch.tensor([22, 23], dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        t.append([1.5])
    tok = t.tokens(18, 24)
    assert tok.dtype == torch.long and tok.tolist() == list(range(18, 24))
    t.gist_pending(embed, fake_gist)
    g = t.gists(1, torch.tensor([5, 0, 5]))
    assert g.shape == (3, D) and g.dtype == torch.float32
    assert torch.equal(g[0], t.gist(1, 5)) and torch.equal(g[1], t.gists(1, [0])[0])
    assert torch.equal(t.gists(1, range(2, 4)), t.gists(1, [2, 3]))
    assert t.gists(1, []).shape == (0, D)
    with pytest.raises(IndexError):
        t.gist(1, 6)
    with pytest.raises(IndexError):
        t.tokens(0, 25)
    with pytest.raises(ValueError, match="shape"):
        t.append(range(8))
        t.gist_pending(embed, lambda x, lv: x.mean(1)[:, :2])


def test_ram_and_disk_agree_and_reopen_continues(tmp_path):
    ids = np.random.default_rng(1).integers(0, 2**32 - 1, size=700, dtype=np.int64)
    ram = MegaContextTree.in_memory(K, D, model_id="m", dtype="fp16")
    ram.append(ids)
    ram.gist_pending(embed, fake_gist, batch_size=1000)
    for cut in (0, 3, 250, 699):  # continue a disk tree from several points, across close/reopen
        path = tmp_path / f"cut{cut}"
        with MegaContextTree.open(path, K=K, d=D, model_id="m") as disk:
            disk.append(ids[:cut])
            disk.gist_pending(embed, fake_gist, batch_size=7)
        with MegaContextTree.open(path, model_id="m") as disk:
            assert (disk.K, disk.d, disk.num_tokens) == (K, D, cut)
            disk.append(ids[cut:])
            disk.gist_pending(embed, fake_gist, batch_size=3)
        disk = MegaContextTree.open(path)
        assert torch.equal(disk.tokens(0, 700), torch.from_numpy(ids))
        for level in range(1, ram.max_level + 1):
            assert disk.num_nodes(level) == ram.num_nodes(level)
            assert torch.equal(
                disk.gists(level, range(ram.num_nodes(level))), ram.gists(level, range(ram.num_nodes(level)))
            )
        disk.close()


def test_open_errors(tmp_path):
    MegaContextTree.open(tmp_path, K=K, d=D, model_id="gistnet@100").close()
    with pytest.raises(TreeModelMismatchError, match="gistnet@100"):
        MegaContextTree.open(tmp_path, model_id="gistnet@200")
    with pytest.raises(TreeConfigError):
        MegaContextTree.open(tmp_path, K=32)
    with pytest.raises(TreeConfigError):
        MegaContextTree(K, D + 1, MegaContextTree.in_memory(K, D).storage)
    p = tmp_path / "LOD0.ctx"
    raw = bytearray(p.read_bytes())
    raw[12] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(TreeCorruptError, match="LOD0.ctx"):
        MegaContextTree.open(tmp_path)


def check_tree(path: Path, acked: int, ref: MegaContextTree) -> int:
    """Everything acknowledged is intact, nothing beyond the committed records is left on disk."""
    tree = MegaContextTree.open(path, model_id="fake-mean")
    n = tree.num_tokens
    assert n >= acked
    assert np.array_equal(tree.tokens(0, n).numpy(), token_stream(0, n))
    level = 1
    while tree.num_complete(level) > 0:
        have = tree.num_nodes(level)
        assert acked // WK**level <= have <= tree.num_complete(level)  # the writer gists before acknowledging
        assert torch.equal(tree.gists(level, range(have)), ref.gists(level, range(have)))
        level += 1
    for lv in range(level + 1):  # the torn tail is gone: each file is header + committed records
        f = path / f"LOD{lv}.ctx"
        if f.exists():
            assert f.stat().st_size == HEADER_SIZE + tree.num_nodes(lv) * (4 if lv == 0 else WD * 2)
    tree.close()
    return n


def test_sigkill_never_loses_acknowledged_blocks(tmp_path):
    total = 100_000
    ref = MegaContextTree.in_memory(WK, WD, dtype="fp16")
    ref.append(token_stream(0, total))
    ref.gist_pending(fake_embed, fake_gist, batch_size=512)
    rng = random.Random(1234)
    path, acked, tails = tmp_path / "tree", 0, 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_ in range(4):
        cmd = [sys.executable, str(WRITER), str(path), "--total", str(total), "--seed", str(round_)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        start = int(proc.stdout.readline().split()[1])
        assert start >= acked  # the new writer continues from at least what was acknowledged
        for _ in range(rng.randint(1, 5)):
            acked = int(proc.stdout.readline().split()[1])
        time.sleep(rng.uniform(0.0, 0.02))  # land somewhere inside the next append/gist/commit
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        acked = max([acked] + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("ack")])
        committed = json.loads((path / "manifest.json").read_text())["counts"][0]
        tails += (path / "LOD0.ctx").stat().st_size > HEADER_SIZE + 4 * committed  # unacknowledged bytes left
        check_tree(path, acked, ref)
    assert tails > 0, "no kill left an unacknowledged tail: the test did not exercise recovery"
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
    assert proc.stdout.splitlines()[-1] == "done"
    assert check_tree(path, total, ref) == total
    with MegaContextTree.open(path) as tree:
        assert not tree.pending() and tree.max_level == 3
