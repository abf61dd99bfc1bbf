"""Compression of the trained tokenizer: UTF-8 bytes per token on train and val text.

Usage: python -m scripts.tok_eval --max-chars 5e6

Higher is better (more text per token, so more text per context window and per FLOP).
"""

from __future__ import annotations

import argparse

from nanochat.common import UserError, print0, run_main
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--max-chars",
        type=lambda s: int(float(s)),
        default=5_000_000,
        help="characters of text to read from each split (default 5e6)",
    )
    return parser.parse_args()


def read_split(split: str, max_chars: int) -> list[str]:
    """The first documents of a split, up to about max_chars characters."""
    docs, nchars = [], 0
    for batch in parquets_iter_batched(split):
        for doc in batch:
            docs.append(doc)
            nchars += len(doc)
            if nchars >= max_chars:
                return docs
    return docs


def main() -> None:
    args = parse_args()
    if args.max_chars <= 0:
        raise UserError("--max-chars must be positive")
    tokenizer = get_tokenizer()
    list_parquet_files()  # one-line hint if no shards are downloaded

    rows, ratios = [], {}
    for split in ("train", "val"):
        docs = read_split(split, args.max_chars)
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        ntokens = sum(len(ids) for ids in tokenizer.encode(docs))
        if ntokens:
            ratios[f"{split}_bytes_per_token"] = nbytes / ntokens
        ratio = f"{nbytes / ntokens:.3f}" if ntokens else "n/a (no text)"
        rows.append((split, f"{len(docs):,}", f"{nbytes:,}", f"{ntokens:,}", ratio))

    header = ("split", "docs", "bytes", "tokens", "bytes/token")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    print0(f"tokenizer vocab size: {tokenizer.get_vocab_size():,}")
    for line in table:
        print0(line)
    report_table = "```\n" + "\n".join(table) + "\n```"
    get_report().log(
        "Tokenizer evaluation", [{"vocab_size": tokenizer.get_vocab_size()}, ratios, report_table]
    )


if __name__ == "__main__":
    run_main(main)
