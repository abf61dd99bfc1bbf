"""Synthetic long-context tasks: passkey retrieval, multi-query associative recall, variable tracking.

These are the tasks where MegaContext must beat a same-budget recent window (docs/design.md §5): the evidence
sits `distance` units before the question, with filler in between, so a model that only sees the recent
window is at chance. Every generator is seeded and returns an evaluation example:

    {"task", "prompt", "answer", "evidence_chars", "distance_chars", "distance_tokens", "decoys"}

`prompt` is the text up to where the answer starts (it ends without a trailing space) and `answer` starts
with a space, the way a continuation is tokenized. `evidence_chars` is the [start, end) char span of the
statement the answer must come from (the key's sentence, the asked pair, the value's assignment);
`distance_*` is measured between its END and the START of the question section; `decoys` are the answers of
the look-alike statements (other locks' keys, the distractor chain's value) that a scorer may open instead.
Lengths are in characters by default; pass `count=` (say `lambda s: len(tok.encode(s))`) to make `distance`
and `prefix` token counts, so an evaluator can put the evidence 1x, 4x, ... 64x a working-context budget before
the recent window. The layout is

    [prefix filler, maybe with distractors] EVIDENCE [gap filler >= distance, with distractors] QUESTION

A training document is `prompt + answer + "."` (answer included, so next-token training learns the task).
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Callable

Count = Callable[[str], int]

# Word lists for generated filler: enough variety that filler is not a repeated sentence a model can
# memorise, and no digits, so no filler sentence looks like a key or a value.
NAMES = (
    "Ada Bruno Chiara Dmitri Elena Farid Greta Hugo Ines Jonas Keiko Lars Maya Nadia Omar Priya "
    "Quentin Rosa Samir Tomas Uma Viktor Wen Yara Zoltan"
).split()
ADJECTIVES = (
    "quiet ancient narrow bright heavy gentle distant crowded frozen golden hidden humble lively "
    "muddy patient rusty sudden tall warm wooden curious empty faint broad steady bitter clever "
    "dusty fragile proud"
).split()
NOUNS = (
    "river lantern market teacher bridge garden letter harbor village engine forest library window "
    "sailor mountain kitchen orchard painter station valley clock farmer island notebook tower "
    "wagon meadow doctor festival workshop castle fisherman road storm candle merchant"
).split()
VERBS = (
    "visited repaired described painted carried watched followed measured cleaned remembered "
    "admired crossed studied opened guarded sold found built explored mentioned"
).split()
PLACES = (
    "the old square|the northern hills|the river bank|the edge of town|the coast|the library steps|"
    "the train station|the quiet valley|the city gate|the market hall|the upper meadow|"
    "the harbor wall"
).split("|")
TIMES = (
    "in the morning|at dusk|every spring|after the rain|late at night|during the festival|"
    "before winter|on most days|at noon|once a year"
).split("|")
ADVERBS = "slowly|carefully|happily|quietly|often|rarely|eagerly|patiently|again|without a word".split("|")
TEMPLATES = (
    "The {adj} {noun} near {place} was {verb} by {name} {time}.",
    "{name} {verb} the {adj} {noun} {adverb} {time}.",
    "In {place}, {name} {verb} a {adj} {noun}.",
    "People say that the {noun} {verb} {adverb}, but {name} never believed it.",
    "{time_cap}, the {adj} {noun} and the {noun2} stood close to {place}.",
    "Nobody {verb} the {noun} {time}, so {name} {verb2} the {adj} {noun2} instead.",
    "It was {adj} in {place}, and {name} {verb} the {noun} {adverb}.",
    "{name} wrote that the {noun2} had been {adj} since the {noun} was {verb}.",
)
# Labels and keys for the tasks (colours x objects gives 240 distinct passkey labels).
COLORS = (
    "red blue green silver amber violet black white orange crimson teal ivory scarlet indigo olive".split()
)
OBJECTS = (
    "gate vault locker archive chest door safe cabinet drawer box hatch cellar attic shed tunnel portal"
).split()
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
WORDS = sorted(set(NAMES + ADJECTIVES + NOUNS + VERBS))  # single words: mostly one token each


def make_sentence(rng: random.Random) -> str:
    """One natural-ish filler sentence from the word lists."""
    time = rng.choice(TIMES)
    return rng.choice(TEMPLATES).format(
        adj=rng.choice(ADJECTIVES),
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        verb=rng.choice(VERBS),
        verb2=rng.choice(VERBS),
        place=rng.choice(PLACES),
        name=rng.choice(NAMES),
        time=time,
        time_cap=time[0].upper() + time[1:],
        adverb=rng.choice(ADVERBS),
    )


def split_sentences(texts: list[str]) -> list[str]:
    """Whitespace-normalised sentences of reasonable length (20-400 chars) from free text."""
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 20 <= len(s) <= 400:
                out.append(s)
    return out


class Filler:
    """An endless seeded stream of filler sentences: generated, or cut in order from `texts`."""

    def __init__(self, rng: random.Random, texts: list[str] | None = None):
        self.rng = rng
        self.sentences = split_sentences(texts) if texts is not None else []
        if texts is not None and not self.sentences:
            raise ValueError("filler texts hold no usable sentences (20-400 chars)")
        self.pos = rng.randrange(len(self.sentences)) if self.sentences else 0

    def sentence(self, avoid: tuple[str, ...] = ()) -> str:
        """Next sentence that contains none of `avoid` (keys must not leak into the filler)."""
        for _ in range(10_000):
            if self.sentences:
                s = self.sentences[self.pos % len(self.sentences)]
                self.pos += 1
            else:
                s = make_sentence(self.rng)
            if not any(a in s for a in avoid):
                return s
        raise ValueError("every filler sentence contains a key; use other filler texts")

    def take(self, amount: int, count: Count, avoid: tuple[str, ...] = ()) -> list[str]:
        """Sentences whose summed size (each with its joining space) reaches `amount`."""
        pieces, n = [], 0
        while n < amount:
            pieces.append(self.sentence(avoid))
            n += count(" " + pieces[-1])
        return pieces


def interleave(rng: random.Random, pieces: list[str], inserts: list[str]) -> list[str]:
    """Put `inserts` (keeping their order) at random places among `pieces`."""
    slots = sorted(rng.randint(0, len(pieces)) for _ in inserts)
    out, j = [], 0
    for i in range(len(pieces) + 1):
        while j < len(slots) and slots[j] == i:
            out.append(inserts[j])
            j += 1
        if i < len(pieces):
            out.append(pieces[i])
    return out


def merge_in_order(rng: random.Random, lists: list[list[str]]) -> list[str]:
    """A random interleaving of several lists that keeps each list's own order (a chain stays a chain)."""
    lists = [list(x) for x in lists if x]
    out = []
    while lists:
        # Pick a list with probability proportional to what it has left: a uniform random interleaving.
        i = rng.choices(range(len(lists)), weights=[len(x) for x in lists])[0]
        out.append(lists[i].pop(0))
        lists = [x for x in lists if x]
    return out


