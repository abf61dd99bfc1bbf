"""Conversation batches for mid-training and SFT: rendered chats packed into rows, with loss masks.

A row is T+1 token ids `x` (inputs x[:T], labels x[1:]) holding whole rendered conversations one after
another, each opening with its own BOS; the tail that no further conversation fits in is padding. The
label of position t is x[t+1] only where the conversation mask of token t+1 is 1, i.e. where the assistant
is trained to produce that token (its text, its python calls, its <|assistant_end|>); everywhere else the
label is -1: BOS, user turns, <|assistant_start|>, tool outputs (the tool writes them at inference, the
model must not learn to hallucinate them) and padding.

Conversations are never split across rows (the second half would lose the question it answers), so a
conversation longer than T+1 tokens is truncated to its first T+1 (and counted in `truncated`). Rank r
of W reads examples r, r+W, ... of the task, cycling through it in epochs; `state_dict()` resumes exactly.

align="end" puts the padding in front instead, so a row ends with the final assistant answer of its last
conversation. MegaContext training compares working contexts on a row's last H tokens (the horizon), and
with trailing padding the horizon would hold no label at all; end-aligned, it holds the answer, which for a
long-document chat lies far behind the question, beyond the working-context budget.
"""

from __future__ import annotations

import torch

from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task, TaskMixture
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.longdoc import LongDoc
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.offline import Identity, offline_mixture
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import SpellingBee


def chat_mixtures(
    stage: str, dataset: str, longdoc_chars: int, offline_size: int = 4000, seed: int = 42
) -> tuple[Task, Task]:
    """(train, val) conversations of a chat stage, "mid" or "sft", from the "real" or "offline" dataset.

    real mid: nanochat's mid-training mixture (SmolTalk chat, MMLU auxiliary_train for the answer-letter
    format, GSM8K with calculator calls, spelling, identity) plus long-document Q&A for MegaContext.
    real sft: nanochat's SFT mixture (ARC and GSM8K train, 10K SmolTalk, identity, spelling) plus long
    documents. offline: generated identity, spelling, calculator and long-document chats for both stages
    (val: the test split, a tenth the size). Building a real mixture loads its datasets (HF datasets:
    downloaded once, then read from the cache).
    """
    if dataset == "offline":
        return (
            offline_mixture("train", offline_size, seed, longdoc_size=longdoc_chars),
            offline_mixture("test", max(4, offline_size // 10), seed, longdoc_size=longdoc_chars),
        )
    if dataset != "real" or stage not in ("mid", "sft"):
        raise ValueError(f"no {dataset!r} data for stage {stage!r}")
    longdoc = lambda n, split: LongDoc(n, split, seed, doc_size=longdoc_chars)  # answers far back
    if stage == "mid":
        train = [
            SmolTalk("train"),
            MMLU("auxiliary_train", "train"),
            GSM8K("main", "train"),
            SpellingBee(80_000, "train", seed),
            Identity(1000, "train", seed),
            longdoc(20_000, "train"),
        ]
        val = [
            SmolTalk("test"),
            MMLU("all", "test", stop=5200),
            GSM8K("main", "test", stop=420),
            longdoc(500, "test"),
        ]
    else:
        train = [
            ARC("ARC-Easy", "train"),
            ARC("ARC-Challenge", "train"),
            GSM8K("main", "train"),
            SmolTalk("train", stop=10_000),
            Identity(1000, "train", seed),
            SpellingBee(600, "train", seed),
            longdoc(2000, "train"),
        ]
        val = [SmolTalk("test", stop=2000), longdoc(200, "test")]
    return TaskMixture(train, seed=seed), TaskMixture(val, seed=seed)  # fmt: skip


def targets_from_mask(ids: list[int], mask: list[int]) -> list[int]:
    """Labels of positions 0..len-2: the next token where the assistant produced it, else -1."""
    return [tok if m else -1 for tok, m in zip(ids[1:], mask[1:])]


class ConversationLoader:
    """Yields (x [B, T+1] long, targets [B, T] long) on `device`; inputs are x[:, :T].

    x is returned whole (not just the inputs) because MegaContext's training step takes [B, T+1] rows.
    `progress` counts epochs over this rank's share of the task (1.0 = each example seen once).
    """

    def __init__(
        self,
        tokenizer,
        task: Task,
        B: int,
        T: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        align: str = "start",
    ):
        if align not in ("start", "end"):
            raise ValueError(f"align must be 'start' or 'end', got {align!r}")
        n = len(task)
        if n <= rank:
            raise ValueError(f"a task of {n} conversations has nothing for rank {rank} of {world_size}")
        self.tokenizer, self.task, self.B, self.T = tokenizer, task, B, T
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.align = align
        self.per_rank = len(range(rank, n, world_size))  # this rank's examples per epoch
        self.pad_id = tokenizer.get_bos_token_id()
        self.cursor, self.epoch = (state["cursor"], state["epoch"]) if state else (0, 0)
        self.rendered = self.truncated = 0  # conversations read / cut to T+1 tokens by this loader

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch}

    @property
    def progress(self) -> float:
        return self.epoch + self.cursor / self.per_rank

    def _render(self, cursor: int) -> tuple[list[int], list[int], bool]:
        """(ids, mask) of this rank's conversation at cursor, cut to T+1 tokens, and whether it was cut."""
        ids, mask = self.tokenizer.render_conversation(self.task[self.rank + cursor * self.world_size])
        return ids[: self.T + 1], mask[: self.T + 1], len(ids) > self.T + 1

    def next_row(self) -> tuple[list[int], list[int]]:
        """One row of T+1 (ids, mask), advancing the cursor past the conversations it holds."""
        ids_row: list[int] = []
        mask_row: list[int] = []
        while True:
            ids, mask, cut = self._render(self.cursor)
            if ids_row and len(ids_row) + len(ids) > self.T + 1:
                break  # it opens the next row; the cursor stays on it
            ids_row += ids
            mask_row += mask
            self.rendered += 1
            self.truncated += cut  # counted, so a run can say how much of its data did not fit a row
            self.cursor += 1
            if self.cursor == self.per_rank:
                self.cursor, self.epoch = 0, self.epoch + 1
            if len(ids_row) == self.T + 1:
                break
        pad = self.T + 1 - len(ids_row)
        if self.align == "end":
            return [self.pad_id] * pad + ids_row, [0] * pad + mask_row
        return ids_row + [self.pad_id] * pad, mask_row + [0] * pad

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.next_row() for _ in range(self.B)]
        x = torch.tensor([ids for ids, _ in rows], dtype=torch.long)
        targets = torch.tensor([targets_from_mask(ids, mask) for ids, mask in rows], dtype=torch.long)
        return x.to(self.device), targets.to(self.device)


def input_target_pairs(loader: ConversationLoader):
    """(inputs [B, T], targets [B, T]) batches, the form nanochat.loss_eval.evaluate_bpb reads."""
    for x, targets in loader:
        yield x[:, :-1], targets
