"""Long-document chat: a document pasted in the first user message, questions about it turns later.

The facts (pass keys, who guards what, what opening something costs) sit in the first `facts_within`
share of the document; the rest is filler (generated sentences, or sentences cut from `filler_texts`,
from nanochat.tasks.longctx). The questions come after the whole document, so every answer lies at
least (1 - facts_within) of the document back: beyond a small working context, which is where
MegaContext has to zoom back in. Every fact has the same form as the others, so the other facts act as
distractors. An answer is the fact's sentence ("The red box is guarded by Greta."), as a chat assistant
would say it; a reply scores when it holds the asked value as a word and no other fact's value (so listing
every value in the document does not pass). Answers used to be bare values, and a chat stage trained on
them taught the model to answer any question with a bare name or number ("Who are you?" -> "Greta").
Example i of (split, seed) depends only on those three values (and the size arguments).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from nanochat.tasks.common import Task
from nanochat.tasks.longctx import COLORS, NAMES, OBJECTS, Filler, interleave, make_key

INTRO = (
    "Here is a document. Read it carefully: I will ask you questions about it afterwards. "
    "Answer each question in one sentence.\n\n<document>\n{doc}\n</document>"
)
ACKS = [
    "I have read the document. What would you like to know?",
    "Done reading. Ask me anything about it.",
    "Got it. What is your first question?",
]


def make_facts(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n facts about distinct labels, as (statement, question, answer)."""
    facts = []
    for label in rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], n):
        kind = rng.choice(("passkey", "guard", "cost"))
        if kind == "passkey":
            key = make_key(rng, "digits")
            facts.append(
                (f"The pass key for the {label} is {key}.", f"What is the pass key for the {label}?", key)
            )
        elif kind == "guard":
            name = rng.choice(NAMES)
            facts.append((f"The {label} is guarded by {name}.", f"Who guards the {label}?", name))
        else:
            cost = str(rng.randrange(100, 1000))  # 3 digits: rarely inside real filler text
            facts.append(
                (
                    f"Opening the {label} costs {cost} coins.",
                    f"How many coins does it cost to open the {label}?",
                    cost,
                )
            )
    return facts


def longdoc_conversation(
    rng: random.Random,
    doc_size: int,
    *,
    n_facts: int = 4,
    n_questions: int = 2,
    facts_within: float = 0.25,
    count: Callable[[str], int] | None = None,
    filler_texts: list[str] | None = None,
) -> dict:
    """One conversation: document (about `doc_size` by `count`, chars by default), an acknowledgement,
    then `n_questions` question/answer turns. The last answer is the one a generative eval scores."""
    if not 1 <= n_questions <= n_facts:
        raise ValueError(f"n_questions must be in 1..n_facts={n_facts}, got {n_questions}")
    if not 0.0 < facts_within < 1.0:
        raise ValueError(f"facts_within must be in (0, 1), got {facts_within}")
    measure = count or len
    facts = make_facts(rng, n_facts)
    statements = [s for s, _, _ in facts]
    avoid = tuple(a for _, _, a in facts)  # answers must not show up in the filler
    filler = Filler(rng, filler_texts)
    early = max(0, int(doc_size * facts_within) - sum(measure(" " + s) for s in statements))
    head = interleave(rng, filler.take(early, measure, avoid), statements)
    tail = filler.take(max(0, doc_size - measure(" ".join(head))), measure, avoid)
    doc = " ".join(head + tail)

    messages = [
        {"role": "user", "content": INTRO.format(doc=doc)},
        {"role": "assistant", "content": rng.choice(ACKS)},
    ]
    asked = rng.sample(facts, n_questions)
    for statement, question, _ in asked:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": statement}]
    value = asked[-1][2]
    return {"messages": messages, "answer": value, "others": [a for _, _, a in facts if a != value]}


def holds(text: str, value: str) -> bool:
    """Whether `value` occurs in `text` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(value.casefold())}(?!\w)", text.casefold()) is not None


class LongDoc(Task):
    """`size` generated long-document conversations."""

    def __init__(
        self,
        size: int = 1000,
        split: str = "train",
        seed: int = 0,
        doc_size: int = 4000,
        n_facts: int = 4,
        n_questions: int = 2,
        facts_within: float = 0.25,
        count: Callable[[str], int] | None = None,
        filler_texts: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"LongDoc split must be 'train' or 'test', got {split!r}")
        self.size, self.split, self.seed = size, split, seed
        self.options = dict(
            n_facts=n_facts,
            n_questions=n_questions,
            facts_within=facts_within,
            count=count,
            filler_texts=filler_texts,
        )
        self.doc_size = doc_size

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"longdoc:{self.split}:{self.seed}:{index}")
        return longdoc_conversation(rng, self.doc_size, **self.options)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The asked value, and no other fact's value, in the reply."""
        others = conversation["others"]
        return holds(completion, conversation["answer"]) and not any(holds(completion, v) for v in others)
