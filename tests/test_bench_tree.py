"""bench_tree's figures add up (docs/scale.md's arithmetic), and a live tree copies consistently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from megacontext.storage import HEADER_SIZE
from megacontext.tree import MegaContextTree

REPO = Path(__file__).resolve().parents[1]


def test_bench_tree_prints_one_line_whose_sizes_match_the_format(tmp_path):
    args = "--tokens 70000 --chunk 8192 --gist mean --d 64 --block-size 8 --copy --quiet".split()
    out = subprocess.run(
        [sys.executable, "-m", "scripts.bench_tree", *args],
        cwd=REPO, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    r = json.loads(line)
    nodes = r["nodes_per_level"]
    assert nodes[0] == 70000 and nodes == [70000 // 8**lv for lv in range(len(nodes))] and len(nodes) == 6
    # the level files are a header and fixed-size records: uint32 tokens, fp16 gists of d values
    want = [HEADER_SIZE + n * (4 if lv == 0 else 2 * 64) for lv, n in enumerate(nodes)]
    assert r["bytes_per_level"] == want
    assert r["disk_bytes_per_token"] * 70000 >= sum(want)  # plus the manifest and the lock file
    for key in ("rss_mb_start", "rss_mb_mid", "rss_mb_end", "reopen_ms", "wc_read_cold_ms", "flush_ms_max"):
        assert r[key] > 0, key
    assert r["copy_s"] is not None and r["refocus_page_cache_kb"] >= 0
    assert not list(tmp_path.glob("bench_tree_*"))  # the trees are removed afterwards


def test_a_live_tree_copies_consistently_manifest_first(tmp_path):
    """docs/scale.md: copy manifest.json first, then the level files, even while the tree grows: files
    only grow, and opening cuts every level back to the copied manifest's counts."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    embed = torch.nn.Embedding(100, 16)
    mean = lambda x, level: x.mean(dim=1)
    tree = MegaContextTree.open(src, K=4, d=16, model_id="m")
    rng = np.random.default_rng(0)
    tree.append(rng.integers(0, 100, 1000))
    tree.gist_pending(embed, mean)
    tree.flush()
    dst.mkdir()
    shutil.copy(src / "manifest.json", dst / "manifest.json")  # the commit point, first
    tree.append(rng.integers(0, 100, 777))  # the writer goes on: appended, gisted, committed
    tree.gist_pending(embed, mean)
    tree.flush()
    for f in src.glob("LOD*.ctx"):
        shutil.copy(f, dst / f.name)
    copy = MegaContextTree.open(dst)
    assert copy.num_tokens == 1000 and [copy.num_nodes(lv) for lv in range(5)] == [1000, 250, 62, 15, 3]
    assert torch.equal(copy.tokens(0, 1000), tree.tokens(0, 1000))
    assert torch.equal(copy.gists(2, range(62)), tree.gists(2, range(62)))
    copy.close()
    tree.close()
