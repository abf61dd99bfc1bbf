"""Benchmark one attention layer, forward + backward, against sequence length: dense causal attention vs a
sliding window vs MegaAttention (the pyramid of docs/design.md §6, block-sparse execution) vs MegaAttention with the
zoom (megacontext/zoom.py: the pyramid plus each raw query's top --zoom-k chunks read raw, block-sparse on CPU);
and MegaAttention's hierarchical KV cache: an incremental refocus against a full recompute.

    python -m scripts.bench_attention                      # 1k, 4k, 16k, 64k on CPU + the KV cache, ~3 minutes
    python -m scripts.bench_attention --lengths 1024,4096 --dense-max-len 4096 --kv-len 0
    python -m scripts.bench_attention --device cuda --lengths 4096,65536,262144,1048576 --dense-max-len 1048576

On CUDA the layer runs in bf16: dense is SDPA's causal (flash) kernel, window and mega run compiled
flex_attention with a BlockMask (its build is *_plan_ms), time is CUDA-synchronised wall time and peak_mb
the allocator's peak over the runs.

One JSON line per length on stdout; growth of time per token on stderr at the end. The layer is q/k/v/out
projections of width --d-model around the attention (no rotary or QK-norm: they cost the same in every
variant); the loss is mean(out^2). Each measurement runs in a fresh worker process, so its peak memory
(resident set sampled during the runs, minus the resident set before them) is not hidden by heap an
earlier measurement left behind. *_ms is the median wall time of up to --repeats runs after one warm-up
run (a warm-up that alone takes 5 s is the measurement); *_cpu_ms the process CPU time of the same runs,
which other programs on a shared machine disturb far less (one thread by default for that reason).
The block-sparse index tables of window and mega attention are built once per layout outside the timing,
like a flex_attention BlockMask (*_plan_ms). Per-token figures divide by the raw length N; mega also runs
its nodes as queries (about N/(K-1) extra rows), so their cost is inside its per-token figure.

KV cache (one more JSON line, "bench": "kv_cache"): a GPT of --kv-depth (nanochat's dial) with a GistNet holds
--kv-len raw tokens in a MegaKVCache (megacontext/kv_cache.py). A refocus at depth d replaces the raw token
d·N positions before the newest end and refreshes: incremental_ms_at_<d>pct recomputes the dirty rows only
(forced, whatever the cache's own threshold would pick: auto_at_<d>pct), full_ms the whole packed sequence
(reusing its mask: N is unchanged between refocuses). Both include re-gisting the edited token's ancestors;
each figure is the median of --repeats after a warm-up, wall and CPU. decode_ms: append one token, refresh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from megacontext.gistnet import GistNet
from megacontext.kv_cache import MegaKVCache
from megacontext.mega_attention import (
    auto_levels,
    blocksparse_mega_attention,
    build_mega_layout,
    flex_mega_attention,
    mega_block_mask,
    plan_blocksparse,
    sliding_window_layout,
)
from megacontext.zoom import ZoomAttention, _cached_block_mask, _cached_plan, candidates
from nanochat.common import UserError, run_main
from nanochat.gpt import GPT, config_for_depth
from nanochat.progress import add_quiet_flag, progress, say, set_quiet

METHODS = ("dense", "window", "mega", "zoom")
KV_DEPTHS = (0.01, 0.10, 0.50)  # edit depth as a share of the WC, from the newest end


class PeakRSS:
    """Highest resident set size seen while active, sampled from /proc every 2 ms (Linux only)."""

    def __init__(self):
        self.available = os.path.exists("/proc/self/statm")
        self.page = os.sysconf("SC_PAGE_SIZE") if self.available else 0
        self.peak = self.base = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.available:
            self.base = self.peak = self.rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def mb(self) -> float | None:
        return (self.peak - self.base) / 2**20 if self.available else None


def measure(
    method: str,
    N: int,
    d_model: int,
    n_head: int,
    K: int,
    W: int,
    block: int,
    repeats: int,
    budget_s: float = 5.0,
    device: str = "cpu",
    zoom_k: int = 4,
) -> dict:
    """Time fwd+bwd of one attention layer over N raw positions with `method`; returns the figures."""
    out: dict = {}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if method == "dense":
        T, attn = N, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out["keys_per_query"] = (N + 1) / 2
    else:
        t0 = time.perf_counter()
        lay = sliding_window_layout(N, W) if method == "window" else build_mega_layout(N, K, W)
        if (
            method == "zoom"
        ):  # the pyramid's plan (or BlockMask, blocks of 128) is cached inside: build it here
            T, attn = lay.T, ZoomAttention(lay, zoom_k, device, "flex" if cuda else "blocksparse")
            (_cached_block_mask if cuda else _cached_plan)(lay, device)
            sync()
        elif cuda:  # flex_attention: block sparsity from a BlockMask built on the GPU
            bm = mega_block_mask(lay, device, block)
            sync()
            T, attn = lay.T, lambda q, k, v: flex_mega_attention(q, k, v, bm)
            kv_blocks = bm.kv_num_blocks.sum() + (
                bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0
            )
            out["keys_per_query"] = float(kv_blocks) * block * block / lay.T  # upper bound: whole blocks
        else:
            plan = plan_blocksparse(lay, block)
            T, attn = lay.T, lambda q, k, v: blocksparse_mega_attention(q, k, v, plan)
            out["keys_per_query"] = int(plan.mask[:, 0][plan.q_valid].sum()) / lay.T
        out["plan_ms"] = (time.perf_counter() - t0) * 1e3
        out["levels"], out["packed_len"] = lay.levels, lay.T
        if (
            method == "zoom"
        ):  # keys per packed query: the pyramid's, plus each raw query's chunk bounds (two vectors each) and reads
            pyramid = plan_blocksparse(lay, block)
            n_cand = candidates(torch.arange(N), K, W)
            keys = int(pyramid.mask[:, 0][pyramid.q_valid].sum()) + int(
                (2 * n_cand + n_cand.clamp(max=zoom_k) * K).sum()
            )
            out["keys_per_query"] = keys / lay.T
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(1, T, d_model, generator=g).to(device, dtype).requires_grad_()
    wq, wk, wv, wo = [
        (torch.randn(d_model, d_model, generator=g) / d_model**0.5).to(device, dtype).requires_grad_()
        for _ in range(4)
    ]
    head_dim = d_model // n_head

    def step():
        q, k, v = [(x @ w).view(1, T, n_head, head_dim).transpose(1, 2) for w in (wq, wk, wv)]
        y = attn(q, k, v).transpose(1, 2).reshape(1, T, d_model) @ wo
        y.float().square().mean().backward()
        x.grad = wq.grad = wk.grad = wv.grad = wo.grad = None

    def timed():
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        runs = [timed()]  # warm-up; it is the measurement itself when one run already takes budget_s
        if cuda or runs[0][0] < budget_s * 1e3:  # on CUDA the warm-up holds compilation: never the figure
            runs = []
            while len(runs) < repeats and sum(r[0] for r in runs) < budget_s * 1e3:
                runs.append(timed())
    out["ms"], out["cpu_ms"] = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    out["peak_mb"] = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20 if cuda else peak.mb
    return out


@torch.no_grad()
def measure_kv(N: int, depth: int, vocab: int, K: int, W: int, repeats: int) -> dict:
    """Refocus ms of a MegaKVCache over N raw tokens: incremental at each KV_DEPTHS edit depth vs full."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth, vocab, N))
    model.init_weights()
    for block in model.blocks:  # init zeroes both c_proj (blocks start as the identity): give them weights
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    c = model.config
    gistnet = GistNet(c.n_embd, c.n_head, block_size=K)
    levels = auto_levels(N, K, W)
    cache = MegaKVCache(model, gistnet, K, W, levels, capacity=N + 1)
    cache.append(torch.randint(0, vocab, (N,), generator=g))
    cache.refresh()
    out = {"wc_len": N, "packed_len": sum(cache.counts), "levels": levels, "K": K, "W": W}
    out |= {"depth": depth, "n_embd": c.n_embd, "n_layer": c.n_layer, "vocab": vocab}

    def timed(edit, full: bool | None = None) -> tuple[float, float]:
        """(wall ms, process CPU ms) of one edit + refresh."""
        wall, cpu = time.perf_counter(), time.process_time()
        edit()
        cache.refresh(full=full)
        return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3

    def at_depth(frac: float):  # one raw token replaced frac·N positions before the newest end
        p = N - max(1, round(frac * N))
        return lambda: cache.replace_tokens(p, torch.randint(0, vocab, (1,), generator=g))

    def median(edit, full: bool | None = None) -> tuple[float, float]:
        runs = [timed(edit, full) for _ in range(repeats + 1)][1:]  # the first is a warm-up
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    out["full_ms"], out["full_cpu_ms"] = median(at_depth(0.10), True)
    for frac in KV_DEPTHS:
        pct = round(frac * 100)
        ms, cpu_ms = median(at_depth(frac), False)
        out[f"incremental_ms_at_{pct}pct"], out[f"incremental_cpu_ms_at_{pct}pct"] = ms, cpu_ms
        out[f"speedup_at_{pct}pct"] = out["full_ms"] / ms
        out[f"cpu_speedup_at_{pct}pct"] = out["full_cpu_ms"] / cpu_ms
        out[f"dirty_rows_at_{pct}pct"], out[f"key_columns_at_{pct}pct"] = cache.last_shape
        at_depth(frac)()
        out[f"auto_at_{pct}pct"] = "full" if cache.wants_full() else "incremental"
        cache.refresh()
    out["decode_ms"], out["decode_cpu_ms"] = median(
        lambda: cache.append(torch.randint(0, vocab, (1,), generator=g))
    )
    return out