def layout(
    rng: random.Random,
    filler: Filler,
    count: Count,
    *,
    prefix: int,
    distance: int,
    evidence: str,
    question: str,
    before: list[str],
    after: list[str],
    avoid: tuple[str, ...],
    evidence_span: tuple[int, int] | None = None,
) -> tuple[str, tuple[int, int], int]:
    """Join [prefix filler + `before`] evidence [gap filler + `after`] question.

    The gap from the end of the evidence (or of `evidence_span`, the chars of it that answer the question)
    to the question start measures at least `distance` by `count`, topped up with more filler if needed
    (token counts of joined text need not be the sum of the pieces'). Returns (text, (evidence start char,
    evidence end char), question start char).
    """
    # Inserted statements take up room too, so the filler covers only what they leave.
    room = lambda amount, inserts: max(0, amount - sum(count(" " + s) for s in inserts))
    head = interleave(rng, filler.take(room(prefix, before), count, avoid), before)
    gap = interleave(rng, filler.take(room(distance, after), count, avoid), after)
    span = (0, len(evidence)) if evidence_span is None else evidence_span
    while True:
        left = " ".join(head + [evidence])
        text = " ".join(head + [evidence] + gap + [question])
        ev = (len(left) - len(evidence) + span[0], len(left) - len(evidence) + span[1])
        q_start = len(text) - len(question)
        if count(text[ev[1] : q_start]) >= distance:
            return text, ev, q_start
        gap.append(filler.sentence(avoid))


