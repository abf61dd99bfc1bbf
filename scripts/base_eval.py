"""CORE score of a base checkpoint (in-context-learning tasks of the DCLM eval bundle).

    python -m scripts.base_eval                          # latest base checkpoint, every task in full
    python -m scripts.base_eval --max-per-task 100       # a quick estimate
    torchrun --nproc-per-node 8 -m scripts.base_eval

The bundle is downloaded once into $NANOCHAT_BASE_DIR/eval_bundle (override the source with
NANOCHAT_EVAL_BUNDLE_URL). Results go to the report and to base_eval/<source>_<tag>_<step>.csv.
"""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import atomic_write_text, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.core_eval import evaluate_core, get_eval_bundle
from nanochat.device import autocast_ctx, pick_dtype
from nanochat.report import get_report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=str, default="base", help="checkpoint family: base|mid|sft|rl")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", type=str, default="auto", help="auto|float32|bfloat16")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ddp, rank, _, _, device = compute_init(args.device_type)
    dtype = pick_dtype(device, args.dtype)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = build_model(ckpt_dir, step, device, phase="eval")
    if rank == 0:
        get_eval_bundle()  # download once
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0's download, then read the cache
    bundle = get_eval_bundle()

    t0 = time.time()
    with autocast_ctx(device, dtype):
        out = evaluate_core(
            model, tokenizer, device, bundle, None if args.max_per_task < 0 else args.max_per_task
        )
    elapsed = time.time() - t0

    print0(f"{'task':<40} {'accuracy':>9} {'centered':>9}")
    for label, acc in out["results"].items():
        print0(f"{label:<40} {acc:>9.4f} {out['centered'][label]:>9.4f}")
    print0(f"CORE: {out['CORE']:.4f} ({elapsed:.0f}s)")
    if rank == 0:
        rows = ["task,accuracy,centered"] + [
            f"{label},{acc:.6f},{out['centered'][label]:.6f}" for label, acc in out["results"].items()
        ]
        rows.append(f"CORE,,{out['CORE']:.6f}")
        csv_path = get_base_dir() / "base_eval" / f"{args.source}_{ckpt_dir.name}_{step:06d}.csv"
        atomic_write_text(csv_path, "\n".join(rows) + "\n")
        print0(f"wrote {csv_path}")
    get_report().log(
        "Base model evaluation",
        [
            {"checkpoint": f"{ckpt_dir} step {step}", "max per task": args.max_per_task},
            {"CORE": out["CORE"], "eval time (s)": round(elapsed, 1)},
            {f"{label} (centered)": value for label, value in out["centered"].items()},
        ],
    )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
