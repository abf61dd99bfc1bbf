"""Induction warm-up rows: random token segments, each followed by itself (docs/training.md).

Nothing but looking back predicts a repeat, and since segment lengths vary, only matching content does. With
one fixed offset the GPT learns a positional "copy from t - T/2" head in ~60 steps, which is useless on real
text and vanished once the natural mix came back; with varied offsets the d4 CPU model stayed on the loss
plateau for 400 steps. Kept as a flag (`base_train --copy-warmup-steps / --copy-frac`) for the experiments that
continue from there.
"""

from __future__ import annotations

import zlib

import torch

COPY_WARMUP_IDS = (256, 768)  # token ids the warm-up copies: 512 ids just above the byte range


def copy_warmup_batch(x, y, seed: int, frac: float = 1.0):
    """Rows of a loader batch (x, y: [B, T]) replaced by random token segments, each followed by itself.

    An induction warm-up: nothing but looking back predicts a repeat, and since segment lengths vary, only
    matching content does (with one fixed offset the GPT learns a positional "copy from t - T/2" head in ~60
    steps, which is useless on real text and vanished once the mix came back). The ids come from a few hundred
    frequent tokens: with thousands of rare ids the unembedding of each id is trained too rarely to learn to
    match its embedding. Seeded by each row's content; frac < 1 replaces only about that share of the rows (the
    rest stay as they are), for keeping some copy rows in the mix after the warm-up (docs/training.md).
    """
    rows = torch.cat([x, y[:, -1:]], dim=1)
    T1 = rows.shape[1]
    out = torch.empty_like(rows)
    out.copy_(rows)
    for i, row in enumerate(rows):
        h = zlib.crc32(row.cpu().numpy().tobytes()) ^ seed
        if frac < 1 and (h % 10_000) >= frac * 10_000:
            continue
        g = torch.Generator().manual_seed(h)
        pieces, n = [], 0
        while n < T1:  # segments of random length, each followed by itself: the offset varies, so only
            # matching content (an induction head), not a fixed positional offset, predicts the repeats
            L = int(torch.randint(32, max(33, T1 // 2 + 1), (1,), generator=g))
            seg = torch.randint(*COPY_WARMUP_IDS, (L,), generator=g)
            pieces += [seg, seg]
            n += 2 * L
        out[i] = torch.cat(pieces)[:T1].to(rows.device)
    return out[:, :-1], out[:, 1:]
