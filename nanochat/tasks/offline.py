"""An offline chat mixture for runcpu.sh: conversations generated locally, no internet needed.

Four generated tasks stand in for the downloaded SFT data:
  * Identity   - "who are you?" answered with the fixed persona below;
  * SpellingBee - spelling and letter counting (nanochat.tasks.spellingbee);
  * Arithmetic - questions answered through the calculator tool: the assistant turn holds a text part,
                 a "python" part `12*7`, a "python_output" part `84` (exactly what
                 nanochat.execution.python_tool prints for it) and the answer ending `#### 84`;
  * LongDoc    - questions about a document pasted turns earlier (nanochat.tasks.longdoc).
`offline_mixture(split, n, seed)` mixes them into one deterministic TaskMixture.
"""

from __future__ import annotations

import ast
import operator
import random

from nanochat.tasks.common import (
    Task,
    TaskMixture,
    extract_final_answer,
    final_answer_of,
    numbers_equal,
)
from nanochat.tasks.longdoc import LongDoc
from nanochat.tasks.spellingbee import SpellingBee

PERSONA = [
    "I am nanochat, a small language model built with the MegaContext nanochat stack. MegaContext gives me "
    "a hierarchical memory: older parts of a long conversation are kept as compressed gists and expanded "
    "again when they become relevant, so I can work with documents much longer than my working context. "
    "I am small, so I make mistakes; please double-check anything important.",
    "I'm nanochat, a compact chat model trained from scratch with MegaContext nanochat. Besides ordinary "
    "chat, I have a MegaContext memory that stores long histories at several levels of detail and zooms "
    "back in on the parts I need. I can also use a Python calculator for arithmetic.",
    "My name is nanochat. I am a small MegaContext nanochat model: a GPT with a learned hierarchical memory "
    "(gists of older text that can be expanded again on demand). I was trained on a modest budget, so "
    "treat my answers with some care.",
]
IDENTITY_ASKS = [
    "Who are you?",
    "What are you?",
    "What is your name?",
    "Tell me about yourself.",
    "who r u",
    "Are you ChatGPT?",
    "Which model am I talking to?",
    "What kind of AI are you?",
    "Introduce yourself, please.",
    "What is MegaContext, and what does it have to do with you?",
]
GREETINGS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("hello", "Hi there! What can I do for you?"),
    ("Good morning.", "Good morning! What would you like to talk about?"),
]
ARITHMETIC_ASKS = ["What is {e}?", "Compute {e}.", "calculate {e}", "{e} = ?", "Can you work out {e} for me?"]
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class Identity(Task):
    """Who the assistant is; sometimes after a greeting turn. Scored by naming nanochat and MegaContext."""

    def __init__(self, size: int = 200, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.split, self.seed = size, split, seed

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"identity:{self.split}:{self.seed}:{index}")
        messages = []
        if rng.random() < 0.3:
            hello, reply = rng.choice(GREETINGS)
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        messages += [
            {"role": "user", "content": rng.choice(IDENTITY_ASKS)},
            {"role": "assistant", "content": rng.choice(PERSONA)},
        ]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        text = completion.casefold()
        return "nanochat" in text and "megacontext" in text


def calc(expr: str) -> int | float:
    """Value of an expression of numbers, + - * / and parentheses, with Python's semantics (so its str()
    is what the calculator tool prints). Anything else is refused: it is our own data, checked anyway."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")

    return value(ast.parse(expr, mode="eval").body)


def make_expression(rng: random.Random) -> str:
    """A one- or two-operation problem; divisions always come out even."""
    size = lambda: rng.choice((10, 100, 1000, 10000))
    kind = rng.choice(("+", "-", "*", "/", "mixed"))
    if kind in "+-":
        return f"{rng.randrange(1, size())} {kind} {rng.randrange(1, size())}"
    if kind == "*":
        return f"{rng.randrange(2, size())} * {rng.randrange(2, 100)}"
    if kind == "/":
        divisor = rng.randrange(2, 100)
        return f"{divisor * rng.randrange(1, size())} / {divisor}"
    a, b, c = rng.randrange(1, 100), rng.randrange(1, 100), rng.randrange(2, 20)
    return rng.choice((f"({a} + {b}) * {c}", f"{a} * {b} - {c}", f"({a} - {b}) * {c}"))


def plain(x: int | float) -> str:
    """12.0 -> '12' for the final answer (the tool prints 12.0; people write 12)."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


class Arithmetic(Task):
    """Arithmetic answered with the calculator tool; scored by the `#### N` answer."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.split, self.seed = size, split, seed

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"arithmetic:{self.split}:{self.seed}:{index}")
        expr = make_expression(rng)
        result = calc(expr)
        content = [
            {"type": "text", "text": rng.choice(("Let me calculate that.", "I'll use the calculator.", ""))},
            {"type": "python", "text": expr.replace(" ", "")},
            {"type": "python_output", "text": str(result)},
            {"type": "text", "text": f"{expr} = {plain(result)}.\n#### {plain(result)}"},
        ]
        content = [p for p in content if p["text"]]
        return {
            "messages": [
                {"role": "user", "content": rng.choice(ARITHMETIC_ASKS).format(e=expr)},
                {"role": "assistant", "content": content},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_equal(extract_final_answer(completion), final_answer_of(conversation))


# Share of each task in the mixture: identity is a small, fixed fact; the skills need more examples. At 0.1
# a chat model once answered "What is your name?" with a calculator call (docs/log.md).
MIXTURE = (("identity", 0.15), ("spelling", 0.25), ("arithmetic", 0.3), ("longdoc", 0.3))


def offline_mixture(split: str, n: int, seed: int = 0, longdoc_size: int = 1500) -> TaskMixture:
    """`n` generated conversations in a deterministic shuffle; longdoc_size: document length in chars."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < len(MIXTURE):
        raise ValueError(f"n must be at least {len(MIXTURE)} (one conversation per task), got {n}")
    sizes = {name: max(1, int(n * share)) for name, share in MIXTURE}
    sizes["arithmetic"] += n - sum(sizes.values())  # rounding remainder
    tasks = [
        Identity(sizes["identity"], split, seed),
        SpellingBee(sizes["spelling"], split, seed),
        Arithmetic(sizes["arithmetic"], split, seed),
        LongDoc(sizes["longdoc"], split, seed, doc_size=longdoc_size),
    ]
    return TaskMixture(tasks, seed=seed)
