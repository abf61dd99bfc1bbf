"""Pretraining text as parquet shards: download FineWeb-edu, or build the same format offline; iterate it.

A shard is `shard_00000.parquet`, ... with one string column `text` (one document per row) and several
row groups per shard: a row group is the unit a rank reads and the tokenizer encodes in one batch.
The LAST shard is the validation split, so a corpus has at least two shards.

    python -m nanochat.dataset -n 8                       # first 8 FineWeb-edu shards (~100 MB each)
    python -m nanochat.dataset --local                    # offline: this Python's standard library sources
    python -m nanochat.dataset --local notes/ --synthetic-longctx 0.1
    python -m nanochat.dataset --verify                   # open every shard, print what is there
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, atomic_write_json, fsync_dir, get_base_dir, run_main
from nanochat.progress import add_quiet_flag, progress, say, set_quiet
from nanochat.tasks import longctx

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
NUM_REMOTE_SHARDS = 1823  # shard_00000 .. shard_01822
# Text-like files a user's directory may hold (code counts: it is text the tokenizer must handle).
TEXT_EXTS = set(
    ".txt .md .markdown .rst .py .tex .html .htm .c .h .cpp .js .ts .go .rs .java .sh .toml .yaml .yml .cfg .ini".split()
)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}
HOW_TO_MAKE = (
    "run `python -m nanochat.dataset -n 8` (download) or `python -m nanochat.dataset --local` (offline)"
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir() -> Path:
    return get_base_dir() / "base_data"


# -----------------------------------------------------------------------------
# Reading


def list_parquet_files(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Sorted shard paths (temp files of unfinished downloads excluded); UserError when there are none."""
    data_dir = Path(data_dir) if data_dir is not None else get_data_dir()
    files = sorted(str(p) for p in data_dir.glob("*.parquet")) if data_dir.is_dir() else []
    if not files:
        raise UserError(f"no parquet shards in {data_dir}: {HOW_TO_MAKE}")
    return files


def open_shard(path: str) -> pq.ParquetFile:
    """Open a shard and check its schema, naming the file when it is not what we expect."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is not a readable parquet file ({msg}); delete it and re-create the shards"
        ) from e
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{path} has no 'text' column (it has {names}); shards need one string column 'text'")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column 'text' is {kind}, not a string column")
    return pf


def split_files(split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Train = every shard but the last; val = the last one."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise UserError(
            f"only one shard in {Path(files[0]).parent}: the last shard is validation, so 2+ are needed"
        )
    return files[:-1] if split == "train" else files[-1:]


def iter_row_groups(
    split: str,
    start: int = 0,
    step: int = 1,
    data_dir: str | os.PathLike | None = None,
    resume: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (shard index in split, row group index, texts) for row groups start, start+step, ... of the
    split, counted across shard boundaries (so a step larger than one shard's row groups still reaches
    every row group): rank r of world w passes start=r, step=w. `resume=(shard, row_group)` starts there
    instead (the loader's exact-resume position); the stride continues from it."""
    files = split_files(split, data_dir)
    si, gi = resume if resume is not None else (0, start)
    if not 0 <= si < len(files):
        raise UserError(f"resume position shard {si} is outside the {len(files)} {split} shards")
    while si < len(files):
        pf = open_shard(files[si])
        while gi < pf.num_row_groups:
            try:
                column = pf.read_row_group(gi, columns=["text"]).column("text")
            except (pa.ArrowException, OSError) as e:
                raise UserError(
                    f"{files[si]}: row group {gi} is unreadable ({e}); re-create the shards"
                ) from e
            yield si, gi, [t for t in column.to_pylist() if t is not None]
            gi += step
        gi -= pf.num_row_groups  # the stride runs on into the next shard
        si += 1


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | os.PathLike | None = None
) -> Iterator[list[str]]:
    """One list of document texts per row group: row groups start, start+step, ... of the split."""
    for _, _, texts in iter_row_groups(split, start, step, data_dir):
        yield texts


# -----------------------------------------------------------------------------
# Download


class ShardError(Exception):
    """A shard that could not be fetched or verified."""


def verify_parquet(path: Path) -> None:
    """A complete shard opens as parquet (its footer is the last thing written) and has `text`."""
    try:
        open_shard(str(path))
    except UserError as e:
        raise ShardError(str(e)) from e


