"""The chat-task base: a Task is an indexable list of conversations plus a scorer.

A conversation is the dict `tokenizer.render_conversation` takes ({"messages": [...]}, see
docs/CONTRACTS.md); multiple-choice tasks add "letters" (the answer letters on offer), which the
categorical evaluator uses to compare the model's logits over just those letters.
eval_type is "categorical" (score = the letter the model prefers) or "generative" (score = a sampled
completion). Real datasets come through HF `datasets`, imported and loaded on first use (the import
alone costs about a second), cached under $NANOCHAT_BASE_DIR/hf_datasets. Every loader also takes
`data_files=` (local json/jsonl/parquet/csv in the hub's schema) or `dataset=` (any object with
len() and row indexing, e.g. a `datasets.Dataset`), which is how tests run without a network.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from nanochat.common import UserError, get_base_dir

LETTERS = "ABCDEFGHIJ"


class Task:
    """A view start:stop:step over a source of examples; subclasses give num_examples/get_example."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self) -> str:
        raise NotImplementedError

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool | float:
        raise NotImplementedError(f"{type(self).__name__} is a training task; it has no scorer")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {n})")
        return self.get_example(self.start + index * self.step)


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (pass a task twice to
    oversample it). The order depends only on `seed` and the tasks' lengths."""

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    @property
    def eval_type(self) -> str:
        types = {t.eval_type for t in self.tasks}
        if len(types) != 1:
            raise ValueError(f"a mixture of {sorted(types)} tasks has no single eval_type")
        return types.pop()

    def num_examples(self) -> int:
        return len(self.index_map)

    def locate(self, index: int) -> tuple[Task, int]:
        """(source task, index in it) of raw example `index`."""
        t, i = self.index_map[index]
        return self.tasks[t], i

    def get_example(self, index: int) -> dict:
        task, i = self.locate(index)
        return task[i]


class TaskSequence(TaskMixture):
    """Tasks one after another, unshuffled (a curriculum)."""

    def __init__(self, tasks: list[Task], **kwargs):
        Task.__init__(self, **kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]


# ---- multiple choice


def render_mc(question: str, choices: list[str], preamble: str = "") -> str:
    """Question, then one `X. choice` line per choice, then the instruction to answer with a letter."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} choices, got {len(choices)}")
    lines = [preamble + question.strip(), ""]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


def mc_conversation(question: str, choices: list[str], answer: int, preamble: str = "") -> dict:
    """A multiple-choice conversation: the assistant answers with one letter."""
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, choices, preamble)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
    }


def evaluate_mc(conversation: dict, completion: str) -> bool:
    """The completion's first letter (the categorical evaluator passes just the chosen letter) against
    the reference letter."""
    found = re.match(r"\s*\(?([A-J])\b", completion)
    return found is not None and found.group(1) == conversation["messages"][-1]["content"]


# ---- final answers "#### 42" (GSM8K's convention; also used by the generated arithmetic tasks)


def extract_final_answer(text: str) -> str | None:
    """The number after the last '####', commas removed; None when there is none."""
    found = re.findall(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)", text)
    return found[-1].replace(",", "") if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or float(a) == float(b)


def final_answer_of(conversation: dict) -> str | None:
    """The reference final answer: from the last assistant message's text parts."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, list):
        content = "".join(p["text"] for p in content if p["type"] == "text")
    return extract_final_answer(content)


# ---- loading datasets


def load_hf_dataset(path: str, name: str | None, split: str, data_files=None, dataset=None):
    """A dataset split: injected as-is, from local files in the hub's schema, or from the HF hub.

    data_files: a path or list of paths (one split), or {split: paths}. The format comes from the
    extension (.json/.jsonl, .parquet, .csv).
    """
    if dataset is not None:
        return dataset
    from datasets import load_dataset  # lazy: only callers that load data pay for the import

    cache_dir = str(get_base_dir() / "hf_datasets")
    if data_files is not None:
        files = data_files[split] if isinstance(data_files, dict) else data_files
        first = str(files if isinstance(files, (str, Path)) else files[0])
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            Path(first).suffix
        )
        if builder is None:
            raise UserError(f"data_files must be .json/.jsonl/.parquet/.csv, got {first}")
        files = str(files) if isinstance(files, Path) else files
        return load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    try:
        return load_dataset(path, name, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise UserError(
            f"could not load {path} ({name or 'default'}, {split}): {e}. The first load needs internet; "
            "later loads use the cache under $NANOCHAT_BASE_DIR/hf_datasets"
        ) from e


class HFTask(Task):
    """A task over one HF dataset split, loaded on first use."""

    def __init__(self, path: str, name: str | None, split: str, data_files=None, dataset=None, **kwargs):
        super().__init__(**kwargs)
        self._source = (path, name, split, data_files, dataset)
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = load_hf_dataset(*self._source)
        return self._ds

    def num_examples(self) -> int:
        return len(self.ds)
