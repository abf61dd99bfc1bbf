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

Task rows (`--recall-kind tasks`) are the same idea in the long-context suite's own form (longctx.py: passkeys
with distractor locks, MQAR, variable tracking; fresh keys, synthetic filler): the evidence ends in the BAND, the
question closes the row, and the answer's tokens are the targets (MQAR's repeated values too). Planted ids grow
the node-reading circuit fastest but it stays specific to them; ~300-700 steps of whole task-row batches from
scratch grow it for the tasks themselves (docs/mega_attention.md, session 10).

`base_train --recall-warmup-steps N` trains N steps on these rows after the copy warm-up, under the run's
attention mode; `--recall-frac F` makes that share of the later steps recall steps (whole steps: a few recall
rows in a text batch weigh ~1 % of its loss, too little to keep the circuit; docs/mega_attention.md).
"""

from __future__ import annotations

import argparse
import random
import zlib

import torch

from nanochat.common import UserError
from nanochat.tasks import longctx
from nanochat.tasks.copy_warmup import copy_ids

BINDINGS = 8  # key -> value bindings per row (rows per step mattered more than this: docs/mega_attention.md)
VALUE_LEN = 4  # value ids per binding (a short passkey)
BAND = (0.5, 0.8)  # bindings start in this share of the row; the final listing fills the row's last slots
KEY_IDS, VALUE_IDS = 64, 32  # the copy ids are KEY_IDS keys, then VALUE_IDS values (digit-like), then filler
MIN_LENGTH = 256  # shortest row: room for the bindings in the band and for the final listing after it
MQAR_CUE = "Now recall the pairs."  # longctx.mqar's question opens with it
KINDS = ("ids", "tasks", "mixed")  # mixed: each row one or the other, by its hash
# the suite's tasks at the sizes a 512-token row holds with its evidence in the band (mc_eval asks more pairs)
TASK_KWARGS = {
    "passkey": lambda rng: {"n_distractors": rng.randint(1, 4)},
    "mqar": lambda rng: {"n_pairs": rng.choice((4, 8))},
    "vartrack": lambda rng: {"n_hops": rng.randint(1, 3), "n_distractor_chains": rng.randint(0, 2)},
}


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
    kwargs = TASK_KWARGS[task](rng)  # digit passkeys (the default kind): a UUID does not fit a 16-token node
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


def recall_batch(x, y, seed: int, vocab_size: int | None = None, kind: str = "ids", tokenizer=None):
    """Replace every row of a batch (x, y: [B, T]) by a recall row of the same length, of `kind` ("tasks" and
    "mixed" need the tokenizer). What replaces a row follows from its content and the seed."""
    if kind not in KINDS:
        raise ValueError(f"recall rows are one of {', '.join(KINDS)}; got {kind!r}")
    rows = torch.cat([x, y[:, -1:]], dim=1)
    x, y = x.clone(), y.clone()
    ids = copy_ids(vocab_size)
    for i, row in enumerate(rows):
        h = zlib.crc32(row.cpu().numpy().tobytes()) ^ (seed * 40503 & 0xFFFFFFFF)
        if kind == "ids" or (kind == "mixed" and h & 1):
            new, targets = recall_row(torch.Generator().manual_seed(h), rows.shape[1], ids)
        else:
            new, targets = task_row(random.Random(h), tokenizer, rows.shape[1])
        x[i], y[i] = new[:-1].to(x.device), targets.to(y.device)
    return x, y


def is_recall_step(step: int, frac: float) -> bool:
    """Whether `step` (counted from the end of the warm-up) is one of the evenly spread `frac` share of
    recall steps: 0.25 makes every fourth step one."""
    return frac > 0 and int((step + 1) * frac) > int(step * frac)


def add_recall_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recall-warmup-steps",
        type=int,
        default=0,
        help="after the copy warm-up, N steps on far-recall rows under the attention mode "
        "(nanochat/tasks/recall_warmup.py; docs/mega_attention.md)",
    )
    p.add_argument(
        "--recall-frac",
        type=float,
        default=0.0,
        help="after the recall warm-up, this share of the steps are recall steps, evenly spread",
    )
    p.add_argument(
        "--recall-kind",
        default="ids",
        help="recall rows of planted ids (ids), of the long-context tasks with answer-only targets (tasks), or "
        "half each (mixed); WARMUP,LATER gives the later recall steps another kind, e.g. ids,tasks",
    )


def check_recall_flags(args: argparse.Namespace, mc: bool) -> tuple[str, str]:
    """The recall kinds (of the warm-up's recall steps, of the later ones), once the flags are checked."""
    if args.recall_warmup_steps < 0 or not 0 <= args.recall_frac <= 1:
        raise UserError("--recall-warmup-steps must be >= 0 and --recall-frac in [0, 1]")
    kinds = args.recall_kind.split(",")
    if not 1 <= len(kinds) <= 2 or not set(kinds) <= set(KINDS):
        raise UserError(
            f"--recall-kind takes KIND or WARMUP,LATER of {', '.join(KINDS)}; got {args.recall_kind!r}"
        )
    if args.recall_warmup_steps == 0 and args.recall_frac == 0:
        return kinds[0], kinds[-1]
    if mc:  # the MC step takes labels from the row itself: a recall row's answer-only targets would be lost
        raise UserError(
            "--recall-warmup-steps / --recall-frac train attention modes; they do not apply to --mc"
        )
    if args.max_seq_len < MIN_LENGTH:
        raise UserError(f"recall rows need --max-seq-len >= {MIN_LENGTH}, got {args.max_seq_len}")
    return kinds[0], kinds[-1]