def fetch(url: str, dest: Path, timeout_s: float) -> None:
    """Stream `url` into `dest` (overwritten), fsync it, and check the byte count against Content-Length."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(dest, "wb") as f:
        expected = resp.headers.get("Content-Length")
        got = 0
        while chunk := resp.read(1 << 20):
            f.write(chunk)
            got += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    if expected is not None and got != int(expected):
        raise ShardError(f"connection closed after {got} of {expected} bytes")


def download_shard(
    index: int,
    data_dir: Path,
    base_url: str,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> str:
    """Fetch one shard to `<name>.tmp` and rename it only once complete and verified, so a shard under its
    final name is always whole. Retries with exponential backoff. Returns 'skipped' or 'downloaded'."""
    path = data_dir / shard_name(index)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by an interrupted run
    if path.exists():
        return "skipped"
    url = f"{base_url.rstrip('/')}/{shard_name(index)}"
    for attempt in range(1, attempts + 1):
        try:
            fetch(url, tmp, timeout_s)
            verify_parquet(tmp)
            os.replace(tmp, path)
            fsync_dir(data_dir)
            return "downloaded"
        except (OSError, http.client.HTTPException, ShardError) as e:
            tmp.unlink(missing_ok=True)
            # A 4xx other than timeout/rate-limit will not get better by retrying.
            permanent = (
                isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429)
            )
            if permanent or attempt == attempts:
                raise ShardError(f"{url}: {e} (after {attempt} attempt{'s' * (attempt > 1)})") from e
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def download(num_shards: int, workers: int, attempts: int, backoff_s: float, timeout_s: float) -> None:
    """Download the first `num_shards` shards with a thread pool (the work is network and disk I/O)."""
    if num_shards == -1:
        num_shards = NUM_REMOTE_SHARDS
    if not 1 <= num_shards <= NUM_REMOTE_SHARDS:
        raise UserError(f"-n must be in 1..{NUM_REMOTE_SHARDS} (or -1 for all), got {num_shards}")
    if workers < 1 or attempts < 1:
        raise UserError("--workers and --attempts must be at least 1")
    data_dir = get_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / "manifest.json").exists():
        raise UserError(
            f"{data_dir} holds a corpus built with --local; move it away or set NANOCHAT_BASE_DIR"
        )
    base_url = os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    print(f"downloading {num_shards} shards from {base_url} to {data_dir} with {workers} workers", flush=True)
    failed = []
    bar = progress(total=num_shards, desc="shards", unit="shard")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(download_shard, i, data_dir, base_url, attempts, backoff_s, timeout_s): i
            for i in range(num_shards)
        }
        for done, fut in enumerate(as_completed(futures), 1):
            try:
                status = fut.result()
            except ShardError as e:
                status = "FAILED"
                failed.append(str(e))
            say(f"[{done}/{num_shards}] {shard_name(futures[fut])} {status}")
            bar.update(1)
    bar.close()
    if failed:
        raise UserError(f"{len(failed)} of {num_shards} shards failed, first: {failed[0]}; re-run to resume")
    print(f"done: {num_shards} shards in {data_dir}", flush=True)


# -----------------------------------------------------------------------------
# Offline corpus


def read_text_files(root: Path, exts: set[str], max_chars: int | None) -> list[str]:
    """UTF-8 text of every file under `root` with one of `exts`, in sorted path order (deterministic);
    hidden and package directories skipped, undecodable and empty files skipped and counted."""
    texts, chars, skipped = [], 0, 0
    bar = progress(desc=f"reading {root.name or root}", unit="file")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in exts or name.startswith("."):
                continue
            try:
                text = (Path(dirpath) / name).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                skipped += 1
                continue
            if not text.strip():
                continue
            texts.append(text)
            chars += len(text)
            bar.update(1)
            if max_chars is not None and chars >= max_chars:
                bar.close()
                return texts
    bar.close()
    if skipped:
        print(f"{root}: skipped {skipped} unreadable or non-UTF-8 files", flush=True)
    return texts


def assign_shards(docs: list[str], shard_chars: int) -> list[list[str]]:
    """Cut the document sequence into ~equal-character shards, at least two (the last is val)."""
    total = sum(len(d) for d in docs)
    num = min(len(docs), max(2, round(total / shard_chars)))
    target = total / num
    shards: list[list[str]] = [[] for _ in range(num)]
    cum = 0
    for doc in docs:
        shards[min(num - 1, int(cum // target))].append(doc)
        cum += len(doc)
    shards = [s for s in shards if s]
    if len(shards) < 2:  # one huge last document swallowed everything: give it its own shard
        shards = [shards[0][:-1], shards[0][-1:]]
    return shards


def write_shard(path: Path, docs: list[str], row_group_docs: int) -> None:
    """Write one shard atomically (temp + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), tmp, row_group_size=row_group_docs)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_local(
    dirs: list[str],
    shard_chars: int,
    synthetic_frac: float,
    seed: int,
    row_group_docs: int,
    max_chars: int | None,
    synthetic_max_chars: int,
    force: bool,
) -> None:
    """Build the offline corpus: stdlib sources (default) or the text files under `dirs`, shuffled with
    `seed`, mixed with synthetic long-context documents, cut into shards."""
    if shard_chars < 1 or row_group_docs < 1:
        raise UserError("--shard-chars and --row-group-docs must be positive")
    if not 0.0 <= synthetic_frac < 1.0:
        raise UserError(f"--synthetic-longctx is a fraction of documents in [0, 1), got {synthetic_frac}")
    config = {
        "source": "local",
        "dirs": [str(Path(d).resolve()) for d in dirs],
        "shard_chars": shard_chars,
        "synthetic_longctx": synthetic_frac,
        "seed": seed,
        "row_group_docs": row_group_docs,
        "max_chars": max_chars,
        "synthetic_max_chars": synthetic_max_chars,
    }
    data_dir = get_data_dir()
    manifest = data_dir / "manifest.json"
    existing = sorted(data_dir.glob("*.parquet"))
    old = json.loads(manifest.read_text()).get("config") if manifest.exists() else None
    if existing and old == config and not force:
        print(
            f"{data_dir} already holds this corpus ({len(existing)} shards); --force rebuilds it", flush=True
        )
        return
    if existing and not force:
        raise UserError(
            f"{data_dir} already holds {len(existing)} other shards; pass --force to replace them"
        )

    if dirs:
        docs = []
        for d in dirs:
            if not Path(d).is_dir():
                raise UserError(f"{d} is not a directory")
            found = read_text_files(Path(d), TEXT_EXTS, max_chars)
            if not found:
                raise UserError(f"no text files ({' '.join(sorted(TEXT_EXTS))}) under {d}")
            docs += found
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        docs = read_text_files(stdlib, {".py"}, max_chars)
        if not docs:
            raise UserError(f"no .py files under the standard library at {stdlib}; name a directory instead")
    if len(docs) < 2:
        raise UserError("need at least 2 documents to make a train and a validation shard")
    n_real = len(docs)
    # FRACTION of the final documents are synthetic: n_syn / (n_real + n_syn) = FRACTION.
    n_syn = round(n_real * synthetic_frac / (1.0 - synthetic_frac))
    docs += longctx.training_documents(n_syn, seed, max_chars=synthetic_max_chars)
    random.Random(seed).shuffle(docs)

    shards = assign_shards(docs, shard_chars)
    data_dir.mkdir(parents=True, exist_ok=True)
    for p in existing + [manifest]:
        p.unlink(missing_ok=True)
    for i, shard in enumerate(progress(shards, desc="writing shards", unit="shard")):
        write_shard(data_dir / shard_name(i), shard, row_group_docs)
    fsync_dir(data_dir)
    chars = sum(len(d) for d in docs)
    atomic_write_json(
        manifest,
        {
            "config": config,
            "documents": len(docs),
            "synthetic_documents": n_syn,
            "chars": chars,
            "shards": len(shards),
        },
    )
    print(
        f"wrote {len(shards)} shards ({len(docs)} docs, {n_syn} synthetic, {chars / 1e6:.1f}M chars) to "
        f"{data_dir}; the last one is validation",
        flush=True,
    )


