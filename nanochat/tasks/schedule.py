"""What each base-training step's rows are: the data side of the recipe, one decision per step.

* copy  — the warm-up: short rows of repeated random segments teach the plain GPT to copy (an induction head),
          without which no memory view can answer anything (docs/training.md: val bpb 1.93 -> 1.57 at d4 with
          the token shift, and the first non-zero long-context scores);
* recall — whole batches of long-context task rows whose answers are the only targets (recall_warmup.py): the
          MegaAttention recipe grows its node-reading circuit on them from scratch, then keeps it with a share of
          whole recall steps (a few task rows in a text batch weigh too little: docs/mega_attention.md);
* text  — the corpus, with a share of rows replaced by synthetic long-context rows whose answer ends the row.

The defaults follow from what is trained (`default_schedule`): the measured recipe of each objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.common import UserError
from nanochat.tasks.copy_warmup import copy_warmup_batch
from nanochat.tasks.longctx import mix_into_batch
from nanochat.tasks.recall_warmup import MIN_LENGTH, recall_batch

COPY_WARMUP_STEPS = 150  # d4 copies after ~150 steps of 64-token rows; at most a third of a short run
RECALL_WARMUP_SHARE = 0.54  # the MegaAttention recipe: 700 task-row steps of 1300 from scratch
RECALL_FRAC = 0.3  # then whole recall steps (0.5 measured better recall, worse text: docs/mega_attention.md)
LONGCTX_FRAC = 0.5  # rows replaced by long-context rows when a memory is trained (and in its vanilla twin)


@dataclass
class DataSchedule:
    copy_warmup: int  # first steps: copy rows (the plain GPT's loss, whatever the objective)
    recall_warmup: int  # then steps of task rows
    recall_frac: float  # then this evenly spread share of steps are task-row steps
    longctx_frac: float  # share of long-context rows in a text step

    def kind(self, step: int) -> str:
        """'copy', 'recall' or 'text' for optimizer step `step`."""
        if step < self.copy_warmup:
            return "copy"
        after = step - self.copy_warmup - self.recall_warmup
        if after < 0:
            return "recall"
        frac = self.recall_frac
        return "recall" if frac > 0 and int((after + 1) * frac) > int(after * frac) else "text"

    def batch(self, kind: str, x, y, seed: int, vocab_size: int, tokenizer):
        """The rows a step of `kind` trains on, made from a loader batch (x, y: [B, T]). What replaces a row
        follows from its content and the seed, so a row is treated alike on any rank or micro-batch."""
        if kind == "copy":
            return copy_warmup_batch(x, y, seed, vocab_size=vocab_size)
        if kind == "recall":
            return recall_batch(x, y, seed, tokenizer)
        return mix_into_batch(x, y, self.longctx_frac, tokenizer, seed)


def default_schedule(
    objective: str,
    num_iterations: int,
    seq_len: int,
    copy_warmup: int | None = None,
    recall_warmup: int | None = None,
    recall_frac: float | None = None,
    longctx_frac: float | None = None,
) -> DataSchedule:
    """The measured recipe's schedule for an objective ("dense", "mc", "window" or "mega"), with overrides.

    dense and mc: the copy warm-up, then text (mc with half long-context rows: the memory needs far evidence
    to learn from). window and mega (the twins compared on recall): no copy warm-up (after one the node-reading
    circuit did not form in 500 task steps), ~54 % task-row steps from scratch, then 30 % task-row steps."""
    attention = objective in ("window", "mega")
    rows_fit = seq_len >= MIN_LENGTH  # a task row needs room for its evidence band and question
    if copy_warmup is None:
        copy_warmup = 0 if attention else min(COPY_WARMUP_STEPS, num_iterations // 3)
    if recall_warmup is None:
        recall_warmup = round(RECALL_WARMUP_SHARE * num_iterations) if attention and rows_fit else 0
    if recall_frac is None:
        recall_frac = RECALL_FRAC if attention and rows_fit else 0.0
    if longctx_frac is None:
        longctx_frac = LONGCTX_FRAC if objective != "dense" else 0.0
    if copy_warmup < 0 or recall_warmup < 0 or not 0 <= recall_frac <= 1 or not 0 <= longctx_frac <= 1:
        raise UserError("warm-up steps must be >= 0 and --recall-frac / --longctx-frac in [0, 1]")
    if (recall_warmup or recall_frac) and objective == "mc":
        # the MC step takes its labels from the row itself: a task row's answer-only targets would be lost
        raise UserError(
            "--recall-warmup-steps / --recall-frac train attention modes; they do not apply to --mc"
        )
    if (recall_warmup or recall_frac) and not rows_fit:
        raise UserError(f"task-row steps need --max-seq-len >= {MIN_LENGTH}, got {seq_len}")
    return DataSchedule(copy_warmup, recall_warmup, recall_frac, longctx_frac)