def run_worker(method: str, N: int, args) -> dict | None:
    """One measurement in a fresh process; None when it ran past --timeout-s or failed (e.g. out of memory)."""
    cmd = [sys.executable, "-m", "scripts.bench_attention", "--worker", method, "--lengths", str(N)]
    for flag in (
        "d_model",
        "n_head",
        "block_size",
        "window",
        "query_block",
        "repeats",
        "threads",
        "kv_len",
        "kv_depth",
        "kv_vocab",
        "device",
        "zoom_k",
    ):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{method} at {N}: over --timeout-s {args.timeout_s}, reported null", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"{method} at {N} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="1024,4096,16384,65536", help="comma-separated sequence lengths")
    parser.add_argument("--d-model", type=int, default=256, help="layer width")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads")
    parser.add_argument("--block-size", type=int, default=32, help="K: raw positions per wLOD1 node")
    parser.add_argument("--window", type=int, default=256, help="W: raw window of window and mega attention")
    parser.add_argument("--query-block", type=int, default=128, help="raw queries per block-sparse block")
    parser.add_argument("--zoom-k", type=int, default=4, help="chunks each raw query reads raw (zoom)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument(
        "--dense-max-len", type=int, default=16384, help="longer dense runs are reported null"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per measurement; past it: null")
    parser.add_argument(
        "--base-len", type=int, default=4096, help="growth of time per token is vs this length"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16, flex_attention")
    parser.add_argument("--kv-len", type=int, default=4096, help="KV cache bench: raw tokens held (0 = skip)")
    parser.add_argument("--kv-depth", type=int, default=4, help="KV cache bench: GPT depth (width 64·depth)")
    parser.add_argument("--kv-vocab", type=int, default=65536, help="KV cache bench: GPT vocabulary size")
    parser.add_argument(
        "--worker", choices=(*METHODS, "kv"), help=argparse.SUPPRESS
    )  # internal: one measurement
    add_quiet_flag(parser)
    args = parser.parse_args()
    set_quiet(args.quiet)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths needs positive lengths, got {args.lengths!r}")
    if args.d_model % args.n_head:
        raise UserError(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.block_size < 2 or args.window < 0 or args.query_block < 1 or args.repeats < 1:
        raise UserError("need --block-size >= 2, --window >= 0, --query-block >= 1, --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible to torch")
    shape = dict(
        d_model=args.d_model, n_head=args.n_head, K=args.block_size, W=args.window, block=args.query_block
    )
    if args.zoom_k < 1:
        raise UserError(f"--zoom-k must be >= 1, got {args.zoom_k}")
    if args.kv_len < 0 or args.kv_depth < 1 or args.kv_vocab < 2:
        raise UserError("need --kv-len >= 0 (0 = skip), --kv-depth >= 1, --kv-vocab >= 2")
    if args.worker == "kv":
        kv = measure_kv(args.kv_len, args.kv_depth, args.kv_vocab, args.block_size, args.window, args.repeats)
        print(json.dumps(kv))
        return
    if args.worker:
        figures = measure(
            args.worker, lengths[0], **shape, repeats=args.repeats, device=args.device, zoom_k=args.zoom_k
        )
        print(json.dumps(figures))
        return
    rows = []
    for N in progress(lengths, desc="lengths", unit="length"):
        row: dict = {"seq_len": N, **shape, "threads": torch.get_num_threads(), "device": args.device}
        for method in METHODS:
            r = None if method == "dense" and N > args.dense_max_len else run_worker(method, N, args)
            row[f"{method}_ms"] = None if r is None else round(r["ms"], 2)
            row[f"{method}_cpu_ms"] = None if r is None else round(r["cpu_ms"], 2)
            row[f"{method}_ms_per_token"] = None if r is None else round(r["ms"] / N, 5)
            row[f"{method}_peak_mb"] = None if r is None or r["peak_mb"] is None else round(r["peak_mb"], 1)
            row[f"{method}_keys_per_query"] = None if r is None else round(r["keys_per_query"], 1)
            if method != "dense" and r is not None:
                row[f"{method}_plan_ms"] = round(r["plan_ms"], 1)
            if method in ("mega", "zoom") and r is not None:
                row[f"{method}_levels"], row[f"{method}_packed_len"] = r["levels"], r["packed_len"]
        say(json.dumps(row))  # keeps the bar intact on a terminal
        rows.append(row)
    if args.kv_len:
        kv = run_worker("kv", args.kv_len, args)
        row = {"bench": "kv_cache", "threads": torch.get_num_threads()}
        if kv is not None:
            row |= {k: (round(v, 2) if isinstance(v, float) else v) for k, v in kv.items()}
        print(json.dumps(row), flush=True)
    for method in METHODS:  # growth of time per token from --base-len (else the first length) onwards
        done = [r for r in rows if r[f"{method}_cpu_ms"] is not None]
        base = next((r for r in done if r["seq_len"] == args.base_len), done[0] if done else None)
        later = [r for r in done if base is not None and r["seq_len"] > base["seq_len"]]
        for key in ("ms", "cpu_ms") if later else ():
            field, b = f"{method}_{key}", base
            growth = ", ".join(
                f"{r['seq_len']}: x{(r[field] / r['seq_len']) / (b[field] / b['seq_len']):.2f}" for r in later
            )
            print(f"{method} {key} per token vs {base['seq_len']}: {growth}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
