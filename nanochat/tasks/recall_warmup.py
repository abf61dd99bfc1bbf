"""Task rows: long-context tasks whose answer is the row's whole loss (the MegaAttention recipe's recall steps).

Under `--attention mega` everything older than the window W reaches a query only through the summary nodes, and
reading them is a circuit of its own. In the long-context documents of the text mix the few answer tokens are
~1 % of a row's loss: too little to grow that circuit in a CPU-sized run. A task row is one of the suite's tasks
(longctx.py: passkeys of digits or UUIDs with distractor locks, MQAR, variable tracking; fresh keys, synthetic
filler) cropped to end at its answer, its evidence ending in the BAND of the row, with the answer's tokens (and
MQAR's repeated values) as the only targets, so nothing but looking back far predicts them. ~700 steps of whole task-row batches
from scratch grew the circuit for the tasks themselves (docs/mega_attention.md); planted-id rows grew it faster
but it stayed specific to them and was removed (docs/log.md).

The band runs from half-way to four fifths of the row: beyond any window of < 1/5 of the row, yet within reach of
the finest node level (at 512 tokens, K = 16, W = 64 a query at the end sees [256, 428) as wLOD1 nodes).
"""

from __future__ import annotations

import random
import zlib

import torch

from nanochat.tasks import longctx

BAND = (0.5, 0.8)  # the evidence ends in this share of the row; the question and answer follow
MIN_LENGTH = 256  # shortest row: room for the evidence in the band and for the question after it
MQAR_CUE = "Now recall the pairs."  # longctx.mqar's question opens with it
# the suite's tasks at the sizes a 512-token row holds with its evidence in the band (mc_eval asks more pairs)
TASK_KWARGS = {
    "passkey": lambda rng: {"key_kind": rng.choice(("digits", "uuid")), "n_distractors": rng.randint(1, 4)},
    "mqar": lambda rng: {"n_pairs": rng.choice((4, 8))},
    "vartrack": lambda rng: {"n_hops": rng.randint(1, 3), "n_distractor_chains": rng.randint(0, 2)},
}


def task_row(
    rng: random.Random, tokenizer, length: int, task: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids [length], targets [length - 1]): a long-context task (drawn from rng, or the one named) cropped
    from the front to end at its answer, the evidence ending in the BAND; the answer's tokens are the only
    targets (and in MQAR the values its question repeats)."""
    if length < MIN_LENGTH:
        raise ValueError(f"a recall row needs at least {MIN_LENGTH} tokens, got {length}")
    if task is None:
        task = rng.choice(sorted(TASK_KWARGS))
    elif task not in TASK_KWARGS:
        raise ValueError(f"task rows are one of {', '.join(sorted(TASK_KWARGS))}; got {task!r}")
    kwargs = TASK_KWARGS[task](rng)
    count = lambda s: len(tokenizer.encode(s))
    # tokens from the evidence's end to the row's end: in the band's complement; the question's own length
    # (MQAR repeats asked pairs in it) is measured by a first draw and taken off the distance in a second
    tail = rng.randint(int(length * (1 - BAND[1])), int(length * (1 - BAND[0])))
    state, distance = rng.getstate(), tail
    for _ in range(2):
        rng.setstate(state)
        ex = longctx.TASKS[task](rng, max(1, distance), prefix=length, count=count, **kwargs)
        distance -= count(ex["prompt"][ex["evidence_chars"][1] :] + ex["answer"]) - tail
    bos = tokenizer.get_bos_token_id()
    prompt = tokenizer.encode(ex["prompt"], prepend=bos)
    ids = tokenizer.encode(ex["prompt"] + ex["answer"], prepend=bos)
    n_answer = len(ids) - len(prompt)
    row = torch.tensor(ids[-length:])
    targets = torch.full((length - 1,), -1, dtype=row.dtype)
    targets[length - 1 - n_answer :] = row[length - n_answer :]
    if task == "mqar":  # its question repeats asked pairs with their values: each is a far recall as well
        chars = len(ex["prompt"]) - ex["prompt"].rindex(MQAR_CUE)
        for i in range(length - 1 - n_answer, 0, -1):  # the question's tokens, from its end
            piece = tokenizer.decode([int(row[i])])
            chars -= len(piece)
            if chars < 0:
                break
            if piece.strip().isdigit():
                targets[i - 1] = row[i]
    return row, targets


def recall_batch(x, y, seed: int, tokenizer):
    """Replace every row of a batch (x, y: [B, T]) by a task row of the same length. What replaces a row
    follows from its content and the seed."""
    rows = torch.cat([x, y[:, -1:]], dim=1)
    x, y = x.clone(), y.clone()
    for i, row in enumerate(rows):
        h = zlib.crc32(row.cpu().numpy().tobytes()) ^ (seed * 40503 & 0xFFFFFFFF)
        new, targets = task_row(random.Random(h), tokenizer, rows.shape[1])
        x[i], y[i] = new[:-1].to(x.device), targets.to(y.device)
    return x, y
