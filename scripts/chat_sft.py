"""Chat SFT: fine-tune the mid-trained model on curated conversations (the assistant it will be).

    python -m scripts.chat_sft --dataset offline --num-iterations 100      # CPU: the offline mixture
    torchrun --standalone --nproc-per-node 8 -m scripts.chat_sft           # GPU: the real mixture
    torchrun --standalone --nproc-per-node 8 -m scripts.chat_sft --mc      # ... with MegaContext

The same program as mid-training (scripts/mid_train.py: packed conversations, loss on assistant tokens
only, --mc, resumable) with SFT's data and defaults: start from the latest mid checkpoint, a smaller
batch, every lr at 2% of mid-training's and decaying linearly to 0. Saves to chatsft_checkpoints/<same tag>/.
Real mixture: ARC-Easy/Challenge and GSM8K train (answer formats), 10K SmolTalk conversations, identity,
SpellingBee and long-document Q&A. Offline mixture: as mid-training (nanochat.chat_data.chat_mixtures).
"""

from __future__ import annotations

from nanochat.common import run_main
from scripts.mid_train import build_parser, train


def main(argv=None) -> None:
    parser = build_parser(__doc__)
    parser.set_defaults(
        source="mid",
        device_batch_size=4,
        total_batch_size=4 * 2048 * 8,  # 4 rows x 2048 tokens x 8 ranks: one micro-step on 8 GPUs
        init_lr_frac=0.02,
        warmdown_ratio=1.0,
        eval_every=100,
        eval_tokens=8 * 4 * 2048 * 8,
        offline_size=2000,
    )
    train(parser.parse_args(argv), "sft")


if __name__ == "__main__":
    run_main(main)
