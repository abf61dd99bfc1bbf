"""KV caches kept between refocuses (docs/design.md §3 "Inference session", §6 "Hierarchical KV cache").

Two caches, one rule: a cached K/V stays valid exactly as long as nothing it was computed from changed, and
an edit recomputes only what it dirtied. Both name content by (level, index) and speak the GPT's KV-cache
protocol (docs/CONTRACTS.md: get_pos, insert_kv, advance), so the recompute is the GPT's own forward.

SlotKVCache — the flat working context (the session). The GPT sees the WC as a sequence of slots: one per
raw token, one per gist, in timeline order. Decoding appends slots at the end, but a refocus (or the collapse
that makes room for new tokens) replaces entries in the middle, which changes every slot from the edit onward:
in `wc_index` positions their slot numbers shift, and attention mixes the edited content into every later key
and value. So each cached slot carries a *key* that names its content: `slot_key(level, index)` (a raw token
is level 0 with its global position as index; the tree is append-only, so a position names one token forever;
a gist is (level, node index)). Given the keys of the new WC, `match(keys)` finds the longest prefix the
cache already holds; the caller truncates there and recomputes only the dirty suffix. Two WCs with equal key
prefixes have bit-identical K/V over that prefix: slot content is named by the key, and a slot's position is
a function of its key (`global`) or of its slot number (`wc_index`). Per-slot (mu, sigma) are kept as
metadata (what RoPE the slot was given).

MegaKVCache — MegaAttention decoding (megacontext/mega_attention.py): per level (0 = raw positions, l = the
wLOD-l nodes) the input embedding, (mu, sigma), a dirty flag and every layer's K/V of each element. Here the
sequence is not a flat prefix order: nodes sit beside the raw positions they summarise, so what an edit
dirties is given by the mask rule (`mega_attention.edit_dirties`), and `refresh()` runs the GPT on the dirty
elements only, with the mega mask restricted to their rows and to the key columns they can see (`key_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megacontext.mega_attention import build_mega_layout, edit_dirties, key_bounds, mega_mask, mega_mask_at
from megacontext.positional import gaussian_rotary, span_mu_sigma
from megacontext.zoom import cached_zoom
from nanochat.gpt import InputHistory

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
        self.inputs = InputHistory()  # GPTConfig.smear only

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

    def shifted_inputs(self, x: torch.Tensor, width: int = 1) -> list[torch.Tensor]:
        """GPTConfig.smear: the inputs 1..width slots before each new slot (zeros before slot 0)."""
        return self.inputs.shifted(x, self.pos, width)

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


# -----------------------------------------------------------------------------
# MegaKVCache: per-level K/V for MegaAttention decoding.

# refresh() recomputes everything, not just the dirty rows, once this share of the elements is dirty (an edit
# in the oldest ~15 % of the history). Incremental work is dirty rows x the key columns they see, both ~ the
# dirty share f; the full path runs every row against every key but needs no gather of clean K/V or scatter
# of new K/V per layer and reuses its whole-sequence mask while N is unchanged (refocuses between appends).
# Measured (process CPU ms, N = 4096 raw tokens, depth-4 GPT, K = 32, W = 256, one thread): f = 0.70:
# incremental 701 vs full 996; 0.80: 951 vs 1020; 0.85: 988 vs 1005; 0.90: 1188 vs 980. Crossover ~0.85.
FULL_RECOMPUTE_FRACTION = 0.85


@dataclass
class _Level:
    """One level's elements in time order; arrays have room for `capacity` elements, the first `n` are live."""

    n: int
    emb: torch.Tensor  # [cap, d] input embedding: wte for raw positions, GistNet output for nodes
    mu: torch.Tensor  # [cap] Gaussian RoPE centre
    sigma: torch.Tensor  # [cap] Gaussian RoPE width
    dirty: torch.Tensor  # [cap] bool (on CPU): K/V not valid for the current content
    kv: torch.Tensor  # [layers, 2, H_kv, cap, D]

    def reserve(self, n: int) -> None:
        """Room for n elements, doubling when outgrown (decoding appends one at a time)."""
        cap = self.emb.size(0)
        if n <= cap:
            return
        size = max(n, 2 * cap)
        for name, dim in (("emb", 0), ("mu", 0), ("sigma", 0), ("dirty", 0), ("kv", 3)):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[dim] = size
            new = old.new_zeros(shape)
            new.narrow(dim, 0, self.n).copy_(old.narrow(dim, 0, self.n))
            setattr(self, name, new)


