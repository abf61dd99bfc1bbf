"""Far-recall warm-up rows: key -> value bindings early in a row, asked for again at its end (issue 8).

The copy warm-up (copy_warmup.py) teaches the GPT to copy from a few dozen tokens back, which a sliding
window of W >= 64 already sees. Under `--attention mega` everything older than W reaches a query only through
the summary nodes, and reading them is a circuit of its own. In the long-context documents the few answer
tokens are ~1 % of a row's loss: the hypothesis is that this is too little to grow it in a CPU-sized run.
A recall row makes it the whole loss: random filler, R bindings (a key id, then VALUE_LEN value ids) placed in
the BAND of the row, and at the end each key again followed by its value, in another order. The band runs from
half-way to four fifths of the row: beyond any window of < 1/5 of the row (minus the listing), yet within reach of the
finest node level (at 512 tokens, K = 16, W = 64 a query at the end sees [256, 428) as wLOD1 nodes and what is
older only as one wLOD2 node of 256 tokens; in a planted test wLOD2 nodes of 64 tokens held no binding, wLOD1
nodes did: docs/mega_attention.md, session 8). The
targets are the value ids of that final listing only (-1 elsewhere), so nothing but looking back far predicts
them, and only by content (keys and positions are random). Window attention cannot see the bindings; dense and
mega can.

`base_train --recall-warmup-steps N` trains N steps on these rows after the copy warm-up, under the run's
attention mode; `--recall-frac F` keeps a share of recall rows afterwards.
"""

from __future__ import annotations

import zlib

import torch

from nanochat.tasks.copy_warmup import copy_ids

BINDINGS = 8  # key -> value bindings per row (rows per step mattered more than this: docs/mega_attention.md)
VALUE_LEN = 4  # value ids per binding (a short passkey)
BAND = (0.5, 0.8)  # bindings start in this share of the row; the final listing fills the row's last slots
KEY_IDS, VALUE_IDS = 64, 32  # the copy ids are KEY_IDS keys, then VALUE_IDS values (digit-like), then filler
MIN_LENGTH = 256  # shortest row: room for the bindings in the band and for the final listing after it


def recall_row(g: torch.Generator, length: int, ids: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids [length], targets [length - 1]): bindings early, the keys asked again at the end."""
    lo, hi = ids
    keys_hi = lo + min(KEY_IDS, (hi - lo) // 4)
    values_hi = keys_hi + min(VALUE_IDS, (hi - lo) // 4)
    slot = 1 + VALUE_LEN  # a key and its value
    tail = BINDINGS * slot
    if length < MIN_LENGTH:
        raise ValueError(f"a recall row needs at least {MIN_LENGTH} tokens, got {length}")
    start, end = int(length * BAND[0]), int(length * BAND[1])
    row = torch.randint(values_hi, hi, (length,), generator=g)  # filler: never a key or a value
    keys = torch.randperm(keys_hi - lo, generator=g)[:BINDINGS] + lo
    values = torch.randint(keys_hi, values_hi, (BINDINGS, VALUE_LEN), generator=g)
    # non-overlapping slots of 1 + VALUE_LEN ids starting in [start, end), in random order
    slots = torch.randperm((end - start) // slot, generator=g)[:BINDINGS]
    for j, k in enumerate(slots.tolist()):
        s = start + k * slot
        row[s], row[s + 1 : s + slot] = keys[j], values[j]
    targets = torch.full((length - 1,), -1, dtype=row.dtype)
    for i, j in enumerate(torch.randperm(BINDINGS, generator=g).tolist()):
        q = length - tail + i * slot
        row[q], row[q + 1 : q + slot] = keys[j], values[j]
        targets[q : q + VALUE_LEN] = values[j]  # position q (the key) predicts the first value id
    return row, targets


def recall_batch(x, y, seed: int, frac: float = 1.0, vocab_size: int | None = None):
    """Replace about `frac` of the rows of a batch (x, y: [B, T]) by recall rows of the same length (all of
    them for frac >= 1). Which rows, and what replaces them, follows from each row's content and the seed."""
    if frac <= 0:
        return x, y
    rows = torch.cat([x, y[:, -1:]], dim=1)
    x, y = x.clone(), y.clone()
    ids = copy_ids(vocab_size)
    for i, row in enumerate(rows):
        h = zlib.crc32(row.cpu().numpy().tobytes()) ^ (seed * 40503 & 0xFFFFFFFF)
        if frac < 1 and (h % 10_000) >= frac * 10_000:
            continue
        new, targets = recall_row(torch.Generator().manual_seed(h), rows.shape[1], ids)
        x[i], y[i] = new[:-1].to(x.device), targets.to(y.device)
    return x, y
