"""The MegaContext inference session: a chat whose memory never runs out (docs/design.md §3 "Inference session").

The loop: ingest tokens into the tree -> GistNet gists every complete block -> the working context (WC) grows
within W_max (old history collapses into gists) -> every K new tokens (at block boundaries) LensNet scores the
WC entries and the focus allocator expands/collapses some of them -> the GPT decodes on the WC with a KV cache
over its slots that survives refocuses and is recomputed only from the first slot whose content changed
(megacontext/kv_cache.py). Per-token cost is set by W_max, not by the history; the tree can live on disk.

The GPT sees the WC exactly as it was trained to (megacontext/training.py): one slot per raw token and per
gist in timeline order, numbered 0..L-1 with ordinary RoPE. LensNet gets one row per entry (a gist; a raw
block as its LOD1 gist when complete, else the mean of its token embeddings) and the K newest tokens as query.
After an ingest (a user turn, a pasted document) the focus settles (megacontext/focus.py): the same loop the
evaluation runs, so what mc_eval measures is what a chat user gets. Gist levels GistNet was not trained on are
used only when the history does not fit the budget otherwise (focus.LevelCap).

Persistence (megacontext/session_store.py): save(dir) writes the tree (disk backend) and session.json (WC
entries, allocator, conversation, RNG) atomically, session.json last: it is the commit point.
MCSession.open(dir, ...) continues exactly where the saved session stood, so the next greedy reply is identical.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from megacontext.allocator import FocusAllocator, lookahead_scores, normalize_scores
from megacontext.config import MCConfig, build_nets
from megacontext.entries import BudgetError, Edit, gist_entry
from megacontext.focus import LevelCap, settle
from megacontext.gistnet import GistNet
from megacontext.kv_cache import SlotKVCache, key_index, key_level, slot_key
from megacontext.lens_inputs import tree_lens_scores
from megacontext.lensnet import LensNet
from megacontext.positional import gaussian_rotary
from megacontext.session_store import new_disk_tree, open_session, save_session
from megacontext.telemetry import Telemetry
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from nanochat.common import UserError
from nanochat.engine import sample_next_token

INGEST_CHUNK = 8192  # tokens appended per step of a long ingest: bounds the GistNet batch and the WC growth
GIST_BATCH = 256  # blocks per GistNet call while gisting (one batched call per 256 blocks)
# Look-ahead (MCConfig.lookahead) for gists up to this level: a LOD2 gist costs one extra LensNet call per
# refocus, a LOD3 one 1 + K (allocator.lookahead_scores), and a long chat holds gists up to LOD5 and beyond.
LOOKAHEAD_MAX_LEVEL = 2


def model_fingerprint(model, gistnet) -> str:
    """Names what made a tree's gists: LOD1 gists are GistNet(wte(tokens)), so both the GPT's embedding and
    the GistNet weights. A tree records it and refuses to be continued by another model."""
    h = hashlib.sha256()
    for t in [model.wte.weight, *gistnet.state_dict().values()]:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "gistnet-" + h.hexdigest()[:16]


def build_mc_nets(
    cfg: MCConfig, n_embd: int, state: dict | None = None, device="cpu"
) -> tuple[GistNet, LensNet]:
    """GistNet and LensNet as the config describes them, with the checkpoint's weights when given (strict)."""
    gistnet, lensnet = build_nets(cfg, n_embd)
    if state is not None:
        for name, net in (("gistnet", gistnet), ("lensnet", lensnet)):
            if name not in state:
                raise UserError(
                    f"the checkpoint's MegaContext state lacks {name}; it cannot run an MC session"
                )
            net.load_state_dict(state[name], strict=True)
    return gistnet.to(device).eval(), lensnet.to(device).eval()


def load_mc_nets(ckpt_dir, step: int, meta: dict, n_embd: int, device):
    """(cfg, gistnet, lensnet) saved with a checkpoint, or None when it was trained without MegaContext."""
    from nanochat.checkpoint_manager import load_mc_state

    if not meta.get("mc"):
        return None
    cfg = MCConfig.from_dict(meta["mc"])
    gistnet, lensnet = build_mc_nets(cfg, n_embd, load_mc_state(ckpt_dir, step, device), device)
    return cfg, gistnet, lensnet


