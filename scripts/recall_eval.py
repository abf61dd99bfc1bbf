"""Far-recall rows scored under a checkpoint's own attention: does it read beyond its window?

The rows are the task rows of base_train's recall steps (nanochat/tasks/recall_warmup.py), fresh ones from
another seed: a passkey, MQAR or variable-tracking example whose evidence ends in the row's BAND, its answer
closing the row. For each task it reports the targets' mean NLL (nats per
token) and exact match (every target token the argmax) under the checkpoint's attention mode over the whole row,
and `tail_nll`, the same targets scored by the plain GPT on the row's last `--tail` tokens only (default: the
mode's window W). A model that reads its summary nodes (--attention mega) or raw tokens beyond W (dense) has
`nll` well below `tail_nll`; a window model has the two equal. One JSON line per checkpoint step.

    python -m scripts.recall_eval --model-tag d4-mega --steps 400,700 --n 96
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from megacontext.attention_modes import AttentionConfig, attention_model
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, compute_init, run_main
from nanochat.tasks.recall_warmup import MIN_LENGTH, TASK_KWARGS, task_row


def make_rows(n: int, length: int, tokenizer, seed: int):
    """[(task, row ids [length], targets [length - 1])], cycling through the tasks in turn."""
    tasks = sorted(TASK_KWARGS)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        rows.append((task, *task_row(random.Random(f"recall-eval:{seed}:{i}"), tokenizer, length, task)))
    return rows


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """(mean NLL of the targets >= 0, whether every one is the argmax); logits [T, V], targets [T]."""
    sel = targets >= 0
    lp = F.log_softmax(logits[sel].float(), dim=-1)
    nll = -lp.gather(1, targets[sel][:, None]).mean()
    return float(nll), bool((lp.argmax(dim=-1) == targets[sel]).all())


@torch.no_grad()
def score(model, gpt, rows, tail: int, device) -> dict:
    """Per task: n, nll and exact match % under `model` (the whole row), tail_nll under `gpt` (the last
    `tail` tokens; 0 skips it)."""
    acc: dict[str, dict] = {}
    for kind, row, targets in rows:
        x, y = row[:-1][None].to(device), targets.to(device)
        nll, exact = target_nll(model(x)[0], y)
        r = acc.setdefault(kind, {"n": 0, "nll": 0.0, "exact": 0, "tail_nll": 0.0})
        r["n"] += 1
        r["nll"] += nll
        r["exact"] += exact
        if tail:
            r["tail_nll"] += target_nll(gpt(x[:, -tail:])[0], y[-tail:])[0]
    out = {}
    for kind, r in sorted(acc.items()):
        out[kind] = {
            "n": r["n"],
            "nll": round(r["nll"] / r["n"], 4),
            "exact_pct": round(100 * r["exact"] / r["n"], 1),
        }
        if tail:
            out[kind]["tail_nll"] = round(r["tail_nll"] / r["n"], 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-tag", default=None, help="base checkpoint directory name (default: the newest)")
    p.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: the last one)")
    p.add_argument("--n", type=int, default=96, help="rows per checkpoint (task rows: a third per task)")
    p.add_argument(
        "--seq-len", type=int, default=0, help="row length (default: the checkpoint's training length)"
    )
    p.add_argument(
        "--tail", type=int, default=-1, help="tokens the tail_nll baseline sees (-1: the mode's W; 0: none)"
    )
    p.add_argument(
        "--seed", type=int, default=1, help="row seed (training rows come from the run's own rows)"
    )
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = p.parse_args()
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    try:
        steps = [int(s) for s in args.steps.split(",") if s] or [None]
    except ValueError:
        raise UserError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    _, _, _, _, device = compute_init(args.device_type)
    for step in steps:
        ckpt_dir, step = resolve_checkpoint("base", args.model_tag, step)
        gpt, tokenizer, meta = build_model(ckpt_dir, step, device, phase="eval")
        model = attention_model(gpt, ckpt_dir, step, meta, device)
        length = args.seq_len or meta["max_seq_len"]
        if length < MIN_LENGTH:
            raise UserError(f"recall rows need at least {MIN_LENGTH} tokens; give --seq-len (got {length})")
        cfg = AttentionConfig.from_dict(meta.get("attention"))
        tail = (cfg.window if cfg.mode != "dense" else 0) if args.tail < 0 else args.tail
        rows = make_rows(args.n, length, tokenizer, args.seed)
        result = score(model, gpt, rows, min(tail, length - 1), device)
        line = {
            "checkpoint": f"{ckpt_dir.name}@{step}",
            "attention": cfg.mode,
            "seq_len": length,
            "tail": tail,
        }
        print(json.dumps({**line, **result}), flush=True)


if __name__ == "__main__":
    run_main(main)
