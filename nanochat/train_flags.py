"""The flags every training stage shares (base_train, mid_train, chat_sft): one place for their defaults."""

from __future__ import annotations

import argparse


def add_optim_flags(p: argparse.ArgumentParser) -> None:
    """Learning rates and schedule ends (nanochat's values)."""
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the LM head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument(
        "--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear lr decay at the end"
    )
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="lr multiplier reached at the last step")


def add_run_flags(p: argparse.ArgumentParser, eval_every: int) -> None:
    """Evaluation, checkpoints, logging and the device."""
    p.add_argument(
        "--eval-every",
        type=int,
        default=eval_every,
        help="val bpb every N steps (and at the end); -1 = end only",
    )
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens per val bpb evaluation")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument(
        "--resume-from-step",
        type=int,
        default=-1,
        help="resume this stage from its checkpoint at this step, on any number of ranks; -2: the latest "
        "checkpoint if there is one (else start fresh: for torchrun --max-restarts); -1: start fresh",
    )
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument(
        "--log-json", type=str, default="", help="also append one JSON object per step to this file"
    )
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument(
        "--dtype", type=str, default="auto", help="auto|float32|bfloat16 (auto: bf16 on CUDA, probe on CPU)"
    )