class MCSession:
    """One conversation's memory and decoding state. Not thread-safe: one session per worker."""

    def __init__(
        self,
        model,
        tokenizer,
        gistnet,
        lensnet,
        cfg: MCConfig,
        tree=None,
        device="cpu",
        seed: int = 0,
        model_id: str | None = None,
    ):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.gistnet, self.lensnet = gistnet, lensnet
        self.device = torch.device(device)
        self.K = cfg.block_size
        self.model_id = model_id or model_fingerprint(model, gistnet)
        d = model.config.n_embd
        if tree is None:
            tree = MegaContextTree.in_memory(self.K, d, model_id=self.model_id)
        if (tree.K, tree.d, tree.model_id) != (self.K, d, self.model_id):
            raise UserError(
                f"tree (K={tree.K}, d={tree.d}, model {tree.model_id!r}) does not belong to this model "
                f"(K={self.K}, d={d}, model {self.model_id!r}); start a new session"
            )
        self.tree = tree
        self.view = LevelCap(tree, cfg.wc_levels)  # what the WC and the lens see: the trained levels
        c = cfg
        self.allocator = FocusAllocator(
            c.block_size,
            c.wc_budget,
            c.recent,
            c.tau_expand,
            c.tau_collapse,
            c.n_diff,
            c.cooldown,
            c.allocator,
            seed=seed,
            flank=c.flank,
        )
        self.telemetry = Telemetry()
        g = model.config
        self.cache = SlotKVCache(g.n_layer, g.n_kv_head, g.head_dim, cfg.wc_budget + 1, self.device)
        # slot s always has RoPE phase s, so one table serves every WC
        slots = torch.arange(cfg.wc_budget + 1, dtype=torch.float32, device=self.device)
        self._slot_rotary = gaussian_rotary(slots[None], 0.0, g.head_dim)
        self._last_token = (-1, -1)  # (position, id) of the newest generated token: no tree read to embed it
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.messages: list[dict] = []  # the conversation as chat messages (what a user sees)
        self.last_edits: list[Edit] = []  # what the last refocus that changed anything changed...
        self.last_edits_refocus = 0  # ...and its number (1-based; 0 = none yet)
        self.refocus_at = tree.num_tokens  # history length at the last refocus
        # seconds spent in decoding steps: the GPT forward, sampling, and the rest (the controller: tree,
        # gisting, WC upkeep, LensNet, allocator, gathering the GPT's inputs)
        self.time_gpt = self.time_sample = self.time_controller = 0.0
        self.stop_tokens: set[int] = set()  # no tokenizer (evaluation on token ids): nothing stops generation
        if tokenizer is not None:
            self.stop_tokens = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
        self.wc: WorkingContext | None = None
        self._table: tuple | None = None  # (wc, keys, mu, sigma): the slot table of self.wc
        self._logits: tuple[int, torch.Tensor] | None = None  # (cache pos, logits) of the last forward
        # (history length, level cap, entries) -> raw focus scores of the last refocus: a settle's idle rounds
        # score the same WC against the same query, and LensNet is a pure function of them
        self._scores: tuple[tuple, torch.Tensor] | None = None
        self._absorb()

    # ------------------------------------------------------------ memory: tree, WC, refocus

    @torch.no_grad()
    def _absorb(self) -> None:
        """Gist the complete blocks and bring the WC up to the tree's length (within budget)."""
        if self.tree.pending():
            dtype = next(self.gistnet.parameters()).dtype
            self.tree.gist_pending(
                embed=lambda ids: self.model.wte(ids),
                gist=lambda x, level: self.gistnet(x.to(dtype), level),
                batch_size=GIST_BATCH,
                device=self.device,
            )
        if self.tree.num_tokens == 0:
            return
        while True:
            try:
                if self.wc is None:
                    self.wc = WorkingContext.from_tree(self.view, self.cfg.wc_budget, self.cfg.recent)
                else:
                    self.wc = self._make_room(self.wc).extend(self.view)
                return
            except BudgetError:
                if self.view.cap >= self.tree.max_level:
                    raise
                self.view.cap += 1  # the history outgrew the trained levels: go one level coarser

    @torch.no_grad()
    def _make_room(self, wc: WorkingContext) -> WorkingContext:
        """`wc` with room for the tokens the tree gained since it was built, made by collapsing what LensNet
        values least (FocusAllocator.room says why not the oldest raw block). What that cannot cover is left to
        WorkingContext.extend (e.g. new raw blocks of a long ingest)."""
        over = wc.cost + self.tree.num_tokens - wc.num_tokens - self.cfg.wc_budget
        if over <= 0 or self.tree.num_tokens < self.K:  # LensNet needs K query tokens
            return wc
        edits = self.allocator.room(wc, lambda: self.lens_scores(wc), self.view, over)
        return wc.apply(edits, self.view, whole=False)

    def ingest(
        self,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Append tokens to the memory (any length: a pasted document goes in chunk by chunk), then refocus
        if a block boundary was crossed. `progress(done, total)` is called after each chunk (a long paste
        shows progress in the CLI and streams it in the web app). Returns the edits the settling made."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vocab = self.model.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        with self.telemetry.timer("ingest"):
            for lo in range(0, ids.size, INGEST_CHUNK):
                self.tree.append(ids[lo : lo + INGEST_CHUNK])
                self._absorb()
                if progress is not None:
                    progress(min(lo + INGEST_CHUNK, ids.size), ids.size)
        return self.settle() if self._boundary_crossed() else 0

    def settle(self) -> int:
        """Refocus until the WC settles (focus.settle, bounded): after an ingest, old evidence may need
        several rounds (LOD2 -> LOD1 -> raw, refunding budget elsewhere). Returns the edits made."""
        return settle(self.refocus, self.cfg.cooldown)

    def _boundary_crossed(self) -> bool:
        return self.tree.num_tokens // self.K > self.refocus_at // self.K

    @torch.no_grad()
    def lens_scores(self, wc: WorkingContext | None = None) -> torch.Tensor:
        """LensNet's focus score per entry of `wc` (default: the session's WC), against the K newest tokens
        (as in training)."""
        return self.lens_scores_many([wc or self.wc])[0]

    @torch.no_grad()
    def lens_scores_many(self, wcs: list[WorkingContext]) -> list[torch.Tensor]:
        """lens_scores of several working contexts in one LensNet call (a refocus's look-ahead)."""
        K, N = self.K, self.tree.num_tokens
        query = self.tree.tokens(N - K, N, device=self.device)
        contexts = [w.entries for w in wcs]
        return tree_lens_scores(
            self.lensnet, contexts, self.view, self.model.wte, query, self.device, self.view.node_cache
        )

    def refocus(self) -> list[Edit]:
        """LensNet scores -> allocator edits -> new WC. The KV cache is invalidated lazily, from the first slot
        whose content changed, at the next forward."""
        self.refocus_at = self.tree.num_tokens
        if self.wc is None or self.tree.num_tokens < self.K:
            return []  # LensNet needs K query tokens
        with self.telemetry.timer("refocus"):
            key = (self.tree.num_tokens, self.view.cap, self.wc.entries)
            if self._scores is not None and self._scores[0] == key:
                raw = self._scores[1]
            elif self.cfg.lookahead:
                raw = lookahead_scores(
                    self.wc, self.view, max_level=LOOKAHEAD_MAX_LEVEL, score_many=self.lens_scores_many
                )
            else:
                raw = self.lens_scores()
            self._scores = (key, raw)
            self.wc, edits = self.allocator.refocus(self.wc, normalize_scores(raw), self.view)
        self.telemetry.record_refocus(self.wc, edits)
        if edits:
            self.last_edits, self.last_edits_refocus = edits, self.telemetry.total_refocuses
        return edits

    # ------------------------------------------------------------ decoding

    def _slot_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-slot content key, mu and sigma of the current WC (cached per WC object)."""
        if self._table is not None and self._table[0] is self.wc:
            return self._table[1:]
        es = self.wc.entries
        lv = np.fromiter((e.level for e in es), np.int64, len(es))
        st = np.fromiter((e.start for e in es), np.int64, len(es))
        en = np.fromiter((e.end for e in es), np.int64, len(es))
        span = np.where(lv == 0, 1, self.K ** np.maximum(lv, 1))
        cost = np.where(lv == 0, en - st, 1)
        owner = np.repeat(np.arange(len(es)), cost)  # entry of each slot
        within = np.arange(int(cost.sum())) - (np.cumsum(cost) - cost)[owner]
        raw = lv[owner] == 0
        index = np.where(raw, st[owner] + within, st[owner] // span[owner])  # raw: token position
        keys = torch.from_numpy(slot_key(lv[owner], index))
        mu, sigma = torch.arange(len(keys), dtype=torch.float32), torch.zeros(len(keys))
        self._table = (self.wc, keys, mu, sigma)
        return keys, mu, sigma

    def _slot_embeds(self, keys: torch.Tensor) -> torch.Tensor:
        """GPT input rows for slots named by keys: token embeddings for raw slots, tree gists for the rest."""
        level, index = key_level(keys), key_index(keys)
        dtype = self.model.wte.weight.dtype
        out = torch.empty(len(keys), self.tree.d, device=self.device, dtype=dtype)
        raw = (level == 0).numpy()
        if len(keys) == 1 and raw[0] and int(index[0]) == self._last_token[0]:  # the common decode step
            return self.model.wte(torch.tensor([self._last_token[1]], device=self.device))
        if raw.any():
            pos = index.numpy()[raw]
            runs = np.split(pos, np.nonzero(np.diff(pos) != 1)[0] + 1)  # contiguous spans: one read each
            ids = torch.cat([self.tree.tokens(int(r[0]), int(r[-1]) + 1, device=self.device) for r in runs])
            out[torch.from_numpy(raw).to(self.device)] = self.model.wte(ids)
        for lvl in torch.unique(level[~torch.from_numpy(raw)]).tolist():
            sel = level == lvl
            out[sel.to(self.device)] = self.tree.gists(lvl, index[sel].numpy(), device=self.device).to(dtype)
        return out

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Next-token logits [V] after the whole history, computing only the slots the cache lacks."""
        if self.wc is None:
            raise ValueError("the session is empty: ingest a prompt first")
        keys, mu, sigma = self._slot_table()
        L = len(keys)
        valid = self.cache.match(keys)
        if valid == L and self._logits is not None and self._logits[0] == L == self.cache.pos:
            return self._logits[1]
        valid = min(valid, L - 1)  # at least the last slot runs: its output is the prediction
        if valid < self.cache.pos:
            self.cache.truncate(valid)
            self._logits = None
        new_mu, new_sigma = mu[valid:], sigma[valid:]
        cos, sin = (t[:, valid:L] for t in self._slot_rotary)
        self.cache.stage(keys[valid:], new_mu, new_sigma)
        # The GPT makes logits for every row it is given; a step needs the last row's only. After an edit
        # hundreds of slots are recomputed and the LM head (V x d per row) was 80% of that (measured: 500
        # slots, d=256, V=32k: 0.49 s -> 0.10 s). A pre-hook scoped to this call feeds it the last row only.
        embeds = self._slot_embeds(keys[valid:])[None]
        hook = self.model.lm_head.register_forward_pre_hook(_last_row)
        t0 = time.perf_counter()
        try:
            out = self.model(embeds=embeds, rotary=(cos, sin), kv_cache=self.cache)
        finally:
            hook.remove()
        self.time_gpt += time.perf_counter() - t0
        self._logits = (self.cache.pos, out[0, -1])
        return self._logits[1]

    def push(self, token: int) -> None:
        """One generated (or, in evaluation, teacher-forced) token into the memory; refocus when it completes a
        block."""
        self._last_token = (self.tree.num_tokens, token)
        self.tree.append([token])
        self._absorb()
        if self._boundary_crossed():
            self.refocus()

    def generate(
        self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None
    ) -> Iterator[int]:
        """Stream sampled token ids; each is appended to the memory before it is yielded. Stops after a stop
        token (<|assistant_end|>, <|bos|>; it is yielded and remembered) or max_tokens. seed reseeds the
        session's generator; None continues it (so a reopened session continues the same stream)."""
        if seed is not None:
            self.rng.manual_seed(seed)
        for _ in range(max_tokens):
            t0, gpt0 = time.perf_counter(), self.time_gpt
            logits = self.logits()
            t1 = time.perf_counter()
            token = int(sample_next_token(logits[None], self.rng, temperature, top_k)[0])
            t2 = time.perf_counter()
            self.push(token)
            self.time_sample += t2 - t1
            self.time_controller += time.perf_counter() - t0 - (t2 - t1) - (self.time_gpt - gpt0)
            yield token
            if token in self.stop_tokens:
                return

    # ------------------------------------------------------------ chat turns

    def add_user_message(self, text: str, progress: Callable[[int, int], None] | None = None) -> int:
        """A user turn, rendered as in training (BOS first), ending with <|assistant_start|> for the reply;
        `progress` as in ingest. Returns the edits the settling focus made."""
        tok = self.tokenizer
        ids = [tok.get_bos_token_id()] if self.tree.num_tokens == 0 else []
        ids += [tok.encode_special("<|user_start|>"), *tok.encode(text), tok.encode_special("<|user_end|>")]
        ids.append(tok.encode_special("<|assistant_start|>"))
        self.messages.append({"role": "user", "content": text})
        return self.ingest(ids, progress)

    def reply(
        self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None
    ) -> Iterator[int]:
        """The assistant's turn: yields its tokens (not the stop token) and records the message. A turn cut
        short (max_tokens, or the caller stopped reading) is closed with <|assistant_end|> so the next user turn
        is well formed."""
        tokens: list[int] = []
        stopped = False
        try:
            for token in self.generate(max_tokens, temperature, top_k, seed):
                if token in self.stop_tokens:
                    stopped = True
                    break
                tokens.append(token)
                yield token
        finally:
            if not stopped:
                self.ingest([self.tokenizer.encode_special("<|assistant_end|>")])
            self.messages.append({"role": "assistant", "content": self.tokenizer.decode(tokens)})

    # ------------------------------------------------------------ reporting

    def memory(self) -> dict:
        """The WC over the history as JSON-able data (the web memory panel, /memory in the CLI)."""
        wc, K = self.wc, self.K
        edits = [
            {"kind": e.kind, "level": e.level, "start": s.start, "end": s.end}
            for e in self.last_edits
            for s in [gist_entry(e.level, e.index, K)]
        ]
        return {
            "num_tokens": self.tree.num_tokens,
            "budget": self.cfg.wc_budget,
            "block_size": K,
            "cost": wc.cost if wc else 0,
            "entries": [[e.level, e.start, e.end] for e in wc.entries] if wc else [],
            "render": wc.render() if wc else "",
            "last_edits": edits,
            "last_edits_refocus": self.last_edits_refocus,
            "refocuses": self.telemetry.total_refocuses,
            "tree_nodes": [self.tree.num_nodes(lv) for lv in range(self.tree.max_level + 1)],
            "residency": wc.residency if wc else 0.0,
        }

    # ------------------------------------------------------------ persistence

    @classmethod
    def create(
        cls, directory, model, tokenizer, gistnet, lensnet, cfg: MCConfig, device="cpu", seed: int = 0
    ) -> MCSession:
        """A new, empty session whose tree lives on disk in `directory` (save() then only commits)."""
        model_id = model_fingerprint(model, gistnet)
        tree = new_disk_tree(directory, cfg.block_size, model.config.n_embd, model_id)
        return cls(model, tokenizer, gistnet, lensnet, cfg, tree, device, seed, model_id)

    def save(self, directory) -> None:
        """Persist the session in `directory` (megacontext/session_store.py: the tree, then session.json)."""
        save_session(self, directory)

    @classmethod
    def open(
        cls, directory, model, tokenizer, gistnet, lensnet, device="cpu", model_id: str | None = None
    ) -> MCSession:
        """Continue a saved session (megacontext/session_store.py), tokens committed after the save included."""
        model_id = model_id or model_fingerprint(model, gistnet)
        return open_session(cls, directory, model, tokenizer, gistnet, lensnet, device, model_id)

    def close(self) -> None:
        self.tree.close()


def _last_row(module, args):
    return (args[0][:, -1:],)
