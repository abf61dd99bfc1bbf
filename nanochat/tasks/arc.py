"""ARC (AI2 Reasoning Challenge): grade-school science, multiple choice, scored by the answer letter.

Hub: allenai/ai2_arc, subsets ARC-Easy / ARC-Challenge, splits train / validation / test.
Row schema: {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}.
A few questions label their choices "1".."4" instead of "A".."D"; they are re-lettered by position.
"""

from __future__ import annotations

from nanochat.tasks.common import HFTask, evaluate_mc, mc_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(HFTask):
    def __init__(self, subset: str, split: str, data_files=None, dataset=None, **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        super().__init__("allenai/ai2_arc", subset, split, data_files, dataset, **kwargs)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(
                f"ARC row {row.get('id', index)}: answerKey {row['answerKey']!r} not in {labels}"
            )
        return mc_conversation(row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_mc(conversation, completion)
