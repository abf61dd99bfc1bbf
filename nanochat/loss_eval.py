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
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` batches of (inputs [B,T], targets [B,T]), summed over all ranks.

    Each target token contributes its loss in nats and its UTF-8 byte length. Special tokens (BOS)
    have 0 bytes and ignored targets (-1) none: both are left out of numerator and denominator,
    since they are not text. bpb = total nats / (ln 2 · total bytes).
    """
    # [nats, bytes, steps short]; float64 holds byte counts exactly up to 2^53
    totals = torch.zeros(3, dtype=torch.float64)
    device = torch.device("cpu")
    batch_iter = iter(batches)
    for done in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            totals[2] = steps - done
            break
        device = y.device
        loss = model(x, y, loss_reduction="none").view(-1).double()  # nats per target position
        y = y.reshape(-1)
        nbytes = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)
        totals[0] += (loss * (nbytes > 0)).sum().cpu()
        totals[1] += nbytes.sum().cpu()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every rank reaches this collective, even one whose batches ran out (else the others would hang)
        reduced = totals.to(device)  # nccl reduces on the GPU, gloo on the CPU
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        totals = reduced.cpu()
    if totals[2] > 0:
        raise UserError(
            f"the evaluation data ran out {int(totals[2])} batches short of {steps}; evaluate fewer tokens"
        )
    if totals[1] == 0:
        return float("inf")
    return float(totals[0]) / (math.log(2) * float(totals[1]))
