"""SpellingBee: generated spelling and letter-counting questions (no download).

A BPE model sees "strawberry" as two or three tokens, so "how many r's?" is hard for it: it has to
spell the word out first. These conversations teach exactly that: spell letter by letter, count along
the spelling, then check with the calculator tool (`'strawberry'.count('r')` -> `3`) and finish with
`#### 3`. Spelling questions answer `s-t-r-a-w-b-e-r-r-y`. Words come from a built-in list; every 5th
word is held out for the test split, so test words are never seen in training.
Example i of (split, seed) depends only on those three values.
"""

from __future__ import annotations

import random
import re

from nanochat.tasks.common import Task, extract_final_answer, final_answer_of, numbers_equal

WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon melon grape peach pear plum mango
papaya coconut avocado tomato potato carrot onion garlic pepper cabbage lettuce spinach broccoli
pumpkin cucumber zucchini mushroom bread butter cheese yogurt coffee cocoa sugar honey vanilla
cinnamon kitchen window garden bottle letter paper pencil eraser scissors notebook library
school teacher student lesson history science physics chemistry biology geometry algebra
calculus language grammar sentence paragraph chapter mountain river valley forest desert
island ocean harbor bridge tunnel castle village balloon hammer ladder mirror pillow blanket
curtain carpet umbrella bicycle airplane rocket engine machine computer keyboard monitor
printer internet network message browser program function variable integer decimal fraction
parallel triangle rectangle circle square cylinder pyramid sphere hexagon elephant giraffe
kangaroo penguin dolphin octopus squirrel rabbit turtle tiger zebra monkey gorilla buffalo
hippopotamus crocodile butterfly mosquito spider beetle parrot sparrow pigeon falcon eagle
chicken puppy kitten accommodate embarrass necessary occasion recommend separate definitely
committee millennium rhythm address balloon possession success tomorrow occurrence
mississippi tennessee bookkeeper assessment coffee committee aggressive address parallel
beginning different exercise familiar government guarantee immediately independent knowledge
library neighbor noticeable privilege question restaurant schedule tragedy vacuum weather
whether yesterday zigzag jazz pizza quiz buzz fizz puzzle dazzle razzle sizzle bubble
giggle google noodle poodle doodle tattoo taboo bamboo kangaroo igloo shampoo cocoon
balloon raccoon baboon moon spoon afternoon cartoon typhoon lagoon harpoon
silver golden purple yellow violet crimson scarlet indigo magenta turquoise
happy sunny funny bunny jelly belly hello shell smell spell skill still hill mill pillow
summer winter spring autumn season holiday weekend morning evening midnight
""".split()
WORDS = sorted(set(WORDS))  # duplicates above are harmless; the order must not depend on them
TEST_WORDS = WORDS[::5]
TRAIN_WORDS = [w for i, w in enumerate(WORDS) if i % 5]

SPELL_ASKS = [
    "Spell the word '{w}'.",
    "How do you spell {w}?",
    "Can you spell '{w}' letter by letter?",
    "spell {w}",
    'Please spell out "{w}" one letter at a time.',
]
COUNT_ASKS = [
    "How many {l}'s are in {w}?",
    "How many times does the letter '{l}' appear in '{w}'?",
    "Count the letter {l} in the word {w}.",
    "how many {l} in {w}",
    "In the word \"{w}\", how many times does '{l}' occur?",
]


def spelled(word: str) -> str:
    return "-".join(word)


def spell_conversation(rng: random.Random, word: str) -> dict:
    ask = rng.choice(SPELL_ASKS).format(w=word)
    return {
        "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": f"{word} is spelled {spelled(word)}."},
        ],
        "kind": "spell",
        "word": word,
    }


def count_conversation(rng: random.Random, word: str) -> dict:
    # Mostly letters of the word; sometimes one it lacks, so "0" is a possible answer too.
    letters = sorted(set(word))
    absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters]
    letter = rng.choice(letters) if rng.random() < 0.75 or not absent else rng.choice(absent)
    count = word.count(letter)
    positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
    if not positions:
        found = f"There is no '{letter}' in it, so the count is 0."
    elif len(positions) == 1:
        found = f"There is one '{letter}', at position {positions[0]}, so the count is 1."
    else:
        where = ", ".join(positions[:-1]) + " and " + positions[-1]
        found = f"The '{letter}'s are at positions {where}, so the count is {count}."
    times = "time" if count == 1 else "times"
    content = [
        {
            "type": "text",
            "text": f"Let me spell '{word}': {spelled(word)}. {found} Let me check with Python.",
        },
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},  # exactly what nanochat.execution.python_tool prints
        {"type": "text", "text": f"The letter '{letter}' appears {count} {times} in '{word}'.\n#### {count}"},
    ]
    ask = rng.choice(COUNT_ASKS).format(w=word, l=letter)
    return {
        "messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": content}],
        "kind": "count",
        "word": word,
    }


class SpellingBee(Task):
    """`size` generated questions; half spelling, half counting (per example, by its own rng)."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be 'train' or 'test', got {split!r}")
        self.size, self.split, self.seed = size, split, seed
        self.words = TRAIN_WORDS if split == "train" else TEST_WORDS

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"spellingbee:{self.split}:{self.seed}:{index}")
        word = rng.choice(self.words)
        return spell_conversation(rng, word) if rng.random() < 0.5 else count_conversation(rng, word)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if conversation["kind"] == "spell":
            found = re.findall(r"\b[a-z](?:-[a-z])+\b", completion)
            return bool(found) and found[-1] == spelled(conversation["word"])
        return numbers_equal(extract_final_answer(completion), final_answer_of(conversation))
