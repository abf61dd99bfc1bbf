"""Bits per byte: the validation loss that compares across tokenizers.

Mean cross-entropy per token depends on how much text a token covers, so a bigger vocab looks
"better" for free. Dividing the summed loss by the bytes of text predicted removes that: bpb is
a property of the model on the text, not of the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from nanochat.common import UserError


@torch.no_grad()
def position_totals(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> torch.Tensor:
    """[2, T] float64: the nats and the bytes of the targets at each position of the rows, over `steps`
    batches of (inputs [B,T], targets [B,T]), summed over rows and ranks.

    Each target token contributes its loss in nats and its UTF-8 byte length. Special tokens (BOS)
    have 0 bytes and ignored targets (-1) none: both are left out of numerator and denominator,
    since they are not text."""
    totals, short = None, 0  # float64 holds byte counts exactly up to 2^53
    device = torch.device("cpu")
    batch_iter = iter(batches)
    for done in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            short = steps - done
            break
        device = y.device
        loss = model(x, y, loss_reduction="none").view(y.shape).double()  # nats per target position
        nbytes = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)
        if totals is None:
            totals = torch.zeros(2, y.size(1), dtype=torch.float64)
        totals[0] += (loss * (nbytes > 0)).sum(0).cpu()
        totals[1] += nbytes.sum(0).cpu()
    totals = torch.zeros(2, 1, dtype=torch.float64) if totals is None else totals
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every rank reaches these collectives, even one whose batches ran out (else the others would hang)
        flags = torch.tensor([short, totals.size(1)], dtype=torch.float64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # nccl reduces on the GPU, gloo on the CPU
        short, width = int(flags[0]), int(flags[1])
        totals = torch.cat([totals, totals.new_zeros(2, width - totals.size(1))], dim=1).to(device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        totals = totals.cpu()
    if short > 0:
        raise UserError(
            f"the evaluation data ran out {short} batches short of {steps}; evaluate fewer tokens"
        )
    return totals


def bpb_of(totals: torch.Tensor) -> float:
    """bpb = total nats / (ln 2 · total bytes) of `position_totals` (inf when no byte was predicted)."""
    nats, nbytes = float(totals[0].sum()), float(totals[1].sum())
    return float("inf") if nbytes == 0 else nats / (math.log(2) * nbytes)


def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` batches of (inputs [B,T], targets [B,T]), summed over all ranks."""
    return bpb_of(position_totals(model, batches, steps, token_bytes))


def bpb_by_position(totals: torch.Tensor, edges: list[int]) -> list[float]:
    """bpb of the target positions [edges[j], edges[j+1]) of the rows: where in a row a model's text loss is
    (a model that reads its far past only through summaries loses it late in the row, not early)."""
    return [bpb_of(totals[:, a:b]) for a, b in zip(edges, edges[1:])]


def position_edges(T: int) -> list[int]:
    """Buckets of target positions for rows of T tokens: the first 1/32, up to 1/8, 1/4, 1/2 and the rest."""
    return sorted({0, *(T // d for d in (32, 8, 4, 2) if T // d > 0), T})
