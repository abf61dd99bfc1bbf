"""SmolTalk: general multi-turn chat for SFT (no scorer).

Hub: HuggingFaceTB/smol-smoltalk, splits train / test. Row schema: {"messages": [{"role", "content"}]},
optionally opening with a system message. Rows are checked to alternate user/assistant so that a bad
row fails loudly with its index instead of training on a mangled conversation.
"""

from __future__ import annotations

from nanochat.tasks.common import HFTask


class SmolTalk(HFTask):
    def __init__(self, split: str = "train", data_files=None, dataset=None, **kwargs):
        super().__init__("HuggingFaceTB/smol-smoltalk", None, split, data_files, dataset, **kwargs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        roles = [m["role"] for m in body]
        if not body or len(body) % 2 or roles != ["user", "assistant"] * (len(body) // 2):
            raise ValueError(
                f"SmolTalk row {index}: roles must alternate user/assistant and end with the assistant, "
                f"got {[m['role'] for m in messages]}"
            )
        return {"messages": messages}
