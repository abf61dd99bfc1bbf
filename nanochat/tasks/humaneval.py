"""HumanEval: write a Python function from its signature and docstring; scored by running its unit tests.

Hub: openai/openai_humaneval, split test. Row schema: {"task_id", "prompt", "canonical_solution",
"test", "entry_point"}. The user message is the prompt (signature + docstring); the reference answer is
the whole function. Scoring runs the completion's code, then the task's `check(entry_point)`, in the
execution sandbox (nanochat.execution): pass = the program exits cleanly within the time limit.
"""

from __future__ import annotations

import re

from nanochat.execution import run_python
from nanochat.tasks.common import HFTask

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block if there is one (chat models like markdown), else the whole text."""
    found = FENCE.search(completion)
    return found.group(1) if found else completion


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The completion made runnable: the prompt's imports (and the prompt itself when the completion is
    only a function body), then the tests and the call to check()."""
    code = extract_code(completion)
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code  # a bare body continues the prompt's signature
    imports = "\n".join(
        line for line in prompt.splitlines() if line.startswith("import ") or line.startswith("from ")
    )
    return f"{imports}\n\n{code}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(HFTask):
    def __init__(self, split: str = "test", data_files=None, dataset=None, timeout_s: float = 10.0, **kwargs):
        super().__init__("openai/openai_humaneval", None, split, data_files, dataset, **kwargs)
        self.timeout_s = timeout_s

    @property
    def eval_type(self) -> str:
        return "generative"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        prompt = conversation["messages"][0]["content"]
        program = build_program(prompt, completion, conversation["test"], conversation["entry_point"])
        return run_python(program, timeout_s=self.timeout_s).ok
