"""Decode cost per token vs history length: a MegaContext session (tree on disk) against full context.

    python -m scripts.bench_decode                                  # fresh small model, 1k, 8k, 64k, 1M tokens
    python -m scripts.bench_decode --histories 1k,64k --decode-tokens 512
    python -m scripts.bench_decode --checkpoint sft --model-tag d20  # a trained model with its MC nets

Prints ONE JSON line: {"results": [{"history", "mc_ms_median", "mc_ms_p95", "mc_rss_mb", "full_ms_median",
"controller_share", ...}, ...], ...}. For each history:
  1. a child process writes the history into a disk tree in big batches, with GistNet batched (the real
     GistNet of the config: transformer by default, never the `mean` control);
  2. a fresh child process opens the tree in an MCSession and decodes --decode-tokens tokens one at a time
     (sampling, appending to the tree, gisting, refocusing every K tokens): per-token latency (median, p95),
     the share of it spent in the controller (gisting, WC upkeep, LensNet, allocator), and its RSS after
     decoding, which holds the model, the WC and the tree pages it touched, not the history;
  3. where the history fits the model's position table and --full-max, a third child prefills the whole
     history into nanochat's KV cache and times plain decoding; otherwise full_ms_median is null.
A fresh LensNet scores everything 0 (no edits); here its output head is randomised so refocuses really edit
the WC and invalidate the KV cache, as a trained one would (edits_per_refocus is reported).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.session import GIST_BATCH, MCSession, build_mc_nets, load_mc_nets, model_fingerprint
from megacontext.tree import MegaContextTree
from nanochat.common import UserError, run_main
from nanochat.engine import KVCache, sample_next_token
from nanochat.gpt import GPT, config_for_depth
from nanochat.progress import add_quiet_flag, progress, set_quiet

INGEST_BATCH = 1 << 17  # tokens appended (and gisted) per step of the history build
SPECIALS = ("<|bos|>", "<|assistant_end|>")


def parse_history(text: str) -> int:
    """'1k' = 1,000, '1M' = 1,000,000, or a plain integer."""
    mult = {"k": 1_000, "K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    try:
        n = int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise UserError(f"--histories: cannot read {text!r} (use e.g. 1k,8k,64k,1M)") from None
    if n < 1:
        raise UserError(f"--histories: {text!r} must be at least one token")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=str, default="1k,8k,64k,1M", help="comma-separated history lengths")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens timed per history")
    p.add_argument("--warmup", type=int, default=32, help="untimed decode tokens before timing")
    p.add_argument("--checkpoint", type=str, default=None, help="base|mid|sft|rl: a trained model (needs MC)")
    p.add_argument("--model-tag", type=str, default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=4, help="fresh model: depth (width 64*depth)")
    p.add_argument("--vocab-size", type=int, default=32768, help="fresh model: vocabulary size")
    p.add_argument(
        "--seq-len", type=int, default=2048, help="fresh model: training context (rotary table 10x)"
    )
    p.add_argument("--wc-budget", type=int, default=512, help="fresh model: W_max")
    p.add_argument("--full-max", type=int, default=16384, help="longest history timed with full context")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0 = torch's default)")
    p.add_argument("--workdir", type=Path, default=None, help="where the trees go (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    add_quiet_flag(p)
    args = p.parse_args(argv)
    set_quiet(args.quiet)
    args.history_list = [parse_history(h.strip()) for h in args.histories.split(",") if h.strip()]
    if not args.history_list or args.decode_tokens < 2 or args.warmup < 0:
        raise UserError("need at least one history, --decode-tokens >= 2 and --warmup >= 0")
    return args


class SyntheticVocab:
    """The two ids a session needs from a tokenizer (its stop tokens), for a fresh model with no tokenizer."""

    def __init__(self, vocab_size: int):
        self.ids = {name: vocab_size - 1 - i for i, name in enumerate(SPECIALS)}

    def get_bos_token_id(self) -> int:
        return self.ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        return self.ids[name]


def load_parts(args):
    """(model, tokenizer, cfg, gistnet, lensnet), identical in every child (seeded init or a checkpoint)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from nanochat.checkpoint_manager import build_model, resolve_checkpoint

        ckpt_dir, step = resolve_checkpoint(args.checkpoint, args.model_tag, args.step)
        model, tokenizer, meta = build_model(ckpt_dir, step, "cpu", "eval")
        mc = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, "cpu")
        if mc is None:
            raise UserError(f"checkpoint {ckpt_dir} step {step} has no MegaContext weights to benchmark")
        return (model, tokenizer, *mc)
    torch.manual_seed(args.seed)
    model = GPT(config_for_depth(args.depth, args.vocab_size, args.seq_len))
    model.init_weights()
    cfg = MCConfig.for_seq_len(4 * args.wc_budget)  # the recipe whose budget this is (config.scale)
    gistnet, lensnet = build_mc_nets(cfg, model.config.n_embd)
    with torch.no_grad():
        torch.nn.init.normal_(lensnet.out.weight, std=1.0)  # see the module docstring
    return model.eval(), SyntheticVocab(args.vocab_size), cfg, gistnet, lensnet


