"""Benchmark the on-disk MegaContext tree: ingest speed, bytes per token, and whether memory grows with history.

Builds a disk tree of --tokens random tokens at d=256 on CPU: embed with a random nn.Embedding, gist with
a freshly initialised GistNet (--gist gistnet; its weights do not matter for speed or size) or with a
plain mean of the block (--gist mean, no network: measures the storage path alone). Tokens arrive in
chunks of --chunk; each chunk is appended, gisted and committed (one fsync per level file per chunk).

Memory: VmRSS is read right after touching what a working context needs (the coarsest gists tiling the
old history plus the raw last --tail tokens), early in the ingest (rss_mb_start), halfway (rss_mb_mid)
and at the end (rss_mb_end), with its anonymous and file-mapped parts at start and end. Level files are
memory-mapped and re-mapped as they grow, so memory is set by the working context, not by the history
length (docs/design.md §9): mid and end should match. Start can sit lower: each new level's first gists and the
allocator's high-water mark come after it.

Save and reopen (what a session costs at this size; a disk session's save() only commits its tree):
flush_ms_mean / flush_ms_max time the per-chunk commit; then the tree is closed, its files dropped from
the page cache (posix_fadvise DONTNEED: a cold start), reopened (reopen_ms) and the working context read
again (wc_read_cold_ms). refocus_page_cache_kb counts the file pages that read brought into the page
cache (mincore): the page-cache working set of a refocus, read-ahead included. --copy also times
copy_tree (copying a tree to another directory).

    python -m scripts.bench_tree                   # 1M tokens with GistNet
    python -m scripts.bench_tree --gist mean --tokens 200000
    OMP_NUM_THREADS=1 python -m scripts.bench_tree --tokens 10000000 --threads 1
Prints one JSON line (and a progress bar on a terminal; --quiet turns it off).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from megacontext.tree import MegaContextTree, copy_tree
from nanochat.common import UserError, get_base_dir, resolve_device_type, run_main
from nanochat.progress import add_quiet_flag, progress, set_quiet


def rss_mb(kind: str = "VmRSS") -> float:
    """Resident set size now (not the peak), from /proc: Linux only. kind: VmRSS (all), RssAnon (the
    process's own memory) or RssFile (pages of mapped files, e.g. the tree's levels: page cache that
    the kernel can take back)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        raise UserError("bench_tree reads VmRSS from /proc/self/status, which needs Linux") from None
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{kind}:"))
    return kb / 1024


