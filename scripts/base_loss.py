"""Bits per byte of a checkpoint on the train and val splits (val also by position in the row), plus a few
greedy samples.

    python -m scripts.base_loss                                  # latest base checkpoint
    python -m scripts.base_loss --model-tag d4 --step 500 --split-tokens 1048576
    torchrun --nproc-per-node 8 -m scripts.base_loss

Both splits are read from their start, so the figures are reproducible run to run.
"""

from __future__ import annotations

import argparse

from megacontext.attention_modes import attention_model
from megacontext.config import MCConfig
from megacontext.session import load_mc_nets
from megacontext.views import VIEWS, val_rows, view_bpb
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, compute_cleanup, compute_init, print0, run_main
from nanochat.dataloader import DataLoader
from nanochat.device import autocast_ctx, pick_dtype
from nanochat.engine import Engine
from nanochat.loss_eval import bpb_by_position, bpb_of, position_edges, position_totals
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "def fibonacci(n):",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=str, default="base", help="checkpoint family: base|mid|sft|rl")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward per rank")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens sampled per prompt")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", type=str, default="auto", help="auto|float32|bfloat16")
    p.add_argument(
        "--view-rows",
        type=int,
        default=32,
        help="val rows of the training length whose last H tokens are scored under the views",
    )
    return p.parse_args()


def view_table(model, tokenizer, meta, ckpt_dir, step, token_bytes, device, dtype, n_rows: int) -> str:
    """bpb and ΔNLL@H (vs full) of the last H tokens of val rows under the five views: full and
    window for any model; the MC views too when the checkpoint holds GistNet and LensNet."""
    nets = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, device)
    if nets is not None:
        cfg, gistnet, lensnet = nets
    else:  # a vanilla model: the window view at a quarter of its training length
        budget = max(8, model.config.sequence_len // 4)
        cfg = MCConfig(
            block_size=16 if budget >= 64 else 2, wc_budget=budget, recent=budget // 2, horizon=budget // 4
        )
        gistnet = lensnet = None
    rows = val_rows(tokenizer, model.config.sequence_len, n_rows, device)
    with autocast_ctx(device, dtype):
        out = view_bpb(rows, cfg.horizon, model, gistnet, lensnet, cfg, token_bytes, device)
    lines = [
        f"views over {len(rows)} val rows, horizon {cfg.horizon}, W_max {cfg.wc_budget}:",
        "",
        "| view | bpb | ΔNLL@H vs full |",
        "|---|---|---|",
    ]
    for v in VIEWS:
        if f"bpb/{v}" in out:
            dnll = out.get(f"dnll/{v}", 0.0 if v == "full" else None)
            lines.append(f"| {v} | {out[f'bpb/{v}']:.4f} | {'-' if dnll is None else f'{dnll:+.4f}'} |")
    table = "\n".join(lines)
    print0(table)
    return table


def main() -> None:
    args = parse_args()
    _, rank, _, world_size, device = compute_init(args.device_type)
    dtype = pick_dtype(device, args.dtype)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
    model = attention_model(model, ckpt_dir, step, meta, device)  # bpb under the checkpoint's attention mode
    token_bytes = get_token_bytes(device)
    B, T = args.device_batch_size, model.config.sequence_len
    tokens_per_step = B * T * world_size
    steps = args.split_tokens // tokens_per_step
    if steps < 1:
        raise UserError(
            f"--split-tokens {args.split_tokens} is less than one batch ({B} x {T} x {world_size} ranks)"
        )
    print0(f"{ckpt_dir} step {step}: {steps} batches of {tokens_per_step:,} tokens per split")

    bpb, totals = {}, {}
    for split in ("train", "val"):
        loader = DataLoader(tokenizer, B, T, split, device, rank=rank, world_size=world_size)
        with autocast_ctx(device, dtype):
            totals[split] = position_totals(model, loader, steps, token_bytes)
        bpb[split] = bpb_of(totals[split])
        print0(f"{split} bpb: {bpb[split]:.6f}")
    edges = position_edges(T)
    by_position = ", ".join(
        f"[{a}, {b}) {v:.4f}" for a, b, v in zip(edges, edges[1:], bpb_by_position(totals["val"], edges))
    )
    print0(f"val bpb by target position: {by_position}")

    views = view_table(model, tokenizer, meta, ckpt_dir, step, token_bytes, device, dtype, args.view_rows)
    samples = []
    if rank == 0:
        engine = Engine(model, tokenizer)
        bos = tokenizer.get_bos_token_id()
        with autocast_ctx(device, dtype):
            for prompt in PROMPTS:
                results, _ = engine.generate_batch(
                    tokenizer.encode(prompt, prepend=bos), max_tokens=args.max_new_tokens, temperature=0.0
                )
                text = tokenizer.decode(results[0][1:])  # drop BOS
                samples.append(text)
                print0(f"sample: {text!r}")

    get_report().log(
        f"Base model loss ({ckpt_dir.name})",
        [
            {"checkpoint": f"{ckpt_dir} step {step}", "split tokens": steps * tokens_per_step},
            {"train_bpb": bpb["train"], "val_bpb": bpb["val"], "val_bpb_by_position": by_position},
            views,
            "samples:\n\n```\n" + "\n".join(samples) + "\n```",
        ],
    )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
