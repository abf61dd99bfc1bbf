"""Induction warm-up rows: random token segments, each followed by itself (docs/training.md).

Nothing but looking back predicts a repeat, and since segment lengths vary, only matching content does (with
one fixed offset the GPT learns a positional "copy from t - T/2" head in ~60 steps instead, useless on real
text). `base_train --copy-warmup-steps N` trains the first N steps on these rows (nanochat/tasks/schedule.py
sets the default: min(150, a third of the run)).
"""

from __future__ import annotations

import zlib

import torch

COPY_WARMUP_IDS = (256, 768)  # token ids the warm-up copies: 512 ids just above the byte range
COPY_ROW_LEN = 64  # warm-up rows are this short: see copy_warmup_batch
COPY_SEGMENT = (8, 32)  # segment lengths [lo, hi): the offset of a repeat varies, so only content predicts it


def copy_ids(vocab_size: int | None) -> tuple[int, int]:
    """[lo, hi) of the copied ids: COPY_WARMUP_IDS, or the upper half of a smaller vocabulary."""
    lo, hi = COPY_WARMUP_IDS
    if vocab_size is not None and vocab_size < hi:
        lo, hi = vocab_size // 2, vocab_size
    return lo, hi


def copy_row(g: torch.Generator, length: int, ids: tuple[int, int] = COPY_WARMUP_IDS) -> torch.Tensor:
    """`length` ids: random segments of COPY_SEGMENT length, each followed by itself, cut to length."""
    pieces, n = [], 0
    while n < length:
        L = int(torch.randint(*COPY_SEGMENT, (1,), generator=g))
        seg = torch.randint(*ids, (L,), generator=g)
        pieces += [seg, seg]
        n += 2 * L
    return torch.cat(pieces)[:length]


def copy_warmup_batch(x, y, seed: int, vocab_size: int | None = None):
    """Induction rows: the whole batch becomes B·T/COPY_ROW_LEN short rows [B', COPY_ROW_LEN] of random token
    segments, each followed by itself (docs/training.md).

    Short rows are what lets an induction head form: at the start attention is spread evenly over every earlier
    position, so the gradient that teaches "copy the token after the match" shrinks with the row length (d4 on
    CPU: ~150 steps to copy at 64 tokens with GPTConfig.smear, none in 400 steps at 512). The ids come from a few
    hundred frequent tokens: with thousands of rare ids each unembedding is trained too rarely to learn to match
    its embedding (a vocabulary smaller than COPY_WARMUP_IDS: its upper half). Each loader row becomes its own
    T/COPY_ROW_LEN short rows, seeded by its content: a row is treated alike on any rank (DDP = one process).
    """
    rows = torch.cat([x, y[:, -1:]], dim=1)
    per_row = max(1, (rows.shape[1] - 1) // COPY_ROW_LEN)
    ids = copy_ids(vocab_size)
    short = []
    for row in rows:
        g = torch.Generator().manual_seed(zlib.crc32(row.cpu().numpy().tobytes()) ^ seed)
        short += [copy_row(g, COPY_ROW_LEN + 1, ids) for _ in range(per_row)]
    short = torch.stack(short).to(rows.device)
    return short[:, :-1], short[:, 1:]
