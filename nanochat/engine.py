"""Inference: a KV cache and batched, streaming sampling from a GPT.

Prefill runs the prompts through the model once and caches every layer's keys/values; each decode
step then feeds one token per row and attends over the cache, so a step costs O(context) instead of
O(context²).

Ragged prompts share one batch by left-padding: row b has pad_len[b] junk tokens in front. Each row
gets its own rotary positions (index - pad_len, so its first real token is at position 0, exactly as
if it ran alone) and an attention mask that hides pad keys, at prefill and at every decode step. The
cache records the pad lengths, so it can build both for any step.

Tool use (the python calculator): a reply may hold `<|python_start|> code <|python_end|>`; chat runs the code
in the sandbox (nanochat.execution) and writes `<|output_start|> output <|output_end|>` back into the turn, as
SFT taught the model to expect. ToolEngine does it for a batch (through `Engine.on_token`: a row's forced
tokens are fed in place of sampled ones and marked 0 in the masks), `session_turn` for a memory session that
decodes one token at a time, and `ReplyText` shows such a turn as readable text (a fenced code block and its
output) instead of special tokens.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat.execution import python_tool
from nanochat.gpt import InputHistory, rotary_cos_sin


class KVCache:
    """Keys/values of every layer, pre-allocated as [L, 2, B, H_kv, T_max, D] (grown if outrun).

    The model calls insert_kv(layer, k, v) for each layer, then advance(T_new) once. truncate(pos)
    forgets everything from pos on (an edit upstream invalidates the suffix). dtype=None takes the
    dtype of the first inserted keys, which is what autocast produces (bf16 on CUDA).
    """

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        seq_len: int,
        head_dim: int,
        num_layers: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        pad_lens: torch.Tensor | None = None,
    ):
        self.batch_size, self.num_heads, self.head_dim, self.num_layers = (
            batch_size,
            num_heads,
            head_dim,
            num_layers,
        )
        self.capacity = seq_len
        self.device, self.dtype = torch.device(device), dtype
        self.kv: torch.Tensor | None = None  # allocated on first insert
        self.pos = 0
        if pad_lens is not None:
            pad_lens = torch.as_tensor(pad_lens, dtype=torch.long, device=self.device)
            assert pad_lens.shape == (batch_size,), "one pad length per row"
        self.pad_lens = pad_lens
        self.inputs = InputHistory()  # GPTConfig.smear only

    def shifted_inputs(self, x: torch.Tensor, width: int = 1) -> list[torch.Tensor]:
        """The smear's inputs 1..width positions before x [B, T_new, d]; zero before a row's first real token."""
        prevs = self.inputs.shifted(x, self.pos, width)
        if self.has_padding():
            p = self.positions(x.size(1))
            prevs = [prev.masked_fill((p < j)[..., None], 0.0) for j, prev in enumerate(prevs, 1)]
        return prevs

    def get_pos(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, pos: int) -> None:
        """Drop the cached positions >= pos; the next insert writes at pos."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {pos}")
        self.pos = pos

    def advance(self, T_new: int) -> None:
        self.pos += T_new

    def insert_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T_new, D] at the current position; return views of all cached so far."""
        B, H, T_new, D = k.shape
        assert (B, H, D) == (self.batch_size, self.num_heads, self.head_dim), f"kv of shape {tuple(k.shape)}"
        end = self.pos + T_new
        if self.kv is None:
            dtype = self.dtype or k.dtype
            shape = (self.num_layers, 2, B, H, max(self.capacity, end), D)
            self.kv = torch.empty(shape, dtype=dtype, device=self.device)
        elif end > self.kv.size(4):  # outrun: grow (doubling keeps the copies amortised O(1) per token)
            grown = torch.empty(
                (*self.kv.shape[:4], max(end, 2 * self.kv.size(4)), D),
                dtype=self.kv.dtype,
                device=self.device,
            )
            grown[..., : self.pos, :] = self.kv[..., : self.pos, :]
            self.kv = grown
        self.kv[layer_idx, 0, :, :, self.pos : end] = k
        self.kv[layer_idx, 1, :, :, self.pos : end] = v
        return self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]

    def has_padding(self) -> bool:
        return self.pad_lens is not None and bool((self.pad_lens > 0).any())

    def positions(self, T_new: int) -> torch.Tensor:
        """Rotary positions [B, T_new] of the next T_new tokens: index - pad_len (pads clamp to 0)."""
        index = self.pos + torch.arange(T_new, device=self.device)
        pad = self.pad_lens if self.pad_lens is not None else torch.zeros(self.batch_size, device=self.device)
        return (index[None, :] - pad[:, None]).clamp(min=0).float()

    def attn_mask(self, T_new: int) -> torch.Tensor:
        """Bool [B, 1, T_new, pos + T_new]: causal, and no row attends to its pad keys.

        A pad query still sees itself: a fully masked softmax row gives NaN, and NaN keys/values in
        later layers would leak into real rows through their zero attention weights (0 · NaN = NaN).
        """
        q_index = self.pos + torch.arange(T_new, device=self.device)
        k_index = torch.arange(self.pos + T_new, device=self.device)
        causal = k_index[None, :] <= q_index[:, None]  # [Tq, Tk]
        if self.pad_lens is None:
            return causal[None, None].expand(self.batch_size, 1, -1, -1)
        real_key = k_index[None, :] >= self.pad_lens[:, None]  # [B, Tk]
        own_key = k_index[None, :] == q_index[:, None]  # [Tq, Tk]
        return (causal[None] & (real_key[:, None, :] | own_key[None]))[:, None]

    def repeat_interleave(self, n: int) -> KVCache:
        """A cache with every row repeated n times (several samples from one prefill)."""
        out = KVCache(
            self.batch_size * n, self.num_heads, self.capacity, self.head_dim, self.num_layers, self.device
        )
        out.dtype, out.pos = self.dtype, self.pos
        if self.kv is not None:
            out.kv = self.kv.repeat_interleave(n, dim=2)
        out.inputs = self.inputs.repeat_interleave(n)
        if self.pad_lens is not None:
            out.pad_lens = self.pad_lens.repeat_interleave(n)
        return out


def sample_next_token(
    logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy argmax; top_k keeps the k most likely."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=rng)
        return indices.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


@dataclass
class RowState:
    """Per-row generation state. forced_tokens are fed next instead of sampling (tool output)."""

    tokens: list[int]
    forced_tokens: deque = field(default_factory=deque)
    completed: bool = False


class Engine:
    """Batched sampling from `model` with a KV cache; stops a row on <|assistant_end|> or <|bos|>."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.stop_tokens = {self.bos, tokenizer.encode_special("<|assistant_end|>")}

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def _forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] at the last position of ids [B, T], appended to the cache."""
        if not cache.has_padding():  # plain causal path: the model's defaults, and the fast SDPA kernel
            return self.model(ids, kv_cache=cache)[:, -1]
        rotary = rotary_cos_sin(cache.positions(ids.size(1)), self.model.config.head_dim)
        return self.model(ids, kv_cache=cache, rotary=rotary, attn_mask=cache.attn_mask(ids.size(1)))[:, -1]

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], seq_len: int) -> tuple[KVCache, torch.Tensor]:
        """Left-pad ragged prompts, run them once; returns the cache and next-token logits [B, V]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        pad_lens = [T - len(p) for p in prompts]
        ids = torch.tensor([[self.bos] * n + list(p) for n, p in zip(pad_lens, prompts)], device=self.device)
        c = self.model.config
        cache = KVCache(
            len(prompts), c.n_kv_head, seq_len, c.head_dim, c.n_layer, self.device, pad_lens=pad_lens
        )
        return cache, self._forward(ids, cache)

    @torch.no_grad()
    def decode_step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens [B]); returns next-token logits [B, V]."""
        return self._forward(tokens.view(-1, 1).to(self.device), cache)

    def on_token(self, row: RowState, token: int) -> None:
        """Called after each token a live row emits. Tool use hooks in here by appending to
        row.forced_tokens (e.g. the calculator's output after <|python_end|>). Plain sampling: nothing."""

    @torch.no_grad()
    def generate(
        self,
        tokens: list[int] | list[list[int]],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step, one entry per row.

        tokens: one prompt, or a list of prompts of any lengths; each prompt gives num_samples rows
        (prompt-major order). mask 1 = sampled, 0 = forced. Rows that already stopped keep getting
        tokens (ignore them; generate_batch does). Ends when every row has stopped or after
        max_tokens steps; max_tokens=None runs until the longest row fills the model's sequence_len.
        """
        prompts = [tokens] if tokens and isinstance(tokens[0], int) else tokens
        longest = max((len(p) for p in prompts), default=0)
        if max_tokens is None:
            max_tokens = self.model.config.sequence_len - longest
            if max_tokens <= 0:
                raise ValueError(
                    f"prompt of {longest} tokens fills the model's {self.model.config.sequence_len}"
                )
        if max_tokens <= 0:
            return
        cache, logits = self.prefill(prompts, longest + max_tokens)
        if num_samples > 1:
            cache, logits = cache.repeat_interleave(num_samples), logits.repeat_interleave(num_samples, dim=0)
        rows = [RowState(list(p)) for p in prompts for _ in range(num_samples)]
        rng = torch.Generator(device=self.device).manual_seed(seed)
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced_tokens) and not row.completed
                token = row.forced_tokens.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                if row.completed:
                    continue
                row.tokens.append(token)
                if token in self.stop_tokens:
                    row.completed = True
                else:
                    self.on_token(row, token)
            yield column, masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                return
            logits = self.decode_step(cache, torch.tensor(column, device=self.device))

    def generate_batch(
        self, tokens: list[int] | list[list[int]], num_samples: int = 1, **kwargs
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Run generate to the end: per row, prompt + generated tokens (stop token dropped), and masks
        (0 for the prompt and forced tokens, 1 for sampled ones)."""
        prompts = [tokens] if tokens and isinstance(tokens[0], int) else tokens
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in results]
        done = [False] * len(results)
        for column, mask_column in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(m)
        return results, masks


# ---------------------------------------------------------------- tool use: the python calculator


def tool_call(tokens: list[int], python_start: int, python_end: int) -> list[int] | None:
    """The code tokens of a call that `tokens` just closed (last token <|python_end|>), else None."""
    if not tokens or tokens[-1] != python_end:
        return None
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] == python_end:
            return None  # a stray <|python_end|>: nothing was opened since the last call
        if tokens[i] == python_start:
            return tokens[i + 1 : -1]
    return None