def example(
    task: str,
    text: str,
    answer: str,
    ev: tuple[int, int],
    q_start: int,
    count: Count | None,
    decoys: tuple[str, ...] = (),
) -> dict:
    between = text[ev[1] : q_start]
    return {
        "task": task,
        "prompt": text,
        "answer": answer,
        "evidence_chars": list(ev),
        "distance_chars": len(between),
        "distance_tokens": count(between) if count is not None else None,
        "decoys": list(decoys),
    }


def make_key(rng: random.Random, kind: str, digits: int = 6) -> str:
    """A passkey: a digit string (no leading zero) or a UUID-style hex string."""
    if kind == "digits":
        return str(rng.randrange(10 ** (digits - 1), 10**digits))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"key kind must be 'digits' or 'uuid', got {kind!r}")


def passkey(
    rng: random.Random,
    distance: int,
    *,
    prefix: int = 0,
    key_kind: str = "digits",
    digits: int = 6,
    n_distractors: int = 3,
    count: Count | None = None,
    filler_texts: list[str] | None = None,
) -> dict:
    """A pass key for a named lock, hidden `distance` before the question; distractor locks have keys of
    the same form, so copying the nearest key-like string is at chance."""
    measure = count or len
    labels = rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], n_distractors + 1)
    keys: list[str] = []
    while len(keys) < n_distractors + 1:
        k = make_key(rng, key_kind, digits)
        if k not in keys:
            keys.append(k)
    say = lambda label, key: (
        f"The pass key for the {label} is {key}. Remember it: {key} is the pass key for the {label}."
    )
    # Distractors go before or after the evidence in proportion to the room there.
    before, after = [], []
    for label, key in zip(labels[1:], keys[1:]):
        (before if rng.random() * (prefix + distance) < prefix else after).append(say(label, key))
    question = f"What is the pass key for the {labels[0]}? The pass key for the {labels[0]} is"
    text, ev, q_start = layout(
        rng,
        Filler(rng, filler_texts),
        measure,
        prefix=prefix,
        distance=distance,
        evidence=say(labels[0], keys[0]),
        question=question,
        before=before,
        after=after,
        avoid=tuple(keys),
    )
    return example("passkey", text, " " + keys[0], ev, q_start, count, decoys=tuple(keys[1:]))


def mqar(
    rng: random.Random,
    distance: int,
    *,
    n_pairs: int = 8,
    n_queries: int | None = None,
    prefix: int = 0,
    count: Count | None = None,
    filler_texts: list[str] | None = None,
) -> dict:
    """Multi-query associative recall: key-value pairs early, queries late. Earlier queries come with
    their values (teacher-forced); the example's answer is the value of the last query. The distance is
    measured from the end of the asked pair."""
    measure = count or len
    n_queries = n_pairs if n_queries is None else n_queries
    if not 1 <= n_queries <= n_pairs:
        raise ValueError(f"n_queries must be in 1..n_pairs={n_pairs}, got {n_queries}")
    keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], n_pairs)
    values = [str(v) for v in rng.sample(range(1000, 10000), n_pairs)]
    block = "Memorize these pairs. " + " ".join(f"{k}: {v}." for k, v in zip(keys, values))
    asked = rng.sample(range(n_pairs), n_queries)
    last = asked[-1]
    recalled = [f"{keys[i]}: {values[i]}." for i in asked[:-1]]
    question = " ".join(["Now recall the pairs."] + recalled + [f"{keys[last]}:"])
    pair = f"{keys[last]}: {values[last]}."
    text, ev, q_start = layout(
        rng,
        Filler(rng, filler_texts),
        measure,
        prefix=prefix,
        distance=distance,
        evidence=block,
        question=question,
        before=[],
        after=[],
        avoid=tuple(values),
        evidence_span=(block.index(pair), block.index(pair) + len(pair)),
    )
    return example("mqar", text, " " + values[last], ev, q_start, count)


