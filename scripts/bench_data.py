"""Data pipeline throughput: corpus build, tokenizer training, encoding one-by-one vs batched, the loader.

Builds the offline corpus in a temp dir (nothing under $NANOCHAT_BASE_DIR is touched), trains a tokenizer
on part of it, and prints ONE JSON line (progress goes to stderr):

    python -m scripts.bench_data
    python -m scripts.bench_data --max-chars 4000000 --vocab-size 2048

MB are 10^6 bytes of UTF-8 text, so the figures compare across tokenizers and corpora.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from nanochat import dataset
from nanochat.common import UserError, run_main
from nanochat.dataloader import DataLoader
from nanochat.progress import add_quiet_flag, progress, set_quiet
from nanochat.tokenizer import Tokenizer


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def take_chars(texts: list[str], chars: int) -> list[str]:
    """Leading documents of `texts` up to about `chars` characters."""
    out, n = [], 0
    for t in texts:
        if n >= chars:
            break
        out.append(t)
        n += len(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-chars", type=int, default=16_000_000, help="corpus size (stdlib sources)")
    parser.add_argument("--synthetic-longctx", type=float, default=0.05, help="fraction of synthetic docs")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary")
    parser.add_argument("--train-chars", type=int, default=4_000_000, help="tokenizer training text")
    parser.add_argument("--encode-chars", type=int, default=4_000_000, help="text for the encode benchmarks")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="batched-encode threads")
    parser.add_argument("-B", "--batch-size", type=int, default=8, help="loader rows per batch")
    parser.add_argument("-T", "--seq-len", type=int, default=1024, help="loader tokens per row")
    parser.add_argument("--batches", type=int, default=200, help="loader batches to time")
    add_quiet_flag(parser)
    args = parser.parse_args()
    set_quiet(args.quiet)
    if min(args.max_chars, args.train_chars, args.encode_chars, args.batches) < 1:
        raise UserError("--max-chars, --train-chars, --encode-chars and --batches must be positive")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        os.environ["NANOCHAT_BASE_DIR"] = tmp  # the corpus goes to tmp/base_data
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            dataset.build_local([], 2_000_000, args.synthetic_longctx, 0, 64, args.max_chars, 16000, False)
        build_s = time.perf_counter() - t0
        train_docs = [t for batch in dataset.parquets_iter_batched("train") for t in batch]
        val_docs = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
        corpus_mb = mb(train_docs + val_docs)
        log(f"corpus: {corpus_mb:.1f} MB in {build_s:.1f}s")

        tok_text = take_chars(train_docs, args.train_chars)
        t0 = time.perf_counter()
        tok = Tokenizer.train_from_iterator(tok_text, args.vocab_size)
        tok_train_s = time.perf_counter() - t0
        log(f"tokenizer: vocab {tok.get_vocab_size()} on {mb(tok_text):.1f} MB in {tok_train_s:.1f}s")

        # Encode held-out text (val) so the numbers are not flattered by the training text.
        enc_text = take_chars(val_docs + train_docs[::-1], args.encode_chars)
        t0 = time.perf_counter()
        single = [tok.encode(t) for t in enc_text]
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = tok.encode(enc_text, num_threads=args.threads)
        encode_batch_s = time.perf_counter() - t0
        if batched != single:
            raise AssertionError("batched encoding differs from one-by-one encoding")
        n_tokens = sum(len(ids) for ids in single)
        log(f"encode: {mb(enc_text):.1f} MB one-by-one {encode_s:.2f}s, batched {encode_batch_s:.2f}s")

        dl = DataLoader(tok, args.batch_size, args.seq_len, "train", "cpu", tokenizer_threads=args.threads)
        next(dl)  # the first row group's tokenization is start-up, not throughput
        t0 = time.perf_counter()
        for _ in progress(range(args.batches), desc="loader batches", unit="batch"):
            next(dl)
        loader_s = time.perf_counter() - t0

    result = {
        "corpus_mb": round(corpus_mb, 3),
        "build_mb_s": round(corpus_mb / build_s, 3),
        "tok_train_mb_s": round(mb(tok_text) / tok_train_s, 3),
        "vocab_size": tok.get_vocab_size(),
        "encode_mb_s": round(mb(enc_text) / encode_s, 3),
        "encode_batch_mb_s": round(mb(enc_text) / encode_batch_s, 3),
        "bytes_per_token": round(mb(enc_text) * 1e6 / n_tokens, 3),
        "loader_tokens_s": round(args.batches * args.batch_size * args.seq_len / loader_s),
        "threads": args.threads,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_main(main)
