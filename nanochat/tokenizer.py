"""Byte-level BPE tokenizer (HF `tokenizers`) with GPT-4-style pre-splitting and chat rendering.

Byte-level means every string is encodable (the 256 byte symbols are always in the vocab) and
decode(encode(s)) == s exactly. Special tokens mark chat structure; they are only ever produced by
`encode_special` / `render_conversation`, never from plain text, so a user who types "<|bos|>" gets
ordinary bytes and cannot inject a control token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanochat.common import UserError, atomic_torch_save, atomic_write_text, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the document separator in pretraining
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, written back into the assistant turn (not trained on)
    "<|output_end|>",
]

# GPT-4 (cl100k) pre-tokenisation split, alternatives tried left to right:
#   '(?i:[sdmt]|ll|ve|re)          English contractions, any case: 's 'T 'll 've 're ...
#   [^\r\n\p{L}\p{N}]?+\p{L}+      a word, with at most one leading non-letter/digit (usually the space)
#   \p{N}{1,3}                     numbers in groups of at most 3 digits (no leading space)
#    ?[^\s\p{L}\p{N}]++[\r\n]*     a punctuation run, optional leading space, trailing newlines
#   \s*[\r\n]                      whitespace ending in a newline
#   \s+(?!\S)                      whitespace not followed by text (so " word" keeps its space)
#   \s+                            any other whitespace
# Possessive quantifiers (?+ ++) stop backtracking; Oniguruma (used by `tokenizers`) supports them.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?+\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s+(?!\S)"
    r"|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE token strings.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) in order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _new_hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.normalizer = None  # no NFC/lowercasing: decode must give back the exact input
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            # use_regex=False: the split above already did the GPT-4 chunking, ByteLevel only maps bytes
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


def _text_of(content, role: str) -> str:
    """User/system content: a string, or a list of "text" parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ValueError(f"a {role} message may only hold text parts, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{role} content must be a string or a list of parts, got {type(content).__name__}")


