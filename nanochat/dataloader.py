"""Tokenizing, packing data loader with exact resume.

Documents come from the parquet shards one row group at a time (rank r of world w reads row groups
r, r+w, ... of each shard, so ranks see disjoint data), are tokenized in one batch call per row group with
BOS prepended to every document, and are packed into one token stream. Each batch takes B*T+1 tokens
from the stream: row i is tokens [i*T, i*T+T+1), inputs are its first T tokens and targets the last T, and
B*T tokens are consumed (the last target becomes the next batch's first input), so every token is
predicted exactly once.

Resume: the stream is a queue of per-row-group chunks; `state_dict()` records the row group at the head of
the queue (epoch, shard, row group) and how many of its tokens were already consumed. A new loader with that
state re-reads and re-tokenizes that row group, skips the consumed tokens, and from there yields exactly
the batches the uninterrupted loader would have. The state is a few integers, whatever the row group size.

Train loops over the shards forever (epoch counts passes); val makes one pass and then stops, so an
evaluation never counts a token twice.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from nanochat.common import UserError
from nanochat.dataset import iter_row_groups

STATE_VERSION = 1


class DataLoader:
    """Yields (inputs [B, T] long, targets [B, T] long) on `device`."""

    def __init__(
        self,
        tokenizer,
        B: int,
        T: int,
        split: str,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        tokenizer_threads: int = 4,
        data_dir: str | os.PathLike | None = None,
    ):
        if B < 1 or T < 1:
            raise UserError(f"batch size and sequence length must be positive, got B={B} T={T}")
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.tokenizer_threads, self.data_dir = tokenizer_threads, data_dir
        self.bos = tokenizer.get_bos_token_id()
        # Queue of [position (epoch, shard, row_group), tokens, consumed]; the head's position + consumed is
        # the resume point.
        self.chunks: deque[list] = deque()
        self.buffered = 0  # unconsumed tokens across all chunks
        self.batches = 0  # yielded by this loader (a val split too small for one batch is a user error)
        start = (0, 0, rank)
        skip = 0
        if state is not None:
            start, skip = self._check_state(state)
        self.groups = self._row_groups(*start)
        if skip:
            if not self._read_next():
                raise UserError(f"resume state points past the end of the {split} split")
            head = self.chunks[0]
            if skip > len(head[1]):
                raise UserError(f"resume state skips {skip} tokens but that row group has {len(head[1])}")
            head[2] = skip
            self.buffered -= skip

    def _check_state(self, state: dict) -> tuple[tuple[int, int, int], int]:
        expect = {
            "version": STATE_VERSION,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise UserError(f"loader state has {key}={state.get(key)!r}, this loader has {value!r}")
        return (state["epoch"], state["shard"], state["row_group"]), state["offset"]

    def _row_groups(
        self, epoch: int, shard: int, row_group: int
    ) -> Iterator[tuple[tuple[int, int, int], list]]:
        """(position, texts) for this rank's row groups from the given position on; train loops forever."""
        resume = (shard, row_group)
        while True:
            found = False
            for si, gi, texts in iter_row_groups(
                self.split, self.rank, self.world_size, self.data_dir, resume=resume
            ):
                found = True
                yield (epoch, si, gi), texts
            if self.split != "train":
                return
            if not found and resume == (0, self.rank):
                raise UserError(
                    f"rank {self.rank} of {self.world_size} gets no row groups from the train shards; "
                    "make shards with more row groups (--row-group-docs) or use fewer ranks"
                )
            epoch, resume = epoch + 1, (0, self.rank)

    def _read_next(self) -> bool:
        """Tokenize the next row group into the queue; False when the split is exhausted (val only)."""
        try:
            position, texts = next(self.groups)
        except StopIteration:
            return False
        ids = (
            self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
            if texts
            else []
        )
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        self.chunks.append([position, flat, 0])
        self.buffered += len(flat)
        return True

    def state_dict(self) -> dict:
        """Small JSON-able resume point: the next batch starts at `offset` tokens into that row group."""
        while not self.chunks or self.chunks[0][2] == len(self.chunks[0][1]):
            # An empty head would make the position ambiguous; move the head to real tokens first.
            if self.chunks:
                self.chunks.popleft()
            elif not self._read_next():
                raise UserError(f"the {self.split} split is exhausted; there is no position to save")
        (epoch, shard, row_group), _, offset = self.chunks[0]
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": epoch,
            "shard": shard,
            "row_group": row_group,
            "offset": int(offset),
        }

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while self.buffered < need:
            if not self._read_next():
                if self.batches == 0:
                    raise UserError(
                        f"the {self.split} split has fewer than B*T+1={need} tokens for rank {self.rank} "
                        f"of {self.world_size}; use a smaller batch or more data"
                    )
                raise StopIteration
        parts, left = [], need
        for _, tokens, consumed in self.chunks:
            take = min(left, len(tokens) - consumed)
            parts.append(tokens[consumed : consumed + take])
            left -= take
            if left == 0:
                break
        # Consume B*T tokens: the last one stays as the next batch's first input.
        left = need - 1
        while left:
            head = self.chunks[0]
            take = min(left, len(head[1]) - head[2])
            head[2] += take
            left -= take
            if head[2] == len(head[1]):
                self.chunks.popleft()
        self.buffered -= need - 1
        self.batches += 1
        stream = torch.from_numpy(np.concatenate(parts))
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute (CUDA only: pinning needs a driver).
            stream = stream.pin_memory().to(self.device, non_blocking=True)
        else:
            stream = stream.to(self.device)
        return stream[:-1].view(self.B, self.T), stream[1:].view(self.B, self.T)