def verify(data_dir: Path) -> None:
    """Open every shard and print its size, so a broken corpus fails here and not mid-training."""
    for split in ("train", "val"):
        files = split_files(split, data_dir)
        rows = groups = 0
        for f in files:
            pf = open_shard(f)
            rows += pf.metadata.num_rows
            groups += pf.num_row_groups
        print(f"{split}: {len(files)} shards, {groups} row groups, {rows} documents", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "-n", "--num-shards", type=int, help="download the first N FineWeb-edu shards (-1: all)"
    )
    mode.add_argument(
        "--local", nargs="*", metavar="DIR", help="build shards offline from DIRs (default: stdlib)"
    )
    mode.add_argument("--verify", action="store_true", help="open every shard and report counts")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--backoff-s", type=float, default=2.0, help="first retry wait; doubles each retry")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="socket timeout per request")
    parser.add_argument("--shard-chars", type=int, default=4_000_000, help="--local: characters per shard")
    parser.add_argument(
        "--row-group-docs",
        type=int,
        default=64,
        help="--local: documents per row group (small, so ranks can split a small corpus)",
    )
    parser.add_argument(
        "--synthetic-longctx",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="--local: fraction of documents that are synthetic long-context tasks",
    )
    parser.add_argument(
        "--synthetic-max-chars", type=int, default=16000, help="--local: longest synthetic doc"
    )
    parser.add_argument(
        "--max-chars", type=int, default=None, help="--local: stop reading files after this many"
    )
    parser.add_argument("--seed", type=int, default=0, help="--local: shuffle and synthetic-task seed")
    parser.add_argument("--force", action="store_true", help="--local: replace shards already in base_data")
    add_quiet_flag(parser)
    args = parser.parse_args()
    set_quiet(args.quiet)
    if args.num_shards is not None:
        download(args.num_shards, args.workers, args.attempts, args.backoff_s, args.timeout_s)
    elif args.local is not None:
        build_local(
            args.local,
            args.shard_chars,
            args.synthetic_longctx,
            args.seed,
            args.row_group_docs,
            args.max_chars,
            args.synthetic_max_chars,
            args.force,
        )
    else:
        verify(get_data_dir())


if __name__ == "__main__":
    run_main(main)