def _assistant_parts(content) -> list[tuple[str, str]]:
    """Assistant content as [(type, text)]; a plain string is one text part."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(
            f"assistant content must be a string or a list of parts, got {type(content).__name__}"
        )
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
            raise ValueError(
                f"assistant part must be {{'type': text|python|python_output, 'text': str}}, got {part!r}"
            )
        parts.append((kind, part["text"]))
    return parts


class Tokenizer:
    """A trained byte-level BPE plus the chat special tokens."""

    def __init__(self, hf: HFTokenizer):
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        # HF matches added tokens inside input text by default, which would turn the user string
        # "<|bos|>" into the real BOS id. With this flag they are encoded as plain bytes. The flag is
        # not serialised by to_str(), so it is set here on every construction (train and load).
        hf.encode_special_tokens = True
        self._tok = hf
        self._special_ids = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}

    # ---- building and persistence

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train BPE merges on `texts`; `vocab_size` counts the 256 bytes and the special tokens.

        If the corpus runs out of pairs to merge, the vocab ends up smaller than asked.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}"
            )
        hf = _new_hf_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            min_frequency=0,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            special_tokens=SPECIAL_TOKENS,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no tokenizer at {directory} (missing {TOKENIZER_FILE})")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and token_bytes.pt, each atomically.

        token_bytes.pt goes first so that a tokenizer.json (what loaders look for) never lacks it.
        """
        directory = Path(directory)
        atomic_torch_save(self.token_bytes(), directory / TOKEN_BYTES_FILE)
        atomic_write_text(directory / TOKENIZER_FILE, self._tok.to_str())

    # ---- vocabulary

    def get_vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """Id of a special token, by full string ("<|bos|>") or bare name ("bos")."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        if key not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[key]

    def id_to_token(self, token_id: int) -> str:
        """The token's string in byte-level form (GPT-2 table: a space shows as 'Ġ')."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} out of range [0, {self.get_vocab_size()})")
        return token

    def token_bytes(self) -> torch.Tensor:
        """LongTensor[vocab]: UTF-8 bytes each token stands for; 0 for specials (they are not text).

        Summing it over a token sequence gives the byte count of the text, the denominator of bits per byte.
        """
        byte_chars = set(bytes_to_unicode().values())
        special = set(self._special_ids.values())
        counts = []
        for i in range(self.get_vocab_size()):
            if i in special:
                counts.append(0)
                continue
            token = self.id_to_token(i)
            if not token or any(c not in byte_chars for c in token):
                raise ValueError(f"token {i} ({token!r}) is not a byte-level token")
            counts.append(len(token))  # one table character per byte
        return torch.tensor(counts, dtype=torch.long)

    # ---- encoding and decoding

    def _as_id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int | None = None,
    ) -> list[int] | list[list[int]]:
        """Token ids of a string, or of each string in a list (batched in HF's Rust thread pool).

        prepend/append: a token id or a special token name added to each sequence (e.g. "<|bos|>").
        num_threads=1 encodes a list serially in this thread (e.g. in a forked worker); otherwise the
        batch runs in HF's shared pool, whose size is set per process by RAYON_NUM_THREADS.
        Special token strings in the text are always encoded as plain bytes.
        """
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self._tok.encode(text, add_special_tokens=False).ids + tail
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        if num_threads == 1:
            encodings = [self._tok.encode(t, add_special_tokens=False) for t in text]
        else:
            encodings = self._tok.encode_batch_fast(text, add_special_tokens=False)  # no offsets: faster
        return [head + e.ids + tail for e in encodings]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens shown as their strings; a cut UTF-8 sequence decodes to U+FFFD."""
        return self._tok.decode(ids, skip_special_tokens=False)

    # ---- chat

    def render_conversation(
        self, conversation: dict, max_tokens: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of a chat and the training mask (1 = the assistant is trained to produce it).

        Layout: <|bos|>, then per turn <|user_start|> text <|user_end|> or <|assistant_start|> parts
        <|assistant_end|>. Trained on: assistant text, python calls with their <|python_start|>/<|python_end|>,
        and <|assistant_end|> (the model must learn to stop). Not trained on: BOS, user turns,
        <|assistant_start|> (the harness writes it), python outputs with their markers (the tool writes them).
        A leading system message is prepended to the first user message. max_tokens truncates both lists.
        """
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError("conversation must be {'messages': [...]} with at least one message")
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        messages = [dict(m) for m in messages]
        if roles[0] == "system":
            if len(messages) < 2 or roles[1] != "user":
                raise ValueError(f"a system message must be followed by a user message, got roles {roles}")
            system = _text_of(messages[0].get("content"), "system")
            user = _text_of(messages[1].get("content"), "user")
            messages = [{"role": "user", "content": system + "\n\n" + user}] + messages[2:]
        for i, m in enumerate(messages):
            if m.get("role") != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(f"roles must alternate user/assistant (optional system first), got {roles}")

        s = self._special_ids
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([s["<|bos|>"]], 0)
        for m in messages:
            if m["role"] == "user":
                add([s["<|user_start|>"]], 0)
                add(self.encode(_text_of(m.get("content"), "user")), 0)
                add([s["<|user_end|>"]], 0)
                continue
            add([s["<|assistant_start|>"]], 0)
            for kind, text in _assistant_parts(m.get("content")):
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([s["<|python_start|>"]] + self.encode(text) + [s["<|python_end|>"]], 1)
                else:  # python_output: comes from the tool at inference time, so not a prediction target
                    add([s["<|output_start|>"]] + self.encode(text) + [s["<|output_end|>"]], 0)
            add([s["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for generating the next assistant turn.

        A final assistant message (the reference answer, in evals) is dropped; the rendered
        conversation then ends with <|assistant_start|> for the model to continue.
        """
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            if messages[-1].get("role") == "assistant":
                conversation = {"messages": messages[:-1]}
        ids, _ = self.render_conversation(conversation)
        return ids + [self._special_ids["<|assistant_start|>"]]


def get_tokenizer() -> Tokenizer:
    """The project tokenizer from $NANOCHAT_BASE_DIR/tokenizer."""
    directory = get_base_dir() / "tokenizer"
    if not (directory / TOKENIZER_FILE).is_file():
        raise UserError(f"no tokenizer at {directory}: run `python -m scripts.tok_train` first")
    return Tokenizer.from_directory(directory)


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """token_bytes.pt saved with the tokenizer: LongTensor[vocab] of UTF-8 bytes per token (0 for specials)."""
    path = get_base_dir() / "tokenizer" / TOKEN_BYTES_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer at {path.parent}: run `python -m scripts.tok_train` first")
    return torch.load(path, map_location=device)