class ToolUse:
    """Runs the python calls of a turn: when a token closes a call, its code goes to the sandbox and the
    tokens to feed next are `<|output_start|> output <|output_end|>` (what the tool, not the model, writes)."""

    def __init__(self, tokenizer, timeout_s: float = 3.0):
        special = tokenizer.encode_special
        self.tokenizer, self.timeout_s = tokenizer, timeout_s
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def output_after(self, tokens: list[int]) -> list[int] | None:
        """The tool's output tokens when the last of `tokens` closed a python call, else None."""
        code = tool_call(tokens, self.python_start, self.python_end)
        if code is None:
            return None
        output = python_tool(self.tokenizer.decode(code), timeout_s=self.timeout_s)
        return [self.output_start, *self.tokenizer.encode(output), self.output_end]


class ToolEngine(Engine):
    """An Engine whose rows run their python calls: at <|python_end|> the code since the row's last
    <|python_start|> goes to the sandboxed calculator, and its output is forced in (mask 0)."""

    def __init__(self, model, tokenizer, timeout_s: float = 3.0):
        super().__init__(model, tokenizer)
        self.tools = ToolUse(tokenizer, timeout_s)

    def on_token(self, row: RowState, token: int) -> None:
        if token == self.tools.python_end:
            row.forced_tokens.extend(self.tools.output_after(row.tokens) or [])


