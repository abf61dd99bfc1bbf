"""The MegaContext tree: the whole token history at every level of detail (docs/design.md §2-§3).

An append-only K-ary tree. LOD0 holds raw token ids; LOD1 node i is the gist of tokens [i*K, (i+1)*K);
LODn node i is the gist of LOD(n-1) nodes i*K .. i*K+K-1 and so covers K**n tokens. Only complete blocks
are ever gisted: the newest, incomplete block stays raw (the design's alignment invariant), so a gist is
never made from padding.

The tree does not own a GistNet: gist_pending() takes the embedding and gist functions, and the tree only
remembers which model (model_id) made its gists, refusing to mix models on disk.

    tree = MegaContextTree.open("ctx/", K=32, d=256, model_id="gistnet@step1000")
    tree.append(ids); tree.gist_pending(model.wte, gistnet); tree.flush()   # flush() = durable

Node addressing: (level, index). Level 0 index j is token position j, so level 1's children are tokens.
Counts: num_tokens, num_nodes(level) (stored), num_complete(level) (= num_tokens // K**level, what should be
stored), max_level, pending(). Reads: tokens(start, end) -> LongTensor, gists(level, indices) /
gist(level, index) -> float32. Math: node_span, parent, children. Durability: flush() (disk: appends before
it are lost on a crash, appends acknowledged by it never are). Errors: TreeError and its subclasses
TreeCorruptError, TreeModelMismatchError, TreeConfigError (defined in megacontext.storage).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from megacontext.storage import (
    DiskStorage,
    RamStorage,
    Storage,
    TreeConfigError,
    TreeCorruptError,
    TreeError,
    TreeModelMismatchError,
)

__all__ = [
    "MegaContextTree",
    "TreeError",
    "TreeCorruptError",
    "TreeModelMismatchError",
    "TreeConfigError",
]

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # ids LongTensor[B, K] -> [B, K, d]
GistFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x [B, K, d], level) -> [B, d]


class MegaContextTree:
    """Append tokens, gist complete blocks, read nodes by (level, index). Storage is RAM or disk."""

    def __init__(self, K: int, d: int, storage: Storage):
        if (storage.K, storage.d) != (K, d):
            raise TreeConfigError(
                f"storage has K={storage.K} d={storage.d}, the tree was asked for K={K} d={d}"
            )
        self.storage = storage

    @classmethod
    def in_memory(cls, K: int, d: int, model_id: str = "", dtype: str = "fp32") -> MegaContextTree:
        """A RAM tree (fp32 by default: exact, and small per-sequence trees do not need compression)."""
        return cls(K, d, RamStorage(K, d, dtype, model_id))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        K: int | None = None,
        d: int | None = None,
        model_id: str | None = None,
        dtype: str | None = None,
    ) -> MegaContextTree:
        """Create a disk tree at `path`, or continue the one there. None = the stored value (K, d needed to create;
        dtype defaults to fp16). A model_id different from the stored one raises TreeModelMismatchError."""
        storage = DiskStorage(path, K=K, d=d, dtype=dtype, model_id=model_id)
        return cls(storage.K, storage.d, storage)

    @property
    def K(self) -> int:
        return self.storage.K

    @property
    def d(self) -> int:
        return self.storage.d

    @property
    def model_id(self) -> str:
        return self.storage.model_id

    @property
    def num_tokens(self) -> int:
        return self.storage.num_records(0)

    def num_nodes(self, level: int) -> int:
        """Nodes stored at a level (level 0: tokens; level >= 1: gists computed so far)."""
        return self.storage.num_records(level)

    def num_complete(self, level: int) -> int:
        """Nodes that should exist at a level given num_tokens (complete blocks only)."""
        return self.num_tokens // self.K**level

    @property
    def max_level(self) -> int:
        """The highest level holding at least one gist; 0 when there are none."""
        level = 0
        while self.num_nodes(level + 1) > 0:
            level += 1
        return level

    def pending(self) -> bool:
        """Whether some complete block still lacks its gist."""
        level = 1
        while self.num_complete(level) > 0:
            if self.num_nodes(level) < self.num_complete(level):
                return True
            level += 1
        return False

    def append(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> int:
        """Append tokens (1-D list, array or LongTensor); returns num_tokens. Durable after flush()."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        ids = np.asarray(token_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        self.storage.append(0, ids.reshape(-1) if ids.ndim == 0 else ids)
        return self.num_tokens

    @torch.no_grad()
    def gist_pending(
        self,
        embed: EmbedFn,
        gist: GistFn,
        batch_size: int = 256,
        device: torch.device | str | None = None,
    ) -> dict[int, int]:
        """Compute and store every missing gist, level by level, in batches of `batch_size` nodes.

        LOD1 gists come from embed(ids[B, K]); LODn gists from the stored LOD(n-1) gists (float32 on
        `device`). Returns {level: gists added}. Lower levels go first because they are the next level's input.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        added: dict[int, int] = {}
        level = 1
        while self.num_complete(level) > 0:
            have, want = self.num_nodes(level), self.num_complete(level)
            for lo in range(have, want, batch_size):
                hi = min(want, lo + batch_size)
                if level == 1:
                    x = embed(self.tokens(lo * self.K, hi * self.K, device=device).view(hi - lo, self.K))
                else:
                    x = self.gists(level - 1, range(lo * self.K, hi * self.K), device=device)
                    x = x.view(hi - lo, self.K, self.d)
                g = gist(x, level)
                if tuple(g.shape) != (hi - lo, self.d):
                    raise ValueError(
                        f"gist function returned shape {tuple(g.shape)}, expected {(hi - lo, self.d)}"
                    )
                self.storage.append(level, g.detach().float().cpu().numpy())
            if want > have:
                added[level] = want - have
            level += 1
        return added

    def tokens(self, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Raw token ids of positions [start, end) as a LongTensor."""
        return torch.from_numpy(self.storage.read(0, start, end)).to(device or "cpu")

    def gists(
        self,
        level: int,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Stored gists of `level` at `indices`, as float32 [n, d] on `device` (default CPU)."""
        if level < 1:
            raise ValueError(f"gists live at level >= 1, got level {level}")
        if isinstance(indices, range) and indices.step == 1:  # contiguous: one slice read
            out = self.storage.read(level, indices.start, max(indices.start, indices.stop))
        else:
            if isinstance(indices, torch.Tensor):
                indices = indices.detach().cpu().numpy()
            out = self.storage.read_rows(level, np.asarray(indices, dtype=np.int64))
        return torch.from_numpy(out).to(device or "cpu")

    def gist(self, level: int, index: int, device: torch.device | str | None = None) -> torch.Tensor:
        """One gist as float32 [d]."""
        return self.gists(level, [index], device=device)[0]

    def node_span(self, level: int, index: int) -> tuple[int, int]:
        """Token positions [start, end) a node covers: K**level tokens."""
        self._check_node(level, index)
        width = self.K**level
        return index * width, (index + 1) * width

    def parent(self, level: int, index: int) -> tuple[int, int]:
        self._check_node(level, index)
        return level + 1, index // self.K

    def children(self, level: int, index: int) -> list[tuple[int, int]]:
        """The K nodes one level down; for level 1 these are (0, token position) of its K tokens."""
        self._check_node(level, index)
        if level == 0:
            raise ValueError("a token (level 0) has no children")
        return [(level - 1, j) for j in range(index * self.K, (index + 1) * self.K)]

    def _check_node(self, level: int, index: int) -> None:
        if level < 0 or index < 0:
            raise ValueError(f"node (level={level}, index={index}) must have level >= 0 and index >= 0")

    def flush(self) -> None:
        """Make everything appended so far durable (disk: one fsync per level file + manifest replace)."""
        self.storage.commit()

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        levels = [self.num_nodes(lv) for lv in range(self.max_level + 1)]
        return (
            f"MegaContextTree(K={self.K}, d={self.d}, model_id={self.model_id!r}, nodes per level={levels})"
        )


def copy_tree(src, path) -> MegaContextTree:
    """A disk copy of a tree (same K, d, model and gist dtype, so every gist is bit-identical)."""
    dst = MegaContextTree.open(path, K=src.K, d=src.d, model_id=src.model_id, dtype=src.storage.dtype)
    for level in range(src.max_level + 1):
        n = src.num_nodes(level)
        # records read as float32 (d values) or int64: ~64 MB a read, so memory stays flat however big the
        # tree (a fixed 2**20 records was 1 GB of float32 gists a read at d=256, 4 GB peak RSS copying 100M)
        chunk = max(1, (64 << 20) // (8 if level == 0 else 4 * src.d))
        for lo in range(0, n, chunk):
            dst.storage.append(level, src.storage.read(level, lo, min(n, lo + chunk)))
    dst.flush()
    return dst