def vartrack(
    rng: random.Random,
    distance: int,
    *,
    n_hops: int = 4,
    n_distractor_chains: int = 1,
    prefix: int = 0,
    count: Count | None = None,
    filler_texts: list[str] | None = None,
) -> dict:
    """Variable tracking: `VAR A = 52817.` then `VAR B = VAR A.` ... scattered through the gap; asks for the
    value of the chain's last variable. The evidence (the value assignment) is `distance` before the
    question; distractor chains of the same form carry other values."""
    measure = count or len
    n_chains = n_distractor_chains + 1
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        name = "".join(rng.choices(LETTERS, k=4))
        if name not in names:
            names.append(name)
    values = [str(v) for v in rng.sample(range(10000, 100000), n_chains)]
    chains = []
    for c in range(n_chains):
        vs = names[c * (n_hops + 1) : (c + 1) * (n_hops + 1)]
        chains.append([f"VAR {vs[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vs, vs[1:])])
    target = names[n_hops]  # last variable of chain 0
    question = f"What is the value of VAR {target}? The value of VAR {target} is"
    after = merge_in_order(rng, [chains[0][1:]] + chains[1:])
    text, ev, q_start = layout(
        rng,
        Filler(rng, filler_texts),
        measure,
        prefix=prefix,
        distance=distance,
        evidence=chains[0][0],
        question=question,
        before=[],
        after=after,
        avoid=tuple(values),
    )
    return example("vartrack", text, " " + values[0], ev, q_start, count, decoys=tuple(values[1:]))


TASKS = {"passkey": passkey, "mqar": mqar, "vartrack": vartrack}
COPY_DRILL_FRAC = 0.5  # share of synthetic training documents that are copy drills


def make_examples(task: str, n: int, distance: int, seed: int = 0, **kwargs) -> list[dict]:
    """`n` evaluation examples of one task; example i depends only on (task, seed, i)."""
    if task not in TASKS:
        raise ValueError(f"unknown long-context task {task!r}; choose from {sorted(TASKS)}")
    return [TASKS[task](random.Random(f"{task}:{seed}:{i}"), distance, **kwargs) for i in range(n)]


def make_code(rng: random.Random, kind: str) -> str:
    """One item of a copy drill: a string nothing but the list itself predicts ("word": a single word)."""
    if kind == "word":
        return rng.choice(WORDS)
    if kind == "digits":
        return str(rng.randrange(10 ** rng.randint(2, 7), 10**8))
    if kind == "hex":
        return f"{rng.getrandbits(32):08x}"
    if kind == "letters":
        return "".join(rng.choices(LETTERS, k=rng.randint(3, 6)))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def copy_drill(rng: random.Random, chars: int, filler_texts: list[str] | None = None) -> str:
    """Rounds of "Codes: <random codes>. <filler> Repeat the codes: <the same codes>." until about `chars`.

    Every token of a repeat is predictable only by looking back at its listing. Small models learn retrieval
    (induction heads) on the synthetic tasks far sooner with these in the mix: a passkey or MQAR row needs the
    look-back for a handful of tokens, a drill for about half of them. Most rounds are short and close (a
    look-back of tens of tokens is what first teaches the circuit); some put filler in between, so the same
    circuit learns to reach across hundreds of tokens."""
    filler = Filler(rng, filler_texts)
    rounds: list[str] = []
    total = 0
    while total < chars:
        kind = rng.choice(("digits", "hex", "letters", "words", "word", "word"))
        if kind == "word":  # distinct single words, no separators: the plainest look-back there is
            codes = rng.sample(WORDS, rng.randint(8, 40))
            listing = " ".join(codes)
        else:
            codes = [make_code(rng, kind) for _ in range(rng.randint(3, 16))]
            listing = ", ".join(codes)
        spread = 0 if kind == "word" else rng.choice((0, 0, 0.5, 2, 8))  # filler is made of such words
        gap = filler.take(int(spread * len(listing)), len, avoid=tuple(codes))
        rounds.append(" ".join([f"Codes: {listing}."] + gap + [f"Repeat the codes: {listing}."]))
        total += len(rounds[-1]) + 1
    return " ".join(rounds)


def training_document(rng: random.Random, chars: int, filler_texts: list[str] | None = None) -> str:
    """One plain-text training document of about `chars` characters, answer included at the end. Half
    are copy drills (see copy_drill), the rest the evaluation tasks with fresh keys and layouts."""
    if rng.random() < COPY_DRILL_FRAC:
        return copy_drill(rng, chars, filler_texts)
    task = rng.choice(sorted(TASKS))
    if task == "passkey":
        kw, overhead = {"key_kind": rng.choice(("digits", "uuid")), "n_distractors": rng.randint(1, 4)}, 250
    elif task == "mqar":
        kw = {"n_pairs": rng.choice((4, 8, 16))}
        overhead = 45 * kw["n_pairs"]  # the pairs, then the queries
    else:
        kw, overhead = {"n_hops": rng.randint(1, 5), "n_distractor_chains": rng.randint(0, 2)}, 150
    distance = int(chars * rng.uniform(0.3, 0.9))
    prefix = max(0, chars - distance - overhead)
    ex = TASKS[task](rng, distance, prefix=prefix, filler_texts=filler_texts, **kw)
    return ex["prompt"] + ex["answer"] + "."


def training_documents(
    n: int, seed: int, min_chars: int = 1000, max_chars: int = 16000, filler_texts: list[str] | None = None
) -> list[str]:
    """`n` seeded training documents, lengths log-uniform in [min_chars, max_chars] (short ones teach the
    format cheaply, long ones put the evidence beyond a small training context)."""
    rng = random.Random(seed)
    lo, hi = math.log(min_chars), math.log(max(min_chars, max_chars))
    return [training_document(rng, int(math.exp(rng.uniform(lo, hi))), filler_texts) for _ in range(n)]


def training_row(rng: random.Random, tokenizer, length: int, chars_per_token: float = 4.0) -> list[int]:
    """`length` token ids ending exactly at the end of a fresh long-context document (BOS first, cropped from
    the front), so the answer falls in the last tokens of a training row — the horizon where MegaContext's
    working-context variants are compared — and the evidence lies somewhere before it in the same row."""
    # The same document seed at every try: the kind of document and its layout stay, only its size moves,
    # so the size converges. Crop at most ~10 % from the front if we can (a copy drill's first listing must
    # survive the crop); else the smallest document that is long enough.
    seed, chars, best = rng.getrandbits(64), int(length * chars_per_token * 1.05), None
    for _ in range(12):
        ids = tokenizer.encode(
            training_document(random.Random(seed), chars), prepend=tokenizer.get_bos_token_id()
        )
        if len(ids) >= length:
            if best is None or len(ids) < len(best):
                best = ids
            if len(ids) <= 1.1 * length:
                break
        chars = max(1, int(chars * length / len(ids) * (1.03 if len(ids) >= length else 1.08)))
    while best is None:
        chars = int(chars * 1.5)
        ids = tokenizer.encode(
            training_document(random.Random(seed), chars), prepend=tokenizer.get_bos_token_id()
        )
        best = ids if len(ids) >= length else None
    return best[-length:]


def mix_into_batch(x, y, frac: float, tokenizer, seed: int):
    """Replace about `frac` of the rows of a loader batch (inputs x, targets y: [B, T]) by end-aligned
    long-context rows (training_row). Which rows, and what replaces them, is decided by each row's own
    content and the seed, not by its position, so a row is treated the same on any rank or micro-batch."""
    import zlib

    import torch

    if frac <= 0:
        return x, y
    rows = torch.cat([x, y[:, -1:]], dim=1)
    out = rows.clone()
    for i, row in enumerate(rows):
        h = zlib.crc32(row.cpu().numpy().tobytes()) ^ (seed * 2654435761 & 0xFFFFFFFF)
        if (h % 10_000) < frac * 10_000:
            ids = training_row(random.Random(h), tokenizer, rows.shape[1])
            out[i] = torch.tensor(ids, dtype=rows.dtype, device=rows.device)
    return out[:, :-1], out[:, 1:]
