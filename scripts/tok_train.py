"""Train the BPE tokenizer on the pretraining shards and save it to $NANOCHAT_BASE_DIR/tokenizer.

Usage: python -m scripts.tok_train --vocab-size 65536 --max-chars 2e9
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from nanochat.common import UserError, get_base_dir, print0, run_main
from nanochat.dataset import list_parquet_files, open_shard, parquets_iter_batched, split_files
from nanochat.progress import add_quiet_flag, progress, set_quiet
from nanochat.report import get_report
from nanochat.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=65536,
        help="vocab size incl. 256 bytes and special tokens (default 65536)",
    )
    parser.add_argument(
        "--max-chars",
        type=lambda s: int(float(s)),
        default=2_000_000_000,
        help="stop reading training text after this many characters (default 2e9)",
    )
    parser.add_argument(
        "--doc-cap",
        type=int,
        default=10_000,
        help="use at most this many characters of each document, so a few huge documents cannot dominate "
        "the merge statistics (default 10000)",
    )
    add_quiet_flag(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} specials)"
        )
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    set_quiet(args.quiet)
    list_parquet_files()  # fail now, with the dataset's one-line hint, if no shards are downloaded

    seen = {"docs": 0, "chars": 0}
    # documents read out of the train split's (the BPE merges that follow the reading have no bar)
    total_docs = sum(open_shard(f).metadata.num_rows for f in split_files("train"))

    def texts() -> Iterator[str]:
        bar = progress(total=total_docs, desc="tokenizer: reading", unit="doc")
        for batch in parquets_iter_batched("train"):
            for doc in batch:
                doc = doc[: args.doc_cap]
                seen["docs"] += 1
                seen["chars"] += len(doc)
                bar.update(1)
                yield doc
                if seen["chars"] >= args.max_chars:
                    bar.close()
                    return
        bar.close()

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(texts(), args.vocab_size)
    train_time = time.time() - t0
    if seen["chars"] == 0:
        raise UserError("the train split holds no text: check the shards in the data directory")

    out_dir = get_base_dir() / "tokenizer"
    tokenizer.save(out_dir)
    vocab_size = tokenizer.get_vocab_size()
    token_bytes = tokenizer.token_bytes()
    text_bytes = token_bytes[token_bytes > 0].float()
    print0(f"trained on {seen['docs']:,} documents, {seen['chars']:,} characters in {train_time:.2f}s")
    print0(f"vocab size: {vocab_size:,}")
    if vocab_size < args.vocab_size:
        # BPE stops when no pair is left to merge; the model sizes its embedding from the real number
        print0(f"  (asked for {args.vocab_size:,}: the training text ran out of pairs to merge)")
    print0(
        f"token bytes: min {int(text_bytes.min())}, max {int(text_bytes.max())}, mean {text_bytes.mean():.2f}"
    )
    print0(f"saved to {out_dir}")
    get_report().log(
        "Tokenizer training",
        [
            {
                "vocab_size": vocab_size,
                "vocab_size_requested": args.vocab_size,
                "special_tokens": len(SPECIAL_TOKENS),
            },
            {"max_chars": args.max_chars, "doc_cap": args.doc_cap},
            {"train_docs": seen["docs"], "train_chars": seen["chars"], "train_time_s": round(train_time, 2)},
            {
                "token_bytes_min": int(text_bytes.min()),
                "token_bytes_max": int(text_bytes.max()),
                "token_bytes_mean": float(text_bytes.mean()),
            },
        ],
    )


if __name__ == "__main__":
    run_main(main)
