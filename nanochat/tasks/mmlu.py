"""MMLU: 57 subjects of multiple-choice questions, scored by the answer letter.

Hub: cais/mmlu, subset "all" (splits test / validation / dev) or "auxiliary_train" (split train, a
larger pool of MC questions used for mid-training). Row schema: {"question", "subject",
"choices": [4 strings], "answer": int}; auxiliary_train rows wrap that dict in a "train" field.
"""

from __future__ import annotations

from nanochat.tasks.common import HFTask, evaluate_mc, mc_conversation


class MMLU(HFTask):
    def __init__(self, subset: str, split: str, data_files=None, dataset=None, **kwargs):
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        super().__init__("cais/mmlu", subset, split, data_files, dataset, **kwargs)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        if "question" not in row and "train" in row:
            row = row["train"]
        subject = row.get("subject") or ""
        preamble = f"A question about {subject.replace('_', ' ')}.\n\n" if subject else ""
        conversation = mc_conversation(row["question"], list(row["choices"]), int(row["answer"]), preamble)
        conversation["subject"] = subject  # evaluators report accuracy per subject
        return conversation

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_mc(conversation, completion)