def history_tokens(n: int, vocab: int, seed: int, start: int = 0) -> np.ndarray:
    """Token ids [start, start+n) of a seeded synthetic stream (specials excluded)."""
    return np.random.default_rng([seed, start]).integers(0, vocab - len(SPECIALS), n)


@torch.no_grad()
def build_tree(args, n: int, path: str) -> dict:
    """Child 1: write n tokens into a disk tree with every gist, in big batches."""
    model, _, cfg, gistnet, _ = load_parts(args)
    t0 = time.perf_counter()
    tree = MegaContextTree.open(
        path, K=cfg.block_size, d=model.config.n_embd, model_id=model_fingerprint(model, gistnet)
    )
    for lo in range(0, n, INGEST_BATCH):
        tree.append(history_tokens(min(INGEST_BATCH, n - lo), model.config.vocab_size, args.seed, lo))
        tree.gist_pending(embed=model.wte, gist=gistnet, batch_size=4 * GIST_BATCH)
    tree.close()
    return {"ingest_s": time.perf_counter() - t0}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_mc(args, path: str) -> dict:
    """Child 2: open the tree in a session and time single-token decoding."""
    model, tokenizer, cfg, gistnet, lensnet = load_parts(args)
    tree = MegaContextTree.open(path)
    session = MCSession(model, tokenizer, gistnet, lensnet, cfg, tree=tree, seed=args.seed)

    def step() -> None:  # one token; a sampled stop token does not end the benchmark
        for _ in session.generate(1, temperature=1.0):
            pass

    for _ in range(args.warmup):  # untimed: the first forward fills the cache for the whole WC
        step()
    session.telemetry.reset()
    ctrl0, total0 = session.time_controller, session.time_controller + session.time_gpt + session.time_sample
    times = []
    for _ in range(args.decode_tokens):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ctrl = session.time_controller - ctrl0
    total = session.time_controller + session.time_gpt + session.time_sample - total0
    summary = session.telemetry.summary()
    out = {
        "mc_ms_median": 1000 * statistics.median(times),
        "mc_ms_p95": 1000 * float(np.percentile(times, 95)),
        "mc_ms_mean": 1000 * statistics.fmean(times),
        "mc_rss_mb": rss_mb(),
        "controller_share": ctrl / total,
        "wc_cost": session.wc.cost,
        "wc_entries": session.wc.num_entries,
        "edits_per_refocus": summary.get("mc/edits_per_refocus", 0.0),
        "tree_levels": session.tree.max_level,
    }
    session.close()
    return out


@torch.no_grad()
def time_full(args, n: int) -> dict:
    """Child 3: the whole history as plain context in nanochat's KV cache, then single-token decoding."""
    model, *_ = load_parts(args)
    c = model.config
    total = n + args.warmup + args.decode_tokens
    cache = KVCache(1, c.n_kv_head, total, c.head_dim, c.n_layer, "cpu")
    ids = torch.from_numpy(history_tokens(n, c.vocab_size, args.seed))[None]
    for lo in range(0, n, 4096):  # chunked prefill bounds the attention scratch memory
        logits = model(ids[:, lo : lo + 4096], kv_cache=cache)[:, -1]
    rng = torch.Generator().manual_seed(args.seed)
    times = []
    for i in range(args.warmup + args.decode_tokens):
        t0 = time.perf_counter()
        token = sample_next_token(logits, rng, 1.0)
        logits = model(token.view(1, 1), kv_cache=cache)[:, -1]
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"full_ms_median": 1000 * statistics.median(times), "full_rss_mb": rss_mb()}


def in_child(fn, *args):
    """Run fn in a fresh spawned process: clean RSS, nothing shared with the previous history."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, _, cfg, _, _ = load_parts(args)
    rotary_len = model.rotary_len
    config = {
        "n_layer": model.config.n_layer,
        "n_embd": model.config.n_embd,
        "vocab": model.config.vocab_size,
        "wc_budget": cfg.wc_budget,
        "block_size": cfg.block_size,
        "decode_tokens": args.decode_tokens,
        "checkpoint": args.checkpoint,
        "threads": torch.get_num_threads() if not args.threads else args.threads,
    }
    del model
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for n in progress(args.history_list, desc="histories", unit="history"):
            path = str(Path(work) / f"tree-{n}")
            row = {"history": n, **in_child(build_tree, args, n, path), **in_child(time_mc, args, path)}
            fits = n <= args.full_max and n + args.warmup + args.decode_tokens <= rotary_len
            row.update(
                in_child(time_full, args, n) if fits else {"full_ms_median": None, "full_rss_mb": None}
            )
            results.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    base = results[0]["mc_ms_median"]
    print(
        json.dumps(
            {
                "bench": "decode",
                "config": config,
                "results": results,
                "mc_growth_vs_first": round(results[-1]["mc_ms_median"] / base, 3),
            }
        )
    )


if __name__ == "__main__":
    run_main(main)
