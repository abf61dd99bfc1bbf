"""Does a checkpoint copy from its context? The induction probe of docs/training.md.

    python -m scripts.probe_induction --model-tag d4 --source base
    python -m scripts.probe_induction --model-tag d4-mc --step 500 --length 40 --rows 32

Each row is BOS + L random token ids + the same L ids again. Next-token accuracy (greedy) on the second copy
needs content-based copying (an induction head): nothing else predicts random ids. On the first copy it is
chance (~1/range). Prints one JSON line: {"checkpoint", "step", "first_copy_acc", "second_copy_acc",
"second_copy_loss"}. Every memory view of mc_eval needs second_copy_acc well above zero: a GPT that cannot
copy what it sees cannot use what a memory brings back.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, resolve_device_type, run_main


@torch.no_grad()
def induction_probe(model, bos: int, vocab_lo: int, vocab_hi: int, length: int, rows: int, seed: int = 0):
    """(first-copy accuracy, second-copy accuracy, second-copy mean loss) of `model` on repeated random ids."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(vocab_lo, vocab_hi, (rows, length), generator=g)
    ids = torch.cat([torch.full((rows, 1), bos), seq, seq], 1).to(device)
    logits = model(ids[:, :-1]).float()
    pred, target = logits.argmax(-1), ids[:, 1:]
    first = (pred[:, : length - 1] == target[:, : length - 1]).float().mean().item()
    # targets of the second copy: positions length+1 .. 2*length (the first of them is predictable too)
    second = (pred[:, length:] == target[:, length:]).float().mean().item()
    loss = F.cross_entropy(logits[:, length:].flatten(0, 1), target[:, length:].flatten()).item()
    return first, second, loss


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default="base", help="base|mid|sft|rl")
    parser.add_argument("--model-tag", default=None, help="model tag (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--length", type=int, default=40, help="random ids per copy")
    parser.add_argument("--rows", type=int, default=32, help="rows probed")
    parser.add_argument(
        "--id-low", type=int, default=300, help="lowest id drawn (skips special and byte ids)"
    )
    parser.add_argument(
        "--id-high", type=int, default=0, help="highest id drawn + 1 (0: the vocabulary size)"
    )
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args()
    if args.length < 2 or args.rows < 1:
        raise UserError("need --length >= 2 and --rows >= 1")
    device = torch.device(resolve_device_type(args.device_type or None))
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = build_model(ckpt_dir, step, device, phase="eval")
    hi = args.id_high or model.config.vocab_size
    if not 0 <= args.id_low < hi <= model.config.vocab_size:
        raise UserError(f"need 0 <= --id-low < --id-high <= vocab size {model.config.vocab_size}")
    if 2 * args.length + 1 > model.config.sequence_len:
        raise UserError(
            f"--length {args.length}: two copies + BOS exceed the model's {model.config.sequence_len}"
        )
    first, second, loss = induction_probe(
        model, tokenizer.get_bos_token_id(), args.id_low, hi, args.length, args.rows
    )
    row = {"checkpoint": str(ckpt_dir), "step": step, "first_copy_acc": round(first, 4)}
    row |= {"second_copy_acc": round(second, 4), "second_copy_loss": round(loss, 4)}
    print(json.dumps(row))


if __name__ == "__main__":
    run_main(main)
