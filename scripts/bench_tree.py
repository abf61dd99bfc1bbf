"""Benchmark the on-disk MegaContext tree: ingest speed, bytes per token, and whether memory grows with history.

Builds a disk tree of --tokens random tokens at d=256 on CPU: embed with a random nn.Embedding, gist with
a freshly initialised GistNet (--gist gistnet; its weights do not matter for speed or size) or with a
plain mean of the block (--gist mean, no network: measures the storage path alone). Tokens arrive in
chunks of --chunk; each chunk is appended, gisted and committed (one fsync per level file per chunk).

Memory: VmRSS is read right after touching what a working context needs (the coarsest gists tiling the
old history plus the raw last --tail tokens), once early in the ingest (rss_mb_start) and once at the end
(rss_mb_end). Level files are memory-mapped and re-mapped as they grow, so the two should match: memory
is set by the working context, not by the history length (docs/design.md §9).

    python -m scripts.bench_tree                   # 1M tokens with GistNet
    python -m scripts.bench_tree --gist mean --tokens 200000
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from megacontext.tree import MegaContextTree
from nanochat.common import UserError, get_base_dir, run_main


def rss_mb() -> float:
    """Resident set size now (not the peak), from /proc: Linux only."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        raise UserError("bench_tree reads VmRSS from /proc/self/status, which needs Linux") from None
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def read_working_context(tree: MegaContextTree, tail: int) -> int:
    """Read the nodes a working context over the whole history needs: the fewest stored gists that tile
    [0, cut) (coarsest first) plus the raw tokens [cut, N). Returns how many entries that is."""
    K, n = tree.K, tree.num_tokens
    cut = max(0, n - tail) // K * K
    by_level: dict[int, list[int]] = {}
    pos = 0
    while pos < cut:
        level = 1
        while (
            pos % K ** (level + 1) == 0
            and pos + K ** (level + 1) <= cut
            and pos // K ** (level + 1) < tree.num_nodes(level + 1)
        ):
            level += 1
        by_level.setdefault(level, []).append(pos // K**level)
        pos += K**level
    for level, indices in by_level.items():
        tree.gists(level, indices)
    tree.tokens(cut, n)
    return sum(map(len, by_level.values())) + (n - cut)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1_000_000, help="history length to ingest")
    parser.add_argument("--gist", choices=["gistnet", "mean"], default="gistnet", help="gist function")
    parser.add_argument("--d", type=int, default=256, help="gist / embedding size")
    parser.add_argument("--block-size", type=int, default=32, help="K: tokens per LOD1 block")
    parser.add_argument("--n-head", type=int, default=4, help="GistNet heads")
    parser.add_argument("--n-layer", type=int, default=2, help="GistNet transformer blocks")
    parser.add_argument("--vocab", type=int, default=65536, help="vocabulary of the random token stream")
    parser.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="gist storage dtype"
    )
    parser.add_argument("--chunk", type=int, default=8192, help="tokens appended (and committed) per step")
    parser.add_argument("--gist-batch", type=int, default=256, help="blocks per GistNet call")
    parser.add_argument("--tail", type=int, default=512, help="raw tokens at the end of the working context")
    parser.add_argument(
        "--dir", default="", help="where to build the tree (default: a temp dir under the base dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the tree directory afterwards")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tokens < 2 * args.chunk or args.chunk < args.block_size:
        raise UserError(f"--tokens ({args.tokens}) must be >= 2 * --chunk ({args.chunk}) >= 2 * --block-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    embedding = nn.Embedding(args.vocab, args.d)
    if args.gist == "gistnet":
        from megacontext.gistnet import GistNet

        gistnet = GistNet(args.d, args.n_head, args.n_layer, args.block_size).eval()
        gist_fn, model_id = gistnet, f"bench-gistnet-seed{args.seed}"
    else:
        gist_fn, model_id = (lambda x, level: x.mean(dim=1)), "bench-mean"

    if args.dir:
        path = Path(args.dir)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"--dir {path} is not empty; the benchmark builds a fresh tree")
    else:
        path = Path(tempfile.mkdtemp(prefix="bench_tree_", dir=get_base_dir()))
    rng = np.random.default_rng(args.seed)
    tree = MegaContextTree.open(path, K=args.block_size, d=args.d, model_id=model_id, dtype=args.dtype)
    try:
        rss_start = ingest_seconds = 0.0
        while tree.num_tokens < args.tokens:
            n = min(args.chunk, args.tokens - tree.num_tokens)
            ids = rng.integers(0, args.vocab, size=n)
            t0 = time.perf_counter()
            tree.append(ids)
            tree.gist_pending(embedding, gist_fn, batch_size=args.gist_batch)
            tree.flush()
            ingest_seconds += time.perf_counter() - t0
            if tree.num_tokens == 2 * args.chunk:  # early: warm (first chunk done) but the history is short
                read_working_context(tree, args.tail)
                rss_start = rss_mb()
        entries = read_working_context(tree, args.tail)
        rss_end = rss_mb()
        disk_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        result = {
            "tokens": tree.num_tokens,
            "ingest_tokens_per_s": round(tree.num_tokens / ingest_seconds, 1),
            "disk_bytes_per_token": round(disk_bytes / tree.num_tokens, 3),
            "rss_mb_start": round(rss_start, 1),
            "rss_mb_end": round(rss_end, 1),
            "gist": args.gist,
            "d": args.d,
            "K": args.block_size,
            "dtype": args.dtype,
            "nodes_per_level": [tree.num_nodes(lv) for lv in range(tree.max_level + 1)],
            "wc_entries_read": entries,
            "threads": torch.get_num_threads(),
        }
    finally:
        tree.close()
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
