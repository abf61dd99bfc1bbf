"""A KV cache over the working context's slots, kept between refocuses (DESIGN §3 "Inference session", §6).

The GPT sees the working context (WC) as a sequence of slots: one per raw token, one per gist, in timeline
order. Decoding appends slots at the end, but a refocus (or the collapse that makes room for new tokens)
replaces entries in the middle, which changes every slot from the edit onward: in `wc_index` positions
their slot numbers shift, and attention mixes the edited content into every later key and value.

So each cached slot carries a *key* that names its content: `slot_key(level, index)` (a raw token is level
0 with its global position as index; the tree is append-only, so a position names one token forever; a gist
is (level, node index)). Given the keys of the new WC, `match(keys)` finds the longest prefix the cache
already holds; the caller truncates there and recomputes only the dirty suffix. Two WCs with equal key
prefixes have bit-identical K/V over that prefix: slot content is named by the key, and a slot's position
is a function of its key (`global`) or of its slot number (`wc_index`).

Per-slot (mu, sigma) are kept as optional metadata (what RoPE the slot was given), so a later hierarchical
cache (MegaAttention's per-level K/V) can grow here with the same truncate-at-first-edit rule.

Implements the GPT's KV-cache protocol (docs/CONTRACTS.md): get_pos, insert_kv, advance.
"""

from __future__ import annotations

import torch

LEVEL_SHIFT = 48  # key = level << 48 | index: 2^48 tokens of history before two keys could collide


def slot_key(level, index):
    """The content key of a slot (ints or int64 tensors, elementwise)."""
    return (level << LEVEL_SHIFT) | index


def key_level(key):
    return key >> LEVEL_SHIFT


def key_index(key):
    return key & ((1 << LEVEL_SHIFT) - 1)


class SlotKVCache:
    """Keys/values of every layer for slots [0, pos), batch 1, grown by doubling when outrun."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 1024,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.kv: torch.Tensor | None = None  # [layers, 2, 1, H_kv, capacity, D], allocated on first insert
        self.capacity = capacity
        self.pos = 0
        self.keys = torch.empty(capacity, dtype=torch.long)  # on CPU: compared with keys built on CPU
        self.mu = torch.empty(capacity)
        self.sigma = torch.empty(capacity)
        self._staged: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    # ------------------------------------------------------------ the GPT's protocol

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, H_kv, T_new, D] at slot `pos`; return every cached slot of this layer."""
        B, H, T_new, D = k.shape
        if (B, H, D) != (1, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"kv of shape {tuple(k.shape)} does not fit (1, {self.num_kv_heads}, T, {self.head_dim})"
            )
        end = self.pos + T_new
        if self.kv is None or end > self.kv.size(4):
            self._grow(end, k.dtype)
        self.kv[layer_idx, 0, :, :, self.pos : end] = k
        self.kv[layer_idx, 1, :, :, self.pos : end] = v
        return self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]

    def advance(self, T_new: int) -> None:
        """Called by the GPT once after all layers: the staged slot metadata becomes part of the cache."""
        if self._staged is None or self._staged[0].numel() != T_new:
            staged = None if self._staged is None else self._staged[0].numel()
            self._staged = None
            raise ValueError(
                f"advance({T_new}) but {staged} slot keys were staged: call stage() before the forward"
            )
        keys, mu, sigma = self._staged
        end = self.pos + T_new
        self.keys[self.pos : end] = keys
        if mu is not None:
            self.mu[self.pos : end] = mu
            self.sigma[self.pos : end] = sigma
        self.pos = end
        self._staged = None

    # ------------------------------------------------------------ invalidation

    def stage(
        self, keys: torch.Tensor, mu: torch.Tensor | None = None, sigma: torch.Tensor | None = None
    ) -> None:
        """Name the slots the next forward will insert (keys int64 [T_new], optional mu/sigma [T_new])."""
        keys = keys.detach().to("cpu", torch.long).reshape(-1)
        if self.pos + keys.numel() > self.keys.numel():
            self._grow_meta(self.pos + keys.numel())
        if mu is not None:
            mu, sigma = mu.detach().float().cpu().reshape(-1), sigma.detach().float().cpu().reshape(-1)
        self._staged = (keys, mu, sigma)

    def match(self, keys: torch.Tensor) -> int:
        """Length of the longest prefix of `keys` (int64 [L], on CPU) whose slots are cached exactly."""
        n = min(self.pos, keys.numel())
        differ = torch.nonzero(self.keys[:n] != keys[:n])
        return int(differ[0, 0]) if differ.numel() else n

    def truncate(self, slot: int) -> None:
        """Forget slots >= slot (the earliest edited slot); the next insert writes there."""
        if not 0 <= slot <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} slots to {slot}")
        self.pos = slot

    def reset(self) -> None:
        self.pos = 0

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) [pos] the cached slots were rotated with (undefined where none was staged)."""
        return self.mu[: self.pos], self.sigma[: self.pos]

    # ------------------------------------------------------------ storage

    def _grow(self, end: int, dtype: torch.dtype) -> None:
        size = max(self.capacity, end, 2 * (self.kv.size(4) if self.kv is not None else 0))
        shape = (self.num_layers, 2, 1, self.num_kv_heads, size, self.head_dim)
        grown = torch.empty(shape, dtype=self.dtype or dtype, device=self.device)
        if self.kv is not None:
            grown[..., : self.pos, :] = self.kv[..., : self.pos, :]
        self.kv = grown

    def _grow_meta(self, end: int) -> None:
        size = max(end, 2 * self.keys.numel())
        for name in ("keys", "mu", "sigma"):
            old = getattr(self, name)
            new = old.new_empty(size)
            new[: self.pos] = old[: self.pos]
            setattr(self, name, new)

    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()