class MegaKVCache:
    """MegaAttention's packed sequence (raw positions + summary nodes) kept per level for decoding and refocus.

    Edits: `append(ids)` (decoding; completed blocks get their nodes), `replace_tokens(start, ids)` (a raw
    token changed) and `set_node(level, index, embed)` (a node re-summarised). Each re-gists the ancestors of
    what it changed and sets the dirty flags of `edit_dirties`. `refresh()` then recomputes the dirty
    elements' K/V in every layer with the GPT's own forward (this object is its kv_cache) and returns the
    next-token logits after the newest raw position; the result equals a forward of the whole packed sequence
    under `mega_mask` (tests/test_kv_cache.py). `levels` is fixed for the cache's life: the mask of an old
    query depends on the top level, so it must be the level count the model was trained with (base_train
    derives it from --max-seq-len: `auto_levels(max_seq_len, K, W)`), not the one the current length needs.
    `zoom_k`: the model's zoom (megacontext/zoom.py); raw rows read their chunks from the cached raw K/V, and
    the dirty sets are unchanged (a chunk is read from the anchor on that first sees its node). `reach`: the
    zoom's pyramid reads a pair farther apart at that distance (zoom.training_reach; None: real distances).
    Masks are dense: a full recompute holds a [T, T] bool mask (T² bytes: 18 MB at T = 4k, 270 MB at 16k),
    so this is for working-context-scale sequences; long training sequences use plan_blocksparse.
    """

    def __init__(
        self,
        model,
        gistnet,
        K: int,
        W: int,
        levels: int,
        capacity: int = 1024,
        full_fraction: float = FULL_RECOMPUTE_FRACTION,
        zoom_k: int = 0,
        reach: float | None = None,
    ):
        if K < 2 or W < 0 or levels < 0:
            raise ValueError(f"need K >= 2, W >= 0, levels >= 0; got K={K}, W={W}, levels={levels}")
        if levels and gistnet is None:
            raise ValueError(f"levels={levels} needs a GistNet to make the nodes")
        self.model, self.gistnet, self.K, self.W, self.levels = model, gistnet, K, W, levels
        self.full_fraction, self.zoom_k, self.reach = full_fraction, zoom_k if levels else 0, reach
        self._layer = 0  # the layer whose K/V insert_kv stored last (the zoom reads its cache)
        c, weight = model.config, model.wte.weight
        self.head_dim = c.head_dim
        self.by_level = []
        for lv in range(levels + 1):
            cap = max(1, capacity // K**lv)
            self.by_level.append(
                _Level(
                    0,
                    weight.new_zeros(cap, c.n_embd),
                    torch.zeros(cap, device=weight.device),
                    torch.zeros(cap, device=weight.device),
                    torch.zeros(cap, dtype=torch.bool),
                    weight.new_zeros(c.n_layer, 2, c.n_kv_head, cap, c.head_dim),
                )
            )
        self.last_logits: torch.Tensor | None = None  # after the newest raw position, as of the last refresh
        self.recomputes = {"incremental": 0, "full": 0}
        self.last_shape = (0, 0)  # (dirty rows, key columns) of the last refresh
        self._plan: tuple[list[torch.Tensor], list[int], bool] | None = None  # during refresh's forward
        self._full_mask: tuple[int, torch.Tensor] | None = None  # (N, [T, T] bool) of the last full recompute

    # ------------------------------------------------------------ content and edits

    @property
    def N(self) -> int:
        """Raw positions held."""
        return self.by_level[0].n

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(lv.n for lv in self.by_level)

    @torch.no_grad()
    def append(self, ids) -> None:
        """New raw tokens at the end; every block they complete gets its node. Only the new elements are dirty:
        nothing old can see the future."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.model.wte.weight.device).reshape(-1)
        raw, a, b = self.by_level[0], self.N, self.N + ids.numel()
        self._full_mask = None  # a mask for the old N: free it
        raw.reserve(b)
        raw.emb[a:b] = self.model.wte(ids)
        raw.mu[a:b] = torch.arange(a, b, dtype=torch.float32)
        raw.sigma[a:b] = 0.0
        raw.dirty[a:b] = True
        raw.n = b
        for lv in range(1, self.levels + 1):
            level, below = self.by_level[lv], self.by_level[lv - 1]
            a, b = level.n, below.n // self.K
            if b == a:
                break
            level.reserve(b)
            level.emb[a:b] = self._gist(lv, torch.arange(a, b))
            start = torch.arange(a, b, dtype=torch.float32) * self.K**lv
            level.mu[a:b], level.sigma[a:b] = span_mu_sigma(start, start + self.K**lv)
            level.dirty[a:b] = True
            level.n = b

    @torch.no_grad()
    def replace_tokens(self, start: int, ids) -> None:
        """Raw positions [start, start + len(ids)) now hold these tokens (all already in the cache)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.model.wte.weight.device).reshape(-1)
        end = start + ids.numel()
        if not 0 <= start < end <= self.N:
            raise ValueError(f"cannot replace raw positions [{start}, {end}) of a cache holding {self.N}")
        self.by_level[0].emb[start:end] = self.model.wte(ids)
        self._edited(0, torch.arange(start, end))

    @torch.no_grad()
    def set_node(self, level: int, index: int, embed: torch.Tensor | None = None) -> None:
        """Node (level, index) is re-summarised: to `embed` [d], or by the GistNet from its children if None."""
        if not 1 <= level <= self.levels or not 0 <= index < self.by_level[level].n:
            raise ValueError(f"no node ({level}, {index}): levels 1..{self.levels}, counts {self.counts}")
        new = self._gist(level, torch.tensor([index]))[0] if embed is None else embed
        self.by_level[level].emb[index] = new.to(self.by_level[level].emb)
        self._edited(level, torch.tensor([index]))

    def _gist(self, level: int, index: torch.Tensor) -> torch.Tensor:
        """GistNet of the children of nodes `index` at `level` -> [len(index), d]."""
        children = self.by_level[level - 1].emb
        rows = (index[:, None] * self.K + torch.arange(self.K)).to(children.device)
        return self.gistnet(children[rows], level)

    def _edited(self, level: int, index: torch.Tensor) -> None:
        """Re-gist the ancestors of the edited elements and raise the dirty flags of everything that changed."""
        parents = index
        for lv in range(level + 1, self.levels + 1):
            parents = torch.unique(parents // self.K)
            parents = parents[parents < self.by_level[lv].n]
            if parents.numel() == 0:
                break
            self.by_level[lv].emb[parents.to(self.by_level[lv].emb.device)] = self._gist(lv, parents)
        for lv, dirty in zip(self.by_level, edit_dirties(level, index, self.counts, self.K, self.W)):
            lv.dirty[: lv.n] |= dirty

    def dirty(self) -> list[torch.Tensor]:
        """Per level, the dirty flags [counts[l]] (a copy)."""
        return [lv.dirty[: lv.n].clone() for lv in self.by_level]

    # ------------------------------------------------------------ recompute

    def wants_full(self) -> bool:
        """Would refresh() recompute everything? (at least `full_fraction` of the elements are dirty)"""
        n_dirty = sum(int(lv.dirty[: lv.n].sum()) for lv in self.by_level)
        return n_dirty >= self.full_fraction * sum(self.counts)

    @torch.no_grad()
    def refresh(self, full: bool | None = None) -> torch.Tensor:
        """Recompute the dirty elements' K/V; return the next-token logits [V] after the newest raw position.

        full None: recompute everything when at least `full_fraction` of the elements are dirty, else only the
        dirty rows. True/False force the choice (the benchmark times both)."""
        if self.N == 0:
            raise ValueError("the cache is empty: append tokens first")
        if full is not True and not any(bool(lv.dirty[: lv.n].any()) for lv in self.by_level):
            return self.last_logits
        if full is None:
            full = self.wants_full()
        if full:
            for lv in self.by_level:
                lv.dirty[: lv.n] = True
        lay = build_mega_layout(self.N, self.K, self.W, self.levels)
        rows = [lv.dirty[: lv.n].nonzero()[:, 0] for lv in self.by_level]
        # key columns: per level from the lowest element any dirty row sees to the level's end (the mask sorts
        # out the rest): for a decode step O(W + K·levels + N/K**levels) columns, not N
        lo = key_bounds(rows, self.K, self.W, self.levels)
        q_packed = torch.cat([lay.offsets[lv] + q for lv, q in enumerate(rows)])
        cols = torch.cat([lay.offsets[lv] + torch.arange(lo[lv], n) for lv, n in enumerate(self.counts)])
        device = self.model.wte.weight.device
        if full:  # the whole-sequence mask is a function of N alone: refocuses between appends reuse it
            if self._full_mask is None or self._full_mask[0] != self.N:
                self._full_mask = (self.N, mega_mask(lay, device))
            mask = self._full_mask[1]
        else:
            mask = mega_mask_at(lay, q_packed, cols).to(device)
        device = self.model.wte.weight.device
        dev_rows = [q.to(device) for q in rows]
        embeds = torch.cat([lv.emb[q] for lv, q in zip(self.by_level, dev_rows)])
        mu = torch.cat([lv.mu[q] for lv, q in zip(self.by_level, dev_rows)])
        sigma = torch.cat([lv.sigma[q] for lv, q in zip(self.by_level, dev_rows)])
        rotary = gaussian_rotary(mu[None], sigma[None], self.head_dim)
        newest = rows[0].numel() > 0 and int(rows[0][-1]) == self.N - 1  # raw rows come first, in time order
        row = rows[0].numel() - 1 if newest else 0
        # Only one row's logits are wanted; the LM head would otherwise run on every dirty row.
        hook = self.model.lm_head.register_forward_pre_hook(lambda m, args: (args[0][:, row : row + 1],))
        self._plan = (dev_rows, lo, full)
        try:
            zoom = None
            if self.zoom_k:  # raw rows also read their top-k chunks from this layer's cached raw K/V
                at = None
                if self.reach is not None:  # the key columns' centres: all rows (full), else from `lo` on
                    mu_cols = mu if full else torch.cat([lv.mu[a : lv.n] for lv, a in zip(self.by_level, lo)])
                    at = (mu, mu_cols, self.reach)
                zoom = lambda q, k, v: self._zoom(q, k, v, mask, rows[0], at)  # noqa: E731
            out = self.model(
                embeds=embeds[None], rotary=rotary, kv_cache=self, attn_mask=mask[None, None], attn_fn=zoom
            )
        finally:
            hook.remove()
            self._plan = None
        if newest:
            self.last_logits = out[0, -1]
        self.recomputes["full" if full else "incremental"] += 1
        self.last_shape = (len(q_packed), len(cols))
        return self.last_logits

    # ------------------------------------------------------------ the GPT's protocol (during refresh)

    def get_pos(self) -> int:
        return self.N

    def shifted_inputs(self, x: torch.Tensor, width: int = 1) -> list[torch.Tensor]:
        raise ValueError(
            "MegaKVCache cannot serve a GPT with smear (token shift): MegaAttention packs nodes after the raw "
            "tokens, so the previous packed position is not the previous token"
        )

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the dirty rows' k, v [1, H_kv, rows, D]; return this layer's keys/values at refresh's columns."""
        if self._plan is None:
            raise ValueError("MegaKVCache is driven by refresh(), not by a plain forward")
        rows, lo, full = self._plan
        self._layer = layer_idx
        at = 0
        for lv, q in zip(self.by_level, rows):
            n = q.numel()
            if n:
                lv.kv[layer_idx, 0].index_copy_(1, q, k[0, :, at : at + n].to(lv.kv.dtype))
                lv.kv[layer_idx, 1].index_copy_(1, q, v[0, :, at : at + n].to(lv.kv.dtype))
            at += n
        if full:  # the rows are every element in packed order: they are the keys
            return k, v
        kv = torch.cat([lv.kv[layer_idx, :, :, a : lv.n] for lv, a in zip(self.by_level, lo)], dim=2)
        k_all, v_all = kv[0], kv[1]
        return k_all[None], v_all[None]

    def advance(self, T_new: int) -> None:
        """After the last layer: the recomputed rows are clean."""
        rows = self._plan[0]
        if T_new != sum(q.numel() for q in rows):
            raise ValueError(f"advance({T_new}) but refresh ran {sum(q.numel() for q in rows)} rows")
        for lv, q in zip(self.by_level, rows):
            lv.dirty[q.cpu()] = False

    def _zoom(self, q, k, v, mask, raw_rows, reach):
        """The zoom over this layer's cache (zoom.cached_zoom): every raw row may read any complete chunk."""
        raw = self.by_level[0]
        kv = lambda i: raw.kv[self._layer, i, :, : raw.n][None]
        return cached_zoom(q, k, v, mask, raw_rows, kv(0), kv(1), self.K, self.W, self.zoom_k, reach)

    # ------------------------------------------------------------ inspection

    def packed_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cached k, v [1, H_kv, T, D] in mega_attention's packed order (raw, then level 1, ...)."""
        k = torch.cat([lv.kv[layer_idx, 0, :, : lv.n] for lv in self.by_level], dim=1)
        v = torch.cat([lv.kv[layer_idx, 1, :, : lv.n] for lv in self.by_level], dim=1)
        return k[None], v[None]

    def packed_embeds(self) -> torch.Tensor:
        """Input embeddings [T, d] in packed order."""
        return torch.cat([lv.emb[: lv.n] for lv in self.by_level])

    def nbytes(self) -> int:
        return sum(lv.kv.numel() * lv.kv.element_size() for lv in self.by_level)
