"""Progress bars for long work: shard downloads, tokenizer training, eval suites, long ingests, benchmarks.

A bar (tqdm) is drawn only where a person is watching: stderr is a terminal, $CI is unset, --quiet was
not given, and this is rank 0 of a torchrun job. Anywhere else (CI logs, pipes, files, other ranks) a
bar's carriage-return redraws would turn the log into a wall of half lines, so there it is off and the
code around it prints exactly what it printed before.

    from nanochat.progress import progress, add_quiet_flag, set_quiet
    for shard in progress(shards, desc="shards", unit="shard"): ...
    bar = progress(total=n, desc="ingest", unit="tok"); bar.update(k); bar.close()
    session.ingest(ids, progress=ingest_callback("ingest"))   # a (done, total) callback
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Turn every bar of this process off (what --quiet does)."""
    global _quiet
    _quiet = quiet


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """--quiet: no progress bars (the one place this flag is defined)."""
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they also stay off off a TTY)"
    )


def enabled(stream=None) -> bool:
    """Whether bars are drawn on `stream` (default stderr)."""
    stream = sys.stderr if stream is None else stream
    if _quiet or os.environ.get("CI") or int(os.environ.get("RANK", 0)) != 0:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Iterable | None = None, total: float | None = None, desc: str = "", unit: str = "it", **kwargs
) -> tqdm:
    """A tqdm bar on stderr, disabled (a plain pass-through iterator) wherever enabled() says no."""
    kwargs.setdefault(
        "leave", False
    )  # a finished bar clears its line: the log keeps the results, not the bars
    kwargs.setdefault("dynamic_ncols", True)
    if unit in ("B", "tok"):
        kwargs.setdefault("unit_scale", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), **kwargs)


def say(msg: str) -> None:
    """print() a line without breaking an active bar (the bar redraws below it); flushed for log files."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def ingest_callback(desc: str = "ingest", delay: float = 0.5) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback (MCSession.ingest's form) that drives a bar; the bar closes
    itself when done reaches total (the next call opens a new one), so a caller needs one line:
    `session.ingest(ids, progress=ingest_callback())`. A bar shows only once an ingest has run `delay`
    seconds, so short messages never flash one."""
    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total=total, desc=desc, unit="tok", delay=delay)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return update