class FullContext:
    """What a RecomputeEngine keeps between steps instead of K/V: the ids so far, [rows, T]."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def repeat_interleave(self, n: int) -> FullContext:
        return FullContext(self.ids.repeat_interleave(n, dim=0))


class RecomputeEngine(ToolEngine):
    """A ToolEngine for a model whose attention a KV cache cannot follow (the window and MegaAttention modes:
    a new token changes which nodes and chunks later queries see): every step runs the model's own forward over
    the whole sequence, so a chat answers exactly as `mc_eval`'s full view scores the checkpoint. A step costs a
    forward over the sequence; the context is bounded by `model.rotary_len` (unbounded under mega)."""

    def prefill(self, prompts: list[list[int]], seq_len: int) -> tuple[FullContext, torch.Tensor]:
        if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ValueError("a recompute engine takes non-empty prompts of one length")
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        return FullContext(ids), self.model(ids)[:, -1]

    def decode_step(self, cache: FullContext, tokens: torch.Tensor) -> torch.Tensor:
        cache.ids = torch.cat([cache.ids, tokens.view(-1, 1).to(self.device)], dim=1)
        return self.model(cache.ids)[:, -1]


def chat_engine(model, tokenizer) -> ToolEngine:
    """The engine a chat runs for this model: the KV-cached one for the plain GPT, recompute for an attention
    mode (`megacontext.attention_modes.AttentionModel`, which marks itself with `full_context`)."""
    return (
        RecomputeEngine(model, tokenizer)
        if getattr(model, "full_context", False)
        else ToolEngine(model, tokenizer)
    )


def session_turn(
    session,
    tools: ToolUse | None,
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Iterator[tuple[int, bool]]:
    """The assistant's turn in a memory session that decodes one token at a time (MegaContext's MCSession:
    generate, ingest, stop_tokens, messages), running its python calls as ToolEngine does: yields (token,
    forced) - forced tokens are the tool's output, ingested into the memory before they are yielded - and,
    when the model ended the turn, its stop token last. max_tokens counts both kinds. A turn cut short (max_tokens, or the caller stopped reading)
    is closed with <|assistant_end|>, so the next user turn is well formed; the turn is recorded in
    session.messages as ReplyText shows it."""
    tokenizer = session.tokenizer
    tokens: list[int] = []
    stopped = False
    try:
        while len(tokens) < max_tokens:
            forced = None
            reseed = seed if not tokens else None  # after a tool call the sampling stream continues
            for token in session.generate(max_tokens - len(tokens), temperature, top_k, seed=reseed):
                if token in session.stop_tokens:
                    stopped = True
                    yield token, False
                    break
                tokens.append(token)
                yield token, False
                forced = tools.output_after(tokens) if tools is not None else None
                if forced:
                    break
            if not forced:
                break  # stopped, or out of tokens
            session.ingest(forced)
            tokens += forced
            for token in forced:
                yield token, True
    finally:
        if not stopped:
            session.ingest([tokenizer.encode_special("<|assistant_end|>")])
        session.messages.append({"role": "assistant", "content": ReplyText(tokenizer).render(tokens)})


class ReplyText:
    """An assistant turn as a person reads it, built token by token: text as it is, a python call as a
    ```python fenced block, the tool's output as an ```output block; other special tokens are not shown.
    feed(token) returns the new text (what is shown only grows; a cut UTF-8 character waits for its next
    byte), finish() the rest, closing a block the turn left open."""

    FENCES = {
        "<|python_start|>": ("python", "<|python_end|>"),
        "<|output_start|>": ("output", "<|output_end|>"),
    }

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.opens = {special(a): (name, special(b)) for a, (name, b) in self.FENCES.items()}
        self.special = {special(s) for s in tokenizer.get_special_tokens()}
        self.closed = ""  # the rendered text of finished segments
        self.block: tuple[str, int] | None = None  # (fence name, its closing token) while inside a block
        self.ids: list[int] = []  # tokens of the current segment
        self.shown = 0

    def _text(self) -> str:
        body = self.tokenizer.decode(self.ids)
        return self.closed + (f"```{self.block[0]}\n" + body if self.block else body)

    def _close_block(self) -> None:
        body = self.tokenizer.decode(self.ids)
        self.closed += f"```{self.block[0]}\n" + body + ("" if body.endswith("\n") else "\n") + "```\n"
        self.block, self.ids = None, []

    def feed(self, token: int) -> str:
        if self.block is None and token in self.opens:
            self.closed += self.tokenizer.decode(self.ids)
            if self.closed and not self.closed.endswith("\n"):
                self.closed += "\n"
            self.block, self.ids = self.opens[token], []
        elif self.block is not None and token == self.block[1]:
            self._close_block()
        elif token not in self.special:
            self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        delta, self.shown = text[self.shown :], len(text)
        return delta

    def finish(self) -> str:
        if self.block is not None:
            self._close_block()
        text = self._text()
        delta, self.shown = text[self.shown :], len(text)
        return delta

    def render(self, tokens: list[int]) -> str:
        """The whole text of a finished turn (a fresh ReplyText: it does not touch this one's state)."""
        other = ReplyText(self.tokenizer)
        return "".join(other.feed(t) for t in tokens) + other.finish()


REPLY_BLOCK = re.compile(r"```python\n(.*?)\n?```\n```output\n(.*?)\n?```\n?", re.S)


def reply_parts(text: str) -> str | list[dict]:
    """A rendered reply back into the parts the tokenizer renders (text / python / python_output), so a
    client that sends the conversation back (the stateless OpenAI API) gives the model its tool calls as it
    made them. Only a ```python block directly followed by an ```output block counts as a call; text without
    one stays a plain string."""
    parts, at = [], 0
    for m in REPLY_BLOCK.finditer(text):
        if m.start() > at:
            parts.append({"type": "text", "text": text[at : m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        at = m.end()
    if not parts:
        return text
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts
