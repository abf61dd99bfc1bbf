"""GSM8K: grade-school math word problems with worked solutions, scored by the final number.

Hub: openai/gsm8k, subsets "main" / "socratic", splits train / test. Row schema: {"question", "answer"}.
The reference solution marks each arithmetic step as `<<48/2=24>>`; these become calculator tool calls
in the assistant turn (a "python" part `48/2`, then a "python_output" part `24`), so SFT teaches the
model to call the tool and the mask keeps it from being trained to predict the tool's output. The last
line `#### 72` carries the final answer.
"""

from __future__ import annotations

import re

from nanochat.tasks.common import HFTask, extract_final_answer, final_answer_of, numbers_equal

CALC = re.compile(r"(<<[^<>]*>>)")


def answer_to_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant content parts: text, then python/python_output per <<expr=result>>.

    An annotation without '=' (no result to show) is dropped; the text around it still has the number.
    """
    parts: list[dict] = []

    def add(kind: str, text: str) -> None:
        if kind == "text" and parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text  # keep text contiguous where a dropped annotation split it
        elif kind != "text" or text:
            parts.append({"type": kind, "text": text})

    for piece in CALC.split(answer):
        if CALC.fullmatch(piece):
            expr, eq, result = piece[2:-2].rpartition("=")
            if eq and expr.strip():
                add("python", expr.strip())
                add("python_output", result.strip())
        else:
            add("text", piece)
    return parts


class GSM8K(HFTask):
    def __init__(self, subset: str = "main", split: str = "train", data_files=None, dataset=None, **kwargs):
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        super().__init__("openai/gsm8k", subset, split, data_files, dataset, **kwargs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The completion's last `#### N` equals the reference's (commas ignored, 72 == 72.0)."""
        return numbers_equal(extract_final_answer(completion), final_answer_of(conversation))
