"""Tokenizing, packing data loader with exact resume, and the lanes that make a run's data independent of
its number of ranks.

DataLoader: documents come from the parquet shards one row group at a time (rank r of world w reads row
groups r, r+w, ... of the split, so ranks see disjoint data), are tokenized in one batch call per row
group with BOS prepended to every document, and are packed into one token stream. Each batch takes B*T+1
tokens from the stream: row i is tokens [i*T, i*T+T+1), inputs are its first T tokens and targets the
last T, and B*T tokens are consumed (the last target becomes the next batch's first input), so every
token is predicted exactly once.

Resume: the stream is a queue of per-row-group chunks; `state_dict()` records the row group at the head of
the queue (epoch, shard, row group) and how many of its tokens were already consumed. A new loader with that
state re-reads and re-tokenizes that row group, skips the consumed tokens, and from there yields exactly
the batches the uninterrupted loader would have. The state is a few integers, whatever the row group size.

Train loops over the shards forever (epoch counts passes); val makes one pass and then stops, so an
evaluation never counts a token twice.

Lanes (training): a step of R = total-batch-size / T rows takes row j from lane j, and lane j is its own
one-row stream (a DataLoader with B=1 reading row groups j, j+R, ...; for mid/SFT a ConversationLoader).
Ranks own contiguous blocks of lanes (rank r of w: lanes [r*R/w, (r+1)*R/w), B per micro-step). So the
rows of every step are the same whatever the number of ranks, and the saved state (one small state per
lane) resumes on any number of ranks that divides R: a run started on 8 GPUs continues on 4, every row
seen once, and its loss curve is the one an uninterrupted run would have drawn.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import UserError
from nanochat.dataset import iter_row_groups, open_shard, split_files

STATE_VERSION = 1
LANES_VERSION = 2  # the training loader's state: one state per lane (version 1 was one per rank)


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
        # int32 halves the buffered row groups' memory (a rank holds one or two per lane)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
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
        stream = torch.from_numpy(np.concatenate(parts)).long()
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute (CUDA only: pinning needs a driver).
            stream = stream.pin_memory().to(self.device, non_blocking=True)
        else:
            stream = stream.to(self.device)
        return stream[:-1].view(self.B, self.T), stream[1:].view(self.B, self.T)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch to `device`; pinned host memory lets the copy overlap with compute (CUDA only)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class LaneLoader:
    """The training loader: one-row lanes split across ranks, so data and state do not depend on them.

    make_lane(lane, state or None) builds lane `lane`'s loader: an iterator of 1-row batches (tuples of
    tensors, batch first) with state_dict(). Each micro-batch stacks B lanes; `accum` micro-batches (one
    optimizer step) advance every lane of this rank by one row. state_dict() is this rank's lanes only;
    gather_state() collects every rank's into the one world-size independent state the checkpoint keeps.
    """

    def __init__(
        self,
        make_lane: Callable[[int, dict | None], Iterator],
        lanes: int,
        B: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ):
        if lanes < 1 or lanes % (B * world_size):
            raise UserError(
                f"a step of {lanes} rows does not split into micro-batches of {B} rows on {world_size} ranks"
            )
        if state is not None:
            check_lane_state(state, lanes)
        self.lanes, self.B, self.device = lanes, B, torch.device(device)
        self.accum = lanes // (B * world_size)  # micro-batches per optimizer step
        self.first = rank * (lanes // world_size)  # this rank's lanes: [first, first + lanes/world)
        mine = range(self.first, self.first + lanes // world_size)
        self.loaders = [make_lane(j, state["lanes"][j] if state else None) for j in mine]
        self.micro = 0  # micro-batches of the current step done

    def __iter__(self) -> LaneLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        rows = [next(dl) for dl in self.loaders[self.micro * self.B : (self.micro + 1) * self.B]]
        self.micro = (self.micro + 1) % self.accum
        return tuple(to_device(torch.cat(parts), self.device) for parts in zip(*rows))

    def state_dict(self) -> dict:
        """{lane: state} of this rank's lanes; only between optimizer steps (then every lane has moved alike)."""
        if self.micro:
            raise RuntimeError(f"loader state taken {self.micro} micro-batches into a step of {self.accum}")
        return {self.first + i: dl.state_dict() for i, dl in enumerate(self.loaders)}

    @property
    def progress(self) -> float:
        """Epochs done by the furthest lane of this rank (ConversationLoader lanes); all-reduce MAX for the run."""
        return max(dl.progress for dl in self.loaders)

    @property
    def rendered(self) -> int:
        return sum(dl.rendered for dl in self.loaders)

    @property
    def truncated(self) -> int:
        return sum(dl.truncated for dl in self.loaders)


def gather_state(loader: LaneLoader) -> dict:
    """Every lane's state, from all ranks (a collective: every rank calls it): what a checkpoint saves."""
    parts = [loader.state_dict()]
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, loader.state_dict())
    return merge_lane_states(parts, loader.lanes)


def merge_lane_states(parts: list[dict], lanes: int) -> dict:
    """The ranks' {lane: state} parts as one state: {"version": 2, "lanes": [state of lane 0, ...]}."""
    merged = {int(j): s for part in parts for j, s in part.items()}
    if sorted(merged) != list(range(lanes)):
        raise RuntimeError(f"loader states cover lanes {sorted(merged)}, not 0..{lanes - 1}")
    return {"version": LANES_VERSION, "lanes": [merged[j] for j in range(lanes)]}


def check_lane_state(state: dict, lanes: int) -> None:
    """One clear line when a saved loader state cannot continue with this run's rows per step."""
    if not isinstance(state, dict) or state.get("version") != LANES_VERSION:
        raise UserError(
            "the checkpoint's loader state is per rank (written before lanes): resume it with the code and "
            "number of ranks that wrote it, or start this stage again"
        )
    if len(state["lanes"]) != lanes:
        raise UserError(
            f"the checkpoint's loader has {len(state['lanes'])} lanes (rows per step) and this run {lanes}: "
            "resume with the same --total-batch-size and --max-seq-len"
        )


def pretraining_loader(
    tokenizer,
    B: int,
    T: int,
    rows_per_step: int,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    data_dir: str | os.PathLike | None = None,
) -> LaneLoader:
    """base_train's loader: lane j reads row groups j, j+R, ... of the train split (R = rows_per_step)."""
    groups = 0
    for path in split_files("train", data_dir):  # stops as soon as every lane has a row group
        groups += open_shard(path).num_row_groups
        if groups >= rows_per_step:
            break
    if groups < rows_per_step:
        raise UserError(
            f"a step takes {rows_per_step} rows, each from its own row group, but the train split has "
            f"{groups} row groups: make shards with more row groups (--row-group-docs) or lower "
            "--total-batch-size"
        )

    def lane(j: int, lane_state: dict | None) -> DataLoader:
        return DataLoader(tokenizer, 1, T, "train", "cpu", j, rows_per_step, lane_state, data_dir=data_dir)

    return LaneLoader(lane, rows_per_step, B, device, rank, world_size, state)