def resident_kb(path: Path) -> float:
    """KiB of a file now in the page cache (mincore over a fresh read-only mapping; Linux)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            pages = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return pages * page / 1024


def drop_page_cache(path: Path) -> None:
    """Evict a directory's (clean, committed) file pages from the page cache: the next read is cold."""
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


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
    parser.add_argument("--device-type", default="cpu", help="where the GistNet runs: cpu|cuda|mps")
    parser.add_argument("--copy", action="store_true", help="also time copy_tree into a sibling directory")
    parser.add_argument("--seed", type=int, default=0)
    add_quiet_flag(parser)
    args = parser.parse_args()
    set_quiet(args.quiet)
    device = torch.device(resolve_device_type(args.device_type))
    if args.tokens < 2 * args.chunk or args.chunk < args.block_size:
        raise UserError(f"--tokens ({args.tokens}) must be >= 2 * --chunk ({args.chunk}) >= 2 * --block-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    embedding = nn.Embedding(args.vocab, args.d).to(device)
    if args.gist == "gistnet":
        from megacontext.gistnet import GistNet

        gistnet = GistNet(args.d, args.n_head, args.n_layer, args.block_size).to(device).eval()
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
    copy_path = path.with_name(path.name + "_copy")
    try:
        rss_start = anon_start = file_start = rss_mid = ingest_seconds = 0.0
        flush_ms: list[float] = []
        bar = progress(total=args.tokens, desc="bench_tree ingest", unit="tok")
        while tree.num_tokens < args.tokens:
            n = min(args.chunk, args.tokens - tree.num_tokens)
            ids = rng.integers(0, args.vocab, size=n)
            t0 = time.perf_counter()
            tree.append(ids)
            tree.gist_pending(embedding, gist_fn, batch_size=args.gist_batch, device=device)
            t1 = time.perf_counter()
            tree.flush()
            t2 = time.perf_counter()
            ingest_seconds += t2 - t0
            flush_ms.append(1000 * (t2 - t1))
            bar.update(n)
            if tree.num_tokens == 2 * args.chunk:  # early: warm (first chunk done) but the history is short
                read_working_context(tree, args.tail)
                rss_start, anon_start, file_start = rss_mb(), rss_mb("RssAnon"), rss_mb("RssFile")
            if rss_mid == 0 and tree.num_tokens >= args.tokens // 2:  # halfway: growth after it is a leak
                read_working_context(tree, args.tail)
                rss_mid = rss_mb()
        bar.close()
        entries = read_working_context(tree, args.tail)
        rss_end, anon_end, file_end = rss_mb(), rss_mb("RssAnon"), rss_mb("RssFile")
        t0 = time.perf_counter()
        tree.close()  # commits (nothing is pending: the last chunk was flushed)
        close_ms = 1000 * (time.perf_counter() - t0)
        files = sorted((f for f in path.iterdir() if f.is_file()), key=lambda f: f.name)
        disk_bytes = sum(f.stat().st_size for f in files)
        level_bytes = [
            (path / f"LOD{lv}.ctx").stat().st_size for lv in range(len(list(path.glob("LOD*.ctx"))))
        ]

        drop_page_cache(path)
        cached_before = sum(resident_kb(f) for f in path.glob("LOD*.ctx"))
        t0 = time.perf_counter()
        tree = MegaContextTree.open(path)
        reopen_ms = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_working_context(tree, args.tail)
        wc_read_cold_ms = 1000 * (time.perf_counter() - t0)
        refocus_kb = sum(resident_kb(f) for f in path.glob("LOD*.ctx")) - cached_before
        t0 = time.perf_counter()
        read_working_context(tree, args.tail)
        wc_read_warm_ms = 1000 * (time.perf_counter() - t0)
        nodes = [tree.num_nodes(lv) for lv in range(tree.max_level + 1)]
        copy_s = None
        if args.copy:
            t0 = time.perf_counter()
            copy_tree(tree, copy_path).close()
            copy_s = round(time.perf_counter() - t0, 2)
        result = {
            "tokens": tree.num_tokens,
            "ingest_tokens_per_s": round(tree.num_tokens / ingest_seconds, 1),
            "disk_bytes_per_token": round(disk_bytes / tree.num_tokens, 3),
            "bytes_per_level": level_bytes,
            "rss_mb_start": round(rss_start, 1),
            "rss_mb_mid": round(rss_mid, 1),
            "rss_mb_end": round(rss_end, 1),
            "rss_anon_mb_start": round(anon_start, 1),
            "rss_anon_mb_end": round(anon_end, 1),
            "rss_file_mb_start": round(file_start, 1),
            "rss_file_mb_end": round(file_end, 1),
            "flush_ms_mean": round(float(np.mean(flush_ms)), 2),
            "flush_ms_max": round(float(np.max(flush_ms)), 2),
            "close_ms": round(close_ms, 2),
            "reopen_ms": round(reopen_ms, 2),
            "wc_read_cold_ms": round(wc_read_cold_ms, 2),
            "wc_read_warm_ms": round(wc_read_warm_ms, 2),
            "refocus_page_cache_kb": round(refocus_kb, 1),
            "copy_s": copy_s,
            "gist": args.gist,
            "d": args.d,
            "K": args.block_size,
            "dtype": args.dtype,
            "device": device.type,
            "nodes_per_level": nodes,
            "wc_entries_read": entries,
            "threads": torch.get_num_threads(),
        }
    finally:
        tree.close()
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(copy_path, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
